"""The sequences of units, written once: what a fetch cycle and a digest run are.

``clusterfeed run`` (the in-process scheduler), ``run --once``, ``fetch``, ``digest``
and the task workers on PostgreSQL call these, so the end-to-end tests run the path
users run. Nothing here prints or logs a summary: the callers say what happened.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from clusterfeed.app import units
from clusterfeed.app.health import Alert
from clusterfeed.app.service import FeedOutcome, PublishReport, Service, adhoc_digest_key
from clusterfeed.delivery.outbox import SendReport
from clusterfeed.store import Delivery

Progress = Callable[[Delivery, str], None]


@dataclass
class FetchReport:
    """What fetching (and matching) the feeds did."""

    feeds: list[FeedOutcome] = field(default_factory=list)
    joined: int = 0
    alerts: list[Alert] = field(default_factory=list)

    @property
    def failed_feeds(self) -> list[FeedOutcome]:
        return [f for f in self.feeds if f.state == "failed"]


@dataclass
class DigestRun:
    """One digest run: the earlier digests' deliveries finished, this one planned, sent."""

    created: bool
    planned: int
    earlier: SendReport
    send: SendReport

    @property
    def sent(self) -> int:
        return self.earlier.sent + self.send.sent

    @property
    def failed(self) -> int:
        return self.earlier.failed + self.send.failed


@dataclass
class CycleReport:
    """A whole cycle: fetch, match, alerts, publish; and the digest when asked for."""

    fetched: FetchReport
    publish: PublishReport
    digest: DigestRun | None = None
    retries: SendReport | None = None

    @property
    def feeds(self) -> list[FeedOutcome]:
        return self.fetched.feeds

    @property
    def published(self) -> bool:
        return self.publish.changed


async def fetch_and_match(
    service: Service,
    *,
    due_only: bool = False,
    on_feed: Callable[[FeedOutcome], None] | None = None,
) -> FetchReport:
    """Fetch the feeds, join the cycle's new items to stories, alert about feeds in trouble."""
    started = service.clock()
    report = FetchReport(await units.fetch_feeds(service, due_only=due_only, on_feed=on_feed))
    if any(o.new_entries for o in report.feeds):
        report.joined = await units.match_new(service, started)
    report.alerts = await units.send_alerts(service)
    return report


async def digest_run(
    service: Service, key: str, slot: datetime, on_progress: Progress | None = None
) -> DigestRun:
    """Finish what earlier runs left in the outbox, then plan ``key`` and send it."""
    earlier = await units.deliver(service, on_progress=on_progress)
    created, planned = units.plan_digest(service, key, slot)
    send = await units.deliver(service, on_progress=on_progress)
    return DigestRun(created, planned, earlier, send)


async def cycle(
    service: Service,
    *,
    due_only: bool = False,
    with_digest: bool = False,
    on_feed: Callable[[FeedOutcome], None] | None = None,
    on_progress: Progress | None = None,
) -> CycleReport:
    """One cycle: fetch and match, publish; then the digest (``run --once``) or, for
    the scheduler's periodic cycle (``due_only``), the deferred deliveries now due."""
    fetched = await fetch_and_match(service, due_only=due_only, on_feed=on_feed)
    report = CycleReport(fetched, await units.publish(service))
    if with_digest:
        now = service.clock()
        report.digest = await digest_run(
            service, adhoc_digest_key("once", now), now, on_progress=on_progress
        )
    elif due_only and service.store.count_due(service.clock()):
        # Deferred deliveries come due between digests; the periodic cycle sends them.
        report.retries = await units.deliver(service, on_progress=on_progress)
    return report
