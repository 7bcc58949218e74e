"""What story matching costs through the store, on the synthetic stream of bench/dedup.py.

    python bench/story_cost.py [--backlog 15000] [--history 10000] [--cycle 100] [--days 30]

1. ``backlog``: a first fetch of N items in one cycle (every item's features computed
   and stored, then matched), as a new installation's first ``fetch`` does; the items
   spread over the generator's two years;
2. ``cycle``: a store already holding ``history`` matched items published within
   ``days`` (the issue's 10,000 items in 30 days: a full matching window), then one
   cycle of ``cycle`` new items (only the new items' features are computed).
Reports CPU seconds (this process, and the feature worker processes a backlog starts),
wall seconds, peak RSS and pairwise precision / recall against the generator's labels.
CPU seconds are what to compare on a shared machine; figures go to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
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


def _worker_cpu() -> float:
    """CPU seconds of the feature workers that have ended: they are the forkserver's
    children, so their time is in its ``cutime``/``cstime`` (Linux), not in ours."""
    from multiprocessing import forkserver

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def run(cycles: Sequence[Sequence[Row]], label: str) -> None:
    rows = [r for c in cycles for r in c]
    timings: list[tuple[float, float]] = []

    matcher = StoryMatcher()

    def hook() -> None:
        # A running service has its encoder loaded after the first cycle; when workers
        # computed a backlog's features, this process has not: load it outside the
        # timed cycle (1.2 CPU-seconds, once per process).
        if len(timings) < len(cycles) - 1:
            matcher.encoder.encode(["-"])
        timings.append((time.process_time(), time.perf_counter()))

    started = (time.process_time(), time.perf_counter())
    workers_before = _worker_cpu()
    labels = production_labels(cycles, matcher, after_cycle=hook)
    cpu, wall = time.process_time() - started[0], time.perf_counter() - started[1]
    last_cpu = timings[-1][0] - (timings[-2][0] if len(timings) > 1 else started[0])
    last_wall = timings[-1][1] - (timings[-2][1] if len(timings) > 1 else started[1])
    workers = _worker_cpu() - workers_before
    s = score(labels, rows, [])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{label}: {len(rows)} items in {len(cycles)} cycle(s): CPU {cpu:.1f} s in this process"
        f" + {workers:.1f} s in feature workers, wall {wall:.1f} s;"
        f" last cycle CPU {last_cpu:.1f} s, wall {last_wall:.1f} s; peak RSS {peak:.0f} MB"
        f" (this process); P {s.precision:.3f} R {s.recall:.3f}; load {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backlog", type=int, default=15_000)
    parser.add_argument("--history", type=int, default=10_000)
    parser.add_argument("--cycle", type=int, default=100)
    parser.add_argument("--days", type=float, default=30.0, help="the history's time span")
    parser.add_argument("--only", choices=["backlog", "cycle"])
    args = parser.parse_args()
    if args.only != "cycle":
        items, truth = generate(args.backlog)
        run([[as_row(i, truth[i.id]) for i in items]], "backlog")
    if args.only != "backlog":
        total = args.history + args.cycle
        items, truth = generate(total, span_days=args.days * total / args.history)
        items.sort(key=lambda i: (i.published, i.id))
        rows = [as_row(i, truth[i.id]) for i in items]
        run([rows[: args.history], rows[args.history :]], "cycle")


if __name__ == "__main__":
    main()
