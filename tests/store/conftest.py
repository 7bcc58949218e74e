"""The ``store`` fixture: a migrated store on each test database with three feeds."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from clusterfeed.store import Store
from tests.store.kit import FEEDS


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    store.migrate()
    store.sync_feeds(FEEDS)
    yield store
    store.close()
