"""When mail goes out: the delay before a retry, when to give up, the sending rate.

A mail server that answers 4xx or drops the connection is asked again after a growing
delay with jitter, so a relay that was down is not hit by every delivery at once when
it comes back; after ``max_age`` the delivery fails with a reason the operator can read.
A relay's limit on messages per minute is kept by one token bucket that every
connection shares. The clock and the sleep are arguments, so tests never wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from clusterfeed.config import MailConfig
from clusterfeed.store import Delivery


@dataclass(frozen=True)
class RetryPolicy:
    """How long a temporary refusal waits, and when waiting is no longer worth it."""

    first: timedelta = timedelta(minutes=5)
    factor: float = 3.0
    longest: timedelta = timedelta(hours=4)
    jitter: float = 0.1
    attempts: int = 8
    max_age: timedelta = timedelta(hours=48)

    @classmethod
    def from_config(cls, cfg: MailConfig) -> RetryPolicy:
        return cls(
            first=timedelta(minutes=cfg.retry_first_minutes),
            factor=cfg.retry_factor,
            longest=timedelta(minutes=cfg.retry_max_minutes),
            jitter=cfg.retry_jitter,
            attempts=cfg.retry_attempts,
            max_age=timedelta(hours=cfg.retry_hours),
        )


def next_attempt(
    policy: RetryPolicy,
    attempts: int,
    now: datetime,
    *,
    built_at: datetime | None,
    spread: float,
) -> datetime | None:
    """When to try a temporarily refused delivery again, or None to give up.

    ``attempts`` counts the attempts made so far (this one included); ``spread`` is a
    number in [0, 1) that places the delay within +-jitter, so that deliveries refused
    together (a greylisting server, a full queue) do not all come back at once.
    Growing delays give a busy or greylisting server time; a cap keeps a late message
    from waiting for days, and the age limit drops a digest that is no longer news.
    """
    if attempts >= policy.attempts:
        return None
    base = min(
        policy.first.total_seconds() * policy.factor ** max(0, attempts - 1),
        policy.longest.total_seconds(),
    )
    delay = base * (1 + policy.jitter * (2 * spread - 1))
    when = now + timedelta(seconds=delay)
    if built_at is not None and when - built_at > policy.max_age:
        return None
    return when


def give_up_reason(delivery: Delivery, attempts: int, policy: RetryPolicy, error: str) -> str:
    if attempts >= policy.attempts:
        return f"gave up after {attempts} attempts: {error}"
    hours = policy.max_age.total_seconds() / 3600
    return f"gave up after {attempts} attempts ({hours:g} h retry limit reached): {error}"


class RateLimiter:
    """A token bucket shared by all connections: on average ``per_second`` messages, at
    most ``burst`` back to back.

    Each caller reserves the next free slot before it sleeps, so concurrent callers are
    spaced without a lock and the order is first come, first served. The clock and the
    sleep are passed in so that tests can drive it without waiting.
    """

    def __init__(
        self,
        per_second: float,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.interval = 1.0 / per_second
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def acquire(self) -> float:
        """Wait for a slot; returns when it was granted, on the limiter's clock."""
        now = self._clock()
        # Unused tokens pile up to ``burst``, never more.
        earliest = now - (self.burst - 1) * self.interval
        slot = earliest if self._next is None else max(self._next, earliest)
        self._next = slot + self.interval
        if slot > now:
            await self._sleep(slot - now)
        return max(slot, now)
