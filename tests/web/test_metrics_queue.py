"""/metrics and the workers' task queue: what waits, for how long, and what failed, per unit.

On PostgreSQL the queue is procrastinate's table in the store's database; real jobs are
queued with the project's own procrastinate app and read back over real HTTP. On SQLite
there is no queue, and the metrics are absent (not a misleading 0).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import RunningServer, write_config


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _queue_metrics(web: RunningServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = web.get("/metrics")
    assert response.status_code == 200
    return {k: v for k, v in _samples(response.text).items() if k[0].startswith("clusterfeed_task")}


def _jobs(task: str, state: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("clusterfeed_tasks", (("state", state), ("task", task)))


def _one(name: str, task: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return (name, (("task", task),))


def test_metrics_show_the_task_queue_per_unit_on_postgresql_and_nothing_on_sqlite(
    tmp_path: Path, database_url: str, open_service: Any
) -> None:
    config = write_config(tmp_path, [{"name": "A", "url": "https://a.example/feed"}],
                          database_url=database_url)  # fmt: skip
    service = open_service(config)
    web = RunningServer(service)
    try:
        # No queue yet: SQLite never has one; on PostgreSQL no worker has started.
        assert _queue_metrics(web) == {}
        assert "clusterfeed_items 0.0" in web.get("/metrics").text  # the rest is there
        if not database_url.startswith("postgresql"):
            return

        from clusterfeed.app.workers import DELIVER, FETCH, defer, ensure_schema, make_app

        async def queue_jobs() -> None:
            app = make_app(service)
            async with app.open_async():
                await ensure_schema(app)
                # A fetch task without its argument fails when a worker runs it.
                await defer(app, FETCH)
                await app.run_worker_async(
                    queues=["fetch"], wait=False, install_signal_handlers=False
                )
                for feed in ("A", "B"):
                    await defer(app, FETCH, queueing_lock=f"fetch:{feed}", kwargs={"feed": feed})
                await defer(app, DELIVER)

        asyncio.run(queue_jobs())
        # One of the fetches has waited ten minutes (no test sleeps that long).
        with service.store.engine.begin() as conn:
            conn.exec_driver_sql(
                "UPDATE procrastinate_events SET at = now() - interval '10 minutes' "
                "WHERE type = 'deferred' AND job_id = (SELECT min(id) FROM procrastinate_jobs "
                "WHERE status = 'todo' AND task_name = 'clusterfeed.fetch')"
            )

        metrics = _queue_metrics(web)
    finally:
        web.stop()

    assert metrics[_jobs("fetch", "todo")] == 2
    assert metrics[_jobs("fetch", "doing")] == 0
    assert metrics[_jobs("deliver", "todo")] == 1
    assert metrics[_jobs("publish", "todo")] == 0  # every unit shows, queued or not
    assert metrics[_one("clusterfeed_tasks_failed", "fetch")] == 1
    assert metrics[_one("clusterfeed_tasks_failed", "deliver")] == 0
    fetch_wait = metrics[_one("clusterfeed_task_oldest_waiting_seconds", "fetch")]
    assert 600 <= fetch_wait < 900
    assert 0 <= metrics[_one("clusterfeed_task_oldest_waiting_seconds", "deliver")] < 300
    assert metrics[_one("clusterfeed_task_oldest_waiting_seconds", "match")] == 0
