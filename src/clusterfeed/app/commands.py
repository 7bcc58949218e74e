"""What the CLI and the web app may change: the service's commands.

The operator's corrections (split a story, clear a bounce, remove a subscriber) and a
subscriber's own choices (preferences, unsubscribing) each go through one method here,
which stamps the service's clock, so ``cli.py`` and ``web/`` never hold the store
(``tests/test_layout.py`` checks). Each is one transaction of the store; the rules
(which rows go, what is logged as consent) live in the store's aggregate or in the
plain functions it applies.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from clusterfeed.store import Store

if TYPE_CHECKING:
    from clusterfeed.store import SchemaChange
    from clusterfeed.stories.split import SplitResult


def upgrade_schema(database_url: str) -> tuple[SchemaChange, str]:
    """Bring the database's schema to this version (``clusterfeed migrate``) and say
    from which version to which, with the database's address without its password
    for the operator's message. Only the schema: no feeds or subscribers are synced,
    so it is safe to run before a new config is in place."""
    store = Store(database_url)
    try:
        return store.upgrade_schema(), store.safe_url()
    finally:
        store.close()


class Commands:
    """Changes the operator or a subscriber asks for, timed by the service's clock."""

    def __init__(self, store: Store, clock: Callable[[], datetime]) -> None:
        self._store = store
        self._clock = clock

    def split_story(self, url: str) -> SplitResult:
        """Take the item whose link is ``url`` out of its story, for good (a wrong join
        the operator corrects); the result says whether it was found and moved."""
        return self._store.split_story(url, self._clock())

    def clear_bouncing(self, email: str) -> bool:
        """Let digests reach ``email`` again after the operator fixed the address;
        False if it was not marked bouncing."""
        return self._store.clear_bouncing(email)

    def remove_subscriber(self, subscriber_id: int) -> bool:
        """The operator takes a subscriber off the list (kept on record as removed,
        their waiting digests dropped); False if they were not subscribed."""
        return self._store.unsubscribe(
            subscriber_id, self._clock(), action="remove", status="removed"
        )

    def unsubscribe(self, subscriber_id: int, *, ip_hash: str | None) -> bool:
        """The subscriber leaves by their own link: no more mail from this moment,
        recorded as their consent withdrawn; False if they were not subscribed."""
        return self._store.unsubscribe(subscriber_id, self._clock(), ip_hash=ip_hash)

    def set_preferences(
        self,
        subscriber_id: int,
        *,
        topics: Sequence[str],
        languages: Sequence[str],
        frequency: str,
        paused: bool,
        form_version: str | None,
        ip_hash: str | None,
    ) -> None:
        """A confirmed subscriber's own change of what they get, recorded as consent
        with the form's version; ignored for anyone not confirmed."""
        self._store.set_preferences(
            subscriber_id,
            self._clock(),
            topics=topics,
            languages=languages,
            frequency=frequency,
            paused=paused,
            form_version=form_version,
            ip_hash=ip_hash,
        )
