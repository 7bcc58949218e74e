"""Run the service on its schedule with APScheduler.

Two jobs: fetch-and-publish every N minutes, and the digest on its cron in its time
zone. Each job runs at most once at a time (``max_instances=1``) and late runs are
coalesced, so a slow cycle never piles up copies of itself. APScheduler's in-memory
job store forgets everything at exit, so missed digests are found from our own store
instead: at start-up the latest cron slot is computed, and if it passed while the
service was down and no digest for it exists, it is sent once. The digest's key is its
slot, so a second worker, or a restart at the wrong moment, cannot send it twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import jinja2
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from clusterfeed.app.sequences import cycle, digest_run
from clusterfeed.app.service import Service
from clusterfeed.config import cron_trigger
from clusterfeed.digest.templatecheck import TemplateProblem, describe
from clusterfeed.ingest.cadence import cycle_line
from clusterfeed.words import plural

log = logging.getLogger(__name__)

STARTED_KEY = "scheduler_first_started_at"


def digest_trigger(cron: str, timezone: str) -> CronTrigger:
    """The digest's trigger; weekday numbers mean what they mean in crontab (0 = Sunday)."""
    trigger: CronTrigger = cron_trigger(cron, timezone)
    return trigger


def latest_slot(
    trigger: CronTrigger, now: datetime, horizon: timedelta = timedelta(days=35)
) -> datetime | None:
    """The most recent fire time of ``trigger`` at or before ``now``, within ``horizon``."""
    current: datetime | None = trigger.get_next_fire_time(None, now - horizon)
    latest = None
    while current is not None and current <= now:
        latest = current
        # Step in UTC: wall-clock arithmetic on the local time drops ``fold``, so on the
        # night clocks go back, 02:30 (second time) + 1 s became 02:30:01 (first time),
        # before the slot just found, and the loop never ended.
        after = current.astimezone(UTC) + timedelta(seconds=1)
        current = trigger.get_next_fire_time(current, after)
    return latest


def slot_key(slot: datetime) -> str:
    """The digest key of a cron slot: the same instant gives the same key on any worker."""
    return f"scheduled:{slot.astimezone(UTC).isoformat()}"


def missed_slot(service: Service, now: datetime) -> datetime | None:
    """A digest slot that passed while the service was down, if one must still be sent.

    Only slots after the service first started count: installing clusterfeed today must
    not send yesterday's digest.
    """
    first = service.store.setting_or_create(STARTED_KEY, lambda: now.isoformat())
    first_started = datetime.fromisoformat(first)
    trigger = digest_trigger(service.config.schedule.digest_cron, service.config.schedule.timezone)
    slot = latest_slot(trigger, now)
    if slot is None or slot < first_started:
        return None
    if service.store.digest_exists(slot_key(slot)):
        return None
    return slot


async def _fetch_and_publish(service: Service) -> None:
    try:
        report = await cycle(service, due_only=True)
        outcomes = report.feeds
        failed = sum(1 for o in outcomes if o.state == "failed")
        statuses = await asyncio.to_thread(service.store.feed_statuses, None, with_counts=False)
        due = cycle_line(
            statuses,
            {f.name for f in service.config.feeds if f.enabled},
            {o.name for o in outcomes},
            failed,
            service.clock(),
            service.config.schedule.timezone,
        )
        published = report.publish
        log.info(
            "fetch cycle: %s; feed %s (%s written, %d unchanged)",
            due,
            "updated" if service.feed_path() in published.written else "unchanged",
            plural(len(published.written), "file"),
            len(published.unchanged),
        )
        if report.retries is not None:
            log.info(
                "deferred deliveries: %d sent, %d deferred again, %d failed",
                report.retries.sent,
                report.retries.retry,
                report.retries.failed,
            )
    except (TemplateProblem, jinja2.TemplateError) as exc:  # the operator's to fix
        problem = exc if isinstance(exc, TemplateProblem) else describe(exc)
        log.error("fetch cycle stopped, a template cannot be rendered: %s", problem)
    except Exception:  # a job must never take the scheduler down
        log.exception("fetch cycle failed")


async def _digest(service: Service, slot: datetime) -> None:
    try:
        run = await digest_run(service, slot_key(slot), slot)
        log.info(
            "digest %s: %s, %s planned, %d sent, %d deferred, %d failed",
            slot.isoformat(),
            "built" if run.created else "already built",
            plural(run.planned, "delivery"),
            run.send.sent,
            run.send.retry,
            run.send.failed,
        )
    except TemplateProblem as exc:  # the operator's to fix: a sentence, no traceback
        log.error(
            "digest for %s not sent (no attempt counted), a template cannot be rendered: %s",
            slot.isoformat(),
            exc,
        )
    except Exception:
        log.exception("digest for %s failed", slot.isoformat())


async def run_forever(service: Service, stop: asyncio.Event | None = None) -> None:
    """Run the jobs until SIGTERM or SIGINT, then let the job in flight finish."""
    cfg = service.config
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    in_flight: set[asyncio.Task[None]] = set()

    def track(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        return task

    scheduler = AsyncIOScheduler(timezone=cfg.schedule.timezone)
    trigger = digest_trigger(cfg.schedule.digest_cron, cfg.schedule.timezone)

    # Shielded, so a shutdown never cancels a job half-way: it is awaited instead.
    async def fetch_job() -> None:
        await asyncio.shield(track(_fetch_and_publish(service)))

    async def digest_job() -> None:
        slot = latest_slot(trigger, service.clock()) or service.clock()
        await asyncio.shield(track(_digest(service, slot)))

    scheduler.add_job(
        fetch_job,
        IntervalTrigger(minutes=cfg.schedule.fetch_interval_minutes),
        id="fetch",
        max_instances=1,
        coalesce=True,
        misfire_grace_time=None,
        next_run_time=datetime.now(trigger.timezone),
    )
    scheduler.add_job(
        digest_job, trigger, id="digest", max_instances=1, coalesce=True, misfire_grace_time=3600
    )

    missed = missed_slot(service, service.clock())
    if missed is not None:
        log.info(
            "a digest was due at %s while clusterfeed was not running: sending it now",
            missed.isoformat(),
        )
        track(_digest(service, missed))

    scheduler.start()
    log.info(
        "clusterfeed running: fetching every %d min, digest on '%s' (%s); Ctrl-C stops",
        cfg.schedule.fetch_interval_minutes,
        cfg.schedule.digest_cron,
        cfg.schedule.timezone,
    )
    try:
        await stop.wait()
    finally:
        log.info("stopping: finishing the work in flight")
        scheduler.shutdown(wait=False)
        if in_flight:
            await asyncio.gather(*list(in_flight), return_exceptions=True)
        log.info("stopped cleanly")
