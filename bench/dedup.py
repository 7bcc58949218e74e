"""Story matching at scale: 100,000 items from scratch, then 1,000 more (issue 9, point 6).

One run generates a synthetic stream of partner items from the labelled set, then
measures, each in a fresh subprocess (cold imports and a memory peak of its own):

1. ``scratch``: the production engine (items stored through the real store, then
   ``Store.join_new_stories``, as ``fetch`` does; ``stories.benchmark.production_labels``)
   on all N items (default 100,000) in one cycle;
2. ``incremental``: the same store holding those N items, then the timed cycle of
   the 1,000 items that come after them in time;
3. ``naive``: the naive baseline of ``stories.evaluate.naive_labels`` (exact URL plus title
   word Jaccard >= 0.5) on the same N items, with an inverted index on title words
   (the same rule and the same result, see ``naive_indexed``), and the literal
   O(n^2) ``naive_labels`` on a smaller sample, whose time is extrapolated to N.

Each run reports wall time, CPU time and peak RSS, and the pairwise precision and
recall against the generator's own labels (a check that the events it makes are the
ones matching finds). The labelled set's quality is measured too, so a faster
``clusterfeed.stories`` that matches worse cannot go unnoticed.

The generator (``generate``) reuses every story of ``tests/data/stories`` as a
template: each generated event is one template story with its company, people,
product and place names, product codes, amounts, percentages, dates and links
replaced from generated pools (Latin and katakana spellings in step, so a Japanese
version still names the same company), shifted to a random day in two years. The
event keeps the template's partner versions (2 to 5 in English, German and Japanese,
up to 5 days apart) or its single item. Items from about N / 730 per day, so a 5-day
window holds some 700 items at N = 100,000.

Run ``.venv/bin/python bench/dedup.py --help``; ``bench/README.md`` explains the figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from clusterfeed.ingest.dates import MONTHS
from clusterfeed.ingest.normalize import html_to_text
from clusterfeed.stories.evaluate import (
    load_labelled,
    measure,
    naive_labels,
    same_link_groups,
    title_words,  # naive_labels' own rule
)
from clusterfeed.stories.features import (
    STOPWORDS,
    StoryItem,
    katakana_skeletons,
    latin_skeleton,
)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
LABELLED = REPO / "tests" / "data" / "stories"
RESULTS = BENCH / "RESULTS.md"

SEED = 9  # issue 9
START = datetime(2026, 1, 5, tzinfo=UTC)
SPAN_DAYS = 730
NAME_POOL = 40_000  # generated names; one recurs every few months, as a partner does
# Share of a template's own wording (words of one language, not names) that each event
# says with other words of that language. Without it the ~300 events made from one
# template would read alike, two or three of them in every 5-day window, which no
# real stream has.
REWORD = 0.8
CHILD_TIMEOUT_S = 3600.0

# -- the generator -------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """One item of the labelled set, ready for substitution."""

    story: str
    feed: str
    language: str
    title: str
    text: str
    link: str | None
    links: tuple[str, ...]
    published: datetime


# Capitalized words that stay: what every story of a region says (countries,
# institutions, company-type words, titles). Frequent ones are found by counting too.
_KEEP_TEXT = """
    the a an and in on of for with at by from to this that its our new first
    january february march april may june july august september october november
    december monday tuesday wednesday thursday friday saturday sunday
    ceo cfo cto coo cmo cso prof dr phd md mba gmbh inc ag ltd se kg plc co corp llc
    usd eur jpy chf gbp cet cest pdf html iso din ifrs ebitda
    european europe germany german japan japanese eu us usa uk america american
    therapeutics diagnostics pharma pharmaceuticals biologics biosciences bioscience
    medical health holdings foundation institute university hospital clinic center
    centre lab labs laboratory bio biotech discovery capital invest fund ventures
    digital systems technologies technology group network campus ministry cluster
    frontier innovation medtech analytics partners association society agency
    phase series part webinar newsletter award prize day conference summit forum
    english deutsch deutschland danish swedish scandinavian nordic swiss
    administration advisory alliance bank central chamber chief commerce commission
    communications convention drugs economic economics executive family federal food
    manager meeting minister monitoring officer park parliament president print senator
    senior south north union united vice night nature highlights flash fold harder tie car
"""
_KEEP = frozenset(_KEEP_TEXT.split())
_NUMBER_TEXT = """
    thousand tsd million millionen mio billion milliarden mrd bn mn usd eur jpy chf gbp
    dollar dollars euro euros yen prozent percent cent
