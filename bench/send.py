"""Send benchmark: clusterfeed's outbox against a minimal aiosmtplib sender.

Issue 4, point 9. A local SMTP sink (aiosmtpd in its own process, counting what it
accepts) listens on 127.0.0.1. For each size (1,000, 5,000 and 10,000 subscribers by
default) a fresh store gets that many subscribers with varied topics and languages and
one digest built from the bundled example feeds, so every subscriber has a message of
their own (their stories, their name, their unsubscribe link). Then, each in a fresh
subprocess with its own peak memory:

- ``clusterfeed``: ``Service.send_pending()`` on that outbox, through the SMTP transport
  with N connections: claim, render, hand over, commit, for every message;
- ``minimal`` (at the largest size): the same messages, rendered beforehand by the same
  code into a spool file, sent by a plain aiosmtplib loop over the same number of
  connections; no store, no rendering, nothing recorded. The yardstick.

Run ``.venv/bin/python bench/send.py --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import multiprocessing
import os
import platform
import random
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)  # the example feeds' news is recent then
TOPICS = ["cluster", "gene-therapy", "financing", "drug-discovery", "research", "medtech",
          "international"]  # fmt: skip
LANGUAGES = [["de"], ["en"], ["de", "en"], ["ja", "en"], []]
FIRST = ["Anke", "Jonas", "Maria", "Kenji", "Lena", "Ole", "Sophie", "Yuki", "Hannes", "Ines"]
LAST = ["Petersen", "Brandt", "Schmidt", "Tanaka", "Vogt", "Hansen", "Müller", "Sato", "Ohm"]


# -- the sink ---------------------------------------------------------------------------


def _sink_main(port: int, control: Connection) -> None:
    """An SMTP server that accepts everything and counts it; answers on ``control``."""
    import threading

    from aiosmtpd.controller import Controller

    class Counting:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.messages = 0
            self.recipients: set[str] = set()
            self.bytes = 0

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            with self.lock:
                self.messages += 1
                self.bytes += len(envelope.content)
                self.recipients.update(envelope.rcpt_tos)
            return "250 OK"

    handler = Counting()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    control.send("ready")
    while True:
        command = control.recv()
        if command == "stop":
            break
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with handler.lock:
            control.send(
                {
                    "messages": handler.messages,
                    "recipients": len(handler.recipients),
                    "bytes": handler.bytes,
                    "cpu": usage.ru_utime + usage.ru_stime,
                }
            )
            if command == "reset":
                handler.messages, handler.bytes = 0, 0
                handler.recipients.clear()
    controller.stop()


class Sink:
    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        ctx = multiprocessing.get_context("spawn")
        self._control, child = ctx.Pipe()
        self._process = ctx.Process(target=_sink_main, args=(self.port, child), daemon=True)
        self._process.start()
        assert self._control.recv() == "ready"

    def ask(self, command: str = "count") -> dict[str, Any]:
        self._control.send(command)
        answer: dict[str, Any] = self._control.recv()
        return answer

    def stop(self) -> None:
        self._control.send("stop")
        self._process.join(10)


# -- preparing one size ---------------------------------------------------------------


def _write_config(folder: Path, port: int, connections: int, with_csv: bool) -> Path:
    feeds = []
    for line in (
        (REPO / "config" / "example.toml").read_text(encoding="utf-8").split("[[feeds]]")[1:]
    ):
        feeds.append(
            "[[feeds]]" + line.replace('"example-feeds/', f'"{REPO}/config/example-feeds/')
        )
    text = f"""
{"subscribers_csv = 'subscribers.csv'" if with_csv else ""}
[cluster]
name = "NordBio Cluster"
url = "https://www.nordbio.example"
imprint = ["NordBio Cluster Management GmbH", "Hafenstraße 12, 20457 Hamburg"]
contact = "presse@nordbio.example"

[schedule]
timezone = "Europe/Berlin"

