"""The task queue of the workers, read for the operator: procrastinate's own table.

``clusterfeed worker`` and ``clusterfeed scheduler`` keep their queue in
``procrastinate_jobs`` (and each job's history in ``procrastinate_events``), in the
store's PostgreSQL database. clusterfeed never writes these tables; it reads them here
so ``/metrics`` can say how much work waits, how long the oldest has waited, and how
much failed, per unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import text

from clusterfeed.store.base import StoreBase

# One pass over the unfinished and failed jobs (finished ones are deleted by the
# workers). A job waits since it was queued, queued again after its worker died
# ("deferred_for_retry", "retried"), or since the time it was scheduled for, whichever
# is last; a job scheduled for later is not waiting yet. The events are looked up for
# waiting jobs only (by procrastinate's index on job_id).
_QUEUE_SQL = text(
    """
    SELECT j.task_name,
           count(*) FILTER (WHERE j.status = 'todo') AS todo,
           count(*) FILTER (WHERE j.status = 'doing') AS doing,
           count(*) FILTER (WHERE j.status = 'failed') AS failed,
           coalesce(max(extract(epoch FROM now() - greatest(w.since, j.scheduled_at)))
                    FILTER (WHERE j.status = 'todo'
                            AND (j.scheduled_at IS NULL OR j.scheduled_at <= now())), 0)
               AS oldest_waiting_seconds
    FROM procrastinate_jobs AS j
    LEFT JOIN LATERAL (
        SELECT max(e.at) AS since
        FROM procrastinate_events AS e
        WHERE j.status = 'todo' AND e.job_id = j.id
          AND e.type IN ('deferred', 'deferred_for_retry', 'retried')
    ) AS w ON true
    WHERE j.status IN ('todo', 'doing', 'failed')
    GROUP BY j.task_name
    """
)


@dataclass(frozen=True)
class TaskQueueCounts:
    """The queue of one task (a unit such as ``clusterfeed.fetch``) at this moment."""

    task: str
    todo: int
    doing: int
    failed: int
    oldest_waiting_seconds: float


class TaskQueueMixin(StoreBase):
    """Reading the workers' task queue (procrastinate's tables)."""

    def task_queue(self) -> list[TaskQueueCounts] | None:
        """Each task's queue, or None where there is no queue: on SQLite, or on a
        PostgreSQL database where no worker or scheduler has started yet."""
        if self.engine.dialect.name != "postgresql":
            return None
        with self.engine.connect() as conn:
            made = conn.execute(text("SELECT to_regclass('procrastinate_jobs') IS NOT NULL"))
            if not made.scalar():
                return None
            rows = conn.execute(_QUEUE_SQL).all()
        return [
            TaskQueueCounts(
                task=str(r.task_name),
                todo=int(r.todo),
                doing=int(r.doing),
                failed=int(r.failed),
                oldest_waiting_seconds=max(0.0, float(r.oldest_waiting_seconds)),
            )
            for r in rows
        ]
