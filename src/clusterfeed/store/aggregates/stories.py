"""Stories: joining a cycle's new items to the stories they tell, splitting them, and
reading stories back with their sources.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection

from clusterfeed.model import Source, Story
from clusterfeed.store.base import StoreBase, _chunks, _short_hash, _utc
from clusterfeed.store.records import _row_to_entry
from clusterfeed.store.schema import (
    _UTCDateTime,
    entries,
    feeds,
    sent_stories,
    stories,
    story_corrections,
    story_features,
)
from clusterfeed.store.statements import _STMT
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
        """Group this cycle's new items into stories, after all feeds of a cycle are
        stored; returns how many items changed story.

        The decision is ``clusterfeed.stories.cluster.regroup`` (new items in order of
        publication; after late arrivals, the recent window grouped again; stories
        readers saw keep their ids). The store reads what it needs: the entries from
        the window and the weeks before (for names' rarity), each one's stored features
        (embedding and evidence, computed the first time an entry is read and kept in
        ``story_features``), the corrections and which stories subscribers were sent;
        then it writes the result (``_write_regrouping``).
        """
        from clusterfeed.stories.cluster import Placed, corrections, reading_span, regroup

        with self._tx() as conn:
            new_rows = conn.execute(
                select(entries.c.id, entries.c.dated_at).where(entries.c.first_seen_at >= since)
            ).all()
            if not new_rows:
                return 0
            model = matcher.model
            earliest = min(_utc(r.dated_at) or r.dated_at for r in new_rows)
            rows = conn.execute(
                select(
                    entries.c.id, entries.c.story_id, entries.c.link, entries.c.identity,
                    entries.c.published_at, entries.c.content_hash, entries.c.language,
                    entries.c.link_key, entries.c.join_reason, entries.c.first_seen_at,
                    entries.c.feed_id, entries.c.dated_at, feeds.c.name.label("feed_name"),
                )
                .join(feeds, feeds.c.id == entries.c.feed_id)
                .where(entries.c.dated_at >= earliest - reading_span(model))
            ).all()  # fmt: skip
            feats = self._story_features(conn, rows, matcher)
            by_id = {int(r.id): r for r in rows if int(r.id) in feats}
            new_ids = {int(r.id) for r in new_rows}
            placed = {
                i: Placed(int(r.story_id), r.link_key, i in new_ids, (r.feed_name, r.identity))
                for i, r in by_id.items()
            }
            apart = self._stored_apart(conn, {r.link_key for r in rows if r.link_key})
            forced = corrections(
                {i: r.link_key for i, r in by_id.items()},
                {i: r.link for i, r in by_id.items()},
                apart,
                matcher.forced_links if matcher.forces_pairs else None,
            )
            story_ids = sorted({p.story for p in placed.values()})
            sent: set[int] = set()
            for chunk in _chunks(story_ids, 500):
                sent.update(
                    conn.execute(
                        select(sent_stories.c.story_id).where(sent_stories.c.story_id.in_(chunk))
                    ).scalars()
                )
            plan = regroup(
                {i: feats[i] for i in by_id}, placed, model, forced=forced, sent=sorted(sent)
            )
            return self._write_regrouping(conn, plan, by_id, since)

    @staticmethod
    def _write_regrouping(
        conn: Connection, plan: Any, by_id: Mapping[int, Any], since: datetime
    ) -> int:
        """Write what ``regroup`` decided: new stories for the groups that have none,
        each moved item's story and reason, the dates of the stories that changed; the
        subscribers who had an absorbed story count as having the story that took its
        place (so nobody gets one event twice because it was regrouped); stories left
        empty and never sent go.

        In a few statements for all items: a first cycle of 15,000 items moves
        thousands, and statements per item took longer than deciding.
        """
        reason = {int(i): plan.why.get(i, by_id[i].join_reason) for i in plan.story_of}
        moved = {
            int(i): s
            for i, s in plan.story_of.items()
            if s != int(by_id[i].story_id) or reason[int(i)] != by_id[i].join_reason
        }
        if not moved and not plan.absorbed:
            return 0
        created: dict[int, int] = {}
        for number in sorted({s for s in moved.values() if s < 0}, reverse=True):
            mine = sorted(
                (i for i, s in moved.items() if s == number),
                key=lambda i: (_utc(by_id[i].published_at) or by_id[i].published_at, i),
            )
            first = by_id[mine[0]]
            base = f"{first.feed_id}-{_short_hash(first.identity)}"
            key, n = base, 1
            while conn.execute(select(stories.c.id).where(stories.c.key == key)).first():
                n += 1
                key = f"{base}-{n}"
            created[number] = int(
                conn.execute(
                    insert(stories)
                    .values(
                        key=key,
                        first_seen_at=min(by_id[i].first_seen_at for i in mine),
                        updated_at=since,
                        published_at=min(by_id[i].published_at for i in mine),
                    )
                    .returning(stories.c.id)
                ).scalar_one()
            )
        target = {i: created.get(s, s) for i, s in moved.items()}
        conn.execute(
            _STMT.join_entry,
            [
                {"b_id": i, "story_id": s, "join_reason": reason[i]}
                for i, s in sorted(target.items())
            ],
        )
        changed = sorted(
            {s for i, s in target.items() if s != int(by_id[i].story_id)}
            | {int(by_id[i].story_id) for i, s in target.items() if s != int(by_id[i].story_id)}
        )
        for chunk in _chunks(changed, 500):
            conn.execute(update(stories).where(stories.c.id.in_(chunk)).values(updated_at=since))
            earliest = conn.execute(
                select(entries.c.story_id, func.min(entries.c.published_at))
                .where(entries.c.story_id.in_(chunk))
                .group_by(entries.c.story_id)
            ).all()
            if earliest:
                conn.execute(
                    update(stories)
                    .where(stories.c.id == bindparam("b_id"))
                    .values(published_at=bindparam("b_published", type_=_UTCDateTime())),
                    [{"b_id": int(s), "b_published": p} for s, p in earliest],
                )
        for old, survivor in sorted(plan.absorbed.items()):
            had = conn.execute(
                select(sent_stories.c.subscriber_id, sent_stories.c.delivery_id).where(
                    sent_stories.c.story_id == old
                )
            ).all()
            known = set(
                conn.execute(
                    select(sent_stories.c.subscriber_id).where(sent_stories.c.story_id == survivor)
                ).scalars()
            )
            rows = [
                dict(subscriber_id=h.subscriber_id, story_id=survivor, delivery_id=h.delivery_id)
                for h in had
                if h.subscriber_id not in known
            ]
            if rows:
                conn.execute(insert(sent_stories), rows)
        for chunk in _chunks(changed, 500):
            full = set(
                conn.execute(
                    select(entries.c.story_id).where(entries.c.story_id.in_(chunk))
                ).scalars()
            )
            kept = set(
                conn.execute(
                    select(sent_stories.c.story_id).where(sent_stories.c.story_id.in_(chunk))
                ).scalars()
            )
            gone = [s for s in chunk if s not in full and s not in kept]
            if gone:
                conn.execute(stories.delete().where(stories.c.id.in_(gone)))
        return sum(1 for i, s in target.items() if s != int(by_id[i].story_id))

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

    def recent_stories(
        self,
        *,
        limit: int | None = None,
        since: datetime | None = None,
        exclude_ids: Iterable[int] = (),
        only_ids: Iterable[int] | None = None,
    ) -> list[Story]:
        """Stories newest first by the story's own date (``stories.published_at``: the
        earliest publication date among its items, kept when items join or are split
        off), not by its representative's, which a configured rule may pick later; ties
        newest id first. ``since`` counts from when a story was first seen."""
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
