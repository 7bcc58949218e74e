"""Which version of a story represents it: whose title, text and link the feeds, the
news page and the digests show for the story. A rule of the operator's
(``stories.representative``), decided here over plain data; the store only applies the
order it is given (``Store.configure_stories``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial


@dataclass(frozen=True)
class Version:
    """What the rules read of one version of a story (one partner's item)."""

    feed: str
    identity: str
    published: datetime
    summary_text: str = ""
    content_html: str = ""

    @property
    def completeness(self) -> int:
        """How much a reader gets: the summary, and the full text at half weight
        (markup makes it look longer than it reads)."""
        return len(self.summary_text) + len(self.content_html) // 2


# An order of a story's versions: their positions, the representative first.
VersionOrder = Callable[[Sequence[Version]], list[int]]


def representative_first(
    versions: Sequence[Version], rule: str = "earliest", own_feeds: Collection[str] = ()
) -> list[int]:
    """The positions of ``versions``: the representative first, then the others by
    publication.

    ``rule`` is "own" (the cluster office's own version where there is one, else the
    most complete), "complete" (the most complete) or "earliest". Every rule ends in
    the same tie-breaks (earliest, then feed name, then identity), so the choice never
    depends on which feed happened to answer first in a concurrent cycle.
    """
    by_time = sorted(
        range(len(versions)),
        key=lambda i: (versions[i].published, versions[i].feed, versions[i].identity),
    )
    if not by_time:
        return []
    best = by_time[0]
    if rule in ("own", "complete"):
        pool = [i for i in by_time if versions[i].feed in own_feeds] if rule == "own" else []
        pool = pool or by_time
        rank = {i: n for n, i in enumerate(by_time)}
        best = max(pool, key=lambda i: (versions[i].completeness, -rank[i]))
    return [best, *(i for i in by_time if i != best)]


def version_order(rule: str, own_feeds: Iterable[str]) -> VersionOrder:
    """The order ``rule`` gives, ready to hand to the store."""
    return partial(representative_first, rule=rule, own_feeds=frozenset(own_feeds))
