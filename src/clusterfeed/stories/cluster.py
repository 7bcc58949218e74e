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
        similarity = matrix[candidates] @ item.vector
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
