"""What each subscriber gets, and how it looks.

Two halves, both pure: *selection* decides which stories a subscriber should receive
(their topics and languages, nothing they were sent before, their frequency), and
*rendering* turns that choice into a complete e-mail with the operator's jinja2
templates. Neither touches the store, the clock or the network; the service passes in
what they need. Rendering is deterministic for a given delivery, so a message sent
again after a crash is byte-for-byte the one that was meant, Message-ID included.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, getaddresses, parseaddr
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import css_inline
import jinja2

from clusterfeed.config import Config
from clusterfeed.model import Story, Subscriber
from clusterfeed.normalize import single_line, truncate

# RFC 5322 allows 998 characters a line; 78 is only a recommendation. Python folds a
# long header without spaces (a List-Unsubscribe URL) by turning it into RFC 2047
# encoded words, which mail clients then cannot use as a URL. So fold at 998.
MAIL_POLICY = SMTP.clone(max_line_length=998)
WEEKLY_GAP = timedelta(days=6, hours=12)
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


# -- selection -----------------------------------------------------------------------


def is_due(subscriber: Subscriber, last_sent: datetime | None, now: datetime) -> bool:
    """Whether a subscriber's frequency allows a digest now.

    Daily subscribers get every scheduled digest; weekly ones at most one in about a
    week (a little slack, so a fixed weekly send time does not drift by a day).
    """
    if subscriber.frequency != "weekly" or last_sent is None:
        return True
    return now - last_sent >= WEEKLY_GAP


def matches(story: Story, subscriber: Subscriber) -> bool:
    """A story fits a subscriber when it shares a topic and a language they chose.

    An empty choice means "everything", so a subscriber added with only an address
    receives the whole digest.
    """
    if subscriber.topics and not set(story.topics) & set(subscriber.topics):
        return False
    return not (subscriber.languages and not set(story.languages) & set(subscriber.languages))


def select_stories(
    stories: Iterable[Story],
    subscriber: Subscriber,
    already_had: set[int],
    *,
    max_stories: int,
) -> list[Story]:
    """The stories for one subscriber's next digest, newest first."""
    chosen = [s for s in stories if s.id not in already_had and matches(s, subscriber)]
    chosen.sort(key=lambda s: (s.entry.published, s.id), reverse=True)
    return chosen[:max_stories]


def message_id(digest_key: str, subscriber_id: int, from_address: str) -> str:
    """A Message-ID fixed by the digest and the subscriber, so a resend is recognisable."""
    domain = parseaddr(from_address)[1].rpartition("@")[2] or "clusterfeed.invalid"
    token = hashlib.sha256(f"{digest_key}\x1f{subscriber_id}".encode()).hexdigest()[:32]
    return f"<{token}.{subscriber_id}@{domain}>"


# -- rendering -----------------------------------------------------------------------


def template_dir(config: Config) -> Path:
    """The operator's templates folder, else the templates that ship with clusterfeed."""
    if config.digest.templates_dir is not None:
        return config.digest.templates_dir
    return default_template_dir()


def default_template_dir() -> Path:
    """The templates that ship with clusterfeed (config checks need it before a Config)."""
    packaged = resources.files("clusterfeed").joinpath("default_templates")
    if packaged.is_dir():
        return Path(str(packaged))
    # Running from a source checkout (editable install): the repository's templates/.
    return Path(__file__).resolve().parents[2] / "templates"


def make_environment(folder: Path) -> jinja2.Environment:
    """A jinja2 environment that escapes HTML templates and fails on unknown variables.

    StrictUndefined turns a misspelt variable in an operator's template into an error
    naming it, instead of a silently empty spot in thousands of mails.
    """
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["shorten"] = truncate
    env.filters["datefmt"] = format_date
    return env


def format_date(value: datetime, tz: str | None = None) -> str:
    """A date every reader understands, whatever their language: 26 Nov 2026."""
    if tz:
        value = value.astimezone(ZoneInfo(tz))
    return f"{value.day} {MONTHS[value.month - 1]} {value.year}"


@dataclass(frozen=True)
class DigestLinks:
    unsubscribe_url: str
    preferences_url: str
    feed_url: str
    site_url: str
    web_url: str | None = None


@dataclass(frozen=True)
class RenderedDigest:
    subject: str
    html: str
    text: str
    preheader: str


@dataclass(frozen=True)
class StoryView:
    """A story as templates see it: only display-ready values."""

    id: int
    title: str
    url: str | None
    summary: str
    image_url: str | None
    image_alt: str
    source_name: str
    source_url: str | None
    sources: list[dict[str, str | None]]
    also_reported_by: list[dict[str, str | None]]
    published: datetime
    date: str
    topics: list[str]
    language: str


@dataclass(frozen=True)
class StoryGroup:
    title: str
    stories: list[StoryView] = field(default_factory=list)


def story_view(story: Story, *, summary_chars: int, tz: str) -> StoryView:
    entry = story.entry
    sources = [
        {"name": s.feed_title, "url": s.entry_link, "title": s.entry_title} for s in story.sources
    ]
    return StoryView(
        id=story.id,
        title=entry.title,
        url=entry.link,
        summary=truncate(entry.summary_text, summary_chars),
        image_url=entry.image_url,
        image_alt=entry.image_alt or entry.title,
        source_name=story.sources[0].feed_title,
        source_url=story.sources[0].entry_link or story.sources[0].site_url,
        sources=sources,
        also_reported_by=sources[1:],
        published=entry.published,
        date=format_date(entry.published, tz),
        topics=list(story.topics),
        language=entry.language,
    )


