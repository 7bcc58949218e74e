"""Who gets which stories in a new digest, decided from what the outbox already holds.

The store reads these facts in the very transaction that writes the new digest's
outbox rows, under the writers' lock (see ``Store.build_digest``). Two runs started
together (a cron job and a manual ``clusterfeed digest``, two schedulers) therefore
plan one after the other, and the second one sees the first one's rows as waiting:
their stories are not planned again, so nobody is mailed the same stories twice. The
decision itself is a plain function of those facts, with no I/O.

A digest holds at most ``digest.max_stories`` stories a subscriber; the newest are
kept. The others were still *offered*: the mail says "and N more on the website" and
the digest's web version lists them. They are recorded with the delivery and count as
had, so a run started a minute later does not mail them as a digest of their own.
With ``digest.carry_over`` they instead ride along with the subscriber's next digest
that brings news of its own, in the room the news leaves under the cap (never alone).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from clusterfeed.digest.digest import is_due, select_stories
from clusterfeed.model import Story, Subscriber


@dataclass(frozen=True)
class OutboxFacts:
    """What the store knows about each subscriber when a digest is planned.

    ``had`` holds, of the stories that may go into this digest, those each subscriber
    was sent, has waiting in a pending or sending delivery, or had refused for good.
    ``waiting_since`` is when the newest digest still waiting for them (pending or
    being sent) was built: it counts as their last digest for the weekly rhythm.
    ``offered`` holds, of those stories, the ones an earlier digest left out for each
    subscriber because of the cap (they were on its web version).
    """

    subscribers: Sequence[Subscriber]  # confirmed and not paused
    bouncing: frozenset[int] = frozenset()
    last_sent: Mapping[int, datetime] = field(default_factory=dict)
    waiting_since: Mapping[int, datetime] = field(default_factory=dict)
    had: Mapping[int, frozenset[int]] = field(default_factory=dict)
    offered: Mapping[int, frozenset[int]] = field(default_factory=dict)


class PlannedDigest(NamedTuple):
    """One subscriber's share of a digest: the stories the mail shows, in order, and
    the ids of those the cap left out (shown on the web version only)."""

    subscriber: Subscriber
    stories: list[Story]
    left_out: tuple[int, ...] = ()


def last_digest_at(facts: OutboxFacts, subscriber_id: int) -> datetime | None:
    """The latest digest a subscriber received or has on its way to them."""
    times = [
        t
        for t in (facts.last_sent.get(subscriber_id), facts.waiting_since.get(subscriber_id))
        if t is not None
    ]
    return max(times) if times else None


def _shown_order(story: Story) -> tuple[datetime, int]:
    """The order ``select_stories`` gives: newest first by the date the digest shows."""
    return (story.entry.published, story.id)


def plan_deliveries(
    facts: OutboxFacts,
    candidates: Iterable[Story],
    now: datetime,
    *,
    max_stories: int,
    send_when_empty: bool,
    carry_over: bool = False,
) -> list[PlannedDigest]:
    """Each subscriber due a digest now, with the stories it should hold, in order,
    and those the cap leaves out.

    Bouncing addresses are skipped (``clusterfeed status`` lists them until the
    operator clears them). With ``send_when_empty``, a subscriber with nothing new gets
    a "nothing new" digest, but not while another digest is still on its way to them:
    that one is news enough, and a second run started at the same time would
    otherwise add an empty mail right behind it.
    """
    stories = list(candidates)
    plan = []
    for subscriber in facts.subscribers:
        sid = subscriber.id
        assert sid is not None
        if sid in facts.bouncing:
            continue
        if not is_due(subscriber, last_digest_at(facts, sid), now):
            continue
        had = set(facts.had.get(sid, ()))
        offered = facts.offered.get(sid, frozenset())
        fresh = select_stories(stories, subscriber, had | offered)
        chosen, left_out = fresh[:max_stories], fresh[max_stories:]
        if carry_over and chosen:
            # The news first; stories left out before fill the room the cap leaves,
            # newest first, so a mail never holds only old ones.
            older = [s for s in select_stories(stories, subscriber, had) if s.id in offered]
            room = max_stories - len(chosen)
            chosen = sorted(chosen + older[:room], key=_shown_order, reverse=True)
            left_out = left_out + older[room:]
        if chosen or (send_when_empty and sid not in facts.waiting_since):
            plan.append(PlannedDigest(subscriber, chosen, tuple(s.id for s in left_out)))
    return plan
