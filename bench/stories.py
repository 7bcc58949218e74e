"""Story matching on the labelled sets: tuning part, held-out part, leave-one-domain-out.

    python bench/stories.py [FOLDER ...]        (default: tests/data/stories)

Runs clusterfeed through the production path (items stored, then matched by the store:
``clusterfeed.stories.benchmark``) beside three baselines that run on the same items: naive
(exact URL + title word overlap), NewsBlur's title tiers, and TF-IDF cosine (threshold
picked on the tuning part). Prints a Markdown table for bench/RESULTS.md and docs/stories.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from clusterfeed.stories.benchmark import (  # noqa: E402
    Row,
    Score,
    cycles_of,
    load_rows,
    production_labels,
    score,
    select,
)
from clusterfeed.stories.evaluate import UnionFind, naive_labels, newsblur_labels  # noqa: E402

Negatives = Sequence[tuple[str, str, str]]
Method = Callable[[Sequence[Row]], dict[str, object]]


def tfidf_labels(rows: Sequence[Row], threshold: float, days: float = 5.0) -> dict[str, object]:
    """TF-IDF (word unigrams and bigrams, fitted on the items themselves) cosine of title
    and text at least ``threshold`` within ``days``; groups by transitive closure."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    items = [r.item() for r in rows]
    matrix = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(
        [f"{i.title} {i.title} {i.text}" for i in items]
    )
    similar = (matrix @ matrix.T).tocoo()
    uf = UnionFind(i.id for i in items)
    for a, b, value in zip(similar.row, similar.col, similar.data, strict=True):
        if a < b and value >= threshold:
            gap = abs((items[a].published - items[b].published).total_seconds())
            if gap <= days * 86400:
                uf.union(items[a].id, items[b].id)
    return {i.id: uf.find(i.id) for i in items}


def best_tfidf_threshold(rows: Sequence[Row], negatives: Negatives) -> float:
    """The threshold with the best F1 on the given (tuning) rows."""
    candidates = [t / 100 for t in range(10, 95, 5)]
    return max(candidates, key=lambda t: score(tfidf_labels(rows, t), rows, negatives).f1)


def production(rows: Sequence[Row]) -> dict[str, object]:
    from clusterfeed.stories.matcher import StoryMatcher

    return production_labels(cycles_of(rows, 1), StoryMatcher())


def table(folders: Sequence[Path]) -> str:
    rows: list[Row] = []
    negatives: list[tuple[str, str, str]] = []
    for folder in folders:
        more, neg = load_rows(folder)
        rows += more
        negatives += neg
    tuning, held_out = select(rows, part="tuning"), select(rows, part="held-out")
    threshold = best_tfidf_threshold(tuning, negatives)
    methods: list[tuple[str, Method]] = [
        ("clusterfeed (production path)", production),
        ("naive: exact URL + title words", lambda rs: naive_labels([r.item() for r in rs])),
        ("NewsBlur title tiers", lambda rs: newsblur_labels([r.item() for r in rs])),
        (f"TF-IDF cosine >= {threshold:.2f}", lambda rs: tfidf_labels(rs, threshold)),
    ]
    domains = sorted({r.domain for r in rows})
    head = (
        "| method | tuning P / R / HN | held-out P / R / HN | per domain (held-out) P / R |\n"
        "| --- | --- | --- | --- |"
    )
    lines = [head]

    def cell(s: Score) -> str:
        return (
            f"{s.precision:.3f} / {s.recall:.3f} / {s.merged_hard_negatives} of {s.hard_negatives}"
        )

    for name, method in methods:
        parts = [score(method(part), part, negatives) for part in (tuning, held_out)]
        spread = []
        for domain in domains:
            part = select(held_out, domains=[domain])
            s = score(method(part), part, negatives)
            spread.append(f"{domain}: {s.precision:.2f} / {s.recall:.2f}")
        lines.append(f"| {name} | {cell(parts[0])} | {cell(parts[1])} | {'; '.join(spread)} |")
    shape = (
        f"\n{len(rows)} items in {len({r.story for r in rows})} stories from sets "
        f"{', '.join(domains)}; tuning {len(tuning)} items, held-out {len(held_out)} items; "
        "HN = hard negative pairs merged (of those with both items in the part)."
    )
    return "\n".join(lines) + shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "folders", nargs="*", type=Path, default=[HERE.parent / "tests/data/stories"]
    )
    args = parser.parse_args()
    started = time.process_time()
    print(table(args.folders))
    print(
        f"\nCPU {time.process_time() - started:.1f} s, peak RSS "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB"
    )


if __name__ == "__main__":
    main()
