"""Load and validate the operator's TOML config.

The operator is a communications manager, not a programmer, so a bad config must never
produce a traceback: every problem becomes one line naming the file, the key path, the
value that was found and what is expected, and all problems are reported together so
one round of editing fixes them all. pydantic does the type checking (unknown keys are
errors, because a typo that silently falls back to a default is worse than a refusal);
the checks that need the file system (local feeds, templates, CSV) run afterwards.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import logging
import os
import re
import tomllib
import zoneinfo
from collections.abc import Callable, Collection
from dataclasses import dataclass
from email.utils import parseaddr
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from clusterfeed.configwords import located, sentence, shown
from clusterfeed.web.proxies import check_proxy

if TYPE_CHECKING:
    from clusterfeed.ingest.filters import FilterRules

DEFAULT_CONFIG_PATH = Path("config/clusterfeed.toml")
CONFIG_ENV = "CLUSTERFEED_CONFIG"

_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_TOPIC = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the config, phrased for the person who has to fix it."""

    file: Path
    key: str
    message: str
    # The key as the operator knows it (a feed by its name, not its index); see
    # configwords.located. None: the key itself.
    where: str | None = None

    def __str__(self) -> str:
        place = self.key if self.where is None else self.where
        where = f"{self.file}: {place}" if place else str(self.file)
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used; ``problems`` lists every reason at once."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, populate_by_name=True, use_attribute_docstrings=True
    )


def _is_http_url(value: str) -> bool:
    return re.match(r"^https?://[^\s/?#]+[^\s]*$", value) is not None


def _http_url(value: str) -> str:
    if not _is_http_url(value):
        raise ValueError("expected an absolute http:// or https:// URL")
    return value


class ClusterConfig(_Strict):
    name: str = Field(min_length=1)
    """The cluster's name, shown in the feed, the digest and its subject."""
    url: str
    """The cluster's web site (http or https). Also named in the User-Agent."""
    imprint: list[str] = Field(default_factory=list)
    """Lines for the digest's footer: the legal imprint a European newsletter must carry (company,
    address, register, managing director).
    """
    contact: str | None = None
    """A contact line under the imprint (press office address or phone)."""
    logo_url: str | None = None
    """An image shown at the top of the digest and as the feed's logo."""
    color: str = "#0b5d7a"
    """The digest's accent colour, `#rrggbb`."""

    _check_url = field_validator("url")(_http_url)

    @field_validator("color")
    @classmethod
    def _color(cls, value: str) -> str:
        if not re.fullmatch(r"#[0-9a-fA-F]{6}", value):
            raise ValueError("expected a colour like #0b5d7a")
        return value


class ScheduleConfig(_Strict):
    fetch_interval_minutes: int = Field(30, ge=1, le=24 * 60)
    """How often `clusterfeed run` fetches and publishes. A shorter interval applies at the next
    start; waits a partner's server asked for (Retry-After, max-age) and back-off after errors
    are kept.
    """
    digest_cron: str = "0 7 * * *"
    """When the digest goes out: a five-field cron expression (minute hour day month weekday), e.g.
    `"0 7 * * 1-5"` for weekdays at 07:00.
    """
    timezone: str = "Europe/Berlin"
    """The IANA time zone the cron expression is read in (and dates in the digest are shown in)."""

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                "expected an IANA time zone name such as Europe/Berlin or Asia/Tokyo"
            ) from None
        return value

    @field_validator("digest_cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        try:
            cron_trigger(value, "UTC")
        except ValueError as exc:
            raise ValueError(
                "expected a cron expression with five fields "
                f'(minute hour day month weekday), e.g. "0 7 * * 1-5" ({exc})'
            ) from None
        return value


_CRON_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _crontab_weekdays(field: str) -> str:
    """A crontab day-of-week field with its numbers written as weekday names.

    APScheduler 3 counts weekdays from 0 = Monday, while crontab (and every cron
    tutorial an operator has read) counts from 0 or 7 = Sunday: passed on as it is,
    "0 7 * * 1-5" fired Tuesday to Saturday. Names mean the same day to both.
    """
    parts: list[str] = []
    for token in field.split(","):
        body, slash, step = token.partition("/")
        if (body == "*" and not slash) or any(ch.isalpha() for ch in body):
            parts.append(token)  # every day, or names ("mon-fri"): nothing to translate
            continue
        if body == "*":
            first, last = 0, 6
        else:
            start, dash, end = body.partition("-")
            if not start.isdigit() or (dash and not end.isdigit()):
                raise ValueError(f"day of week {token!r} is not a number, range or name")
            first = int(start)
            last = int(end) if dash else (6 if slash else first)
        if not 0 <= first <= last <= 7:
            raise ValueError(
                f"day of week {token!r} must be a day or a rising range within 0-7 "
                "(0 and 7 are Sunday)"
            )
        if slash and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"day of week {token!r} has an invalid step")
        parts.extend(_CRON_WEEKDAYS[d] for d in range(first, last + 1, int(step) if slash else 1))
    return ",".join(dict.fromkeys(parts))


def cron_trigger(expression: str, timezone: str) -> Any:
    """An APScheduler CronTrigger for a standard five-field crontab expression."""
    from apscheduler.triggers.cron import CronTrigger

    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"Wrong number of fields; got {len(fields)}, expected 5")
    fields[4] = _crontab_weekdays(fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone=timezone)


