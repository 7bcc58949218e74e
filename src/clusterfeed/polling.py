"""When to ask a partner's server again: the politeness rules, as one pure function.

Partner sites are run by small companies and hospitals on shared hosting. A feed that
fails is asked less and less often (doubling, with jitter so that many failing feeds
on one host do not retry in step), but never less than once a day, and it returns to
the normal interval after one success: we never give up on a feed without telling the
operator. A server that says how long to wait (Retry-After on 429/503) or how long its
answer stays fresh (Cache-Control max-age) is believed, within the same one-day cap.
Only 410 Gone stops polling, and the operator sees that in ``clusterfeed status``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

MAX_DELAY = timedelta(days=1)
JITTER = 0.2


@dataclass(frozen=True)
class PollDecision:
    """The feed's state after an attempt, and when to try next (None: stop polling)."""

    state: str  # "ok", "failing" or "gone"
    next_attempt: datetime | None


def backoff(interval: timedelta, failures: int, rng: random.Random) -> timedelta:
    """The wait after ``failures`` consecutive failures: the interval, doubled per
    further failure, with ±20 % jitter, capped at one day."""
    base = min(interval * (1 << min(max(failures - 1, 0), 20)), MAX_DELAY)
    jittered = base * (1 + rng.uniform(-JITTER, JITTER))
    return min(max(jittered, interval), MAX_DELAY)


def next_poll(
    *,
    now: datetime,
    interval: timedelta,
    ok: bool,
    status: int | None,
    failures: int,
    retry_after: float | None = None,
    max_age: int | None = None,
    rng: random.Random | None = None,
) -> PollDecision:
    """Decide the next attempt for one feed from the outcome of this one.

    ``failures`` counts consecutive failures including this attempt (0 after a success).
    """
    rng = rng or random.Random()
    if ok:
        wait = interval
        if max_age is not None:
            wait = max(wait, min(timedelta(seconds=max_age), MAX_DELAY))
        return PollDecision("ok", now + wait)
    if status == 410:
        return PollDecision("gone", None)
    wait = backoff(interval, failures, rng)
    if status in (429, 503) and retry_after is not None:
        wait = min(max(wait, timedelta(seconds=retry_after)), MAX_DELAY)
    return PollDecision("failing", now + wait)
