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
import email.policy
import hashlib
import logging
import re
import secrets
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from email import quoprimime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, getaddresses, parseaddr
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import css_inline
import jinja2

from clusterfeed.config import Config
from clusterfeed.digest.sections import assign_sections, topic_label, topic_order
from clusterfeed.ingest.normalize import single_line, truncate
from clusterfeed.ingest.teaser import entry_teaser
from clusterfeed.model import Story, Subscriber

# RFC 5322 allows 998 characters a line; 78 is only a recommendation. Python folds a
# long header without spaces (a List-Unsubscribe URL) by turning it into RFC 2047
# encoded words, which mail clients then cannot use as a URL. So fold at 998.
log = logging.getLogger(__name__)

MAIL_POLICY = SMTP.clone(max_line_length=998)
MAIL_POLICY_UTF8 = SMTPUTF8.clone(max_line_length=998)
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
    max_stories: int | None = None,
) -> list[Story]:
    """The stories for one subscriber's next digest, newest first (by the date the
    digest shows), at most ``max_stories`` of them: a cap keeps the newest."""
    chosen = [s for s in stories if s.id not in already_had and matches(s, subscriber)]
    chosen.sort(key=lambda s: (s.entry.published, s.id), reverse=True)
    return chosen if max_stories is None else chosen[:max_stories]


def message_id(digest_key: str, subscriber_id: int, from_address: str) -> str:
    """A Message-ID fixed by the digest and the subscriber, so a resend is recognisable."""
    try:
        domain = address(from_address).domain  # an IDN in its ASCII form, as in From
    except ValueError:
        domain = ""
    if not domain or not domain.isascii():
        domain = "clusterfeed.invalid"
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
    return Path(__file__).resolve().parents[3] / "templates"


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
        summary=truncate(entry_teaser(entry), summary_chars),
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
    views: Sequence[StoryView],
    by: str,
    topic_order: Sequence[str] = (),
    chosen: Sequence[str] = (),
) -> list[StoryGroup]:
    """Group for the reader: by topic (each story once, in the section of the first of
    the subscriber's ``chosen`` topics it has, see ``sections``) or by source."""
    if by == "topic":
        return [
            StoryGroup(topic_label(topic), [views[i] for i in positions])
            for topic, positions in assign_sections([v.topics for v in views], chosen, topic_order)
        ]
    groups: dict[str, list[StoryView]] = {}
    for view in views:
        groups.setdefault(view.source_name, []).append(view)
    return [StoryGroup(t, groups[t]) for t in sorted(groups, key=str.lower)]


def config_topic_order(config: Config) -> list[str]:
    """The topics in the order the config's feeds name them."""
    return topic_order(t for f in config.feeds for t in f.topics)


def section_key(config: Config, subscriber: Subscriber, stories: Sequence[Story]) -> Any:
    """What decides a digest's sections besides its stories (equal keys, equal sections):
    subscribers with the same stories share one rendering only when this is equal."""
    if config.digest.group_by != "topic":
        return ()
    return tuple(
        (topic, tuple(positions))
        for topic, positions in assign_sections(
            [s.topics for s in stories], subscriber.topics, config_topic_order(config)
        )
    )


