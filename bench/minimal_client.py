"""The minimal client of the fetch benchmark: httpx plus feedparser, nothing stored.

Kept apart from ``fetch.py`` so that, run as a whole process (``fetch.py`` times the
whole ``clusterfeed fetch`` command against it), it imports no more than such a client
would: asyncio, httpx and feedparser.

As a script: ``python bench/minimal_client.py URLS.json VALIDATORS.json`` runs one
cycle over the feeds in URLS.json (a JSON object with ``urls`` and ``concurrency``),
sending the validators remembered in VALIDATORS.json (if it exists) and writing back
the ones it saw, and prints the statuses it got as JSON.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from pathlib import Path


async def minimal_cycle(
    urls: list[str], concurrency: int, validators: dict[str, tuple[str | None, str | None]]
) -> tuple[Counter[int], int, int]:
    """GET every feed with at most ``concurrency`` in flight; parse in the event loop.

    Parsing inline is the point: it is what a straightforward client does, and it is
    what clusterfeed should beat by parsing off the loop while the network waits.
    Returns (statuses, entries parsed, feeds feedparser flagged as broken).
    """
    import feedparser
    import httpx

    statuses: Counter[int] = Counter()
    entries = bozo = 0
    semaphore = asyncio.Semaphore(concurrency)
    # httpx's default pool (100 connections, 20 kept alive): what a first client uses.
    async with httpx.AsyncClient(timeout=30.0) as client:

        async def one(url: str) -> None:
            nonlocal entries, bozo
            headers = {}
            etag, modified = validators.get(url, (None, None))
            if etag:
                headers["If-None-Match"] = etag
            if modified:
                headers["If-Modified-Since"] = modified
            async with semaphore:
                response = await client.get(url, headers=headers)
            statuses[response.status_code] += 1
            if response.status_code != 200:
                return
            validators[url] = (response.headers.get("etag"), response.headers.get("last-modified"))
            parsed = feedparser.parse(response.content)
            entries += len(parsed.entries)
            bozo += bool(parsed.bozo)

        await asyncio.gather(*(one(url) for url in urls))
    return statuses, entries, bozo


def main(manifest_path: Path, validators_path: Path) -> int:
    manifest = json.loads(manifest_path.read_text())
    validators: dict[str, tuple[str | None, str | None]] = {}
    if validators_path.exists():
        validators = {k: tuple(v) for k, v in json.loads(validators_path.read_text()).items()}  # type: ignore[misc]
    statuses, entries, bozo = asyncio.run(
        minimal_cycle(manifest["urls"], manifest["concurrency"], validators)
    )
    validators_path.write_text(json.dumps(validators))
    print(json.dumps({"statuses": {str(k): v for k, v in statuses.items()}, "entries": entries}))
    return 0 if not bozo else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
