"""Which section of a digest each story goes in.

A subscriber who chose topics reads a digest in sections named after *their* topics:
someone who follows research, medtech and the cluster's own news expects a Medtech
section, not one named after whichever topic of a story happens to sort first (a
partner's own categories, "Events", "Digital health", would otherwise head the
mail). So a story goes into the section of the first of the subscriber's topics that
it has, in the order the topics are defined in the config. A subscriber without a
topic choice (all news), and the web version of a digest, which is the same for
everyone, get each story under its own first topic in that order.

Plain functions over plain data (topic names and their order): no config, no story
objects, so the decision can be tested on its own.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# The section of a story that has no topic at all.
NO_TOPIC = "news"


def topic_label(topic: str) -> str:
    """A topic as readers see it: ``gene-therapy`` is "Gene therapy"."""
    return topic.replace("-", " ").replace("_", " ").capitalize()


def topic_order(defined: Iterable[str]) -> list[str]:
    """The topics in the order the config first names them, each once."""
    return list(dict.fromkeys(defined))


def _ranked(topics: Iterable[str], order: Sequence[str]) -> list[str]:
    """Topics in the config's order; others (a partner's own categories) after them,
    alphabetically, so the result never depends on the order a feed listed them in."""
    rank: dict[str, int] = {}
    for i, t in enumerate(order):
        rank.setdefault(t, i)  # a topic's first mention counts
    return sorted(set(topics), key=lambda t: (rank.get(t, len(rank)), t))


def section_of(story_topics: Sequence[str], chosen: Sequence[str], order: Sequence[str]) -> str:
    """The section one story is shown in, for a subscriber who chose ``chosen``.

    The first of the subscriber's topics (in config order) that the story has; when it
    has none of them (no choice: all news, or a choice changed since the digest was
    planned), the story's own first topic in that order.
    """
    mine = [t for t in _ranked(chosen, order) if t in story_topics]
    if mine:
        return mine[0]
    own = _ranked(story_topics, order)
    return own[0] if own else NO_TOPIC


def assign_sections(
    stories: Sequence[Sequence[str]], chosen: Sequence[str], order: Sequence[str]
) -> list[tuple[str, list[int]]]:
    """Sections for a list of stories (each given by its topics), in config order.

    Returns (topic, positions of its stories in ``stories``): every story is in
    exactly one section, and within a section the stories keep the digest's order.
    """
    sections: dict[str, list[int]] = {}
    for position, topics in enumerate(stories):
        sections.setdefault(section_of(topics, chosen, order), []).append(position)
    return [(t, sections[t]) for t in _ranked(sections, order)]
