"""Taking an item out of a wrong story (``clusterfeed stories split URL``).

The operator sees in ``clusterfeed stories`` that a partner's item was joined to a
story about another event. Splitting moves the item (and any other partner's copy of
the same page) into a story of its own and records, in the store, that its page and
every page left in the old story are never one story again. Story matching reads these
records as it reads the config's ``apart`` pairs, so the correction holds across later
cycles, restarts and any re-matching, without the operator editing the config.

The old story keeps its id (and so its Atom id and what subscribers were sent); the
split item gets a new story.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Connection, insert, select, update

from clusterfeed.ingest.normalize import link_key, normalize_url


@dataclass(frozen=True)
class SplitResult:
    """What a split did: ``found`` is False for an unknown URL; ``moved`` counts the
    items taken out (0: the item was already a story of its own); ``left`` the items
    that stayed in the old story."""

    found: bool
    moved: int = 0
    left: int = 0
    title: str = ""


def page_key(url: str) -> str:
    """The key under which stored entries and corrections name the page at ``url``."""
    return link_key(normalize_url(url.strip()) or url.strip()) or url.strip()


def apart_pairs(keys: Iterable[str], others: Iterable[str]) -> set[tuple[str, str]]:
    """Every (sorted) pair of one page in ``keys`` and one in ``others``."""
    mine, theirs = set(keys), set(others) - set(keys)
    return {(min(a, b), max(a, b)) for a in mine for b in theirs}


def split_entry(conn: Connection, url: str, now: datetime) -> SplitResult:
    """Move the entries at ``url`` out of their story (inside the caller's transaction)."""
    from clusterfeed.store import _short_hash, entries, stories, story_corrections

    key = page_key(url)
    targets = conn.execute(
        select(
            entries.c.id, entries.c.story_id, entries.c.feed_id, entries.c.identity,
            entries.c.title, entries.c.published_at, entries.c.first_seen_at,
        )
        .where(entries.c.link_key == key)
        .order_by(entries.c.published_at, entries.c.id)
    ).all()  # fmt: skip
    if not targets:
        return SplitResult(found=False)
    moved = left = 0
    for story_id in sorted({int(t.story_id) for t in targets}):
        mine = [t for t in targets if int(t.story_id) == story_id]
        members = conn.execute(
            select(entries.c.id, entries.c.link_key, entries.c.published_at).where(
                entries.c.story_id == story_id
            )
        ).all()
        rest = [m for m in members if int(m.id) not in {int(t.id) for t in mine}]
        if not rest:
            continue
        first = mine[0]
        base = f"{first.feed_id}-{_short_hash(first.identity)}"
        new_key, n = base, 1
        while conn.execute(select(stories.c.id).where(stories.c.key == new_key)).first():
            n += 1
            new_key = f"{base}-{n}"
        conn.execute(
            insert(stories).values(
                key=new_key,
                first_seen_at=min(t.first_seen_at for t in mine),
                updated_at=now,
                published_at=min(t.published_at for t in mine),
            )
        )
        new_story = conn.execute(select(stories.c.id).where(stories.c.key == new_key)).scalar_one()
        conn.execute(
            update(entries)
            .where(entries.c.id.in_([int(t.id) for t in mine]))
            .values(story_id=new_story, join_reason=None)
        )
        conn.execute(
            update(entries)
            .where(entries.c.id.in_([int(t.id) for t in mine[1:]]))
            .values(join_reason="the same page")
        )
        conn.execute(
            update(stories)
            .where(stories.c.id == story_id)
            .values(updated_at=now, published_at=min(m.published_at for m in rest))
        )
        pairs = apart_pairs([key], (m.link_key for m in rest if m.link_key))
        known = {
            (r.link_a, r.link_b)
            for r in conn.execute(
                select(story_corrections.c.link_a, story_corrections.c.link_b).where(
                    (story_corrections.c.link_a == key) | (story_corrections.c.link_b == key)
                )
            )
        }
        fresh = sorted(pairs - known)
        if fresh:
            conn.execute(
                insert(story_corrections),
                [
                    {"link_a": a, "link_b": b, "verdict": "apart", "created_at": now}
                    for a, b in fresh
                ],
            )
        moved += len(mine)
        left += len(rest)
    return SplitResult(found=True, moved=moved, left=left, title=str(targets[0].title))
