"""OPML in and out: the partner list as feed readers share it.

``clusterfeed feeds import`` adds the feeds of an OPML file (a feed reader's export, a
partner's list) to the config; ``clusterfeed feeds export`` writes the configured feeds
as OPML 2.0. Decide, then apply: ``parse_opml`` turns bytes into outlines, ``plan_import``
decides what is new and what is already there (both pure), and ``import_opml`` is the
one place that touches the config file.

The operator's config is edited, never regenerated: the new ``[[feeds]]`` blocks are
rendered by tomlkit (so every string is quoted and escaped as TOML wants it) and
appended after the last byte of the file, so comments, blank lines and key order stay
exactly as the operator left them. tomlkit's own in-place insertion was not used
because it moves tables around when ``[[feeds]]`` blocks are not contiguous. The result
is checked with ``load_config`` before it replaces the file, in one ``os.replace``.

An OPML file comes from the internet, so it is untrusted: lxml parses it without
loading a DTD, without network and without substituting entities, and a document
that declares entities is refused outright (no OPML needs them). Only http(s) URLs
are taken from it; a ``file:`` URL or a relative path would otherwise turn into a
local feed that clusterfeed reads from disk.
"""

from __future__ import annotations

import os
import re
import tempfile
import tomllib
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import tomlkit
from lxml import etree  # type: ignore[import-untyped]

from clusterfeed.config import Config, ConfigError, Problem, load_config, resolve_config_path
from clusterfeed.ingest.normalize import link_key, normalize_url, single_line, xml_safe

MAX_OPML_BYTES = 10_000_000  # a subscription list of ten thousand feeds is under 2 MB

_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")  # the config's rule
_HTTP_URL = re.compile(r"^https?://[^\s/?#]+\S*$")  # the config's rule
_FEED_TYPES = frozenset({"", "rss", "atom"})


class OpmlError(Exception):
    """The OPML file cannot be read; the message is one line that names the file."""


@dataclass(frozen=True)
class Outline:
    """One feed listed in an OPML file, as far as clusterfeed can use it."""

    title: str
    xml_url: str
    html_url: str | None = None
    language: str | None = None
    topics: tuple[str, ...] = ()
    commented: bool = False  # OPML's isComment: listed, but switched off


@dataclass(frozen=True)
class Ignored:
    """An outline that names a URL but is not a feed clusterfeed can add."""

    name: str
    reason: str


@dataclass(frozen=True)
class OpmlDocument:
    outlines: list[Outline]
    ignored: list[Ignored]


# -- reading OPML ------------------------------------------------------------------------


def _parser() -> Any:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def _attr(element: Any, name: str) -> str:
    """An attribute by name, whatever its case (some exporters write ``xmlurl``)."""
    value = element.get(name)
    if value is None:
        lowered = name.lower()
        value = next((v for k, v in element.attrib.items() if k.lower() == lowered), "")
    return str(value).strip()


def topic_slug(text: str) -> str | None:
    """A folder or category name as a config topic: "Gene Therapy" -> "gene-therapy".

    Accents are dropped ("Förderung" -> "forderung"); a name with no letter or digit
    in the Latin alphabet gives no topic at all rather than an invalid one.
    """
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_text.lower()).strip("-_")
    return slug or None


def split_categories(value: str) -> list[str]:
    """OPML's ``category``: comma-separated, slash-delimited ("/Science/Biotech,/News")."""
    return [part for part in re.split(r"[,/]", value) if part.strip()]


def _unique(values: Iterable[str | None]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(v for v in values if v))


def _http_url(value: str) -> str | None:
    """``value`` if it is an absolute http(s) URL (scheme written in lower case), else None."""
    scheme, sep, rest = value.strip().partition("://")
    url = f"{scheme.lower()}{sep}{rest}"
    return url if _HTTP_URL.match(url) else None


def _language(value: str) -> str | None:
    primary, _, rest = value.strip().replace("_", "-").partition("-")
    code = f"{primary.lower()}-{rest}" if rest else primary.lower()
    return code if _LANGUAGE.match(code) else None