class FetchConfig(_Strict):
    concurrency: int = Field(8, ge=1, le=100)
    """Feeds fetched at the same time."""
    timeout_seconds: float = Field(30.0, gt=0, le=600)
    """The longest one request may take, from connecting to the last byte."""
    connect_timeout_seconds: float = Field(10.0, gt=0, le=120)
    """The longest connecting may take."""
    max_bytes: int = Field(10_000_000, ge=10_000)
    """The largest feed accepted (after decompression, so a small "gzip bomb" stops here too).
    Larger ones are cut off and recorded as failed.
    """
    per_host: int = Field(2, ge=1, le=20)
    """Requests to one host at the same time, whatever `concurrency` says: many partners share one
    hosting provider.
    """
    parse_processes: int | None = Field(None, ge=0, le=64)
    """How many worker processes parse feeds. Automatic: one per CPU core when a cycle fetches 40
    feeds or more, none (parsing in a thread) below that. `0` never starts processes. The same
    number of processes computes the story-matching features of a backlog (1,000 new items or
    more, such as a first fetch), one per CPU core when unset.
    """
    user_agent: str | None = None
    """The User-Agent sent to partners, so their web masters know who is asking."""
    # Partners' redirects, moves and announced feeds may lead to private, loopback and
    # link-local addresses (only for partners on an internal network; see netguard).
    allow_private_addresses: bool = False
    """Whether partners' redirects, remembered moves and announced feeds may lead to addresses that
    are not on the public internet (loopback, private, link-local such as a cloud's metadata
    service at 169.254.169.254, multicast, reserved). By default they may not: every address is
    checked when the connection is made, after DNS, so a partner (or its DNS) cannot make
    clusterfeed read this machine's or the internal network's services, and only `http`/`https`
    are ever followed (a local file is read only when a feed's `url` names it). A feed whose
    `url` itself names such an address (`http://10.1.2.3/…`, `http://127.0.0.1:8080/…`,
    `http://localhost/…`) is fetched as configured, with redirects on that host and port (or
    from http to https); a host *name* that resolves to such an address needs this key. Set
    `true` only when your partners really are on an internal network. clusterfeed connects to
    partners directly: `HTTP_PROXY`/`HTTPS_PROXY` are not used.
    """


