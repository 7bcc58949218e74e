"""Hand digests to a mail transport, each exactly once.

The outbox lives in the store: one row per (digest, subscriber). A worker claims rows,
renders each message, hands it to the transport and records the acceptance, in that
order, one commit per message. If the process dies, the next start releases its
claims: a Maildir delivery can be checked on disk (its file name carries the
delivery's key), so it is exactly-once; an SMTP server's acceptance cannot be checked
afterwards, so the only message that can arrive twice is one accepted in the instant
between the server's "250 OK" and the store's commit, at most one per open connection.

A refusal decides what happens next: a 4xx answer or a lost connection comes back
after a growing delay (``pacing.next_attempt``), a 5xx answer fails the delivery at
once and counts against the address, which is marked bouncing after ``bounce_after``
in a row.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from clusterfeed.delivery.pacing import RetryPolicy, give_up_reason, next_attempt
from clusterfeed.delivery.transports import (
    Outgoing,
    PermanentFailure,
    SetupFailure,
    TemporaryFailure,
    Transport,
    delivery_token,
)
from clusterfeed.store import Delivery, Store, StoreError, worker_id

log = logging.getLogger(__name__)

CLAIM_LEASE = timedelta(minutes=15)
# Rows claimed per store transaction; a dead process's claims are released on restart,
# so the batch size changes speed, never what is delivered.
CLAIM_BATCH = 50


@dataclass
class SendReport:
    sent: int = 0
    retry: int = 0
    failed: int = 0
    skipped: int = 0
    bouncing: list[str] | None = None


async def deliver_pending(
    store: Store,
    transport: Transport,
    compose: Callable[[Delivery], Outgoing],
    *,
    clock: Callable[[], datetime],
    render: Callable[[Delivery], Awaitable[Outgoing]] | None = None,
    ahead: int | None = None,
    policy: RetryPolicy | None = None,
    bounce_after: int = 3,
    spread: Callable[[], float] = random.random,
    on_progress: Callable[[Delivery, str], None] | None = None,
    batches: int | None = None,
) -> SendReport:
    """Send every delivery that is due; safe to run in several processes at once.

    ``batches`` stops after claiming that many batches of ``CLAIM_BATCH`` rows: a task
    worker sends one batch per task, so a worker that dies holds one batch's claims.

    One task claims rows in batches and has up to ``ahead`` of them rendered at once
    (``compose`` in a thread, or ``render``, e.g. in worker processes), in outbox
    order; one task per connection sends and records each answer before it takes the
    next message. Memory holds one claimed batch and a few rendered messages, however
    long the outbox is.
    """
    policy = policy or RetryPolicy()
    report = SendReport(bouncing=[])

    def recover() -> int:
        return store.recover_claims(
            clock(), CLAIM_LEASE, lambda d: transport.is_delivered(delivery_token(d))
        )

    recover()
    # One owner per run: the scheduler may send retries while a digest is going out in
    # the same process, and each run gives back only its own unfinished claims.
    me = f"{worker_id()}/{secrets.token_hex(4)}"
    connections = max(1, transport.connections)
    queue: asyncio.Queue[tuple[Delivery, Outgoing] | None] = asyncio.Queue(maxsize=2 * connections)
    window = max(1, ahead or 2)

    def start(delivery: Delivery) -> asyncio.Future[Outgoing]:
        if render is not None:
            return asyncio.ensure_future(render(delivery))
        return asyncio.ensure_future(asyncio.to_thread(compose, delivery))

    stop = asyncio.Event()
    problems: list[BaseException] = []

    async def produce() -> None:
        rendering: deque[tuple[Delivery, asyncio.Future[Outgoing]]] = deque()

        async def hand_on() -> None:
            delivery, future = rendering.popleft()
            # A template or store problem stops the run loudly. It is no delivery
            # attempt (nothing reached a server): the row goes back uncounted with the
            # other unfinished claims, so a broken template cannot use up the retries.
            message = await future
            await queue.put((delivery, message))

        claimed = 0
        try:
            while not stop.is_set() and (batches is None or claimed < batches):
                batch = store.claim_due(me, clock(), CLAIM_BATCH)
                claimed += 1
                if not batch and not recover():
                    # Nothing due, and no run beside this one died holding claims
                    # meanwhile (if one did, its rows are due again: sent by this run,
                    # not left for the next one).
                    break
                for delivery in batch:
                    if stop.is_set():
                        break
                    rendering.append((delivery, start(delivery)))
                    if len(rendering) >= window:
                        await hand_on()
            while rendering and not stop.is_set():
                await hand_on()
        except BaseException as exc:
            problems.append(exc)
            stop.set()
        finally:
            for _delivery, future in rendering:
                future.cancel()
            for _ in range(connections):
                await queue.put(None)

    def deferred(delivery: Delivery, exc: Exception) -> str:
        attempts = delivery.attempts + 1
        when = next_attempt(
            policy, attempts, clock(), built_at=delivery.digest_created, spread=spread()
        )
        if when is None:
            reason = give_up_reason(delivery, attempts, policy, str(exc))
            store.mark_failed(delivery, reason)
            report.failed += 1
            log.error("delivery to %s failed: %s", delivery.subscriber.email, reason)
            return "failed"
        store.mark_retry(delivery, str(exc), when)
        report.retry += 1
        log.warning(
            "delivery to %s deferred until %s (attempt %d of %d): %s",
            delivery.subscriber.email,
            when.isoformat(timespec="minutes"),
            attempts,
            policy.attempts,
            exc,
        )
        return "retry"

    def refused(delivery: Delivery, exc: PermanentFailure) -> str:
        email = delivery.subscriber.email
        now_bouncing = store.mark_failed(
            delivery,
            str(exc),
            refused_address=exc.address,
            now=clock(),
            bounce_after=bounce_after,
        )
        report.failed += 1
        log.error("delivery to %s failed: %s", email, exc)
        if now_bouncing:
            assert report.bouncing is not None
            report.bouncing.append(email)
            log.error(
                "%s refused %d messages in a row and is now marked bouncing: later digests "
                "skip it until you run `clusterfeed bounces clear %s` (last answer: %s)",
                email,
                bounce_after,
                email,
                exc,
            )
        return "failed"

    async def send(slot: int) -> None:
        # Runs until the producer's end marker, even after a problem (then only
        # draining the queue), so the producer never waits on a full queue.
        while True:
            item = await queue.get()
            if item is None:
                return
            delivery, message = item
            if stop.is_set():
                continue  # left claimed; released below
            try:
                await transport.send(message, delivery_token(delivery), slot)
            except TemporaryFailure as exc:
                outcome = deferred(delivery, exc)
            except SetupFailure as exc:
                # The server refuses us, not this address: no attempt is counted.
                store.release_claim(delivery, str(exc))
                problems.append(exc)
                stop.set()
                continue
            except PermanentFailure as exc:
                outcome = refused(delivery, exc)
            except Exception as exc:
                problems.append(exc)
                stop.set()
                continue
            else:
                # Before this worker takes its next message: the duplicate window.
                try:
                    recorder.record(delivery, clock(), claimed_by=me)
                except StoreError as exc:
                    # The database failed: stop every connection cleanly (this row goes
                    # back to the queue with the others) and report it.
                    problems.append(exc)
                    stop.set()
                    continue
                report.sent += 1
                outcome = "sent"
            if on_progress is not None:
                on_progress(delivery, outcome)

    recorder = store.sent_recorder()
    try:
        await asyncio.gather(produce(), *(send(i) for i in range(connections)))
    finally:
        recorder.close()
        await transport.close()
        # Rows claimed but never handed over (the run stopped early) wait again.
        store.release_claims(me)
    if problems:
        raise problems[0]
    return report
