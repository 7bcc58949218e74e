"""The units of work: fetch feeds, match new items, publish, plan a digest, deliver.

Each unit is one function with one signature, and each is safe to run again or in
several processes at once, because its effect is keyed in the store:

- ``fetch_feeds``: a feed's validators and next attempt are written with its items, so
  with ``due_only`` a second run finds the feed not due and asks nothing;
- ``match_new``: a joined item is no one-item story any more, so matching again
  changes nothing;
- ``publish``: a file whose bytes would not change is not written;
- ``plan_digest``: the digest key (a cron slot, or a run started by hand) is unique,
  so a second plan of one key writes nothing;
- ``deliver``: outbox rows are claimed by one sender with an expiry; a dead sender's
  claims go back to the outbox (or count as sent when the transport can tell).

The sequences that compose them are written once, in ``clusterfeed.app.sequences``;
``run``, ``run --once``, the CLI commands and the task workers all call those.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from datetime import datetime
from pathlib import Path

from clusterfeed.app.health import Alert
from clusterfeed.app.service import FeedOutcome, PublishReport, Service
from clusterfeed.delivery.outbox import SendReport
from clusterfeed.store import Delivery


async def fetch_feeds(
    service: Service,
    names: Collection[str] | None = None,
    *,
    due_only: bool = False,
    on_feed: Callable[[FeedOutcome], None] | None = None,
) -> list[FeedOutcome]:
    """Fetch ``names`` (every enabled feed when None) and store what changed.

    Matching is left to ``match_new``: a worker fetches one feed per task, and the
    matching of a cycle's new items must see all of them at once.
    """
    return await service.fetch(on_feed, due_only=due_only, names=names, match=False)


async def match_new(service: Service, since: datetime) -> int:
    """Join the items stored since ``since`` to the stories other partners told."""
    return await asyncio.to_thread(service.match_new, since)


async def send_alerts(service: Service) -> list[Alert]:
    """Mail the operator about feeds in trouble, once per incident."""
    return await service.send_alerts()


async def publish(service: Service, out_dir: Path | None = None) -> PublishReport:
    """Write the published files; tell the hub when the served feeds changed.

    A copy written elsewhere (``out_dir``) is not what the hub's readers fetch, so the
    hub hears only of the served folder.
    """
    report = await asyncio.to_thread(service.publish, out_dir)
    if out_dir is None:
        await service.notify_hub(report)
    return report


def plan_digest(service: Service, key: str, slot: datetime) -> tuple[bool, int]:
    """Write the digest ``key`` and its outbox rows once; (created, deliveries planned)."""
    return service.create_digest(key, slot)


async def deliver(
    service: Service,
    *,
    batches: int | None = None,
    on_progress: Callable[[Delivery, str], None] | None = None,
) -> SendReport:
    """Send what is due in the outbox: every due row, or ``batches`` claimed batches."""
    return await service.send_pending(on_progress=on_progress, batches=batches)
