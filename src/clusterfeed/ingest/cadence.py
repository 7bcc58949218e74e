"""How often feeds are asked: the configured interval applied to the stored schedule,
and the scheduler's account of which feeds were due.

Each feed's next attempt is stored when it is asked (see ``polling``). An operator who
shortens ``schedule.fetch_interval_minutes`` expects the new interval at the next
start, not after every feed has waited out a time computed with the old one; and a
cycle that asks no feed should say why, not just "0 feeds".
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from clusterfeed.ingest.polling import rescheduled
from clusterfeed.model import FeedStatus
from clusterfeed.store import Store
from clusterfeed.words import plural

# The interval the stored next attempts were computed with.
INTERVAL_KEY = "fetch_interval_minutes"


def inferred_interval(statuses: Sequence[FeedStatus]) -> timedelta | None:
    """For a store from before the interval was recorded: the shortest wait of a feed
    that was fine, which is the interval unless every server asked for longer."""
    waits = [
        s.next_attempt_at - s.last_attempt_at
        for s in statuses
        if s.state == "ok" and s.next_attempt_at and s.last_attempt_at
    ]
    return min(waits) if waits else None


def shortened(
    statuses: Sequence[FeedStatus], old: timedelta, new: timedelta
) -> dict[str, datetime | None]:
    """The feeds whose next attempt moves under the new interval, and to when."""
    moved: dict[str, datetime | None] = {}
    for s in statuses:
        when = rescheduled(
            next_attempt=s.next_attempt_at,
            last_attempt=s.last_attempt_at,
            state=s.state,
            last_status=s.last_status,
            failures=s.consecutive_failures,
            old_interval=old,
            new_interval=new,
        )
        if when != s.next_attempt_at:
            moved[s.name] = when
    return moved


def apply_interval(store: Store, minutes: int) -> int:
    """Bring the stored next attempts in line with the configured interval; at start-up.

    Returns how many feeds were moved earlier. The interval is recorded, so the next
    start knows what the stored times were computed with.
    """
    recorded = store.get_setting(INTERVAL_KEY)
    new = timedelta(minutes=minutes)
    if recorded is not None and recorded == str(minutes):
        return 0
    statuses = store.feed_statuses(with_counts=False)
    old = timedelta(minutes=int(recorded)) if recorded else inferred_interval(statuses)
    moved = shortened(statuses, old, new) if old is not None else {}
    store.reschedule({name: when for name, when in moved.items() if when is not None})
    store.put_setting(INTERVAL_KEY, str(minutes))
    return len(moved)


_WAITING = {
    "ok": "waiting for their interval",
    "failing": "backing off after errors",
    "gone": "stopped (410 Gone)",
    "new": "not asked yet",
}


def cycle_line(
    statuses: Sequence[FeedStatus],
    enabled: Collection[str],
    asked: Collection[str],
    failed: int,
    now: datetime,
    timezone: str,
) -> str:
    """The start of the scheduler's log line for one fetch cycle.

    "0 of 9 feeds due (9 waiting for their interval); next at 14:32" says why nothing
    was asked and when something will be; the time is in the schedule's time zone.
    """
    feeds = [s for s in statuses if s.name in enabled]
    waiting: dict[str, int] = {}
    for s in feeds:
        if s.name not in asked:
            waiting[s.state] = waiting.get(s.state, 0) + 1
    text = f"{len(asked)} of {plural(len(feeds), 'feed')} due"
    if waiting:
        text += " (" + ", ".join(f"{n} {_WAITING.get(k, k)}" for k, n in waiting.items()) + ")"
    text += f", {failed} failed"
    upcoming = [s.next_attempt_at for s in feeds if s.state != "gone" and s.next_attempt_at]
    if upcoming:
        zone = ZoneInfo(timezone)
        at = min(upcoming).astimezone(zone)
        same_day = at.date() == now.astimezone(zone).date()
        text += "; next at " + at.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M")
    return text
