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
import itertools
import math
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Any

from clusterfeed.dates import MONTHS


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


DEFAULT_RULES = MatchRules()


@dataclass(frozen=True)
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


def latin_tokens(text: str) -> list[str]:
    return [t.lower().strip("-'’") for t in _LATIN_TOKEN.findall(text)]


_SENTENCE_START = re.compile(r"(?:^|[.!?:;–—\-\"„“»«()\[\]]\s*)$")


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
        if len(token) < 3 or token.isdigit():
            continue
        inner = token[1:]
        looks_like_name = (
            any(c.isupper() for c in inner)
            or any(c.isdigit() for c in token)
            or (token[0].isupper() and not _SENTENCE_START.search(text[: match.start()]))
        )
        lowered = token.lower().strip("-'’")
        if looks_like_name and lowered not in STOPWORDS:
            result.add(lowered)
    return result


def cjk_bigrams(text: str) -> list[str]:
    chars = [c for c in text if _CJK.match(c)]
    return ["".join(pair) for pair in itertools.pairwise(chars)]


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
        for part in re.split(r"[・=＝]", run):
            if len(part) < 2:
                continue
            converted = _kakasi().convert(part)
            romaji = "".join(piece["hepburn"] for piece in converted)
            romaji = romaji.replace("shi", "si").replace("chi", "ti").replace("tsu", "tu")
            romaji = romaji.replace("fu", "hu").replace("ji", "zi")
            skeleton = _consonants(romaji)
            if len(skeleton) >= 3:
                result.add(skeleton)
    return result


