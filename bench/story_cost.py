"""What story matching costs through the store, on the synthetic stream of bench/dedup.py.

    python bench/story_cost.py [--backlog 15000] [--history 10000] [--cycle 100]

1. ``backlog``: a first fetch of N items in one cycle (every item's features computed
   and stored, then matched), as a new installation's first ``fetch`` does;
2. ``cycle``: a store already holding ``history`` matched items, then one cycle of
   ``cycle`` new items (only the new items' features are computed).
Reports CPU seconds, wall seconds, peak RSS and pairwise precision / recall against
the generator's labels. Run on a quiet machine; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from dedup import generate  # noqa: E402

from clusterfeed.stories.benchmark import Row, production_labels, score  # noqa: E402
from clusterfeed.stories.benchmark import row_of as as_row  # noqa: E402
from clusterfeed.stories.matcher import StoryMatcher  # noqa: E402


def run(cycles: Sequence[Sequence[Row]], label: str) -> None:
    rows = [r for c in cycles for r in c]
    timings: list[tuple[float, float]] = []

    def hook() -> None:
        timings.append((time.process_time(), time.perf_counter()))

    started = (time.process_time(), time.perf_counter())
    labels = production_labels(cycles, StoryMatcher(), after_cycle=hook)
    cpu, wall = time.process_time() - started[0], time.perf_counter() - started[1]
    last_cpu = timings[-1][0] - (timings[-2][0] if len(timings) > 1 else started[0])
    last_wall = timings[-1][1] - (timings[-2][1] if len(timings) > 1 else started[1])
    s = score(labels, rows, [])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{label}: {len(rows)} items in {len(cycles)} cycle(s): CPU {cpu:.1f} s, wall {wall:.1f} s;"
        f" last cycle CPU {last_cpu:.1f} s, wall {last_wall:.1f} s; peak RSS {peak:.0f} MB;"
        f" P {s.precision:.3f} R {s.recall:.3f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=15_000)
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--cycle", type=int, default=100)
    parser.add_argument("--only", choices=["backlog", "cycle"])
    args = parser.parse_args()
    if args.only != "cycle":
        items, truth = generate(args.backlog)
        run([[as_row(i, truth[i.id]) for i in items]], "backlog")
    if args.only != "backlog":
        items, truth = generate(args.history + args.cycle)
        items.sort(key=lambda i: (i.published, i.id))
        rows = [as_row(i, truth[i.id]) for i in items]
        run([rows[: args.history], rows[args.history :]], "cycle")


if __name__ == "__main__":
    main()
