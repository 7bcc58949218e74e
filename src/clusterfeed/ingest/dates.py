"""Reading the dates people write on web pages, in German, English and Japanese.

Feeds carry machine dates, which feedparser reads. News listing pages carry dates
written for people ("23. November 2026", "Nov 23, 2026", "2026年11月23日", "23.11.2026"),
which this module reads, either with the operator's strftime pattern or by trying
the common forms. Month names are mapped to numbers first, so a pattern like
``%d. %B %Y`` works for German pages whatever the machine's locale is.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from zoneinfo import ZoneInfo

MONTHS = {
    # German
    "januar": 1, "jänner": 1, "februar": 2, "märz": 3, "maerz": 3, "april": 4, "mai": 5,
    "juni": 6, "juli": 7, "august": 8, "september": 9, "oktober": 10, "november": 11,
    "dezember": 12, "jan": 1, "feb": 2, "mär": 3, "mrz": 3, "apr": 4, "jun": 6, "jul": 7,
    "aug": 8, "sep": 9, "sept": 9, "okt": 10, "nov": 11, "dez": 12,
    # English
    "january": 1, "february": 2, "march": 3, "may": 5, "june": 6, "july": 7,
    "october": 10, "december": 12, "mar": 3, "oct": 10, "dec": 12,
}  # fmt: skip

_MONTH_WORD = re.compile(
    r"(?<![A-Za-zÄÖÜäöüß])("
    + "|".join(sorted(map(re.escape, MONTHS), key=len, reverse=True))
    + r")\.?(?![A-Za-zÄÖÜäöüß])",
    re.IGNORECASE,
)
_JAPANESE = re.compile(r"(\d{4})\s*年\s*(\d{1,2})\s*月\s*(\d{1,2})\s*日")
_NUMERIC = ("%d.%m.%Y", "%Y-%m-%d", "%d/%m/%Y", "%Y/%m/%d")
# With a month word, its position says the order: "23. November 2026" is day first,
# "November 23, 2026" is month first. An optional weekday in front is skipped.
_DAY_MONTH_YEAR = re.compile(r"(\d{1,2})\.?\s+@(\d{1,2})@\s*,?\s*(\d{4})")
_DOTTED_DMY = re.compile(r"(?<!\d)(\d{1,2})\.(\d{1,2})\.(\d{4})(?!\d)")
_YEAR_FIRST = re.compile(r"(?<!\d)(\d{4})[-./](\d{1,2})[-./](\d{1,2})(?!\d)")
_MONTH_DAY_YEAR = re.compile(r"@(\d{1,2})@\s+(\d{1,2})(?:st|nd|rd|th)?\s*,?\s*(\d{4})")


def _months_to_numbers(text: str, marker: str = "") -> str:
    return _MONTH_WORD.sub(lambda m: f" {marker}{MONTHS[m.group(1).lower()]}{marker} ", text)


def _tidy(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("\u00a0", " ")).strip()


def parse_human_date(text: str, pattern: str | None = None, tz: str = "UTC") -> datetime | None:
    """A written date as an aware UTC datetime, or None when it cannot be read.

    ``pattern`` is a strftime pattern (``%B``/``%b`` accept German and English month
    names); without one, ISO 8601, RFC 822, Japanese and the common day-month-year
    forms are tried. A date without a time is taken at midnight in ``tz``.
    """
    text = _tidy(text)
    if not text:
        return None
    zone = ZoneInfo(tz)
    if pattern:
        # The month word becomes its number in place, without the padding spaces the
        # free-form search adds ("20-Nov-2026" came out as "20- 11 -2026" and never
        # matched "%d-%b-%Y"), and the dot of an abbreviation is optional on both sides
        # ("%d. %b. %Y" reads "20. Nov. 2026", and "5. Mai 2026", which has no dot).
        numeric_pattern = _tidy(re.sub(r"%[Bb]\.?", "%m", pattern))
        candidate = (
            _tidy(_MONTH_WORD.sub(lambda m: str(MONTHS[m.group(1).lower()]), text))
            if _tidy(pattern) != numeric_pattern
            else text
        )
        try:
            value = datetime.strptime(candidate, numeric_pattern)
        except ValueError:
            return None
        return _aware(value, zone)
    japanese = _JAPANESE.search(text)
    if japanese:
        year, month, day = (int(g) for g in japanese.groups())
        try:
            return _aware(datetime(year, month, day), zone)
        except ValueError:
            return None
    try:
        return _aware(datetime.fromisoformat(text.replace("Z", "+00:00")), zone)
    except ValueError:
        pass
    try:
        return _aware(parsedate_to_datetime(text), zone)
    except (TypeError, ValueError, IndexError):
        pass
    marked = _tidy(_months_to_numbers(text, "@"))
    matched, found = _search_date(
        marked, ((_DAY_MONTH_YEAR, (2, 1, 0)), (_MONTH_DAY_YEAR, (2, 0, 1)))
    )
    if matched:
        return _aware(found, zone) if found else None
    for candidate_pattern in _NUMERIC:
        try:
            return _aware(datetime.strptime(text, candidate_pattern), zone)
        except ValueError:
            continue
    # A numeric date inside more text ("Mo, 02.03.2026", "02.03.2026 14:30 Uhr",
    # "2026.03.02"): day-month-year with dots (German), or year first.
    _matched, found = _search_date(text, ((_DOTTED_DMY, (2, 1, 0)), (_YEAR_FIRST, (0, 1, 2))))
    return _aware(found, zone) if found else None


def _search_date(
    text: str, patterns: tuple[tuple[re.Pattern[str], tuple[int, int, int]], ...]
) -> tuple[bool, datetime | None]:
    """(matched, date) for the first pattern that matches (its groups, taken in
    ``order``, are year, month, day); the date is None when it is impossible."""
    for regex, order in patterns:
        match = regex.search(text)
        if match:
            groups = [int(g) for g in match.groups()]
            year, month, day = (groups[i] for i in order)
            try:
                return True, datetime(year, month, day)
            except ValueError:
                return True, None
    return False, None


def _aware(value: datetime, zone: ZoneInfo) -> datetime:
    if value.tzinfo is None:
        value = value.replace(tzinfo=zone)
    return value.astimezone(UTC)
