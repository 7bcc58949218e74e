"""What the CLI and the web app may read: the service's queries.

The commands and the web pages show the store's state (feeds, stories, the outbox,
subscribers) but never reach into ``Store`` themselves: they ask ``service.queries``.
So the store can be split, moved behind a worker or given another shape, and only this
module follows; ``tests/test_layout.py`` keeps ``cli.py`` and ``web/`` from reaching
past it again. Each method is one read of the store, no decision and no writing:
what to show and how stays with the caller.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from clusterfeed.model import Consent, FeedStatus, Membership, Story

if TYPE_CHECKING:
    from clusterfeed.store import Bouncing, Store
    from clusterfeed.store.aggregates.taskqueue import TaskQueueCounts


class Queries:
    """Read-only views of the store, for the operator's commands and the web app."""

    def __init__(self, store: Store) -> None:
        self._store = store

    # -- feeds and stories ----------------------------------------------------------

    def feed_statuses(self, now: datetime | None = None) -> list[FeedStatus]:
        """Every stored feed's conversation with its server and its item counts, by name.

        ``now`` dates the 30-day count; feeds since removed from the config are included,
        so a caller showing the configured ones filters them itself.
        """
        return self._store.feed_statuses(now)

    def recent_stories(self, limit: int | None = None) -> list[Story]:
        """Stories newest first by the story's date (its earliest item's), every one
        when ``limit`` is None, each with its sources in the configured order."""
        return self._store.recent_stories(limit=limit)

    def count_stories(self) -> int:
        """How many stories the store holds (joined ones count once)."""
        return self._store.count_stories()

    def count_entries(self) -> int:
        """How many partner items the store holds, across all feeds."""
        return self._store.count_entries()

    # -- the outbox -----------------------------------------------------------------

    def delivery_counts(self) -> dict[str, int]:
        """Deliveries by state ("pending", "sending", "sent", "failed"); absent is 0."""
        return self._store.delivery_counts()

    def task_queue(self) -> list[TaskQueueCounts] | None:
        """The workers' queue per unit (queued, running, failed, oldest wait), or None
        where there is no queue (SQLite, or no worker or scheduler has started yet)."""
        return self._store.task_queue()

    def count_due(self, now: datetime) -> int:
        """Deliveries a sender would take at ``now``, to size a progress bar."""
        return self._store.count_due(now)

    def next_retry_at(self) -> datetime | None:
        """When the earliest deferred delivery may be tried again; None if none waits."""
        return self._store.next_retry_at()

    def bouncing(self) -> list[Bouncing]:
        """Addresses that digests skip after permanent refusals, oldest first, each
        with the refusal that tipped it over."""
        return self._store.bouncing()

    # -- subscribers ----------------------------------------------------------------

    def memberships(self) -> list[Membership]:
        """Every subscriber in any state (pending, confirmed, unsubscribed, removed),
        oldest first."""
        return self._store.memberships()

    def membership(self, email: str) -> Membership | None:
        """The subscriber with this address (any case), or None."""
        return self._store.membership(email=email)

    def email_of(self, subscriber_id: int) -> str | None:
        """The address behind a subscriber id, which a signed link's token is checked
        against: a link stops working once its address is erased."""
        return self._store.email_of(subscriber_id)

    def consents(self) -> list[Consent]:
        """The whole consent record (sign-ups, confirmations, changes, leaving), by
        address then time, as the export shows it."""
        return self._store.consents()
