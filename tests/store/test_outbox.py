"""Digests and the outbox: one digest per key, claims taken once, acceptances
recorded as written, claims of dead workers given back, retries and failures."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from clusterfeed.digest.planning import OutboxFacts
from clusterfeed.store import PlannedDelivery, Store, StoreError, deliveries, sent_stories
from tests.conftest import allow_inserts, refuse_inserts
from tests.store.kit import NOW, apply, dead_pid, entry, one_digest, subscribers


def test_create_digest_twice_with_one_key_is_a_no_op(store: Store) -> None:
    delivery = one_digest(store)
    sub = delivery.subscriber

    again = store.create_digest(
        delivery.digest_key, NOW, [(sub, list(delivery.story_ids), "<m2@nordbio.example>")], NOW
    )

    assert again is False
    assert store.digest_exists(delivery.digest_key)
    assert [d.message_id for d in store.pending_deliveries()] == ["<m1@nordbio.example>"]


def test_a_digest_planned_while_another_is_written_waits_and_sees_its_rows(
    store: Store, database_url: str
) -> None:
    """Two digests built at once on two connections: the second one's planning reads
    the outbox only after the first one committed, so it plans nothing twice."""
    apply(store, "Helix Vektor", [entry("Helix Vektor", "guid:a", title="A", guid="a")])
    (sub,) = subscribers(store, "rita@example.org")
    story_ids = [s.id for s in store.recent_stories()]
    other = Store(database_url)
    first_inside = threading.Event()
    second_started = threading.Event()
    seen: list[OutboxFacts] = []

    def first(facts: OutboxFacts) -> list[PlannedDelivery]:
        # Inside the first transaction, with its rows not yet written: let the second
        # build start and run into the lock, then finish.
        first_inside.set()
        assert second_started.wait(30)
        time.sleep(0.3)
        return [(sub, story_ids, "<first@nordbio.example>")]

    def second(facts: OutboxFacts) -> list[PlannedDelivery]:
        seen.append(facts)
        new = [i for i in story_ids if i not in facts.had.get(sub.id or 0, ())]
        return [(sub, new, "<second@nordbio.example>")] if new else []

    def build_second() -> int | None:
        # Only once the first holds the lock: on a loaded machine the second thread
        # could otherwise take it first, and the test would measure the scheduler.
        assert first_inside.wait(30)
        second_started.set()
        return other.build_digest("manual:b", NOW, NOW, story_ids, second)

    with ThreadPoolExecutor(max_workers=2) as pool:
        a = pool.submit(store.build_digest, "manual:a", NOW, NOW, story_ids, first)
        b = pool.submit(build_second)
        assert (a.result(60), b.result(60)) == (1, 0)
    other.close()

    (facts,) = seen
    assert facts.had == {sub.id: frozenset(story_ids)}
    assert set(facts.waiting_since) == {sub.id}
    assert [d.message_id for d in store.pending_deliveries()] == ["<first@nordbio.example>"]


def test_a_delivery_can_be_claimed_only_once(store: Store, database_url: str) -> None:
    delivery = one_digest(store)
    other_worker = Store(database_url)

    assert store.claim(delivery.id, "worker-a:1", NOW) is True
    assert other_worker.claim(delivery.id, "worker-b:2", NOW) is False
    assert store.claim(delivery.id, "worker-a:1", NOW) is False
    assert store.pending_deliveries() == []

    store.mark_sent(delivery, NOW, claimed_by="worker-a:1")
    assert store.delivery_counts() == {"sent": 1}
    assert other_worker.claim(delivery.id, "worker-b:2", NOW) is False
    # The stories of a sent delivery are never offered to that subscriber again.
    assert store.unavailable_story_ids(delivery.subscriber.id) == set(delivery.story_ids)
    other_worker.close()


def test_a_stale_worker_cannot_mark_a_delivery_sent(store: Store) -> None:
    delivery = one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)

    store.mark_sent(delivery, NOW, claimed_by="worker-b:2")

    assert store.delivery_counts() == {"sending": 1}


def _sent_story_rows(store: Store) -> int:
    with store.engine.connect() as conn:
        return len(conn.execute(select(sent_stories.c.story_id)).all())


def test_a_recorded_acceptance_is_read_back_as_written(store: Store) -> None:
    delivery = one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)
    later = NOW + timedelta(minutes=7, microseconds=123456)
    with store.sent_recorder() as recorder:
        assert recorder.record(delivery, later, claimed_by="worker-a:1") is True
        # Recorded once: the row is no longer this worker's claim.
        assert recorder.record(delivery, later, claimed_by="worker-a:1") is False
    assert store.last_sent_at(delivery.subscriber.id) == later
    # Stored in the same form as the timestamps SQLAlchemy writes (claimed_at here), so
    # the database compares and sorts them alike.
    with store.engine.connect() as conn:
        sent_at, claimed_at = conn.exec_driver_sql(
            "SELECT sent_at, claimed_at FROM deliveries"
        ).one()
    if isinstance(sent_at, str):  # SQLite keeps text
        assert len(sent_at) == len(claimed_at) and sent_at[10] == claimed_at[10]
        assert sent_at > claimed_at
    else:
        assert (sent_at, claimed_at) == (later, NOW)
    assert store.delivery_counts() == {"sent": 1}
    assert _sent_story_rows(store) == len(set(delivery.story_ids)) > 0


def test_a_failed_record_of_acceptance_writes_nothing_and_says_so(store: Store) -> None:
    delivery = one_digest(store)
    store.claim(delivery.id, "worker-a:1", NOW)
    refuse_inserts(store, "sent_stories", "database or disk is full")
    try:
        with store.sent_recorder() as recorder:
            with pytest.raises(StoreError) as caught:
                recorder.record(delivery, NOW, claimed_by="worker-a:1")
            message = str(caught.value)
            assert "rita@example.org" in message and "database or disk is full" in message
            assert "sent again by the next run" in message
            # Nothing of that transaction stayed: still claimed, no stories had.
            assert store.delivery_counts() == {"sending": 1}
            assert _sent_story_rows(store) == 0
            allow_inserts(store, "sent_stories")
            # The recorder's connection works again once the database does.
            assert recorder.record(delivery, NOW, claimed_by="worker-a:1") is True
    finally:
        with contextlib.suppress(Exception):
            allow_inserts(store, "sent_stories")
    assert store.delivery_counts() == {"sent": 1}


def test_recover_claims_releases_the_claim_of_a_dead_process(store: Store) -> None:
    delivery = one_digest(store)
    dead = f"{socket.gethostname()}:{dead_pid()}"
    assert store.claim(delivery.id, dead, NOW)

    released = store.recover_claims(NOW, timedelta(minutes=15), lambda d: False)

    assert released == 1
    assert [d.id for d in store.pending_deliveries()] == [delivery.id]
    assert store.claim(delivery.id, "worker-new:3", NOW)


def test_recover_claims_marks_a_delivery_the_transport_has_as_sent(store: Store) -> None:
    delivery = one_digest(store)
    dead = f"{socket.gethostname()}:{dead_pid()}"
    store.claim(delivery.id, dead, NOW)

    store.recover_claims(NOW, timedelta(minutes=15), lambda d: d.id == delivery.id)

    assert store.delivery_counts() == {"sent": 1}
    assert store.unavailable_story_ids(delivery.subscriber.id) == set(delivery.story_ids)


def test_recover_claims_leaves_live_claims_alone(store: Store) -> None:
    delivery = one_digest(store)
    store.claim(delivery.id, f"{socket.gethostname()}:{os.getpid()}", NOW)

    released = store.recover_claims(NOW + timedelta(days=1), timedelta(minutes=15), lambda d: False)

    assert released == 0
    assert store.delivery_counts() == {"sending": 1}


def test_recover_claims_applies_the_rule_it_is_given(store: Store) -> None:
    """When a claim counts as dead is the caller's rule (clusterfeed.delivery.claims by default)."""
    delivery = one_digest(store)
    store.claim(delivery.id, f"{socket.gethostname()}:{os.getpid()}", NOW)
    asked: list[tuple[str | None, timedelta]] = []

    def gone(by: str | None, at: datetime | None, lease: timedelta, now: datetime) -> bool:
        asked.append((by, lease))
        return True

    released = store.recover_claims(NOW, timedelta(minutes=15), lambda d: False, is_dead=gone)

    assert released == 1
    assert asked == [(f"{socket.gethostname()}:{os.getpid()}", timedelta(minutes=15))]
    assert store.delivery_counts() == {"pending": 1}


def test_recover_claims_of_another_host_waits_for_the_lease(store: Store) -> None:
    delivery = one_digest(store)
    store.claim(delivery.id, "other-host.example:4242", NOW)
    lease = timedelta(minutes=15)

    assert store.recover_claims(NOW + timedelta(minutes=5), lease, lambda d: False) == 0
    assert store.delivery_counts() == {"sending": 1}
    assert store.recover_claims(NOW + timedelta(minutes=16), lease, lambda d: False) == 1
    assert store.delivery_counts() == {"pending": 1}


def test_retry_and_failure_are_recorded_with_the_reason(store: Store) -> None:
    delivery = one_digest(store)
    store.claim(delivery.id, "w:1", NOW)

    store.mark_retry(delivery, "451 try later")
    (pending,) = store.pending_deliveries()
    assert pending.attempts == 1
    store.claim(delivery.id, "w:1", NOW)
    store.mark_failed(delivery, "550 no such user")

    assert store.delivery_counts() == {"failed": 1}
    with store.engine.connect() as conn:
        row = conn.execute(select(deliveries.c.last_error, deliveries.c.attempts)).one()
    assert row.last_error == "550 no such user"
    assert row.attempts == 2
