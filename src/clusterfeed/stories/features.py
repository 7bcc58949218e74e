"""What story matching reads in an item: the evidence that survives translation.

Partners tell one event in their own words and languages (the buyer's English release,
the investor's German portfolio note, the Japanese sister cluster's version), so word
overlap finds only a fraction of the pairs. What stays the same across languages:

- proper names written in Latin script (companies, people, products, places), which
  also appear inside Japanese text; Japanese katakana renderings of the same names are
  compared by a phonetic skeleton (``ヘリックス・ベクター`` and "Helix Vektor" both give
  ``hrks bgd``), with pykakasi for the transliteration;
- numbers, normalized across languages: amounts with their currency ("USD 180 million",
  "180 Mio. US-Dollar", "1億8000万ドル"), percentages, calendar dates ("2 March 2026",
  "2. März 2026", "2026年3月2日"), and product codes ("HV-201");
- links: one release linking to another partner's release;
- titles that are the same apart from a number (a series).

``evidence`` extracts them; ``item_features`` adds the embedding of title and lead
(``clusterfeed.stories.encoder``). Both are computed once per item and stored, so
matching never reads an item's text again. Pure functions over plain data; the pair
score that compares two items is ``clusterfeed.stories.score``.
"""

from __future__ import annotations

import contextlib
import math
import re
import sys
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache
from typing import Any, TypeVar

import numpy as np

from clusterfeed.ingest.dates import MONTHS
from clusterfeed.stories.kinds import notice_kind

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class StoryItem:
    """What matching needs to know of one partner's item."""

    id: str
    feed: str
    language: str
    title: str
    text: str
    link: str | None
    published: datetime
    links: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evidence:
    """What an item says that stays the same across languages."""

    names: frozenset[str]
    # The names in the title: who the news is about (``score.pair_vector``'s
    # "other_protagonists").
    title_names: frozenset[str]
    skeletons: frozenset[str]
    amounts: frozenset[tuple[str, int]]
    percents: frozenset[str]
    dates: frozenset[date]
    codes: frozenset[str]
    links: frozenset[str]
    own_link: str | None
    series_title: str | None
    series_numbers: tuple[str, ...]
    # A partner's own publication ("roundup": ``clusterfeed.stories.kinds``), or None.
    kind: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "names": sorted(self.names),
            "title_names": sorted(self.title_names),
            "skeletons": sorted(self.skeletons),
            "amounts": sorted([c, v] for c, v in self.amounts),
            "percents": sorted(self.percents),
            "dates": sorted(d.isoformat() for d in self.dates),
            "codes": sorted(self.codes),
            "links": sorted(self.links),
            "own_link": self.own_link,
            "series_title": self.series_title,
            "series_numbers": list(self.series_numbers),
            "kind": self.kind,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Evidence:
        return cls(
            names=frozenset(data["names"]),
            title_names=frozenset(data["title_names"]),
            skeletons=frozenset(data["skeletons"]),
            amounts=frozenset((c, int(v)) for c, v in data["amounts"]),
            percents=frozenset(data["percents"]),
            dates=frozenset(date.fromisoformat(d) for d in data["dates"]),
            codes=frozenset(data["codes"]),
            links=frozenset(data["links"]),
            own_link=data["own_link"],
            series_title=data["series_title"],
            series_numbers=tuple(data["series_numbers"]),
            kind=data.get("kind"),
        )


# -- text --------------------------------------------------------------------------

