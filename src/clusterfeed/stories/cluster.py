"""Joining new items to stories: average link inside the time window, no chains.

A new item is compared with the items already decided within the window: the most
similar ones by embedding (``PairModel.neighbours`` of them) and those linking to it or
linked from it give the candidate stories. It joins the candidate story whose members
it matches best on average, and only if that average and its match with *every* member
pass the model's thresholds: an item close to one member of a story but not to the
others (the chain A-B-C of three events) stays out. Pure function over plain data; the
store loads the features and writes the decisions.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from clusterfeed.stories.features import ItemFeatures
from clusterfeed.stories.score import PairModel, name_frequencies, pair_vector, veto

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Match:
    """Why an item joined a story: the score and what carried it (``stories`` shows both)."""

    score: float
    reasons: tuple[str, ...]


def join_new(
    feats: Mapping[K, ItemFeatures],
    story_of: dict[K, int],
    new_ids: Sequence[K],
    model: PairModel,
    *,
    forced: Callable[[K, K], str | None] | None = None,
) -> list[tuple[K, int, Match]]:
    """For each new item in order, the story it joins and why (``story_of`` is updated).

    ``feats`` holds every item around the new ones (the window on either side), each in
    the story ``story_of`` names; a new item meets only the items decided before it (the
    stored ones and the new ones earlier in ``new_ids``), so one cycle gives what the
    same items in several cycles in the same order give. ``forced`` answers "together",
    "apart" or None for two ids (the config's corrections).
    """
    ids = list(feats)
    row = {k: n for n, k in enumerate(ids)}
    matrix = np.vstack([feats[k].vector for k in ids]) if ids else np.zeros((0, 1))
    seconds = np.array([feats[k].published.timestamp() for k in ids])
    window = model.window_days * 86400
    counts, total = name_frequencies(feats.values())
    members: dict[int, list[K]] = {}
    for k in ids:
        members.setdefault(story_of[k], []).append(k)
    linked: dict[str, list[K]] = {}
    for k in ids:
        e = feats[k].evidence
        for url in sorted({*e.links, *([e.own_link] if e.own_link else [])}):
            linked.setdefault(url, []).append(k)
    waiting = np.zeros(len(ids), dtype=bool)
    for k in new_ids:
        waiting[row[k]] = True
    cosines = _Cosines(matrix, seconds, window, [row[k] for k in new_ids])
    decisions: list[tuple[K, int, Match]] = []
    for new in new_ids:
        n = row[new]
        waiting[n] = False
        own = story_of[new]
        if len(members[own]) > 1:
            continue  # already joined (the same page as another partner's)
        item = feats[new]
        near = (np.abs(seconds - seconds[n]) <= window) & ~waiting
        near[n] = False
        candidates = np.flatnonzero(near)
        similarity = cosines.of(n, candidates)
        order = np.lexsort((candidates, -similarity))[: model.neighbours]
        chosen = {ids[i] for i in candidates[order]}
        e = item.evidence
        for url in sorted({*e.links, *([e.own_link] if e.own_link else [])}):
            chosen.update(k for k in linked.get(url, ()) if near[row[k]])
        if forced is not None:
            chosen.update(k for k in (ids[i] for i in candidates) if forced(new, k))
        stories = sorted({story_of[k] for k in chosen} - {own})
        best: tuple[float, int, Match] | None = None
        for story in stories:
            inside = [m for m in members[story] if near[row[m]]]
            if not inside:
                continue
            verdicts = {forced(new, m) for m in inside} if forced is not None else set()
            if "apart" in verdicts:
                continue
            if "together" in verdicts:
                best = (2.0, story, Match(99.0, ("forced together by the config",)))
                break
            if any(veto(item, feats[m]) for m in inside):
                continue
            vectors = [pair_vector(item, feats[m], counts, total) for m in inside]
            p = model.probabilities(vectors)
            average, lowest = float(p.mean()), float(p.min())
            if average < model.join_average or lowest < model.join_minimum:
                continue
            if best is None or average > best[0]:
                top = int(np.argmax(p))
                reasons = (
                    f"mean pair score {average:.2f} over {len(inside)}, lowest {lowest:.2f}",
                    *model.explain(vectors[top]),
                )
                best = (average, story, Match(round(average, 3), reasons))
        if best is None:
            continue
        _, story, match = best
        decisions.append((new, story, match))
        members[own].remove(new)
        members[story].append(new)
        story_of[new] = story
    return decisions


class _Cosines:
    """The cosine of each new item with the items around it, by one matrix product per
    block of new items close in time instead of one matrix-vector product per item.

    A block holds up to ``size`` consecutive new items (in the order they are decided)
    whose dates lie within one window of each other; its product covers the items
    within a window of any of them, which holds every candidate of each. The per-item
    product copied the window's rows for every item: 10 MB an item in a window of
    5,000 items.
    """

    def __init__(
        self,
        matrix: np.ndarray,
        seconds: np.ndarray,
        window: float,
        rows: Sequence[int],
        size: int = 64,
    ) -> None:
        self._matrix, self._seconds, self._window = matrix, seconds, window
        self._blocks: list[list[int]] = []
        self._where: dict[int, tuple[int, int]] = {}  # row -> (block, column)
        low = high = 0.0
        for n in rows:
            t = float(seconds[n])
            block = self._blocks[-1] if self._blocks else None
            if block is None or len(block) >= size or max(high, t) - min(low, t) > window:
                block = []
                self._blocks.append(block)
                low = high = t
            low, high = min(low, t), max(high, t)
            self._where[n] = (len(self._blocks) - 1, len(block))
            block.append(n)
        self._current = -1
        self._span = np.zeros(0, dtype=np.intp)
        self._product = np.zeros((0, 0), dtype=matrix.dtype)

    def of(self, n: int, candidates: np.ndarray) -> np.ndarray:
        """The cosines of row ``n`` (a new item) with the rows ``candidates`` (sorted)."""
        number, column = self._where[n]
        if number != self._current:
            block = self._blocks[number]
            times = self._seconds[block]
            # A second of slack: every candidate of every item in the block is inside.
            inside = (self._seconds >= times.min() - self._window - 1) & (
                self._seconds <= times.max() + self._window + 1
            )
            self._span = np.flatnonzero(inside)
            self._product = self._matrix[self._span] @ self._matrix[block].T
            self._current = number
        result: np.ndarray = self._product[np.searchsorted(self._span, candidates), column]
        return result
