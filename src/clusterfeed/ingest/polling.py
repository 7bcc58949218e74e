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


# Stored times lose nothing, but leave a second for rounding in databases that do.
_SLACK = timedelta(seconds=1)


def rescheduled(
    *,
    next_attempt: datetime | None,
    last_attempt: datetime | None,
    state: str,
    last_status: int | None,
    failures: int,
    old_interval: timedelta,
    new_interval: timedelta,
) -> datetime | None:
    """A stored next attempt under a shorter configured interval.

    The next attempt is stored when a feed is asked, so an operator who shortens
    ``schedule.fetch_interval_minutes`` would otherwise wait out every time computed
    with the old one. Only the part of the wait that came from our own interval
    shrinks: a wait longer than the old interval (or the old back-off) can only have
    come from the server (Cache-Control max-age, Retry-After) and is kept; a feed that
    was told 429 or 503 keeps its wait, which Retry-After may have set; a failing feed
    keeps backing off, doubled from the new interval. Never later than it was.
    """
    if (
        next_attempt is None
        or last_attempt is None
        or state == "gone"
        or new_interval >= old_interval
    ):
        return next_attempt
    waited = next_attempt - last_attempt
    if state != "failing":
        if waited > old_interval + _SLACK:
            return next_attempt  # the server's max-age decided
        return min(next_attempt, last_attempt + new_interval)
    if last_status in (429, 503):
        return next_attempt
    longest = min(old_interval * (1 << min(max(failures - 1, 0), 20)) * (1 + JITTER), MAX_DELAY)
    if waited > longest + _SLACK:
        return next_attempt
    scaled = max(waited * (new_interval / old_interval), new_interval)
    return min(next_attempt, last_attempt + scaled)