"""
_NUMBER_WORDS = frozenset(_NUMBER_TEXT.split())
_FIXED = STOPWORDS | _NUMBER_WORDS | _KEEP | frozenset(MONTHS)
_LETTERS = re.compile(r"[A-Za-zÀ-ÖØ-öø-ÿ]+")
_KATAKANA_WORD = re.compile(r"[\u30a0-\u30fa\u30fc-\u30ff]+")
_URL_IN_TEXT = re.compile(r"https?://[^\s\"'<>]+")
# Unlike stories.features, also inside Japanese text ("シートOST-12の"), where \b fails.
_CODE = re.compile(r"(?<![A-Za-z0-9])([A-Za-z]{1,6})(-?)(\d{2,5})([A-Za-z]?)(?![A-Za-z0-9])")
_CODE_KEEP = frozenset({"Q", "H", "KW", "CW", "FY", "COVID", "ISO", "DIN"})

# Syllables with a Latin and a katakana spelling that pykakasi reads back alike, so a
# generated name and its Japanese rendering give the same sound skeleton.
_SYLLABLES = (
    ("ka", "カ"), ("ki", "キ"), ("ko", "コ"), ("ke", "ケ"), ("ku", "ク"), ("sa", "サ"),
    ("so", "ソ"), ("se", "セ"), ("ta", "タ"), ("to", "ト"), ("te", "テ"), ("na", "ナ"),
    ("ni", "ニ"), ("no", "ノ"), ("ne", "ネ"), ("ma", "マ"), ("mi", "ミ"), ("mo", "モ"),
    ("me", "メ"), ("ra", "ラ"), ("ri", "リ"), ("ro", "ロ"), ("re", "レ"), ("ru", "ル"),
    ("ba", "バ"), ("bi", "ビ"), ("bo", "ボ"), ("be", "ベ"), ("da", "ダ"), ("do", "ド"),
    ("de", "デ"), ("ga", "ガ"), ("go", "ゴ"), ("ha", "ハ"), ("ho", "ホ"), ("va", "ヴァ"),
    ("vi", "ヴィ"), ("la", "ラ"), ("li", "リ"), ("lo", "ロ"),
)  # fmt: skip
_FINALS = (("", ""), ("n", "ン"), ("r", "ル"), ("x", "クス"), ("s", "ス"))

_EN_MONTH_TEXT = (
    "January February March April May June July August September October November December"
)
_EN_MONTHS = _EN_MONTH_TEXT.split()
_DE_MONTH_TEXT = (
    "Januar Februar März April Mai Juni Juli August September Oktober November Dezember"
)
_DE_MONTH_NAMES = _DE_MONTH_TEXT.split()
_MONTH_ALT = "|".join(sorted(map(re.escape, MONTHS), key=len, reverse=True))
_DATES = re.compile(
    rf"(?P<dmy>\b(?P<d1>\d{{1,2}})(?P<p1>\.?\s+)(?P<m1>{_MONTH_ALT})(?P<p2>\.?\s+)(?P<y1>\d{{4}}))"
    rf"|(?P<mdy>\b(?P<m2>{_MONTH_ALT})(?P<p3>\.?\s+)(?P<d2>\d{{1,2}})(?P<p4>(?:st|nd|rd|th)?,?\s+)"
    rf"(?P<y2>\d{{4}}))"
    r"|(?P<ja>(?P<y3>\d{4})年(?P<m3>\d{1,2})月(?P<d3>\d{1,2})日)"
    r"|(?P<jamd>(?<![\d年])(?P<m4>\d{1,2})月(?P<d4>\d{1,2})日)"
    r"|(?P<num>\b(?P<d5>\d{1,2})\.(?P<m5>\d{1,2})\.(?P<y5>\d{4})\b)"
    r"|(?P<year>\b20[2-3]\d\b)",
    re.IGNORECASE,
)
_CUR = r"(?:USD|US\$|EUR|€|\$|JPY|CHF|GBP|£|US-Dollar|Dollars?|Euros?|Yen)"
_SCALE = r"(?:thousand|Tsd\.?|million|Millionen|Mio\.?|mn|m|billion|Milliarden|Mrd\.?|bn)"
_AMOUNTS = re.compile(
    rf"(?:{_CUR}\s?(?P<n1>\d+(?:[.,]\d+)*)\s?(?:{_SCALE})?\b)"
    rf"|(?:(?P<n2>\d+(?:[.,]\d+)*)\s?(?:{_SCALE}\s?(?:of\s)?)?{_CUR})",
    re.IGNORECASE,
)
_JA_AMOUNT = re.compile(
    r"(?:(?P<cho>\d+(?:\.\d+)?)兆)?(?:(?P<oku>\d+(?:\.\d+)?)億)?(?:(?P<man>\d+(?:\.\d+)?)万)?"
    r"(?P<units>\d+)?(?P<cur>米ドル|ドル|ユーロ|円)"
)
_PERCENT = re.compile(
    r"(?P<n>\d+(?:[.,]\d+)?)(?P<unit>\s?(?:%|％|Prozent|percent|per cent|パーセント))",
    re.IGNORECASE,
)


def _kana_skeleton(kana: str) -> str | None:
    found = katakana_skeletons(kana)
    return next(iter(found)) if len(found) == 1 else None


def _name_pool(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """Pseudo-names in Latin and katakana spelling, all different. The syllables are
    chosen so that pykakasi reads the katakana back to the Latin sound skeleton."""
    pool: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(pool) < size:
        parts = [rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3, 3, 4)))]
        final = rng.choice(_FINALS)
        latin = "".join(p[0] for p in parts) + final[0]
        kana = "".join(p[1] for p in parts) + final[1]
        skeleton = latin_skeleton(latin)
        if latin in seen or len(skeleton) < 3:
            continue
        seen.add(latin)
        pool.append((latin, kana))
    return pool


def _common_words(stories: Sequence[Sequence[Template]]) -> set[str]:
    """Words that a fifth of the template stories or more use ("company", "patients")."""
    spread: Counter[str] = Counter()
    for story in stories:
        spread.update(
            {w.lower() for t in story for text in (t.title, t.text) for w in _LETTERS.findall(text)}
        )
    return {w for w, n in spread.items() if n > 0.2 * len(stories)}


def _read_templates() -> list[list[Template]]:
    by_story: defaultdict[str, list[Template]] = defaultdict(list)
    for path in sorted(LABELLED.glob("labelled-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            summary = row["summary"]
            by_story[row["story"]].append(
                Template(
                    story=row["story"],
                    feed=row["feed"],
                    language=row["language"],
                    title=row["title"],
                    text=html_to_text(summary),
                    link=row.get("link"),
                    links=tuple(re.findall(r"href=[\"']([^\"']+)", summary)),
                    published=datetime.fromisoformat(row["published"]),
                )
            )
    return [sorted(items, key=lambda t: t.published) for items in by_story.values()]


_TITLE_BEFORE = re.compile(r"\b(?:Dr|Prof|Mr|Mrs|Ms|St|Co|Inc|Ltd|Corp)\.$")


def _mid_sentence(text: str, start: int) -> bool:
    before = text[:start].rstrip(" \"'„“«»(")
    return bool(before) and (before[-1] not in ".!?:;" or bool(_TITLE_BEFORE.search(before)))


def _name_slots(stories: Sequence[Sequence[Template]]) -> set[str]:
    """The words that are names, to be replaced: capitalized inside an English
    sentence, or in Latin script in Japanese text, or with capitals inside
    ("MedTech", "REGENHEART"), and not said by many stories (those are the region's
    own: its cluster, its cities)."""
    slots: set[str] = set()
    spread: Counter[str] = Counter()
    lower_case: set[str] = set()  # a word also written in lower case is no name
    for story in stories:
        in_story: set[str] = set()
        for t in story:
            for text in (t.title, t.text, t.feed):
                for m in _LETTERS.finditer(text):
                    word = m.group(0)
                    lowered = word.lower()
                    in_story.add(lowered)
                    if word == lowered:
                        lower_case.add(word)
                    if len(word) < 3 or lowered in _KEEP or not word[0].isupper():
                        continue
                    inner_capital = any(c.isupper() for c in word[1:])
                    if (
                        inner_capital
                        or t.language == "ja"
                        or (t.language == "en" and _mid_sentence(text, m.start()))
                    ):
                        slots.add(lowered)
        spread.update(in_story)
    common = {w for w, n in spread.items() if n >= 0.06 * len(stories)}
    return slots - common - lower_case - set(MONTHS)


@dataclass(frozen=True)
class _Shape:
    """What one template story has to substitute, found once."""

    names: tuple[str, ...]
    names_re: re.Pattern[str]
    words: Mapping[str, str]  # a word of one version's own wording -> its language
    words_re: re.Pattern[str]
    katakana: Mapping[str, str]  # katakana word -> the name it renders
    codes: tuple[tuple[str, int, int], ...]  # (key, letters, digits)
    percents: tuple[tuple[str, int], ...]  # (key, decimals)


@dataclass
class _Event:
    """The substitutions that turn one template story into one generated event."""

    number: int
    shape: _Shape
    names: dict[str, tuple[str, str]]
    words: dict[str, str]
    codes: dict[str, str]
    factor: Decimal
    percents: dict[str, Decimal]
    shift: timedelta
    day_shift: int
    year_shift: int


def _words_re(words: Iterable[str]) -> re.Pattern[str]:
    alternatives = "|".join(sorted(map(re.escape, words), key=len, reverse=True)) or "(?!)"
    return re.compile(
        rf"(?<![A-Za-zÀ-ÖØ-öø-ÿ])({alternatives})(?![A-Za-zÀ-ÖØ-öø-ÿ])", re.IGNORECASE
    )


class Generator:
    def __init__(self, seed: int = SEED) -> None:
        self.rng = random.Random(seed)
        self.stories = _read_templates()
        self.slots = _name_slots(self.stories)
        self.pool = _name_pool(self.rng, NAME_POOL)
        self._slot_re = _words_re(self.slots)
        self._common = _common_words(self.stories)
        self._shapes = [self._shape(story) for story in self.stories]
        self.vocabulary = self._vocabulary()

    def _shape(self, story: Sequence[Template]) -> _Shape:
        names: dict[str, None] = {}
        codes: dict[str, tuple[str, int, int]] = {}
        percents: dict[str, tuple[str, int]] = {}
        for t in story:
            for text in (t.title, t.text, t.feed, t.link or "", *t.links):
                for m in self._slot_re.finditer(text):
                    names.setdefault(m.group(1).lower())
            for text in (t.title, t.text):
                for m in _CODE.finditer(text):
                    letters, _, digits, suffix = m.groups()
                    key = (letters + digits + suffix).upper()
                    if letters.upper() not in _CODE_KEEP:
                        codes.setdefault(key, (key, len(letters), len(digits)))
                for m in _PERCENT.finditer(text):
                    key = f"{_decimal(m.group('n'), t.language).normalize():f}"
                    decimals = len(key.partition(".")[2])
                    percents.setdefault(key, (key, decimals))
        return _Shape(
            names=tuple(names),
            names_re=_words_re(names),
            words=(own := self._own_wording(story)),
            words_re=_words_re(own),
            katakana=self._katakana_slots(story, names),
            codes=tuple(codes.values()),
            percents=tuple(percents.values()),
        )

    def _vocabulary(self) -> dict[str, list[str]]:
        """The words that can be reworded, once per use in the templates: a random
        pick is a word as frequent in the stream as in the labelled set."""
        words: dict[str, list[str]] = {"en": [], "de": []}
        for story, shape in zip(self.stories, self._shapes, strict=True):
            for t in story:
                if t.language in words:
                    words[t.language].extend(
                        w.lower()
                        for text in (t.title, t.text)
                        for w in _LETTERS.findall(text)
                        if shape.words.get(w.lower()) == t.language
                    )
        return words

    def _own_wording(self, story: Sequence[Template]) -> dict[str, str]:
        """The words that only one language's versions of the story use, and that are
        no names: English words written in lower case, German words of any case that
        no English or Japanese version has. Names and the words that versions in two
        languages share are the evidence across languages, and stay."""
        seen: defaultdict[str, set[str]] = defaultdict(set)
        lower_in_english: set[str] = set()
        for t in story:
            for text in (t.title, t.text):
                for w in _LETTERS.findall(text):
                    seen[w.lower()].add(t.language)
                    if t.language == "en" and w.islower():
                        lower_in_english.add(w)
        own: dict[str, str] = {}
        for word, languages in seen.items():
            if (
                len(word) < 3
                or word in _FIXED
                or word in self.slots
                or word in self._common
                or len(languages) != 1
            ):
                continue
            language = next(iter(languages))
            if language == "de" or (language == "en" and word in lower_in_english):
                own[word] = language
        return own

    def _katakana_slots(self, story: Sequence[Template], names: Iterable[str]) -> dict[str, str]:
        """Katakana words of the story's Japanese items that render one of its names."""
        # the longer name wins where two give one skeleton ("Trave" and "TRV")
        skeletons = {latin_skeleton(n): n for n in sorted(names, key=len) if len(n) >= 3}
        found: dict[str, str] = {}
        for t in story:
            if t.language != "ja":
                continue
            for text in (t.title, t.text):
                for part in _KATAKANA_WORD.findall(text):
                    skeleton = _kana_skeleton(part) if len(part) >= 2 else None
                    if skeleton and skeleton in skeletons:
                        found[part] = skeletons[skeleton]
        return found

    # -- one event

    def _event(self, number: int, shape: _Shape, first: datetime, anchor: datetime) -> _Event:
        rng = self.rng
        letters = "ABCDEFGHJKLMNPRSTVWXZ"
        codes = {
            key: "".join(rng.choice(letters) for _ in range(n_letters))
            + "|"
            + str(rng.randrange(10 ** (n_digits - 1), 10**n_digits))
            for key, n_letters, n_digits in shape.codes
        }
        percents = {
            key: Decimal(rng.randrange(1, 100 * 10**decimals)).scaleb(-decimals)
            for key, decimals in shape.percents
        }
        return _Event(
            number=number,
            shape=shape,
            names={word: rng.choice(self.pool) for word in shape.names},
            words={
                word: rng.choice(self.vocabulary[language])
                for word, language in shape.words.items()
                if rng.random() < REWORD
            },
            codes=codes,
            factor=Decimal(rng.randrange(25, 400)) / 100,
            percents=percents,
            shift=anchor - first,
            day_shift=(anchor.date() - first.date()).days,
            year_shift=anchor.year - first.year,
        )

    # -- substitution: each template text is cut once into literal pieces and
    # -- replacements, so an event is a join (100,000 items in seconds, not minutes)

    def _compile(self, text: str, language: str, shape: _Shape, *, url: bool = False) -> _Pieces:
        spans: list[tuple[int, int, Callable[[_Event], str]]] = []

        def claim(start: int, end: int, make: Callable[[_Event], str]) -> None:
            if all(end <= a or start >= b for a, b, _ in spans):
                spans.append((start, end, make))

        if not url:
            for m in _URL_IN_TEXT.finditer(text):
                claim(*m.span(), self._url_maker(m.group(0), shape))
        for m in _CODE.finditer(text):
            claim(*m.span(), _code_maker(m))
        if not url:
            for m in _AMOUNTS.finditer(text):
                group = "n1" if m.group("n1") is not None else "n2"
                claim(*m.span(group), _amount_maker(m.group(group), language))
            for m in _JA_AMOUNT.finditer(text):
                if m.group("cho") or m.group("oku") or m.group("man"):
                    claim(m.start(), m.start("cur"), _ja_amount_maker(m))
            for m in _PERCENT.finditer(text):
                claim(*m.span("n"), _percent_maker(m.group("n"), language))
        for m in _DATES.finditer(text):
            claim(*m.span(), _date_maker(m))
        if not url:
            for m in _KATAKANA_WORD.finditer(text):
                if m.group(0) in shape.katakana:
                    claim(*m.span(), _katakana_maker(shape.katakana[m.group(0)]))
        for m in shape.names_re.finditer(text):
            claim(*m.span(), _name_maker(m.group(0)))
        if not url:
            for m in shape.words_re.finditer(text):
                claim(*m.span(), _word_maker(m.group(0)))
        pieces: list[str | Callable[[_Event], str]] = []
        at = 0
        for start, end, make in sorted(spans, key=lambda span: span[0]):
            pieces.append(text[at:start])
            pieces.append(make)
            at = end
        pieces.append(text[at:])
        return tuple(p for p in pieces if p != "")

    def _url_maker(self, url: str, shape: _Shape) -> Callable[[_Event], str]:
        """The event's version of a link: its names, codes and year, and the event
        number in the last path segment, so no two events share a page."""
        head, _, query = url.partition("?")
        head = head.rstrip("/")
        stem, dot, extension = head.rpartition(".")
        if dot and "/" not in extension and head.count("/") > 2:
            head, tail = stem, "." + extension
        else:
            tail = ""
        pieces = self._compile(head, "en", shape, url=True)
        after = tail + (f"?{query}" if query else "")
        return lambda event: f"{_render(pieces, event)}-{event.number}{after}"

    def events(self, count_items: int) -> Iterable[tuple[str, StoryItem]]:
        """(event id, item) pairs, about ``count_items`` of them, in no particular order."""
        compiled = [
            [
                (
                    t,
                    self._compile(t.feed, t.language, shape, url=True),
                    self._compile(t.title, t.language, shape),
                    self._compile(t.text, t.language, shape),
                    self._url_maker(t.link, shape) if t.link else None,
                    tuple(self._url_maker(u, shape) for u in t.links),
                )
                for t in story
            ]
            for story, shape in zip(self.stories, self._shapes, strict=True)
        ]
        made = 0
        number = 0
        while made < count_items:
            which = self.rng.randrange(len(self.stories))
            story = self.stories[which]
            anchor = START + timedelta(seconds=self.rng.uniform(0, SPAN_DAYS * 86400))
            event = self._event(number, self._shapes[which], story[0].published, anchor)
            label = f"e{number:06d}"
            for k, (t, feed, title, text, link, links) in enumerate(compiled[which]):
                if made >= count_items:
                    break
                yield (
                    label,
                    StoryItem(
                        id=f"{label}-{k + 1}",
                        feed=_render(feed, event),
                        language=t.language,
                        title=_render(title, event),
                        text=_render(text, event),
                        link=link(event) if link else None,
                        published=t.published + event.shift,
                        links=tuple(u(event) for u in links),
                    ),
                )
                made += 1
            number += 1


