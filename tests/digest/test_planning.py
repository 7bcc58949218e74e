"""Planning a digest from what the outbox holds (pure; the store reads the facts in the
transaction that writes the rows, see test_store and test_digest_race)."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.digest.planning import OutboxFacts, plan_deliveries
from clusterfeed.model import Story, Subscriber
from tests.helpers import NOW, story

TOPICS = ("research", "financing", "medtech")


def reader(number: int, frequency: str = "daily", topics: tuple[str, ...] = ()) -> Subscriber:
    return Subscriber(
        email=f"reader{number}@example.org", id=number, frequency=frequency, topics=topics
    )


def plan(
    facts: OutboxFacts, stories: list[Story], *, send_when_empty: bool = False
) -> dict[int, list[int]]:
    planned = plan_deliveries(facts, stories, NOW, max_stories=50, send_when_empty=send_when_empty)
    return {p.subscriber.id or 0: [story.id for story in p.stories] for p in planned}


def test_stories_already_had_are_left_out_and_bouncing_addresses_skipped() -> None:
    facts = OutboxFacts(
        subscribers=[reader(1), reader(2), reader(3)],
        bouncing=frozenset({3}),
        had={1: frozenset({1})},
    )

    assert plan(facts, [story(1), story(2)]) == {1: [2], 2: [1, 2]}


def test_nothing_new_while_another_digest_is_on_its_way_means_no_mail_at_all() -> None:
    """A second run that finds the first one's rows waiting adds no "nothing new"
    mail behind them; a subscriber with nothing waiting still gets one."""
    facts = OutboxFacts(
        subscribers=[reader(1), reader(2)],
        waiting_since={1: NOW - timedelta(seconds=1)},
        had={1: frozenset({1}), 2: frozenset({1})},
    )

    assert plan(facts, [story(1)], send_when_empty=True) == {2: []}
    assert plan(facts, [story(1)]) == {}


def test_a_digest_on_its_way_counts_as_the_weekly_one() -> None:
    facts = OutboxFacts(
        subscribers=[reader(1, "weekly"), reader(2, "weekly"), reader(3, "daily")],
        last_sent={2: NOW - timedelta(days=8)},
        waiting_since={1: NOW - timedelta(days=1), 3: NOW - timedelta(days=1)},
        had={1: frozenset({1}), 3: frozenset({1})},
    )

    assert plan(facts, [story(1), story(2)]) == {2: [1, 2], 3: [2]}


@given(
    wants=st.lists(st.sets(st.sampled_from(TOPICS)), min_size=1, max_size=6),
    first=st.lists(st.sampled_from(TOPICS), max_size=8),
    later=st.lists(st.sampled_from(TOPICS), max_size=8),
    had=st.sets(st.integers(min_value=0, max_value=7)),
    weekly=st.sets(st.integers(min_value=0, max_value=5)),
    send_when_empty=st.booleans(),
)
def test_a_run_planning_after_another_never_plans_a_story_twice(
    wants: list[set[str]],
    first: list[str],
    later: list[str],
    had: set[int],
    weekly: set[int],
    send_when_empty: bool,
) -> None:
    """What the lock guarantees, as plain data: the second run's facts hold the first
    run's rows, so together they give every subscriber each story at most once, and
    no one two mails."""
    subs = [
        reader(i, "weekly" if i in weekly else "daily", tuple(sorted(t)))
        for i, t in enumerate(wants)
    ]
    stories = [story(i, (topic,)) for i, topic in enumerate(first)]
    facts = OutboxFacts(subscribers=subs, had={s.id or 0: frozenset(had) for s in subs})
    one = plan(facts, stories, send_when_empty=send_when_empty)

    after = OutboxFacts(
        subscribers=subs,
        waiting_since={sid: NOW for sid in one},
        had={s.id or 0: frozenset(had | set(one.get(s.id or 0, ()))) for s in subs},
    )
    more = stories + [story(100 + i, (topic,)) for i, topic in enumerate(later)]
    two = plan(after, more, send_when_empty=send_when_empty)

    for sid, ids in two.items():
        assert not set(ids) & set(one.get(sid, ())), "a story planned twice"
        assert not set(ids) & had
        assert ids or sid not in one, "an empty mail behind one on its way"
        if sid in one:
            assert subs[sid].frequency == "daily" and ids


def capped(
    facts: OutboxFacts, stories: list[Story], cap: int, *, carry_over: bool = False
) -> dict[int, tuple[list[int], list[int]]]:
    planned = plan_deliveries(
        facts, stories, NOW, max_stories=cap, send_when_empty=False, carry_over=carry_over
    )
    return {p.subscriber.id or 0: ([s.id for s in p.stories], list(p.left_out)) for p in planned}


def test_a_cap_keeps_the_newest_and_records_the_rest_as_left_out() -> None:
    # story(1) is the newest (an hour old), story(5) the oldest.
    facts = OutboxFacts(subscribers=[reader(1)])

    assert capped(facts, [story(n) for n in (4, 1, 5, 3, 2)], 3) == {1: ([1, 2, 3], [4, 5])}


def test_stories_left_out_never_make_a_mail_of_their_own() -> None:
    facts = OutboxFacts(
        subscribers=[reader(1)], had={1: frozenset({1, 2, 3})}, offered={1: frozenset({4, 5})}
    )
    stories = [story(n) for n in range(1, 6)]

    assert capped(facts, stories, 3) == {}
    assert capped(facts, stories, 3, carry_over=True) == {}
    # With news of its own, a digest takes them along only when asked to.
    assert capped(facts, [story(0), *stories], 3) == {1: ([0], [])}
    assert capped(facts, [story(0), *stories], 3, carry_over=True) == {1: ([0, 4, 5], [])}
    assert capped(facts, [story(0), *stories], 2, carry_over=True) == {1: ([0, 4], [5])}


@given(
    wants=st.lists(st.sets(st.sampled_from(TOPICS)), min_size=1, max_size=5),
    first=st.lists(st.sampled_from(TOPICS), max_size=12),
    later=st.lists(st.sampled_from(TOPICS), max_size=6),
    cap=st.integers(min_value=1, max_value=6),
    carry_over=st.booleans(),
)
def test_with_a_cap_nothing_is_lost_nothing_repeated_and_a_second_run_sends_nothing(
    wants: list[set[str]], first: list[str], later: list[str], cap: int, carry_over: bool
) -> None:
    """A capped digest offers every new story once (mailed or left out), a run right
    after it plans nothing, and a later run with news never mails a story twice."""
    subs = [reader(i, topics=tuple(sorted(t))) for i, t in enumerate(wants)]
    stories = [story(i, (topic,)) for i, topic in enumerate(first)]
    one = capped(OutboxFacts(subscribers=subs), stories, cap, carry_over=carry_over)

    for sub in subs:
        sid = sub.id or 0
        mailed, left_out = one.get(sid, ([], []))
        wanted = [s.id for s in stories if not sub.topics or set(s.topics) & set(sub.topics)]
        assert sorted(mailed + left_out) == sorted(wanted)
        assert len(mailed) == min(cap, len(wanted))
        assert mailed == sorted(wanted)[: len(mailed)], "the newest are kept"

    after = OutboxFacts(
        subscribers=subs,
        waiting_since={sid: NOW for sid in one},
        had={sid: frozenset(mailed) for sid, (mailed, _) in one.items()},
        offered={sid: frozenset(left) for sid, (_, left) in one.items()},
    )
    assert capped(after, stories, cap, carry_over=carry_over) == {}

    news = [story(100 + i, (topic,)) for i, topic in enumerate(later)]
    two = capped(after, stories + news, cap, carry_over=carry_over)
    for sid, (mailed, _left) in two.items():
        assert not set(mailed) & set(one.get(sid, ([], []))[0]), "a story mailed twice"
        assert set(mailed) & {s.id for s in news}, "a mail without news"
        sub = subs[sid]
        wanted_news = [s.id for s in news if not sub.topics or set(s.topics) & set(sub.topics)]
        assert len(set(mailed) & set(wanted_news)) == min(cap, len(wanted_news)), "news first"
        if not carry_over:
            assert set(mailed) <= {s.id for s in news}
