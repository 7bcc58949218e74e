"""The outbox: claiming due deliveries, recording each answer (sent, retry, failed),
bouncing addresses, and giving back the claims of a worker that died.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.engine import Connection

from clusterfeed.delivery.claims import ClaimCheck, claim_is_dead
from clusterfeed.store.aggregates.sent import SentRecorder
from clusterfeed.store.base import StoreBase, _utc
from clusterfeed.store.records import Bouncing, Delivery, _row_to_delivery
from clusterfeed.store.schema import deliveries, digests, subscribers


class OutboxMixin(StoreBase):
    """Deliveries: one (digest, subscriber) row each."""

    def recover_claims(
        self,
        now: datetime,
        lease: timedelta,
        is_delivered: Callable[[Delivery], bool],
        *,
        is_dead: ClaimCheck = claim_is_dead,
    ) -> int:
        """Release deliveries held by a dead worker; those already delivered become sent.

        ``is_delivered`` lets the transport answer for the uncertain window between
        handing a message over and committing that fact (the Maildir transport can say
        for sure; SMTP cannot, so such a message is sent again, at most one per
        connection that was open when the process died). ``is_dead`` says whether a
        claim's holder is gone (``clusterfeed.delivery.claims``); the store only applies it.
        """
        with self.engine.connect() as conn:
            rows = conn.execute(self._delivery_query().where(deliveries.c.state == "sending")).all()
        released = 0
        for row in rows:
            if not is_dead(row.claimed_by, _utc(row.claimed_at), lease, now):
                continue
            delivery = _row_to_delivery(row)
            if is_delivered(delivery):
                self.mark_sent(delivery, now, claimed_by=row.claimed_by)
            else:
                with self._tx() as conn:
                    conn.execute(
                        update(deliveries)
                        .where(
                            deliveries.c.id == row.id,
                            deliveries.c.state == "sending",
                            deliveries.c.claimed_by == row.claimed_by,
                        )
                        .values(state="pending", claimed_by=None, claimed_at=None)
                    )
            released += 1
        return released

    @staticmethod
    def _delivery_query() -> Any:
        return (
            select(
                deliveries,
                digests.c.key.label("digest_key"),
                digests.c.slot_at.label("digest_slot"),
                digests.c.created_at.label("digest_created"),
                subscribers.c.email,
                subscribers.c.name,
                subscribers.c.topics,
                subscribers.c.languages,
                subscribers.c.frequency,
            )
            .join(digests, digests.c.id == deliveries.c.digest_id)
            .join(subscribers, subscribers.c.id == deliveries.c.subscriber_id)
        )

    @staticmethod
    def _due(now: datetime | None) -> Any:
        condition = deliveries.c.state == "pending"
        if now is not None:
            condition = and_(
                condition,
                or_(deliveries.c.next_attempt_at.is_(None), deliveries.c.next_attempt_at <= now),
            )
        return condition

    def pending_deliveries(
        self, limit: int | None = None, *, now: datetime | None = None
    ) -> list[Delivery]:
        """Pending deliveries in outbox order; with ``now``, only those due by then."""
        query = self._delivery_query().where(self._due(now)).order_by(deliveries.c.id)
        if limit:
            query = query.limit(limit)
        with self.engine.connect() as conn:
            return [_row_to_delivery(r) for r in conn.execute(query)]

    def count_due(self, now: datetime) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count()).select_from(deliveries).where(self._due(now))
                ).scalar_one()
            )

    def next_retry_at(self) -> datetime | None:
        """When the earliest deferred delivery is due, for the operator's summary."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.min(deliveries.c.next_attempt_at)).where(
                    deliveries.c.state == "pending"
                )
            ).scalar()
            return _utc(value)

    def claim_due(self, worker: str, now: datetime, limit: int) -> list[Delivery]:
        """Take up to ``limit`` due deliveries for this worker in one transaction.

        Claiming a batch does not widen the duplicate window: a claimed row that was
        never handed to the server is simply released on restart; only the step from
        the server's acceptance to ``mark_sent`` matters, and that stays one commit
        per message.
        """
        with self._tx() as conn:
            ids = [
                r[0]
                for r in conn.execute(
                    select(deliveries.c.id)
                    .where(self._due(now))
                    .order_by(deliveries.c.id)
                    .limit(limit)
                )
            ]
            if not ids:
                return []
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(ids), deliveries.c.state == "pending")
                .values(state="sending", claimed_by=worker, claimed_at=now)
            )
            rows = conn.execute(
                self._delivery_query()
                .where(
                    deliveries.c.id.in_(ids),
                    deliveries.c.state == "sending",
                    deliveries.c.claimed_by == worker,
                )
                .order_by(deliveries.c.id)
            ).all()
        # ``attempts`` grows when an answer is recorded, not here: claims that a
        # stopped run gives back were no attempt.
        return [_row_to_delivery(r) for r in rows]

    def claim(self, delivery_id: int, worker: str, now: datetime) -> bool:
        """Take a pending delivery for this worker; False if someone else has it."""
        with self._tx() as conn:
            result = conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id, deliveries.c.state == "pending")
                .values(state="sending", claimed_by=worker, claimed_at=now)
            )
            return bool(result.rowcount == 1)

    def mark_sent(self, delivery: Delivery, now: datetime, claimed_by: str | None = None) -> None:
        """Record acceptance and which stories the subscriber now has, in one commit.

        A sending run keeps one ``sent_recorder()`` instead of calling this per message.
        """
        with self.sent_recorder() as recorder:
            recorder.record(delivery, now, claimed_by)

    def sent_recorder(self) -> SentRecorder:
        """A recorder of accepted messages for one sending run (close it, or use
        ``with``); it holds one database connection until then."""
        return SentRecorder(self.engine)

    def release_claims(self, worker: str) -> int:
        """Give back what this worker claimed but did not finish (a run that stopped)."""
        with self._tx() as conn:
            result = conn.execute(
                update(deliveries)
                .where(deliveries.c.state == "sending", deliveries.c.claimed_by == worker)
                .values(state="pending", claimed_by=None, claimed_at=None)
            )
            return int(result.rowcount or 0)

    def release_claim(self, delivery: Delivery, error: str) -> None:
        """Give one claimed delivery back as it was, noting ``error``, without counting
        an attempt: the run stopped for a reason of ours (a refused login), not the
        recipient's."""
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id, deliveries.c.state == "sending")
                .values(state="pending", claimed_by=None, claimed_at=None, last_error=error)
            )

    def mark_retry(
        self, delivery: Delivery, error: str, next_attempt_at: datetime | None = None
    ) -> None:
        """Put a delivery back in the queue, due at ``next_attempt_at`` (None: at once)."""
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id)
                .values(
                    state="pending",
                    claimed_by=None,
                    claimed_at=None,
                    last_error=error,
                    next_attempt_at=next_attempt_at,
                    attempts=deliveries.c.attempts + 1,
                )
            )

    def mark_failed(
        self,
        delivery: Delivery,
        error: str,
        *,
        refused_address: bool = False,
        now: datetime | None = None,
        bounce_after: int = 0,
    ) -> bool:
        """Record a delivery that will not be tried again.

        ``refused_address`` counts a permanent refusal against the address; the
        ``bounce_after``-th one in a row marks it bouncing, and its other waiting
        deliveries fail with that reason in the same transaction. True if the address
        became bouncing now.
        """
        with self._tx() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery.id)
                .values(
                    state="failed",
                    claimed_by=None,
                    last_error=error,
                    next_attempt_at=None,
                    attempts=deliveries.c.attempts + 1,
                )
            )
            if not refused_address:
                return False
            subscriber_id = delivery.subscriber.id
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(hard_bounces=subscribers.c.hard_bounces + 1)
            )
            row = conn.execute(
                select(subscribers.c.hard_bounces, subscribers.c.bouncing_since).where(
                    subscribers.c.id == subscriber_id
                )
            ).one()
            if not bounce_after or row.hard_bounces < bounce_after or row.bouncing_since:
                return False
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(bouncing_since=now or datetime.now(UTC))
            )
            conn.execute(
                update(deliveries)
                .where(
                    deliveries.c.subscriber_id == subscriber_id,
                    deliveries.c.state == "pending",
                )
                .values(
                    state="failed",
                    next_attempt_at=None,
                    last_error=f"not sent: the address is bouncing ({error})",
                )
            )
            return True

    def bouncing(self) -> list[Bouncing]:
        """Bouncing addresses with the refusal that tipped them over, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(subscribers.c.id, subscribers.c.email, subscribers.c.bouncing_since,
                       subscribers.c.hard_bounces)
                .where(subscribers.c.bouncing_since.is_not(None))
                .order_by(subscribers.c.bouncing_since, subscribers.c.email)
            ).all()  # fmt: skip
            result = []
            for row in rows:
                last = conn.execute(
                    select(deliveries.c.last_error)
                    .where(
                        deliveries.c.subscriber_id == row.id,
                        deliveries.c.state == "failed",
                        deliveries.c.last_error.not_like("not sent: %"),
                    )
                    .order_by(deliveries.c.id.desc())
                    .limit(1)
                ).scalar()
                since = _utc(row.bouncing_since)
                assert since is not None
                result.append(Bouncing(row.email, since, int(row.hard_bounces), last))
            return result

    def bouncing_subscriber_ids(self) -> set[int]:
        with self.engine.connect() as conn:
            return {
                int(r[0])
                for r in conn.execute(
                    select(subscribers.c.id).where(subscribers.c.bouncing_since.is_not(None))
                )
            }

    def clear_bouncing(self, email: str) -> bool:
        """The operator says the address works again; False if it was not bouncing."""
        with self._tx() as conn:
            result = conn.execute(
                update(subscribers)
                .where(
                    func.lower(subscribers.c.email) == email.strip().lower(),
                    subscribers.c.bouncing_since.is_not(None),
                )
                .values(bouncing_since=None, hard_bounces=0)
            )
            return bool(result.rowcount)

    def last_sent_at(self, subscriber_id: int) -> datetime | None:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(func.max(deliveries.c.sent_at)).where(
                    deliveries.c.subscriber_id == subscriber_id, deliveries.c.state == "sent"
                )
            ).scalar()
            return _utc(value)

    def delivery_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                str(state): int(n)
                for state, n in conn.execute(
                    select(deliveries.c.state, func.count()).group_by(deliveries.c.state)
                ).all()
            }


def _drop_pending(conn: Connection, subscriber_id: int, reason: str) -> None:
    """Take a subscriber's waiting digests out of the outbox (kept as failed, with why)."""
    conn.execute(
        update(deliveries)
        .where(deliveries.c.subscriber_id == subscriber_id, deliveries.c.state == "pending")
        .values(state="failed", last_error=reason)
    )