def parse_opml(data: bytes, source: str) -> OpmlDocument:
    """Every feed outline of an OPML 1.0 or 2.0 document, folders turned into topics.

    An outline is a feed when it has an ``xmlUrl`` and its type is rss, atom or absent;
    an outline without ``xmlUrl`` that holds others is a folder whose text becomes a
    topic of every feed inside it, as do the entries of a feed's ``category``.
    ``isComment="true"`` (on the outline or a folder above it) marks a switched-off feed.
    Raises OpmlError naming ``source`` when the bytes are not an OPML document.
    """
    if len(data) > MAX_OPML_BYTES:
        raise OpmlError(f"{source}: larger than {MAX_OPML_BYTES // 1_000_000} MB; not an OPML list")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise OpmlError(f"{source}: not well-formed XML ({single_line(str(exc))})") from None
    if root is None:
        raise OpmlError(f"{source}: empty document; expected <opml>")
    dtd = root.getroottree().docinfo.internalDTD
    if dtd is not None and any(True for _ in dtd.iterentities()):
        raise OpmlError(
            f"{source}: declares XML entities (<!ENTITY>), which no OPML file needs; "
            "refused, since they can be used to read local files"
        )
    if not isinstance(root.tag, str) or etree.QName(root).localname.lower() != "opml":
        raise OpmlError(f"{source}: the root element is <{root.tag}>, expected <opml>")
    body = next(
        (c for c in root if isinstance(c.tag, str) and etree.QName(c).localname == "body"),
        None,
    )
    if body is None:
        raise OpmlError(f"{source}: no <body> element; not an OPML subscription list")

    outlines: list[Outline] = []
    ignored: list[Ignored] = []

    def walk(parent: Any, folders: tuple[str, ...], commented: bool) -> None:
        for element in parent:
            if not isinstance(element.tag, str) or etree.QName(element).localname != "outline":
                continue
            off = commented or _attr(element, "isComment").lower() == "true"
            text = single_line(_attr(element, "title") or _attr(element, "text"))
            xml_url = _attr(element, "xmlUrl")
            kind = _attr(element, "type").lower()
            if not xml_url:
                if len(element):
                    folder = single_line(_attr(element, "text") or _attr(element, "title"))
                    walk(element, (*folders, folder) if folder else folders, off)
                elif _attr(element, "url"):
                    ignored.append(
                        Ignored(
                            text or _attr(element, "url"), f'a link (type "{kind}"), not a feed'
                        )
                    )
                continue
            url = _http_url(xml_url)
            if kind not in _FEED_TYPES:
                ignored.append(Ignored(text or xml_url, f'type "{kind}", not a feed'))
            elif url is None:
                ignored.append(Ignored(text or xml_url, f"{xml_url!r} is not an http(s) URL"))
            else:
                categories = split_categories(_attr(element, "category"))
                outlines.append(
                    Outline(
                        title=text,
                        xml_url=url,
                        html_url=_http_url(_attr(element, "htmlUrl")),
                        language=_language(_attr(element, "language")),
                        topics=_unique(topic_slug(t) for t in (*folders, *categories)),
                        commented=off,
                    )
                )
            if len(element):  # a feed outline with children: unusual, but keep them
                walk(element, folders, off)

    walk(body, (), False)
    return OpmlDocument(outlines, ignored)


# -- deciding what to add ----------------------------------------------------------------


@dataclass(frozen=True)
class NewFeed:
    """A ``[[feeds]]`` block to append; keys in the order config/example.toml uses."""

    name: str
    url: str
    site: str | None
    topics: tuple[str, ...]
    language: str
    enabled: bool = True

    def as_table(self) -> dict[str, Any]:
        table: dict[str, Any] = {"name": self.name, "url": self.url}
        if self.site:
            table["site"] = self.site
        if self.topics:
            table["topics"] = list(self.topics)
        table["language"] = self.language
        if not self.enabled:
            table["enabled"] = False
        return table


@dataclass(frozen=True)
class Skipped:
    name: str
    reason: str


@dataclass(frozen=True)
class ImportPlan:
    added: list[NewFeed]
    skipped: list[Skipped]
    ignored: list[Ignored] = field(default_factory=list)


def _feed_key(url: str) -> str:
    """Two feed URLs are the same feed when their normalized forms' link keys match.

    Tracking parameters, the case of the host, default ports, http vs https, "www."
    and a trailing slash make no difference. A local path is compared as written.
    """
    return link_key(normalize_url(url)) or url.strip()


