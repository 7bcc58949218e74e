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

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar

import numpy as np

from clusterfeed.stories.features import ItemFeatures
from clusterfeed.stories.score import NameCounts, PairModel, pair_vector, veto

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
    names: NameCounts | None = None,
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
    counts = names if names is not None else NameCounts(feats.values(), model.rarity_days)
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
            vectors = [pair_vector(item, feats[m], counts) for m in inside]
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


def merge_stories(
    feats: Mapping[K, ItemFeatures],
    story_of: dict[K, int],
    touched: Iterable[int],
    model: PairModel,
    *,
    forced: Callable[[K, K], str | None] | None = None,
    keeps: Callable[[int], object] = lambda story: story,
    names: NameCounts | None = None,
) -> list[tuple[int, int, Match]]:
    """Average-link merges of whole stories: ``(absorbed, surviving, why)`` in order
    (``story_of`` is updated).

    Joining one item at a time depends on the order items arrive: the story {A, C}
    formed before B came cannot take B's partner D that had already started its own.
    Two stories become one when their members' mean pair score passes the model's
    thresholds (every pair within the window, none vetoed or set apart), best pair
    first, until no pair passes; then the result of items arriving in any order comes
    close to that of one cycle. Only stories in ``touched`` (those that gained or may
    have gained items) and their neighbours are compared. Of two merged stories the
    one with the smaller ``keeps`` key survives (the one readers already saw), so its
    identity does not change.
    """
    ids = list(feats)
    if not ids:
        return []
    row = {k: n for n, k in enumerate(ids)}
    matrix = np.vstack([feats[k].vector for k in ids])
    seconds = np.array([feats[k].published.timestamp() for k in ids])
    window = model.window_days * 86400
    counts = names if names is not None else NameCounts(feats.values(), model.rarity_days)
    members: dict[int, list[K]] = {}
    for k in ids:
        members.setdefault(story_of[k], []).append(k)
    linked: dict[str, list[K]] = {}
    for k in ids:
        e = feats[k].evidence
        for url in sorted({*e.links, *([e.own_link] if e.own_link else [])}):
            linked.setdefault(url, []).append(k)

    near_items: dict[K, list[K]] = {}

    def item_neighbours(k: K) -> list[K]:
        """The item's most similar items in the window, and those it links or that
        link it: computed once per item, whatever story it is in."""
        if k not in near_items:
            n = row[k]
            near = np.flatnonzero(np.abs(seconds - seconds[n]) <= window)
            similarity = matrix[near] @ feats[k].vector
            order = np.lexsort((near, -similarity))[: model.neighbours + 1]
            found = [ids[i] for i in near[order]]
            e = feats[k].evidence
            for url in sorted({*e.links, *([e.own_link] if e.own_link else [])}):
                found.extend(linked.get(url, ()))
            near_items[k] = found
        return near_items[k]

    def neighbours(story: int) -> set[int]:
        found = {story_of[m] for k in members[story] for m in item_neighbours(k)}
        found.discard(story)
        return found

    def verdict(s: int, t: int) -> tuple[float, Match] | None:
        pairs = [(a, b) for a in members[s] for b in members[t]]
        if any(abs(seconds[row[a]] - seconds[row[b]]) > window for a, b in pairs):
            return None
        if forced is not None:
            said = {forced(a, b) for a, b in pairs}
            if "apart" in said:
                return None
            if "together" in said:
                return 2.0, Match(99.0, ("forced together by the config",))
        if any(veto(feats[a], feats[b]) for a, b in pairs):
            return None
        vectors = [pair_vector(feats[a], feats[b], counts) for a, b in pairs]
        p = model.probabilities(vectors)
        average, lowest = float(p.mean()), float(p.min())
        if average < model.join_average or lowest < model.join_minimum:
            return None
        top = int(np.argmax(p))
        reasons = (
            f"stories merged: mean pair score {average:.2f} over {len(pairs)}, lowest {lowest:.2f}",
            *model.explain(vectors[top]),
        )
        return average, Match(round(average, 3), reasons)

    import heapq

    queue: list[tuple[float, int, int, int, int]] = []
    verdicts: dict[tuple[int, int], Match] = {}
    grown: dict[int, int] = {}  # how often a story took another in: older scores are stale
    seen: set[tuple[int, int]] = set()

    def consider(s: int) -> None:
        for t in sorted(neighbours(s)):
            key = (min(s, t), max(s, t))
            if key in seen:
                continue  # scored from the other side in the first pass
            found = verdict(*key)
            if found is not None:
                verdicts[key] = found[1]
                versions = (grown.get(key[0], 0), grown.get(key[1], 0))
                heapq.heappush(queue, (-found[0], key[0], key[1], *versions))

    for s in sorted({s for s in touched if s in members}):
        consider(s)
        seen.update((min(s, t), max(s, t)) for t in neighbours(s))
    merges: list[tuple[int, int, Match]] = []
    while queue:
        _, s, t, vs, vt = heapq.heappop(queue)
        if s not in members or t not in members or (vs, vt) != (grown.get(s, 0), grown.get(t, 0)):
            continue  # one of them was merged since: its pairs are scored again
        match = verdicts[(s, t)]
        survivor, absorbed = sorted((s, t), key=lambda x: (keeps(x), x))
        for k in members.pop(absorbed):
            story_of[k] = survivor
            members[survivor].append(k)
        merges.append((absorbed, survivor, match))
        grown[survivor] = grown.get(survivor, 0) + 1
        seen = set()
        consider(survivor)
    return merges


