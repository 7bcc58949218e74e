"""Subscribers and consent: the config's list mirrored, sign-ups, confirmations,
preferences, unsubscribes, erasure with its suppression list, and sign-up rate limits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from clusterfeed.model import Consent, Membership, Subscriber
from clusterfeed.store.aggregates.outbox import _drop_pending
from clusterfeed.store.base import StoreBase, _chunks, _utc
from clusterfeed.store.records import _row_to_membership, _row_to_subscriber
from clusterfeed.store.schema import (
    consents,
    deliveries,
    rate_events,
    sent_stories,
    subscribers,
    suppressions,
)
from clusterfeed.subscribers.configsync import StoredSubscriber, plan_config_sync


class SubscribersMixin(StoreBase):
    """Subscribers, their consent record and the suppression list."""

    def sync_subscribers(
        self,
        configured: Iterable[Subscriber],
        now: datetime,
        email_hash: Callable[[str], str] | None = None,
    ) -> list[str]:
        """Mirror the config's subscriber list; return the addresses refused as erased.

        What changes is ``clusterfeed.subscribers.configsync``'s decision over the facts read here
        (the rows of the listed addresses and of the config's earlier ones, and which
        new addresses are suppressed); the plan is written in the same transaction.
        """
        listed = list({s.email.lower(): s for s in configured}.values())
        emails = [s.email.lower() for s in listed]
        with self._tx() as conn:
            stored: dict[str, StoredSubscriber] = {}
            rows = list(
                conn.execute(
                    select(subscribers)
                    .where(subscribers.c.origin == "config")
                    .order_by(subscribers.c.id)
                )
            )
            for chunk in _chunks(emails, 500):
                rows.extend(
                    conn.execute(
                        select(subscribers)
                        .where(subscribers.c.email.in_(chunk), subscribers.c.origin != "config")
                        .order_by(subscribers.c.id)
                    )
                )
            for r in rows:
                stored[r.email] = StoredSubscriber(
                    id=r.id,
                    status=r.status,
                    origin=r.origin,
                    paused=bool(r.paused),
                    confirmed_at=r.confirmed_at,
                    config_prefs=r.config_prefs,
                )
            suppressed = {
                email
                for email in emails
                if email not in stored
                and email_hash is not None
                and self._suppressed(conn, email_hash(email))
            }
            plan = plan_config_sync(listed, stored, suppressed, now)
            for change in plan.changes:
                subscriber_id = change.subscriber_id
                if subscriber_id is None:
                    subscriber_id = conn.execute(
                        insert(subscribers).values(**change.values).returning(subscribers.c.id)
                    ).scalar_one()
                else:
                    conn.execute(
                        update(subscribers)
                        .where(subscribers.c.id == subscriber_id)
                        .values(**change.values)
                    )
                if change.consent is not None:
                    self._log_consent(
                        conn, subscriber_id, now, change.consent, None, change.prefs, None
                    )
        return plan.refused

    def active_subscribers(self) -> list[Subscriber]:
        """Who gets digests: confirmed and not paused."""
        with self.engine.connect() as conn:
            return [
                _row_to_subscriber(r)
                for r in conn.execute(
                    select(subscribers)
                    .where(subscribers.c.status == "confirmed", subscribers.c.paused.is_(False))
                    .order_by(subscribers.c.id)
                )
            ]

    def memberships(self) -> list[Membership]:
        """Every subscriber the store knows, in any state, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(subscribers).order_by(subscribers.c.id)).all()
        return [_row_to_membership(r) for r in rows]

    def membership(self, *, email: str | None = None, id: int | None = None) -> Membership | None:
        query = select(subscribers)
        if email is not None:
            query = query.where(subscribers.c.email == email.lower())
        elif id is not None:
            query = query.where(subscribers.c.id == id)
        else:
            raise ValueError("membership() needs an email or an id")
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return None if row is None else _row_to_membership(row)

    def email_of(self, subscriber_id: int) -> str | None:
        """The address behind an id, for checking signed tokens."""
        with self.engine.connect() as conn:
            value = conn.execute(
                select(subscribers.c.email).where(subscribers.c.id == subscriber_id)
            ).scalar()
        return None if value is None else str(value)

    @staticmethod
    def _log_consent(
        conn: Connection,
        subscriber_id: int,
        now: datetime,
        action: str,
        form_version: str | None,
        choices: Mapping[str, Any],
        ip_hash: str | None,
    ) -> None:
        conn.execute(
            insert(consents).values(
                subscriber_id=subscriber_id,
                at=now,
                action=action,
                form_version=form_version,
                choices=dict(choices),
                ip_hash=ip_hash,
            )
        )

    def record_signup(
        self,
        sub: Subscriber,
        now: datetime,
        *,
        status: str,
        origin: str,
        action: str,
        form_version: str | None,
        ip_hash: str | None,
    ) -> Membership:
        """Store a sign-up, import or operator add, and log it as consent.

        A new address gets a row in ``status``; an existing one that does not receive
        digests (pending, unsubscribed, removed) takes the new choices and ``status``; a
        confirmed subscriber keeps their choices and state (asking again changes nothing
        a stranger could use). Either way the attempt is in the consent log.
        """
        email = sub.email.lower()
        prefs = {
            "name": sub.name,
            "topics": list(sub.topics),
            "languages": list(sub.languages),
            "frequency": sub.frequency,
        }
        confirmed = status == "confirmed"
        with self._tx() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.email == email)).first()
            if row is None:
                subscriber_id = conn.execute(
                    insert(subscribers)
                    .values(
                        email=email,
                        origin=origin,
                        created_at=now,
                        status=status,
                        active=confirmed,
                        paused=False,
                        confirmed_at=now if confirmed else None,
                        **prefs,
                    )
                    .returning(subscribers.c.id)
                ).scalar_one()
            else:
                subscriber_id = row.id
                if row.status != "confirmed":
                    conn.execute(
                        update(subscribers)
                        .where(subscribers.c.id == row.id)
                        .values(
                            status=status,
                            active=confirmed,
                            paused=False,
                            origin=origin,
                            confirmed_at=now if confirmed else None,
                            unsubscribed_at=None,
                            **prefs,
                        )
                    )
            self._log_consent(conn, subscriber_id, now, action, form_version, prefs, ip_hash)
            fresh = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).one()
        return _row_to_membership(fresh)

    def confirm(
        self, subscriber_id: int, now: datetime, *, form_version: str | None, ip_hash: str | None
    ) -> Membership | None:
        """Confirm a pending sign-up (a second click changes nothing and logs nothing)."""
        with self._tx() as conn:
            row = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).first()
            if row is None:
                return None
            if row.status == "pending":
                conn.execute(
                    update(subscribers)
                    .where(subscribers.c.id == subscriber_id)
                    .values(status="confirmed", active=True, paused=False, confirmed_at=now)
                )
                choices = {
                    "topics": row.topics,
                    "languages": row.languages,
                    "frequency": row.frequency,
                }
                self._log_consent(
                    conn, subscriber_id, now, "confirm", form_version, choices, ip_hash
                )
            fresh = conn.execute(select(subscribers).where(subscribers.c.id == subscriber_id)).one()
        return _row_to_membership(fresh)

    def set_preferences(
        self,
        subscriber_id: int,
        now: datetime,
        *,
        topics: Sequence[str],
        languages: Sequence[str],
        frequency: str,
        paused: bool,
        form_version: str | None,
        ip_hash: str | None,
    ) -> None:
        """A confirmed subscriber's own change of what they get, and whether for now."""
        choices = {
            "topics": list(topics),
            "languages": list(languages),
            "frequency": frequency,
            "paused": paused,
        }
        with self._tx() as conn:
            row = conn.execute(
                select(subscribers.c.status).where(subscribers.c.id == subscriber_id)
            ).first()
            if row is None or row.status != "confirmed":
                return
            if paused:
                # "Send nothing for now" includes a digest already waiting in the outbox.
                _drop_pending(conn, subscriber_id, "subscriber paused")
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(
                    topics=list(topics),
                    languages=list(languages),
                    frequency=frequency,
                    paused=paused,
                    active=not paused,
                )
            )
            self._log_consent(
                conn, subscriber_id, now, "preferences", form_version, choices, ip_hash
            )

    def unsubscribe(
        self,
        subscriber_id: int,
        now: datetime,
        *,
        action: str = "unsubscribe",
        ip_hash: str | None = None,
        status: str = "unsubscribed",
    ) -> bool:
        """Stop all mail to a subscriber at once; True if they were receiving or pending.

        Pending outbox rows of theirs are dropped in the same commit, so no digest that
        was already planned goes out after the click.
        """
        with self._tx() as conn:
            row = conn.execute(
                select(subscribers.c.status).where(subscribers.c.id == subscriber_id)
            ).first()
            if row is None or row.status in ("unsubscribed", "removed"):
                return False
            conn.execute(
                update(subscribers)
                .where(subscribers.c.id == subscriber_id)
                .values(status=status, active=False, unsubscribed_at=now)
            )
            _drop_pending(conn, subscriber_id, f"subscriber {status}")
            self._log_consent(conn, subscriber_id, now, action, None, {}, ip_hash)
        return True

    def forget_unconfirmed(self, before: datetime) -> int:
        """Delete sign-ups that were never confirmed and were last asked for before ``before``.

        Without confirmation there is no consent to keep an address for; someone who was
        a subscriber earlier (and has digests on record) keeps their history.
        """
        last = (
            select(consents.c.subscriber_id, func.max(consents.c.at).label("last_at"))
            .group_by(consents.c.subscriber_id)
            .subquery()
        )
        has_history = (
            select(deliveries.c.id).where(deliveries.c.subscriber_id == subscribers.c.id).exists()
        )
        with self._tx() as conn:
            ids = (
                conn.execute(
                    select(subscribers.c.id)
                    .join(last, last.c.subscriber_id == subscribers.c.id)
                    .where(
                        subscribers.c.status == "pending",
                        last.c.last_at < before,
                        ~has_history,
                    )
                )
                .scalars()
                .all()
            )
            if ids:
                conn.execute(consents.delete().where(consents.c.subscriber_id.in_(ids)))
                conn.execute(subscribers.delete().where(subscribers.c.id.in_(ids)))
        return len(ids)

    def erase(self, email: str, email_hash: str, now: datetime) -> bool:
        """Delete every personal datum of one address and keep only its keyed hash.

        Their consent rows, their outbox rows and the record of which stories they got
        go with them; the suppression row lets a later import or sign-up be refused.
        True if the address was in the store.
        """
        with self._tx() as conn:
            row = conn.execute(
                select(subscribers.c.id).where(subscribers.c.email == email.lower())
            ).first()
            if row is not None:
                sid = row.id
                conn.execute(sent_stories.delete().where(sent_stories.c.subscriber_id == sid))
                conn.execute(deliveries.delete().where(deliveries.c.subscriber_id == sid))
                conn.execute(consents.delete().where(consents.c.subscriber_id == sid))
                conn.execute(subscribers.delete().where(subscribers.c.id == sid))
            exists = conn.execute(
                select(suppressions.c.email_hash).where(suppressions.c.email_hash == email_hash)
            ).first()
            if exists is None:
                conn.execute(insert(suppressions).values(email_hash=email_hash, at=now))
        return row is not None

    def is_suppressed(self, email_hash: str) -> bool:
        with self.engine.connect() as conn:
            return self._suppressed(conn, email_hash)

    @staticmethod
    def _suppressed(conn: Connection, email_hash: str) -> bool:
        found = conn.execute(
            select(suppressions.c.email_hash).where(suppressions.c.email_hash == email_hash)
        ).first()
        return found is not None

    def consents(self) -> list[Consent]:
        """The whole consent record, by subscriber then time, for export."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(consents, subscribers.c.email)
                .join(subscribers, subscribers.c.id == consents.c.subscriber_id)
                .order_by(subscribers.c.email, consents.c.at, consents.c.id)
            ).all()
        return [
            Consent(
                email=r.email,
                at=_utc(r.at) or r.at,
                action=r.action,
                form_version=r.form_version,
                choices=dict(r.choices or {}),
                ip_hash=r.ip_hash,
            )
            for r in rows
        ]

    def take_rate(self, key: str, now: datetime, window: timedelta, limit: int) -> bool:
        """Count one attempt under ``key``; False when ``limit`` were made within ``window``.

        Refused attempts are not counted, so a client that keeps trying is let in again
        once its earlier attempts leave the window. Rows older than the window go.
        """
        since = now - window
        with self._tx() as conn:
            conn.execute(
                rate_events.delete().where(rate_events.c.key == key, rate_events.c.at < since)
            )
            used = conn.execute(
                select(func.count()).select_from(rate_events).where(rate_events.c.key == key)
            ).scalar_one()
            if used >= limit:
                return False
            conn.execute(insert(rate_events).values(key=key, at=now))
        return True
