"""Which items the operator wants at all: keyword and topic filters, as a pure function.

Some partners publish job ads, canteen menus or stock notices beside their news. The
operator can keep them out, for one feed or for all, by keyword or by topic. A keyword
matches whole words, case-insensitively, in the title and the summary, so "Stelle"
does not catch "Herstellung". Include lists narrow (an item must match one of them);
exclude lists remove; exclusion wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from clusterfeed.model import Entry


@dataclass(frozen=True)
class FilterRules:
    include_keywords: tuple[str, ...] = ()
    exclude_keywords: tuple[str, ...] = ()
    include_topics: tuple[str, ...] = ()
    exclude_topics: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.include_keywords or self.exclude_keywords
            or self.include_topics or self.exclude_topics
        )  # fmt: skip


@lru_cache(maxsize=1024)
def _pattern(keyword: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(keyword.strip())}(?!\w)", re.IGNORECASE)


def _mentions(text: str, keywords: Iterable[str]) -> bool:
    return any(_pattern(k).search(text) for k in keywords if k.strip())


def keep(entry: Entry, rules: Sequence[FilterRules]) -> bool:
    """Whether an entry passes every set of rules (global and the feed's own)."""
    text = f"{entry.title}\n{entry.summary_text}"
    topics = set(entry.topics)
    for r in rules:
        if r.empty:
            continue
        if _mentions(text, r.exclude_keywords) or topics & set(r.exclude_topics):
            return False
        if r.include_keywords and not _mentions(text, r.include_keywords):
            return False
        if r.include_topics and not topics & set(r.include_topics):
            return False
    return True
