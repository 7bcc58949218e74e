"""Measuring story matching against a labelled set, next to two baselines.

A labelled set is JSON Lines: one partner's item per line with the ``story`` it belongs
to (see tests/data/stories/README.md), plus lists of hard negative pairs. The same code
measures the naive baseline (exact URL plus title word overlap) and a
re-implementation of NewsBlur's two title tiers, so the figures in docs/stories.md come
from one run on one set; an operator can run it on a set of their own.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from clusterfeed.ingest.normalize import html_to_text, link_key, normalize_url
from clusterfeed.stories.features import StoryItem


@dataclass(frozen=True)
class LabelledSet:
    items: list[StoryItem]
    truth: dict[str, str]
    hard_negatives: list[tuple[str, str, str]]


def load_labelled(folder: Path, sets: Iterable[str] | None = None) -> LabelledSet:
    """The labelled items of ``folder`` (of the named ``sets`` only, if given)."""
    wanted = set(sets) if sets is not None else None
    items: list[StoryItem] = []
    truth: dict[str, str] = {}
    for path in sorted(folder.glob("labelled-*.jsonl")):
        if wanted is not None and path.stem.removeprefix("labelled-") not in wanted:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            summary = row["summary"]
            links = tuple(re.findall(r"href=[\"']([^\"']+)", summary))
            items.append(
                StoryItem(
                    id=row["id"],
                    feed=row["feed"],
                    language=row["language"],
                    title=row["title"],
                    text=html_to_text(summary),
                    link=row.get("link"),
                    published=datetime.fromisoformat(row["published"]),
                    links=links,
                )
            )
            truth[row["id"]] = row["story"]
    negatives: list[tuple[str, str, str]] = []
    for path in sorted(folder.glob("hard-negatives-*.json")):
        for a, b, why in json.loads(path.read_text(encoding="utf-8")):
            if a in truth and b in truth:
                negatives.append((a, b, why))
    return LabelledSet(items, truth, negatives)


@dataclass(frozen=True)
class Quality:
    name: str
    precision: float
    recall: float
    merged_hard_negatives: int

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def pairwise_scores(
    predicted: Mapping[str, object], truth: Mapping[str, object]
) -> tuple[float, float]:
    """Pairwise precision and recall of a clustering against labels."""
    ids = sorted(truth)

    def pairs(labels: Mapping[str, object]) -> set[tuple[str, str]]:
        groups: defaultdict[object, list[str]] = defaultdict(list)
        for i in ids:
            groups[labels[i]].append(i)
        return {(a, b) for g in groups.values() for x, a in enumerate(g) for b in g[x + 1 :]}

    got, want = pairs(predicted), pairs(truth)
    precision = len(got & want) / len(got) if got else 1.0
    recall = len(got & want) / len(want) if want else 1.0
    return precision, recall


def measure(name: str, predicted: Mapping[str, object], data: LabelledSet) -> Quality:
    precision, recall = pairwise_scores(predicted, data.truth)
    merged = sum(1 for a, b, _ in data.hard_negatives if predicted[a] == predicted[b])
    return Quality(name, precision, recall, merged)


# -- baselines ------------------------------------------------------------------------


class UnionFind:
    """Groups of ids, joined pair by pair (the baselines' transitive grouping)."""

    def __init__(self, ids: Iterable[str]) -> None:
        self.parent = {i: i for i in ids}
        self.size = dict.fromkeys(self.parent, 1)

    def find(self, i: str) -> str:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: str, b: str, limit: int | None = None) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb or (limit and self.size[ra] + self.size[rb] > limit):
            return
        self.parent[rb] = ra
        self.size[ra] += self.size[rb]


_WORD = re.compile(r"\w+", re.UNICODE)
_COMMON_TEXT = (
    "the a an of and or to in on for with at by from is are der die das und in im am an "
    "für mit von zu zum zur den dem des ein eine"
)
_COMMON = frozenset(_COMMON_TEXT.split())


def title_words(title: str) -> set[str]:
    """The significant words of a title, as the naive and NewsBlur baselines compare them."""
    return {w for w in _WORD.findall(title.lower()) if w not in _COMMON and len(w) > 2}


def same_link_groups(items: Sequence[StoryItem]) -> UnionFind:
    """The naive baseline's first rule: items whose links are one page are one story."""
    uf = UnionFind(i.id for i in items)
    by_link: dict[str, str] = {}
    for item in items:
        key = link_key(normalize_url(item.link)) if item.link else None
        if key:
            if key in by_link:
                uf.union(by_link[key], item.id)
            by_link.setdefault(key, item.id)
    return uf


def naive_labels(items: Sequence[StoryItem], min_overlap: float = 0.5) -> dict[str, object]:
    """Exact URL match, plus title word overlap (Jaccard) of at least ``min_overlap``."""
    uf = same_link_groups(items)
    words = {i.id: title_words(i.title) for i in items}
    for x, a in enumerate(items):
        for b in items[x + 1 :]:
            wa, wb = words[a.id], words[b.id]
            if wa and wb and len(wa & wb) / len(wa | wb) >= min_overlap:
                uf.union(a.id, b.id)
    return {i.id: uf.find(i.id) for i in items}


def newsblur_labels(items: Sequence[StoryItem]) -> dict[str, object]:
    """NewsBlur's two title tiers, re-implemented from its description.

    Tier 1: the same normalized title. Tier 2: titles sharing at least 3 significant
    words with an overlap coefficient of at least 0.6. Both within 120 hours, at most
    10 items per cluster.
    """
    window = timedelta(hours=120)
    uf = UnionFind(i.id for i in items)
    ordered = sorted(items, key=lambda i: i.published)
    normalized = {i.id: " ".join(_WORD.findall(i.title.lower())) for i in ordered}
    significant = {i.id: title_words(i.title) for i in ordered}
    for x, a in enumerate(ordered):
        for b in ordered[x + 1 :]:
            if b.published - a.published > window:
                break
            if normalized[a.id] and normalized[a.id] == normalized[b.id]:
                uf.union(a.id, b.id, limit=10)
                continue
            wa, wb = significant[a.id], significant[b.id]
            shared = wa & wb
            if len(shared) >= 3 and len(shared) / min(len(wa), len(wb)) >= 0.6:
                uf.union(a.id, b.id, limit=10)
    return {i.id: uf.find(i.id) for i in items}


def stats(data: LabelledSet) -> dict[str, float]:
    """The shape of a labelled set, to check it against what the issue asks."""
    by_story: defaultdict[str, list[StoryItem]] = defaultdict(list)
    for item in data.items:
        by_story[data.truth[item.id]].append(item)
    pairs = cross = 0
    for members in by_story.values():
        for x, a in enumerate(members):
            for b in members[x + 1 :]:
                pairs += 1
                cross += a.language != b.language
    multi = [m for m in by_story.values() if len(m) >= 2]
    return {
        "items": len(data.items),
        "stories": len(by_story),
        "multi_source_stories": len(multi),
        "same_story_pairs": pairs,
        "cross_language_share": cross / pairs if pairs else 0.0,
        "hard_negative_pairs": len(data.hard_negatives),
    }
