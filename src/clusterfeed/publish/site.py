"""The news page for people: the latest stories as HTML, one page per topic, and the
web version of every digest that was sent.

Rendered from the operator's ``site.html`` template (jinja2, escaped), from the same
stories as the feeds; pure, so it is written by ``publish`` beside the feeds and is
byte-identical when nothing changed. Each page links the feeds with
``<link rel="alternate">`` so a feed reader given the page's address finds them.

A digest's web version (``digests/<date>.html``) is the general digest of that date:
every story any subscriber's mail of it held, and nothing about any subscriber. It is
what the mail's "View in browser" link opens, so its name is decided here from the
store's record of the digest alone, the same for the page and for the mail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import jinja2

from clusterfeed.config import Config
from clusterfeed.digest.digest import format_date, group_stories, story_view
from clusterfeed.model import Story
from clusterfeed.publish.feedset import DIGESTS_DIR

SITE_TEMPLATE = "site.html"
DIGEST_PAGE_TEMPLATE = "digest_page.html"
DIGEST_INDEX_TEMPLATE = "digest_index.html"


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
    """(path, render) for index.html and one page per topic, like the feeds' topics.

    The menu offers the topics the sign-up form offers (the configured feeds'), so a
    reader finds on the form what the page showed; a topic only a partner's categories
    give still has its page and feeds, outside the menu.
    """
    from clusterfeed.publish.feedset import file_slug
    from clusterfeed.subscribers.subscribe import offered_choices

    menu = list(offered_choices(config).topics)
    topics = sorted({*menu, *(t for s in newest_first for t in s.topics)})
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
                env, config, stories[:max_entries], topics=menu, current_topic=topic,
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
    from clusterfeed.subscribers.subscribe import topic_label

    views = [story_view(s, summary_chars=config.digest.summary_chars,
                        tz=config.schedule.timezone) for s in stories]  # fmt: skip
    slugs = slugs or {t: t for t in topics}
    topic_links = [TopicLink(t, topic_label(t), f"{root}topics/{slugs[t]}.html") for t in topics]
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
        digests_href=f"{root}{DIGESTS_DIR}/index.html",
        signup_url=signup_url(config, root),
        heading=heading,
        page_title=f"{config.cluster.name} – {heading}",
        language=(config.feeds[0].language if config.feeds else "en"),
    )


def signup_url(config: Config, root: str) -> str | None:
    """Where the sign-up form is, for a link on a page ``root`` below the site's top;
    None when sign-up is off.

    At ``web.base_url`` when it is configured (the published folder may be served by
    another server than the form); else beside the pages, as ``clusterfeed serve``
    serves both.
    """
    if not config.signup.enabled:
        return None
    if "base_url" in config.web.model_fields_set:
        return f"{config.web.base_url.rstrip('/')}/subscribe"
    return f"{root}subscribe"


# -- the web versions of sent digests ------------------------------------------------


@dataclass(frozen=True)
class DigestPage:
    """Where one sent digest's web version lives, and the date it is shown under.

    ``number`` counts the digests sent on that date (in ``schedule.timezone``), from 1:
    the first is ``digests/<date>.html``, a later one the same day (a digest sent by
    hand besides the scheduled one, or a second cron time) ``digests/<date>-<n>.html``.
    """

    digest_id: int
    local_slot: datetime
    number: int

    @property
    def name(self) -> str:
        day = self.local_slot.date().isoformat()
        return day if self.number == 1 else f"{day}-{self.number}"

    @property
    def path(self) -> str:
        return f"{DIGESTS_DIR}/{self.name}.html"

    @property
    def title(self) -> str:
        text = format_date(self.local_slot)
        return text if self.number == 1 else f"{text}, {self.local_slot:%H:%M}"


def digest_pages(records: Iterable[tuple[int, datetime]], tz: str) -> list[DigestPage]:
    """Name the web versions of ``records`` ((digest id, slot) of every sent digest).

    Numbered per local date in the order the digests were created (their ids), not by
    slot: a digest for a missed slot, sent late, comes after the ones already named, so
    no page, and no link in a mail already sent, ever changes its name.
    """
    zone = ZoneInfo(tz)
    seen: dict[date, int] = {}
    pages = []
    for digest_id, slot in sorted(records, key=lambda r: r[0]):
        local = slot.astimezone(zone)
        seen[local.date()] = seen.get(local.date(), 0) + 1
        pages.append(DigestPage(digest_id, local, seen[local.date()]))
    return pages


def digest_page_url(config: Config, page: DigestPage) -> str | None:
    """The web version's address for the mail, or None when ``web.base_url`` is not set.

    Without a configured address the page could only be guessed (the default is this
    machine's own), and a "View in browser" link that leads nowhere is worse than none.
    """
    if "base_url" not in config.web.model_fields_set:
        return None
    return f"{config.web.base_url.rstrip('/')}/{page.path}"


def _language(config: Config) -> str:
    return config.feeds[0].language if config.feeds else "en"


def render_digest_page(
    env: jinja2.Environment, config: Config, page: DigestPage, stories: Sequence[Story]
) -> bytes:
    """The web version of one digest: its stories, newest first, grouped as in the mail."""
    tz = config.schedule.timezone
    ordered = sorted(stories, key=lambda s: (s.entry.published, s.id), reverse=True)
    views = [story_view(s, summary_chars=config.digest.summary_chars, tz=tz) for s in ordered]
    topic_order = [t for f in config.feeds for t in f.topics]
    heading = f"Our digest of {page.title}"
    html = env.get_template(DIGEST_PAGE_TEMPLATE).render(
        cluster=config.cluster,
        stories=views,
        groups=group_stories(views, config.digest.group_by, topic_order),
        count=len(views),
        date=page.local_slot,
        date_text=page.title,
        alternates=alternates("../", config.feed_title),
        home_href="../index.html",
        digests_href="index.html",
        signup_url=signup_url(config, "../"),
        heading=heading,
        page_title=f"{config.cluster.name} – {heading}",
        language=_language(config),
    )
    return html.encode("utf-8")


@dataclass(frozen=True)
class DigestLink:
    title: str
    href: str
    name: str


def render_digest_index(
    env: jinja2.Environment, config: Config, pages: Sequence[DigestPage]
) -> bytes:
    """``digests/index.html``: every sent digest, newest first."""
    newest_first = sorted(pages, key=lambda p: (p.local_slot.date(), p.number), reverse=True)
    heading = "Past digests"
    html = env.get_template(DIGEST_INDEX_TEMPLATE).render(
        cluster=config.cluster,
        digests=[DigestLink(p.title, f"{p.name}.html", p.name) for p in newest_first],
        alternates=alternates("../", config.feed_title),
        home_href="../index.html",
        heading=heading,
        page_title=f"{config.cluster.name} – {heading}",
        language=_language(config),
    )
    return html.encode("utf-8")