[publish]
output_dir = "public"
feed_url = "https://news.nordbio.example/feed.atom"

[digest]
templates_dir = "{REPO / "templates"}"
from = "NordBio Cluster News <news@nordbio.example>"
reply_to = "presse@nordbio.example"
group_by = "topic"
max_stories = 30

[mail]
transport = "smtp"
host = "127.0.0.1"
port = {port}
security = "none"
connections = {connections}

[store]
url = "sqlite:///store.sqlite3"

[web]
base_url = "https://news.nordbio.example"

{"".join(feeds)}
"""
    path = folder / ("prepare.toml" if with_csv else "send.toml")
    path.write_text(text, encoding="utf-8")
    return path


def _write_subscribers(folder: Path, n: int) -> None:
    rng = random.Random(4)
    with (folder / "subscribers.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["email", "name", "topics", "languages", "frequency"])
        for i in range(n):
            topics = rng.sample(TOPICS, rng.choice([0, 1, 2, 3]))
            writer.writerow(
                [
                    f"reader{i:05d}@example.org",
                    f"{rng.choice(FIRST)} {rng.choice(LAST)}",
                    ";".join(topics),
                    ";".join(rng.choice(LANGUAGES)),
                    "daily",
                ]
            )


def role_prepare(folder: Path, n: int, port: int, connections: int, spool: bool) -> dict[str, Any]:
    """Subscribers, stories and one digest's outbox in a fresh store; the spool file."""
    from clusterfeed.app.service import Service
    from clusterfeed.config import load_config
    from clusterfeed.digest.digest import message_bytes
    from clusterfeed.store import Store

    _write_subscribers(folder, n)
    _write_config(folder, port, connections, with_csv=False)
    config = load_config(_write_config(folder, port, connections, with_csv=True))
    store = Store(config.database_url)
    service = Service(config, store, clock=lambda: NOW)
    service.prepare()
    asyncio.run(service.fetch())
    started = time.perf_counter()
    _created, planned = service.create_digest("bench:send", NOW)
    built = time.perf_counter() - started
    result: dict[str, Any] = {"planned": planned, "build_s": built, "stories": 0}
    if spool:
        # The minimal sender's input: the very messages clusterfeed will send.
        sizes = []
        with (folder / "spool.bin").open("wb") as out:
            for delivery in store.pending_deliveries():
                message = service.compose(delivery)
                data = message_bytes(message)
                head = json.dumps(
                    {
                        "from": message["From"].addresses[0].addr_spec,
                        "to": [a.addr_spec for a in message["To"].addresses],
                    }
                ).encode()
                out.write(struct.pack(">II", len(head), len(data)) + head + data)
                sizes.append(len(data))
        result["message_kb"] = sum(sizes) / len(sizes) / 1024
    result["stories"] = len(
        {sid for d in store.pending_deliveries(limit=50) for sid in d.story_ids}
    )
    service.close()
    store.close()
    return result


# -- the two senders ------------------------------------------------------------------


