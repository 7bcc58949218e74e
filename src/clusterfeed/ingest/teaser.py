"""The teaser of an item: its article text without the page furniture around it.

Partners' feeds carry more than the article in their HTML: a picture with its caption
and credit ("The new cryo-EM room (Picture: KristallWerk)"), a line of links to read the
newsletter in the browser or to subscribe, share buttons. Shown as the first words of a
teaser, that furniture reads like nonsense. The rules are those readability-style
extractors use, applied to the short fragments feeds carry (whole-page extractors need
a whole page and drop a one-paragraph summary altogether):

- captions are not article text: ``figcaption`` and the text of a block that holds a
  picture and little else;
- a block made only of short links is navigation (high link density), whatever its
  words or language;
- a picture credit in parentheses is removed wherever it stands.
"""

from __future__ import annotations

import functools
import re

import lxml.html  # type: ignore[import-untyped]
from lxml import etree

from clusterfeed.ingest.normalize import html_to_text
from clusterfeed.model import Entry

_FURNITURE_TAGS = ("figcaption", "nav", "aside", "footer", "header", "form", "button")
_BLOCKS = ("p", "div", "li", "ul", "ol", "figure", "section", "table", "tr", "td", "blockquote")
# A caption is short; a paragraph that merely starts with an inline picture is not one.
CAPTION_CHARS = 200
# Navigation links are a few words each ("Newsletter abonnieren", "Share on LinkedIn").
NAV_LINK_WORDS = 6
# What separates links in a navigation line: punctuation, bullets, pipes, dashes.
_SEPARATORS = re.compile(r"[\s\W_]*", re.UNICODE)
# "(Picture: KristallWerk)", "(Foto: UKF/Meier)", "(© Helix Vektor)", "(Credit: ...)".
_CREDIT = re.compile(
    r"\(\s*(?:©|(?:copyright|credits?|photos?|pictures?|images?|fotos?|bild(?:er)?|quelle)"
    r"\s*:)[^()]{0,80}\)",
    re.IGNORECASE,
)


# Most summaries are plain paragraphs: those skip the parse (a third of the time).
_MAYBE_FURNITURE = re.compile(
    r"<(?:a|img|picture|video|" + "|".join(_FURNITURE_TAGS) + r")\b", re.IGNORECASE
)


def entry_teaser(entry: Entry) -> str:
    """What readers see of an item below its headline (digest, site, feeds).

    Applied when shown, not when stored: the stored text stays what story matching
    compares.
    """
    return (
        teaser_text(entry.summary_html)
        or teaser_text(entry.content_html)
        or ("" if entry.summary_html or entry.content_html else entry.summary_text)
    )


@functools.lru_cache(maxsize=4096)  # a publish shows each story in several files
def teaser_text(fragment: str) -> str:
    """Plain text of an item's (sanitized) HTML with captions, credits and navigation
    removed; empty if that was all there was (the caller then tries the item's other
    text, e.g. its content after its summary)."""
    if not fragment or not fragment.strip():
        return ""
    if not _MAYBE_FURNITURE.search(fragment):
        return re.sub(r"\s+", " ", _CREDIT.sub(" ", html_to_text(fragment))).strip()
    try:
        root = lxml.html.fragment_fromstring(fragment, create_parent="div")
    except (etree.ParserError, ValueError):
        return html_to_text(fragment)
    for element in list(root.iter(*_FURNITURE_TAGS)):
        _drop(element)
    for block in list(root.iter(*_BLOCKS)):
        if block.getparent() is None and block is not root:
            continue  # inside something already removed
        if _is_caption_block(block) or _is_navigation(block):
            _drop(block)
    text = html_to_text(lxml.html.tostring(root, encoding="unicode"))
    text = _CREDIT.sub(" ", text)
    return re.sub(r"\s+", " ", text).strip()


def _drop(element: etree._Element) -> None:
    """Remove an element but keep the text that follows it (its tail)."""
    parent = element.getparent()
    if parent is None:
        return
    tail = element.tail or ""
    previous = element.getprevious()
    if tail.strip():
        if previous is not None:
            previous.tail = (previous.tail or "") + " " + tail
        else:
            parent.text = (parent.text or "") + " " + tail
    parent.remove(element)


def _own_text(element: etree._Element) -> str:
    return " ".join(element.text_content().split())


def _is_caption_block(block: etree._Element) -> bool:
    """A picture and a short line about it (caption, credit), nothing more."""
    if not any(True for _ in block.iter("img", "picture", "video")):
        return False
    return len(_own_text(block)) <= CAPTION_CHARS and not any(
        True for _ in block.iter("p") if _ is not block
    )


def _is_navigation(block: etree._Element) -> bool:
    """Only short links, with nothing but separators between them."""
    links = list(block.iter("a"))
    if not links:
        return False
    if any(len(_own_text(a).split()) > NAV_LINK_WORDS for a in links):
        return False
    rest = _own_text(block)
    for a in links:
        rest = rest.replace(_own_text(a), " ", 1)
    return _SEPARATORS.fullmatch(rest) is not None