_Pieces = tuple["str | Callable[[_Event], str]", ...]


def _render(pieces: _Pieces, event: _Event) -> str:
    return "".join(p if isinstance(p, str) else p(event) for p in pieces)


def _name_maker(word: str) -> Callable[[_Event], str]:
    key = word.lower()
    if word.isupper() and len(word) > 1:
        return lambda e: e.names[key][0].upper()
    if word.islower():
        return lambda e: e.names[key][0]
    if any(c.isupper() for c in word[1:]):
        # "MedTech" keeps two capitals
        def camel(e: _Event) -> str:
            latin = e.names[key][0]
            cut = len(latin) // 2
            return latin[:cut].capitalize() + latin[cut:].capitalize()

        return camel
    return lambda e: e.names[key][0].capitalize()


def _word_maker(word: str) -> Callable[[_Event], str]:
    key = word.lower()

    def make(e: _Event) -> str:
        new = e.words.get(key)
        if new is None:
            return word
        if word.isupper() and len(word) > 1:
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return make


def _katakana_maker(name: str) -> Callable[[_Event], str]:
    return lambda e: e.names[name][1]


def _code_maker(m: re.Match[str]) -> Callable[[_Event], str]:
    letters, hyphen, digits, suffix = m.groups()
    key = (letters + digits + suffix).upper()
    original = m.group(0)
    lower = letters.islower()

    def make(e: _Event) -> str:
        new = e.codes.get(key)
        if new is None:
            return original
        new_letters, new_digits = new.split("|")
        return f"{new_letters.lower() if lower else new_letters}{hyphen}{new_digits}{suffix}"

    return make


