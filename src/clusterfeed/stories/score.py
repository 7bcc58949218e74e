"""The pair score of story matching: are two items one event?

Two items' stored features (``clusterfeed.stories.features``: the embedding and the
evidence) give a short vector of pair features (``pair_vector``); a logistic
regression trained on labelled pairs of the tuning part turns it into the probability
that both tell one event (``PairModel``). Its coefficients live in
``data/story_pairs.json``, written by ``scripts/train_story_model.py``. ``veto`` holds
the rules that stand above the score.

Pure functions over plain data: no I/O but reading the model file.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np

from clusterfeed.stories.features import ItemFeatures, latin_skeleton
from clusterfeed.stories.kinds import publisher


def name_frequencies(items: Iterable[ItemFeatures]) -> tuple[Counter[str], int]:
    """In how many items each name occurs, and of how many: names that many items of
    the window carry (the cluster's own name, a city, a month) are no evidence."""
    counts: Counter[str] = Counter()
    total = 0
    for f in items:
        counts.update(f.evidence.names)
        total += 1
    return counts, total


def _rare(names: Iterable[str], counts: Mapping[str, int], total: int) -> set[str]:
    limit = 2 + 0.02 * total
    return {n for n in names if counts.get(n, 0) <= limit}


def _katakana_hits(latin: Iterable[str], skeletons: frozenset[str]) -> int:
    if not skeletons:
        return 0
    return sum(1 for n in latin if len(n) >= 4 and latin_skeleton(n) in skeletons)


FEATURES = (
    "cosine",
    "cosine_cross_language",
    "cross_language",
    "same_feed",
    "link",
    "amounts",
    "amount_conflict",
    "codes",
    "dates",
    "percents",
    "names",
    "rare_names",
    "katakana_names",
    "title_names",
    "other_protagonists",
    "series_conflict",
    "log_days",
    "no_evidence",
)


def pair_vector(
    a: ItemFeatures, b: ItemFeatures, counts: Mapping[str, int], total: int
) -> list[float]:
    """The pair features, in the order of ``FEATURES``."""
    ea, eb = a.evidence, b.evidence
    cosine = float(np.dot(a.vector, b.vector))
    cross = float(a.language != b.language)
    link = float(
        bool(ea.own_link and (ea.own_link == eb.own_link or ea.own_link in eb.links))
        or bool(eb.own_link and eb.own_link in ea.links)
    )
    shared_amounts = ea.amounts & eb.amounts
    # Amounts on both sides and none in common: two deals, two grants, two funds.
    conflict = float(bool(ea.amounts and eb.amounts) and not shared_amounts)
    shared_names = ea.names & eb.names
    rare = _rare(shared_names, counts, total)
    katakana = _katakana_hits(_rare(ea.names, counts, total), eb.skeletons) + _katakana_hits(
        _rare(eb.names, counts, total), ea.skeletons
    )
    title_shared = (ea.title_names & (eb.names | eb.title_names)) | (
        eb.title_names & (ea.names | ea.title_names)
    )
    # Names in both titles, none of them in the other item: the same kind of news
    # about two subjects. Katakana titles write names another way: not compared.
    latin = "ja" not in (a.language, b.language)
    protagonists = float(bool(ea.title_names and eb.title_names and not title_shared and latin))
    series = float(
        bool(ea.series_title)
        and ea.series_title == eb.series_title
        and ea.series_numbers != eb.series_numbers
    )
    days = abs((a.published - b.published).total_seconds()) / 86400
    none = not (link or shared_amounts or ea.codes & eb.codes or ea.dates & eb.dates)
    none = none and not (rare or katakana or title_shared)
    return [
        cosine,
        cosine * cross,
        cross,
        float(a.feed == b.feed),
        link,
        min(len(shared_amounts), 2),
        conflict,
        min(len(ea.codes & eb.codes), 2),
        min(len(ea.dates & eb.dates), 2),
        min(len(ea.percents & eb.percents), 2),
        min(len(shared_names), 4),
        min(len(rare), 3),
        min(katakana, 3),
        min(len(title_shared), 2),
        protagonists,
        series,
        math.log1p(days),
        float(none),
    ]


def veto(a: ItemFeatures, b: ItemFeatures) -> str | None:
    """Why two items can never be one story, whatever their score, or None.

    Rules, not weights: neither ever holds for two versions of one event in the labelled
    sets, and a model that saw no such pair would give them no weight. A partner does
    not announce one event twice in one language (a bilingual feed may carry both
    versions); titles the same but for a number are a series ("Newsletter 03/2026" and
    "04/2026", "Teil 1" and "Teil 2", "news number 2" and "3"). A newsletter issue
    (``clusterfeed.stories.kinds``) is one story only with its other language version
    from the same site: it names the events it lists and is none of them.
    """
    if a.feed == b.feed and a.language == b.language:
        return "the same feed in the same language"
    ea, eb = a.evidence, b.evidence
    series = bool(ea.series_title) and ea.series_title == eb.series_title
    if series and ea.series_numbers != eb.series_numbers:
        return "the same title with other numbers (a series)"
    if ea.kind != eb.kind:
        return "a newsletter issue is not one of the events it lists"
    if ea.kind and publisher(ea.own_link, a.feed) != publisher(eb.own_link, b.feed):
        return "two publishers' newsletters"
    return None


@dataclass(frozen=True)
class PairModel:
    """Logistic regression over ``pair_vector``, with the clustering's thresholds."""

    weights: tuple[float, ...]
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    join_average: float  # a story's members' mean probability an item must reach
    join_minimum: float  # and every member's
    window_days: float
    neighbours: int  # the most similar items whose stories are scored

    def probabilities(self, vectors: Sequence[Sequence[float]]) -> np.ndarray:
        x = (np.asarray(vectors, dtype=np.float64) - self.mean) / self.scale
        result: np.ndarray = 1.0 / (1.0 + np.exp(-(x @ np.asarray(self.weights) + self.bias)))
        return result

    def explain(self, vector: Sequence[float]) -> list[str]:
        """The pair features that pushed the score up most, for ``stories``' reasons."""
        contributions = [
            (w * (v - m) / s, name, v)
            for w, v, m, s, name in zip(
                self.weights, vector, self.mean, self.scale, FEATURES, strict=True
            )
        ]
        top = sorted(contributions, reverse=True)[:3]
        return [f"{name} {value:.2f}" for c, name, value in top if c > 0]

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(FEATURES),
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "join_average": self.join_average,
            "join_minimum": self.join_minimum,
            "window_days": self.window_days,
            "neighbours": self.neighbours,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PairModel:
        if list(data["features"]) != list(FEATURES):
            raise ValueError("the story pair model was trained on other features; retrain it")
        return cls(
            weights=tuple(data["weights"]),
            bias=float(data["bias"]),
            mean=tuple(data["mean"]),
            scale=tuple(data["scale"]),
            join_average=float(data["join_average"]),
            join_minimum=float(data["join_minimum"]),
            window_days=float(data["window_days"]),
            neighbours=int(data["neighbours"]),
        )


def default_model() -> PairModel:
    """The model shipped with clusterfeed, trained on the tuning part of the labelled sets."""
    text = resources.files("clusterfeed").joinpath("data/story_pairs.json").read_text("utf-8")
    return PairModel.from_json(json.loads(text))
