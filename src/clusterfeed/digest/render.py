"""One subscriber's digest rendered with the operator's jinja2 templates.

Pure: the stories, the subscriber, the slot and the links go in; the subject, the HTML
(its CSS inlined for mail clients) and the text come out. Neither the store, the clock
nor the network is touched; the service passes in what is needed. The news page
(``publish.site``) shows stories with the same views and groups, so a story reads the
same in a mail and on the web.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import css_inline
import jinja2

from clusterfeed.config import Config
from clusterfeed.digest.sections import assign_sections, topic_label, topic_order
from clusterfeed.ingest.normalize import single_line, truncate
from clusterfeed.ingest.teaser import entry_teaser
from clusterfeed.model import Story, Subscriber
from clusterfeed.resources import default_template_dir

MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def template_dir(config: Config) -> Path:
    """The operator's templates folder, else the templates that ship with clusterfeed."""
    if config.digest.templates_dir is not None:
        return config.digest.templates_dir
    return default_template_dir()


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


def reason_line(config: Config, email: str) -> str:
    return (
        f"You receive this e-mail because {email} is subscribed to the "
        f"{config.cluster.name} news digest."
    )


def one_line(text: str, limit: int = 200) -> str:
    """Header-safe text: one line, no control characters, reasonable length.

    Everything that reaches a header passes here, so a partner's title with a CR/LF
    (or a Unicode line separator) can never start a header of its own.
    """
    return truncate(single_line(text), limit)
