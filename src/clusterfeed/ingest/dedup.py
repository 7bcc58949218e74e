"""Decide what one fetch changes, before anything is written.

This is the "decide" half of a feed update (the store applies the decision in one
transaction): given the freshly normalized entries of one feed and what the store
already holds for that feed, say which entries are new, which changed and which are
untouched. Keeping it pure makes re-fetching provably duplicate-free: an entry whose
identity is known is never "new", and one whose content hash is unchanged is not even
an update.

Exact matching across feeds (the same GUID or the same page under another partner's
link) is answered by the store's index lookups when a new entry is inserted; stories
told in different words are a later concern and will plug in here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from clusterfeed.model import Entry


@dataclass(frozen=True)
class EntryChange:
    """One intended write: insert a new entry or update a known one in place."""

    kind: Literal["new", "update"]
    entry: Entry
    entry_id: int | None = None


def plan_feed_update(
    fetched: Sequence[Entry],
    stored: Mapping[str, tuple[int, str]],
    stored_by_link: Mapping[str, tuple[int, str]] | None = None,
) -> list[EntryChange]:
    """The writes needed to bring the store in line with one fetch of a feed.

    ``stored`` maps identity to (entry id, content hash) for the entries of this feed
    that the store already has. Entries the feed no longer lists are left alone: feeds
    are windows onto a stream, and an item dropping out of the window is not news.

    ``stored_by_link`` maps link keys to (entry id, content hash) for this feed's stored
    entries whose identity is *not* in this fetch. Some CMSs give an item a new GUID on
    every request; an unknown GUID whose page is one of those vanished entries is that
    entry again (re-keyed in place), not news to mail a second time. Each vanished entry
    is claimed at most once, so two different items that share a link in one fetch
    still stay two.
    """
    changes: list[EntryChange] = []
    seen: set[str] = set()
    vanished = dict(stored_by_link or {})
    for entry in fetched:
        if entry.identity in seen:
            continue
        seen.add(entry.identity)
        known = stored.get(entry.identity)
        if known is None and entry.link_key and entry.link_key in vanished:
            entry_id, _hash = vanished.pop(entry.link_key)
            changes.append(EntryChange("update", entry, entry_id))
        elif known is None:
            changes.append(EntryChange("new", entry))
        elif known[1] != entry.content_hash:
            changes.append(EntryChange("update", entry, known[0]))
    # Oldest first, so a feed listed newest-first still gets story ids in time order.
    changes.sort(key=lambda c: (c.entry.published, c.entry.identity))
    return changes