def _close(a: str, b: str) -> bool:
    """Skeletons that differ by at most one consonant (for names of 4+ consonants)."""
    if a == b:
        return True
    if min(len(a), len(b)) < 4 or abs(len(a) - len(b)) > 1:
        return False
    # One edit: substitution, insertion or deletion.
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b, strict=True)) <= 1
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


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
    re.compile(rf"{_CUR}\s?{_NUM}\s?{_SCALE}?\b", re.IGNORECASE),
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
_DATE_MDY = re.compile(
    rf"\b({_MONTH_NAMES})\.?\s+(\d{{1,2}})(?:st|nd|rd|th)?,?\s+(\d{{4}})", re.IGNORECASE
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
    for pattern in _AMOUNT_PATTERNS:
        for match in pattern.finditer(text):
            groups = [g for g in match.groups() if g]
            currency = number = scale = None
            for g in groups:
                key = g.lower()
                if key in _CURRENCIES:
                    currency = _CURRENCIES[key]
                elif key in _SCALES:
                    scale = _SCALES[key]
                elif re.fullmatch(r"\d+(?:[.,]\d+)?", g):
                    number = g
            if currency and number:
                try:
                    value = _number(number, comma) * (scale or 1)
                except ValueError:
                    continue
                if value >= 1000:  # "EUR 5" in a ticket price is not news evidence
                    found.add((currency, _round3(value)))
    for match in _JA_AMOUNT.finditer(text):
        cho, oku, man, units, cur = match.groups()
        value = (
            float(cho or 0) * 1e12 + float(oku or 0) * 1e8 + float(man or 0) * 1e4
            + float(units or 0)
        )  # fmt: skip
        if value >= 1000 and (cho or oku or man):
            found.add((_CURRENCIES[cur], _round3(value)))
    return found


def percents(text: str, language: str) -> set[str]:
    result = set()
    for match in _PERCENT.finditer(text):
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
    for y, m, d in _DATE_JA.findall(text):
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
    tokens = latin_tokens(text)
    names = frozenset(name_tokens(title) | name_tokens(body))
    words: Counter[str] = Counter(t for t in tokens if t not in STOPWORDS and len(t) >= 2)
    words.update(cjk_bigrams(text))
    skeletons = frozenset(katakana_skeletons(text)) if _KATAKANA_RUN.search(text) else frozenset()
    links = frozenset(filter(None, (_link_key(u) for u in (*item.links, *_URL.findall(item.text)))))
    masked, numbers = series_key(title)
    return Features(
        names=names,
        skeletons=skeletons,
        words=words,
        amounts=frozenset(amounts(text, item.language)),
        percents=frozenset(percents(text, item.language)),
        dates=frozenset(calendar_dates(text)),
        codes=frozenset(codes(text)),
        links=links,
        own_link=_link_key(item.link) if item.link else None,
        series_title=masked,
        series_numbers=numbers,
    )


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

    def add(self, f: Features) -> None:
        self.documents += 1
        self.df.update(set(f.words) | f.names)

    def idf(self, token: str) -> float:
        """Inverse document frequency scaled to (0, 1]: 1 for a token seen nowhere else,
        lower the more items share it. Scaling by the corpus size keeps thresholds
        meaningful for a window of 50 items as for one of 50,000."""
        n = self.documents
        return (math.log((1 + n) / (1 + self.df.get(token, 0))) + 1.0) / (math.log(1 + n) + 1.0)


def _weighted_overlap(
    a: Iterable[str], b: Iterable[str], corpus: Corpus
) -> tuple[float, list[str]]:
    set_a, set_b = set(a), set(b)
    shared = set_a & set_b
    if not shared:
        return 0.0, []

    ranked = sorted(shared, key=corpus.idf, reverse=True)
    return sum(corpus.idf(t) for t in shared), ranked


def _cosine(a: Mapping[str, int], b: Mapping[str, int], corpus: Corpus) -> float:
    if not a or not b:
        return 0.0
    va = {t: n * corpus.idf(t) for t, n in a.items()}
    vb = {t: n * corpus.idf(t) for t, n in b.items()}
    dot = sum(v * vb[t] for t, v in va.items() if t in vb)
    if not dot:
        return 0.0
    return dot / (
        math.sqrt(sum(v * v for v in va.values())) * math.sqrt(sum(v * v for v in vb.values()))
    )


def _katakana_matches(skeletons: frozenset[str], names: frozenset[str]) -> list[str]:
    latin = {latin_skeleton(n): n for n in names if len(n) >= 4}
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


def _candidate_keys(f: Features) -> set[str]:
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

    The item joins the story with the strongest evidence, provided the evidence passes
    the threshold against at least one of its items and no item of that story vetoes
    it. Checking every member (complete link) keeps a chain of weak resemblances from
    pulling two different events into one story. This is the one decision used by both
    the live pipeline and the evaluation on the labelled set.
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
    for story, match in sorted(scored.items(), key=lambda kv: -kv[1].score):
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
        self._index: defaultdict[str, list[str]] = defaultdict(list)
        self._members: defaultdict[int, list[str]] = defaultdict(list)
        self._stories = 0
        self._together = {frozenset(p) for p in force_together}
        self._apart = {frozenset(p) for p in force_apart}

    def _forced(self, a: StoryItem, b: StoryItem) -> str | None:
        pair = frozenset((a.id, b.id))
        if pair in self._together:
            return "together"
        return "apart" if pair in self._apart else None

    def add(self, items: Sequence[StoryItem]) -> None:
        """Place new items, oldest first; items already placed are not moved."""
        ordered = sorted(items, key=lambda i: (i.published, i.id))
        for item in ordered:
            f = features(item)
            self._features[item.id] = f
            self._items[item.id] = item
            self.corpus.add(f)
        forced = self._forced if self._together or self._apart else None
        window = timedelta(days=self.rules.window_days)
        # Very common keys (a word in every other item) find nothing useful and cost time.
        max_postings = max(50, len(self._items) // 20)
        for item in ordered:
            f = self._features[item.id]
            keys = _candidate_keys(f)
            found: set[str] = set()
            for key in keys:
                postings = self._index.get(key)
                if postings and len(postings) <= max_postings:
                    found.update(postings)
            # Every member of a candidate's story takes part in the veto check.
            story_ids = {
                self.story_of[o]
                for o in found
                if abs(item.published - self._items[o].published) <= window
            }
            candidates = [
                Candidate(self._items[m], self._features[m], story)
                for story in story_ids
                for m in self._members[story]
            ]
            story, match = choose_story(item, f, candidates, self.corpus, self.rules, forced=forced)
            if story is None:
                story = self._stories
                self._stories += 1
            self.story_of[item.id] = story
            self._members[story].append(item.id)
            self.reasons[item.id] = match
            for key in keys:
                self._index[key].append(item.id)

    def result(self) -> Clustering:
        return Clustering(dict(self.story_of), dict(self.reasons))


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
    ) -> None:
        from clusterfeed.normalize import link_key, normalize_url

        def key(url: str) -> str:
            return link_key(normalize_url(url) or url) or url

        self.rules = rules
        self._together = {frozenset((key(a), key(b))) for a, b in together}
        self._apart = {frozenset((key(a), key(b))) for a, b in apart}
        self._key = key
        self._cache: dict[str, tuple[str, Features]] = {}
        self._cache_size = cache_size

    def features_of(self, item: StoryItem) -> Features:
        fingerprint = f"{item.title}\x1f{item.text}\x1f{item.link}"
        cached = self._cache.get(item.id)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        result = features(item)
        if len(self._cache) >= self._cache_size:
            self._cache.pop(next(iter(self._cache)))
        self._cache[item.id] = (fingerprint, result)
        return result

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
        keys = _candidate_keys(f)
        corpus = Corpus()
        corpus.add(f)
        pool = []
        for other, story in candidates:
            other_features = self.features_of(other)
            corpus.add(other_features)
            pool.append(Candidate(other, other_features, story))
        # Only stories sharing some evidence with the item are worth scoring, but all of
        # such a story's members take part in the veto check.
        related = {c.story for c in pool if keys & _candidate_keys(c.features)}
        chosen = [c for c in pool if c.story in related]
        return choose_story(item, f, chosen, corpus, self.rules, forced=self.forced)
