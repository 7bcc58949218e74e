"""The plain records the store hands out besides the model's types, and the mapping of
rows to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from clusterfeed.model import Entry, Membership, Subscriber
from clusterfeed.store.base import _utc


class PlannedDelivery(NamedTuple):
    """One outbox row to write: the subscriber, the ids of the stories its mail shows,
    its Message-ID, and the ids of the subscriber's stories the cap left out."""

    subscriber: Subscriber
    story_ids: Sequence[int]
    message_id: str
    left_out: Sequence[int] = ()


@dataclass(frozen=True)
class Delivery:
    """One (digest, subscriber) row of the outbox."""

    id: int
    digest_id: int
    digest_key: str
    digest_slot: datetime
    subscriber: Subscriber
    story_ids: tuple[int, ...]
    message_id: str
    state: str
    attempts: int
    # When the digest was built: retries stop once it is older than the configured age.
    digest_created: datetime | None = None
    last_error: str | None = None
    # The subscriber's stories the cap left out of this mail (see PlannedDelivery).
    left_out: tuple[int, ...] = ()


@dataclass(frozen=True)
class Bouncing:
    """An address that refused mail for good several times in a row."""

    email: str
    since: datetime
    refusals: int
    last_error: str | None


@dataclass(frozen=True)
class DigestRecord:
    """A digest that has outbox rows: what its web version is named and dated by."""

    id: int
    key: str
    slot: datetime


@dataclass(frozen=True)
class FeedUpdateSummary:
    new_entries: int
    updated_entries: int
    new_stories: int


def _row_to_entry(row: Any) -> Entry:
    return Entry(
        feed_name=row.feed_name,
        identity=row.identity,
        guid=row.guid,
        link=row.link,
        link_key=row.link_key,
        title=row.title,
        summary_html=row.summary_html,
        summary_text=row.summary_text,
        content_html=row.content_html,
        image_url=row.image_url,
        image_alt=row.image_alt,
        author=row.author,
        topics=tuple(row.topics or ()),
        language=row.language,
        published=_utc(row.published_at) or row.published_at,
        updated=_utc(row.updated_at) or row.updated_at,
        content_hash=row.content_hash,
        dated=_utc(row.dated_at) if row.dated_at is not None else None,
    )


def _row_to_subscriber(row: Any) -> Subscriber:
    return Subscriber(
        id=row.id,
        email=row.email,
        name=row.name,
        topics=tuple(row.topics or ()),
        languages=tuple(row.languages or ()),
        frequency=row.frequency,
    )


def _row_to_membership(row: Any) -> Membership:
    return Membership(
        subscriber=_row_to_subscriber(row),
        status=row.status,
        paused=bool(row.paused),
        origin=row.origin,
        created_at=_utc(row.created_at) or row.created_at,
        confirmed_at=_utc(row.confirmed_at),
        unsubscribed_at=_utc(row.unsubscribed_at),
    )


def _row_to_delivery(row: Any) -> Delivery:
    return Delivery(
        id=row.id,
        digest_id=row.digest_id,
        digest_key=row.digest_key,
        digest_slot=_utc(row.digest_slot) or row.digest_slot,
        subscriber=Subscriber(
            id=row.subscriber_id,
            email=row.email,
            name=row.name,
            topics=tuple(row.topics or ()),
            languages=tuple(row.languages or ()),
            frequency=row.frequency,
        ),
        story_ids=tuple(int(i) for i in row.story_ids),
        message_id=row.message_id,
        state=row.state,
        attempts=row.attempts,
        digest_created=_utc(row.digest_created),
        last_error=row.last_error,
        left_out=tuple(int(i) for i in row.left_out_ids or ()),
    )