def render_digest(
    env: jinja2.Environment,
    config: Config,
    subscriber: Subscriber,
    stories: Sequence[Story],
    *,
    slot: datetime,
    links: DigestLinks,
    reason: str | None = None,
    more: int = 0,
) -> RenderedDigest:
    """Render subject, HTML (CSS inlined) and plain text for one subscriber's digest.

    ``more`` is how many of the subscriber's stories the cap (``digest.max_stories``)
    left out: the mail says so and points to the web version, which lists them.
    ``reason`` replaces the line saying why the subscriber gets the mail (only
    ``render_shared`` passes it, for its probe)."""
    tz = config.schedule.timezone
    views = [story_view(s, summary_chars=config.digest.summary_chars, tz=tz) for s in stories]
    groups = group_stories(
        views, config.digest.group_by, config_topic_order(config), subscriber.topics
    )
    local = slot.astimezone(ZoneInfo(tz))
    count = len(views)
    preheader = truncate(" · ".join(v.title for v in views[:3]), 140) if views else ""
    context: dict[str, Any] = {
        "cluster": config.cluster,
        "subscriber": subscriber,
        "stories": views,
        "groups": groups,
        "count": count,
        "more": more,
        "date": local,
        "date_text": format_date(local),
        "preheader": preheader,
        "links": links,
        "feed_title": config.feed_title,
        "reason": reason_line(config, subscriber.email) if reason is None else reason,
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


def recipient(subscriber: Subscriber) -> Address:
    """The To address. The name is taken as it is, not parsed out of "name <address>":
    a name such as ``Söhne <GmbH>`` would otherwise hide the address and stop the mail."""
    mailbox = address(subscriber.email)
    if not subscriber.name:
        return mailbox
    return Address(
        display_name=one_line(subscriber.name, 100),
        username=mailbox.username,
        domain=mailbox.domain,
    )


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
    msg["To"] = recipient(to)
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
    msg.set_boundary(boundary_for(message_id))
    return msg


def needs_utf8(message: EmailMessage) -> bool:
    """True for mail to or from an internationalized mailbox (``jürgen@…``): its
    headers must carry the address in UTF-8 (RFC 6532) and the server must offer
    SMTPUTF8 (RFC 6531). An encoded word is no way out: it is not allowed in an
    address, and no server routes it."""
    return any(
        not a.username.isascii()
        for name in ("From", "To")
        if (header := message[name]) is not None
        for a in header.addresses
    )


def message_bytes(message: EmailMessage) -> bytes:
    """The message as it goes on the wire (CRLF line ends, headers never mangled)."""
    return message.as_bytes(policy=MAIL_POLICY_UTF8 if needs_utf8(message) else MAIL_POLICY)


# -- rendering once for many subscribers ---------------------------------------------
#
# Most subscribers of a digest share its stories with many others (the same topics and
# languages); only their name, address and links differ. Rendering the templates and
# inlining the CSS once per shared story list, then filling in each subscriber's values,
# gives the very bytes a full rendering gives, as long as the templates only *print*
# those values. ``SharedDigest`` records where each value goes and how that spot escapes
# it; templates that do more with them (filter, compare, include other templates) are
# rendered in full for every subscriber, as before.

# The values that differ between subscribers sharing a story list, by template name.
_PERSONAL_NAMES = frozenset({"subscriber", "links", "reason"})
# (variable, attribute) pairs a template may print; ``None`` is the variable itself.
_PRINTABLE = {
    ("subscriber", "name"): "name",
    ("subscriber", "email"): "email",
    ("links", "unsubscribe_url"): "unsubscribe_url",
    ("links", "preferences_url"): "preferences_url",
    ("reason", None): "reason",
}
_SHARED_LINKS = frozenset({"feed_url", "site_url", "web_url"})
# Nodes that could pass a printed value through something other than the output's own
# escaping (a filter block, a macro, another template); any of them ends sharing.
_OPAQUE_NODES = (
    jinja2.nodes.Extends,
    jinja2.nodes.Include,
    jinja2.nodes.Import,
    jinja2.nodes.FromImport,
    jinja2.nodes.FilterBlock,
    jinja2.nodes.AssignBlock,
    jinja2.nodes.Macro,
    jinja2.nodes.CallBlock,
)
# The characters an HTML template or the CSS inliner's serializer may escape; every
# other character passes through both unchanged.
_SPECIALS = "<&>\"'\xa0"
PERSONAL_FIELDS = ("name", "email", "reason", "unsubscribe_url", "preferences_url")


def _prints_personal_values_only(tree: jinja2.nodes.Node, *, may_print: bool) -> bool:
    """Whether a template uses the personal values only as ``{{ value }}`` (and a name
    only also as ``{% if subscriber.name %}``), which filling in afterwards reproduces."""

    def visit(node: jinja2.nodes.Node, where: str) -> bool:
        if isinstance(node, _OPAQUE_NODES):
            return False
        if isinstance(node, jinja2.nodes.Getattr) and isinstance(node.node, jinja2.nodes.Name):
            variable, attr = node.node.name, node.attr
            if variable == "links" and attr in _SHARED_LINKS:
                return True
            if variable in _PERSONAL_NAMES:
                if (variable, attr) == ("subscriber", "name") and where == "test":
                    return True
                return may_print and where == "output" and (variable, attr) in _PRINTABLE
        if isinstance(node, jinja2.nodes.Name) and node.name in _PERSONAL_NAMES:
            return may_print and where == "output" and (node.name, None) in _PRINTABLE
        for name, value in node.iter_fields():
            children = value if isinstance(value, list) else [value]
            for child in children:
                if not isinstance(child, jinja2.nodes.Node):
                    continue
                if isinstance(node, jinja2.nodes.Output) and name == "nodes":
                    inner = "output"
                elif isinstance(node, jinja2.nodes.If) and name == "test":
                    inner = "test"
                else:
                    inner = ""
                if not visit(child, inner):
                    return False
        return True

    return visit(tree, "")


def can_share_renderings(env: jinja2.Environment, config: Config) -> bool:
    """Whether the configured digest templates allow rendering once per story list."""
    assert env.loader is not None
    names = (config.digest.html_template, config.digest.text_template)
    for name, may_print in [(config.digest.subject_template, False)] + [(n, True) for n in names]:
        source = env.loader.get_source(env, name)[0]
        if not _prints_personal_values_only(env.parse(source), may_print=may_print):
            return False
    return True


@dataclass(frozen=True)
class Blank:
    """Where one personal value goes, and how that spot escapes it."""

    field: str
    table: dict[int, str]


Shape = tuple[str | Blank, ...]


@dataclass(frozen=True)
class SharedDigest:
    """One story list's digest with the personal values left blank."""

    subject: str
    html: Shape
    text: Shape
    preheader: str
    # The same, quoted-printable: lines without a blank encoded once (None: a part
    # that cannot be encoded line by line, encoded whole for each subscriber).
    html_encoded: EncodedShape | None = None
    text_encoded: EncodedShape | None = None


def personal_values(config: Config, subscriber: Subscriber, links: DigestLinks) -> dict[str, str]:
    return {
        "name": subscriber.name or "",
        "email": subscriber.email,
        "reason": reason_line(config, subscriber.email),
        "unsubscribe_url": links.unsubscribe_url,
        "preferences_url": links.preferences_url,
    }


def fits_a_blank(value: str) -> bool:
    """Whether a value can be filled in after rendering: on one line, nothing the text
    tidying (trailing blanks, blank lines) or the HTML parser would treat specially."""
    return bool(value) and value == value.strip() and value.isprintable()


def reason_line(config: Config, email: str) -> str:
    return (
        f"You receive this e-mail because {email} is subscribed to the "
        f"{config.cluster.name} news digest."
    )


def render_shared(
    env: jinja2.Environment,
    config: Config,
    stories: Sequence[Story],
    *,
    slot: datetime,
    links: DigestLinks,
    named: bool,
    marker: str,
    empty_name: str | None = None,
    topics: tuple[str, ...] = (),
    more: int = 0,
) -> SharedDigest | None:
    """Render a story list once, personal values left blank; None if that cannot be
    done faithfully (then every subscriber's digest is rendered in full).

    Each personal value is rendered as a probe: ``marker`` and the field's number
    around every special character, so the output shows how each spot escaped each
    of them. ``named`` says whether the subscribers have a name; if not, their
    ``empty_name`` (None or "") is rendered as it is. ``topics`` (the subscribers'
    chosen topics) decide the sections, ``more`` the line about stories left out.
    ``marker`` must not occur in any story (random letters do not; the composer checks
    its first filling anyway).
    """
    tokens = {f: f"{marker}{i}q" for i, f in enumerate(PERSONAL_FIELDS)}
    probes = {f: t + t.join(_SPECIALS) + t for f, t in tokens.items()}
    subscriber = Subscriber(
        email=probes["email"], name=probes["name"] if named else empty_name, topics=topics
    )
    probe_links = DigestLinks(
        unsubscribe_url=probes["unsubscribe_url"],
        preferences_url=probes["preferences_url"],
        feed_url=links.feed_url,
        site_url=links.site_url,
        web_url=links.web_url,
    )
    rendered = render_digest(
        env,
        config,
        subscriber,
        stories,
        slot=slot,
        links=probe_links,
        reason=probes["reason"],
        more=more,
    )
    if marker in rendered.subject or marker in rendered.preheader:
        return None
    html = _shape(rendered.html, tokens, marker)
    text = _shape(rendered.text, tokens, marker)
    if html is None or text is None:
        return None
    return SharedDigest(
        rendered.subject,
        html,
        text,
        rendered.preheader,
        html_encoded=encode_shape(html),
        text_encoded=encode_shape(text),
    )


def _shape(rendered: str, tokens: dict[str, str], marker: str) -> Shape | None:
    by_token = {t: f for f, t in tokens.items()}
    pieces: list[str | Blank] = []
    pattern = re.compile(
        "(" + "|".join(map(re.escape, tokens.values())) + ")"
        + "(.*?)\\1" * len(_SPECIALS),
        re.S,
    )  # fmt: skip
    start = 0
    for match in pattern.finditer(rendered):
        escaped = match.groups()[1:]
        pieces.append(rendered[start : match.start()])
        table = {ord(c): e for c, e in zip(_SPECIALS, escaped, strict=True) if e != c}
        pieces.append(Blank(by_token[match[1]], table))
        start = match.end()
    pieces.append(rendered[start:])
    if any(marker in p for p in pieces if isinstance(p, str)):
        return None  # a probe was cut or changed: not a plain print
    return tuple(p for p in pieces if p != "")


def fill(shape: Shape, values: dict[str, str]) -> str:
    return "".join(p if isinstance(p, str) else values[p.field].translate(p.table) for p in shape)


# Quoted-printable encodes each line on its own (RFC 2045 6.7), so the lines of a shape
# that hold no blank are encoded once per story list, and only the few lines with a
# name or a link in them once per subscriber.
EncodedShape = tuple[bytes | Shape, ...]


def encode_shape(shape: Shape) -> EncodedShape | None:
    lines: list[Shape] = []
    current: list[str | Blank] = []
    for piece in shape:
        if isinstance(piece, Blank):
            current.append(piece)
            continue
        if "\r" in piece:
            return None  # split differently by the encoder; encode whole instead
        *ends, rest = piece.split("\n")
        for end in ends:
            lines.append((*current, end))
            current = []
        current.append(rest)
    if any(p != "" for p in current):
        lines.append(tuple(current))  # a last line without a line break gets one
    encoded: list[bytes | Shape] = []
    static: list[str] = []
    for line in lines:
        if all(isinstance(p, str) for p in line):
            static.append("".join(p for p in line if isinstance(p, str)))
            continue
        if static:
            encoded.append(quoted_printable("\n".join(static) + "\n"))
            static = []
        encoded.append(line)
    if static:
        encoded.append(quoted_printable("\n".join(static) + "\n"))
    return tuple(encoded)


def _fill_part(shape: Shape, encoded: EncodedShape | None, values: dict[str, str]) -> bytes:
    if encoded is None:
        return quoted_printable(fill(shape, values))
    return fill_encoded(encoded, values)


def fill_encoded(encoded: EncodedShape, values: dict[str, str]) -> bytes:
    return b"".join(
        p if isinstance(p, bytes) else quoted_printable(fill(p, values) + "\n") for p in encoded
    )


# -- the wire form without EmailMessage objects ---------------------------------------
#
# ``build_message`` + ``message_bytes`` spend most of a message's time building and
# folding header objects that are the same in every message of a digest. ``MessageWriter``
# folds each header with the same email package functions, but the shared ones once, and
# encodes the bodies with the same quoted-printable encoder, so its bytes equal
# ``message_bytes(build_message(...))`` (tests compare the two for every subscriber).

_HEADER_POLICY = email.policy.default  # what EmailMessage() stores headers with
# The HTML part repeats MIME-Version: ``add_alternative`` makes it an EmailMessage of its
# own, which adds one. Harmless, and kept so the bytes stay the same.
_PART_HEAD = {
    subtype: b"".join(
        MAIL_POLICY.fold_binary(n, _HEADER_POLICY.header_store_parse(n, v)[1])
        for n, v in (
            ("Content-Type", f'text/{subtype}; charset="utf-8"'),
            ("Content-Transfer-Encoding", "quoted-printable"),
            *([("MIME-Version", "1.0")] if subtype == "html" else []),
        )
    )
    + b"\r\n"
    for subtype in ("plain", "html")
}
_BODY_LINE = _HEADER_POLICY.max_line_length or 78  # where set_content breaks body lines
_TRAILER = (
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ("Precedence", "bulk"),
    ("Auto-Submitted", "auto-generated"),
    ("MIME-Version", "1.0"),
)


_MULTIPART = 'multipart/alternative; boundary="{}"'


def boundary_for(message_id: str) -> str:
    """A multipart boundary fixed by the Message-ID (the email package would draw a
    random one), so a message sent again is byte-for-byte the same. Both parts are
    quoted-printable, where a line can never begin with ``--=``."""
    number = int(hashlib.sha256(message_id.encode()).hexdigest()[:16], 16) % sys.maxsize
    return f"==============={number:019d}=="


def fold(name: str, value: Any) -> bytes:
    """One header as ``message_bytes`` writes it (a value with a line break is refused,
    as ``EmailMessage`` refuses it)."""
    return MAIL_POLICY.fold_binary(name, _HEADER_POLICY.header_store_parse(name, value)[1])


# ``fold`` parses every value with the email package's header parser, about a tenth of
# a millisecond per header, which made folding most of the per-subscriber cost of a
# message. The values below (an ASCII name made of plain words, a plain address, our
# own Message-IDs, an unsubscribe URL without blanks) come out of that parser
# unchanged and fit one line, so they are written as they are; anything else still
# goes through ``fold``. Tests compare both ways on generated values.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_NAME = re.compile(rf"{_ATOM}(?: {_ATOM})*")
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_DOMAIN}")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_ATOM}(?:\.{_ATOM})*@{_DOMAIN}>")
_PLAIN_URL = re.compile(r"<[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;%=]+>")
_LONGEST_LINE = (MAIL_POLICY.max_line_length or 998) - 2


