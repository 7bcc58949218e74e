"""Plain data that flows through the pipeline.

These are frozen dataclasses, not database rows: the pure modules (normalize, dedup,
digest selection, rendering) take and return them, and only ``store`` maps them to
tables. That keeps every decision testable without a database or a network.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class FetchResult:
    """What one attempt to get a feed's bytes produced.

    Exactly one of three outcomes: ``body`` is set (new content), ``not_modified`` is
    true (the server or the file said nothing changed), or ``error`` says why it failed.
    """

    feed_name: str
    url: str
    status: int | None = None
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    etag: str | None = None
    last_modified: str | None = None
    not_modified: bool = False
    error: str | None = None
    final_url: str | None = None
    # What the server said about the future: a permanent new address (an unbroken
    # chain of 301/308), how long to wait (Retry-After on 429/503) and how long the
    # answer stays fresh (Cache-Control max-age).
    moved_to: str | None = None
    retry_after: float | None = None
    max_age: int | None = None
    # The address rule (``netguard``) refused a hop: a scheme other than http(s), or
    # an address a partner may not send clusterfeed to. Nothing of the chain is kept.
    refused: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class ParsedFeed:
    """A feed's metadata and raw entries as feedparser saw them."""

    title: str | None
    link: str | None
    feed_id: str | None
    entries: Sequence[Mapping[str, Any]]
    warning: str | None = None


@dataclass(frozen=True)
class Entry:
    """One partner's version of a news item, normalized.

    ``identity`` is unique within its feed; ``link_key`` is the aggressive form of the
    link that is compared across feeds to find the same item told by another partner.
    """

    feed_name: str
    identity: str
    guid: str | None
    link: str | None
    link_key: str | None
    title: str
    summary_html: str
    summary_text: str
    content_html: str
    image_url: str | None
    image_alt: str | None
    author: str | None
    topics: tuple[str, ...]
    language: str
    published: datetime
    updated: datetime
    content_hash: str
    # The date the partner gave, unclamped (``published`` is never after first seen);
    # None when the feed gave none. Story matching compares these.
    dated: datetime | None = None


@dataclass(frozen=True)
class Source:
    """A partner that told a story, as credited in feeds and emails."""

    feed_name: str
    feed_title: str
    feed_url: str
    site_url: str | None
    entry_title: str
    entry_link: str | None
    guid: str | None = None
    published: datetime | None = None
    language: str | None = None
    join_reason: str | None = None


@dataclass(frozen=True)
class Story:
    """One event, told by one or more partners.

    ``entry`` is the representative version shown to readers; ``sources`` lists every
    partner that told it, the representative's first.
    """

    id: int
    key: str
    entry: Entry
    sources: tuple[Source, ...]
    topics: tuple[str, ...]
    languages: tuple[str, ...]
    first_seen: datetime
    updated: datetime

    @property
    def also_reported_by(self) -> tuple[Source, ...]:
        return self.sources[1:]


@dataclass(frozen=True)
class Subscriber:
    """Someone who receives the digest; empty topics or languages mean "all"."""

    email: str
    name: str | None = None
    topics: tuple[str, ...] = ()
    languages: tuple[str, ...] = ()
    frequency: str = "daily"
    id: int | None = None


@dataclass(frozen=True)
class PollFacts:
    """What one attempt decided about a feed's future, for the store to remember."""

    state: str  # "ok", "failing" or "gone"
    next_attempt: datetime | None
    moved_to: str | None = None
    discovered_url: str | None = None


@dataclass(frozen=True)
class FeedStatus:
    """What the store remembers of the conversation with one feed's server."""

    name: str
    url: str
    title: str | None
    etag: str | None
    last_modified: str | None
    last_attempt_at: datetime | None
    last_success_at: datetime | None
    last_status: int | None
    last_error: str | None
    last_warning: str | None
    consecutive_failures: int
    entries: int
    state: str = "new"
    next_attempt_at: datetime | None = None
    failing_since: datetime | None = None
    moved_to: str | None = None
    discovered_url: str | None = None
    entries_30_days: int = 0
    newest_entry_at: datetime | None = None

    @property
    def fetch_url(self) -> str:
        """Where to ask next: a discovered feed, else the permanent new address, else the URL."""
        return self.discovered_url or self.moved_to or self.url

    def is_due(self, now: datetime) -> bool:
        """Whether the politeness rules allow asking the partner's server now."""
        if self.state == "gone":
            return False
        return self.next_attempt_at is None or self.next_attempt_at <= now


@dataclass(frozen=True)
class Membership:
    """A subscriber with their consent state, as the store keeps it.

    ``status`` is ``pending`` (signed up, not confirmed), ``confirmed``, ``unsubscribed``
    or ``removed`` (taken off the config or by the operator); only a confirmed, not
    paused subscriber gets digests.
    """

    subscriber: Subscriber
    status: str
    paused: bool
    origin: str
    created_at: datetime
    confirmed_at: datetime | None = None
    unsubscribed_at: datetime | None = None

    @property
    def receives_digests(self) -> bool:
        return self.status == "confirmed" and not self.paused


@dataclass(frozen=True)
class Consent:
    """One change of consent: who, when, what they chose, under which form text."""

    email: str
    at: datetime
    action: str  # signup | confirm | preferences | unsubscribe | import | config | add | remove
    form_version: str | None
    choices: dict[str, object]
    ip_hash: str | None = None