def plan_import(
    existing: Sequence[Mapping[str, Any]], outlines: Sequence[Outline], default_language: str
) -> ImportPlan:
    """Which outlines become new feeds, and which are already in the config.

    A feed whose URL is already configured (or listed earlier in the same file) is
    skipped; a new feed whose name is taken gets a number, "Name (2)", because the
    config needs one name per feed.
    """
    urls: dict[str, str] = {}
    names: set[str] = set()
    for feed in existing:
        name, url = feed.get("name"), feed.get("url")
        if isinstance(name, str):
            names.add(name.casefold())
        if isinstance(url, str):
            urls.setdefault(_feed_key(url), name if isinstance(name, str) else url)
    added: list[NewFeed] = []
    skipped: list[Skipped] = []
    for outline in outlines:
        title = outline.title or _host(outline.xml_url)
        key = _feed_key(outline.xml_url)
        if key in urls:
            present = urls[key]
            why = (
                "already in the config"
                if present == title
                else f"already in the config as {present!r}"
            )
            skipped.append(Skipped(title, why))
            continue
        name, n = title, 1
        while name.casefold() in names:
            n += 1
            name = f"{title} ({n})"
        names.add(name.casefold())
        urls[key] = name
        added.append(
            NewFeed(
                name=name,
                url=outline.xml_url,
                site=outline.html_url,
                topics=outline.topics,
                language=outline.language or default_language,
                enabled=not outline.commented,
            )
        )
    return ImportPlan(added, skipped)


def _host(url: str) -> str:
    """A name for a feed whose outline has no text: its host."""
    normalized = normalize_url(url) or url
    return normalized.split("://", 1)[-1].split("/", 1)[0] or url


# -- writing the config ------------------------------------------------------------------


def render_feeds(feeds: Sequence[NewFeed], comment: str | None = None) -> str:
    """The ``[[feeds]]`` blocks as TOML text, one blank line between blocks."""
    doc = tomlkit.document()
    if comment:
        doc.add(tomlkit.comment(single_line(comment)))
    aot = tomlkit.aot()
    for i, feed in enumerate(feeds):
        table = tomlkit.table()
        if i:
            table.trivia.indent = "\n"
        for key, value in feed.as_table().items():
            table.add(key, value)
        aot.append(table)
    doc.append("feeds", aot)
    return tomlkit.dumps(doc)


def append_blocks(original: str, blocks: str) -> str:
    """``original`` unchanged, then a blank line, then ``blocks`` (in its line endings)."""
    newline = "\r\n" if "\r\n" in original else "\n"
    if newline != "\n":
        blocks = blocks.replace("\n", newline)
    if not original.strip():
        return original + blocks
    separator = "" if original.endswith("\n") else newline
    if not (original + separator).endswith(newline * 2):
        separator += newline
    return original + separator + blocks


@dataclass(frozen=True)
class ImportResult:
    config: Path
    plan: ImportPlan
    appended: str  # the TOML text added to the config (or that would be, in a dry run)
    written: bool


def _existing_feeds(file: Path, text: str) -> list[Mapping[str, Any]]:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(file, "", f"TOML syntax error: {exc}")]) from None
    feeds = raw.get("feeds", [])
    return [f for f in feeds if isinstance(f, dict)] if isinstance(feeds, list) else []


def _check_appended(file: Path, before: str, after: str, new: Sequence[NewFeed]) -> None:
    """The appended text must add exactly the new feeds and change nothing else."""
    problem = Problem(
        file,
        "feeds",
        "the feeds cannot be appended as [[feeds]] blocks (is feeds written as an "
        "inline array, feeds = [...]?); add them by hand",
    )
    try:
        old, result = tomllib.loads(before), tomllib.loads(after)
    except tomllib.TOMLDecodeError:
        raise ConfigError([problem]) from None
    expected = {**old, "feeds": [*old.get("feeds", []), *(f.as_table() for f in new)]}
    if result != expected:
        raise ConfigError([problem])


def _problems_for(
    file: Path, problems: Iterable[Problem], first_new: int, new: Sequence[NewFeed]
) -> list[Problem]:
    """Problems found in the temporary file, told about the config and the imported feed."""
    mapped = []
    for p in problems:
        message = p.message
        match = re.match(r"feeds\[(\d+)\]", p.key)
        if match and int(match.group(1)) >= first_new:
            index = int(match.group(1)) - first_new
            if index < len(new):
                message = f"{message} (in the feed {new[index].name!r} from the OPML file)"
        mapped.append(Problem(file, p.key, message, p.where))
    return mapped