def _unchanged(name: str, value: str) -> bytes | None:
    line = f"{name}: {value}"
    if len(line) > _LONGEST_LINE or "=?" in value:
        return None  # folded, or read as an encoded word
    return f"{line}\r\n".encode("ascii")


def fold_to(to: Address) -> bytes:
    """``fold("To", to)``, without parsing the common case."""
    name, addr = to.display_name, to.addr_spec
    if _PLAIN_ADDRESS.fullmatch(addr) and (not name or _PLAIN_NAME.fullmatch(name)):
        folded = _unchanged("To", f"{name} <{addr}>" if name else addr)
        if folded is not None:
            return folded
    return fold("To", to)


def fold_message_id(value: str) -> bytes:
    """``fold("Message-ID", value)``, without parsing the IDs ``message_id`` makes."""
    folded = _unchanged("Message-ID", value) if _PLAIN_MESSAGE_ID.fullmatch(value) else None
    return folded if folded is not None else fold("Message-ID", value)


def fold_unsubscribe(url: str) -> bytes:
    """``fold("List-Unsubscribe", f"<{url}>")``, without parsing a URL without blanks."""
    value = f"<{url}>"
    folded = _unchanged("List-Unsubscribe", value) if _PLAIN_URL.fullmatch(value) else None
    return folded if folded is not None else fold("List-Unsubscribe", value)


