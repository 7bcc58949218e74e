"""Rendering once for many subscribers who share a story list.

Most subscribers of a digest share its stories with many others (the same topics and
languages); only their name, address and links differ. Rendering the templates and
inlining the CSS once per shared story list, then filling in each subscriber's values,
gives the very bytes a full rendering gives, as long as the templates only *print*
those values. ``SharedDigest`` records where each value goes and how that spot escapes
it; templates that do more with them (filter, compare, include other templates) are
rendered in full for every subscriber, as before.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import jinja2

from clusterfeed.config import Config
from clusterfeed.digest.render import DigestLinks, reason_line, render_digest
from clusterfeed.digest.wire import quoted_printable
from clusterfeed.model import Story, Subscriber

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


def fill_part(shape: Shape, encoded: EncodedShape | None, values: dict[str, str]) -> bytes:
    if encoded is None:
        return quoted_printable(fill(shape, values))
    return fill_encoded(encoded, values)


def fill_encoded(encoded: EncodedShape, values: dict[str, str]) -> bytes:
    return b"".join(
        p if isinstance(p, bytes) else quoted_printable(fill(p, values) + "\n") for p in encoded
    )
