"""Items that are a partner's own publication, not a report of an event.

A **roundup**, a newsletter or mail-magazine issue ("NordBio Newsletter 11/2026",
"メールマガジン 2026年11月号"), lists the month's stories: it shares names and dates
with each of them and with other publishers' issues of the same month, and is none of
them. It is one story only with another roundup from the same publisher (the English
and German issue of one newsletter). The kind is read from the title alone, in the
languages of the labelled sets; pure functions, no I/O.

Not covered: "Meet us at the Summit" beside the Summit's own programme. A presence
notice is not a kind that can be told from the title: in the labelled sets partners'
"See us at BIO 2027" and "three clusters share a pavilion" are one story.
"""

from __future__ import annotations

import re

_ROUNDUP = re.compile(
    r"\b(?:newsletter|rundbrief|mail[- ]?magazine?|round-?up|wochenrückblick|"
    r"monatsrückblick|jahresrückblick)\b|メールマガジン|メルマガ|ニュースレター",
    re.IGNORECASE,
)


def notice_kind(title: str) -> str | None:
    """``"roundup"`` or None (an item that reports an event)."""
    return "roundup" if _ROUNDUP.search(title) else None


def publisher(own_link: str | None, feed: str) -> str:
    """Who published an item: the site of its page (a link key, no ``www.``), else
    its feed. A partner's German and English feeds share one site."""
    if own_link:
        host = own_link.split("/", 1)[0]
        if host:
            return host
    return f"feed:{feed}"