def quoted_printable(text: str) -> bytes:
    """A text part's body as ``set_content(..., cte="quoted-printable")`` encodes it."""
    lines = text.encode("utf-8").splitlines()
    encoded = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), _BODY_LINE)
    return encoded.replace("\n", "\r\n").encode("ascii")


class MessageWriter:
    """Writes digest messages' wire bytes; folds the headers a digest shares once."""

    def __init__(self, config: Config) -> None:
        self.config = config
        cfg = config.digest
        head = fold("From", address(cfg.from_address))
        self._from = head
        self._reply_to = (
            fold("Reply-To", [address(a) for _n, a in getaddresses([cfg.reply_to]) if a])
            if cfg.reply_to
            else b""
        )
        self._list_id = fold("List-Id", list_id(config))
        self._trailer = b"".join(fold(n, v) for n, v in _TRAILER)
        self._subjects: dict[str, bytes] = {}
        self._dates: dict[datetime, bytes] = {}
        # Every boundary has the same length and characters, so its header folds the
        # same way each time: fold one, then fill in the others (checked here, once).
        sample = boundary_for("<sample@clusterfeed.invalid>")
        head, _, tail = fold("Content-Type", _MULTIPART.format(sample)).partition(
            sample.encode("ascii")
        )
        self._content_type = (head, tail) if tail else None

    def _multipart(self, boundary: bytes) -> bytes:
        if self._content_type is None:
            return fold("Content-Type", _MULTIPART.format(boundary.decode("ascii")))
        head, tail = self._content_type
        return head + boundary + tail

    def _subject(self, subject: str) -> bytes:
        folded = self._subjects.get(subject)
        if folded is None:
            if len(self._subjects) > 1000:
                self._subjects.clear()
            folded = self._subjects[subject] = fold("Subject", subject)
        return folded

    def _date(self, slot: datetime) -> bytes:
        folded = self._dates.get(slot)
        if folded is None:
            local = slot.astimezone(ZoneInfo(self.config.schedule.timezone))
            folded = self._dates[slot] = fold("Date", format_datetime(local))
        return folded

    def write(
        self,
        subject: str,
        text: bytes,
        html: bytes,
        *,
        to: Address,
        message_id: str,
        slot: datetime,
        links: DigestLinks,
    ) -> bytes:
        """The message; ``text`` and ``html`` are already quoted-printable."""
        boundary = boundary_for(message_id).encode("ascii")
        return b"".join(
            (
                self._from,
                fold_to(to),
                self._reply_to,
                self._subject(subject),
                self._date(slot),
                fold_message_id(message_id),
                self._list_id,
                fold_unsubscribe(links.unsubscribe_url),
                self._trailer,
                self._multipart(boundary),
                b"\r\n--", boundary, b"\r\n",
                _PART_HEAD["plain"], text,
                b"\r\n--", boundary, b"\r\n",
                _PART_HEAD["html"], html,
                b"\r\n--", boundary, b"--\r\n",
            )
        )  # fmt: skip


