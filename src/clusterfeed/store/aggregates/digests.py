"""Digests: planning one from the outbox's facts and writing its rows in one
transaction, and what was in the digests sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from datetime import datetime

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from clusterfeed.digest.planning import OutboxFacts
from clusterfeed.store.base import StoreBase, _chunks, _utc
from clusterfeed.store.records import DigestRecord, PlannedDelivery, _row_to_subscriber
from clusterfeed.store.schema import deliveries, digests, sent_stories, subscribers


class DigestsMixin(StoreBase):
    """Digests and the facts their planning reads."""

    def digest_exists(self, key: str) -> bool:
        with self.engine.connect() as conn:
            return (
                conn.execute(select(digests.c.id).where(digests.c.key == key)).first() is not None
            )

    def last_digest_slot(self, prefix: str) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(digests.c.slot_at)).where(digests.c.key.like(f"{prefix}%"))
            ).scalar()
            return _utc(value)

    def unavailable_story_ids(self, subscriber_id: int) -> set[int]:
        """Stories this subscriber was sent, that wait in one of their pending mails, or
        whose mail was refused for good (a 5xx, or too many 4xx): without that, the next
        digest put the refused stories into a new mail and so retried a permanent failure.
        """
        with self.engine.connect() as conn:
            sent = {
                r[0]
                for r in conn.execute(
                    select(sent_stories.c.story_id).where(
                        sent_stories.c.subscriber_id == subscriber_id
                    )
                )
            }
            for (ids,) in conn.execute(
                select(deliveries.c.story_ids).where(
                    deliveries.c.subscriber_id == subscriber_id,
                    deliveries.c.state.in_(("pending", "sending", "failed")),
                )
            ):
                sent.update(int(i) for i in ids)
            return sent

    def create_digest(
        self,
        key: str,
        slot: datetime,
        plan: Sequence[PlannedDelivery],
        now: datetime,
    ) -> bool:
        """Record a digest with these outbox rows, decided beforehand; False when a
        digest with this key exists already. A digest planned from the store's own
        facts goes through ``build_digest`` instead."""
        return self.build_digest(key, slot, now, (), lambda _facts: plan) is not None

    def build_digest(
        self,
        key: str,
        slot: datetime,
        now: datetime,
        story_ids: Iterable[int],
        decide: Callable[[OutboxFacts], Sequence[PlannedDelivery]],
        *,
        offered_since: datetime | None = None,
    ) -> int | None:
        """Plan a digest from the outbox's facts and write it, in one transaction.

        ``decide`` gets the facts about ``story_ids`` (the stories that may go into it,
        see ``OutboxFacts``) and returns the rows: (subscriber, story ids, Message-ID).
        The facts are read after the writers' lock is taken (BEGIN IMMEDIATE on SQLite,
        the advisory lock on PostgreSQL), so a run that plans while another writes its
        digest waits, then sees that digest's rows and does not plan their stories
        again. Returns the number of rows written, or None when a digest with this key
        exists already (another worker or an earlier run built it): building is then a
        no-op, which makes it idempotent. ``offered_since``: stories left out by the cap
        are looked up in digests built since then only (none of the stories that may
        go into this digest is older, see ``digest.lookback_days``).
        """
        wanted = list(dict.fromkeys(story_ids))
        try:
            with self._tx() as conn:
                if conn.execute(select(digests.c.id).where(digests.c.key == key)).first():
                    return None
                facts = self._outbox_facts(conn, wanted, offered_since)
                plan = [PlannedDelivery(*row) for row in decide(facts)]
                digest_id = conn.execute(
                    insert(digests)
                    .values(key=key, created_at=now, slot_at=slot)
                    .returning(digests.c.id)
                ).scalar_one()
                if plan:  # one statement for all rows, in the plan's order
                    conn.execute(
                        insert(deliveries),
                        [
                            {
                                "digest_id": digest_id,
                                "subscriber_id": row.subscriber.id,
                                "state": "pending",
                                "story_ids": list(row.story_ids),
                                "message_id": row.message_id,
                                "attempts": 0,
                                "left_out_ids": list(row.left_out) or None,
                            }
                            for row in plan
                        ],
                    )
        except IntegrityError:
            return None
        return len(plan)

    def outbox_facts(
        self, story_ids: Iterable[int], *, offered_since: datetime | None = None
    ) -> OutboxFacts:
        """The facts a digest would be planned from now (for a dry run or a preview:
        nothing is locked, nothing written)."""
        with self.engine.connect() as conn:
            return self._outbox_facts(conn, list(dict.fromkeys(story_ids)), offered_since)

    @staticmethod
    def _outbox_facts(
        conn: Connection, story_ids: Sequence[int], offered_since: datetime | None = None
    ) -> OutboxFacts:
        """Read ``OutboxFacts`` on ``conn``: a few queries for all subscribers, not a
        few per subscriber, since a digest's planning holds the writers' lock."""
        active = [
            _row_to_subscriber(r)
            for r in conn.execute(
                select(subscribers)
                .where(subscribers.c.status == "confirmed", subscribers.c.paused.is_(False))
                .order_by(subscribers.c.id)
            )
        ]
        bouncing = frozenset(
            int(r[0])
            for r in conn.execute(
                select(subscribers.c.id).where(subscribers.c.bouncing_since.is_not(None))
            )
        )
        last_sent = {
            int(sid): when
            for sid, value in conn.execute(
                select(deliveries.c.subscriber_id, func.max(deliveries.c.sent_at))
                .where(deliveries.c.state == "sent")
                .group_by(deliveries.c.subscriber_id)
            )
            if (when := _utc(value)) is not None
        }
        waiting_since = {
            int(sid): when
            for sid, value in conn.execute(
                select(deliveries.c.subscriber_id, func.max(digests.c.created_at))
                .join(digests, digests.c.id == deliveries.c.digest_id)
                .where(deliveries.c.state.in_(("pending", "sending")))
                .group_by(deliveries.c.subscriber_id)
            )
            if (when := _utc(value)) is not None
        }
        # What unavailable_story_ids answers for one subscriber, for all of them and
        # only for the stories that matter now.
        wanted = set(story_ids)
        had: dict[int, set[int]] = {}
        for chunk in _chunks(list(wanted), 500):
            for sid, story in conn.execute(
                select(sent_stories.c.subscriber_id, sent_stories.c.story_id).where(
                    sent_stories.c.story_id.in_(chunk)
                )
            ):
                had.setdefault(int(sid), set()).add(int(story))
        if wanted:
            for sid, ids in conn.execute(
                select(deliveries.c.subscriber_id, deliveries.c.story_ids).where(
                    deliveries.c.state.in_(("pending", "sending", "failed"))
                )
            ):
                if found := wanted.intersection(int(i) for i in ids):
                    had.setdefault(int(sid), set()).update(found)
        offered: dict[int, set[int]] = {}
        if wanted:
            query = select(deliveries.c.subscriber_id, deliveries.c.left_out_ids).where(
                deliveries.c.left_out_ids.is_not(None)
            )
            if offered_since is not None:
                query = query.join(digests, digests.c.id == deliveries.c.digest_id).where(
                    digests.c.created_at >= offered_since
                )
            for sid, ids in conn.execute(query):
                if found := wanted.intersection(int(i) for i in ids or ()):
                    offered.setdefault(int(sid), set()).update(found)
        return OutboxFacts(
            subscribers=active,
            bouncing=bouncing,
            last_sent=last_sent,
            waiting_since=waiting_since,
            had={sid: frozenset(ids) for sid, ids in had.items()},
            offered={sid: frozenset(ids) for sid, ids in offered.items()},
        )

    def sent_digests(self) -> list[DigestRecord]:
        """Digests with at least one outbox row, in the order they were created.

        A digest nobody had anything new for has no rows and no web version. Rows are
        written with their digest in one transaction, so this list only ever grows at
        its end and a digest's place in it (which names its web page) never changes.
        """
        has_rows = select(deliveries.c.id).where(deliveries.c.digest_id == digests.c.id).exists()
        query = select(digests.c.id, digests.c.key, digests.c.slot_at).where(has_rows)
        with self.engine.connect() as conn:
            return [
                DigestRecord(id=r.id, key=r.key, slot=_utc(r.slot_at) or r.slot_at)
                for r in conn.execute(query.order_by(digests.c.id))
            ]

    def digest_story_ids(self, digest_id: int) -> list[int]:
        """Every story of this digest (its general version): those any subscriber's
        mail holds, and those the cap left out of a mail (which says they are here).

        Read from the outbox rows, which are fixed when the digest is created, so the
        answer never changes; a story merged into another since is left out by the
        caller that loads the stories.
        """
        ids: set[int] = set()
        with self.engine.connect() as conn:
            for story_ids, left_out in conn.execute(
                select(deliveries.c.story_ids, deliveries.c.left_out_ids).where(
                    deliveries.c.digest_id == digest_id
                )
            ):
                ids.update(int(i) for i in story_ids)
                ids.update(int(i) for i in left_out or ())
        return sorted(ids)
