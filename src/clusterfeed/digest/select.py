"""Which stories one subscriber should receive, and whether a digest is due for them.

The rules for one subscriber, pure: their topics and languages, nothing they had
before, their frequency, the cap. ``planning`` applies them to every subscriber of a
new digest with the facts the outbox holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from clusterfeed.model import Story, Subscriber

WEEKLY_GAP = timedelta(days=6, hours=12)


def is_due(subscriber: Subscriber, last_sent: datetime | None, now: datetime) -> bool:
    """Whether a subscriber's frequency allows a digest now.

    Daily subscribers get every scheduled digest; weekly ones at most one in about a
    week (a little slack, so a fixed weekly send time does not drift by a day).
    """
    if subscriber.frequency != "weekly" or last_sent is None:
        return True
    return now - last_sent >= WEEKLY_GAP


def matches(story: Story, subscriber: Subscriber) -> bool:
    """A story fits a subscriber when it shares a topic and a language they chose.

    An empty choice means "everything", so a subscriber added with only an address
    receives the whole digest.
    """
    if subscriber.topics and not set(story.topics) & set(subscriber.topics):
        return False
    return not (subscriber.languages and not set(story.languages) & set(subscriber.languages))


def select_stories(
    stories: Iterable[Story],
    subscriber: Subscriber,
    already_had: set[int],
    *,
    max_stories: int | None = None,
) -> list[Story]:
    """The stories for one subscriber's next digest, newest first (by the date the
    digest shows), at most ``max_stories`` of them: a cap keeps the newest."""
    chosen = [s for s in stories if s.id not in already_had and matches(s, subscriber)]
    chosen.sort(key=lambda s: (s.entry.published, s.id), reverse=True)
    return chosen if max_stories is None else chosen[:max_stories]