class SelectorsConfig(_Strict):
    """CSS selectors for a partner's news listing page (feeds of kind "html")."""

    item: str = Field(min_length=1)
    """CSS selector of one news item on the page."""
    title: str = Field(min_length=1)
    """CSS selector of the title, within the item."""
    link: str = "a"
    """CSS selector of the link, within the item."""
    date: str | None = None
    """CSS selector of the date, within the item."""
    date_format: str | None = None
    """A strftime pattern such as `"%d.%m.%Y"` or `"%d. %B %Y"` (German and English month names
    both work); without it, ISO dates, "23. November 2026", "Nov 23, 2026" and "2026年11月23日" are
    recognised.
    """
    summary: str | None = None
    """CSS selector of the summary, within the item."""
    image: str | None = None
    """CSS selector of the picture, within the item."""

    @field_validator("item", "title", "link", "date", "summary", "image")
    @classmethod
    def _css(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from clusterfeed.ingest.scrape import check_selector

        problem = check_selector(value)
        if problem:
            raise ValueError(f"not a valid CSS selector ({problem})")
        return value

    @field_validator("date_format")
    @classmethod
    def _date_format(cls, value: str | None) -> str | None:
        if value is not None and "%" not in value:
            raise ValueError('expected a strftime pattern such as "%d.%m.%Y" or "%d. %B %Y"')
        return value


class FiltersConfig(_Strict):
    """Keep items out (or only some in), by whole-word keyword or by topic."""

    include_keywords: list[str] = Field(default_factory=list)
    """If set, only items that mention one of these words are taken."""
    exclude_keywords: list[str] = Field(default_factory=list)
    """Items whose title or summary contains one of these words (whole words, any case) are left
    out: job ads, canteen menus.
    """
    include_topics: list[str] = Field(default_factory=list)
    """If set, only items with one of these topics are taken."""
    exclude_topics: list[str] = Field(default_factory=list)
    """Items with one of these topics are left out."""

    def rules(self) -> FilterRules:
        from clusterfeed.ingest.filters import FilterRules

        return FilterRules(
            tuple(self.include_keywords), tuple(self.exclude_keywords),
            tuple(self.include_topics), tuple(self.exclude_topics),
        )  # fmt: skip


class FeedConfig(_Strict):
    name: str = Field(min_length=1)
    """The partner's display name, shown as the source; unique."""
    url: str = Field(min_length=1)
    """The feed's `http://` or `https://` URL, or a local file path. RSS 0.9x/1.0/2.0, Atom and
    JSON Feed are read.
    """
    kind: Literal["feed", "html"] = "feed"
    """`"feed"`, or `"html"` for a partner without a feed: `url` is then their news listing page,
    read with the `selectors` below.
    """
    site: str | None = None
    """The partner's web site; used as the base for relative links in file feeds, and linked as the
    source.
    """
    topics: list[str] = Field(default_factory=list)
    """Topics every item of this feed belongs to (lower case, e.g. `"gene-therapy"`). Categories in
    the items are added.
    """
    language: str = "en"
    """The feed's language code (`de`, `en`, `ja`, …)."""
    enabled: bool = True
    """`false` keeps the feed in the config without fetching it."""
    discover: bool = False
    """When `url` turns out to be an HTML page that announces a feed (`<link rel="alternate">`),
    use that feed. Without it, the error names the feed's address for you to put into the
    config.
    """
    own: bool = False
    """`true` for the cluster office's own feeds: with `stories.representative = "own"`, the
    cluster's version leads a story told by several partners.
    """
    filters: FiltersConfig = FiltersConfig()
    """Filters for this feed only, with the same keys as `[filters]`."""
    selectors: SelectorsConfig | None = Field(None, validate_default=True)
    """For `kind = "html"`: the CSS selectors that read the news listing page (see below). Required
    there, not allowed otherwise.
    """

    @field_validator("selectors")
    @classmethod
    def _selectors_for_html(
        cls, value: SelectorsConfig | None, info: ValidationInfo
    ) -> SelectorsConfig | None:
        kind = info.data.get("kind")
        if kind == "html" and value is None:
            raise ValueError(
                'kind "html" needs a [feeds.selectors] table with at least item and title'
            )
        if kind == "feed" and value is not None:
            raise ValueError('selectors are only used with kind = "html"')
        return value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith(("http://", "https://")):
            try:
                parts = urlsplit(value)
                valid = bool(parts.hostname) and parts.port != 0 and _is_http_url(value)
            except ValueError:  # "http://[::1", "http://host:port"
                valid = False
            if not valid:
                raise ValueError(
                    "not a valid web address (expected e.g. https://partner.example/feed.rss)"
                )
        return value

    @field_validator("site")
    @classmethod
    def _site(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("language")
    @classmethod
    def _language(cls, value: str) -> str:
        if not _LANGUAGE.match(value):
            raise ValueError('expected a language code such as "de", "en" or "ja"')
        return value

    @field_validator("topics")
    @classmethod
    def _topics(cls, value: list[str]) -> list[str]:
        for topic in value:
            if not _TOPIC.match(topic):
                raise ValueError(
                    f"topic {topic!r} must be lower case letters, digits, - or _ "
                    '(e.g. "gene-therapy")'
                )
        return value

    @property
    def is_remote(self) -> bool:
        return self.url.startswith(("http://", "https://"))


class PublishConfig(_Strict):
    output_dir: Path = Path("public")
    """The folder the [published files](serving.md#published-files) are written to."""
    feed_url: str | None = None
    """The public URL of the main feed (its id and `rel="self"` link). The other files' URLs are
    taken relative to it, so they sit in the same folder on the web as in `output_dir`.
    """
    filename: str = "feed.atom"
    """The main Atom feed's file name in that folder (not `feed.rss`, `feed.json`, `sources.opml`,
    `topics`, `languages` or `archive`, which the other files use).
    """
    title: str | None = None
    """The feed's title (topic and language feeds add the topic or language)."""
    subtitle: str | None = None
    """The feed's subtitle (RSS `description`, JSON Feed `description`)."""
    max_entries: int = Field(50, ge=1, le=10_000)
    """How many stories each feed holds (newest first): the main feed in every format, and every
    topic and language feed.
    """
    websub_hub: str | None = None
    """A WebSub hub's URL. Every feed then carries `rel="hub"` (Atom, RSS) or `hubs` (JSON Feed)
    beside its `self` link, and after each publish that changed something the hub gets one
    `hub.mode=publish` ping naming every changed feed.
    """

    @field_validator("websub_hub")
    @classmethod
    def _hub(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    archive_size: int = Field(100, ge=1, le=10_000)
    """How many stories each Atom archive page holds (see [Archive](serving.md#archive-rfc-5005)).
    Changing it renumbers the archive: every page is written anew once.
    """

    @field_validator("feed_url")
    @classmethod
    def _feed_url(cls, value: str | None) -> str | None:
        return None if value is None else _http_url(value)

    @field_validator("filename")
    @classmethod
    def _filename(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError('expected a plain file name such as "feed.atom"')
        return value


class DigestConfig(_Strict):
    templates_dir: Path | None = None
    """The folder with the templates below; copy `templates/` to start your own."""
    html_template: str = "digest.html"
    """The HTML body template."""
    text_template: str = "digest.txt"
    """The plain-text body template."""
    subject_template: str = "digest_subject.txt"
    """The subject template (its output is folded into one line). The default is short and in the
    digest's language ("NordBio Cluster news: 12 new stories, 26 Nov 2026"); mail programs cut
    subjects longer than about 78 characters.
    """
    from_address: str = Field(alias="from")
    """The From address, e.g. `"NordBio Cluster News <news@nordbio.example>"`."""
    reply_to: str | None = None
    """The Reply-To address."""
    group_by: Literal["topic", "source"] = "topic"
    """Group stories by `"topic"` (sections named after the subscriber's own topics) or by
    `"source"`.
    """
    send_when_empty: bool = False
    """Also mail subscribers who have nothing new (a "nothing new" digest)."""
    max_stories: int = Field(40, ge=1, le=500)
    """The most stories in one subscriber's digest. The newest are kept (by the date each story
    shows); the mail ends "… and N more stories on the website", linking the digest's web
    version, which lists them all. The ones left out count as offered: they are not mailed later
    on their own.
    """
    # Stories over max_stories are listed on the digest's web version only; with
    # carry_over they also go into the subscriber's next digest that has news.
    carry_over: bool = False
    """With `true`, stories `max_stories` left out also go into the subscriber's next digest that
    has news of its own, in the room the new stories leave under the cap (never into a mail of
    their own).
    """
    summary_chars: int = Field(300, ge=40, le=5000)
    """How long a story's summary may be in the digest."""
    lookback_days: int = Field(14, ge=1, le=365)
    """Only stories first seen within this many days are considered for a digest (a new subscriber
    does not get the whole archive).
    """


class DkimConfig(_Strict):
    """DKIM signing: the key signs for ``domain``; receivers fetch the public half from
    ``<selector>._domainkey.<domain>`` in DNS."""

    selector: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    """The selector: receivers look up the public key at `<selector>._domainkey.<domain>`."""
    domain: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.-]*\.[A-Za-z0-9-]+$")
    """The signing domain (`d=`); use the domain of `digest.from` so the signature aligns for
    DMARC.
    """
    private_key_file: Path | None = None
    """A PEM file with the RSA private key (relative to the config file)."""
    private_key_env: str | None = Field(None, validate_default=True)
    """Or: the name of an environment variable holding the PEM text (for containers and secret
    stores). Exactly one of the two.
    """

    @field_validator("private_key_env")
    @classmethod
    def _one_key_source(cls, value: str | None, info: ValidationInfo) -> str | None:
        has_file = info.data.get("private_key_file") is not None
        if value and has_file:
            raise ValueError("set private_key_file or private_key_env, not both")
        if not value and not has_file and "private_key_file" in info.data:
            raise ValueError(
                "DKIM needs a key: set private_key_file (a PEM file) or private_key_env "
                "(the name of an environment variable holding the PEM text)"
            )
        return value


class MailConfig(_Strict):
    transport: Literal["maildir", "smtp"] = "maildir"
    """`"maildir"` writes one `.eml` file per message into a local Maildir (nothing to install; any
    mail program opens them); `"smtp"` sends through a mail server.
    """
    maildir: Path = Path("mail")
    """The Maildir folder (`new/`, `cur/`, `tmp/` are created)."""
    host: str | None = Field(None, validate_default=True)
    """The SMTP server (required for `"smtp"`)."""
    port: int | None = Field(None, ge=1, le=65535)
    """The SMTP port."""
    security: Literal["none", "starttls", "tls"] = "starttls"
    """`"starttls"` (upgrade a plain connection), `"tls"` (implicit TLS, usually port 465) or
    `"none"` (only for a relay on the same machine or network).
    """
    username: str | None = None
    """The SMTP login."""
    password_env: str | None = None
    """The name of the environment variable that holds the SMTP password (the password itself never
    goes into the file).
    """
    connections: int = Field(2, ge=1, le=50)
    """How many SMTP connections send at once; each is reused for many messages."""
    timeout_seconds: float = Field(60.0, gt=0, le=600)
    """The SMTP timeout."""
    # How often all connections together may hand over a message; 0 = no limit.
    rate_per_minute: float = Field(0, ge=0)
    """At most this many messages a minute over all connections together, evenly spaced (ask your
    provider for its limit; e.g. `600`). Alerts count too.
    """
    # A 4xx answer (or a lost connection) is tried again after retry_first_minutes, then
    # each delay times retry_factor, at most retry_max_minutes, with +-retry_jitter of it
    # at random; after retry_attempts attempts or retry_hours since the digest was built
    # the delivery fails with the last answer.
    retry_first_minutes: float = Field(5, gt=0)
    """After a `4xx` answer or a lost connection, the first retry waits this long…"""
    retry_factor: float = Field(3, ge=1)
    """…each later one this many times longer (5, 15, 45 minutes, …)…"""
    retry_max_minutes: float = Field(240, gt=0)
    """…but never longer than this."""
    retry_jitter: float = Field(0.1, ge=0, lt=1)
    """Each delay is moved by up to ±10 % at random, so mail deferred together does not come back
    together.
    """
    retry_attempts: int = Field(8, ge=1, le=100)
    """After this many attempts the delivery fails with the server's last answer…"""
    retry_hours: float = Field(48, gt=0)
    """…or when the next retry would fall later than this after the digest was built."""
    # This many permanent refusals (5xx) in a row mark an address bouncing.
    bounce_after: int = Field(3, ge=1, le=100)
    """This many permanent refusals (`5xx`) in a row mark an address *bouncing*: digests skip it
    until you clear it (see
    [Delivery](delivery.md#delivery-exactly-once-and-the-one-window-that-cannot-be-closed)).
    """
    dkim: DkimConfig | None = None
    """Signs every message the transport sends with DKIM (see below)."""

    # Field validators (not one model validator), so each problem is reported at its own
    # key ("mail.host", not "mail" with the whole table as the "found" value).
    # validate_default makes them run when the key is absent, which is the usual mistake.
    @field_validator("host")
    @classmethod
    def _smtp_needs_host(cls, value: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("transport") == "smtp" and not value:
            raise ValueError('transport "smtp" needs host (the SMTP server name)')
        return value

    @field_validator("password_env")
    @classmethod
    def _password_needs_user(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value and "username" in info.data and not info.data["username"]:
            raise ValueError("password_env is set but username is not")
        return value

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        return {"tls": 465, "starttls": 587}.get(self.security, 25)


class StoreConfig(_Strict):
    url: str | None = None
    """The database. `sqlite:///relative/path.sqlite3` is relative to the config's folder;
    `sqlite:////absolute/path` is absolute; `postgresql+psycopg://user@host/dbname` uses
    PostgreSQL (install with `pip install 'clusterfeed[postgres]'`).
    """
    url_env: str | None = None
    """Or: the name of an environment variable holding the database URL, used instead of `url`
    (for containers, and to keep the database password out of the file; the `docker compose`
    setup sets `CLUSTERFEED_STORE_URL`). clusterfeed refuses to start when it is not set.
    """


class WebConfig(_Strict):
    base_url: str = "http://127.0.0.1:8080"
    """The public URL that links in e-mails start with (confirm, unsubscribe, preferences, and
    "View in browser": `{base_url}/digests/<date>.html`, which `clusterfeed serve` answers from
    `publish.output_dir`). It must reach `clusterfeed serve`. The "View in browser" link is only
    put into mails when `base_url` is set in the config.
    """
    host: str = "127.0.0.1"
    """The address the web app listens on."""
    port: int = Field(8080, ge=1, le=65535)
    """Its port."""
    secret_env: str = "CLUSTERFEED_SECRET"
    """The environment variable with the secret that signs links and forms and keys the hashes of
    client addresses. Without it, clusterfeed creates a random secret once and keeps it in the
    store. Changing the secret invalidates every link in mails already sent: keep it. The
    suppression list keeps working across such a change: its key is derived from the secret
    once, when first needed, and stored (it reveals nothing of the secret).
    """
    # The reverse proxies whose X-Forwarded-For is believed (addresses or networks);
    # none by default: a client cannot choose its own address for the sign-up limit.
    trusted_proxies: list[Annotated[str, AfterValidator(check_proxy)]] = Field(default_factory=list)
    """The reverse proxies (IP addresses or networks, such as `["127.0.0.1"]` or `["10.0.0.0/8",
    "::1"]`) whose `X-Forwarded-For` and `X-Forwarded-Proto` are believed. The client is then
    the right-most address in `X-Forwarded-For` that is not one of them; the rest of the header
    was written by the client and is ignored. The per-client sign-up limit and the consent log's
    client hash use that address. Empty: the header is ignored from everyone, 127.0.0.1
    included, so behind a proxy every visitor counts as the proxy; name your proxy here (see the
    nginx example under [Serving the feeds](serving.md#serving-the-feeds)).
    """

    _check_base = field_validator("base_url")(_http_url)


class SignupConfig(_Strict):
    """The public sign-up form and its limits (see docs/subscribers.md)."""

    enabled: bool = False
    """Serve the sign-up form at `/subscribe`. The preferences and unsubscribe pages work either
    way.
    """
    # Bump when the text of the form or the privacy notice changes: every consent row
    # records the version the person saw.
    form_version: str = Field("1", min_length=1, max_length=50)
    """A name for the text of the form and its privacy notice; every consent row records it. Change
    it when you change the text (letters, digits, `.`, `_`, `-`).
    """
    confirm_hours: float = Field(48.0, gt=0, le=24 * 30)
    """How long a confirmation link works."""
    address_limit: int = Field(3, ge=1, le=1000)
    """At most this many sign-ups for one address in `address_window_hours`; more get the same page
    but no mail.
    """
    address_window_hours: float = Field(24.0, gt=0, le=24 * 30)
    """The window of `address_limit`, in hours."""
    client_limit: int = Field(20, ge=1, le=100_000)
    """At most this many sign-ups from one client (IP address) in `client_window_minutes`; more get
    "too many sign-ups" (HTTP 429).
    """
    client_window_minutes: float = Field(60.0, gt=0, le=24 * 60)
    """The window of `client_limit`, in minutes."""

    @field_validator("form_version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", value):
            raise ValueError("use letters, digits, '.', '_' or '-' (for example 2026-11)")
        return value


class SubscriberConfig(_Strict):
    email: str
    """The address (checked; internationalized domains and mailboxes allowed, see [Using a real
    SMTP server](delivery.md#using-a-real-smtp-server)).
    """
    name: str | None = None
    """Used in the greeting and the To header."""
    topics: list[str] = Field(default_factory=list)
    """Only stories with one of these topics."""
    languages: list[str] = Field(default_factory=list)
    """Only stories told in one of these languages."""
    frequency: Literal["daily", "weekly"] = "daily"
    """`"daily"`: every scheduled digest; `"weekly"`: at most one digest a week."""

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return normalize_email(value)


class StoriesConfig(_Strict):
    """How items of different partners are joined into one story (see docs/stories.md)."""

    match: bool = True
    """Join items of different partners that tell one event (see [One story, many
    sources](stories.md)). `false` joins only the same page.
    """
    representative: Literal["own", "complete", "earliest"] = "own"
    """Which version leads a story (its title, link and text in the feed and the digest): `"own"`
    the cluster's own (feeds with `own = true`) where there is one, else the most complete;
    `"complete"` the longest text; `"earliest"` the first published. Ties go to the earliest,
    then by feed name, so the choice never depends on fetch order.
    """
    window_days: float = Field(5.0, gt=0, le=60)
    """How many days apart two items may be and still be compared (hand-weighted scorer)."""
    threshold: float = Field(1.0, gt=0, le=10)
    """The score two items need to be joined. Higher: fewer, safer joins."""
    name_weight: float = Field(1.0, ge=0, le=10)
    """Weight of shared names."""
    name_saturation: float = Field(2.3, gt=0, le=50)
    """How many fully rare shared names give the full weight."""
    text_weight: float = Field(1.4, ge=0, le=10)
    """Weight of same-language text similarity."""
    min_text_similarity: float = Field(0.25, ge=0, le=1)
    """The similarity below which text similarity counts nothing."""
    link_weight: float = Field(1.5, ge=0, le=10)
    """Weight of one of the other kinds of evidence (shared links)."""
    amount_weight: float = Field(0.8, ge=0, le=10)
    """Weight of one of the other kinds of evidence (amounts)."""
    code_weight: float = Field(0.8, ge=0, le=10)
    """Weight of one of the other kinds of evidence (codes)."""
    date_weight: float = Field(0.35, ge=0, le=10)
    """Weight of one of the other kinds of evidence (dates)."""
    percent_weight: float = Field(0.35, ge=0, le=10)
    """Weight of one of the other kinds of evidence (percentages)."""
    rare_name_idf: float = Field(0.6, ge=0, le=1)
    """How rare (scaled inverse document frequency, 0 to 1) a title's name must be to count as the
    story's subject for the "different subjects" veto. Lower: the veto applies more often.
    """
    together: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of item URLs that are always one story: `[["https://a.example/x",
    "https://b.example/y"]]`.
    """
    apart: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of item URLs that are never one story."""

    @field_validator("together", "apart")
    @classmethod
    def _pairs(cls, value: list[tuple[str, str]]) -> list[tuple[str, str]]:
        for a, b in value:
            _http_url(a)
            _http_url(b)
        return value


class AlertsConfig(_Strict):
    """Who hears about feeds in trouble, and when trouble is worth a mail."""

    email: str | None = None
    """Where to mail the operator about feeds in trouble. Without it, trouble shows only in
    `clusterfeed status`.
    """
    failing_hours: float = Field(24.0, gt=0, le=24 * 90)
    """A feed that has failed for longer than this is reported."""
    silent_days: int = Field(30, ge=1, le=3650)
    """A feed whose newest item is older than this is reported."""

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        return None if value is None else normalize_email(value)


class WorkersConfig(_Strict):
    """Task workers on PostgreSQL (`clusterfeed worker`, `clusterfeed scheduler`).

    Not used by `clusterfeed run`, which runs everything in one process.
    """

    tick_seconds: float = Field(10.0, ge=0.5, le=600)
    """How often `clusterfeed scheduler` looks for due feeds, a due digest and stalled tasks.
    A due feed is queued at most this late.
    """
    heartbeat_seconds: float = Field(5.0, ge=0.5, le=300)
    """How often a worker tells the database it is alive."""
    stalled_after_seconds: float = Field(30.0, ge=2, le=3600)
    """A worker silent for this long is taken for dead (killed, its machine gone): the
    scheduler hands its unfinished tasks to the other workers. Keep it a few times
    `heartbeat_seconds`; the work of a dead worker is finished within about this plus
    `tick_seconds`.
    """


class Config(_Strict):
    """The whole config. Paths are absolute once ``load_config`` returns it."""

    subscribers_csv: Path | None = None
    """A CSV file of subscribers (see `[[subscribers]]`). Header row required; `email` is the only
    required column; `name`, `topics`, `languages` (several values separated by `;`) and
    `frequency` are optional.
    """
    cluster: ClusterConfig
    schedule: ScheduleConfig = ScheduleConfig()
    fetch: FetchConfig = FetchConfig()
    feeds: list[FeedConfig] = Field(min_length=1)
    publish: PublishConfig = PublishConfig()
    digest: DigestConfig
    mail: MailConfig = MailConfig()
    store: StoreConfig = StoreConfig()
    web: WebConfig = WebConfig()
    signup: SignupConfig = SignupConfig()
    alerts: AlertsConfig = AlertsConfig()
    stories: StoriesConfig = StoriesConfig()
    workers: WorkersConfig = WorkersConfig()
    filters: FiltersConfig = FiltersConfig()
    subscribers: list[SubscriberConfig] = Field(default_factory=list)
    # Not read from TOML: where the file lives, so relative paths and messages can use it.
    source: Path = Field(default=Path("."), exclude=True)

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    @property
    def feed_url(self) -> str:
        return self.publish.feed_url or f"{self.web.base_url.rstrip('/')}/{self.publish.filename}"

    @property
    def feed_title(self) -> str:
        return self.publish.title or f"{self.cluster.name} – news from our partners"

    @property
    def database_url(self) -> str:
        return self.store.url or f"sqlite:///{self.base_dir / 'clusterfeed.sqlite3'}"

    @property
    def user_agent(self) -> str:
        from clusterfeed import __version__

        return self.fetch.user_agent or (
            f"clusterfeed/{__version__} "
            f"(+{self.cluster.url}; news aggregator of {self.cluster.name})"
        )

    def feed(self, name: str) -> FeedConfig:
        for feed in self.feeds:
            if feed.name == name:
                return feed
        raise KeyError(name)


def normalize_email(value: str) -> str:
    """Check an address and return its normalized form, or raise ValueError.

    email-validator knows internationalized domains and the syntax corners that a
    regular expression gets wrong; deliverability (DNS) is not checked, because the
    config check must work offline.
    """
    from email_validator import EmailNotValidError, validate_email

    if any(ch in value for ch in "\r\n\0"):
        raise ValueError("an e-mail address must not contain line breaks")
    try:
        info = validate_email(value, check_deliverability=False)
    except EmailNotValidError as exc:
        raise ValueError(f"not a valid e-mail address ({exc})") from None
    return info.normalized


def resolve_config_path(path: str | os.PathLike[str] | None) -> Path:
    """The config to use: the argument, else $CLUSTERFEED_CONFIG, else the default."""
    if path:
        return Path(path)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read, validate and resolve a config file; raise ConfigError listing every problem."""
    file = resolve_config_path(path).absolute()
    if not file.is_file():
        raise ConfigError(
            [
                Problem(
                    file,
                    "",
                    "config file not found; pass --config PATH or set "
                    f"{CONFIG_ENV} (config/example.toml is a complete example)",
                )
            ]
        )
    try:
        raw = tomllib.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [Problem(file, "", f"the file is not UTF-8 text ({exc.reason})")]
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(file, "", f"TOML syntax error: {exc}")]) from None

    problems = _duplicate_name_problems(file, raw)
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        problems.extend(_explain(file, raw, exc))
        # The file checks read the raw values, so a missing feed file is reported in the
        # same round as a type error elsewhere ("all problems at once").
        problems.extend(_file_problems(file, raw))
        raise ConfigError(_named(problems, raw)) from None
    config = _resolve_paths(config, file)
    problems.extend(_file_problems(file, raw))
    if problems:
        raise ConfigError(_named(problems, raw))
    return config


def _named(problems: list[Problem], raw: dict[str, Any]) -> list[Problem]:
    """Name each entry of a list of tables by its name, not its index (feeds[0])."""
    return [
        p if p.where is not None else dataclasses.replace(p, where=located(p.key, raw))
        for p in problems
    ]


def _resolve_paths(config: Config, file: Path) -> Config:
    base = file.parent

    def absolute(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    store_url = config.store.url
    if config.store.url_env and os.environ.get(config.store.url_env):
        store_url = os.environ[config.store.url_env]
    if store_url and store_url.startswith("sqlite:///") and not store_url.startswith("sqlite:////"):
        rel = store_url.removeprefix("sqlite:///")
        if rel and rel != ":memory:":
            store_url = f"sqlite:///{(base / rel).resolve()}"
    feeds = [
        f if f.is_remote else f.model_copy(update={"url": str(absolute(Path(f.url)))})
        for f in config.feeds
    ]
    return config.model_copy(
        update={
            "source": file,
            "subscribers_csv": absolute(config.subscribers_csv),
            "feeds": feeds,
            "publish": config.publish.model_copy(
                update={"output_dir": absolute(config.publish.output_dir)}
            ),
            "digest": config.digest.model_copy(
                update={"templates_dir": absolute(config.digest.templates_dir)}
            ),
            "mail": config.mail.model_copy(
                update={
                    "maildir": absolute(config.mail.maildir),
                    "dkim": config.mail.dkim
                    and config.mail.dkim.model_copy(
                        update={"private_key_file": absolute(config.mail.dkim.private_key_file)}
                    ),
                }
            ),
            "store": config.store.model_copy(update={"url": store_url}),
        }
    )


def _duplicate_name_problems(file: Path, raw: dict[str, Any]) -> list[Problem]:
    problems: list[Problem] = []
    seen: dict[str, int] = {}
    feeds = raw.get("feeds")
    if isinstance(feeds, list):
        for i, feed in enumerate(feeds):
            name = feed.get("name") if isinstance(feed, dict) else None
            if isinstance(name, str):
                if name in seen:
                    problems.append(
                        Problem(
                            file,
                            f"feeds[{i}].name",
                            f"{shown(name)} is already the name of entry {seen[name] + 1}; "
                            "every feed needs its own name",
                        )
                    )
                seen.setdefault(name, i)
    return problems


def _file_problems(file: Path, raw: dict[str, Any]) -> list[Problem]:
    """Checks that need the file system or the environment.

    They work on the raw TOML values (values of the wrong type are skipped: the type
    check reports those), so they run even when the type check failed.
    """
    base = file.parent

    def local(value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    def table(key: str) -> dict[str, Any]:
        value = raw.get(key)
        return value if isinstance(value, dict) else {}

    problems: list[Problem] = []
    raw_feeds = raw.get("feeds")
    for i, feed in enumerate(raw_feeds if isinstance(raw_feeds, list) else []):
        url = feed.get("url") if isinstance(feed, dict) else None
        if not isinstance(url, str) or not url or url.startswith(("http://", "https://")):
            continue
        if not local(url).is_file():
            problems.append(
                Problem(
                    file,
                    f"feeds[{i}].url",
                    f"{shown(url)} is neither an http(s) URL nor an existing file "
                    "(local paths are relative to the config file's folder)",
                )
            )
    from clusterfeed.resources import default_template_dir

    digest = table("digest")
    folder = digest.get("templates_dir")
    templates = local(folder) if isinstance(folder, str) else default_template_dir()
    for key, default in (
        ("html_template", "digest.html"),
        ("text_template", "digest.txt"),
        ("subject_template", "digest_subject.txt"),
    ):
        name = digest.get(key, default)
        if isinstance(name, str) and not (templates / name).is_file():
            problems.append(
                Problem(
                    file,
                    f"digest.{key}",
                    f"template {name!r} not found in {templates}; "
                    "set digest.templates_dir to the folder that holds it",
                )
            )
    mail = table("mail")
    password_env = mail.get("password_env")
    if (
        mail.get("transport") == "smtp"
        and isinstance(password_env, str)
        and password_env
        and password_env not in os.environ
    ):
        problems.append(
            Problem(
                file,
                "mail.password_env",
                f"environment variable {password_env} is not set; "
                "export it with the SMTP password before starting clusterfeed",
            )
        )
    url_env = table("store").get("url_env")
    if isinstance(url_env, str) and url_env and not os.environ.get(url_env):
        problems.append(
            Problem(
                file,
                "store.url_env",
                f"environment variable {url_env} is not set; export it with the database URL "
                "(postgresql+psycopg://USER:PASSWORD@HOST:5432/DB) before starting clusterfeed, "
                "or set [store] url instead",
            )
        )
    dkim = mail.get("dkim")
    if isinstance(dkim, dict):
        key_file, key_env = dkim.get("private_key_file"), dkim.get("private_key_env")
        try:
            if isinstance(key_file, str) and key_file:
                read_dkim_key(file, local(key_file), None)
            elif isinstance(key_env, str) and key_env:
                read_dkim_key(file, None, key_env)
        except ConfigError as exc:
            problems.extend(exc.problems)
    csv_path = raw.get("subscribers_csv")
    if isinstance(csv_path, str):
        try:
            read_subscribers_csv(local(csv_path))
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems


def read_subscribers_csv(
    path: Path,
    ignore: Collection[str] = (),
    skip: Callable[[dict[str, str]], bool] | None = None,
    *,
    encoding: str | None = None,
    offered: tuple[Collection[str], Collection[str]] | None = None,
) -> list[SubscriberConfig]:
    """Read subscribers from a CSV with a header row; ``email`` is the only required column.

    ``topics`` and ``languages`` hold several values separated by ``;`` (or ``,``).
    Columns in ``ignore`` are allowed and not read (``subscribers export`` writes a few
    more than an import needs); rows for which ``skip`` is true are left out. The
    encoding and the delimiter are found as ``csvtext`` explains, unless ``encoding``
    names one. With ``offered`` (topics, languages), any other value is a problem of its
    line: an import takes what the sign-up form offers, nothing a digest cannot match.
    """
    from clusterfeed.subscribers import csvtext

    problems: list[Problem] = []
    result: list[SubscriberConfig] = []
    if not path.is_file():
        raise ConfigError([Problem(path, "", "subscribers CSV file not found")])
    try:
        decoded = csvtext.read(path, encoding)
    except csvtext.CsvTextError as exc:
        raise ConfigError(
            [Problem(path, f"line {exc.line}" if exc.line else "", str(exc))]
        ) from None
    except OSError as exc:
        raise ConfigError([Problem(path, "", f"cannot read it ({exc.strerror or exc})")]) from None
    if decoded.guessed:
        logging.getLogger(__name__).warning(
            "%s is not UTF-8; read it as Windows-1252 (what spreadsheets on Windows write). "
            "If names look wrong, give its encoding with --encoding (e.g. mac_roman)",
            path,
        )
    text = decoded.text
    with io.StringIO(text, newline="") as handle:
        reader = csv.DictReader(handle, delimiter=csvtext.delimiter(text))
        fields = [f.strip().lower() for f in reader.fieldnames or []]
        if "email" not in fields:
            raise ConfigError(
                [Problem(path, "line 1", "the header row must have an 'email' column")]
            )
        allowed = {"email", "name", "topics", "languages", "frequency"}
        unknown = [f for f in fields if f not in allowed and f not in ignore]
        if unknown:
            problems.append(
                Problem(
                    path,
                    "line 1",
                    f"unknown column(s) {', '.join(unknown)}; "
                    f"expected {', '.join(sorted(allowed))}",
                )
            )
        for row in reader:
            line = reader.line_num
            clean = {k.strip().lower(): (v or "").strip() for k, v in row.items() if k}
            if skip is not None and skip(clean):
                continue
            data: dict[str, Any] = {"email": clean.get("email", "")}
            if clean.get("name"):
                data["name"] = clean["name"]
            for key in ("topics", "languages"):
                if clean.get(key):
                    values = re.split(r"[;,]", clean[key])
                    data[key] = [t.strip().lower() for t in values if t.strip()]
            if offered is not None:
                for column, message in csvtext.not_offered(data, offered):
                    problems.append(Problem(path, f"line {line}, column {column}", message))
            if clean.get("frequency"):
                data["frequency"] = clean["frequency"]
            try:
                result.append(SubscriberConfig.model_validate(data))
            except ValidationError as exc:
                for err in exc.errors():
                    column = ".".join(str(p) for p in err["loc"][:1]) or "row"
                    problems.append(
                        Problem(
                            path,
                            f"line {line}, column {column}",
                            sentence(err["type"], err["msg"], err.get("ctx"), err["input"]),
                        )
                    )
    if problems:
        raise ConfigError(problems)
    return result


def advice(config: Config) -> list[str]:
    """Settings that are valid but make digests fail their readers or receivers'
    checks; ``check`` prints them as warnings and sending logs them.

    Only what is certain from the config is said: no DNS lookups, no guesses.
    """
    found: list[str] = []
    sender_domain = _domain_of(config.digest.from_address)
    dkim = config.mail.dkim
    # (An internationalized sender domain is left alone: its ASCII form is the one to
    # compare, and which of two IDNA standards a server applies is not certain.)
    checkable = sender_domain.isascii() and "." in sender_domain
    if dkim is not None and checkable and not _may_align(dkim.domain, sender_domain):
        found.append(
            f"mail.dkim.domain '{dkim.domain}' and the domain of digest.from "
            f"'{sender_domain}' have different organizational domains, so receivers "
            "that check DMARC ignore this signature (and may file digests as spam): sign "
            f"for '{sender_domain}' or a domain it belongs to"
        )
    if config.mail.transport == "smtp":
        base = config.web.base_url
        host = (urlsplit(base).hostname or "").lower()
        if host in ("localhost", "127.0.0.1", "::1") or host.endswith(".localhost"):
            found.append(
                f"web.base_url '{base}' is this machine: the unsubscribe, preferences and "
                "web-version links in every digest lead nowhere for subscribers; set it "
                "to the public address of `clusterfeed serve`"
            )
        elif not base.lower().startswith("https://"):
            found.append(
                f"web.base_url '{base}' is not https: one-click unsubscribe (RFC 8058) "
                "needs an https link, and large mailbox providers filter bulk mail "
                "without it; serve the pages over https and set web.base_url to that"
            )
    return found


def _domain_of(address: str) -> str:
    return parseaddr(address)[1].rpartition("@")[2].lower()


def _may_align(signing: str, sender: str) -> bool:
    """DMARC's relaxed alignment: both in one organizational domain. That needs the
    public suffix list to decide exactly; without it, domains whose last two labels
    differ are certainly apart, and anything else may align."""
    return signing.lower().split(".")[-2:] == sender.split(".")[-2:]


def all_subscribers(config: Config) -> list[SubscriberConfig]:
    """Subscribers from the config and its CSV, the config's entry winning for an address."""
    merged: dict[str, SubscriberConfig] = {}
    if config.subscribers_csv is not None:
        for sub in read_subscribers_csv(config.subscribers_csv):
            merged[sub.email.lower()] = sub
    for sub in config.subscribers:
        merged[sub.email.lower()] = sub
    return list(merged.values())


def _key_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """The keys allowed in the table that holds ``loc``, by walking the model."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return []
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
        if model is None:
            return []
    return sorted((f.alias or name) for name, f in model.model_fields.items() if name != "source")


def _lookup(raw: Any, loc: tuple[int | str, ...]) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _explain(file: Path, raw: dict[str, Any], exc: ValidationError) -> list[Problem]:
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        key = _key_path(loc)
        kind = err["type"]
        where = None
        if kind == "extra_forbidden":
            allowed = _allowed_keys(loc)
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" — did you mean {shown(close[0])}?" if close else ""
            message = (
                f"unknown key {shown(str(loc[-1]))}{hint} Keys allowed here: {', '.join(allowed)}"
            )
            where = located(_key_path(loc[:-1]), raw)
        elif kind == "missing":
            table = located(_key_path(loc[:-1]), raw) or "the top of the file"
            message = f"required key is missing: add {loc[-1]} = ... to {table}"
        else:
            value = _lookup(raw, loc) if loc else None
            message = sentence(kind, err["msg"], err.get("ctx"), value)
        problems.append(Problem(file, key, message, where))
    return problems


def read_dkim_key(config_file: Path, key_file: Path | None, key_env: str | None) -> bytes:
    """The DKIM private key as PEM bytes, or a ConfigError that says what to fix.

    Read when the transport starts (and by ``check``), not per message: a key that is
    missing or unreadable must stop the run before the first digest goes out unsigned.
    """
    from dkim.crypto import parse_pem_private_key

    if key_file is not None:
        key = "mail.dkim.private_key_file"
        try:
            data = key_file.read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(
                [
                    Problem(
                        config_file,
                        key,
                        f"cannot read the DKIM key {key_file} ({reason}); check the path "
                        "(relative paths start at the config file's folder) and that the "
                        "user running clusterfeed may read it",
                    )
                ]
            ) from None
        where = str(key_file)
    else:
        key = "mail.dkim.private_key_env"
        value = os.environ.get(key_env or "")
        if not value:
            raise ConfigError(
                [
                    Problem(
                        config_file,
                        key,
                        f"environment variable {key_env} is not set; export it with the "
                        "DKIM private key (PEM text) before starting clusterfeed",
                    )
                ]
            )
        data = value.encode()
        where = f"${key_env}"
    try:
        parse_pem_private_key(data)
    except Exception as exc:  # dkimpy raises several unrelated classes for a bad key
        raise ConfigError(
            [
                Problem(
                    config_file,
                    key,
                    f"{where} is not a PEM RSA private key ({exc}); "
                    "it must begin with -----BEGIN RSA PRIVATE KEY----- or "
                    "-----BEGIN PRIVATE KEY-----",
                )
            ]
        ) from None
    return data