def _amount_maker(number: str, language: str) -> Callable[[_Event], str]:
    value = _decimal(number, language)
    comma = language == "de"
    thousands = _has_thousands(number, language)
    return lambda e: _format(_significant(value * e.factor), comma, thousands=thousands)


def _ja_amount_maker(m: re.Match[str]) -> Callable[[_Event], str]:
    value = sum(
        (
            Decimal(m.group(k) or 0) * unit
            for k, unit in (("cho", 10**12), ("oku", 10**8), ("man", 10**4))
        ),
        Decimal(m.group("units") or 0),
    )
    return lambda e: _japanese_amount(_significant(value * e.factor))


def _percent_maker(number: str, language: str) -> Callable[[_Event], str]:
    key = f"{_decimal(number, language).normalize():f}"
    comma = language == "de"
    return lambda e: _format(e.percents[key], comma, thousands=False)


def _date_maker(m: re.Match[str]) -> Callable[[_Event], str]:
    kind = m.lastgroup
    original = m.group(0)
    if kind == "year":
        year = int(original)
        return lambda e: str(year + e.year_shift)
    try:
        if kind == "dmy":
            old = date(int(m["y1"]), MONTHS[m["m1"].lower()], int(m["d1"]))
        elif kind == "mdy":
            old = date(int(m["y2"]), MONTHS[m["m2"].lower()], int(m["d2"]))
        elif kind == "ja":
            old = date(int(m["y3"]), int(m["m3"]), int(m["d3"]))
        elif kind == "jamd":
            old = date(2026, int(m["m4"]), int(m["d4"]))
        else:
            old = date(int(m["y5"]), int(m["m5"]), int(m["d5"]))
    except ValueError:
        return lambda e: original
    groups = m.groupdict()

    def make(e: _Event) -> str:
        new = old + timedelta(days=e.day_shift)
        if kind == "dmy":
            month = _month_name(groups["m1"], new.month)
            return f"{new.day}{groups['p1']}{month}{groups['p2']}{new.year}"
        if kind == "mdy":
            month = _month_name(groups["m2"], new.month)
            return f"{month}{groups['p3']}{new.day}{groups['p4']}{new.year}"
        if kind == "ja":
            return f"{new.year}年{new.month}月{new.day}日"
        if kind == "jamd":
            return f"{new.month}月{new.day}日"
        d, mo = len(groups["d5"]), len(groups["m5"])
        return f"{new.day:0{d}d}.{new.month:0{mo}d}.{new.year}"

    return make


