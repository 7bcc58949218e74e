"""The config's subscriber list against what the store holds: the consent rules alone,
over plain data (the store writes the plan; tests/test_subscribers.py covers that)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from clusterfeed.model import Subscriber
from clusterfeed.subscribers.configsync import (
    StoredSubscriber,
    SubscriberChange,
    plan_config_sync,
    preferences,
)

NOW = datetime(2026, 11, 20, 8, 0, tzinfo=UTC)
EARLIER = NOW - timedelta(days=30)
RITA = Subscriber(email="Rita@Example.org", topics=("research",), languages=("de",))


def _stored(status: str, origin: str = "config", **kw: object) -> StoredSubscriber:
    fields: dict[str, object] = {
        "id": 7, "status": status, "origin": origin, "paused": False,
        "confirmed_at": EARLIER, "config_prefs": preferences(RITA),
    }  # fmt: skip
    fields.update(kw)
    return StoredSubscriber(**fields)  # type: ignore[arg-type]  # built from a dict


def _one(
    stored: dict[str, StoredSubscriber], listed: list[Subscriber] | None = None
) -> SubscriberChange:
    plan = plan_config_sync([RITA] if listed is None else listed, stored, (), NOW)
    assert plan.refused == []
    (change,) = plan.changes
    return change


def test_a_new_address_is_confirmed_at_once_on_the_operators_consent() -> None:
    change = _one({})
    assert change.subscriber_id is None
    assert change.values["email"] == "rita@example.org"
    assert (change.values["status"], change.values["confirmed_at"]) == ("confirmed", NOW)
    assert (change.consent, change.prefs["topics"]) == ("config", ["research"])


def test_an_erased_address_is_refused() -> None:
    plan = plan_config_sync([RITA], {}, {"rita@example.org"}, NOW)
    assert (plan.changes, plan.refused) == ([], ["rita@example.org"])


def test_a_subscribers_own_choices_survive_until_the_config_changes_them() -> None:
    kept = _one({"rita@example.org": _stored("confirmed")})
    assert kept.values == {"origin": "config", "config_prefs": preferences(RITA)}
    assert kept.consent is None

    changed = Subscriber(email=RITA.email, topics=("financing",), languages=("de",))
    taken = _one({"rita@example.org": _stored("confirmed")}, [changed])
    assert taken.values["topics"] == ["financing"]
    assert taken.consent is None  # a change of choices, not of consent


def test_someone_who_unsubscribed_stays_unsubscribed() -> None:
    change = _one({"rita@example.org": _stored("unsubscribed")})
    assert "status" not in change.values
    assert change.consent is None


def test_removed_pending_or_self_signed_up_become_confirmed_from_the_config() -> None:
    for stored in (
        _stored("removed"),
        _stored("pending", confirmed_at=None),
        _stored("confirmed", origin="web", paused=True),
    ):
        change = _one({"rita@example.org": stored})
        assert change.values["status"] == "confirmed"
        assert change.values["confirmed_at"] == (stored.confirmed_at or NOW)
        assert change.values["active"] is not stored.paused
        assert change.consent == "config"


def test_a_config_subscriber_taken_off_the_config_is_removed_and_no_one_else() -> None:
    stored = {
        "rita@example.org": _stored("confirmed"),
        "web@example.org": _stored("confirmed", origin="web", id=8),
        "gone@example.org": _stored("unsubscribed", id=9),
    }
    (change,) = plan_config_sync([], stored, (), NOW).changes
    assert (change.subscriber_id, change.values, change.consent) == (
        7, {"active": False, "status": "removed"}, "remove",
    )  # fmt: skip
