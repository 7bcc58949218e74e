"""The config's subscriber list, mirrored into the store: who is added, who takes the
config's choices, who is confirmed, removed or refused. Consent rules, decided here over
plain data; ``Store.sync_subscribers`` reads the facts and writes the plan.

The operator holds the consent of the subscribers the config lists, so:

* a new address is confirmed at once (the consent log says "config"), unless it was
  erased on request (its keyed hash is on the suppression list): then it is refused;
* a subscriber's own choices survive a restart: the config's preferences are copied
  only when the config changed them since it last gave them;
* someone the config lists who was removed or pending, or who signed up on their own, is
  confirmed (from the config); someone who unsubscribed stays unsubscribed, however often
  the config names them;
* a config subscriber the config no longer lists is removed; their history stays.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from clusterfeed.model import Subscriber


@dataclass(frozen=True)
class StoredSubscriber:
    """What the rules read of an address the store holds."""

    id: int
    status: str  # pending | confirmed | unsubscribed | removed
    origin: str  # config | web | import | cli ...
    paused: bool
    confirmed_at: datetime | None
    config_prefs: Mapping[str, Any] | None


@dataclass(frozen=True)
class SubscriberChange:
    """One write: a new row (``subscriber_id`` None) or new values for one, and the
    consent action to log with ``prefs`` as its choices (None: nothing to log)."""

    email: str
    subscriber_id: int | None
    values: dict[str, Any]
    consent: str | None
    prefs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ConfigSyncPlan:
    changes: list[SubscriberChange]
    refused: list[str]  # erased addresses the config still lists


def preferences(sub: Subscriber) -> dict[str, Any]:
    """The choices the config gives a subscriber, as stored and logged."""
    return {
        "name": sub.name,
        "topics": list(sub.topics),
        "languages": list(sub.languages),
        "frequency": sub.frequency,
    }


def plan_config_sync(
    configured: Sequence[Subscriber],
    stored: Mapping[str, StoredSubscriber],
    suppressed: Collection[str],
    now: datetime,
) -> ConfigSyncPlan:
    """What mirroring ``configured`` into the store writes, in order.

    ``stored``: every address the store holds (by lower-case address) that the config
    lists or that came from the config; ``suppressed``: the listed addresses that are
    new to the store and on the suppression list.
    """
    wanted = {s.email.lower(): s for s in configured}
    changes: list[SubscriberChange] = []
    refused: list[str] = []
    for email, sub in wanted.items():
        prefs = preferences(sub)
        existing = stored.get(email)
        if existing is None:
            if email in suppressed:
                refused.append(email)
                continue
            values = {
                "email": email, "origin": "config", "created_at": now, "status": "confirmed",
                "active": True, "paused": False, "confirmed_at": now, "config_prefs": prefs,
                **prefs,
            }  # fmt: skip
            changes.append(SubscriberChange(email, None, values, "config", prefs))
            continue
        values = {"origin": "config", "config_prefs": prefs}
        if existing.config_prefs != prefs:
            values.update(prefs)
        consent = None
        if existing.status in ("removed", "pending") or (
            existing.status == "confirmed" and existing.origin != "config"
        ):
            values.update(status="confirmed", confirmed_at=existing.confirmed_at or now)
            values["active"] = not existing.paused
            if existing.status != "confirmed" or existing.origin != "config":
                consent = "config"
        changes.append(SubscriberChange(email, existing.id, values, consent, prefs))
    for email, row in stored.items():
        if (
            row.origin == "config"
            and email not in wanted
            and row.status in ("confirmed", "pending")
        ):
            values = {"active": False, "status": "removed"}
            changes.append(SubscriberChange(email, row.id, values, "remove"))
    return ConfigSyncPlan(changes, refused)
