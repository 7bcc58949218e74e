"""The news page for people: the latest stories as HTML, one page per topic.

Rendered from the operator's ``site.html`` template (jinja2, escaped), from the same
stories as the feeds; pure, so it is written by ``publish`` beside the feeds and is
byte-identical when nothing changed. Each page links the feeds with
``<link rel="alternate">`` so a feed reader given the page's address finds them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import jinja2

from clusterfeed.config import Config
from clusterfeed.digest import story_view
from clusterfeed.model import Story

SITE_TEMPLATE = "site.html"


def site_environment(operator_dir: Path, default_dir: Path) -> jinja2.Environment:
    """The operator's templates first, then clusterfeed's own, so a templates folder
    copied before the web page existed still works."""
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader(
            [jinja2.FileSystemLoader(str(operator_dir)), jinja2.FileSystemLoader(str(default_dir))]
        ),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def site_pages(
    env: jinja2.Environment, config: Config, newest_first: Sequence[Story], max_entries: int
) -> list[tuple[str, Callable[[], bytes]]]:
    """(path, render) for index.html and one page per topic, like the feeds' topics."""
    from clusterfeed.feedset import file_slug

    topics = sorted({t for s in newest_first for t in s.topics})
    slugs = {t: file_slug(t) for t in topics}

    def page(stories: Sequence[Story], topic: str | None) -> Callable[[], bytes]:
        def render() -> bytes:
            root = "../" if topic else ""
            stem = f"topics/{slugs[topic]}" if topic else "feed"
            feeds = alternates("", config.feed_title, stem=stem.split("/")[-1])
            if topic:
                feeds = [
                    Alternate(a.type, f"{config.feed_title} – {topic}", a.label, a.href)
                    for a in feeds
                ]
            html = render_page(
                env, config, stories[:max_entries], topics=topics, current_topic=topic,
                feeds=feeds, root=root, slugs=slugs,
            )  # fmt: skip
            return html.encode("utf-8")

        return render

    pages = [("index.html", page(newest_first, None))]
    for topic in topics:
        members = [s for s in newest_first if topic in s.topics]
        pages.append((f"topics/{slugs[topic]}.html", page(members, topic)))
    return pages


@dataclass(frozen=True)
class Alternate:
    type: str
    title: str
    label: str
    href: str


@dataclass(frozen=True)
class TopicLink:
    name: str
    title: str
    href: str


def alternates(prefix: str, title: str, stem: str = "feed") -> list[Alternate]:
    """The three feed formats at ``prefix`` (a relative path), for <link rel="alternate">."""
    return [
        Alternate("application/atom+xml", f"{title} (Atom)", "Atom", f"{prefix}{stem}.atom"),
        Alternate("application/rss+xml", f"{title} (RSS)", "RSS", f"{prefix}{stem}.rss"),
        Alternate(
            "application/feed+json", f"{title} (JSON Feed)", "JSON Feed", f"{prefix}{stem}.json"
        ),
    ]


def render_page(
    env: jinja2.Environment,
    config: Config,
    stories: Sequence[Story],
    *,
    topics: Sequence[str],
    current_topic: str | None,
    feeds: list[Alternate],
    root: str,
    slugs: Mapping[str, str] | None = None,
) -> str:
    """One HTML page; ``root`` is the relative path back to the site's top ("" or "../")."""
    views = [story_view(s, summary_chars=config.digest.summary_chars,
                        tz=config.schedule.timezone) for s in stories]  # fmt: skip
    slugs = slugs or {t: t for t in topics}
    topic_links = [
        TopicLink(t, t.replace("-", " ").capitalize(), f"{root}topics/{slugs[t]}.html")
        for t in topics
    ]
    heading = (
        f"News on {current_topic.replace('-', ' ')} from our partners"
        if current_topic
        else "News from our partners"
    )
    template = env.get_template(SITE_TEMPLATE)
    return template.render(
        cluster=config.cluster,
        stories=views,
        topics=topic_links,
        current_topic=current_topic,
        alternates=feeds,
        home_href=f"{root}index.html" if root else "./",
        heading=heading,
        page_title=f"{config.cluster.name} – {heading}",
        language=(config.feeds[0].language if config.feeds else "en"),
    )
