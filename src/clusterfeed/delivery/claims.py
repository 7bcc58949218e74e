"""Who holds a claim on an outbox row, and when that holder counts as gone.

A sending run claims deliveries under its worker id; if it dies, another run gives
them back (``Store.recover_claims``), which applies ``claim_is_dead``: a decision of
the delivery side, kept out of the store.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import datetime, timedelta

# (claimed_by, claimed_at, lease, now) -> is the holder gone?
ClaimCheck = Callable[[str | None, datetime | None, timedelta, datetime], bool]


def worker_id() -> str:
    """Who holds a claim: host and process, so a restarted process can tell its own dead claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def claim_is_dead(
    claimed_by: str | None, claimed_at: datetime | None, lease: timedelta, now: datetime
) -> bool:
    """True when the claim's holder is gone: a process of this host that no longer
    exists (asked at once, no waiting), or, for another host's claim that this host
    cannot ask about, one older than ``lease``. This process's own claims are alive."""
    if not claimed_by or claimed_at is None:
        return True
    # "host:pid", or "host:pid/run" for one of several sending runs in one process.
    host, _, pid = claimed_by.split("/", 1)[0].rpartition(":")
    if host == socket.gethostname() and pid.isdigit():
        if int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
    return now - claimed_at > lease
