"""The fetch benchmark's whole-command part: ``clusterfeed fetch`` as cron runs it.

The in-process figures of ``fetch.py`` time ``Service.fetch()`` inside a process that
is already running; an operator's cron starts ``clusterfeed fetch``, which also
imports, loads the config, sets up the store, starts (or not) worker processes and
exits. This part times that whole process for an unchanged cycle (every feed answers
304), against the minimal client run as a whole process too, and subtracts start-up
measured the same way in the same run:

- ``python -c pass``: the interpreter alone (the same for both clients);
- ``clusterfeed --version``: the interpreter and the command's imports;
- ``clusterfeed check``: what issue 16 named as start-up (imports, config, templates);
- ``python -c 'import asyncio, httpx, feedparser'``: the minimal client's imports.

Every measured command runs once per round, the rounds one after another, so slow
and quiet moments of a shared machine fall on both clients alike.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent


@dataclass
class Timed:
    """One command's runs: wall and CPU seconds (the process and all it started)."""

    label: str
    command: str
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def median(self) -> float:
        return statistics.median(self.wall)


def _stats(control_url: str) -> dict[str, Any]:
    with urllib.request.urlopen(control_url, timeout=10) as response:  # loopback only
        data: dict[str, Any] = json.load(response)
        return data


def _statuses(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {
        k: after["status"].get(k, 0) - before["status"].get(k, 0)
        for k in after["status"]
        if after["status"].get(k, 0) - before["status"].get(k, 0)
    }


def run_timed(argv: list[str], cwd: Path) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """(wall s, CPU s of the process and its reaped descendants, the finished process)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def clusterfeed_command() -> list[str]:
    """The installed ``clusterfeed`` script next to this interpreter, as cron runs it."""
    script = Path(sys.executable).parent / "clusterfeed"
    return [str(script)] if script.exists() else [sys.executable, "-m", "clusterfeed"]


def measure_whole_commands(
    config: Path, priming: Path, manifest: dict[str, Any], folder: Path, rounds: int
) -> tuple[list[Timed], list[str]]:
    """Prime both clients (a first, full cycle each; clusterfeed's with the ``priming``
    config, on the same store), then time ``rounds`` rounds of unchanged cycles and
    start-ups with ``config``. Returns the timings and the failed checks."""
    control = manifest["control"]
    feeds = len(manifest["urls"])
    cf = clusterfeed_command()
    minimal_manifest = folder / "minimal-manifest.json"
    minimal_manifest.write_text(
        json.dumps({"urls": manifest["urls"], "concurrency": manifest["concurrency"]})
    )
    validators = folder / "minimal-validators.json"
    validators.unlink(missing_ok=True)
    fetch = [*cf, "fetch", "--config", str(config)]
    minimal = [sys.executable, str(BENCH / "minimal_client.py"), str(minimal_manifest)]
    minimal.append(str(validators))
    problems: list[str] = []
    prime = [*cf, "fetch", "--config", str(priming)]
    for argv in (prime, minimal):  # the first cycle: every feed new, not timed here
        _, _, done = run_timed(argv, folder)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            problems.append(f"priming `{' '.join(argv[-3:])}` failed: {tail}")
            return [], problems
    timed = [
        Timed("interpreter", "python -c pass"),
        Timed("minimal imports", "python -c 'import asyncio, httpx, feedparser'"),
        Timed("clusterfeed imports", "clusterfeed --version"),
        Timed("clusterfeed check", "clusterfeed check"),
        Timed("minimal client", "python bench/minimal_client.py (one cycle)"),
        Timed("clusterfeed fetch", "clusterfeed fetch"),
    ]
    commands = {
        "interpreter": [sys.executable, "-c", "pass"],
        "minimal imports": [sys.executable, "-c", "import asyncio, httpx, feedparser"],
        "clusterfeed imports": [*cf, "--version"],
        "clusterfeed check": [*cf, "check", "--config", str(config)],
        "minimal client": minimal,
        "clusterfeed fetch": fetch,
    }
    cycles = {"minimal client", "clusterfeed fetch"}
    for number in range(1, rounds + 1):
        # Alternate which client goes first, so neither always follows the other.
        order = timed if number % 2 else [*timed[:4], timed[5], timed[4]]
        for entry in order:
            before = _stats(control) if entry.label in cycles else None
            wall, cpu, done = run_timed(commands[entry.label], folder)
            entry.wall.append(round(wall, 3))
            entry.cpu.append(round(cpu, 3))
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                problems.append(f"round {number}: {entry.command} exited {done.returncode}: {tail}")
            if before is not None:
                seen = _statuses(before, _stats(control))
                if seen != {"304": feeds}:
                    problems.append(f"round {number}: {entry.command}: server answered {seen}")
            if entry.label == "clusterfeed fetch" and "0 new items, 0 failed" not in done.stdout:
                problems.append(f"round {number}: clusterfeed fetch said {done.stdout.strip()!r}")
        print(
            f"  round {number}/{rounds}: "
            + ", ".join(f"{t.label} {t.wall[-1]:.2f} s" for t in timed),
            file=sys.stderr,
            flush=True,
        )
    return timed, problems


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def whole_command_markdown(
    timed: list[Timed], problems: list[str], floor_s: float, load: tuple[str, str]
) -> str:
    """The section of the report: every command's spread and the ratios of medians."""
    by = {t.label: t for t in timed}
    lines = [
        "### The whole command, unchanged cycle (every feed answers 304)",
        "",
        f"Each command ran {len(timed[0].wall) if timed else 0} times, in rounds; "
        f"load average (1/5/15 min) before: {load[0]}, after: {load[1]}.",
        "",
        "| command | wall s min / median / max | CPU s median |",
        "| --- | ---: | ---: |",
    ]
    lines += [
        f"| `{t.command}` | {_spread(t.wall)} | {statistics.median(t.cpu):.2f} |" for t in timed
    ]
    if timed:
        fetch, minimal = by["clusterfeed fetch"].wall, by["minimal client"].wall
        start = by["clusterfeed check"].median()
        imports = by["clusterfeed imports"].median()
        m_imports = by["minimal imports"].median()
        cf_cycle = statistics.median(fetch) - start
        m_cycle = statistics.median(minimal) - m_imports

        def cpu(label: str) -> float:
            return statistics.median(by[label].cpu)

        cf_cpu = cpu("clusterfeed fetch") - cpu("clusterfeed check")
        m_cpu = cpu("minimal client") - cpu("minimal imports")
        per_round = [
            (f - by["clusterfeed check"].wall[i]) / (m - by["minimal imports"].wall[i])
            for i, (f, m) in enumerate(zip(fetch, minimal, strict=True))
        ]
        lines += [
            "",
            f"- `clusterfeed fetch` minus `clusterfeed check` (issue 16's measure): "
            f"{cf_cycle:.2f} s, against the minimal client minus its imports: {m_cycle:.2f} s: "
            f"**{cf_cycle / m_cycle:.2f}x** (round by round {min(per_round):.2f}x to "
            f"{max(per_round):.2f}x; goal 1.1x); the floor is {floor_s:.2f} s.",
            f"- `clusterfeed fetch` minus `clusterfeed --version` (what the command does "
            f"beyond importing): {statistics.median(fetch) - imports:.2f} s: "
            f"{(statistics.median(fetch) - imports) / m_cycle:.2f}x the minimal client's.",
            f"- CPU (less sensitive to other work on the machine than wall time): "
            f"`clusterfeed fetch` minus `clusterfeed check` {cf_cpu:.2f} s, the minimal "
            f"client minus its imports {m_cpu:.2f} s: {cf_cpu / m_cpu:.2f}x.",
            f"- Whole processes: `clusterfeed fetch` {statistics.median(fetch):.2f} s, the "
            f"minimal client {statistics.median(minimal):.2f} s: "
            f"{statistics.median(fetch) / statistics.median(minimal):.2f}x.",
        ]
    lines += (
        ["", *(f"- **check failed**: {p}" for p in problems)]
        if problems
        else [
            "",
            "Checks: the server answered every feed 304 in every timed cycle of both clients, "
            "and every `clusterfeed fetch` reported 0 new items, 0 failed.",
        ]
    )
    return "\n".join(lines) + "\n"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"