def cluster(
    feats: Mapping[K, ItemFeatures],
    story_of: dict[K, int],
    ids: Sequence[K],
    model: PairModel,
    *,
    forced: Callable[[K, K], str | None] | None = None,
    keeps: Callable[[int], object] = lambda story: story,
    names: NameCounts | None = None,
) -> dict[K, Match]:
    """Place ``ids`` (in order of publication, each in its own group in ``story_of``)
    among the stories of ``feats``: one item at a time (``join_new``), then whole
    stories merged by average link (``merge_stories``). ``story_of`` is updated; the
    result says why each item that joined another group did (a merged group's first
    item gets the merge's reason)."""
    counts = names if names is not None else NameCounts(feats.values(), model.rarity_days)
    why: dict[K, Match] = {}
    first = {s: k for k, s in reversed(list(story_of.items()))}
    for k, _, match in join_new(feats, story_of, ids, model, forced=forced, names=counts):
        why[k] = match
    touched = {story_of[k] for k in ids}
    merges = merge_stories(
        feats, story_of, touched, model, forced=forced, keeps=keeps, names=counts
    )
    for absorbed, _, match in merges:
        root = first.get(absorbed)
        if root is not None and root not in why:
            why[root] = match
    return why


@dataclass(frozen=True)
class Placed:
    """A stored item as regrouping sees it: its story now, its page, whether it arrived
    in this cycle, and what orders it after items published at the same moment (its
    feed's name and its identity there), so the result never depends on the order
    the store happened to read rows in."""

    story: int
    page: str | None
    new: bool
    tie: tuple[str, ...] = ()


def reading_span(model: PairModel) -> timedelta:
    """How far before the cycle's earliest new item ``regroup`` must see stored items:
    a window for the items regrouped after a late arrival, and before that the longer
    of a window (the stories they may join) and the days names' rarity is counted over.
    """
    return timedelta(days=model.window_days + max(model.window_days, model.rarity_days))


def corrections(
    pages: Mapping[K, str | None],
    links: Mapping[K, str | None],
    apart: Mapping[str, set[str]],
    config: Callable[[str | None, str | None], str | None] | None,
) -> Callable[[K, K], str | None] | None:
    """ "together", "apart" or None for two items, or None when nothing is corrected:
    pages set apart by ``stories split`` (``apart``, page -> pages), then the config's
    ``together``/``apart`` link pairs (``config``)."""
    if config is None and not apart:
        return None

    def forced(a: K, b: K) -> str | None:
        page_a, page_b = pages.get(a), pages.get(b)
        if page_a and page_b and page_b in apart.get(page_a, ()):
            return "apart"
        return config(links.get(a), links.get(b)) if config is not None else None

    return forced


@dataclass(frozen=True)
class Regrouping:
    """What a cycle decides. ``story_of``: the story of each item it regrouped (a
    negative number: a new story, one per number); ``why``: their join reason where it
    is new (None: the first item of its story); ``absorbed``: stories whose items went
    to another story, which takes their place for readers and subscribers."""

    story_of: dict[Hashable, int]
    why: dict[Hashable, str | None]
    absorbed: dict[int, int]


def region_start(
    placed: Mapping[K, Placed], feats: Mapping[K, ItemFeatures], window_days: float
) -> datetime | None:
    """From when on a cycle regroups what is stored, or None: only its new items.

    New items all published after everything stored are placed one by one, as one
    cycle over all items would place them. A new item published before stored ones
    (a late partner, a backlog) could have changed how those were grouped: every item
    from one window before it on is grouped again, so the result does not depend on
    the order of arrival."""
    new = [feats[k].published for k, p in placed.items() if p.new and k in feats]
    old = [feats[k].published for k, p in placed.items() if not p.new and k in feats]
    if not new or not old or min(new) >= max(old):
        return None
    return min(new) - timedelta(days=window_days)