def _usage() -> tuple[float, float]:
    """CPU seconds of this process (all threads) and of the children it started and
    ended (render workers), and its peak RSS in MB."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    return cpu, usage.ru_maxrss / 1024


class TreeMemory:
    """Samples the resident memory of this process and all its descendants (the render
    workers hang off a forkserver, so they are grandchildren) every 0.1 s; the peak of
    the sum is what the machine had to hold."""

    def __init__(self) -> None:
        import threading

        self.peak_mb = 0.0
        self.cpu: dict[int, float] = {}  # descendants' CPU seconds, last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _tree() -> list[int]:
        parents: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
        tree, frontier = [os.getpid()], [os.getpid()]
        while frontier:
            frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
            tree.extend(frontier)
        return tree

    @staticmethod
    def _rss_mb(pid: int) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def _run(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        while not self._stop.wait(0.1):
            tree = self._tree()
            self.peak_mb = max(self.peak_mb, sum(self._rss_mb(p) for p in tree))
            for pid in tree[1:]:
                try:
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                self.cpu[pid] = (int(fields[11]) + int(fields[12])) / tick

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def role_clusterfeed(folder: Path) -> dict[str, Any]:
    from clusterfeed.app.service import Service
    from clusterfeed.config import load_config
    from clusterfeed.store import Store

    config = load_config(folder / "send.toml")
    store = Store(config.database_url)
    service = Service(config, store, clock=lambda: NOW)
    cpu0, rss0 = _usage()
    memory = TreeMemory()
    started = time.perf_counter()
    report = asyncio.run(service.send_pending())
    wall = time.perf_counter() - started
    tree_peak = memory.stop()
    cpu1, rss1 = _usage()
    counts = store.delivery_counts()
    service.close()
    store.close()
    return {
        "wall_s": wall,
        "cpu_s": cpu1 - cpu0,
        "peak_mb": rss1,
        "tree_peak_mb": max(tree_peak, rss1),
        # Render workers are grandchildren (of a forkserver that is not waited for), so
        # their CPU is read from /proc while they run (the last 0.1 s may be missed).
        "workers_cpu_s": sum(memory.cpu.values()),
        "before_mb": rss0,
        "sent": report.sent,
        "failed": report.failed,
        "retry": report.retry,
        "states": counts,
    }


def role_minimal(folder: Path, port: int, connections: int) -> dict[str, Any]:
    import aiosmtplib

    def records() -> Any:
        with (folder / "spool.bin").open("rb") as spool:
            while True:
                sizes = spool.read(8)
                if not sizes:
                    return
                head_len, data_len = struct.unpack(">II", sizes)
                head = json.loads(spool.read(head_len))
                yield head["from"], head["to"], spool.read(data_len)

    async def run() -> int:
        source = records()
        sent = 0

        async def worker() -> None:
            nonlocal sent
            client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
            await client.connect()
            for sender, recipients, data in source:
                await client.sendmail(sender, recipients, data)
                sent += 1
            await client.quit()

        await asyncio.gather(*(worker() for _ in range(connections)))
        return sent

    cpu0, rss0 = _usage()
    started = time.perf_counter()
    sent = asyncio.run(run())
    wall = time.perf_counter() - started
    cpu1, rss1 = _usage()
    return {
        "wall_s": wall,
        "cpu_s": cpu1 - cpu0,
        "peak_mb": rss1,
        "tree_peak_mb": rss1,
        "before_mb": rss0,
        "sent": sent,
    }


# -- measuring a run ------------------------------------------------------------------


def _busy_seconds() -> float:
    """CPU seconds all cores spent busy since boot (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _child(role: str, args: list[str]) -> tuple[dict[str, Any], float]:
    """Run one role in a fresh interpreter; its result and the wall time around it.

    ``tree_cpu_s`` is the CPU time of the child and everything it started (render
    workers included), from this process's RUSAGE_CHILDREN once all of them ended.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--role", role, *args],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{role} failed:\n{out.stdout}\n{out.stderr}")
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    result["tree_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return result, wall


def measure(role: str, args: list[str], sink: Sink) -> dict[str, Any]:
    sink.ask("reset")
    busy0 = _busy_seconds()
    sink0 = sink.ask()["cpu"]
    result, _outer = _child(role, args)
    busy1 = _busy_seconds()
    received = sink.ask()
    sink_cpu = received["cpu"] - sink0
    result["sink_messages"] = received["messages"]
    result["sink_recipients"] = received["recipients"]
    result["sink_cpu_s"] = sink_cpu
    # Everything the machine did meanwhile that was neither the sender nor the sink
    # (start-up of the child included, so a little is always there).
    result.setdefault("workers_cpu_s", 0.0)
    result["tree_cpu_s"] = max(result["tree_cpu_s"], result["cpu_s"] + result["workers_cpu_s"])
    result["other_cpu_s"] = max(0.0, busy1 - busy0 - result["tree_cpu_s"] - sink_cpu)
    result["rate"] = result["sent"] / result["wall_s"] if result["wall_s"] else 0.0
    return result


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) / 1024 / 1024
    return (
        f"{model}, {os.cpu_count()} cores, {mem:.1f} GiB RAM; {platform.platform()}; "
        f"Python {platform.python_version()}"
    )


def _git() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        rev = ""
    return rev or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000", help="subscriber counts")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each sender at the largest size"
    )
    parser.add_argument("--write", action="store_true", help="append the report to RESULTS.md")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--spool", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role:
        if args.role == "prepare":
            result = role_prepare(args.folder, args.n, args.port, args.connections, args.spool)
        elif args.role == "clusterfeed":
            result = role_clusterfeed(args.folder)
        else:
            result = role_minimal(args.folder, args.port, args.connections)
        print(json.dumps(result))
        return 0

    sizes = [int(s) for s in args.sizes.split(",")]
    largest = max(sizes)
    sink = Sink()
    load0 = os.getloadavg()
    rows: list[tuple[int, str, int, dict[str, Any]]] = []
    prepared: dict[int, dict[str, Any]] = {}
    problems: list[str] = []
    started_at = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="clusterfeed-send-") as tmp:
        for n in sizes:
            folder = Path(tmp) / f"n{n}"
            folder.mkdir()
            common = ["--folder", str(folder), "--port", str(sink.port),
                      "--connections", str(args.connections)]  # fmt: skip
            prep, prep_wall = _child(
                "prepare", [*common, "--n", str(n), *(["--spool"] if n == largest else [])]
            )
            prep["wall_s"] = prep_wall
            prepared[n] = prep
            print(f"{n}: prepared {prep['planned']} deliveries in {prep_wall:.1f} s", flush=True)
            if prep["planned"] != n:
                problems.append(f"{n}: {prep['planned']} deliveries planned, not {n}")
            shutil.copy(folder / "store.sqlite3", folder / "pristine.sqlite3")
            runs = args.repeat if n == largest else 1
            for run in range(1, runs + 1):
                roles = ["minimal", "clusterfeed"] if n == largest else ["clusterfeed"]
                if run % 2 == 0:
                    roles.reverse()  # neither sender always runs on a warmer machine
                for role in roles:
                    if role == "clusterfeed":
                        for suffix in ("", "-wal", "-shm"):
                            (folder / f"store.sqlite3{suffix}").unlink(missing_ok=True)
                        shutil.copy(folder / "pristine.sqlite3", folder / "store.sqlite3")
                    result = measure(role, common, sink)
                    rows.append((n, role, run, result))
                    print(
                        f"{n} {role} run {run}: {result['sent']} sent in {result['wall_s']:.2f} s "
                        f"({result['rate']:.0f}/s), CPU {result['cpu_s']:.2f} s "
                        f"(with workers and start-up {result['tree_cpu_s']:.2f} s), peak "
                        f"{result['peak_mb']:.0f} MB (with workers {result['tree_peak_mb']:.0f}), "
                        f"other processes {result['other_cpu_s']:.1f} s",
                        flush=True,
                    )
                    if result["sent"] != n or result["sink_messages"] != n:
                        problems.append(
                            f"{n} {role} run {run}: sent {result['sent']}, "
                            f"sink received {result['sink_messages']}, expected {n}"
                        )
                    if result["sink_recipients"] != n:
                        problems.append(
                            f"{n} {role} run {run}: {result['sink_recipients']} distinct "
                            f"recipients, expected {n}"
                        )
                    if role == "clusterfeed" and result["states"] != {"sent": n}:
                        problems.append(f"{n} clusterfeed run {run}: outbox {result['states']}")
    sink.stop()
    load1 = os.getloadavg()
    report = _report(args, sizes, rows, prepared, problems, started_at, load0, load1)
    print(report)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as out:
            out.write("\n" + report)
    return 1 if problems else 0


def _report(
    args: argparse.Namespace,
    sizes: list[int],
    rows: list[tuple[int, str, int, dict[str, Any]]],
    prepared: dict[int, dict[str, Any]],
    problems: list[str],
    started_at: datetime,
    load0: tuple[float, float, float],
    load1: tuple[float, float, float],
) -> str:
    largest = max(sizes)

    def best(role: str, n: int) -> dict[str, Any]:
        runs = [r for size, name, _run, r in rows if size == n and name == role]
        return max(runs, key=lambda r: r["rate"])

    lines = [
        f"## Send benchmark, {started_at:%a %d %b %Y %H:%M} UTC",
        "",
        f"- Machine: {machine()}",
        f"- clusterfeed: git `{_git()}`",
        f"- Command: `.venv/bin/python bench/send.py {' '.join(sys.argv[1:])}`",
        f"- {args.connections} SMTP connections for both senders; the sink is aiosmtpd in "
        "its own process on 127.0.0.1, accepting everything.",
        f"- Load average (1/5/15 min) before: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f}, "
        f"after: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f} on {os.cpu_count()} cores. "
        '"Other CPU s" below is the busy time of the whole machine during the run minus '
        "the sender's and the sink's own: other engineers' tests, and the child's start-up.",
        "",
        "| subscribers | sender | run | messages | wall s | msg/s | CPU s sending "
        "| CPU s with workers and start-up | peak RSS MB | peak RSS MB with workers "
        "| sink CPU s | other CPU s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, role, run, r in rows:
        lines.append(
            f"| {n} | {role} | {run} | {r['sent']} | {r['wall_s']:.2f} | {r['rate']:.0f} | "
            f"{r['cpu_s']:.2f} | {r['tree_cpu_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['tree_peak_mb']:.0f} | {r['sink_cpu_s']:.2f} | {r['other_cpu_s']:.1f} |"
        )
    cf, mini = best("clusterfeed", largest), best("minimal", largest)
    ratio = cf["rate"] / mini["rate"] if mini["rate"] else 0.0
    peaks = {n: best("clusterfeed", n)["peak_mb"] for n in sizes}
    tree = {n: best("clusterfeed", n)["tree_peak_mb"] for n in sizes}
    growth = peaks[largest] - peaks[min(sizes)]
    lines += [
        "",
        f"Throughput at {largest} subscribers (best run of each): clusterfeed "
        f"{cf['rate']:.0f} msg/s, minimal sender {mini['rate']:.0f} msg/s: **{ratio:.2f}x** "
        f"(goal: at least 0.7x; {'met' if ratio >= 0.7 else 'not met'}).",
        "",
        "Peak RSS of the clusterfeed sending process: "
        + ", ".join(f"{n}: {peaks[n]:.0f} MB" for n in sizes)
        + f"; from {min(sizes)} to {largest} subscribers {growth:+.0f} MB "
        f"(goal: does not grow with the subscribers; "
        f"{'met' if abs(growth) <= 5 else 'not met'}, taking 5 MB as noise). With the "
        "render worker processes (sampled every 0.1 s, summed): "
        + ", ".join(f"{n}: {tree[n]:.0f} MB" for n in sizes)
        + ".",
        "",
        "Building the digest (planning every subscriber's stories and writing the outbox, "
        "not part of the sending figures): "
        + ", ".join(f"{n}: {prepared[n]['build_s']:.1f} s" for n in sizes)
        + f"; the average message is {prepared[largest].get('message_kb', 0):.1f} kB.",
    ]
    if problems:
        lines += ["", "**Checks failed:**", *[f"- {p}" for p in problems]]
    else:
        lines += [
            "",
            "Checks: every run delivered exactly one message to each subscriber (sink count "
            "and distinct recipients), and clusterfeed's outbox ended with every row sent.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