def group_stories(
    views: Sequence[StoryView], by: str, topic_order: Sequence[str] = ()
) -> list[StoryGroup]:
    """Group for the reader: by topic (each story once, under its first topic) or by source."""
    groups: dict[str, list[StoryView]] = {}
    order = {t: i for i, t in enumerate(topic_order)}
    for view in views:
        if by == "source":
            key = view.source_name
        else:
            ranked = sorted(view.topics, key=lambda t: (order.get(t, len(order)), t))
            key = ranked[0] if ranked else "news"
        groups.setdefault(key, []).append(view)
    titles = sorted(groups, key=lambda k: (order.get(k, len(order)), k.lower()))
    return [StoryGroup(_topic_title(t) if by == "topic" else t, groups[t]) for t in titles]


def _topic_title(topic: str) -> str:
    return topic.replace("-", " ").replace("_", " ").capitalize()


def render_digest(
    env: jinja2.Environment,
    config: Config,
    subscriber: Subscriber,
    stories: Sequence[Story],
    *,
    slot: datetime,
    links: DigestLinks,
) -> RenderedDigest:
    """Render subject, HTML (CSS inlined) and plain text for one subscriber's digest."""
    tz = config.schedule.timezone
    views = [story_view(s, summary_chars=config.digest.summary_chars, tz=tz) for s in stories]
    topic_order = [t for f in config.feeds for t in f.topics]
    groups = group_stories(views, config.digest.group_by, topic_order)
    local = slot.astimezone(ZoneInfo(tz))
    count = len(views)
    preheader = truncate(" · ".join(v.title for v in views[:3]), 140) if views else ""
    context: dict[str, Any] = {
        "cluster": config.cluster,
        "subscriber": subscriber,
        "stories": views,
        "groups": groups,
        "count": count,
        "date": local,
        "date_text": format_date(local),
        "preheader": preheader,
        "links": links,
        "feed_title": config.feed_title,
        "reason": (
            f"You receive this e-mail because {subscriber.email} is subscribed to the "
            f"{config.cluster.name} news digest."
        ),
    }
    subject = one_line(env.get_template(config.digest.subject_template).render(context))
    html_raw = env.get_template(config.digest.html_template).render(context)
    text = env.get_template(config.digest.text_template).render(context)
    html_inlined = css_inline.CSSInliner(
        keep_style_tags=False, keep_at_rules=True, load_remote_stylesheets=False
    ).inline(html_raw)
    return RenderedDigest(
        subject=subject, html=html_inlined, text=_tidy_text(text), preheader=preheader
    )


_BLANKS = re.compile(r"\n{3,}")


def _tidy_text(text: str) -> str:
    lines = [line.rstrip() for line in text.splitlines()]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip() + "\n"


def one_line(text: str, limit: int = 200) -> str:
    """Header-safe text: one line, no control characters, reasonable length.

    Everything that reaches a header passes here, so a partner's title with a CR/LF
    (or a Unicode line separator) can never start a header of its own.
    """
    return truncate(single_line(text), limit)


def list_id(config: Config) -> str:
    host = urlsplit(config.web.base_url).hostname or "clusterfeed.invalid"
    name = one_line(f"{config.cluster.name} digest").replace('"', "'")
    return f'"{name}" <digest.{host}>'


def address(value: str) -> Address:
    name, addr = parseaddr(one_line(value, 500))
    if not addr or "@" not in addr:
        raise ValueError(f"not an e-mail address: {value!r}")
    local, _, domain = addr.rpartition("@")
    if not domain.isascii():
        # An internationalized domain goes into headers in its IDNA form (xn--…); left
        # as it is, the email package writes it as an encoded word no server can route.
        from email_validator import EmailNotValidError, validate_email

        with contextlib.suppress(EmailNotValidError):
            domain = validate_email(addr, check_deliverability=False).ascii_domain
    return Address(display_name=one_line(name, 100), username=local, domain=domain)


def build_message(
    config: Config,
    rendered: RenderedDigest,
    *,
    to: Subscriber,
    message_id: str,
    slot: datetime,
    links: DigestLinks,
) -> EmailMessage:
    """The complete multipart/alternative message, text first as RFC 2046 asks."""
    msg = EmailMessage()
    msg["From"] = address(config.digest.from_address)
    msg["To"] = address(f"{to.name or ''} <{to.email}>" if to.name else to.email)
    if config.digest.reply_to:
        msg["Reply-To"] = [address(a) for _n, a in getaddresses([config.digest.reply_to]) if a]
    msg["Subject"] = rendered.subject
    msg["Date"] = format_datetime(slot.astimezone(ZoneInfo(config.schedule.timezone)))
    msg["Message-ID"] = message_id
    msg["List-Id"] = list_id(config)
    msg["List-Unsubscribe"] = f"<{links.unsubscribe_url}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Precedence"] = "bulk"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    return msg


def message_bytes(message: EmailMessage) -> bytes:
    """The message as it goes on the wire (CRLF line ends, headers never mangled)."""
    return message.as_bytes(policy=MAIL_POLICY)
