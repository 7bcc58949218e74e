"""The units as tasks of procrastinate, for many worker processes on PostgreSQL.

``clusterfeed worker`` runs tasks; ``clusterfeed scheduler`` queues them. procrastinate
keeps its queue in the same PostgreSQL database as the store, so there is no broker to
run, and it gives the two guarantees the units need across processes and machines:

- a *queueing lock* per feed (and per digest slot): a feed is never queued twice;
- a *lock* per feed (and on matching, publishing, planning): two workers never run
  the same feed's fetch, or two plans, at once.

A worker killed mid-task stops sending heartbeats; after ``workers.stalled_after_seconds``
the scheduler puts its task back in the queue (or, when an identical task is already
queued, marks the dead one failed), and another worker finishes it. The units are keyed
in the store, so running one again does no harm: a fetched feed is no longer due, a
planned digest key exists, a sent delivery is no longer due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import signal
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import make_url

from clusterfeed.app import units
from clusterfeed.app.schedule import missed_slot, slot_key
from clusterfeed.app.service import Service
from clusterfeed.delivery.outbox import CLAIM_BATCH
from clusterfeed.store import worker_id

if TYPE_CHECKING:
    import procrastinate

log = logging.getLogger(__name__)

FETCH = "clusterfeed.fetch"
MATCH = "clusterfeed.match"
PUBLISH = "clusterfeed.publish"
PLAN = "clusterfeed.plan_digest"
DELIVER = "clusterfeed.deliver"
# Every unit the workers run, for /metrics: a unit with nothing queued shows 0.
TASKS = (FETCH, MATCH, PUBLISH, PLAN, DELIVER)

MATCHED_KEY = "workers_matched_through"
# Items are matched from a little before the last match started: an item stored by a
# fetch that committed while that match read is then not missed (matching an item again
# changes nothing, see ``units.match_new``).
MATCH_OVERLAP = timedelta(minutes=5)


class NeedsPostgres(Exception):
    """Workers were asked for where they cannot run; the message says what to do."""


def conninfo(database_url: str) -> str:
    """The store's SQLAlchemy URL as a libpq connection string for procrastinate."""
    url = make_url(database_url)
    if url.get_backend_name() != "postgresql":
        raise NeedsPostgres(
            f"workers need PostgreSQL as the store, and [store] url is "
            f"{database_url.split('://')[0]}://...; set it to "
            "postgresql+psycopg://USER@HOST:5432/DB (the task queue lives in the same "
            "database) and install the extra: pip install 'clusterfeed[workers]'. "
            "Or run everything in one process with `clusterfeed run`"
        )
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def _procrastinate() -> Any:
    try:
        import procrastinate
    except ImportError as exc:  # the optional extra
        raise NeedsPostgres(
            "workers need the procrastinate package: pip install 'clusterfeed[workers]'"
        ) from exc
    return procrastinate


def make_app(service: Service, pool_size: int = 4) -> procrastinate.App:
    """A procrastinate app on the store's database, with the units as its tasks."""
    pc = _procrastinate()
    connector = pc.PsycopgConnector(
        conninfo=conninfo(service.config.database_url), min_size=1, max_size=pool_size
    )
    app: procrastinate.App = pc.App(connector=connector)

    @app.task(name=FETCH, queue="fetch")
    async def fetch(feed: str) -> None:
        # due_only: a task run again (its worker died after storing) finds the feed
        # fetched, not due, and asks nothing.
        outcomes = await units.fetch_feeds(service, [feed], due_only=True)
        if any(o.new_entries for o in outcomes):
            await defer(app, MATCH, queueing_lock="match", lock="stories")

    @app.task(name=MATCH, queue="stories")
    async def match() -> None:
        started = service.clock()
        mark = await asyncio.to_thread(service.store.get_setting, MATCHED_KEY)
        interval = timedelta(minutes=service.config.schedule.fetch_interval_minutes)
        since = datetime.fromisoformat(mark) if mark else started - interval
        await units.match_new(service, since - MATCH_OVERLAP)
        await asyncio.to_thread(service.store.put_setting, MATCHED_KEY, started.isoformat())
        await defer(app, PUBLISH, queueing_lock="publish", lock="publish")

    @app.task(name=PUBLISH, queue="publish")
    async def publish() -> None:
        await units.publish(service)
        await units.send_alerts(service)

    @app.task(name=PLAN, queue="digest")
    async def plan_digest(slot: str) -> None:
        at = datetime.fromisoformat(slot)
        created, planned = await asyncio.to_thread(units.plan_digest, service, slot_key(at), at)
        log.info("digest %s: %s, %d deliveries planned", slot, "built" if created else "exists",
                 planned)  # fmt: skip
        # Counted from the outbox, not from ``planned``: a plan run again after its
        # worker died plans nothing, and its deliveries must still be queued.
        due = await asyncio.to_thread(service.store.count_due, service.clock())
        batches = math.ceil(due / CLAIM_BATCH)
        if batches:
            await app.configure_task(DELIVER).batch_defer_async(*([{}] * batches))

    sending = asyncio.Lock()

    @app.task(name=DELIVER, queue="mail")
    async def deliver() -> None:
        # Sending composes and records on its own thread and event loop: on the worker's
        # loop it held up the heartbeats, and a busy worker was taken for dead. One
        # batch at a time per process (a sending run keeps its renderings on the
        # service); the other workers send theirs meanwhile.
        async with sending:
            report = await asyncio.to_thread(asyncio.run, units.deliver(service, batches=1))
        if report.sent or report.failed or report.retry:
            log.info("delivered a batch: %d sent, %d deferred, %d failed",
                     report.sent, report.retry, report.failed)  # fmt: skip

    del fetch, match, publish, plan_digest, deliver  # registered on the app by name
    return app


