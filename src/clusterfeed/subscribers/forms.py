"""What a person may choose and send, read and checked: the pure half of subscribing.

The topics and languages on offer, the sign-up and preferences forms read into
``Preferences`` (or a ``FormError`` naming the field), what a sign-up leads to for an
address in each state, and the labels the pages show. No store, clock, secret or
mail here: ``subscribe.Subscriptions`` joins these decisions to them, and the web
pages (``web.signup``) and ``clusterfeed subscribers`` both use the same rules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from clusterfeed.config import Config, normalize_email
from clusterfeed.model import Membership

FREQUENCIES = ("daily", "weekly")
HONEYPOT = "website"
MAX_FIELD = 500


@dataclass(frozen=True)
class Choices:
    """What the form offers: the topics and languages of the configured feeds."""

    topics: tuple[str, ...]
    languages: tuple[str, ...]


def offered_choices(config: Config) -> Choices:
    topics = sorted({t for f in config.feeds if f.enabled for t in f.topics})
    languages = sorted({f.language for f in config.feeds if f.enabled})
    return Choices(tuple(topics), tuple(languages))


class FormError(ValueError):
    """One field of a form is not acceptable; ``field`` names it for the page."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Preferences:
    topics: tuple[str, ...]
    languages: tuple[str, ...]
    frequency: str
    paused: bool = False


def refuse_header_tricks(fields: Sequence[tuple[str, str]]) -> None:
    """Refuse line breaks, NULs and other control characters in any field.

    Values end up in mail headers (the address) and in the consent log; a CR or LF
    there is how header injection starts, so it is refused outright, in every field,
    rather than cleaned (a cleaned value is not what the person typed).
    """
    for name, value in fields:
        for text in (name, value):
            if any(ch in text for ch in "\r\n\0\x0b\x0c\x85\u2028\u2029"):
                raise FormError(name, "line breaks and control characters are not allowed")
            if len(text) > MAX_FIELD:
                raise FormError(name, f"at most {MAX_FIELD} characters")


def _subset(field: str, values: Sequence[str], offered: Sequence[str]) -> tuple[str, ...]:
    unknown = [v for v in values if v not in offered]
    if unknown:
        raise FormError(field, f"not offered: {', '.join(unknown)}")
    return tuple(v for v in offered if v in values)


def read_preferences(fields: Sequence[tuple[str, str]], choices: Choices) -> Preferences:
    """Topics, languages, frequency and pause from a posted form (none chosen = all)."""
    refuse_header_tricks(fields)
    topics = [v for k, v in fields if k == "topics"]
    languages = [v for k, v in fields if k == "languages"]
    frequency = next((v for k, v in fields if k == "frequency"), "daily")
    if frequency not in FREQUENCIES:
        raise FormError("frequency", "choose daily or weekly")
    return Preferences(
        topics=_subset("topics", topics, choices.topics),
        languages=_subset("languages", languages, choices.languages),
        frequency=frequency,
        paused=any(k == "paused" and v for k, v in fields),
    )


def read_signup(fields: Sequence[tuple[str, str]], choices: Choices) -> tuple[str, Preferences]:
    """The normalized address and the choices of a sign-up form, or ``FormError``."""
    refuse_header_tricks(fields)
    raw = next((v for k, v in fields if k == "email"), "").strip()
    if not raw:
        raise FormError("email", "please enter your e-mail address")
    try:
        email = normalize_email(raw)
    except ValueError as exc:
        raise FormError("email", str(exc)) from None
    prefs = read_preferences([f for f in fields if f[0] != "paused"], choices)
    return email, prefs


def signup_outcome(membership: Membership | None, suppressed: bool) -> str:
    """Which mail a sign-up for an address leads to (the page is always the same).

    ``erased``: the address was erased on request, and cannot be signed up again by
    the form (the mail says whom to ask). ``already``: a confirmed subscriber gets
    their preferences link instead of a second confirmation. ``confirm``: everyone
    else (new, pending, unsubscribed, removed) gets a confirmation link.
    """
    if suppressed and membership is None:
        return "erased"
    if membership is not None and membership.status == "confirmed":
        return "already"
    return "confirm"


def topic_label(topic: str) -> str:
    return topic.replace("-", " ").replace("_", " ").capitalize()


# Each language named in itself, as a reader of it would look for it; others show their code.
LANGUAGE_NAMES = {
    "da": "Dansk", "de": "Deutsch", "en": "English", "es": "Español", "fi": "Suomi",
    "fr": "Français", "it": "Italiano", "ja": "日本語", "ko": "한국어", "nl": "Nederlands",
    "no": "Norsk", "pl": "Polski", "pt": "Português", "sv": "Svenska", "zh": "中文",
}  # fmt: skip


def language_label(code: str) -> str:
    return LANGUAGE_NAMES.get(code.split("-")[0].lower(), code.upper())


def consent_row(choices: Mapping[str, object]) -> str:
    """Choices as one readable cell for the consent export."""
    parts = []
    for key in ("topics", "languages", "frequency", "paused"):
        if key in choices:
            value = choices[key]
            if isinstance(value, list | tuple):
                value = ";".join(str(v) for v in value) or "all"
            parts.append(f"{key}={value}")
    return " ".join(parts)
