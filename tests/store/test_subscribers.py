"""Subscribers as the config names them."""

from __future__ import annotations

from clusterfeed.model import Subscriber
from clusterfeed.store import Store
from tests.store.kit import NOW


def test_subscribers_removed_from_the_config_are_deactivated(store: Store) -> None:
    store.sync_subscribers(
        [Subscriber(email="a@example.org"), Subscriber(email="b@example.org", topics=("x",))], NOW
    )

    store.sync_subscribers([Subscriber(email="b@example.org", languages=("de",))], NOW)

    (only,) = store.active_subscribers()
    assert only.email == "b@example.org"
    assert (only.topics, only.languages) == ((), ("de",))
