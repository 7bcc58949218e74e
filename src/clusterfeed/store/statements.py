"""Statements of the feed update and story joins, built once (see ``_Statements``)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, String, Text, bindparam, func, insert, update

from clusterfeed.model import Entry
from clusterfeed.store.schema import _UTCDateTime, entries, feeds, stories


def _entry_values(entry: Entry) -> dict[str, Any]:
    """The columns an entry's content fills, the same for an insert and an update."""
    return {
        "guid": entry.guid,
        "link": entry.link,
        "link_key": entry.link_key,
        "title": entry.title,
        "summary_html": entry.summary_html,
        "summary_text": entry.summary_text,
        "content_html": entry.content_html,
        "image_url": entry.image_url,
        "image_alt": entry.image_alt,
        "author": entry.author,
        "topics": list(entry.topics),
        "language": entry.language,
        "published_at": entry.published,
        "updated_at": entry.updated,
        "content_hash": entry.content_hash,
        "dated_at": entry.dated or entry.published,
    }


class _Statements:
    """The feed-update statements, built once: building one per row (``.values(...)``)
    cost more than running it, in SQLAlchemy's cache-key computation alone."""

    def __init__(self) -> None:
        self.insert_entry = insert(entries)
        self.insert_story = insert(stories)
        self.update_entry = (
            update(entries)
            .where(entries.c.id == bindparam("b_id"))
            .values({c: bindparam(c) for c in ("identity", *_ENTRY_CONTENT)})
        )
        self.touch_story = (
            update(stories)
            .where(stories.c.id == bindparam("b_id"))
            .values(updated_at=bindparam("updated_at"))
        )
        self.join_entry = (
            update(entries)
            .where(entries.c.id == bindparam("b_id"))
            .values(story_id=bindparam("story_id"), join_reason=bindparam("join_reason"))
        )
        # What record_not_modified writes, with moved_to and discovered_url kept
        # unless this answer learnt something (see _poll_values).
        self.not_modified = (
            update(feeds)
            .where(feeds.c.name == bindparam("b_name"))
            .values(
                last_attempt_at=bindparam("b_now", type_=_UTCDateTime()),
                last_success_at=bindparam("b_now", type_=_UTCDateTime()),
                last_status=bindparam("b_status", type_=Integer()),
                last_error=None,
                consecutive_failures=0,
                failing_since=None,
                etag=bindparam("b_etag", type_=Text()),
                last_modified=bindparam("b_last_modified", type_=Text()),
                state=bindparam("b_state", type_=String()),
                next_attempt_at=bindparam("b_next", type_=_UTCDateTime()),
                moved_to=func.coalesce(bindparam("b_moved_to", type_=Text()), feeds.c.moved_to),
                discovered_url=func.coalesce(
                    bindparam("b_discovered_url", type_=Text()), feeds.c.discovered_url
                ),
            )
        )


_ENTRY_CONTENT = (
    "guid", "link", "link_key", "title", "summary_html", "summary_text", "content_html",
    "image_url", "image_alt", "author", "topics", "language", "published_at", "updated_at",
    "content_hash", "dated_at",
)  # fmt: skip


_STMT = _Statements()
