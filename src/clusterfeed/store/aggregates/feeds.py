"""Feeds: the rows the config names, and each feed's conversation with its server
(validators, state, back-off, failures).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.engine import Connection

from clusterfeed.model import FeedStatus, PollFacts
from clusterfeed.store.base import StoreBase, _utc
from clusterfeed.store.schema import entries, feeds
from clusterfeed.store.statements import _STMT


class FeedsMixin(StoreBase):
    """The feeds' rows."""

    def sync_feeds(self, configured: Iterable[tuple[str, str, str | None]]) -> None:
        """Make sure every configured feed has a row; a changed URL forgets old validators.

        Runs at every start of every command: the rows are read in one query and only
        what differs from the config is written (500 feeds: one statement, not 1,000).
        """
        with self._tx() as conn:
            stored = {
                row.name: row
                for row in conn.execute(
                    select(feeds.c.id, feeds.c.name, feeds.c.url, feeds.c.site_url)
                )
            }
            for name, url, site in configured:
                row = stored.get(name)
                if row is None:
                    conn.execute(
                        insert(feeds).values(
                            name=name, url=url, site_url=site, consecutive_failures=0
                        )
                    )
                elif row.url != url:
                    # The operator changed the URL: a fresh start for that feed, with
                    # no validators, no back-off and no stale "moved" or "gone" verdict.
                    conn.execute(
                        update(feeds)
                        .where(feeds.c.id == row.id)
                        .values(
                            url=url,
                            site_url=site,
                            etag=None,
                            last_modified=None,
                            state="new",
                            next_attempt_at=None,
                            failing_since=None,
                            consecutive_failures=0,
                            moved_to=None,
                            discovered_url=None,
                        )
                    )
                elif row.site_url != site:
                    conn.execute(update(feeds).where(feeds.c.id == row.id).values(site_url=site))

    def reschedule(self, next_attempts: Mapping[str, datetime]) -> None:
        """Move feeds' next attempts (by feed name), e.g. after the interval changed."""
        if not next_attempts:
            return
        with self._tx() as conn:
            for name, when in next_attempts.items():
                conn.execute(update(feeds).where(feeds.c.name == name).values(next_attempt_at=when))

    def feed_validators(self, name: str) -> tuple[str | None, str | None]:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(feeds.c.etag, feeds.c.last_modified).where(feeds.c.name == name)
            ).first()
            return (row.etag, row.last_modified) if row else (None, None)

    def record_failure(
        self,
        name: str,
        *,
        status: int | None,
        error: str,
        now: datetime,
        poll: PollFacts | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                update(feeds)
                .where(feeds.c.name == name)
                .values(
                    last_attempt_at=now,
                    last_status=status,
                    last_error=error,
                    consecutive_failures=feeds.c.consecutive_failures + 1,
                    failing_since=func.coalesce(feeds.c.failing_since, now),
                    **({"state": "failing"} | _poll_values(poll)),
                )
            )

    def forget_moves(
        self, name: str, *, moved_to: bool, discovered_url: bool, warning: str
    ) -> None:
        """Drop a remembered new address that may no longer be used, saying so.

        The validators go too: they belong to the answers of the forgotten address.
        """
        values: dict[str, Any] = {"last_warning": warning, "etag": None, "last_modified": None}
        if moved_to:
            values["moved_to"] = None
        if discovered_url:
            values["discovered_url"] = None
        with self._tx() as conn:
            conn.execute(update(feeds).where(feeds.c.name == name).values(**values))

    def record_not_modified(
        self,
        name: str,
        *,
        status: int | None,
        etag: str | None,
        last_modified: str | None,
        now: datetime,
        poll: PollFacts | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                update(feeds)
                .where(feeds.c.name == name)
                .values(
                    last_attempt_at=now,
                    last_success_at=now,
                    last_status=status,
                    last_error=None,
                    consecutive_failures=0,
                    failing_since=None,
                    etag=etag,
                    last_modified=last_modified,
                    **({"state": "ok"} | _poll_values(poll)),
                )
            )

    def record_not_modified_many(
        self,
        answers: Sequence[tuple[str, int | None, str | None, str | None, PollFacts]],
        now: datetime,
    ) -> None:
        """``record_not_modified`` for many feeds in one transaction and one statement.

        ``answers`` holds (feed name, status, ETag, Last-Modified, poll facts) per feed.
        A cycle of 304s is mostly this bookkeeping; one transaction per feed cost more
        than the UPDATE itself. Each feed's row is still written whole or not at all.
        """
        if not answers:
            return
        with self._tx() as conn:
            conn.execute(
                _STMT.not_modified,
                [
                    {
                        "b_name": name,
                        "b_now": now,
                        "b_status": status,
                        "b_etag": etag,
                        "b_last_modified": last_modified,
                        "b_state": poll.state,
                        "b_next": poll.next_attempt,
                        "b_moved_to": poll.moved_to,
                        "b_discovered_url": poll.discovered_url,
                    }
                    for name, status, etag, last_modified, poll in answers
                ],
            )

    def feed_statuses(
        self, now: datetime | None = None, *, with_counts: bool = True
    ) -> list[FeedStatus]:
        """Every feed's conversation with its server, and how much it published lately.

        ``with_counts=False`` leaves out the entry counts (0 and None then), which take
        three passes over all entries that a fetch cycle, asking only for validators and
        back-off state, does not need.
        """
        month_ago = (now or datetime.now(UTC)) - timedelta(days=30)
        counts: dict[int, int] = {}
        recent: dict[int, int] = {}
        newest: dict[int, datetime] = {}
        with self.engine.connect() as conn:
            if with_counts:
                counts, recent, newest = self._entry_counts(conn, month_ago)
            result = []
            for row in conn.execute(select(feeds).order_by(feeds.c.name)):
                result.append(
                    FeedStatus(
                        name=row.name,
                        url=row.url,
                        title=row.title,
                        etag=row.etag,
                        last_modified=row.last_modified,
                        last_attempt_at=_utc(row.last_attempt_at),
                        last_success_at=_utc(row.last_success_at),
                        last_status=row.last_status,
                        last_error=row.last_error,
                        last_warning=row.last_warning,
                        consecutive_failures=row.consecutive_failures or 0,
                        entries=int(counts.get(row.id, 0)),
                        state=row.state or "new",
                        next_attempt_at=_utc(row.next_attempt_at),
                        failing_since=_utc(row.failing_since),
                        moved_to=row.moved_to,
                        discovered_url=row.discovered_url,
                        entries_30_days=int(recent.get(row.id, 0)),
                        newest_entry_at=_utc(newest.get(row.id)),
                    )
                )
            return result

    @staticmethod
    def _entry_counts(
        conn: Connection, month_ago: datetime
    ) -> tuple[dict[int, int], dict[int, int], dict[int, datetime]]:
        """Per feed id: entries, entries published since ``month_ago``, newest date."""
        counts: dict[int, int] = dict(
            conn.execute(select(entries.c.feed_id, func.count()).group_by(entries.c.feed_id)).all()
        )
        recent: dict[int, int] = dict(
            conn.execute(
                select(entries.c.feed_id, func.count())
                .where(entries.c.published_at >= month_ago)
                .group_by(entries.c.feed_id)
            ).all()
        )
        newest: dict[int, datetime] = dict(
            conn.execute(
                select(entries.c.feed_id, func.max(entries.c.published_at)).group_by(
                    entries.c.feed_id
                )
            ).all()
        )
        return counts, recent, newest


def _poll_values(poll: PollFacts | None) -> dict[str, Any]:
    if poll is None:
        return {}
    values: dict[str, Any] = {"state": poll.state, "next_attempt_at": poll.next_attempt}
    # Only overwritten when this attempt learnt something: the next fetch goes to the
    # new address directly and sees no redirect, which must not erase what we know.
    if poll.moved_to:
        values["moved_to"] = poll.moved_to
    if poll.discovered_url:
        values["discovered_url"] = poll.discovered_url
    return values