def regroup(
    feats: Mapping[K, ItemFeatures],
    placed: Mapping[K, Placed],
    model: PairModel,
    *,
    forced: Callable[[K, K], str | None] | None = None,
    sent: Iterable[int] = (),
) -> Regrouping:
    """Group the cycle's new items (and, after late arrivals, the recent window) into
    stories, keeping the identity of stories readers already saw.

    ``feats`` holds every item the decision reads (``reading_span`` before the
    earliest new item, and everything after); ``placed`` holds the same items'
    stories. Items of one page are one story. The region's items
    are grouped afresh (``cluster``); every story that existed keeps its id if any of
    its items stays together: a group takes the ids of the stories most of whose
    items it holds, and the one subscribers were sent (``sent``), else the oldest,
    survives; the others are ``absorbed`` into it. Deterministic: the same stored items
    give the same stories whatever the order they arrived in.
    """
    order = sorted(feats, key=lambda k: (feats[k].published, placed[k].tie, str(k)))
    feats = {k: feats[k] for k in order}
    start = region_start(placed, feats, model.window_days)
    if start is None:
        region = [k for k in order if placed[k].new]
    else:
        region = [k for k in order if feats[k].published >= start]
    inside = set(region)
    work: dict[K, int] = {k: placed[k].story for k in order if k not in inside}
    fixed_page = {placed[k].page: placed[k].story for k in work if placed[k].page}
    page_group: dict[str, int] = {}
    fresh = 0
    for k in region:
        page = placed[k].page
        if page and page in fixed_page:
            work[k] = fixed_page[page]
        elif page and page in page_group:
            work[k] = page_group[page]
        else:
            fresh -= 1
            work[k] = fresh
            if page:
                page_group[page] = fresh
    work = {k: work[k] for k in order}
    counts = NameCounts(feats.values(), model.rarity_days)
    sent_ids = set(sent)
    # A stored story's age is its earliest item's date: story ids follow the order the
    # partners' servers answered in, which is no order at all.
    since: dict[int, float] = {}
    for k in order:
        since.setdefault(placed[k].story, feats[k].published.timestamp())

    def older(story: int) -> tuple[bool, float, int]:
        return story not in sent_ids, since.get(story, float("inf")), story

    joined = cluster(
        feats,
        work,
        [k for k in region if work[k] < 0],
        model,
        forced=forced,
        # A stored story outlives a group of this cycle; of two stored ones, the one
        # subscribers were sent, else the older.
        keeps=lambda s: (s < 0, *older(s)),
        names=counts,
    )
    # Each earlier story of a region item goes to the group that holds most of its
    # items (the earliest such group on a tie), unless some of its items stayed outside
    # the region: then it is still that story.
    alive = {placed[k].story for k in order if k not in inside}
    position = {k: n for n, k in enumerate(order)}
    head: dict[int, int] = {}
    votes: dict[int, dict[int, int]] = {}
    for k in region:
        g = work[k]
        head.setdefault(g, position[k])
        old = placed[k].story
        if old not in alive:
            votes.setdefault(old, {}).setdefault(g, 0)
            votes[old][g] += 1
    taken: dict[int, list[int]] = {}
    for old in sorted(votes):
        best = max(votes[old], key=lambda g: (votes[old][g], -head[g]))
        taken.setdefault(best, []).append(old)
    final: dict[int, int] = {}
    absorbed: dict[int, int] = {}
    for g in head:
        candidates = taken.get(g, [])
        if g >= 0:
            survivor = g
        elif candidates:
            survivor = min(candidates, key=older)
        else:
            survivor = g  # a new story
        final[g] = survivor
        absorbed.update({s: survivor for s in candidates if s != survivor})
    story_of: dict[Hashable, int] = {}
    why: dict[Hashable, str | None] = {}
    seen_story: set[int] = set()
    for k in order:
        story = final.get(work[k], work[k])
        first = story not in seen_story
        seen_story.add(story)
        match = joined.get(k)
        text = None if match is None else f"score {match.score:.2f}: " + "; ".join(match.reasons)
        if k not in inside:
            # A stored story outside the region merged into another: its items move,
            # and keep their reasons but for its first, which gets the merge's.
            if story != placed[k].story:
                absorbed[placed[k].story] = story
                story_of[k] = story
                if text is not None:
                    why[k] = text
            continue
        story_of[k] = story
        why[k] = None if first else text or "the same page"
    return Regrouping(story_of, why, absorbed)
