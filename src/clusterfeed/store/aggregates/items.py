"""Items: one successful fetch stored with its entries, their stories and the feed's
caching headers, in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from clusterfeed.ingest.dedup import EntryChange, plan_feed_update
from clusterfeed.model import Entry, PollFacts
from clusterfeed.store.aggregates.feeds import _poll_values
from clusterfeed.store.base import StoreBase, _chunks, _short_hash
from clusterfeed.store.records import FeedUpdateSummary
from clusterfeed.store.schema import entries, feeds, stories
from clusterfeed.store.statements import _STMT, _entry_values


class ItemsMixin(StoreBase):
    """Entries as fetched, and the stories new ones start or join by their page."""

    def apply_feed_update(
        self,
        name: str,
        new_entries: Sequence[Entry],
        *,
        status: int | None,
        etag: str | None,
        last_modified: str | None,
        title: str | None,
        warning: str | None,
        now: datetime,
        poll: PollFacts | None = None,
    ) -> FeedUpdateSummary:
        """Store one successful fetch: entries, story links and caching headers, atomically.

        A new entry joins the story of another feed's entry with the same GUID or page,
        else gets a story of its own; joining near-duplicates (other words, other
        links) is ``join_new_stories``, once per cycle.

        The validators are saved in the same transaction as the entries: if the process
        dies before the commit, the next fetch is unconditional and nothing is lost.
        """
        with self._tx() as conn:
            feed_id = conn.execute(select(feeds.c.id).where(feeds.c.name == name)).scalar_one()
            identities = [e.identity for e in new_entries]
            existing: dict[str, tuple[int, str]] = {}
            for chunk in _chunks(identities, 500):
                for row in conn.execute(
                    select(entries.c.identity, entries.c.id, entries.c.content_hash).where(
                        entries.c.feed_id == feed_id, entries.c.identity.in_(chunk)
                    )
                ):
                    existing[row.identity] = (row.id, row.content_hash)
            # Links of unknown entries, looked up among this feed's entries that this
            # fetch no longer lists: a rotated GUID for the same page (see dedup).
            unknown_links = [
                e.link_key for e in new_entries if e.identity not in existing and e.link_key
            ]
            fetched_ids = set(identities)
            by_link: dict[str, tuple[int, str]] = {}
            for chunk in _chunks(unknown_links, 500):
                for link_row in conn.execute(
                    select(entries.c.link_key, entries.c.identity, entries.c.id,
                           entries.c.content_hash)
                    .where(entries.c.feed_id == feed_id, entries.c.link_key.in_(chunk))
                    .order_by(entries.c.id.desc())
                ):  # fmt: skip
                    if link_row.identity not in fetched_ids:
                        by_link.setdefault(link_row.link_key, (link_row.id, link_row.content_hash))
            changes = plan_feed_update(new_entries, existing, by_link)
            summary = self._write_changes(conn, feed_id, changes, now)
            conn.execute(
                update(feeds)
                .where(feeds.c.id == feed_id)
                .values(
                    last_attempt_at=now,
                    last_success_at=now,
                    last_status=status,
                    last_error=None,
                    last_warning=warning,
                    consecutive_failures=0,
                    failing_since=None,
                    etag=etag,
                    last_modified=last_modified,
                    title=title,
                    **({"state": "ok"} | _poll_values(poll)),
                )
            )
            return summary

    def _write_changes(
        self, conn: Connection, feed_id: int, changes: Sequence[EntryChange], now: datetime
    ) -> FeedUpdateSummary:
        """Apply one feed's planned changes with a handful of statements, whatever their number.

        A first fetch brings a feed's whole backlog (30 items, or 10,000); one INSERT per
        entry and story cost about 20 ms of SQLAlchemy bookkeeping per feed, on the one
        thread that writes. So the lookups go by chunks of keys and the writes are
        executemany calls of statements built once (``_STMT``), which the database
        driver runs in a loop of its own. The result is the same as entry by entry:
        the lookups only see other feeds' rows, which this feed's writes do not change.
        """
        updates = [c for c in changes if c.kind == "update"]
        new = [c.entry for c in changes if c.kind == "new"]
        if updates:
            conn.execute(
                _STMT.update_entry,
                [
                    {"b_id": c.entry_id, "identity": c.entry.identity, **_entry_values(c.entry)}
                    for c in updates
                ],
            )
            ids = [c.entry_id for c in updates]
            touched: set[int] = set()
            for chunk in _chunks(ids, 500):
                touched.update(
                    int(story_id)
                    for story_id in conn.execute(
                        select(entries.c.story_id).where(entries.c.id.in_(chunk))
                    ).scalars()
                )
            conn.execute(
                _STMT.touch_story, [{"b_id": i, "updated_at": now} for i in sorted(touched)]
            )
        if not new:
            return FeedUpdateSummary(0, len(updates), 0)
        matched = self._matching_stories(conn, feed_id, new)
        unmatched = [e for e in new if e.identity not in matched]
        story_ids: dict[str, int] = {}
        if unmatched:
            keys = {f"{feed_id}-{_short_hash(e.identity)}": e.identity for e in unmatched}
            conn.execute(
                _STMT.insert_story,
                [
                    {"key": key, "first_seen_at": now, "updated_at": now,
                     "published_at": e.published}
                    for key, e in zip(keys, unmatched, strict=True)
                ],
            )  # fmt: skip
            for chunk in _chunks(list(keys), 500):
                for row in conn.execute(
                    select(stories.c.id, stories.c.key).where(stories.c.key.in_(chunk))
                ):
                    story_ids[keys[row.key]] = int(row.id)
        for entry in new:
            story_id = matched.get(entry.identity)
            if story_id is not None:
                # A second partner told a story we already have: it gains a source and
                # a new updated date, but stays one story.
                self._touch_story(conn, story_id, now, entry.published)
                story_ids[entry.identity] = story_id
        conn.execute(
            _STMT.insert_entry,
            [
                {
                    "feed_id": feed_id,
                    "story_id": story_ids[e.identity],
                    "identity": e.identity,
                    "first_seen_at": now,
                    "join_reason": "the same page" if e.identity in matched else None,
                    **_entry_values(e),
                }
                for e in new
            ],
        )
        return FeedUpdateSummary(len(new), len(updates), len(unmatched))

    @staticmethod
    def _matching_stories(conn: Connection, feed_id: int, new: Sequence[Entry]) -> dict[str, int]:
        """The story another feed already holds for each new entry (the same page).

        Per entry, the earliest other-feed entry with its link key wins, as one
        ``ORDER BY id LIMIT 1`` per entry would say; found by chunks of keys. GUIDs are
        not compared across feeds: many CMSs number items per feed (``news-2861``,
        ``?p=123``), so two feeds' equal GUIDs say nothing about the event.
        """
        first: dict[str, tuple[int, int]] = {}
        values = sorted({e.link_key for e in new if e.link_key})
        for chunk in _chunks(values, 500):
            for row in conn.execute(
                select(entries.c.link_key, entries.c.id, entries.c.story_id).where(
                    entries.c.feed_id != feed_id, entries.c.link_key.in_(chunk)
                )
            ):
                if row.link_key not in first or row.id < first[row.link_key][0]:
                    first[row.link_key] = (int(row.id), int(row.story_id))
        found: dict[str, int] = {}
        for entry in new:
            hit = first.get(entry.link_key) if entry.link_key else None
            if hit is not None:
                found[entry.identity] = hit[1]
        return found

    @staticmethod
    def _touch_story(
        conn: Connection, story_id: int, now: datetime, published: datetime | None = None
    ) -> None:
        """A story changed (an update, a new source): new ``updated``; and its date is
        that of its earliest version, which is also the one shown."""
        conn.execute(update(stories).where(stories.c.id == story_id).values(updated_at=now))
        if published is not None:
            conn.execute(
                update(stories)
                .where(stories.c.id == story_id, stories.c.published_at > published)
                .values(published_at=published)
            )

    def count_entries(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(entries)).scalar_one())