_STOPWORD_TEXT = """
the and for with from that this into has have was were will are its our their new
about after over more than also who which what when where how not but all one two
der die das den dem des und mit von für fur ist sind ein eine einen einem einer
auf aus bei zum zur wird werden wurde hat haben sich nach über uber neue neuen
neues als auch oder wie im am an bis vor durch unter seit sowie mehr unsere unser
inc gmbh ag ltd co kg se e.v ev mbh
"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

_LATIN_TOKEN = re.compile(
    r"[A-Za-zÄÖÜäöüßÀ-ÿ][A-Za-z0-9ÄÖÜäöüßÀ-ÿ&'’\-]*[A-Za-z0-9ÄÖÜäöüßÀ-ÿ]|[A-Za-z]{2,}"
)
_KATAKANA_RUN = re.compile(r"[\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]{3,}")
_CODE = re.compile(r"\b[A-Za-z]{1,6}-?\d{2,5}[A-Za-z]?\b")
_URL = re.compile(r"https?://[^\s\"'<>]+")


def normalize_text(text: str) -> str:
    """NFKC (full-width digits and letters become ASCII) and single spaces."""
    return re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text)).strip()


# Tokens recur from item to item: each one is classified and lower-cased once, and its
# string is shared (interned) by every item that has it, which keeps 100,000 items'
# features in memory. The caches are dropped when they grow past _TOKEN_CACHE_SIZE.
_TOKEN_CACHE_SIZE = 500_000
_lowered: dict[str, str] = {}


def _lower_token(token: str) -> str:
    lowered = _lowered.get(token)
    if lowered is None:
        if len(_lowered) >= _TOKEN_CACHE_SIZE:
            _lowered.clear()
        lowered = _lowered[token] = sys.intern(token.lower().strip("-'’"))
    return lowered


_SENTENCE_MARKS = frozenset('.!?:;–—-"„“»«()[]')


def _at_sentence_start(text: str, start: int, origin: int = 0) -> bool:
    r"""Whether the word at ``start`` begins the text (which begins at ``origin``) or
    follows a punctuation mark (spaces between allowed): what
    ``(?:^|[.!?:;–—\-"„“»«()\[\]]\s*)$`` finds in ``text[origin:start]``, without
    copying the text before every word."""
    end = start
    while end > origin and text[end - 1].isspace():
        end -= 1
    if end == origin:
        return start == origin or (start == origin + 1 and text[origin] == "\n")
    return text[end - 1] in _SENTENCE_MARKS


# token -> (None: never a name) or (a name whatever its place, its lower-cased form)
_name_info: dict[str, tuple[bool, str] | None] = {}


def _name_token_info(token: str) -> tuple[bool, str] | None:
    info = _name_info.get(token, False)
    if info is False:
        if len(_name_info) >= _TOKEN_CACHE_SIZE:
            _name_info.clear()
        lowered = _lower_token(token)
        if len(token) < 3 or token.isdigit() or lowered in STOPWORDS:
            info = None
        else:
            strong = any(map(str.isupper, token[1:])) or any(map(str.isdigit, token))
            info = (strong, lowered)
        _name_info[token] = info
    return info  # type: ignore[return-value]


# token -> (its lower-cased form, 0: no name, 1: a name inside a sentence, 2: a name)
_token_info: dict[str, tuple[str, int]] = {}


def _names(title: str, body: str) -> tuple[frozenset[str], frozenset[str]]:
    """The names in title and body, and those in the title: words capitalized inside a
    sentence, or with capitals or digits inside ("HafenCity", "FDA", "HV-201"),
    lower-cased for comparison.

    Common words ("opens", "employees") are what two unrelated English items share
    most; names are what two versions of one event share across languages. German
    capitalizes every noun, so German nouns pass too: they are rarer than names across
    partners, which the window's name counts take care of.
    """
    text = f"{title} {body}"
    body_start = len(title) + 1
    in_title: set[str] = set()
    in_body: set[str] = set()
    info = _token_info
    for match in _LATIN_TOKEN.finditer(text):
        token = match.group(0)
        known = info.get(token)
        if known is None:
            if len(info) >= _TOKEN_CACHE_SIZE:
                info.clear()
            lowered = _lower_token(token)
            name = _name_token_info(token)
            kind = 0 if name is None else 2 if name[0] else 1 if token[0].isupper() else 0
            known = info[token] = (lowered, kind)
        lowered, kind = known
        if kind:
            start = match.start()
            segment = body_start if start >= body_start else 0
            if kind == 2 or not _at_sentence_start(text, start, segment):
                (in_body if segment else in_title).add(lowered)
    return _frozen(in_title | in_body), _frozen(in_title)


# -- phonetic skeletons for katakana and Latin names ------------------------------

_LATIN_RULES = (
    ("sch", "s"), ("ch", "k"), ("ck", "k"), ("ph", "f"), ("th", "t"), ("qu", "kb"),
    ("x", "ks"), ("c", "k"), ("z", "ts"), ("w", "b"), ("v", "b"), ("j", "y"), ("ß", "s"),
    ("ä", "e"), ("ö", "e"), ("ü", "u"),
)  # fmt: skip
_VOICING = str.maketrans({"p": "b", "t": "d", "k": "g", "s": "z", "f": "h", "l": "r", "v": "b"})


def _consonants(word: str) -> str:
    word = word.translate(_VOICING)
    out: list[str] = []
    for ch in word:
        if ch in "aeiouy" or not ch.isalpha():
            continue
        if out and out[-1] == ch:
            continue
        out.append(ch)
    return "".join(out)


@lru_cache(maxsize=65_536)
def latin_skeleton(word: str) -> str:
    """A rough sound-skeleton of a Latin-script name: consonants, voicing merged."""
    word = word.lower()
    for a, b in _LATIN_RULES:
        word = word.replace(a, b)
    return _consonants(word)


@lru_cache(maxsize=1)
def _kakasi() -> Any:
    import pykakasi

    return pykakasi.kakasi()  # type: ignore[no-untyped-call]


def katakana_skeletons(text: str) -> set[str]:
    """Skeletons of the katakana words in Japanese text (one per word of a name)."""
    result = set()
    for run in _KATAKANA_RUN.findall(text):
        for part in _KATAKANA_SEPARATOR.split(run):
            if len(part) < 2:
                continue
            skeleton = _katakana_skeleton(part)
            if len(skeleton) >= 3:
                result.add(skeleton)
    return result


_KATAKANA_SEPARATOR = re.compile(r"[・=＝]")


@lru_cache(maxsize=65_536)
def _katakana_skeleton(word: str) -> str:
    """One katakana word's skeleton; pykakasi is slow, and the same words recur."""
    converted = _kakasi().convert(word)
    romaji = "".join(piece["hepburn"] for piece in converted)
    romaji = romaji.replace("shi", "si").replace("chi", "ti").replace("tsu", "tu")
    romaji = romaji.replace("fu", "hu").replace("ji", "zi")
    return sys.intern(_consonants(romaji))


# -- numbers -------------------------------------------------------------------------

_CURRENCIES = {
    "usd": "USD", "us$": "USD", "$": "USD", "us-dollar": "USD", "dollar": "USD",
    "dollars": "USD", "ドル": "USD", "米ドル": "USD",
    "eur": "EUR", "€": "EUR", "euro": "EUR", "euros": "EUR", "ユーロ": "EUR",
    "jpy": "JPY", "円": "JPY", "yen": "JPY", "chf": "CHF", "gbp": "GBP", "£": "GBP",
}  # fmt: skip
_SCALES = {
    "thousand": 1e3, "tsd": 1e3, "tsd.": 1e3, "million": 1e6, "millionen": 1e6, "mio": 1e6,
    "mio.": 1e6, "m": 1e6, "mn": 1e6, "billion": 1e9, "milliarden": 1e9, "mrd": 1e9,
    "mrd.": 1e9, "bn": 1e9,
}  # fmt: skip
_CUR = r"(USD|US\$|EUR|€|\$|JPY|CHF|GBP|£|US-Dollar|Dollars?|Euros?|Yen)"
_NUM = r"(\d+(?:[.,]\d+)?)"
_SCALE = r"(thousand|Tsd\.?|million|Millionen|Mio\.?|mn|m|billion|Milliarden|Mrd\.?|bn)"
_AMOUNT_PATTERNS = (
    # (?=...): the currencies' first letters, only to let the regex engine skip ahead
    re.compile(rf"(?=[uej€$cg£dy]){_CUR}\s?{_NUM}\s?{_SCALE}?\b", re.IGNORECASE),
    re.compile(rf"{_NUM}\s?{_SCALE}\s?(?:of\s)?{_CUR}", re.IGNORECASE),
    re.compile(rf"{_NUM}\s?{_CUR}", re.IGNORECASE),
)
_JA_AMOUNT = re.compile(
    r"(?:(\d+(?:\.\d+)?)兆)?(?:(\d+(?:\.\d+)?)億)?(?:(\d+(?:\.\d+)?)万)?(\d+)?\s?(米ドル|ドル|ユーロ|円)"
)
_PERCENT = re.compile(
    r"(\d+(?:[.,]\d+)?)\s?(?:%|％|Prozent|percent|per cent|パーセント)", re.IGNORECASE
)
_MONTH_NAMES = "|".join(sorted(map(re.escape, MONTHS), key=len, reverse=True))
_DATE_DMY = re.compile(rf"\b(\d{{1,2}})\.?\s+({_MONTH_NAMES})\.?\s+(\d{{4}})", re.IGNORECASE)
# The lookahead only restates the month names' first letters (it finds nothing they
# would not), so the regex engine can skip ahead: three times faster.
_DATE_MDY = re.compile(
    rf"\b(?=[jfmasond])({_MONTH_NAMES})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})",
    re.IGNORECASE,
)
_DATE_JA = re.compile(r"(\d{4})年(\d{1,2})月(\d{1,2})日")
_DATE_NUMERIC = re.compile(r"\b(\d{1,2})\.(\d{1,2})\.(\d{4})\b")


def _number(text: str, decimal_comma: bool) -> float:
    text = text.replace(".", "").replace(",", ".") if decimal_comma else text.replace(",", "")
    return float(text)


def _round3(value: float) -> int:
    """Three significant digits: "EUR 7.8 million" and "7,8 Mio. Euro" agree."""
    if value <= 0:
        return 0
    digits = 3 - math.floor(math.log10(value)) - 1
    return int(round(value, digits))


def amounts(text: str, language: str) -> set[tuple[str, int]]:
    """Money amounts as (currency, value in units), in any of the three languages."""
    found: set[tuple[str, int]] = set()
    comma = language == "de"
    for pattern in _AMOUNT_PATTERNS if _may_name_a_currency(text) else ():
        for match in pattern.finditer(text):
            groups = [g for g in match.groups() if g]
            currency = number = scale = None
            for g in groups:
                key = g.lower()
                if key in _CURRENCIES:
                    currency = _CURRENCIES[key]
                elif key in _SCALES:
                    scale = _SCALES[key]
                elif _PLAIN_NUMBER.fullmatch(g):
                    number = g
            if currency and number:
                try:
                    value = _number(number, comma) * (scale or 1)
                except ValueError:
                    continue
                if value >= 1000:  # "EUR 5" in a ticket price is not news evidence
                    found.add((currency, _round3(value)))
    # Every Japanese amount ends in one of its currencies; most texts have none.
    has_japanese_currency = "ドル" in text or "ユーロ" in text or "円" in text
    for match in _JA_AMOUNT.finditer(text) if has_japanese_currency else ():
        cho, oku, man, units, cur = match.groups()
        value = (
            float(cho or 0) * 1e12 + float(oku or 0) * 1e8 + float(man or 0) * 1e4
            + float(units or 0)
        )  # fmt: skip
        if value >= 1000 and (cho or oku or man):
            found.add((_CURRENCIES[cur], _round3(value)))
    return found


_PLAIN_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
# What _CUR and _PERCENT need, as plain substrings of the lower-cased text. Under
# re.IGNORECASE only "ſ" (long s) also matches one of their letters, and lower() keeps
# it, so a text with one is always searched.
_CURRENCY_MARKS = ("usd", "us$", "eur", "€", "$", "jpy", "chf", "gbp", "£", "dollar", "yen")
_PERCENT_MARKS = ("%", "％", "prozent", "percent", "per cent", "パーセント")


def _may_name_a_currency(text: str) -> bool:
    lowered = text.lower()
    return "ſ" in text or any(mark in lowered for mark in _CURRENCY_MARKS)


def _may_give_a_percentage(text: str) -> bool:
    lowered = text.lower()
    return "ſ" in text or any(mark in lowered for mark in _PERCENT_MARKS)


def percents(text: str, language: str) -> set[str]:
    result = set()
    for match in _PERCENT.finditer(text) if _may_give_a_percentage(text) else ():
        try:
            value = _number(match.group(1), language == "de")
        except ValueError:
            continue
        result.add(f"{value:g}")
    return result


def calendar_dates(text: str) -> set[date]:
    found: set[date] = set()

    def add(y: str, m: int, d: str) -> None:
        with contextlib.suppress(ValueError):
            found.add(date(int(y), m, int(d)))

    for d, month, y in _DATE_DMY.findall(text):
        add(y, MONTHS[month.lower()], d)
    for month, d, y in _DATE_MDY.findall(text):
        add(y, MONTHS[month.lower()], d)
    for y, m, d in _DATE_JA.findall(text) if "年" in text else ():
        add(y, int(m), d)
    for d, m, y in _DATE_NUMERIC.findall(text):
        add(y, int(m), d)
    return found


def codes(text: str) -> set[str]:
    """Product and trial codes ("HV-201", "EMB2207"), written the same in every language."""
    result = set()
    for match in _CODE.findall(text):
        code = match.upper().replace("-", "")
        letters = re.match(r"[A-Z]+", code)
        if letters and letters.group(0) in {"Q", "H", "KW", "CW", "FY", "COVID", "ISO", "DIN"}:
            continue
        result.add(code)
    return result


_SERIES_NUMBER = re.compile(r"\d+")


def series_key(title: str) -> tuple[str | None, tuple[str, ...]]:
    """A title with its numbers masked, and the numbers.

    "Newsletter 12/2026" gives ("newsletter # #", ("12", "2026")).
    """
    numbers = tuple(_SERIES_NUMBER.findall(title))
    if not numbers:
        return None, ()
    masked = _SERIES_NUMBER.sub("#", title.lower())
    masked = re.sub(r"[^\w#]+", " ", masked).strip()
    return masked, numbers


# -- one item's features ---------------------------------------------------------------


def evidence(item: StoryItem) -> Evidence:
    """Everything matching reads in an item's text, computed once per item."""
    title = normalize_text(item.title)
    body = normalize_text(item.text)
    text = f"{title} {body}"
    names, title_names = _names(title, body)
    skeletons = _frozen(katakana_skeletons(text)) if _KATAKANA_RUN.search(text) else _EMPTY
    links = _frozen(filter(None, (_link_key(u) for u in (*item.links, *_URL.findall(item.text)))))
    masked, numbers = series_key(title)
    return Evidence(
        names=names,
        title_names=title_names,
        skeletons=skeletons,
        amounts=_frozen(amounts(text, item.language)),
        percents=_frozen(percents(text, item.language)),
        dates=_frozen(calendar_dates(text)),
        codes=_frozen(codes(text)),
        links=links,
        own_link=_link_key(item.link) if item.link else None,
        series_title=masked,
        series_numbers=numbers,
        kind=notice_kind(item.title),
    )


_EMPTY: frozenset[Any] = frozenset()


def _frozen(values: Iterable[_T]) -> frozenset[_T]:
    """A frozenset; the empty ones are all one (100,000 items have many)."""
    result = frozenset(values)
    return result if result else _EMPTY


@lru_cache(maxsize=65_536)
def _link_key(url: str | None) -> str | None:
    if not url:
        return None
    from clusterfeed.ingest.normalize import link_key, normalize_url

    normalized = normalize_url(url)
    if normalized is None:
        return None
    key = link_key(normalized)
    # A link to a site's front page says nothing about which story it is.
    if key is None or key.count("/") == 0:
        return None
    return key


LEAD_CHARS = 400  # the lead: what the embedding reads after the title
# Part of the stored features' fingerprint: raising it recomputes them once, when
# what ``evidence`` extracts changes (2: the item's kind).
EVIDENCE_VERSION = 2


def embedding_text(item: StoryItem) -> str:
    """Title and lead, the part of an item that says which event it reports."""
    return f"{item.title}. {item.text[:LEAD_CHARS]}"


@dataclass(frozen=True)
class ItemFeatures:
    """One item as matching sees it: computed once, stored, never the text again."""

    feed: str
    language: str
    published: datetime
    vector: np.ndarray
    evidence: Evidence


def stored_vector(vector: np.ndarray) -> np.ndarray:
    """The vector as the store keeps it (float16): every path compares the same values."""
    return np.asarray(vector, dtype=np.float16).astype(np.float32)


def item_features(items: Sequence[StoryItem], encoder: Any) -> list[ItemFeatures]:
    """The features of each item (``encoder``: a ``clusterfeed.stories.encoder.Encoder``)."""
    vectors = encoder.encode([embedding_text(i) for i in items])
    return [
        ItemFeatures(i.feed, i.language, i.published, stored_vector(v), evidence(i))
        for i, v in zip(items, vectors, strict=True)
    ]
