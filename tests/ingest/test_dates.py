"""Dates written for people on partners' news pages, in German, English and Japanese.

``parse_human_date`` is what turns "2. März 2026" on a listing page into the item's
date, so a wrong answer here puts a partner's news at the wrong place in the feed and
the digest. The property test at the end writes any date the way each language
usually does and reads it back.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clusterfeed.ingest.dates import parse_human_date

MARCH_2 = datetime(2026, 3, 2, tzinfo=UTC)

GERMAN_MONTHS = [
    "Januar", "Februar", "März", "April", "Mai", "Juni",
    "Juli", "August", "September", "Oktober", "November", "Dezember",
]  # fmt: skip
# As German newsrooms abbreviate: the short months are written out.
GERMAN_ABBREVIATIONS = [
    "Jan.", "Feb.", "März", "Apr.", "Mai", "Juni",
    "Juli", "Aug.", "Sept.", "Okt.", "Nov.", "Dez.",
]  # fmt: skip
ENGLISH_MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
ENGLISH_ABBREVIATIONS = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
]  # fmt: skip


@pytest.mark.parametrize(
    "text",
    [
        # German
        "2. März 2026",
        "02.03.2026",
        "2.3.2026",
        "Montag, 2. März 2026",
        "2. Maerz 2026",
        "2.\u00a0März\u00a02026",  # as &nbsp; arrives from a CMS
        "  2. März\n 2026 ",
        "2. Mär. 2026",
        # English
        "March 2, 2026",
        "Mar 2, 2026",
        "March 2nd, 2026",
        "2 March 2026",
        "Monday, March 2, 2026",
        "MARCH 2, 2026",
        # Japanese
        "2026年3月2日",
        "2026年03月02日",
        "2026年3月2日（月）",
        "2026 年 3 月 2 日",
        "２０２６年３月２日",  # full-width digits, common on Japanese pages
        # machine forms that also appear on pages
        "2026-03-02",
        "2026/03/02",
    ],
)
def test_written_dates_in_three_languages_give_the_same_day(text: str) -> None:
    assert parse_human_date(text) == MARCH_2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-03-02T09:30:00+01:00", datetime(2026, 3, 2, 8, 30, tzinfo=UTC)),
        ("2026-03-02T09:30:00Z", datetime(2026, 3, 2, 9, 30, tzinfo=UTC)),
        ("Mon, 02 Mar 2026 09:30:00 +0100", datetime(2026, 3, 2, 8, 30, tzinfo=UTC)),
    ],
)
def test_machine_dates_with_a_time_keep_it(text: str, expected: datetime) -> None:
    # A <time datetime="..."> attribute carries the partner's own offset: it wins
    # over the configured time zone.
    assert parse_human_date(text, tz="Asia/Tokyo") == expected


@pytest.mark.parametrize(
    ("text", "pattern", "expected"),
    [
        ("20. November 2026", "%d. %B %Y", date(2026, 11, 20)),
        ("2. März 2026", "%d. %B %Y", date(2026, 3, 2)),
        ("1. Mai 2026", "%d. %B %Y", date(2026, 5, 1)),
        ("20. Nov. 2026", "%d. %b. %Y", date(2026, 11, 20)),
        ("2. März 2026", "%d. %b. %Y", date(2026, 3, 2)),  # "März" takes no dot
        ("20. Nov 2026", "%d. %b %Y", date(2026, 11, 20)),
        ("20-Nov-2026", "%d-%b-%Y", date(2026, 11, 20)),
        ("17-Dez-2026", "%d-%b-%Y", date(2026, 12, 17)),
        ("November 20, 2026", "%B %d, %Y", date(2026, 11, 20)),
        ("Okt. 5, 2026", "%b. %d, %Y", date(2026, 10, 5)),
        ("20.11.2026", "%d.%m.%Y", date(2026, 11, 20)),
        ("20.11.26", "%d.%m.%y", date(2026, 11, 20)),
        ("Dezember 2026, 17.", "%B %Y, %d.", date(2026, 12, 17)),
    ],
)
def test_explicit_patterns_read_german_and_english_month_names(
    text: str, pattern: str, expected: date
) -> None:
    result = parse_human_date(text, pattern)
    assert result is not None, (text, pattern)
    assert result.date() == expected
    assert (result.hour, result.minute, result.tzinfo) == (0, 0, UTC)


def test_explicit_pattern_with_a_time() -> None:
    result = parse_human_date("20. November 2026, 14:30 Uhr", "%d. %B %Y, %H:%M Uhr")
    assert result == datetime(2026, 11, 20, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        # impossible days
        ("30. Februar 2026", None),
        ("31. Juni 2026", None),
        ("Feb 29, 2026", None),  # 2026 is no leap year
        ("2026年2月30日", None),
        ("2026年13月1日", None),
        ("31.04.2026", None),
        ("2026-02-30", None),
        ("30. Februar 2026", "%d. %B %Y"),
        ("31.06.2026", "%d.%m.%Y"),
        # not a date at all, or not in the operator's pattern
        ("", None),
        ("Heute", None),
        ("vor 3 Tagen", None),
        ("November 2026", None),
        ("Weiterlesen …", None),
        ("20.11.2026", "%d. %B %Y"),
        ("20. Brumaire 2026", "%d. %B %Y"),
    ],
)
def test_impossible_or_unreadable_dates_are_none(text: str, pattern: str | None) -> None:
    assert parse_human_date(text, pattern) is None


def test_leap_day_is_possible_in_a_leap_year() -> None:
    assert parse_human_date("29. Februar 2028") == datetime(2028, 2, 29, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "tz", "expected"),
    [
        # A date without a time is midnight where the page was written.
        ("20. November 2026", "Europe/Berlin", datetime(2026, 11, 19, 23, 0, tzinfo=UTC)),
        ("20. Juli 2026", "Europe/Berlin", datetime(2026, 7, 19, 22, 0, tzinfo=UTC)),  # CEST
        ("2026年11月20日", "Asia/Tokyo", datetime(2026, 11, 19, 15, 0, tzinfo=UTC)),
        ("Nov 20, 2026", "America/New_York", datetime(2026, 11, 20, 5, 0, tzinfo=UTC)),
        ("20. November 2026", "UTC", datetime(2026, 11, 20, 0, 0, tzinfo=UTC)),
    ],
)
def test_a_date_is_midnight_in_the_configured_time_zone(
    text: str, tz: str, expected: datetime
) -> None:
    result = parse_human_date(text, tz=tz)
    assert result == expected
    assert result is not None and result.tzinfo == UTC


def test_a_pattern_date_is_midnight_in_the_configured_time_zone() -> None:
    result = parse_human_date("20. November 2026", "%d. %B %Y", "Europe/Berlin")
    assert result == datetime(2026, 11, 19, 23, 0, tzinfo=UTC)


# -- any date, written as people write it, reads back as that date ------------------------


def written_forms(day: date) -> list[str]:
    """The usual ways a German, an English and a Japanese news page writes ``day``."""
    d, m, y = day.day, day.month, day.year
    return [
        f"{d}. {GERMAN_MONTHS[m - 1]} {y}",
        f"{d}. {GERMAN_ABBREVIATIONS[m - 1]} {y}",
        f"{d:02d}.{m:02d}.{y}",
        f"{ENGLISH_MONTHS[m - 1]} {d}, {y}",
        f"{ENGLISH_ABBREVIATIONS[m - 1]} {d}, {y}",
        f"{d} {ENGLISH_MONTHS[m - 1]} {y}",
        f"{y}年{m}月{d}日",
    ]


ZONES = ["UTC", "Europe/Berlin", "Asia/Tokyo", "America/New_York"]


@given(
    day=st.dates(min_value=date(1970, 1, 1), max_value=date(2100, 12, 31)),
    tz=st.sampled_from(ZONES),
)
def test_any_date_written_in_the_three_languages_reads_back(day: date, tz: str) -> None:
    for text in written_forms(day):
        result = parse_human_date(text, tz=tz)
        assert result is not None, text
        local = result.astimezone(ZoneInfo(tz))
        assert (local.date(), local.hour, local.minute) == (day, 0, 0), text


@given(day=st.dates(min_value=date(1970, 1, 1), max_value=date(2100, 12, 31)))
def test_any_date_reads_back_with_the_operators_pattern(day: date) -> None:
    d, m, y = day.day, day.month, day.year
    cases = [
        (f"{d}. {GERMAN_MONTHS[m - 1]} {y}", "%d. %B %Y"),
        (f"{d}. {GERMAN_ABBREVIATIONS[m - 1]} {y}", "%d. %b. %Y"),
        (f"{ENGLISH_MONTHS[m - 1]} {d}, {y}", "%B %d, %Y"),
        (f"{d:02d}-{ENGLISH_ABBREVIATIONS[m - 1]}-{y}", "%d-%b-%Y"),
        (f"{d:02d}.{m:02d}.{y}", "%d.%m.%Y"),
    ]
    for text, pattern in cases:
        result = parse_human_date(text, pattern)
        assert result is not None, (text, pattern)
        assert result.date() == day, (text, pattern)


@pytest.mark.parametrize(
    "text",
    ["Mo, 02.03.2026", "02.03.2026 14:30 Uhr", "2026.03.02", "Stand: 2026-03-02"],
)
def test_a_numeric_date_inside_more_text_is_found(text: str) -> None:
    when = parse_human_date(text, None, "Europe/Berlin")
    assert when is not None
    assert when.astimezone(ZoneInfo("Europe/Berlin")).date() == date(2026, 3, 2)


def test_an_impossible_numeric_date_inside_text_is_none() -> None:
    assert parse_human_date("Mo, 31.02.2026", None, "Europe/Berlin") is None
