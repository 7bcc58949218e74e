"""Story matching measured the way production runs it: items stored, then matched.

The labelled sets (tests/data/stories, format in its README) are split once, before any
tuning, into a *tuning* part and a *held-out* part by story: a story's items are all on
one side (``part_of``), so a model trained on the tuning part never saw any version of
a held-out event. Hard negatives count in a part when both their items are in it.

``production_labels`` feeds a part's items through the real path: each labelled item
becomes a feed entry (``normalize_entry``, as a parsed feed's item does), the entries
are stored feed by feed with ``Store.apply_feed_update`` in one or more cycles, and
after each cycle ``Store.join_new_stories`` matches them, as ``fetch`` and ``run`` do.
The stories read back from the database are what is scored. A "domain" is one labelled
set (one written world of partners: ``a``, ``b``, ``c``): leave-one-domain-out trains
on the tuning part of the others and scores the left-out set.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from clusterfeed.ingest.normalize import html_to_text, normalize_entry
from clusterfeed.stories.features import StoryItem

HELD_OUT_SHARE = 30  # percent of each set's stories kept out of tuning


@dataclass(frozen=True)
class Row:
    """One labelled item as its writer gave it."""

    id: str
    story: str
    domain: str
    feed: str
    language: str
    title: str
    summary: str
    link: str | None
    guid: str | None
    published: datetime

    def item(self) -> StoryItem:
        """The item as the pure matchers (baselines) see it."""
        return StoryItem(
            id=self.id,
            feed=self.feed,
            language=self.language,
            title=self.title,
            text=html_to_text(self.summary),
            link=self.link,
            published=self.published,
            links=tuple(re.findall(r"href=[\"']([^\"']+)", self.summary)),
        )


def part_of(story: str) -> str:
    """ "held-out" or "tuning": a fixed function of the story's label, so the split does
    not move when items or sets are added, and no story is on both sides."""
    bucket = int(hashlib.sha256(story.encode()).hexdigest(), 16) % 100
    return "held-out" if bucket < HELD_OUT_SHARE else "tuning"


def load_rows(folder: Path) -> tuple[list[Row], list[tuple[str, str, str]]]:
    """Every labelled item of the folder, and the hard negative pairs."""
    rows: list[Row] = []
    for path in sorted(folder.glob("labelled-*.jsonl")):
        domain = path.stem.removeprefix("labelled-")
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            rows.append(
                Row(
                    id=r["id"],
                    story=r["story"],
                    domain=domain,
                    feed=r["feed"],
                    language=r["language"],
                    title=r["title"],
                    summary=r["summary"],
                    link=r.get("link"),
                    guid=r.get("guid"),
                    published=datetime.fromisoformat(r["published"]),
                )
            )
    negatives: list[tuple[str, str, str]] = []
    for path in sorted(folder.glob("hard-negatives-*.json")):
        negatives.extend((a, b, why) for a, b, why in json.loads(path.read_text("utf-8")))
    return rows, negatives


def row_of(item: StoryItem, story: str, domain: str = "generated") -> Row:
    """A generated item (``bench/dedup.py``'s stream) as a labelled row, its links in
    the summary's HTML as a partner's feed carries them."""
    from html import escape

    links = "".join(f' <a href="{escape(u)}">link</a>' for u in item.links)
    return Row(
        id=item.id,
        story=story,
        domain=domain,
        feed=item.feed,
        language=item.language,
        title=item.title,
        summary=f"<p>{escape(item.text)}{links}</p>",
        link=item.link,
        guid=None,
        published=item.published,
    )


def select(
    rows: Sequence[Row], *, part: str | None = None, domains: Iterable[str] | None = None
) -> list[Row]:
    """The rows of one part ("tuning", "held-out", or None for both) and some domains."""
    wanted = set(domains) if domains is not None else None
    return [
        r
        for r in rows
        if (part is None or part_of(r.story) == part) and (wanted is None or r.domain in wanted)
    ]


@dataclass(frozen=True)
class Score:
    precision: float
    recall: float
    merged_hard_negatives: int
    hard_negatives: int
    items: int
    pairs: int

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def score(
    predicted: dict[str, object], rows: Sequence[Row], negatives: Sequence[tuple[str, str, str]]
) -> Score:
    """Pairwise precision and recall over same-story pairs, and hard negatives merged."""
    truth = {r.id: r.story for r in rows}
    ids = sorted(truth)

    def pairs(labels: dict[str, object]) -> set[tuple[str, str]]:
        groups: dict[object, list[str]] = {}
        for i in ids:
            groups.setdefault(labels[i], []).append(i)
        return {(a, b) for g in groups.values() for x, a in enumerate(g) for b in g[x + 1 :]}

    got, want = pairs(predicted), pairs(dict(truth))
    inside = [(a, b) for a, b, _ in negatives if a in truth and b in truth]
    return Score(
        precision=len(got & want) / len(got) if got else 1.0,
        recall=len(got & want) / len(want) if want else 1.0,
        merged_hard_negatives=sum(1 for a, b in inside if predicted[a] == predicted[b]),
        hard_negatives=len(inside),
        items=len(ids),
        pairs=len(want),
    )


# -- the production path ---------------------------------------------------------------

_NOW = datetime(2028, 1, 1, tzinfo=UTC)  # after every labelled date: nothing is clamped


def _raw(row: Row) -> dict[str, Any]:
    """The labelled item as feedparser would hand it over."""
    raw: dict[str, Any] = {
        "title": row.title,
        "summary": row.summary,
        "published": row.published.isoformat(),
    }
    if row.link:
        raw["link"] = row.link
    if row.guid:
        raw["id"] = row.guid
    return raw


def cycles_of(
    rows: Sequence[Row], count: int, *, shuffle_seed: int | None = None
) -> list[list[Row]]:
    """The rows in ``count`` arrivals: in order of publication, or shuffled by a seed."""
    ordered = sorted(rows, key=lambda r: (r.published, r.id))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(ordered)
    size = -(-len(ordered) // count)
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def production_labels(
    cycles: Sequence[Sequence[Row]],
    matcher: Any,
    *,
    after_cycle: Any = None,
    clock: datetime = _NOW,
) -> dict[str, object]:
    """Store the cycles' items through the real store and match them after each cycle,
    as ``fetch`` does; returns each labelled id's story id read back from the store.
    ``clock`` is the first cycle's time (by default after every labelled date)."""
    from sqlalchemy import select as sql_select

    from clusterfeed.store import Store, entries, feeds

    with tempfile.TemporaryDirectory() as folder:
        store = Store(f"sqlite:///{folder}/stories.db")
        try:
            store.migrate()
            names = sorted({r.feed for batch in cycles for r in batch})
            slug = {n: f"feed{i}" for i, n in enumerate(names)}
            store.sync_feeds([(n, f"https://{slug[n]}.example/feed", None) for n in names])
            label: dict[tuple[str, str], list[str]] = {}
            for number, batch in enumerate(cycles):
                now = clock + timedelta(hours=number)
                by_feed: dict[str, list[Any]] = {}
                for row in batch:
                    entry = normalize_entry(
                        _raw(row),
                        feed_name=row.feed,
                        feed_topics=(),
                        feed_language=row.language,
                        base_url=None,
                        now=now,
                    )
                    label.setdefault((row.feed, entry.identity), []).append(row.id)
                    by_feed.setdefault(row.feed, []).append(entry)
                for name in sorted(by_feed):
                    store.apply_feed_update(
                        name,
                        by_feed[name],
                        status=200,
                        etag=None,
                        last_modified=None,
                        title=name,
                        warning=None,
                        now=now,
                    )
                store.join_new_stories(now, matcher)
                if after_cycle is not None:
                    after_cycle()
            with store.engine.connect() as conn:
                found = conn.execute(
                    sql_select(feeds.c.name, entries.c.identity, entries.c.story_id).join(
                        feeds, feeds.c.id == entries.c.feed_id
                    )
                ).all()
        finally:
            store.engine.dispose()
    # An item its feed listed twice under one identity is stored once: both labelled
    # items are in the stored one's story, as a reader sees it.
    story_of: dict[str, object] = {}
    for name, identity, story_id in found:
        for labelled_id in label.get((name, identity), ()):
            story_of[labelled_id] = int(story_id)
    for batch in cycles:
        for row in batch:
            story_of.setdefault(row.id, f"missing:{row.id}")
    return story_of
