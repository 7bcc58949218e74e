"""Which feeds the operator must hear about, as one pure function.

A communications manager cannot watch ``clusterfeed status`` every day, so trouble
comes to them by mail: a feed that has failed for longer than ``alerts.failing_hours``,
one that has published nothing for ``alerts.silent_days``, one that is gone (410) or
has moved for good. Each alert carries an *incident* key that stays the same for as
long as the trouble lasts and changes when new trouble starts, so the store can send it
once per incident rather than once per cycle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime

from clusterfeed.model import FeedStatus


@dataclass(frozen=True)
class Alert:
    feed_name: str
    incident: str
    subject: str
    body: str


def _hours(delta: timedelta) -> str:
    hours = delta.total_seconds() / 3600
    return f"{hours:.0f} hours" if hours < 72 else f"{hours / 24:.0f} days"


def feed_alerts(
    statuses: Iterable[FeedStatus],
    now: datetime,
    *,
    failing_for: timedelta,
    silent_for: timedelta,
) -> list[Alert]:
    """Every alert-worthy condition of every feed right now (sent or not)."""
    alerts: list[Alert] = []
    for s in statuses:
        where = f"Feed: {s.name}\nURL: {s.url}\n"
        if s.state == "gone":
            since = s.failing_since or s.last_attempt_at or now
            alerts.append(
                Alert(
                    s.name,
                    f"gone:{since.isoformat()}",
                    f"Feed '{s.name}' is gone (HTTP 410)",
                    f"{where}\nThe partner's server says this feed no longer exists "
                    "(HTTP 410 Gone), so clusterfeed has stopped asking for it.\n\n"
                    "What to do: ask the partner for the new address and put it into the "
                    "config as url, or remove the feed from the config.\n",
                )
            )
        elif s.state == "failing" and s.failing_since and now - s.failing_since >= failing_for:
            alerts.append(
                Alert(
                    s.name,
                    f"failing:{s.failing_since.isoformat()}",
                    f"Feed '{s.name}' has failed for {_hours(now - s.failing_since)}",
                    f"{where}\nEvery attempt since {s.failing_since:%Y-%m-%d %H:%M} UTC has "
                    f"failed ({s.consecutive_failures} in a row). The last error was:\n\n"
                    f"    {s.last_error}\n\n"
                    "clusterfeed keeps trying, less often (at most once a day), and returns to "
                    "normal by itself after one success. If the problem persists, check the "
                    "URL in a browser and contact the partner's web team.\n",
                )
            )
        if s.moved_to:
            alerts.append(
                Alert(
                    s.name,
                    f"moved:{s.moved_to}",
                    f"Feed '{s.name}' has moved",
                    f"{where}\nThe server answers with a permanent redirect to\n\n"
                    f"    {s.moved_to}\n\n"
                    "clusterfeed uses the new address already. Update the url in the config "
                    "so the old address can be retired.\n",
                )
            )
        if (
            s.state == "ok"
            and s.newest_entry_at is not None
            and now - s.newest_entry_at >= silent_for
        ):
            alerts.append(
                Alert(
                    s.name,
                    f"silent:{s.newest_entry_at.isoformat()}",
                    f"Feed '{s.name}' has published nothing for {_hours(now - s.newest_entry_at)}",
                    f"{where}\nThe feed answers, but its newest item is from "
                    f"{s.newest_entry_at:%Y-%m-%d}. The partner may have moved its news "
                    "elsewhere or stopped updating the feed: worth a look at their web site.\n",
                )
            )
    return alerts


def alert_message(
    alert: Alert, *, sender: str, to: str, cluster_name: str, now: datetime
) -> EmailMessage:
    """A plain-text mail to the operator; its Message-ID is fixed by the incident."""
    from clusterfeed.digest.digest import address, one_line

    msg = EmailMessage()
    msg["From"] = address(sender)
    msg["To"] = address(to)
    msg["Subject"] = one_line(f"[{cluster_name} news] {alert.subject}")
    msg["Date"] = format_datetime(now)
    domain = address(sender).domain or "clusterfeed.invalid"
    msg["Message-ID"] = f"<alert.{alert_key(alert)}@{domain}>"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(
        f"{alert.body}\nSee all feeds with: clusterfeed status\n\n"
        "-- \nThis message was sent by clusterfeed to the address in [alerts] email.\n"
        "It is sent once per incident.\n",
        charset="utf-8",
    )
    return msg


def alert_key(alert: Alert) -> str:
    """A file-name and Message-ID safe key for one incident of one feed."""
    return (
        "alert" + hashlib.sha256(f"{alert.feed_name}\x1f{alert.incident}".encode()).hexdigest()[:24]
    )