def import_opml(
    config_path: str | os.PathLike[str] | None,
    opml_path: Path,
    *,
    language: str = "en",
    dry_run: bool = False,
) -> ImportResult:
    """Append the OPML file's new feeds to the config, after checking the result.

    Raises OpmlError when the OPML file cannot be read, and ConfigError (writing
    nothing) when the config cannot be read or would not be valid afterwards.
    """
    try:
        with opml_path.open("rb") as handle:
            data = handle.read(MAX_OPML_BYTES + 1)
    except OSError as exc:
        raise OpmlError(f"{opml_path}: cannot read the file ({exc.strerror or exc})") from None
    document = parse_opml(data, str(opml_path))

    config = resolve_config_path(config_path).absolute()
    target = config.resolve()  # write next to the real file when the config is a symlink
    try:
        original = target.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(config, "", "config file not found")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(config, "", f"the file is not UTF-8 text ({exc.reason})")]
        ) from None
    existing = _existing_feeds(config, original)
    plan = replace(plan_import(existing, document.outlines, language), ignored=document.ignored)
    if not plan.added:
        return ImportResult(config, plan, "", written=False)

    blocks = render_feeds(plan.added, comment=f"Imported from {opml_path.name} by clusterfeed")
    text = append_blocks(original, blocks)
    _check_appended(config, original, text, plan.added)

    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        try:
            load_config(tmp)
        except ConfigError as exc:
            raise ConfigError(
                _problems_for(config, exc.problems, len(existing), plan.added)
            ) from None
        if dry_run:
            tmp.unlink()
            return ImportResult(config, plan, text[len(original) :], written=False)
        if target.read_bytes() != original.encode("utf-8"):
            raise ConfigError(
                [
                    Problem(
                        config, "", "the file changed while the feeds were being added; run again"
                    )
                ]
            )
        os.chmod(tmp, target.stat().st_mode & 0o7777)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ImportResult(config, plan, text[len(original) :], written=True)


# -- export --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    data: bytes
    exported: int
    notes: list[str]  # feeds left out or changed, for the operator (stderr)


def export_opml(config: Config, now: datetime) -> Export:
    """The configured feeds as an OPML 2.0 document (UTF-8 bytes).

    Feeds are ``type="rss"`` outlines with ``xmlUrl``, ``htmlUrl``, ``language`` and
    the topics as ``category``; a disabled feed carries ``isComment="true"``. A partner
    without a feed (kind "html") becomes a ``type="link"`` outline whose ``url`` is its
    news page: a reader can still open it, and ``feeds import`` skips it, since its
    selectors cannot travel in OPML. Local files are left out: OPML shares URLs, and a
    path on this machine means nothing elsewhere.
    """
    root = etree.Element("opml", version="2.0")
    head = etree.SubElement(root, "head")
    etree.SubElement(head, "title").text = xml_safe(f"{config.cluster.name} partner feeds")
    etree.SubElement(head, "dateCreated").text = format_datetime(now, usegmt=True)
    etree.SubElement(head, "docs").text = "https://opml.org/spec2.opml"
    body = etree.SubElement(root, "body")
    notes: list[str] = []
    exported = 0
    for feed in config.feeds:
        if not feed.is_remote:
            notes.append(f"skipped {feed.name!r}: a local file ({feed.url}), not a URL to share")
            continue
        attributes: dict[str, str] = {}
        if feed.kind == "html":
            attributes.update(type="link", text=feed.name, title=feed.name, url=feed.url)
            notes.append(
                f"{feed.name!r} is a news page without a feed: exported as a link "
                '(type="link"); its selectors are not part of OPML'
            )
        else:
            attributes.update(type="rss", text=feed.name, title=feed.name, xmlUrl=feed.url)
        if feed.site:
            attributes["htmlUrl"] = feed.site
        attributes["language"] = feed.language
        if feed.topics:
            attributes["category"] = ",".join(feed.topics)
        if not feed.enabled:
            attributes["isComment"] = "true"
        outline = etree.SubElement(body, "outline")
        for key, value in attributes.items():
            outline.set(key, xml_safe(value))
        exported += 1
    data = etree.tostring(root, encoding="UTF-8", xml_declaration=True, pretty_print=True)
    return Export(data, exported, notes)
