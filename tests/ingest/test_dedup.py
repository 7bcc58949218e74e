"""What one fetch changes: new, updated, re-keyed (rotated GUID), or nothing."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

from clusterfeed.ingest.dedup import plan_feed_update
from clusterfeed.model import Entry

NOW = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)


def _entry(identity: str, link: str | None, content_hash: str = "h") -> Entry:
    return Entry(
        feed_name="Nordlicht", identity=identity, guid=identity, link=link,
        link_key=link.removeprefix("https://") if link else None, title=identity,
        summary_html="", summary_text="", content_html="", image_url=None, image_alt=None,
        author=None, topics=(), language="de", published=NOW, updated=NOW,
        content_hash=content_hash,
    )  # fmt: skip


def test_known_unchanged_entries_need_no_write_and_changed_ones_an_update() -> None:
    a, b = _entry("guid:a", "https://x.example/a"), _entry("guid:b", "https://x.example/b")
    stored = {"guid:a": (1, "h"), "guid:b": (2, "old")}
    changes = plan_feed_update([a, b], stored)
    assert [(c.kind, c.entry_id, c.entry.identity) for c in changes] == [("update", 2, "guid:b")]


def test_a_rotated_guid_for_a_vanished_entry_re_keys_it_instead_of_adding_news() -> None:
    rotated = _entry("guid:new-123", "https://x.example/a")
    changes = plan_feed_update([rotated], {}, {"x.example/a": (7, "h")})
    assert [(c.kind, c.entry_id) for c in changes] == [("update", 7)]


def test_two_different_items_sharing_a_link_in_one_fetch_stay_two() -> None:
    one = _entry("guid:one", "https://x.example/events")
    two = replace(_entry("guid:two", "https://x.example/events"), title="two")
    changes = plan_feed_update([one, two], {}, {"x.example/events": (7, "h")})
    assert sorted(c.kind for c in changes) == ["new", "update"]
    assert len({c.entry.identity for c in changes}) == 2


def test_the_same_identity_twice_in_one_fetch_is_one_entry() -> None:
    a = _entry("guid:a", "https://x.example/a")
    assert len(plan_feed_update([a, a], {})) == 1
