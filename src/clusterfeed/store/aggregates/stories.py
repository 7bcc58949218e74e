"""Stories: joining a cycle's new items to the stories they tell, splitting them, and
reading stories back with their sources.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection

from clusterfeed.model import Source, Story
from clusterfeed.store.base import StoreBase, _chunks, _short_hash, _utc
from clusterfeed.store.records import _row_to_entry
from clusterfeed.store.schema import (
    entries,
    feeds,
    sent_stories,
    stories,
    story_corrections,
    story_features,
)
from clusterfeed.store.statements import _STMT
from clusterfeed.stories.cluster import Match
from clusterfeed.stories.features import ItemFeatures, StoryItem
from clusterfeed.stories.matcher import StoryMatcher
from clusterfeed.stories.representative import (
    Version,
    VersionOrder,
    representative_first,
    version_order,
)
from clusterfeed.stories.split import SplitResult


class StoriesMixin(StoreBase):
    """Stories and the features story matching reads."""

    def join_new_stories(self, since: datetime, matcher: StoryMatcher) -> int:
        """Join this cycle's new one-item stories to the story they tell, if any.

        Runs once after all feeds of a cycle are stored, over the new items in order of
        publication, so the result does not depend on which partner's server answered
        first. Only stories created in this cycle are folded into others: nothing that
        readers or subscribers have already seen changes identity. Each entry's
        features (embedding and evidence) are computed the first time it is in a
        window and stored (``story_features``); deciding reads only those
        (``clusterfeed.stories.cluster.join_new``). Returns how many items joined.
        """
        from clusterfeed.stories.cluster import join_new

        with self._tx() as conn:
            new_rows = conn.execute(
                select(entries.c.id, entries.c.story_id, entries.c.dated_at)
                .join(stories, stories.c.id == entries.c.story_id)
                .where(entries.c.first_seen_at >= since, stories.c.first_seen_at >= since)
            ).all()
            if not new_rows:
                return 0
            window = timedelta(days=matcher.model.window_days)
            low = min(_utc(r.dated_at) or r.dated_at for r in new_rows) - window
            high = max(_utc(r.dated_at) or r.dated_at for r in new_rows) + window
            rows = conn.execute(
                select(
                    entries.c.id, entries.c.story_id, entries.c.link, entries.c.identity,
                    entries.c.published_at, entries.c.dated_at, entries.c.content_hash,
                    entries.c.language, entries.c.link_key, feeds.c.name.label("feed_name"),
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.dated_at >= low, entries.c.dated_at <= high)
            ).all()  # fmt: skip
            feats = self._story_features(conn, rows, matcher)
            story_of = {int(r.id): int(r.story_id) for r in rows}
            links = {int(r.id): r.link for r in rows}
            order = {
                int(r.id): (_utc(r.dated_at) or r.dated_at, r.feed_name, r.identity) for r in rows
            }
            sizes = Counter(story_of.values())
            new_ids = sorted(
                (int(r.id) for r in new_rows if sizes[int(r.story_id)] == 1 and r.id in feats),
                key=lambda i: order[i],
            )
            forced = None
            apart = self._stored_apart(conn, {r.link_key for r in rows if r.link_key})
            keys = {int(r.id): r.link_key for r in rows}
            if matcher.forces_pairs or apart:

                def forced(a: int, b: int) -> str | None:
                    if keys[b] in apart.get(keys[a], ()):
                        return "apart"
                    return matcher.forced_links(links[a], links[b])

            ordered = {i: feats[i] for i in sorted(feats, key=lambda i: (order[i], i))}
            decisions = join_new(ordered, story_of, new_ids, matcher.model, forced=forced)
            if decisions:
                # The story's shown date is its earliest version's clamped date.
                published = {int(r.id): _utc(r.published_at) or r.published_at for r in rows}
                self._write_joins(conn, decisions, new_rows, published, since)
        return len(decisions)

    @staticmethod
    def _stored_apart(conn: Connection, keys: set[str]) -> dict[str, set[str]]:
        """The pages among ``keys`` that ``stories split`` set apart, page -> pages."""
        apart: dict[str, set[str]] = {}
        for chunk in _chunks(sorted(keys), 500):
            for row in conn.execute(
                select(story_corrections.c.link_a, story_corrections.c.link_b).where(
                    story_corrections.c.verdict == "apart",
                    story_corrections.c.link_a.in_(chunk),
                )
            ):
                apart.setdefault(row.link_a, set()).add(row.link_b)
                apart.setdefault(row.link_b, set()).add(row.link_a)
        return apart

    def split_story(self, url: str, now: datetime) -> SplitResult:
        """Take the item at ``url`` out of its story and keep its page apart from the
        pages left there (``clusterfeed.stories.split``)."""
        from clusterfeed.stories.split import split_entry

        with self._tx() as conn:
            return split_entry(conn, url, now)

    @staticmethod
    def _story_features(
        conn: Connection, rows: Sequence[Any], matcher: StoryMatcher
    ) -> dict[int, ItemFeatures]:
        """Every row's stored features; those missing or computed from another text or
        encoder are computed now (``StoryMatcher.features``: in worker processes for a
        backlog) and stored."""
        from clusterfeed.stories.features import EVIDENCE_VERSION, Evidence

        prints = {
            int(r.id): _short_hash(
                f"{r.content_hash}\x1f{matcher.encoder.name}\x1f{EVIDENCE_VERSION}"
            )
            for r in rows
        }
        by_id = {int(r.id): r for r in rows}
        stored: dict[int, Any] = {}
        for chunk in _chunks(sorted(prints), 500):
            for row in conn.execute(
                select(story_features).where(story_features.c.entry_id.in_(chunk))
            ):
                stored[int(row.entry_id)] = row
        result: dict[int, ItemFeatures] = {}
        missing: list[int] = []
        for i, fingerprint in prints.items():
            found = stored.get(i)
            if found is None or found.fingerprint != fingerprint:
                missing.append(i)
                continue
            r = by_id[i]
            result[i] = ItemFeatures(
                feed=r.feed_name,
                language=r.language,
                published=_utc(r.dated_at) or r.dated_at,
                vector=np.frombuffer(found.vector, dtype=np.float16).astype(np.float32),
                evidence=Evidence.from_json(found.evidence),
            )
        if not missing:
            return result
        stale = [i for i in missing if i in stored]
        for chunk in _chunks(stale, 500):
            conn.execute(story_features.delete().where(story_features.c.entry_id.in_(chunk)))

        def batches() -> Iterator[tuple[list[int], list[StoryItem]]]:
            for chunk in _chunks(missing, 500):
                texts = conn.execute(
                    select(
                        entries.c.id, entries.c.language, entries.c.title,
                        entries.c.summary_text, entries.c.summary_html, entries.c.content_html,
                        entries.c.link, entries.c.dated_at.label("published_at"),
                        feeds.c.name.label("feed_name"),
                    )
                    .join(feeds, feeds.c.id == entries.c.feed_id)
                    .where(entries.c.id.in_(chunk))
                    .order_by(entries.c.id)
                ).all()  # fmt: skip
                yield [int(t.id) for t in texts], [_story_item(t) for t in texts]

        for ids, computed in matcher.features(batches(), len(missing)):
            conn.execute(
                insert(story_features),
                [
                    {
                        "entry_id": i,
                        "fingerprint": prints[i],
                        "vector": np.asarray(f.vector, dtype=np.float16).tobytes(),
                        "evidence": f.evidence.to_json(),
                    }
                    for i, f in zip(ids, computed, strict=True)
                ],
            )
            result.update(zip(ids, computed, strict=True))
        return result

    @staticmethod
    def _write_joins(
        conn: Connection,
        decisions: Sequence[tuple[int, int, Match]],
        new_rows: Sequence[Any],
        published: Mapping[int, datetime],
        since: datetime,
    ) -> None:
        """Move the joined items to their stories and drop the stories they leave.

        In a few statements for all of them: a first cycle of 15,000 items joins
        thousands, and five statements each (and a scan of the new rows each, to find
        the story an item left) took longer than deciding the joins.
        """
        left = {int(r.id): int(r.story_id) for r in new_rows}
        conn.execute(
            _STMT.join_entry,
            [
                {
                    "b_id": entry_id,
                    "story_id": story_id,
                    "join_reason": f"score {match.score:.2f}: " + "; ".join(match.reasons),
                }
                for entry_id, story_id, match in decisions
            ],
        )
        # A story changed (a new source): new ``updated``; and its date is that of its
        # earliest version, which is also the one shown (as _touch_story does).
        conn.execute(
            _STMT.touch_story,
            [{"b_id": story_id, "updated_at": since} for _, story_id, _ in decisions],
        )
        conn.execute(
            _STMT.earlier_story,
            [
                {"b_id": story_id, "b_published": published[entry_id]}
                for entry_id, story_id, _ in decisions
            ],
        )
        emptied = sorted({left[entry_id] for entry_id, _, _ in decisions})
        for chunk in _chunks(emptied, 500):
            kept = set(
                conn.execute(
                    select(sent_stories.c.story_id).where(sent_stories.c.story_id.in_(chunk))
                ).scalars()
            )
            gone = [story_id for story_id in chunk if story_id not in kept]
            if gone:
                conn.execute(stories.delete().where(stories.c.id.in_(gone)))

    def recent_stories(
        self,
        *,
        limit: int | None = None,
        since: datetime | None = None,
        exclude_ids: Iterable[int] = (),
        only_ids: Iterable[int] | None = None,
    ) -> list[Story]:
        """Stories newest first (by their representative's publication date)."""
        query = select(stories).order_by(stories.c.published_at.desc(), stories.c.id.desc())
        if since is not None:
            query = query.where(stories.c.first_seen_at >= since)
        excluded = set(exclude_ids)
        if only_ids is not None:
            wanted = list(only_ids)
            if not wanted:
                return []
            query = query.where(stories.c.id.in_(wanted))
        with self.engine.connect() as conn:
            rows = [r for r in conn.execute(query) if r.id not in excluded]
            if limit is not None:
                rows = rows[:limit]
            return self._load_stories(conn, rows)

    def _load_stories(self, conn: Connection, story_rows: Sequence[Any]) -> list[Story]:
        if not story_rows:
            return []
        ids = [r.id for r in story_rows]
        members: dict[int, list[Any]] = {}
        for chunk in _chunks(ids, 500):
            query = (
                select(
                    entries,
                    feeds.c.name.label("feed_name"),
                    feeds.c.title.label("feed_title"),
                    feeds.c.url.label("feed_url"),
                    feeds.c.site_url,
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.story_id.in_(chunk))
                .order_by(entries.c.first_seen_at, entries.c.id)
            )
            for row in conn.execute(query):
                members.setdefault(row.story_id, []).append(row)
        result = []
        for s in story_rows:
            rows = self._representative_first(members.get(s.id, []))
            if not rows:
                continue
            rep = rows[0]
            topics = sorted({t for r in rows for t in (r.topics or [])})
            sources = tuple(
                Source(
                    feed_name=r.feed_name,
                    feed_title=r.feed_title or r.feed_name,
                    feed_url=r.feed_url,
                    site_url=r.site_url,
                    entry_title=r.title,
                    entry_link=r.link,
                    guid=r.guid,
                    published=_utc(r.published_at),
                    language=r.language,
                    join_reason=r.join_reason,
                )
                for r in rows
            )
            result.append(
                Story(
                    id=s.id,
                    key=s.key,
                    entry=_row_to_entry(rep),
                    sources=sources,
                    topics=tuple(topics),
                    languages=tuple(sorted({r.language for r in rows})),
                    first_seen=_utc(s.first_seen_at) or s.first_seen_at,
                    updated=_utc(s.updated_at) or s.updated_at,
                )
            )
        return result

    def configure_stories(self, representative: str, own_feeds: Iterable[str]) -> None:
        """Pick each story's representative by the rule ``representative`` ("own",
        "complete" or "earliest"; see ``clusterfeed.stories.representative``)."""
        self.order_versions_by(version_order(representative, own_feeds))

    def order_versions_by(self, order: VersionOrder) -> None:
        """Show each story's versions in the order ``order`` gives, its first one as
        the story's representative (the default: the earliest)."""
        self._version_order = order

    def _representative_first(self, rows: Sequence[Any]) -> list[Any]:
        """The story's member rows in the order the configured rule gives."""
        order: VersionOrder = getattr(self, "_version_order", representative_first)
        versions = [
            Version(
                feed=r.feed_name,
                identity=r.identity,
                published=_utc(r.published_at) or r.published_at,
                summary_text=r.summary_text or "",
                content_html=r.content_html or "",
            )
            for r in rows
        ]
        return [rows[i] for i in order(versions)]

    def count_stories(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(stories)).scalar_one())


_HREF = re.compile(r"href=[\"']([^\"']+)")


def _hrefs(html: str) -> tuple[str, ...]:
    return tuple(_HREF.findall(html or ""))


def _story_item(row: Any) -> StoryItem:
    """What story matching needs of a stored entry (joined with its feed's name)."""
    return StoryItem(
        id=f"entry:{row.id}",
        feed=row.feed_name,
        language=row.language,
        title=row.title,
        text=_matching_text(row.summary_text, row.content_html),
        link=row.link,
        published=_utc(row.published_at) or row.published_at,
        links=_hrefs(f"{row.summary_html or ''} {row.content_html or ''}"),
    )


def _matching_text(summary: str, content_html: str, limit: int = 6000) -> str:
    """The text matching looks at: the summary, then the full text, cut at a limit
    (the first paragraphs carry the names and numbers; a 5 MB release need not)."""
    from clusterfeed.ingest.normalize import html_to_text

    text = summary
    if content_html and len(text) < limit:
        text = f"{text} {html_to_text(content_html[: limit * 4])}"
    return text[:limit]