def _decimal(number: str, language: str) -> Decimal:
    if language == "de":
        return Decimal(number.replace(".", "").replace(",", "."))
    return Decimal(number.replace(",", ""))


def _significant(value: Decimal, digits: int = 3) -> Decimal:
    """An amount as a press release would write it: three significant digits."""
    if not value:
        return value
    exponent = value.adjusted() - digits + 1
    return value.quantize(Decimal(1).scaleb(exponent)).normalize()


def _has_thousands(number: str, language: str) -> bool:
    separator = "." if language == "de" else ","
    return bool(re.search(rf"\d\{separator}\d{{3}}(?!\d)", number)) and not re.search(
        rf"\d\{separator}\d{{1,2}}$", number
    )


def _format(value: Decimal, comma: bool, *, thousands: bool) -> str:
    value = value.normalize()
    if value == value.to_integral_value():
        text = f"{int(value):,}" if thousands else str(int(value))
        return text.replace(",", ".") if comma else text
    text = f"{value:f}"
    return text.replace(".", ",") if comma else text


def _japanese_amount(value: Decimal) -> str:
    out = ""
    for unit, mark in ((Decimal(10**12), "兆"), (Decimal(10**8), "億")):
        whole = int(value // unit)
        if whole:
            out += f"{whole}{mark}"
            value -= whole * unit
    if value >= 10**4:
        out += f"{(value / 10**4).normalize():f}万"
        value = Decimal(0)
    if value:
        out += str(int(value))
    return out


def _month_name(original: str, month: int) -> str:
    """The new month in the language and length of the original ("März", "Mar")."""
    lowered = original.lower()
    german = lowered in {"januar", "februar", "märz", "maerz", "mai", "juni", "juli"}
    german |= lowered in {"oktober", "dezember", "jänner", "mär", "mrz", "okt", "dez"}
    name = _DE_MONTH_NAMES[month - 1] if german else _EN_MONTHS[month - 1]
    full = {m.lower() for m in (*_EN_MONTHS, *_DE_MONTH_NAMES)} | {"maerz", "jänner"}
    return name if lowered in full else name[:3]


def generate(items: int, seed: int = SEED) -> tuple[list[StoryItem], dict[str, str]]:
    """``items`` items in time order, and the event each belongs to."""
    generator = Generator(seed)
    pairs = list(generator.events(items))
    pairs.sort(key=lambda p: (p[1].published, p[1].id))
    return [p[1] for p in pairs], {p[1].id: p[0] for p in pairs}


# -- the naive baseline with an index -------------------------------------------------------


def naive_indexed(items: Sequence[StoryItem], min_overlap: float = 0.5) -> dict[str, object]:
    """``stories.evaluate.naive_labels`` (the same links, the same title words, the same
    Jaccard test), without comparing every pair of titles: prefix filtering.

    With the title words of all items in one order, rarest first, two word sets with
    Jaccard >= t share a word among the first ``len - ceil(t * len) + 1`` of each (they
    share at least ``ceil(t * len)`` words of either). Only those prefixes are indexed
    and probed; every pair found is tested exactly as ``naive_labels`` tests it. Pairs
    are never limited by time, as in ``naive_labels``.
    """
    uf = same_link_groups(items)
    words = {i.id: title_words(i.title) for i in items}
    frequency = Counter(w for ws in words.values() for w in ws)
    index: defaultdict[str, list[str]] = defaultdict(list)
    for item in items:
        mine = words[item.id]
        if not mine:
            continue
        ordered = sorted(mine, key=lambda w: (frequency[w], w))
        prefix = ordered[: len(ordered) - math.ceil(min_overlap * len(ordered)) + 1]
        seen: set[str] = set()
        for word in prefix:
            for other in index[word]:
                if other in seen:
                    continue
                seen.add(other)
                theirs = words[other]
                if len(mine & theirs) / len(mine | theirs) >= min_overlap:
                    uf.union(other, item.id)
            index[word].append(item.id)
    return {i.id: uf.find(i.id) for i in items}


def pairwise(predicted: Mapping[str, object], truth: Mapping[str, object]) -> tuple[float, float]:
    """``stories.evaluate.pairwise_scores`` by counting, not listing pairs: the naive baseline
    makes groups of thousands at this scale, whose pairs would not fit in memory."""

    def pairs(sizes: Iterable[int]) -> int:
        return sum(n * (n - 1) // 2 for n in sizes)

    got = pairs(Counter(predicted[i] for i in truth).values())
    want = pairs(Counter(truth.values()).values())
    both = pairs(Counter((predicted[i], truth[i]) for i in truth).values())
    return (both / got if got else 1.0), (both / want if want else 1.0)


# -- measuring ------------------------------------------------------------------------------


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _machine_busy_s() -> float:
    """CPU seconds all cores have spent on anything but idling since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


@dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    others_cpu_s: float = 0.0  # what the rest of the machine used meanwhile


def timed(work: Callable[[], Any]) -> tuple[Timing, Any]:
    busy0, cpu0, wall0 = _machine_busy_s(), time.process_time(), time.perf_counter()
    result = work()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    others = max(0.0, _machine_busy_s() - busy0 - cpu)
    return Timing(wall, cpu, others), result


def _load(path: Path) -> tuple[list[StoryItem], dict[str, str]]:
    with path.open("rb") as handle:
        items, truth = pickle.load(handle)
    return items, truth


def run_child(kind: str, data: Path, n: int, extra: int, sample: int) -> dict[str, Any]:
    """One measurement, in this (fresh) process; the figures as a dict."""
    # The production engine: the items stored through the real store and matched by
    # ``Store.join_new_stories`` after each cycle, as ``fetch`` does.
    from clusterfeed.stories.benchmark import production_labels, row_of
    from clusterfeed.stories.matcher import StoryMatcher

    items, truth = _load(data)
    base, later = items[:n], items[n : n + extra]
    gc.collect()
    out: dict[str, Any] = {"kind": kind, "rss_before_mb": _rss_mb()}
    if kind == "scratch":
        rows = [row_of(i, truth[i.id]) for i in base]
        timing, labels = timed(lambda: production_labels([rows], StoryMatcher()))
        out["items"] = len(base)
        out["stories"] = len(set(labels.values()))
        out["precision"], out["recall"] = pairwise(labels, {i.id: truth[i.id] for i in base})
    elif kind == "incremental":
        marks: list[tuple[float, float, float]] = []

        def mark() -> None:
            marks.append((time.perf_counter(), time.process_time(), _machine_busy_s()))

        cycles = [[row_of(i, truth[i.id]) for i in part] for part in (base, later)]
        _, labels = timed(lambda: production_labels(cycles, StoryMatcher(), after_cycle=mark))
        (wall0, cpu0, busy0), (wall1, cpu1, busy1) = marks
        timing = Timing(wall1 - wall0, cpu1 - cpu0, max(0.0, busy1 - busy0 - (cpu1 - cpu0)))
        out["items"] = len(later)
        before = {labels[i.id] for i in base}
        out["joined_existing"] = sum(1 for i in later if labels[i.id] in before)
        out["precision"], out["recall"] = pairwise(labels, {i.id: truth[i.id] for i in items})
    elif kind == "naive":
        timing, labels = timed(lambda: naive_indexed(base))
        out["items"] = len(base)
        out["precision"], out["recall"] = pairwise(labels, {i.id: truth[i.id] for i in base})
        out["largest_group"] = max(Counter(labels.values()).values())
    elif kind == "naive-sample":
        subset = base[:sample]
        timing, labels = timed(lambda: naive_labels(subset))
        out["items"] = len(subset)
        indexed = naive_indexed(subset)
        out["same_as_indexed"] = _partition(labels) == _partition(indexed)
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    out.update(wall_s=timing.wall_s, cpu_s=timing.cpu_s, others_cpu_s=timing.others_cpu_s)
    out["peak_mb"] = _peak_mb()
    return out


def _partition(labels: Mapping[str, object]) -> list[tuple[str, ...]]:
    groups: defaultdict[object, list[str]] = defaultdict(list)
    for item, label in labels.items():
        groups[label].append(item)
    return sorted(tuple(sorted(g)) for g in groups.values())


# -- the run ---------------------------------------------------------------------------------

RUNS = ("scratch", "incremental", "naive", "naive-sample")
GOAL_SCRATCH_S = 60.0
GOAL_SCRATCH_MB = 1000.0  # 1 GB = 10^9 bytes
GOAL_INCREMENTAL_S = 2.0


def wait_for_quiet(limit_s: float, threshold: float = 0.15) -> float:
    """Wait (at most ``limit_s``) until the machine has been nearly idle for 5 s;
    the busy share of the cores in the last second seen."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + limit_s
    quiet_for, told, share = 0, False, 0.0
    while limit_s > 0:
        busy0 = _machine_busy_s()
        time.sleep(1.0)
        share = (_machine_busy_s() - busy0) / cores
        quiet_for = quiet_for + 1 if share < threshold else 0
        if quiet_for >= 5 or time.monotonic() > deadline:
            break
        if not told and share >= threshold:
            print(f"  waiting up to {limit_s:.0f} s for a quiet machine ({share:.0%} busy)")
            told = True
    return share


def measure_in_child(kind: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    try:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", kind]
        command += ["--data", str(data), "--out", str(out), "--items", str(args.items)]
        command += ["--new", str(args.new), "--naive-sample", str(args.naive_sample)]
        subprocess.run(command, check=True, timeout=CHILD_TIMEOUT_S)
        result: dict[str, Any] = json.loads(out.read_text())
        return result
    finally:
        out.unlink(missing_ok=True)


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "ram": f"{memory_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
    }


def stream_shape(items: Sequence[StoryItem], truth: Mapping[str, str]) -> dict[str, float]:
    sizes = Counter(truth[i.id] for i in items)
    times = sorted(i.published.timestamp() for i in items)
    window = 5 * 86400.0
    per_window = [
        _count_between(times, t, t + window)
        for t in times[:: max(1, len(times) // 200)]
        if t + window <= times[-1]
    ]
    pairs = defaultdict(int)
    by_event: defaultdict[str, list[StoryItem]] = defaultdict(list)
    for item in items:
        by_event[truth[item.id]].append(item)
    for members in by_event.values():
        for x, a in enumerate(members):
            for b in members[x + 1 :]:
                pairs["all"] += 1
                pairs["cross"] += a.language != b.language
    return {
        "items": len(items),
        "events": len(sizes),
        "multi_source_events": sum(1 for n in sizes.values() if n >= 2),
        "items_in_multi_source": sum(n for n in sizes.values() if n >= 2),
        "cross_language_pair_share": pairs["cross"] / pairs["all"] if pairs["all"] else 0.0,
        "items_per_5_days": sorted(per_window)[len(per_window) // 2] if per_window else 0,
        "days": (times[-1] - times[0]) / 86400 if times else 0.0,
    }


def _count_between(times: Sequence[float], low: float, high: float) -> int:
    from bisect import bisect_left, bisect_right

    return bisect_right(times, high) - bisect_left(times, low)


def labelled_quality() -> dict[str, Any]:
    """The labelled sets a-c through the production path (as ``bench/stories.py``)."""
    from clusterfeed.stories.benchmark import cycles_of, load_rows, production_labels, score
    from clusterfeed.stories.matcher import StoryMatcher

    data = load_labelled(LABELLED)
    rows, negatives = load_rows(LABELLED)
    ours = score(production_labels(cycles_of(rows, 1), StoryMatcher()), rows, negatives)
    naive = measure("naive", naive_labels(data.items), data)
    return {
        "precision": ours.precision,
        "recall": ours.recall,
        "merged_hard_negatives": ours.merged_hard_negatives,
        "naive_precision": naive.precision,
        "naive_recall": naive.recall,
    }


def report(
    args: argparse.Namespace,
    shape: Mapping[str, float],
    runs: Mapping[str, Mapping[str, Any]],
    quality: Mapping[str, Any],
    command: str,
) -> str:
    info = machine()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    cores = os.cpu_count() or 1
    scratch, incremental = runs["scratch"], runs["incremental"]
    naive, sample = runs.get("naive"), runs.get("naive-sample")
    n = args.items

    def others(run: Mapping[str, Any]) -> str:
        share = run["others_cpu_s"] / (run["wall_s"] * cores) if run["wall_s"] else 0.0
        return f"{share:.0%}"

    lines = [
        f"## Story matching at scale (`bench/dedup.py`), {now}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM; "
        f"Python {info['python']}.  ",
        f"Command: `{command}`",
        "",
        f"Generated stream (seed {SEED}): {shape['items']:,} items over "
        f"{shape['days']:.0f} days, {shape['events']:,} events, "
        f"{shape['multi_source_events']:,} of them with 2-5 versions "
        f"({shape['items_in_multi_source']:,} items; "
        f"{shape['cross_language_pair_share']:.0%} of their same-event pairs cross "
        f"languages); a median of {shape['items_per_5_days']:.0f} items in a 5-day window.",
        "",
        "| run | items | wall s | CPU s | peak RSS MB | RSS before MB | precision | recall "
        "| other load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def row(name: str, run: Mapping[str, Any]) -> str:
        p = f"{run['precision']:.3f}" if "precision" in run else "–"
        r = f"{run['recall']:.3f}" if "recall" in run else "–"
        return (
            f"| {name} | {run['items']:,} | {run['wall_s']:.2f} | {run['cpu_s']:.2f} "
            f"| {run['peak_mb']:.0f} | {run['rss_before_mb']:.0f} | {p} | {r} | {others(run)} |"
        )

    lines.append(row("clusterfeed, from scratch: one cycle, store + `join_new_stories`", scratch))
    lines.append(row(f"clusterfeed, {args.new:,} more to {n:,}: the timed cycle", incremental))
    if naive is not None:
        lines.append(row("naive baseline (exact URL + title Jaccard >= 0.5), indexed", naive))
    if sample is not None:
        lines.append(row("naive baseline as written (`naive_labels`, all pairs)", sample))
        factor = (n / sample["items"]) ** 2
        lines.append(
            f"| *naive baseline as written, extrapolated to {n:,} (x{factor:,.0f}, "
            f"O(n²))* | {n:,} | *{sample['wall_s'] * factor:,.0f}* "
            f"| *{sample['cpu_s'] * factor:,.0f}* | – | – | – | – | – |"
        )
    lines += [
        "",
        "Precision and recall are pairwise, against the generator's events (the "
        "incremental row: all items after the add). *Other load*: CPU that other "
        "processes used during the run, as a share of all cores.",
    ]
    if naive is not None:
        lines.append(
            f"The naive baseline's largest group holds {naive['largest_group']:,} items "
            "(title overlap with no time limit chains template-like titles together)."
        )
    if sample is not None:
        same = "the same" if sample["same_as_indexed"] else "**not** the same"
        lines.append(
            f"On the first {sample['items']:,} items the indexed baseline gives {same} "
            "groups as `naive_labels`."
        )
    goals = [
        (
            f"from scratch under {GOAL_SCRATCH_S:.0f} s",
            scratch["wall_s"] < GOAL_SCRATCH_S,
            f"{scratch['wall_s']:.1f} s",
        ),
        (
            f"from scratch under 1 GB peak memory ({GOAL_SCRATCH_MB:.0f} MB)",
            scratch["peak_mb"] < GOAL_SCRATCH_MB,
            f"{scratch['peak_mb']:.0f} MB",
        ),
        (
            f"{args.new:,} more under {GOAL_INCREMENTAL_S:.0f} s",
            incremental["wall_s"] < GOAL_INCREMENTAL_S,
            f"{incremental['wall_s']:.2f} s",
        ),
    ]
    lines += ["", "Goals (issue 9, point 6):", ""]
    for text, met, figure in goals:
        lines.append(f"- {text}: {'met' if met else '**not met**'} ({figure})")
    lines += [
        "",
        f"Labelled sets a-c (`tests/data/stories`, tuning and held-out parts in one "
        f"store, production path): precision "
        f"{quality['precision']:.3f}, recall {quality['recall']:.3f}, "
        f"{quality['merged_hard_negatives']} hard negative pairs merged (goals: >= 0.98, "
        f">= 0.90, 0); the naive baseline there: {quality['naive_precision']:.3f} / "
        f"{quality['naive_recall']:.3f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="items from scratch")
    parser.add_argument("--new", type=int, default=1000, help="items added to them")
    parser.add_argument(
        "--naive-sample",
        type=int,
        default=5000,
        help="items for the all-pairs naive_labels, whose time is extrapolated",
    )
    parser.add_argument("--skip-naive", action="store_true", help="measure clusterfeed only")
    parser.add_argument(
        "--quiet-wait", type=float, default=300.0, help="seconds to wait for a quiet machine"
    )
    parser.add_argument("--write", action="store_true", help="append the report to RESULTS.md")
    parser.add_argument("--child", choices=RUNS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_child(args.child, args.data, args.items, args.new, args.naive_sample)
        args.out.write_text(json.dumps(result))
        return

    command = "python bench/dedup.py " + " ".join(sys.argv[1:])
    print(f"generating {args.items:,} + {args.new:,} items …", flush=True)
    started = time.perf_counter()
    items, truth = generate(args.items + args.new)
    print(f"  done in {time.perf_counter() - started:.1f} s", flush=True)
    shape = stream_shape(items[: args.items], truth)
    quality = labelled_quality()
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dedup-bench-") as folder:
        data = Path(folder) / "items.pickle"
        with data.open("wb") as handle:
            pickle.dump((items, truth), handle, protocol=pickle.HIGHEST_PROTOCOL)
        del items, truth
        gc.collect()
        kinds = [k for k in RUNS if not (args.skip_naive and k.startswith("naive"))]
        for kind in kinds:
            wait_for_quiet(args.quiet_wait)
            print(f"measuring {kind} …", flush=True)
            runs[kind] = measure_in_child(kind, data, args)
            run = runs[kind]
            print(
                f"  {run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU, "
                f"{run['peak_mb']:.0f} MB peak",
                flush=True,
            )
    text = report(args, shape, runs, quality, command)
    print()
    print(text)
    if args.write:
        with RESULTS.open("a", encoding="utf-8") as handle:
            if RESULTS.stat().st_size if RESULTS.exists() else 0:
                handle.write("\n")
            handle.write(text)
        print(f"appended to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
