"""One story, many sources: which items from different partners report the same event.

Pure functions over plain data. The hard part is that partners tell one event in their
own words and languages (the buyer's English release, the investor's German portfolio
note, the Japanese sister cluster's version), so word overlap finds only a fraction of
the pairs. What stays the same across languages is *evidence*:

- proper names written in Latin script (companies, people, products, places), which
  also appear inside Japanese text; Japanese katakana renderings of the same names are
  compared by a phonetic skeleton (``ヘリックス・ベクター`` and "Helix Vektor" both give
  ``hrks bgd``), with pykakasi for the transliteration;
- numbers, normalized across languages: amounts with their currency ("USD 180 million",
  "180 Mio. US-Dollar", "1億8000万ドル"), percentages, calendar dates ("2 March 2026",
  "2. März 2026", "2026年3月2日"), and product codes ("HV-201");
- links: one release linking to another partner's release;
- for two items in the same language, plain text similarity (TF-IDF cosine).

Two items join when their combined evidence passes a threshold within a time window,
and never when a *veto* says they are different events: the same feed (a partner does
not announce one event twice), amounts in the same currency that all differ, or titles
that are the same apart from a number (newsletters, webinar parts, quarterly reports).
A false merge hides news from subscribers, so the rules prefer a missed merge.
Every decision carries its reasons, for ``clusterfeed stories``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import math
import re
import sys
import unicodedata
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from operator import mul
from typing import Any, TypeVar

from clusterfeed.dates import MONTHS

_T = TypeVar("_T")


@dataclass(frozen=True)
class MatchRules:
    """The thresholds of story matching; every one is a config key under [stories]."""

    window_days: float = 5.0
    threshold: float = 1.0
    link_weight: float = 1.5
    amount_weight: float = 0.8
    code_weight: float = 0.8
    date_weight: float = 0.35
    percent_weight: float = 0.35
    name_weight: float = 1.0
    name_saturation: float = 2.3
    text_weight: float = 1.4
    min_text_similarity: float = 0.25
    use_names: bool = True
    use_numbers: bool = True
    use_links: bool = True
    use_text: bool = True
    use_katakana: bool = True
    use_vetoes: bool = True
    # A title name this rare (idf scaled to (0, 1], see Corpus.idf) names the subject.
    rare_name_idf: float = 0.6


DEFAULT_RULES = MatchRules()


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


@dataclass(frozen=True, slots=True)
class Features:
    names: frozenset[str]
    skeletons: frozenset[str]
    words: Counter[str]
    amounts: frozenset[tuple[str, int]]
    percents: frozenset[str]
    dates: frozenset[date]
    codes: frozenset[str]
    links: frozenset[str]
    own_link: str | None
    series_title: str | None
    series_numbers: tuple[str, ...]
    # The names in the title: who the news is about (see ``different_protagonists``).
    title_names: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Match:
    """Why two items were (or were not) joined."""

    score: float
    reasons: tuple[str, ...]
    veto: str | None = None

    @property
    def joined(self) -> bool:
        return self.veto is None and self.score > 0


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
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff]")
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


def latin_tokens(text: str) -> list[str]:
    return [_lower_token(t) for t in _LATIN_TOKEN.findall(text)]


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


def name_tokens(text: str) -> set[str]:
    """Words that look like names: capitalized inside a sentence, or with capitals or
    digits inside ("HafenCity", "FDA", "HV-201"), lower-cased for comparison.

    Common words ("opens", "employees") are what two unrelated English items share
    most; names are what two versions of one event share across languages. German
    capitalizes every noun, so German nouns pass too: they are rarer than names across
    partners, which the document frequencies take care of.
    """
    result = set()
    for match in _LATIN_TOKEN.finditer(text):
        token = match.group(0)
        info = _name_token_info(token)
        if info is None:
            continue
        strong, lowered = info
        if strong or (token[0].isupper() and not _at_sentence_start(text, match.start())):
            result.add(lowered)
    return result


# token -> (its lower-cased form, 0: no name, 1: a name inside a sentence, 2: a name)
_token_info: dict[str, tuple[str, int]] = {}


def _tokens_and_names(title: str, body: str) -> tuple[list[str], frozenset[str], frozenset[str]]:
    """``latin_tokens`` of title and body, their ``name_tokens``, and the title's names,
    in one pass."""
    text = f"{title} {body}"
    body_start = len(title) + 1
    tokens: list[str] = []
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
        tokens.append(lowered)
        if kind:
            start = match.start()
            segment = body_start if start >= body_start else 0
            if kind == 2 or not _at_sentence_start(text, start, segment):
                (in_body if segment else in_title).add(lowered)
    return tokens, _frozen(in_title | in_body), _frozen(in_title)


def cjk_bigrams(text: str) -> list[str]:
    chars = _CJK.findall(text)
    return [sys.intern(a + b) for a, b in itertools.pairwise(chars)]


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


def _close(a: str, b: str) -> bool:
    """Skeletons that differ by at most one consonant (for names of 4+ consonants)."""
    if a == b:
        return True
    length_a, length_b = len(a), len(b)
    if length_a < 4 or length_b < 4 or abs(length_a - length_b) > 1:
        return False
    # One edit: substitution, insertion or deletion.
    if length_a == length_b:
        differences = 0
        for x, y in zip(a, b, strict=True):
            if x != y:
                differences += 1
                if differences > 1:
                    return False
        return True
    short, long_ = (a, b) if length_a < length_b else (b, a)
    # Deleting the first character where they part is as good as any deletion.
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return short[i:] == long_[i + 1 :]


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


# -- features and scores ----------------------------------------------------------------


def features(item: StoryItem) -> Features:
    """Everything matching uses, computed once per item."""
    title = normalize_text(item.title)
    body = normalize_text(item.text)
    text = f"{title} {body}"
    tokens, names, title_names = _tokens_and_names(title, body)
    words: Counter[str] = Counter(t for t in tokens if t not in STOPWORDS and len(t) >= 2)
    words.update(cjk_bigrams(text))
    skeletons = _frozen(katakana_skeletons(text)) if _KATAKANA_RUN.search(text) else _EMPTY
    links = _frozen(filter(None, (_link_key(u) for u in (*item.links, *_URL.findall(item.text)))))
    masked, numbers = series_key(title)
    return Features(
        names=names,
        skeletons=skeletons,
        words=words,
        amounts=_frozen(amounts(text, item.language)),
        percents=_frozen(percents(text, item.language)),
        dates=_frozen(calendar_dates(text)),
        codes=_frozen(codes(text)),
        links=links,
        own_link=_link_key(item.link) if item.link else None,
        series_title=masked,
        series_numbers=numbers,
        title_names=title_names,
    )


_EMPTY: frozenset[Any] = frozenset()
_NO_WORDS: Counter[str] = Counter()  # shared: never changed


def _frozen(values: Iterable[_T]) -> frozenset[_T]:
    """A frozenset; the empty ones are all one (100,000 items have many)."""
    result = frozenset(values)
    return result if result else _EMPTY


@lru_cache(maxsize=65_536)
def _link_key(url: str | None) -> str | None:
    if not url:
        return None
    from clusterfeed.normalize import link_key, normalize_url

    normalized = normalize_url(url)
    if normalized is None:
        return None
    key = link_key(normalized)
    # A link to a site's front page says nothing about which story it is.
    if key is None or key.count("/") == 0:
        return None
    return key


@dataclass
class Corpus:
    """Document frequencies, so that a name shared by half the corpus counts little."""

    documents: int = 0
    df: Counter[str] = field(default_factory=Counter)
    # Between two add() calls nothing changes, so idf values and vector lengths are kept;
    # add() drops them and bumps the version.
    version: int = field(default=0, compare=False)
    _idf: dict[str, float] = field(default_factory=dict, repr=False, compare=False)
    _norms: dict[int, tuple[Mapping[str, int], float]] = field(
        default_factory=dict, repr=False, compare=False
    )

    def add(self, f: Features) -> None:
        self.documents += 1
        self.df.update(set(f.words) | f.names)
        if self._idf or self._norms:
            self._idf = {}
            self._norms = {}
        self.version += 1

    def idf(self, token: str) -> float:
        """Inverse document frequency scaled to (0, 1]: 1 for a token seen nowhere else,
        lower the more items share it. Scaling by the corpus size keeps thresholds
        meaningful for a window of 50 items as for one of 50,000."""
        value = self._idf.get(token)
        if value is None:
            n = self.documents
            value = (math.log((1 + n) / (1 + self.df.get(token, 0))) + 1.0) / (
                math.log(1 + n) + 1.0
            )
            self._idf[token] = value
        return value

    def norm(self, words: Mapping[str, int]) -> float:
        """The length of a TF-IDF vector (kept until the next add)."""
        cached = self._norms.get(id(words))
        if cached is not None and cached[0] is words:
            return cached[1]
        known, idf = self._idf.get, self.idf
        value = math.sqrt(sum(v * v for v in [n * (known(t) or idf(t)) for t, n in words.items()]))
        if len(self._norms) >= 20_000:
            self._norms = {}
        self._norms[id(words)] = (words, value)  # the reference keeps the id unique
        return value


def _weighted_overlap(
    a: Iterable[str], b: Iterable[str], corpus: Corpus
) -> tuple[float, list[str]]:
    set_a, set_b = set(a), set(b)
    shared = set_a & set_b
    if not shared:
        return 0.0, []

    # Rarest first; equally rare names in alphabetical order, so that the reasons do
    # not depend on the order a set happens to give (it changes from run to run).
    ranked = sorted(shared, key=lambda t: (-corpus.idf(t), t))
    return sum(corpus.idf(t) for t in shared), ranked


def _cosine(a: Mapping[str, int], b: Mapping[str, int], corpus: Corpus) -> float:
    if not a or not b:
        return 0.0
    idf = corpus.idf
    # The same products in the same order as building both TF-IDF vectors would give.
    dot = sum((n * idf(t)) * (b[t] * idf(t)) for t, n in a.items() if t in b)
    if not dot:
        return 0.0
    return dot / (corpus.norm(a) * corpus.norm(b))


_latin_of: dict[int, tuple[frozenset[str], dict[str, str]]] = {}


def _latin_names(names: frozenset[str]) -> dict[str, str]:
    """Skeleton -> name for the names of 4+ letters (the last name wins a skeleton)."""
    cached = _latin_of.get(id(names))
    if cached is not None and cached[0] is names:
        return cached[1]
    latin = {latin_skeleton(n): n for n in names if len(n) >= 4}
    if len(_latin_of) >= 20_000:
        _latin_of.clear()
    _latin_of[id(names)] = (names, latin)  # the reference keeps the id unique
    return latin


def _katakana_matches(skeletons: frozenset[str], names: frozenset[str]) -> list[str]:
    if not skeletons:
        return []
    latin = _latin_names(names)
    matched = []
    for s in skeletons:
        for ls, name in latin.items():
            if len(ls) >= 3 and _close(s, ls):
                matched.append(name)
                break
    return matched


def veto(a: StoryItem, fa: Features, b: StoryItem, fb: Features) -> str | None:
    """A reason two items cannot be one event, or None."""
    if a.feed == b.feed and a.language == b.language:
        # A partner does not announce one event twice in one language; a bilingual
        # feed may well carry the German and the English version.
        return "same partner feed"
    if (
        fa.series_title
        and fa.series_title == fb.series_title
        and fa.series_numbers != fb.series_numbers
    ):
        return "same title apart from its number (a series)"
    for currency in {c for c, _ in fa.amounts} & {c for c, _ in fb.amounts}:
        mine = {v for c, v in fa.amounts if c == currency}
        theirs = {v for c, v in fb.amounts if c == currency}
        # A total in one release may be the sum of the parts in another ("up to EUR
        # 155 million" = 95 upfront + 60 in milestones).
        if not mine & theirs and sum(mine) not in theirs and sum(theirs) not in mine:
            return f"different {currency} amounts"
    if fa.codes and fb.codes and not fa.codes & fb.codes and len(fa.codes | fb.codes) >= 2:
        return "different product codes"
    return None


def different_protagonists(
    fa: Features, fb: Features, corpus: Corpus, rare_idf: float
) -> str | None:
    """Whether both titles name someone rare whom the other item never mentions.

    Two templated announcements in one week ("X receives IVDR certificate", "Y receives
    IVDR certificate"; two FDA clearances) share the regulator's, the standard's and
    the city's names, which are rare enough to look like strong evidence. What tells
    them apart is who the news is about: the rare names in each title. When each title
    has one and none of them appears anywhere in the other item (as a name or a word,
    or as a part of a hyphenated compound such as "Peptidion-Übernahme"), the two
    items are about different subjects. Only items in one language are compared this
    way: across languages a title's names are often translated or in katakana. A title
    without a rare name (a teaser) decides nothing.
    """
    mine = _subjects(fa, corpus, rare_idf)
    if not mine:
        return None
    theirs = _subjects(fb, corpus, rare_idf)
    if not theirs:
        return None
    if _mentioned(mine, fb) or _mentioned(theirs, fa):
        return None
    return (
        f"different subjects in the titles ({', '.join(sorted(mine)[:3])} / "
        f"{', '.join(sorted(theirs)[:3])})"
    )


def _subjects(f: Features, corpus: Corpus, rare_idf: float) -> set[str]:
    # A subject is named again in the text; a capitalized German noun of the title
    # ("Produktion", "Betrieb") mostly is not.
    return {n for n in f.title_names if f.words.get(n, 0) >= 2 and corpus.idf(n) >= rare_idf}


def _mentioned(names: set[str], f: Features) -> bool:
    for name in names:
        parts = [name, *(p for p in name.split("-") if len(p) >= 3)]
        if any(p in f.names or p in f.words for p in parts):
            return True
        if any(name in other.split("-") for other in f.names if "-" in other):
            return True
    return False


def score(
    a: StoryItem, fa: Features, b: StoryItem, fb: Features, corpus: Corpus, rules: MatchRules
) -> Match:
    """The evidence that two items report one event, with its reasons."""
    if abs((a.published - b.published).total_seconds()) > rules.window_days * 86400:
        return Match(0.0, (), "outside the time window")
    if rules.use_vetoes:
        reason = veto(a, fa, b, fb)
        if reason:
            return Match(0.0, (), reason)
    elif a.feed == b.feed and a.language == b.language:
        return Match(0.0, (), "same partner feed")
    if rules.use_vetoes and rules.use_names and a.language == b.language:
        reason = different_protagonists(fa, fb, corpus, rules.rare_name_idf)
        if reason:
            return Match(0.0, (), reason)
    total = 0.0
    reasons: list[str] = []
    if rules.use_links and (
        (fa.own_link and fa.own_link == fb.own_link)
        or (fa.own_link and fa.own_link in fb.links)
        or (fb.own_link and fb.own_link in fa.links)
        or (fa.links & fb.links)
    ):
        total += rules.link_weight
        reasons.append("links to the same release")
    if rules.use_numbers:
        shared_amounts = fa.amounts & fb.amounts
        if shared_amounts:
            total += rules.amount_weight
            reasons.append(
                "same amount " + ", ".join(f"{c} {v:,}" for c, v in sorted(shared_amounts))
            )
        shared_codes = fa.codes & fb.codes
        if shared_codes:
            total += rules.code_weight
            reasons.append("same code " + ", ".join(sorted(shared_codes)))
        shared_dates = fa.dates & fb.dates
        if shared_dates:
            total += rules.date_weight
            reasons.append("same date " + ", ".join(d.isoformat() for d in sorted(shared_dates)))
        shared_percents = fa.percents & fb.percents
        if shared_percents:
            total += rules.percent_weight
            reasons.append("same percentage " + ", ".join(sorted(shared_percents)))
    if rules.use_names:
        # Absolute evidence, not a ratio: two partners writing in different languages
        # share few words however alike their news, but the rare ones they share
        # (a product, a person, a small town) say a lot. Saturates at 1.
        weight, shared = _weighted_overlap(fa.names, fb.names, corpus)
        if rules.use_katakana:
            kana = set(_katakana_matches(fa.skeletons, fb.names))
            kana |= set(_katakana_matches(fb.skeletons, fa.names))
            kana -= set(shared)
            if kana:
                weight += sum(corpus.idf(k) for k in kana)
                shared = [*shared, *(f"{k} (katakana)" for k in sorted(kana))]
        overlap = min(1.0, weight / rules.name_saturation)
        if overlap > 0:
            total += rules.name_weight * overlap
            reasons.append(f"shared names {', '.join(shared[:5])} ({overlap:.2f})")
    if rules.use_text and a.language == b.language:
        similarity = _cosine(fa.words, fb.words, corpus)
        if similarity >= rules.min_text_similarity:
            total += rules.text_weight * similarity
            reasons.append(f"similar text ({similarity:.2f})")
    return Match(round(total, 3), tuple(reasons))


# -- clustering --------------------------------------------------------------------------


@dataclass
class Clustering:
    """The result: item id → story number, and why each item joined its story."""

    story_of: dict[str, int]
    reasons: dict[str, Match]

    def groups(self) -> list[list[str]]:
        by_story: defaultdict[int, list[str]] = defaultdict(list)
        for item, story in self.story_of.items():
            by_story[story].append(item)
        return list(by_story.values())


def candidate_keys(f: Features) -> set[str]:
    """The keys under which an item is indexed to find the stories it may belong to.

    Evidence that two items tell one event is shared evidence: a name, an amount, a
    trial or grant code, a link, a spelling skeleton, a date, a word. Indexing items by
    these keys lets a new item be scored only against the items it shares one with,
    instead of against every story in the window (``join_batch``'s plain way and
    ``StoryMatcher.choose`` use these keys; ``_Index``, which ``Clusterer`` and
    ``join_batch``'s bounded way read, holds the same keys, by kind). Each key carries
    its kind as a prefix ("n:", "a:", "c:", "l:", "k:", "d:", "w:"), so a word and a
    name spelt alike stay apart.
    """
    keys = {f"n:{n}" for n in f.names}
    keys |= {f"a:{c}{v}" for c, v in f.amounts}
    keys |= {f"c:{c}" for c in f.codes}
    keys |= {f"l:{link}" for link in f.links}
    if f.own_link:
        keys.add(f"l:{f.own_link}")
    keys |= {f"k:{s}" for s in f.skeletons}
    keys |= {f"k:{latin_skeleton(n)}" for n in f.names if len(n) >= 4 and n.isalpha()}
    keys |= {f"d:{d.isoformat()}" for d in f.dates}
    keys |= {f"w:{w}" for w in f.words if len(w) >= 2}
    return keys


@dataclass(frozen=True)
class Candidate:
    """An item already in a story, that a new item might join."""

    item: StoryItem
    features: Features
    story: int


def choose_story(
    item: StoryItem,
    f: Features,
    candidates: Iterable[Candidate],
    corpus: Corpus,
    rules: MatchRules = DEFAULT_RULES,
    *,
    forced: Callable[[StoryItem, StoryItem], str | None] | None = None,
) -> tuple[int | None, Match]:
    """The story a new item joins (None: it starts a new one), and why.

    The item joins the story with the strongest evidence (on a tie, the older story),
    provided the evidence passes the threshold against at least one of its items and
    no item of that story vetoes it. Checking every member (complete link) keeps a
    chain of weak resemblances from pulling two different events into one story. This
    is the one decision used by both the live pipeline and the evaluation on the
    labelled set.
    """
    members: defaultdict[int, list[Candidate]] = defaultdict(list)
    scored: dict[int, Match] = {}
    for candidate in candidates:
        members[candidate.story].append(candidate)
        rule = forced(item, candidate.item) if forced else None
        if rule == "apart":
            continue
        if rule == "together":
            match = Match(99.0, ("forced together by the config",))
        else:
            match = score(item, f, candidate.item, candidate.features, corpus, rules)
        best = scored.get(candidate.story)
        if (
            match.score >= rules.threshold
            and match.veto is None
            and (best is None or best.score < match.score)
        ):
            scored[candidate.story] = match
    # On a tie the older story (the lower number) wins.
    for story, match in sorted(scored.items(), key=lambda kv: (-kv[1].score, kv[0])):
        if match.score >= 99.0 or all(
            _compatible(item, f, m, forced, rules) for m in members[story]
        ):
            return story, match
    return None, Match(0.0, ("new story",))


def _compatible(
    item: StoryItem,
    f: Features,
    member: Candidate,
    forced: Callable[[StoryItem, StoryItem], str | None] | None,
    rules: MatchRules,
) -> bool:
    if item.feed == member.item.feed and item.language == member.item.language:
        return False
    if forced is not None and forced(item, member.item) == "apart":
        return False
    return not (rules.use_vetoes and veto(item, f, member.item, member.features))


class Clusterer:
    """Stories built up item by item, the way items arrive over time.

    Candidates come from an inverted index of each item's evidence (names, amounts,
    codes, links, sound skeletons, words), so an item is scored only against items it
    shares something with inside the time window; that keeps 100,000 items tractable
    and makes adding a thousand more cheap.

    The decision is ``choose_story``'s: a story is a candidate when one of its items in
    the window shares an index key with the new item (keys held by more than 1 in 20
    items do not count), and the new item joins the candidate story with the best
    match that passes the threshold and that no member vetoes. In a dense stream
    (several hundred items in a window) most of the window shares some key, so
    scoring every candidate would take hours at 100,000 items. ``add`` scores only the
    items whose evidence *can* reach the threshold: an upper bound of the score, from
    the index, rules out the rest (see ``_promising``). The bound never rules out an
    item that could pass, so the stories are those of scoring them all. Items that
    arrive out of time order, or rules that force pairs, take the plain way.
    """

    def __init__(
        self,
        rules: MatchRules = DEFAULT_RULES,
        *,
        force_together: Iterable[tuple[str, str]] = (),
        force_apart: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.rules = rules
        self.corpus = Corpus()
        self.story_of: dict[str, int] = {}
        self.reasons: dict[str, Match] = {}
        self._items: dict[str, StoryItem] = {}
        self._features: dict[str, Features] = {}
        self._members: defaultdict[int, list[str]] = defaultdict(list)
        self._stories = 0
        self._together = {frozenset(p) for p in force_together}
        self._apart = {frozenset(p) for p in force_apart}
        self._index = _Index()
        self._in_time_order = True
        # Items behind the time window of the newest one are never scored again when
        # items come in time order; only the veto reads them. Their words and names
        # (most of an item's memory) are let go, and recomputed if ever needed.
        self._slimmed: set[str] = set()
        self._slim_from = 0

    def _forced(self, a: StoryItem, b: StoryItem) -> str | None:
        pair = frozenset((a.id, b.id))
        if pair in self._together:
            return "together"
        return "apart" if pair in self._apart else None

    def add(self, items: Sequence[StoryItem]) -> None:
        """Place new items, oldest first; items already placed are not moved."""
        ordered = sorted(items, key=lambda i: (i.published, i.id))
        new_ids = {i.id for i in ordered}
        if len(new_ids) != len(ordered) or not new_ids.isdisjoint(self._items):
            self._in_time_order = False  # an item placed twice: only the plain way knows
        times = self._index.micros
        if ordered and times and _micros(ordered[0].published) < times[-1]:
            self._in_time_order = False
        for item in ordered:
            f = features(item)
            self._features[item.id] = f
            self._slimmed.discard(item.id)
            self._items[item.id] = item
            self.corpus.add(f)
        # Very common keys (a word in every other item) find nothing useful and cost time.
        max_postings = max(50, len(self._items) // 20)
        bounds = _Bounds.of(self.rules)
        # The index is millions of small containers, none of which form cycles; the
        # cyclic garbage collector would walk them all again and again (6-8% of the
        # time at 100,000 items). It is paused while items are placed.
        collecting = gc.isenabled()
        gc.disable()
        try:
            if self._in_time_order and bounds is not None and not (self._together or self._apart):
                for item in ordered:
                    self._place_bounded(item, max_postings, bounds)
            else:
                for item in ordered:
                    self._place(item, max_postings)
        finally:
            if collecting:
                gc.enable()

    def _place(self, item: StoryItem, max_postings: int) -> None:
        """Score every member of every candidate story."""
        f = self._features[item.id]
        found: set[int] = set()
        for postings in self._index.postings_of_keys(f):
            if len(postings) <= max_postings:
                found.update(postings)
        window = timedelta(days=self.rules.window_days)
        # Every member of a candidate's story takes part in the veto check.
        ids = self._index.ids
        story_ids = {
            self.story_of[ids[o]]
            for o in found
            if abs(item.published - self._items[ids[o]].published) <= window
        }
        candidates = [
            Candidate(self._items[m], self._full_features(m), story)
            for story in story_ids
            for m in self._members[story]
        ]
        forced = self._forced if self._together or self._apart else None
        story, match = choose_story(item, f, candidates, self.corpus, self.rules, forced=forced)
        self._record(item, f, story, match)

    def _place_bounded(self, item: StoryItem, max_postings: int, bounds: _Bounds) -> None:
        """``_place``, scoring only the items that can pass the threshold."""
        rules = self.rules
        index = self._index
        f = self._features[item.id]
        first = bisect_left(index.micros, _micros(item.published) - bounds.window)
        self._slim_before(first)
        promising, reached = self._promising(item, f, first, bounds, max_postings)
        by_story: defaultdict[int, set[int]] = defaultdict(set)
        for seq in promising:
            by_story[index.story[seq]].add(seq)
        scored: dict[int, Match] = {}
        for story, seqs in by_story.items():
            members = index.members[story]
            # A candidate story has an item in the window that shares a key held by at
            # most max_postings items; most are known from the postings read above.
            if not any(m in reached for m in members) and not any(
                m >= first and index.share_a_key(f, index.features[m], max_postings)
                for m in members
            ):
                continue
            best: Match | None = None
            for m in members:  # the order choose_story sees them in
                if m not in seqs:
                    continue
                other = self._items[index.ids[m]]
                match = score(item, f, other, index.features[m], self.corpus, rules)
                if (
                    match.score >= rules.threshold
                    and match.veto is None
                    and (best is None or best.score < match.score)
                ):
                    best = match
            if best is not None:
                scored[story] = best
        chosen: tuple[int | None, Match] = (None, Match(0.0, ("new story",)))
        for story, match in sorted(scored.items(), key=lambda kv: (-kv[1].score, kv[0])):
            if all(
                _compatible(
                    item, f, Candidate(self._items[m], self._features[m], story), None, rules
                )
                for m in self._members[story]
            ):
                chosen = (story, match)
                break
        self._record(item, f, *chosen)

    def _promising(
        self, item: StoryItem, f: Features, first: int, bounds: _Bounds, max_postings: int
    ) -> tuple[set[int], set[int]]:
        """The items in the window whose match with ``item`` can reach the threshold,
        and items in the window known to share a key held by at most ``max_postings``.

        Each part of ``score`` is bounded from above by what the index says the two
        items share. Exact where it is cheap: links, amounts, codes, dates,
        percentages. For names and words, the tokens held by few items in the window
        are summed exactly, item by item; the common ones ("Hamburg", "company")
        are not looked up but counted as if shared, up to a budget: their idf sum for
        names, the length of their part of the TF-IDF vector for words (by
        Cauchy-Schwarz, a bound on their share of the cosine). A katakana word counts
        as a name, with the largest idf of the names within one consonant of it. An
        item that shares none of the rare tokens gets at most the budgets, which stay
        below the threshold. The few items whose bound passes are bounded again with
        their names and words compared exactly.
        """
        rules = self.rules
        corpus = self.corpus
        index = self._index
        idf = corpus.idf
        idf_of = corpus._idf.get
        reached: set[int] = set()
        flags: defaultdict[int, float] = defaultdict(float)

        def flag(keys: Iterable[str], weight: float, source: Mapping[str, array[int]]) -> None:
            hit: set[int] = set()
            for key in keys:
                postings = source.get(key)
                if postings and postings[-1] >= first:
                    inside = postings[bisect_left(postings, first) :]
                    if source is index.others and len(postings) <= max_postings:
                        reached.update(inside)
                    hit.update(inside)
            for seq in hit:
                flags[seq] += weight

        if rules.use_links:
            links = {f"l:{link}" for link in f.links}
            if f.own_link:
                links.add(f"l:{f.own_link}")
            flag(links, rules.link_weight, index.others)
        if rules.use_numbers:
            flag((f"a:{c}{v}" for c, v in f.amounts), rules.amount_weight, index.others)
            flag((f"c:{c}" for c in f.codes), rules.code_weight, index.others)
            flag((f"d:{d.isoformat()}" for d in f.dates), rules.date_weight, index.others)
            flag(f.percents, rules.percent_weight, index.percents)

        # Names, and katakana words as names: (items in the window, idf, what, postings).
        names: dict[int, float] = {}
        katakana: dict[int, float] = {}
        light_names = light_katakana = 0.0
        if rules.use_names:
            tokens: list[_NameToken] = []
            for name in f.names:
                postings = index.names.get(name)
                if postings and postings[-1] >= first:
                    start = bisect_left(postings, first)
                    weight = idf_of(name) or idf(name)
                    tokens.append((len(postings) - start, weight, 0, [(postings, start)]))
            if rules.use_katakana:
                tokens += index.katakana_tokens(f, first, corpus)
            tokens.sort(key=lambda token: token[0], reverse=True)
            for _count, weight, kind, lists in tokens:
                if light_names + light_katakana + weight <= bounds.name_budget:
                    if kind:
                        light_katakana += weight
                    else:
                        light_names += weight
                    continue
                get = names.get
                if kind == 0:
                    postings, start = lists[0]
                    inside = postings[start:]
                    if len(postings) <= max_postings:
                        reached.update(inside)
                    for seq in inside:
                        names[seq] = get(seq, 0.0) + weight
                    continue
                # Katakana: into the names, and apart for the second look below. Kind 1
                # (this item's katakana word) adds once per item, however many names.
                hit: set[int] = set()
                for postings, start in lists:
                    hit.update(postings[start:])
                kana = katakana.get
                for seq in hit:
                    names[seq] = get(seq, 0.0) + weight
                    katakana[seq] = kana(seq, 0.0) + weight

        words: dict[int, float] = {}
        light_words: list[tuple[str, float]] = []
        light_norm = 0.0
        if rules.use_text and f.words:
            own_norm = corpus.norm(f.words)
            # The commonest words (lowest idf) first: they are the ones left unlooked-up.
            word_tokens = sorted(
                (idf_of(word) or idf(word), word, n) for word, n in f.words.items()
            )
            word_postings = index.words
            light = 0.0
            for weight, word, n in word_tokens:
                share = n * weight / own_norm  # this word's part of the unit vector
                factor = share * weight
                if light + share * share <= bounds.text_budget_squared:
                    light += share * share
                    light_words.append((word, factor))
                    continue
                entry = word_postings.get(word)
                if entry is None:
                    continue
                postings, counts = entry
                if postings[-1] < first:
                    continue
                start = bisect_left(postings, first)
                inside = postings[start:]
                if len(postings) <= max_postings:
                    reached.update(inside)
                get = words.get
                for seq, count in zip(inside, counts[start:], strict=True):
                    words[seq] = get(seq, 0.0) + factor * count
            light_norm = math.sqrt(light)

        limit = rules.threshold - 0.001  # a score is rounded to 3 decimals
        name_weight, saturation = rules.name_weight, rules.name_saturation
        text_weight = rules.text_weight
        least_similarity = rules.min_text_similarity
        use_names, use_text = rules.use_names, rules.use_text
        language = item.language
        languages = index.language
        norm = index.norm_getter(corpus)
        slack = light_names + light_katakana
        # What names give an item that shares none of the rare ones.
        base = name_weight * min(1.0, slack / saturation) if use_names else 0.0
        flag_of, words_of = flags.get, words.get
        rough: list[int] = []
        for seq, weight in names.items():  # items sharing a rare name (or katakana)
            weight += slack
            bound = name_weight * (1.0 if weight >= saturation else weight / saturation)
            if flags:
                bound += flag_of(seq, 0.0)
            if bound < limit and use_text and languages[seq] == language:
                cosine = light_norm
                part = words_of(seq)
                if part is not None:
                    cosine += part / norm(seq)
                if cosine >= least_similarity:
                    bound += text_weight * cosine
            if bound >= limit:
                rough.append(seq)
        if use_text:
            # Items sharing rare words, in the same language.
            needed = (limit - base) / text_weight - light_norm if text_weight else 1.0
            for seq, part in words.items():
                if seq in names or languages[seq] != language:
                    continue
                cosine = part / norm(seq)
                if cosine < needed and seq not in flags:
                    continue
                cosine += light_norm
                bound = base + flag_of(seq, 0.0)
                if cosine >= least_similarity:
                    bound += text_weight * cosine
                if bound >= limit:
                    rough.append(seq)
        for seq, bound in flags.items():  # and the rest of those sharing a link or number
            if seq in names or (use_text and seq in words and languages[seq] == language):
                continue
            bound += base
            if use_text and languages[seq] == language and light_norm >= least_similarity:
                bound += text_weight * light_norm
            if bound >= limit:
                rough.append(seq)
        # The few left: names and text exactly (katakana still by its bound).
        promising: set[int] = set()
        for seq in rough:
            other = index.features[seq]
            bound = flags.get(seq, 0.0)
            if use_names:
                weight = sum(idf(t) for t in f.names & other.names)
                weight += katakana.get(seq, 0.0) + light_katakana
                bound += name_weight * min(1.0, weight / saturation)
            if bound < limit and use_text and languages[seq] == language:
                its_words = other.words
                dot = words.get(seq, 0.0)  # the rare words' part, and now the common ones'
                dot += sum(w * its_words[t] for t, w in light_words if t in its_words)
                if dot:
                    cosine = dot / norm(seq) + 1e-9
                    if cosine >= least_similarity:
                        bound += text_weight * cosine
            if bound >= limit:
                promising.add(seq)
        return promising, reached

    def _slim_before(self, first: int) -> None:
        index = self._index
        for seq in range(self._slim_from, first):
            f = index.features[seq]
            slim = Features(
                names=_EMPTY,
                skeletons=_EMPTY,
                words=_NO_WORDS,
                amounts=f.amounts,
                percents=f.percents,
                dates=f.dates,
                codes=f.codes,
                links=f.links,
                own_link=f.own_link,
                series_title=f.series_title,
                series_numbers=f.series_numbers,
            )
            index.features[seq] = slim
            self._features[index.ids[seq]] = slim
            self._slimmed.add(index.ids[seq])
        self._slim_from = max(self._slim_from, first)

    def _full_features(self, item_id: str) -> Features:
        if item_id in self._slimmed:
            self._features[item_id] = features(self._items[item_id])
            self._slimmed.discard(item_id)
        return self._features[item_id]

    def _record(self, item: StoryItem, f: Features, story: int | None, match: Match) -> None:
        if story is None:
            story = self._stories
            self._stories += 1
        self.story_of[item.id] = story
        self._members[story].append(item.id)
        self.reasons[item.id] = match
        self._index.add(item, f, story)

    def result(self) -> Clustering:
        return Clustering(dict(self.story_of), dict(self.reasons))


# A name-like token for _promising: (items in the window holding it, its idf or a bound
# of it, 0 for a name or 1, 2 for katakana, the postings with the window's start).
_NameToken = tuple[int, float, int, list[tuple["array[int]", int]]]


class _Index:
    """The placed items by number (in the order they were placed) and the postings of
    their evidence: numbers, oldest first, so the part inside a time window is one
    bisect away. ``candidate_keys`` by kind: words (each item's count beside), names,
    sound skeletons, and the rest (amounts, codes, dates, links) under their key; and,
    for bounding only, percentages and the katakana machinery."""

    def __init__(self, *, keys_only: bool = False) -> None:
        # keys_only: the postings of candidate_keys and nothing for bounding (join_batch
        # bounds pair by pair); a first cycle's 15,000 items need that much less memory.
        self.keys_only = keys_only
        self.ids: list[str] = []
        self.micros: list[int] = []
        self.features: list[Features] = []
        self.story: list[int] = []
        self.language: list[str] = []
        self.members: defaultdict[int, list[int]] = defaultdict(list)
        self.words: dict[str, tuple[array[int], array[int]]] = {}
        self.names: dict[str, array[int]] = {}
        self.skeletons: dict[str, array[int]] = {}
        self.others: dict[str, array[int]] = {}
        self.percents: dict[str, array[int]] = {}
        # Katakana words and the Latin names within one consonant of them (_close),
        # kept up to date both ways as new ones come.
        self.latin: dict[str, array[int]] = {}  # skeleton of a name of 4+ letters
        self.latin_names: dict[str, tuple[str, ...]] = {}
        self.registered: set[str] = set()
        self.latin_letters: set[str] = set()
        self.katakana: dict[str, array[int]] = {}
        self.katakana_variants: defaultdict[tuple[str, int, str], set[str]] = defaultdict(set)
        self.near_latin: dict[str, set[str]] = {}
        self._idf_of_latin: dict[str, tuple[int, int, float]] = {}
        self.near_katakana: defaultdict[str, set[str]] = defaultdict(set)
        self._norms: list[float] = []
        self._norm_versions: list[int] = []

    def add(self, item: StoryItem, f: Features, story: int) -> None:
        seq = len(self.ids)
        self.ids.append(item.id)
        self.micros.append(_micros(item.published))
        self.features.append(f)
        self.story.append(story)
        self.language.append(item.language)
        self.members[story].append(seq)
        self._norms.append(0.0)
        self._norm_versions.append(-1)
        words = self.words
        for word, n in f.words.items():
            if len(word) >= 2:
                entry = words.get(word)
                if entry is None:
                    entry = words[word] = (array("I"), _NO_COUNTS if self.keys_only else array("I"))
                entry[0].append(seq)
                if not self.keys_only:
                    entry[1].append(n)
        for name in f.names:
            _append(self.names, name, seq)
        for skeleton in _skeleton_keys(f):
            _append(self.skeletons, skeleton, seq)
        for key in _other_keys(f):
            _append(self.others, key, seq)
        if self.keys_only:
            return
        for value in f.percents:
            _append(self.percents, value, seq)
        for name in f.names:
            if len(name) >= 4:
                latin = latin_skeleton(name)
                if len(latin) >= 3:
                    self._register_latin(latin)
                    postings = self.latin.get(latin)
                    if postings is None:
                        self.latin[latin] = array("I", (seq,))
                    elif postings[-1] != seq:
                        postings.append(seq)
                    known = self.latin_names.get(latin, ())
                    if name not in known:
                        self.latin_names[latin] = (*known, name)
        for skeleton in f.skeletons:
            self._near_latin_of(skeleton)
            _append(self.katakana, skeleton, seq)

    def postings_of_keys(self, f: Features) -> Iterator[array[int]]:
        """The postings of each of ``candidate_keys(f)``."""
        for word in f.words:
            entry = self.words.get(word)
            if entry is not None:
                yield entry[0]
        for kind, keys in (
            (self.names, f.names),
            (self.skeletons, _skeleton_keys(f)),
            (self.others, _other_keys(f)),
        ):
            for key in keys:
                postings = kind.get(key)
                if postings:
                    yield postings

    def share_a_key(self, f: Features, other: Features, max_postings: int) -> bool:
        """Whether two items share one of ``candidate_keys`` held by at most
        ``max_postings`` placed items."""
        if any(
            word in other.words and len(self.words[word][0]) <= max_postings
            for word in f.words
            if word in self.words
        ):
            return True
        for kind, mine, theirs in (
            (self.names, f.names, other.names),
            (self.skeletons, _skeleton_keys(f), _skeleton_keys(other)),
            (self.others, _other_keys(f), _other_keys(other)),
        ):
            if any(len(kind.get(key, ())) <= max_postings for key in mine & theirs):
                return True
        return False

    def norm_getter(self, corpus: Corpus) -> Callable[[int], float]:
        norms, versions, version = self._norms, self._norm_versions, corpus.version
        features = self.features

        def norm(seq: int) -> float:
            if versions[seq] != version:
                norms[seq] = corpus.norm(features[seq].words)
                versions[seq] = version
            return norms[seq]

        return norm

    def katakana_tokens(self, f: Features, first: int, corpus: Corpus) -> list[_NameToken]:
        """What katakana transliterations can add to the names ``f`` shares with each
        item in the window (``_katakana_matches`` both ways), as name-like tokens:
        (items, largest idf, 1 or 2, postings). Each katakana word adds one name at
        most. Kind 1: a katakana word of ``f``, near the Latin names of those items.
        Kind 2: a katakana word of those items, near a Latin name of ``f``."""
        idf = corpus.idf
        tokens: list[_NameToken] = []
        for skeleton in f.skeletons:
            lists, count, weight = [], 0, 0.0
            for near in self._near_latin_of(skeleton):
                postings = self.latin.get(near)
                if postings and postings[-1] >= first:
                    start = bisect_left(postings, first)
                    lists.append((postings, start))
                    count += len(postings) - start
                    weight = max(weight, self._largest_idf(near, corpus))
            if lists:
                tokens.append((count, weight, 1, lists))
        near_words: dict[str, float] = {}
        for name in f.names:
            if len(name) >= 4:
                latin = latin_skeleton(name)
                if len(latin) < 3:
                    continue
                self._register_latin(latin)
                for word in self.near_katakana.get(latin, ()):
                    near_words[word] = max(near_words.get(word, 0.0), idf(name))
        for word, weight in near_words.items():
            postings = self.katakana.get(word)
            if postings and postings[-1] >= first:
                start = bisect_left(postings, first)
                tokens.append((len(postings) - start, weight, 2, [(postings, start)]))
        return tokens

    def _largest_idf(self, latin: str, corpus: Corpus) -> float:
        """The largest idf of the names with this skeleton, kept while nothing changes."""
        names = self.latin_names[latin]
        kept = self._idf_of_latin.get(latin)
        if kept is None or kept[0] != corpus.version or kept[1] != len(names):
            largest = max(map(corpus.idf, names))
            kept = self._idf_of_latin[latin] = (corpus.version, len(names), largest)
        return kept[2]

    def _near_latin_of(self, skeleton: str) -> set[str]:
        """The Latin-name skeletons ``_close`` to a katakana word's."""
        near = self.near_latin.get(skeleton)
        if near is None:
            near = set(_within_one(skeleton, self.latin_letters, self.latin))
            self.near_latin[skeleton] = near
            for latin in near:
                self.near_katakana[latin].add(skeleton)
            for key in _variants_of(skeleton, query=False):
                self.katakana_variants[key].add(skeleton)
        return near

    def _register_latin(self, latin: str) -> None:
        """A Latin-name skeleton: near which known katakana words (once)."""
        if latin in self.registered:
            return
        self.registered.add(latin)
        self.latin_letters.update(latin)
        for key in _variants_of(latin, query=True):
            for word in self.katakana_variants.get(key, ()):
                if _close(word, latin):
                    self.near_latin[word].add(latin)
                    self.near_katakana[latin].add(word)


_NO_COUNTS: array[int] = array("I")  # shared, never appended to


def _append(postings: dict[str, array[int]], key: str, seq: int) -> None:
    found = postings.get(key)
    if found is None:
        postings[key] = array("I", (seq,))
    else:
        found.append(seq)


def _skeleton_keys(f: Features) -> set[str]:
    """The "k:" keys of ``candidate_keys``, without the prefix."""
    keys = set(f.skeletons)
    keys |= {latin_skeleton(n) for n in f.names if len(n) >= 4 and n.isalpha()}
    return keys


def _other_keys(f: Features) -> set[str]:
    """The amount, code, link and date keys of ``candidate_keys``."""
    keys = {f"a:{c}{v}" for c, v in f.amounts}
    keys |= {f"c:{c}" for c in f.codes}
    keys |= {f"l:{link}" for link in f.links}
    if f.own_link:
        keys.add(f"l:{f.own_link}")
    keys |= {f"d:{d.isoformat()}" for d in f.dates}
    return keys


# The shares of the threshold that common names and common words may give unlooked-up
# (together below 1, so an item sharing no rare token can never pass).
_NAME_BUDGET = 0.25
_TEXT_BUDGET = 0.5


@dataclass(frozen=True)
class _Bounds:
    """How much of the name and text evidence ``_promising`` may leave unlooked-up."""

    window: int  # microseconds
    name_budget: float  # idf sum
    text_budget: float  # part of a unit vector's length
    text_budget_squared: float

    @classmethod
    def of(cls, rules: MatchRules) -> _Bounds | None:
        """None when the rules do not allow bounding (the plain way is taken)."""
        weights = (
            rules.link_weight, rules.amount_weight, rules.code_weight, rules.date_weight,
            rules.percent_weight, rules.name_weight, rules.text_weight,
        )  # fmt: skip
        if rules.threshold <= 0.01 or min(weights) < 0 or rules.name_saturation <= 0:
            return None
        # An item that shares no rare token gets at most half the threshold from common
        # names, and no text score at all (below min_text_similarity).
        name_budget = 0.0
        if rules.use_names and rules.name_weight > 0:
            name_budget = _NAME_BUDGET * rules.threshold * rules.name_saturation / rules.name_weight
        text_budget = 0.0
        if rules.use_text and rules.text_weight > 0:
            text_budget = _TEXT_BUDGET * rules.threshold / rules.text_weight
        return cls(
            window=timedelta(days=rules.window_days) // _MICROSECOND,
            name_budget=name_budget,
            text_budget=text_budget,
            text_budget_squared=text_budget * text_budget,
        )


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = datetime(1970, 1, 1)
_MICROSECOND = timedelta(microseconds=1)


def _micros(moment: datetime) -> int:
    """A time as whole microseconds, which compare and subtract as the datetimes do."""
    epoch = _NAIVE_EPOCH if moment.utcoffset() is None else _EPOCH
    return (moment - epoch) // _MICROSECOND


def _variants_of(skeleton: str, *, query: bool) -> list[tuple[str, int, str]]:
    """Keys under which two skeletons within one edit (``_close``) meet.

    Stored skeletons go in under themselves, each one-deletion at its position (a
    substitution there meets it), and each one-deletion without position (a skeleton
    one shorter meets it). A query looks up itself, its one-deletions at their
    position, and its one-deletions as whole skeletons (one longer than a stored one).
    """
    deletions = [(skeleton[:i] + skeleton[i + 1 :], i) for i in range(len(skeleton))]
    if query:
        keys = [("=", 0, skeleton), ("-", -1, skeleton)]
        keys += [("-", i, d) for d, i in deletions]
        keys += [("=", 0, d) for d, _ in deletions]
    else:
        keys = [("=", 0, skeleton)]
        keys += [("-", i, d) for d, i in deletions]
        keys += [("-", -1, d) for d, _ in deletions]
    return keys


def _within_one(skeleton: str, letters: Iterable[str], known: Mapping[str, object]) -> list[str]:
    """The known skeletons ``_close`` to this one: all single edits, looked up."""
    found = [skeleton] if skeleton in known else []
    if len(skeleton) < 3:
        return found
    candidates: set[str] = set()
    for i in range(len(skeleton) + 1):
        head, tail = skeleton[:i], skeleton[i:]
        if tail:
            candidates.add(head + tail[1:])
        for letter in letters:
            candidates.add(head + letter + tail)
            if tail:
                candidates.add(head + letter + tail[1:])
    candidates.discard(skeleton)
    found += [c for c in candidates if c in known and _close(skeleton, c)]
    return found


def cluster(
    items: Sequence[StoryItem],
    rules: MatchRules = DEFAULT_RULES,
    *,
    force_together: Iterable[tuple[str, str]] = (),
    force_apart: Iterable[tuple[str, str]] = (),
) -> Clustering:
    """Group items into stories from scratch (see Clusterer)."""
    clusterer = Clusterer(rules, force_together=force_together, force_apart=force_apart)
    clusterer.add(items)
    return clusterer.result()


_K = TypeVar("_K", bound=Hashable)
_TOGETHER = Match(99.0, ("forced together by the config",))


def join_batch(
    items: Mapping[_K, StoryItem],
    feats: Mapping[_K, Features],
    story_of: dict[_K, int],
    new_ids: Sequence[_K],
    rules: MatchRules = DEFAULT_RULES,
    *,
    forced: Callable[[StoryItem, StoryItem], str | None] | None = None,
    bounded: bool = True,
) -> list[tuple[_K, int, Match]]:
    """For each new item in order, the story of another item it joins, and why.

    ``items`` are every item around the new ones (the time window on either side), each
    in the story ``story_of`` names; the new ones are in stories of their own. Each new
    item is decided by ``choose_story`` over the stories that hold an item in its window
    sharing an index key (``candidate_keys``) held by at most 1 in 20 items, every
    member of such a story taking part; ``story_of`` is updated as items join, so a
    later new item can join a story an earlier one joined. A new item meets only the
    items already decided (the older ones and the new ones before it), never a new one
    still waiting: otherwise the first version of an event picks its best partner among
    the later ones, the second picks another, and one event ends up as two stories of
    two that never merge (the labelled set in one batch lost a fifth of its recall that
    way). This is the order ``Clusterer`` places items in.

    ``bounded`` (the default) scores only the members whose evidence can reach the
    threshold (``_pair_bounder``, under the conditions ``Clusterer``'s bounds need,
    ``_Bounds.of``); the others cannot pass, so the decisions are those of scoring them
    all (``bounded=False``, kept as the reference the tests compare with). A first
    cycle of 15,000 items scored over a million pairs; most fall short of the
    threshold by their shared evidence alone. ``forced`` is ``StoryMatcher.forced``.
    """
    corpus = Corpus()
    for f in feats.values():
        corpus.add(f)
    bounds = _Bounds.of(rules) if bounded else None
    collecting = gc.isenabled()
    gc.disable()  # millions of small acyclic containers; see Clusterer.add
    try:
        if bounds is None:
            return _join_plain(items, feats, story_of, new_ids, rules, corpus, forced)
        return _join_bounded(items, feats, story_of, new_ids, rules, corpus, forced)
    finally:
        if collecting:
            gc.enable()


def _join_plain(
    items: Mapping[_K, StoryItem],
    feats: Mapping[_K, Features],
    story_of: dict[_K, int],
    new_ids: Sequence[_K],
    rules: MatchRules,
    corpus: Corpus,
    forced: Callable[[StoryItem, StoryItem], str | None] | None,
) -> list[tuple[_K, int, Match]]:
    """``join_batch`` scoring every member of every candidate story."""
    keys = {i: candidate_keys(f) for i, f in feats.items()}
    index: defaultdict[str, list[_K]] = defaultdict(list)
    for i, item_keys in keys.items():
        for key in item_keys:
            index[key].append(i)
    members: defaultdict[int, list[_K]] = defaultdict(list)
    for i, story in story_of.items():
        members[story].append(i)
    max_postings = max(50, len(items) // 20)
    window = timedelta(days=rules.window_days)
    decisions: list[tuple[_K, int, Match]] = []
    waiting = set(new_ids)
    for new_id in new_ids:
        waiting.discard(new_id)
        item = items[new_id]
        own_story = story_of[new_id]
        if len(members[own_story]) > 1:
            continue
        found: set[_K] = set()
        for key in keys[new_id]:
            postings = index.get(key)
            if postings and len(postings) <= max_postings:
                found.update(postings)
        found -= waiting  # see join_batch: a new item meets only those decided before it
        related = {
            story_of[o]
            for o in found
            if story_of[o] != own_story and abs(items[o].published - item.published) <= window
        }
        candidates = [Candidate(items[m], feats[m], s) for s in related for m in members[s]]
        chosen, match = choose_story(item, feats[new_id], candidates, corpus, rules, forced=forced)
        if chosen is None:
            continue
        decisions.append((new_id, chosen, match))
        members[own_story].remove(new_id)
        members[chosen].append(new_id)
        story_of[new_id] = chosen
    return decisions


def _join_bounded(
    items: Mapping[_K, StoryItem],
    feats: Mapping[_K, Features],
    story_of: dict[_K, int],
    new_ids: Sequence[_K],
    rules: MatchRules,
    corpus: Corpus,
    forced: Callable[[StoryItem, StoryItem], str | None] | None,
) -> list[tuple[_K, int, Match]]:
    """``join_batch`` scoring only the members whose ``_pair_bounder`` reaches the
    threshold.

    The candidate stories are found as the plain way finds them, from an ``_Index`` of
    all the items in time order (a window is one bisect on either side, and a key's
    postings are arrays of numbers rather than lists of ids).
    """
    ids = list(items)
    micros_of = {i: _micros(items[i].published) for i in ids}
    ids.sort(key=micros_of.__getitem__)
    index = _Index(keys_only=True)
    seq_of: dict[_K, int] = {}
    for seq, i in enumerate(ids):
        seq_of[i] = seq
        index.add(items[i], feats[i], story_of[i])
    by_seq = [items[i] for i in ids]
    story = index.story  # kept current as items join
    micros = index.micros
    # Members in the order the plain way sees them: on equal scores the first one's
    # reasons are kept.
    members: defaultdict[int, list[int]] = defaultdict(list)
    for i, s in story_of.items():
        members[s].append(seq_of[i])
    max_postings = max(50, len(items) // 20)
    window = timedelta(days=rules.window_days) // _MICROSECOND
    seconds = rules.window_days * 86400
    # Then "within the window" by time stamp (bisect) and by score's test agree.
    exact_window = timedelta(days=rules.window_days).total_seconds() == seconds
    limit = rules.threshold - 0.001  # a score is rounded to 3 decimals
    threshold = rules.threshold
    for token in corpus.df:
        corpus.idf(token)
    weights = corpus._idf  # every token's, unchanged until the next add
    norms = [_vector_norm(f.words, weights) for f in index.features]
    pair_bound = _pair_bounder(rules, weights)
    decisions: list[tuple[_K, int, Match]] = []
    waiting = {seq_of[i] for i in new_ids}
    for new_id in new_ids:
        seq = seq_of[new_id]
        waiting.discard(seq)
        item, f = by_seq[seq], index.features[seq]
        own_story = story[seq]
        if len(members[own_story]) > 1:
            continue  # an earlier new item joined it: it anchors a story now
        first = bisect_left(micros, micros[seq] - window)
        stop = bisect_right(micros, micros[seq] + window)
        found: set[int] = set()
        for postings in index.postings_of_keys(f):
            if len(postings) <= max_postings and postings[-1] >= first and postings[0] < stop:
                start = 0 if postings[0] >= first else bisect_left(postings, first)
                end = len(postings) if postings[-1] < stop else bisect_left(postings, stop)
                found.update(postings[start:end])
        found -= waiting  # see join_batch: a new item meets only those decided before it
        related = set(map(story.__getitem__, found))
        related.discard(own_story)
        text_side = _text_side(f.words, weights)
        language = item.language
        # Each member's bound; a story's best match is found by scoring its members in
        # the order of their bounds, down to the best score found; stories are taken
        # in the order of their best bound, until none can beat the story chosen.
        plans: list[tuple[float, int, list[tuple[float, int, int]]]] = []
        for s in related:
            plan: list[tuple[float, int, int]] = []  # (-bound, position, member)
            top = 0.0
            for position, m in enumerate(members[s]):
                other = by_seq[m]
                rule = forced(item, other) if forced is not None else None
                if rule == "apart":
                    continue
                if rule == "together":
                    bound = _FORCED_BOUND
                elif (
                    not first <= m < stop
                    if exact_window
                    else abs((item.published - other.published).total_seconds()) > seconds
                ):
                    continue  # score's first veto
                else:
                    bound = pair_bound(
                        f, index.features[m], language == other.language, text_side, norms[m]
                    )
                    if bound < limit:
                        continue  # cannot pass
                plan.append((-bound, position, m))
                top = max(top, bound)
            if plan:
                plan.sort()
                plans.append((-top, s, plan))
        plans.sort()
        chosen: tuple[int, Match] | None = None
        for negative_top, s, plan in plans:
            if chosen is not None and -negative_top < chosen[1].score - _MARGIN:
                break  # no story left can reach the chosen one's score
            best: tuple[float, int, Match] | None = None  # (score, -position, match)
            for negative_bound, position, m in plan:
                if best is not None and -negative_bound < best[0] - _MARGIN:
                    break
                other = by_seq[m]
                if negative_bound == -_FORCED_BOUND:
                    match = _TOGETHER
                else:
                    match = score(item, f, other, index.features[m], corpus, rules)
                if (
                    match.score >= threshold
                    and match.veto is None
                    and (best is None or (match.score, -position) > best[:2])
                ):
                    best = (match.score, -position, match)
            if best is None:
                continue
            match = best[2]
            if chosen is not None and (match.score, -s) <= (chosen[1].score, -chosen[0]):
                continue
            if match.score >= 99.0 or all(
                _compatible(item, f, Candidate(by_seq[m], index.features[m], s), forced, rules)
                for m in members[s]
            ):
                chosen = (s, match)
        if chosen is not None:
            s, match = chosen
            decisions.append((new_id, s, match))
            members[own_story].remove(seq)
            members[s].append(seq)
            story[seq] = s
            story_of[new_id] = s
    return decisions


# Scores are rounded to 3 decimals: a bound this far below a score cannot reach it.
_MARGIN = 0.001
_FORCED_BOUND = 1e9


def _pair_bounder(
    rules: MatchRules, idf: Mapping[str, float]
) -> Callable[[Features, Features, bool, _TextSide, float], float]:
    """A function that gives at least ``score``'s score for two items, for a fraction
    of its cost (it runs for every member of every candidate story).

    The same evidence without the vetoes (which only lower a score) and without the
    reasons' text: links and numbers exactly, names exactly unless either item has
    katakana (then counted as saturated), the cosine summed over the shared words only.
    ``idf`` holds every token's ``Corpus.idf``; the function takes the two items'
    features, whether they are in one language, ``_text_side`` of the first item's
    words and the length of the second's TF-IDF vector. The small margins cover sums
    taken in another order. Needs ``_Bounds.of(rules)`` (no negative weight).
    """
    use_links, use_numbers = rules.use_links, rules.use_numbers
    use_names, use_katakana, use_text = rules.use_names, rules.use_katakana, rules.use_text
    link_weight, amount_weight = rules.link_weight, rules.amount_weight
    code_weight, date_weight = rules.code_weight, rules.date_weight
    percent_weight, name_weight = rules.percent_weight, rules.name_weight
    saturation, text_weight = rules.name_saturation, rules.text_weight
    least_similarity = rules.min_text_similarity
    idf_of = idf.__getitem__

    def bound(
        fa: Features, fb: Features, same_language: bool, text_a: _TextSide, norm_b: float
    ) -> float:
        total = 1e-9
        if use_links and (
            (fa.own_link and (fa.own_link == fb.own_link or fa.own_link in fb.links))
            or (fb.own_link and fb.own_link in fa.links)
            or not fa.links.isdisjoint(fb.links)
        ):
            total += link_weight
        if use_numbers:
            if not fa.amounts.isdisjoint(fb.amounts):
                total += amount_weight
            if not fa.codes.isdisjoint(fb.codes):
                total += code_weight
            if not fa.dates.isdisjoint(fb.dates):
                total += date_weight
            if not fa.percents.isdisjoint(fb.percents):
                total += percent_weight
        if use_names:
            if use_katakana and (fa.skeletons or fb.skeletons):
                total += name_weight
            else:
                shared = fa.names & fb.names
                if shared:
                    weight = sum(map(idf_of, shared)) + 1e-9
                    total += name_weight * (1.0 if weight >= saturation else weight / saturation)
        if same_language and use_text:
            weighted, norm_a = text_a
            words_b = fb.words
            shared_words = weighted.keys() & words_b.keys()
            if shared_words:
                # The same set iterated twice gives its elements in the same order.
                dot = sum(
                    map(
                        mul,
                        map(weighted.__getitem__, shared_words),
                        map(words_b.__getitem__, shared_words),
                    )
                )
                cosine = dot / (norm_a * norm_b) + 1e-9
                if cosine >= least_similarity:
                    total += text_weight * cosine
        return total

    return bound


# An item's words weighted by count x idf x idf (so that a product with another
# item's counts is a TF-IDF dot product), and the length of its TF-IDF vector.
_TextSide = tuple[dict[str, float], float]


def _text_side(words: Mapping[str, int], idf: Mapping[str, float]) -> _TextSide:
    weighted = {t: n * idf[t] * idf[t] for t, n in words.items()}
    return weighted, _vector_norm(words, idf)


def _vector_norm(words: Mapping[str, int], idf: Mapping[str, float]) -> float:
    """The length of a TF-IDF vector."""
    return math.sqrt(sum([(n * idf[t]) ** 2 for t, n in words.items()]))


# -- evaluation ---------------------------------------------------------------------------


def pairwise_scores(
    predicted: Mapping[str, object], truth: Mapping[str, object]
) -> tuple[float, float]:
    """Pairwise precision and recall of a clustering against labels."""
    ids = sorted(truth)

    def pairs(labels: Mapping[str, object]) -> set[tuple[str, str]]:
        groups: defaultdict[object, list[str]] = defaultdict(list)
        for i in ids:
            groups[labels[i]].append(i)
        return {(a, b) for g in groups.values() for x, a in enumerate(g) for b in g[x + 1 :]}

    got, want = pairs(predicted), pairs(truth)
    precision = len(got & want) / len(got) if got else 1.0
    recall = len(got & want) / len(want) if want else 1.0
    return precision, recall


class StoryMatcher:
    """The live pipeline's side of matching: rules from the config, cached features.

    The store hands it a new item and the items of other partners published within the
    time window; it answers which story the new item joins. Features of stored items
    are cached (they never change for a given entry id and text), so a fetch cycle
    does not recompute them for every new item.
    """

    def __init__(
        self,
        rules: MatchRules = DEFAULT_RULES,
        *,
        together: Iterable[tuple[str, str]] = (),
        apart: Iterable[tuple[str, str]] = (),
        cache_size: int = 50_000,
        encoder: str | None = None,
        model: Any = None,
    ) -> None:
        from clusterfeed.normalize import link_key, normalize_url

        self._encoder_spec = encoder
        self._model = model

        def key(url: str) -> str:
            return link_key(normalize_url(url) or url) or url

        self.rules = rules
        self._together = {frozenset((key(a), key(b))) for a, b in together}
        self._apart = {frozenset((key(a), key(b))) for a, b in apart}
        self._key = key
        # Entry id -> (a digest of the text features were computed from, the features):
        # the digest, not the text, so the cache does not hold every item's text.
        self._cache: dict[str, tuple[bytes, Features]] = {}
        self._cache_size = cache_size

    def features_of(self, item: StoryItem) -> Features:
        fingerprint = hashlib.blake2b(
            f"{item.title}\x1f{item.text}\x1f{item.link}\x1f{item.links}".encode(
                errors="surrogatepass"
            ),
            digest_size=16,
        ).digest()
        cached = self._cache.get(item.id)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        result = features(item)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[item.id] = (fingerprint, result)
        return result

    @property
    def model(self) -> Any:
        """The pair model (``clusterfeed.storymodel.PairModel``), loaded once."""
        if self._model is None:
            from clusterfeed.storymodel import default_model

            self._model = default_model()
        return self._model

    @property
    def encoder(self) -> Any:
        """The sentence encoder (``clusterfeed.encoder.Encoder``), shared by the process."""
        from clusterfeed.encoder import load_encoder

        return load_encoder(self._encoder_spec)

    def forced_links(self, a: str | None, b: str | None) -> str | None:
        """ "together", "apart" or None for the items at two links (the config's pairs)."""
        if not a or not b:
            return None
        pair = frozenset((self._key(a), self._key(b)))
        if pair in self._apart:
            return "apart"
        if pair in self._together:
            return "together"
        return None

    @property
    def forces_pairs(self) -> bool:
        """Whether the config forces any pair together or apart."""
        return bool(self._together or self._apart)

    def forced(self, a: StoryItem, b: StoryItem) -> str | None:
        if not (self._together or self._apart) or not a.link or not b.link:
            return None
        pair = frozenset((self._key(a.link), self._key(b.link)))
        if pair in self._apart:
            return "apart"
        if pair in self._together:
            return "together"
        return None

    def choose(
        self, item: StoryItem, candidates: Iterable[tuple[StoryItem, int]]
    ) -> tuple[int | None, Match]:
        f = features(item)
        keys = candidate_keys(f)
        corpus = Corpus()
        corpus.add(f)
        pool = []
        for other, story in candidates:
            other_features = self.features_of(other)
            corpus.add(other_features)
            pool.append(Candidate(other, other_features, story))
        # Only stories sharing some evidence with the item are worth scoring, but all of
        # such a story's members take part in the veto check.
        related = {c.story for c in pool if keys & candidate_keys(c.features)}
        chosen = [c for c in pool if c.story in related]
        return choose_story(item, f, chosen, corpus, self.rules, forced=self.forced)