# Story lists kept rendered. The outbox is written grouped by story list, so a run
# needs one or two at a time; the rest serve retries and several digests at once.
SHARED_CACHE_SIZE = 64


class DigestComposer:
    """Composes many subscribers' digests, rendering each distinct story list once.

    The first subscriber of each story list is also rendered in full and compared with
    the filled-in rendering; if they differ (a template does something this module did
    not foresee), that story list is rendered in full for everyone, and a warning says
    so. Memory holds at most ``SHARED_CACHE_SIZE`` story lists, however many
    subscribers there are.
    """

    def __init__(self, env: jinja2.Environment, config: Config) -> None:
        self.env = env
        self.config = config
        self.writer = MessageWriter(config)
        self.sender = address(config.digest.from_address).addr_spec
        self.sharing = can_share_renderings(env, config)
        self._marker = "cf" + secrets.token_hex(8)
        self._shared: OrderedDict[tuple[Any, ...], SharedDigest | None] = OrderedDict()
        self.shared_hits = 0
        self._lock = threading.Lock()  # compose may run in several threads

    def compose(
        self,
        subscriber: Subscriber,
        stories: Sequence[Story],
        *,
        slot: datetime,
        links: DigestLinks,
        message_id: str,
        more: int = 0,
    ) -> tuple[str, str, bytes]:
        """(sender, recipient, message bytes) for one subscriber; ``more`` stories of
        theirs were left out by the cap (see ``render_digest``)."""
        to = recipient(subscriber)
        if not to.username.isascii():
            # An internationalized mailbox: its headers are UTF-8 (see needs_utf8).
            # Rare enough to compose the long way.
            full = render_digest(
                self.env, self.config, subscriber, stories, slot=slot, links=links, more=more
            )
            message = build_message(
                self.config, full, to=subscriber, message_id=message_id, slot=slot, links=links
            )
            return self.sender, to.addr_spec, message_bytes(message)
        values = personal_values(self.config, subscriber, links)
        shared = None
        if self.sharing and all(
            fits_a_blank(v) for f, v in values.items() if f != "name" or subscriber.name
        ):
            with self._lock:
                shared = self._shared_for(subscriber, stories, slot, links, values, more)
        if shared is None:
            full = render_digest(
                self.env, self.config, subscriber, stories, slot=slot, links=links, more=more
            )
            subject = full.subject
            text_qp, html_qp = quoted_printable(full.text), quoted_printable(full.html)
        else:
            self.shared_hits += 1
            subject = shared.subject
            text_qp = _fill_part(shared.text, shared.text_encoded, values)
            html_qp = _fill_part(shared.html, shared.html_encoded, values)
        data = self.writer.write(
            subject,
            text_qp,
            html_qp,
            to=to,
            message_id=message_id,
            slot=slot,
            links=links,
        )
        return self.sender, to.addr_spec, data

    def _shared_for(
        self,
        subscriber: Subscriber,
        stories: Sequence[Story],
        slot: datetime,
        links: DigestLinks,
        values: dict[str, str],
        more: int,
    ) -> SharedDigest | None:
        # Everything the rendering depends on besides the personal values: the stories,
        # how they fall into the subscriber's sections, how many the cap left out.
        key = (
            slot,
            links.web_url,
            tuple(s.id for s in stories),
            section_key(self.config, subscriber, stories),
            more,
            (True, None) if subscriber.name else (False, subscriber.name),
        )
        if key in self._shared:
            self._shared.move_to_end(key)
            return self._shared[key]
        shared = render_shared(
            self.env,
            self.config,
            stories,
            slot=slot,
            links=links,
            named=bool(subscriber.name),
            empty_name=None if subscriber.name else subscriber.name,
            marker=self._marker,
            topics=subscriber.topics,
            more=more,
        )
        if shared is not None:
            full = render_digest(
                self.env, self.config, subscriber, stories, slot=slot, links=links, more=more
            )
            filled = (shared.subject, fill(shared.text, values), fill(shared.html, values))
            if filled != (full.subject, full.text, full.html):
                log.warning(
                    "the digest templates in %s print a subscriber's values in a way that "
                    "cannot be rendered once for many subscribers; rendering each message "
                    "in full (slower, same result)",
                    template_dir(self.config),
                )
                shared = None
        self._shared[key] = shared
        if len(self._shared) > SHARED_CACHE_SIZE:
            self._shared.popitem(last=False)
        return shared
