"""Digest sections follow the subscriber's own topics (a pure decision, no I/O)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.digest.sections import NO_TOPIC, assign_sections, section_of, topic_label

# The example's topics in the order its feeds name them; partners' own categories
# ("events", "digital-health") come on top of those.
ORDER = ["cluster", "gene-therapy", "financing", "drug-discovery", "research", "international",
         "medtech"]  # fmt: skip
EXTRA = ["events", "digital-health", "ai"]


def test_a_story_goes_into_the_first_of_the_subscribers_own_topics_it_has() -> None:
    chosen = ["research", "medtech", "cluster"]
    # A partner's categories sort first alphabetically; the subscriber's topic wins.
    assert section_of(["digital-health", "events", "medtech"], chosen, ORDER) == "medtech"
    assert section_of(["gene-therapy", "research"], chosen, ORDER) == "research"
    # In the config's order, not the subscriber's: cluster comes before research.
    assert section_of(["research", "cluster"], chosen, ORDER) == "cluster"
    assert section_of(["international"], ["international"], ORDER) == "international"


def test_without_a_topic_choice_a_story_goes_under_its_own_first_topic() -> None:
    assert section_of(["medtech", "research"], [], ORDER) == "research"
    assert section_of(["events", "medtech"], [], ORDER) == "medtech"
    assert section_of(["events", "ai"], [], ORDER) == "ai"
    assert section_of([], [], ORDER) == NO_TOPIC
    # A choice the story does not share (changed since planning): its own topic.
    assert section_of(["financing"], ["medtech"], ORDER) == "financing"


def test_sections_come_in_config_order_and_keep_the_digests_order() -> None:
    stories = [["medtech", "events"], ["cluster"], ["research", "medtech"], ["medtech"]]
    assert assign_sections(stories, ["research", "medtech", "cluster"], ORDER) == [
        ("cluster", [1]),
        ("research", [2]),
        ("medtech", [0, 3]),
    ]
    assert topic_label("gene-therapy") == "Gene therapy"
    assert topic_label("international") == "International"


topic_lists = st.lists(st.sampled_from(ORDER + EXTRA), max_size=4)


@given(
    stories=st.lists(topic_lists, max_size=15),
    chosen=st.lists(st.sampled_from(ORDER), max_size=4),
    order=st.permutations(ORDER),
)
def test_every_story_is_shown_once_in_a_section_of_the_subscribers_topics(
    stories: list[list[str]], chosen: list[str], order: list[str]
) -> None:
    sections = assign_sections(stories, chosen, order)

    positions = [p for _topic, members in sections for p in members]
    assert sorted(positions) == list(range(len(stories))), "each story exactly once"
    titles = [topic for topic, _members in sections]
    assert len(titles) == len(set(titles))
    rank = {t: i for i, t in enumerate(order)}
    ranked = [rank.get(t, len(rank)) for t in titles]
    assert ranked == sorted(ranked), "sections in the config's order"
    for topic, members in sections:
        assert members == sorted(members), "the digest's order within a section"
        for p in members:
            mine = set(stories[p]) & set(chosen)
            if mine:
                # One of the subscriber's topics the story has: the first in config order.
                assert topic in mine
                assert rank[topic] == min(rank[t] for t in mine)
            elif stories[p]:
                assert topic in stories[p]
            else:
                assert topic == NO_TOPIC