async def defer(app: procrastinate.App, task: str, **options: Any) -> bool:
    """Queue ``task`` once: False when its queueing lock says it is queued already."""
    pc = _procrastinate()
    kwargs = options.pop("kwargs", {})
    try:
        await app.configure_task(task, **options).defer_async(**kwargs)
    except pc.exceptions.AlreadyEnqueued:
        return False
    return True


async def ensure_schema(app: procrastinate.App) -> None:
    """Create procrastinate's tables when the database has none yet.

    Workers and the scheduler may start together: one creates them, the others find
    them made (the schema is applied in one transaction).
    """
    exists = "SELECT to_regclass('procrastinate_jobs') IS NOT NULL AS made"
    row = await app.connector.execute_query_one_async(exists)
    if row["made"]:
        return
    try:
        await app.schema_manager.apply_schema_async()
        log.info("created the task queue's tables (procrastinate) in the store's database")
    except Exception:
        row = await app.connector.execute_query_one_async(exists)
        if not row["made"]:
            raise


async def run_worker(service: Service, concurrency: int) -> None:
    """Run tasks until SIGTERM or SIGINT (a task in flight is finished first)."""
    cfg = service.config.workers
    app = make_app(service, pool_size=concurrency + 3)
    async with app.open_async():
        await ensure_schema(app)
        log.info("worker %s running %d task(s) at a time; Ctrl-C stops", worker_id(), concurrency)
        await app.run_worker_async(
            concurrency=concurrency,
            name=worker_id(),
            update_heartbeat_interval=cfg.heartbeat_seconds,
            stalled_worker_timeout=cfg.stalled_after_seconds,
            delete_jobs="successful",
            fetch_job_polling_interval=1.0,
        )


async def tick(service: Service, app: procrastinate.App) -> dict[str, int]:
    """One look by the scheduler: stalled tasks back in the queue, due feeds queued, a
    due digest slot queued, leftover deliveries swept. Returns what it queued."""
    queued = {"fetch": 0, "digest": 0, "deliver": 0, "stalled": 0}
    queued["stalled"] = await retry_stalled(app, service.config.workers.stalled_after_seconds)
    now = service.clock()
    enabled = {f.name for f in service.config.feeds if f.enabled}
    statuses = await asyncio.to_thread(service.store.feed_statuses, now, with_counts=False)
    for status in statuses:
        if status.name in enabled and status.state != "gone" and status.is_due(now):
            lock = f"fetch:{status.name}"
            if await defer(app, FETCH, lock=lock, queueing_lock=lock, kwargs={"feed": status.name}):
                queued["fetch"] += 1
    slot = await asyncio.to_thread(missed_slot, service, now)
    if slot is not None:
        key = slot.isoformat()
        queued["digest"] += await defer(
            app, PLAN, lock="digest", queueing_lock=f"digest:{key}", kwargs={"slot": key}
        )
    counts = await asyncio.to_thread(service.store.delivery_counts)
    # Deferred deliveries that came due, and rows a dead worker held ("sending"): one
    # batch per look, so nothing waits for the next digest.
    if counts.get("sending") or await asyncio.to_thread(service.store.count_due, now):
        queued["deliver"] += await defer(app, DELIVER, queueing_lock="deliver:sweep")
    return queued


async def retry_stalled(app: procrastinate.App, stalled_after: float) -> int:
    """Queue again the tasks of workers that stopped sending heartbeats."""
    pc = _procrastinate()
    manager = app.job_manager
    retried = 0
    for job in await manager.get_stalled_jobs(seconds_since_heartbeat=stalled_after):
        try:
            await manager.retry_job(job)
            retried += 1
            log.warning("task %s #%s of a dead worker queued again", job.task_name, job.id)
        except pc.exceptions.UniqueViolation:
            # The same task is queued already (the scheduler queued it meanwhile): that
            # one does the work; the dead worker's copy ends as failed.
            await manager.finish_job(job, status=pc.jobs.Status.FAILED, delete_job=False)
            log.warning("task %s #%s of a dead worker dropped: queued again already",
                        job.task_name, job.id)  # fmt: skip
    return retried


async def run_scheduler(service: Service, stop: asyncio.Event | None = None) -> None:
    """Queue the units when due until SIGTERM or SIGINT; the workers run them."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    cfg = service.config
    app = make_app(service)
    async with app.open_async():
        await ensure_schema(app)
        log.info(
            "scheduler running: feeds due every %d min, digest on '%s' (%s), a look every "
            "%gs; workers run the tasks; Ctrl-C stops",
            cfg.schedule.fetch_interval_minutes,
            cfg.schedule.digest_cron,
            cfg.schedule.timezone,
            cfg.workers.tick_seconds,
        )
        while not stop.is_set():
            try:
                queued = await tick(service, app)
                if any(queued.values()):
                    log.info("queued: %s", ", ".join(f"{v} {k}" for k, v in queued.items() if v))
            except Exception:  # a bad look must not stop the scheduler
                log.exception("scheduler look failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), cfg.workers.tick_seconds)
    log.info("scheduler stopped")
