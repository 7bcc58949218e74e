"""One cycle of work: fetch → parse → normalize → store → publish → digest → deliver.

This module wires the edges (network, store, transport, clock) to the pure decisions.
The CLI and the scheduler call it; nothing here prints. The clock is a function
passed in, so tests control time and never sleep.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import secrets
import threading
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urljoin

import jinja2
from sqlalchemy.exc import SQLAlchemyError

from clusterfeed.app.commands import Commands
from clusterfeed.app.health import Alert, alert_key, alert_message, feed_alerts
from clusterfeed.app.lifeline import lifeline, start_worker
from clusterfeed.app.queries import Queries
from clusterfeed.config import Config, ConfigError, FeedConfig, Problem, all_subscribers
from clusterfeed.delivery.outbox import CLAIM_BATCH, SendReport, deliver_pending
from clusterfeed.delivery.pacing import RetryPolicy
from clusterfeed.delivery.transports import (
    Outgoing,
    PermanentFailure,
    Prepared,
    TemporaryFailure,
    Transport,
    make_transport,
)
from clusterfeed.digest.compose import DigestComposer
from clusterfeed.digest.message import build_message, message_id
from clusterfeed.digest.planning import OutboxFacts, PlannedDigest, plan_deliveries
from clusterfeed.digest.render import (
    DigestLinks,
    make_environment,
    render_digest,
    section_key,
    template_dir,
)
from clusterfeed.digest.shared import can_share_renderings
from clusterfeed.digest.templatecheck import (
    TemplateProblem,
    describe,
    require_digest_templates,
    template_location,
)
from clusterfeed.ingest.cadence import apply_interval
from clusterfeed.ingest.fetch import FetchLimits, FetchRequest, fetch_all
from clusterfeed.ingest.filters import keep
from clusterfeed.ingest.netguard import AddressCheck, AddressRule, address_problem, check_stored
from clusterfeed.ingest.polling import next_poll
from clusterfeed.model import FeedStatus, FetchResult, PollFacts, Story, Subscriber
from clusterfeed.publish.feedset import (
    DIGESTS_DIR,
    RESERVED_NAMES,
    KeepExisting,
    KeepIf,
    PlannedFile,
    SiteMeta,
    plan_files,
)
from clusterfeed.publish.formats import (
    SourceFeed,
    newest_update,
    reading_order,
    remove_stale,
    write_atomic,
)
from clusterfeed.publish.opml import export_opml
from clusterfeed.publish.site import (
    DigestPage,
    digest_page_url,
    digest_pages,
    render_digest_index,
    render_digest_page,
    site_environment,
    site_pages,
)
from clusterfeed.resources import default_template_dir
from clusterfeed.store import Delivery, PlannedDelivery, Store
from clusterfeed.stories.matcher import StoryMatcher
from clusterfeed.subscribers.tokens import (
    UNSUBSCRIBE,
    make_token,
    suppression_hash,
    suppression_key,
)
from clusterfeed.words import plural

if TYPE_CHECKING:
    # Reading (feedparser, BeautifulSoup) is imported where a body is parsed: a command
    # that parses nothing (an all-304 fetch, publish, digest) does not load it, and the
    # parse workers load it once in their forkserver.
    from clusterfeed.ingest.reading import ReadFeed, ReadSpec

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

# Feeds in one cycle from which parsing moves to worker processes (fetch.parse_processes
# unset): below it, starting the processes costs more than it saves.
PARALLEL_PARSE_THRESHOLD = 40
# From this many due deliveries on, messages whose templates must be rendered in full
# for every subscriber are rendered in worker processes: below it, starting the
# processes costs more than they save. Templates that allow one rendering per story
# list never need them (composing then costs less than handing a message over).
PARALLEL_RENDER_THRESHOLD = 300
# Stories kept between messages of one sending run (they are shared by many digests).
STORY_CACHE_SIZE = 2000


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def adhoc_digest_key(kind: str, now: datetime) -> str:
    """The key of a digest started by hand (``digest``, ``run --once``), unique per run.

    Scheduled digests are keyed by their cron slot so that workers agree on one; a run
    started by hand is a new digest every time. Keyed by the (whole-second) time alone,
    a second run within the same second found the first one's key and silently sent
    nothing, not even stories fetched in between.
    """
    return f"{kind}:{now.isoformat()}:{secrets.token_hex(4)}"


@dataclass
class FeedOutcome:
    name: str
    state: str  # "new", "unchanged", "failed"
    new_entries: int = 0
    updated_entries: int = 0
    message: str | None = None
    use_url: str | None = None  # a discovered feed to fetch instead, in the same cycle


@dataclass
class PublishReport:
    """What one publish did: the files it wrote and those it found already up to date.

    True when anything was written, so ``if service.publish():`` reads as before.
    """

    folder: Path
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)  # of vanished topics and languages

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)

    def __bool__(self) -> bool:
        return self.changed


def _settle(
    future: asyncio.Future[FeedOutcome], outcome: FeedOutcome | None, exc: BaseException | None
) -> None:
    """Answer a feed waiting for the writer thread (unless its task was cancelled)."""
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        assert outcome is not None
        future.set_result(outcome)


def read_spec(feed: FeedConfig) -> ReadSpec:
    """The part of a feed's config that reading its document needs, as plain data."""
    from clusterfeed.ingest.reading import ReadSpec

    selectors = None
    if feed.kind == "html" and feed.selectors is not None:
        from clusterfeed.ingest.scrape import ListingSelectors

        selectors = ListingSelectors(**feed.selectors.model_dump())
    return ReadSpec(
        url=feed.url,
        site=feed.site,
        is_remote=feed.is_remote,
        topics=tuple(feed.topics),
        language=feed.language,
        selectors=selectors,
    )


class Service:
    """The pipeline for one config and one store."""

    def __init__(self, config: Config, store: Store, clock: Clock = utc_now) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        # What the CLI and the web app read and change, so they never hold the store.
        self.queries = Queries(store)
        self.commands = Commands(store, lambda: self.clock())
        self._pool: ProcessPoolExecutor | None = None
        self._digest_pages: dict[int, DigestPage] = {}  # a sent digest's page never moves
        self._digest_env: jinja2.Environment | None = None
        self._story_cache: dict[int, Story] = {}
        self.render_threshold = PARALLEL_RENDER_THRESHOLD
        self._story_lock = threading.Lock()
        self._composer: DigestComposer | None = None  # one per sending run
        self._run_secret: str | None = None
        # What counts as the public internet for fetching (``netguard``); tests, which
        # have no internet, name a loopback address public here.
        self.address_check: AddressCheck = address_problem
        self._address_notes: dict[str, str] = {}  # feed -> a dropped address, this cycle
        stories = config.stories
        store.configure_stories(stories.representative, (f.name for f in config.feeds if f.own))
        self.matcher = (
            StoryMatcher(
                together=stories.together,
                apart=stories.apart,
                processes=config.fetch.parse_processes,
            )
            if stories.match
            else None
        )

    def close(self) -> None:
        """Stop the parsing processes (if any were started) and release the store."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _parse_pool(self, feeds: int) -> ProcessPoolExecutor | None:
        """Worker processes for parsing, when a cycle is big enough to be worth them.

        feedparser and the sanitizer are CPU-bound Python: in threads they would share
        one core. A pool is started once (with the forkserver method: a clean process
        that imports the reading module once and forks cheap workers, never a fork of this
        threaded process) and kept for later cycles. Small cycles, like the bundled
        example's nine feeds, parse in a thread and start no processes at all.

        Called when a feed's body is ready to parse, not when the cycle begins: a cycle
        where every feed answers 304 has nothing to parse and starts no process at all
        (not even multiprocessing's resource tracker, which a pool's queues start).
        """
        wanted = self.config.fetch.parse_processes
        if wanted is None:
            wanted = (os.cpu_count() or 1) if feeds >= PARALLEL_PARSE_THRESHOLD else 0
        if wanted <= 0:
            return None
        if self._pool is None:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["clusterfeed.ingest.reading"])
            # Workers watch this process's lifeline: a kill -9 leaves no process behind.
            self._pool = ProcessPoolExecutor(
                max_workers=wanted,
                mp_context=context,
                initializer=start_worker,
                initargs=(lifeline(),),
            )
        return self._pool

    def prepare(self) -> None:
        """Bring the store up to date with the schema and the config's feeds and subscribers."""
        self.store.migrate()
        self.store.sync_feeds((f.name, f.url, f.site) for f in self.config.feeds if f.enabled)
        # A shortened schedule.fetch_interval_minutes applies now, not after the old waits.
        apply_interval(self.store, self.config.schedule.fetch_interval_minutes)
        subs = [
            Subscriber(
                email=s.email,
                name=s.name,
                topics=tuple(s.topics),
                languages=tuple(s.languages),
                frequency=s.frequency,
            )
            for s in all_subscribers(self.config)
        ]
        key = self.suppression_key()
        refused = self.store.sync_subscribers(
            subs,
            self.clock(),
            lambda email: suppression_hash(key, email),
        )
        for email in refused:
            log.warning(
                "%s is in the config's subscriber list but was erased on request; it gets "
                "no mail. Remove it from the config (or from subscribers_csv) to silence this.",
                email,
            )

    # -- fetching -----------------------------------------------------------------

    def fetch_limits(self) -> FetchLimits:
        cfg = self.config.fetch
        return FetchLimits(
            concurrency=cfg.concurrency,
            timeout_seconds=cfg.timeout_seconds,
            connect_timeout_seconds=cfg.connect_timeout_seconds,
            max_bytes=cfg.max_bytes,
            user_agent=self.config.user_agent,
            per_host=cfg.per_host,
            allow_private_addresses=cfg.allow_private_addresses,
        )

    def address_rule(self, feed: FeedConfig) -> AddressRule:
        """Where the requests for ``feed`` may go (see ``netguard``)."""
        return AddressRule.for_feed(
            feed.url,
            allow_private=self.config.fetch.allow_private_addresses,
            check=self.address_check,
        )

    def _request(self, feed: FeedConfig, status: FeedStatus) -> FetchRequest:
        """The request for ``feed``: at its remembered new address if today's address
        rule still allows that, else (forgetting it, with a warning) at its url."""
        if not (status.moved_to or status.discovered_url):
            return FetchRequest(feed.name, feed.url, status.etag, status.last_modified, feed.url)
        choice = check_stored(
            feed.url,
            status.moved_to,
            status.discovered_url,
            self.address_rule(feed) if feed.is_remote else None,
        )
        if choice.warning is None:
            return FetchRequest(feed.name, choice.url, status.etag, status.last_modified, feed.url)
        self.store.forget_moves(
            feed.name,
            moved_to=choice.forget_moved,
            discovered_url=choice.forget_discovered,
            warning=choice.warning,
        )
        self._address_notes[feed.name] = choice.warning
        log.warning("feed %r: %s", feed.name, choice.warning)
        return FetchRequest(feed.name, choice.url, configured_url=feed.url)

    async def fetch(
        self,
        on_feed: Callable[[FeedOutcome], None] | None = None,
        *,
        due_only: bool = False,
        names: Collection[str] | None = None,
        match: bool = True,
    ) -> list[FeedOutcome]:
        """Fetch the enabled feeds concurrently and store what changed.

        With ``due_only`` (the scheduler's periodic job) a feed is asked only when the
        politeness rules allow it (back-off after failures, Retry-After, max-age); a
        command the operator types asks every feed except those that are gone.
        ``names`` limits the fetch to those feeds (a worker fetches one feed per task).
        With ``match`` the cycle's new items are joined to stories at the end; a worker
        leaves that to its own unit (``clusterfeed.app.units.match_new``), which runs
        once after many feeds' tasks instead of once per feed.
        """
        now = self.clock()
        cycle_started = now
        self._address_notes = {}
        statuses = {s.name: s for s in self.store.feed_statuses(now, with_counts=False)}
        requests = []
        for feed in self.config.feeds:
            status = statuses.get(feed.name)
            if not feed.enabled or status is None or status.state == "gone":
                continue
            if names is not None and feed.name not in names:
                continue
            if due_only and not status.is_due(now):
                continue
            requests.append(self._request(feed, status))
        if self._address_notes:
            statuses = {s.name: s for s in self.store.feed_statuses(now, with_counts=False)}
        outcomes = await self._fetch_and_ingest(requests, statuses, on_feed)
        # A news page that announces its feed, for a feed configured with discover = true:
        # fetch the announced feed in the same cycle instead of waiting for the next one
        # (and a feed whose remembered address was refused: its configured url).
        retries = [
            FetchRequest(o.name, o.use_url, configured_url=self.config.feed(o.name).url)
            for o in outcomes
            if o.use_url is not None
        ]
        if retries:
            statuses = {s.name: s for s in self.store.feed_statuses(now, with_counts=False)}
            retried = await self._fetch_and_ingest(retries, statuses, on_feed)
            done = {o.name for o in retried}
            outcomes = [o for o in outcomes if o.name not in done] + retried
        if match and any(o.new_entries for o in outcomes):
            await asyncio.to_thread(self.match_new, cycle_started)
        order = {f.name: i for i, f in enumerate(self.config.feeds)}
        outcomes.sort(key=lambda o: order.get(o.name, 0))
        return outcomes

    def match_new(self, since: datetime) -> int:
        """Join the one-item stories created since ``since`` to the stories they tell
        (``Store.join_new_stories``); how many items joined. Run again over the same
        items it changes nothing: a joined item is no one-item story any more."""
        if self.matcher is None:
            return 0
        joined = self.store.join_new_stories(since, self.matcher)
        if joined:
            log.info("%s joined stories told by other partners", plural(joined, "new item"))
        return joined

    async def _fetch_and_ingest(
        self,
        requests: list[FetchRequest],
        statuses: dict[str, FeedStatus],
        on_feed: Callable[[FeedOutcome], None] | None,
    ) -> list[FeedOutcome]:
        outcomes: list[FeedOutcome] = []
        feeds = len(requests)
        loop = asyncio.get_running_loop()
        timezone = self.config.schedule.timezone
        # One thread writes, in the order results are parsed. The database takes one
        # writer at a time anyway: a thread per feed only queued for its lock (and under
        # load waited out SQLite's busy timeout, "database is locked"), each holding the
        # GIL the event loop needs in between. Parsing runs elsewhere (worker processes
        # or other threads), so the network, the parsing and the store overlap.
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clusterfeed-store")
        # Unchanged feeds (304) wait here for the writer and are recorded together: a
        # cycle of 304s arrives in waves of `concurrency` answers, and one transaction
        # and one thread hand-off per wave instead of per feed keeps the GIL for the
        # event loop, which is what an all-304 cycle waits on.
        unchanged: list[tuple[FetchResult, FeedStatus | None, asyncio.Future[FeedOutcome]]] = []
        unchanged_lock = threading.Lock()

        def write_unchanged() -> None:
            with unchanged_lock:
                batch = unchanged[:]
                unchanged.clear()
            try:
                results = self._ingest_unchanged([(r, p) for r, p, _ in batch])
            except BaseException as exc:  # never leave a feed waiting for an answer
                for _, _, future in batch:
                    loop.call_soon_threadsafe(_settle, future, None, exc)
                raise
            for (_, _, future), outcome in zip(batch, results, strict=True):
                loop.call_soon_threadsafe(_settle, future, outcome, None)

        async def handle(result: FetchResult) -> None:
            read = None
            previous = statuses.get(result.feed_name)
            if result.error is None and result.not_modified:
                future: asyncio.Future[FeedOutcome] = loop.create_future()
                with unchanged_lock:
                    unchanged.append((result, previous, future))
                    first = len(unchanged) == 1
                if first:
                    writer.submit(write_unchanged)
                outcome = await future
            else:
                if result.error is None and result.body:
                    read = await self._read(self._parse_pool(feeds), result, timezone)
                outcome = await loop.run_in_executor(writer, self.ingest, result, previous, read)
            outcomes.append(outcome)
            if on_feed is not None:
                on_feed(outcome)

        try:
            await fetch_all(requests, self.fetch_limits(), handle, address_check=self.address_check)
        finally:
            writer.shutdown(wait=True)
        return outcomes

    async def _read(
        self, pool: ProcessPoolExecutor | None, result: FetchResult, timezone: str
    ) -> ReadFeed:
        """Parse and normalize off the event loop: in a worker process, else a thread."""
        from clusterfeed.ingest.reading import read_feed

        spec = read_spec(self.config.feed(result.feed_name))
        if pool is not None:
            loop = asyncio.get_running_loop()
            try:
                return await loop.run_in_executor(
                    pool, read_feed, result, spec, timezone, self.clock()
                )
            except BrokenProcessPool as exc:
                # A worker died (out of memory, killed): parse here instead, and start a
                # fresh pool next cycle. The feed is not lost.
                log.warning("parsing process failed (%s); parsing in-process", exc)
                self._pool = None
        return await asyncio.to_thread(read_feed, result, spec, timezone, self.clock())

    def _poll(self, result: FetchResult, previous: FeedStatus | None, *, ok: bool) -> PollFacts:
        failures = 0 if ok else (previous.consecutive_failures if previous else 0) + 1
        decision = next_poll(
            now=self.clock(),
            interval=timedelta(minutes=self.config.schedule.fetch_interval_minutes),
            ok=ok,
            status=result.status,
            failures=failures,
            retry_after=result.retry_after,
            max_age=result.max_age,
        )
        return PollFacts(decision.state, decision.next_attempt, moved_to=result.moved_to)

    def ingest(
        self,
        result: FetchResult,
        previous: FeedStatus | None = None,
        read: ReadFeed | None = None,
    ) -> FeedOutcome:
        """Store one fetch result; any failure is recorded on the feed, never raised.

        ``read`` is the parsed and normalized content when it was prepared elsewhere
        (in a worker process); otherwise it is prepared here.
        """
        try:
            return self._ingest(result, previous, read)
        except SQLAlchemyError as exc:
            # The database refused (locked by another process past the busy timeout, gone,
            # full): the transaction rolled back, validators included, so the next cycle
            # fetches this feed in full and nothing is lost. The other feeds go on.
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            message = (
                f"fetched, but the database refused the write ({reason}); nothing of this "
                "feed was stored, the next cycle fetches it again"
            )
            log.error("feed %r: %s", result.feed_name, message)
            return FeedOutcome(result.feed_name, "failed", message=message)

    def _ingest_unchanged(
        self, answers: list[tuple[FetchResult, FeedStatus | None]]
    ) -> list[FeedOutcome]:
        """Record many 304 answers in one transaction (``ingest`` does the same for one)."""
        now = self.clock()
        rows = []
        for result, previous in answers:
            if result.moved_to:
                log.warning(
                    "feed %r moved to %s: update the config (clusterfeed uses the new "
                    "address meanwhile)",
                    result.feed_name,
                    result.moved_to,
                )
            poll = self._poll(result, previous, ok=True)
            rows.append((result.feed_name, result.status, result.etag, result.last_modified, poll))
        try:
            self.store.record_not_modified_many(rows, now)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            message = (
                f"not modified, but the database refused to record it ({reason}); the next "
                "cycle asks again"
            )
            log.error("%s: %s", plural(len(rows), "unchanged feed"), message)
            return [FeedOutcome(r.feed_name, "failed", message=message) for r, _ in answers]
        return [FeedOutcome(r.feed_name, "unchanged") for r, _ in answers]

    def _ingest(
        self, result: FetchResult, previous: FeedStatus | None, read: ReadFeed | None
    ) -> FeedOutcome:
        now = self.clock()
        name = result.feed_name
        if result.moved_to:
            log.warning(
                "feed %r moved to %s: update the config (clusterfeed uses the new address "
                "meanwhile)",
                name,
                result.moved_to,
            )
        note = self._address_notes.get(name)
        if result.error is not None:
            poll = self._poll(result, previous, ok=False)
            message = result.error
            if poll.state == "gone":
                message = (
                    f"{result.error}: the partner removed this feed, so clusterfeed stopped "
                    "asking for it; remove it from the config or give it a new url"
                )
            retry = None
            if result.refused and previous is not None and result.url != previous.url:
                # A remembered move or discovered feed that leads somewhere refused now
                # (its host's DNS changed): forget it, and ask the configured url.
                note = (
                    f"the remembered address {result.url} was dropped and the configured "
                    "url is used again"
                )
                self.store.forget_moves(
                    name,
                    moved_to=previous.moved_to == result.url,
                    discovered_url=previous.discovered_url == result.url,
                    warning=f"{note}: {message}",
                )
                retry = previous.url
                self._address_notes[name] = note
            if note:
                message = f"{message} ({note})"
            self.store.record_failure(name, status=result.status, error=message, now=now, poll=poll)
            log.warning("feed %r failed: %s", name, message)
            return FeedOutcome(name, "failed", message=message, use_url=retry)
        poll = self._poll(result, previous, ok=True)
        if result.not_modified or result.body is None:
            self.store.record_not_modified(
                name,
                status=result.status,
                etag=result.etag,
                last_modified=result.last_modified,
                now=now,
                poll=poll,
            )
            return FeedOutcome(name, "unchanged")
        feed_cfg = self.config.feed(name)
        if read is None:
            from clusterfeed.ingest.reading import read_feed

            read = read_feed(result, read_spec(feed_cfg), self.config.schedule.timezone, now)
        if read.error is not None:
            return self._not_a_feed(result, previous, feed_cfg.discover, read)
        rules = [self.config.filters.rules(), feed_cfg.filters.rules()]
        entries = [e for e in read.entries if keep(e, rules)]
        summary = self.store.apply_feed_update(
            name,
            entries,
            status=result.status,
            etag=result.etag,
            last_modified=result.last_modified,
            title=name,
            warning="; ".join(w for w in (note, read.warning) if w) or None,
            now=now,
            poll=poll,
        )
        if read.warning:
            log.warning("feed %r has problems but was read: %s", name, read.warning)
        return FeedOutcome(
            name,
            "new" if summary.new_entries or summary.updated_entries else "unchanged",
            summary.new_entries,
            summary.updated_entries,
            read.warning,
        )

    def _not_a_feed(
        self, result: FetchResult, previous: FeedStatus | None, discover: bool, read: ReadFeed
    ) -> FeedOutcome:
        """Record bytes that are no feed, pointing at the feeds an HTML page announces."""
        name = result.feed_name
        now = self.clock()
        links = read.announced_feeds
        message = read.error or "not a feed"
        use_url = None
        if links:
            message = f"{message}; the page announces: {', '.join(links)}"
            rule = self.address_rule(self.config.feed(name))
            allowed = [link for link in links if rule.url_problem(link) is None]
            if discover and not allowed:
                message += f" ({rule.url_problem(links[0])})"
            elif discover and (previous is None or previous.discovered_url != allowed[0]):
                use_url = allowed[0]
                message += f" (discover = true: using {use_url})"
            else:
                message += " (put one of them into the config as url, or set discover = true)"
        poll = self._poll(result, previous, ok=False)
        if use_url:
            poll = PollFacts("failing", now, moved_to=result.moved_to, discovered_url=use_url)
        self.store.record_failure(name, status=result.status, error=message, now=now, poll=poll)
        log.warning("feed %r failed: %s", name, message)
        return FeedOutcome(name, "failed", message=message, use_url=use_url)

    # -- publishing ---------------------------------------------------------------

    def feed_path(self) -> Path:
        """The main (Atom) feed in the output folder."""
        return self.config.publish.output_dir / self.config.publish.filename

    def publish(self, out_dir: Path | None = None) -> PublishReport:
        """Write every published file (feeds, topic and language feeds, archive, OPML).

        Into ``out_dir``, else ``publish.output_dir``. Each file is replaced atomically
        and only when its bytes change; a complete archive page is left as it is (see
        ``feedset.KeepIf``). The main feed is written last, after the pages it links to.
        """
        cfg = self.config
        if cfg.publish.filename in RESERVED_NAMES:
            raise ConfigError(
                [
                    Problem(
                        cfg.source,
                        "publish.filename",
                        f"{cfg.publish.filename!r} is the name of another published file; "
                        'use a name such as "feed.atom"',
                    )
                ]
            )
        folder = out_dir if out_dir is not None else cfg.publish.output_dir
        stories = reading_order(self.store.recent_stories())
        site = SiteMeta(
            title=cfg.feed_title,
            feed_url=cfg.feed_url,
            main_filename=cfg.publish.filename,
            site_url=cfg.cluster.url,
            author=cfg.cluster.name,
            subtitle=cfg.publish.subtitle,
            logo_url=cfg.cluster.logo_url,
            hub=cfg.publish.websub_hub,
        )
        sources = [
            SourceFeed(
                name=f.name, title=f.name, url=f.url if f.is_remote else None, site_url=f.site
            )
            for f in cfg.feeds
            if f.enabled
        ]
        # Dated by the newest story, not the clock, so an unchanged list keeps its bytes.
        opml = export_opml(cfg, newest_update(stories)).data
        planned = plan_files(
            stories,
            site,
            max_entries=cfg.publish.max_entries,
            archive_size=cfg.publish.archive_size,
            sources=sources,
            opml=opml,
        )
        # The web page for people comes first: the main feed is still written last.
        env = site_environment(template_dir(cfg), default_template_dir())
        pages = [
            PlannedFile(path, render)
            for path, render in site_pages(env, cfg, stories, cfg.publish.max_entries)
        ]
        planned = self._digest_files(env) + pages + planned
        report = self._write_files(folder, planned)
        report.removed = remove_stale(folder, [f.path for f in planned])
        return report

    def _write_files(self, folder: Path, planned: list[PlannedFile]) -> PublishReport:
        report = PublishReport(folder)
        for file in planned:
            target = folder / file.path
            if file.keep_if is not None and _already_holds(target, file.keep_if):
                report.unchanged.append(target)
            elif write_atomic(target, file.render()):
                log.debug("wrote %s", target)
                report.written.append(target)
            else:
                report.unchanged.append(target)
        return report

    def _digest_files(self, env: jinja2.Environment) -> list[PlannedFile]:
        """The web version of every sent digest, then ``digests/index.html``.

        A page already in the folder is left as it is (it shows the digest as it went
        out), so only a new digest, or a new folder, costs loading its stories.
        """
        cfg = self.config
        pages = digest_pages(
            ((d.id, d.slot) for d in self.store.sent_digests()), cfg.schedule.timezone
        )

        def page_renderer(page: DigestPage) -> Callable[[], bytes]:
            def render() -> bytes:
                ids = self.store.digest_story_ids(page.digest_id)
                return render_digest_page(env, cfg, page, self.store.recent_stories(only_ids=ids))

            return render

        files = [PlannedFile(p.path, page_renderer(p), KeepExisting()) for p in pages]
        index = PlannedFile(
            f"{DIGESTS_DIR}/index.html", lambda: render_digest_index(env, cfg, pages)
        )
        return [*files, index]

    def write_digest_pages(self) -> PublishReport:
        """Write the web versions of sent digests (and their index) into the output folder.

        Called as soon as a digest is recorded, before its mails go out, so the "View in
        browser" link works from the first mail on rather than from the next publish.
        """
        env = site_environment(template_dir(self.config), default_template_dir())
        return self._write_files(self.config.publish.output_dir, self._digest_files(env))

    def digest_page(self, digest_id: int) -> DigestPage | None:
        """The web version of a sent digest (named once, then remembered)."""
        if digest_id not in self._digest_pages:
            pages = digest_pages(
                ((d.id, d.slot) for d in self.store.sent_digests()),
                self.config.schedule.timezone,
            )
            self._digest_pages.update((p.digest_id, p) for p in pages)
        return self._digest_pages.get(digest_id)

    async def notify_hub(self, report: PublishReport) -> list[str]:
        """Tell the WebSub hub which feeds changed, so subscribers hear at once.

        One POST (hub.mode=publish) naming every changed feed's public URL, after the
        files are in place; archive pages and the web page are not feeds to push. A
        hub that does not answer is logged and the next change tries again: readers
        still poll, so nothing is lost.
        """
        hub = self.config.publish.websub_hub
        if not hub or not report.written:
            return []
        import httpx

        urls = []
        for path in report.written:
            relative = path.relative_to(report.folder).as_posix()
            if path.suffix in (".atom", ".rss", ".json") and not relative.startswith("archive/"):
                urls.append(urljoin(self.config.feed_url, relative))
        if not urls:
            return []
        data = {"hub.mode": "publish", "hub.url": urls}  # a list: one hub.url per feed
        try:
            async with httpx.AsyncClient(
                timeout=20, headers={"User-Agent": self.config.user_agent}
            ) as client:
                response = await client.post(hub, data=data)
            if response.status_code >= 300:
                log.warning("WebSub hub %s answered %s", hub, response.status_code)
                return []
        except httpx.HTTPError as exc:
            log.warning("WebSub hub %s not reached: %s", hub, exc)
            return []
        return urls

    # -- digests ------------------------------------------------------------------

    def secret(self) -> str:
        return os.environ.get(self.config.web.secret_env) or self.store.secret()

    def suppression_key(self) -> str:
        """The key of the suppression list, fixed when it is first needed (see
        ``tokens.suppression_key``)."""
        return self.store.setting_or_create(
            "suppression_key", lambda: suppression_key(self.secret())
        )

    def links_for(
        self, subscriber: Subscriber, page: DigestPage | None = None, *, secret: str | None = None
    ) -> DigestLinks:
        base = self.config.web.base_url.rstrip("/")
        assert subscriber.id is not None
        token = make_token(secret or self.secret(), UNSUBSCRIBE, subscriber.id, subscriber.email)
        return DigestLinks(
            unsubscribe_url=f"{base}/unsubscribe/{token}",
            preferences_url=f"{base}/preferences/{token}",
            feed_url=self.config.feed_url,
            site_url=self.config.cluster.url,
            web_url=digest_page_url(self.config, page) if page is not None else None,
        )

    def _candidates(self, now: datetime) -> list[Story]:
        """The stories a digest built now may hold: those seen within the lookback."""
        return self.store.recent_stories(
            since=now - timedelta(days=self.config.digest.lookback_days)
        )

    def _plan(
        self, facts: OutboxFacts, candidates: list[Story], now: datetime
    ) -> list[PlannedDigest]:
        cfg = self.config.digest
        return plan_deliveries(
            facts,
            candidates,
            now,
            max_stories=cfg.max_stories,
            send_when_empty=cfg.send_when_empty,
            carry_over=cfg.carry_over,
        )

    def _offered_since(self, now: datetime) -> datetime:
        """Digests older than the lookback cannot have left out a story that may go
        into a digest built now (see ``Store.build_digest``)."""
        return now - timedelta(days=self.config.digest.lookback_days)

    def plan_digest(self, now: datetime) -> list[tuple[Subscriber, list[Story]]]:
        """Who gets which stories if a digest were built now (nothing is written)."""
        candidates = self._candidates(now)
        facts = self.store.outbox_facts(
            (s.id for s in candidates), offered_since=self._offered_since(now)
        )
        return [(p.subscriber, p.stories) for p in self._plan(facts, candidates, now)]

    def create_digest(self, key: str, slot: datetime) -> tuple[bool, int]:
        """Record the digest ``key`` and its outbox rows; (created, deliveries).

        The stories are loaded first; who already had which of them is decided inside
        the store's transaction that writes the rows (``Store.build_digest``), so runs
        started together never plan the same stories for one subscriber twice.
        """
        if self.store.digest_exists(key):
            return False, 0
        now = self.clock()
        candidates = self._candidates(now)
        from_address = self.config.digest.from_address

        def decide(facts: OutboxFacts) -> list[PlannedDelivery]:
            rows: list[tuple[Any, PlannedDelivery]] = []
            for subscriber, stories, left_out in self._plan(facts, candidates, now):
                assert subscriber.id is not None
                ids = [s.id for s in stories]
                mid = message_id(key, subscriber.id, from_address)
                # Outbox rows are claimed in the order they are written: subscribers
                # whose mails render alike (the same stories in the same sections, as
                # many left out) follow each other, so a sending run renders each once
                # and keeps only the last few rendered (see ``DigestComposer``).
                alike = (
                    ids,
                    section_key(self.config, subscriber, stories),
                    len(left_out),
                    bool(subscriber.name),
                )
                rows.append((alike, PlannedDelivery(subscriber, ids, mid, left_out)))
            rows.sort(key=lambda pair: pair[0])
            return [row for _alike, row in rows]

        written = self.store.build_digest(
            key,
            slot,
            now,
            [s.id for s in candidates],
            decide,
            offered_since=self._offered_since(now),
        )
        if written is None:
            return False, 0
        if written:
            try:
                self.write_digest_pages()
            except (OSError, jinja2.TemplateError) as exc:
                # The mails still go out; the next publish writes the page.
                log.error(
                    "could not write the web version of digest %s into %s: %s",
                    key, self.config.publish.output_dir,
                    describe(exc) if isinstance(exc, jinja2.TemplateError) else exc,
                )  # fmt: skip
        return True, written

    def digest_environment(self) -> jinja2.Environment:
        """The digest templates, compiled once per service, not once per message
        (compiling took four fifths of a message's rendering time). jinja2 still
        notices an edited template file and compiles it again."""
        if self._digest_env is None:
            self._digest_env = make_environment(template_dir(self.config))
        return self._digest_env

    def compose(self, delivery: Delivery) -> EmailMessage:
        """Render one outbox row into the message the subscriber receives."""
        env = self.digest_environment()
        stories = self._stories(delivery.story_ids)
        links = self.links_for(delivery.subscriber, self.digest_page(delivery.digest_id))
        rendered = render_digest(
            env,
            self.config,
            delivery.subscriber,
            stories,
            slot=delivery.digest_slot,
            links=links,
            more=len(delivery.left_out),
        )
        return build_message(
            self.config,
            rendered,
            to=delivery.subscriber,
            message_id=delivery.message_id,
            slot=delivery.digest_slot,
            links=links,
        )

    def compose_prepared(self, delivery: Delivery) -> Prepared:
        """The same message as ``compose``, as wire bytes, rendering each story list of
        a sending run once (see ``DigestComposer``) and building no EmailMessage."""
        if self._composer is None:
            self._composer = DigestComposer(self.digest_environment(), self.config)
        if self._run_secret is None:
            self._run_secret = self.secret()  # one read per run, not one per message
        links = self.links_for(
            delivery.subscriber, self.digest_page(delivery.digest_id), secret=self._run_secret
        )
        stories = self._stories(delivery.story_ids)
        try:
            sender, recipient, data = self._composer.compose(
                delivery.subscriber,
                stories,
                slot=delivery.digest_slot,
                links=links,
                message_id=delivery.message_id,
                more=len(delivery.left_out),
            )
        except Exception as exc:
            if template_location(exc) is None:
                raise  # not the template's: a bug of ours, with its traceback
            raise TemplateProblem([describe(exc)]) from exc
        return Prepared(sender, (recipient,), data)

    def _stories(self, ids: Sequence[int]) -> list[Story]:
        """The stories of one message, in its order; loaded once per sending run, since
        thousands of digests share the same few dozen stories."""
        with self._story_lock:
            missing = [i for i in ids if i not in self._story_cache]
        if missing:
            loaded = self.store.recent_stories(only_ids=missing)
            with self._story_lock:
                if len(self._story_cache) + len(loaded) > STORY_CACHE_SIZE:
                    self._story_cache.clear()
                self._story_cache.update((s.id, s) for s in loaded if s.id is not None)
                found = {s.id: s for s in loaded}
        else:
            found = {}
        with self._story_lock:
            cache = self._story_cache
            return [s for i in ids if (s := cache.get(i) or found.get(i)) is not None]

    def preview(self, email: str | None = None) -> tuple[Subscriber, str]:
        """Whose digest ``digest --preview`` shows, and its HTML, as they would get it now.

        The subscriber named by ``email``, else the first who has something new; with
        nobody to show, a sample of recent stories for a made-up reader. Raises
        LookupError for an address that is not a subscriber.
        """
        env = make_environment(template_dir(self.config))
        now = self.clock()
        plan = self.plan_digest(now)
        if email is not None:
            membership = self.store.membership(email=email)
            if membership is None:
                raise LookupError(email)
            subscriber = membership.subscriber
            stories = next((st for sub, st in plan if sub.id == subscriber.id), [])
        elif plan:
            subscriber, stories = plan[0]
        else:
            subscriber = Subscriber(email="preview@example.org", name="Preview", id=0)
            stories = self.store.recent_stories(limit=self.config.digest.max_stories)
        rendered = render_digest(
            env, self.config, subscriber, stories, slot=now, links=self.links_for(subscriber)
        )
        return subscriber, rendered.html

    async def send_pending(
        self,
        transport: Transport | None = None,
        on_progress: Callable[[Delivery, str], None] | None = None,
        *,
        batches: int | None = None,
    ) -> SendReport:
        """Send every due delivery (or at most ``batches`` claimed batches of them).

        Messages are composed in this process, each story list rendered once; only
        templates that need a full rendering per message are rendered in worker
        processes for a large outbox, so that CPU-bound rendering runs beside the
        sending instead of taking turns with it on one core."""
        # Before anything is claimed: a template the operator broke stops the run with
        # a sentence and costs no delivery an attempt.
        require_digest_templates(self.config)
        with self._story_lock:
            self._story_cache.clear()  # stories may have changed since the last run
        self._composer, self._run_secret = None, None  # and templates and the secret
        transport = transport or self.transport()
        due = self.store.count_due(self.clock())
        if batches is not None:  # a task's batch: too few messages to start processes for
            due = min(due, batches * CLAIM_BATCH)
        workers = self._render_processes(due)
        pool = None

        async def compose_here(delivery: Delivery) -> Outgoing:
            # In the event loop: composing costs a fraction of a millisecond now, less
            # than handing each message to a thread and back.
            return self.compose_prepared(delivery)

        render: Callable[[Delivery], Awaitable[Outgoing]] = compose_here

        if workers:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["clusterfeed.app.service"])
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=context,
                initializer=start_worker,
                initargs=(lifeline(), _start_renderer, self.config),
            )
            loop = asyncio.get_running_loop()

            def in_worker(delivery: Delivery) -> Awaitable[Outgoing]:
                return loop.run_in_executor(pool, _render_in_worker, delivery)

            render = in_worker

        try:
            return await deliver_pending(
                self.store,
                transport,
                self.compose_prepared,
                clock=self.clock,
                render=render,
                ahead=4 * workers if workers else 2,
                policy=RetryPolicy.from_config(self.config.mail),
                bounce_after=self.config.mail.bounce_after,
                on_progress=on_progress,
                batches=batches,
            )
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

    def _render_processes(self, due: int) -> int:
        if due < self.render_threshold:
            return 0
        if can_share_renderings(self.digest_environment(), self.config):
            # Measured on 10,000 digests: about 0.3 ms a message in the sending process
            # against 0.9 ms in workers (pickling, a rendering per story list in each
            # worker, start-up) plus more hand-over work in the sender.
            return 0
        return max(1, os.cpu_count() or 1)

    def transport(self) -> Transport:
        """The configured transport, DKIM signer and rate limit included."""
        return make_transport(self.config.mail, self.config.source)

    # -- operator alerts ------------------------------------------------------------

    async def send_alerts(self, transport: Transport | None = None) -> list[Alert]:
        """Mail the operator about feeds in trouble, once per incident; the alerts sent."""
        cfg = self.config.alerts
        if cfg.email is None:
            return []
        now = self.clock()
        pending = [
            a
            for a in feed_alerts(
                [s for s in self.store.feed_statuses(now) if s.name in self._enabled_feeds()],
                now,
                failing_for=timedelta(hours=cfg.failing_hours),
                silent_for=timedelta(days=cfg.silent_days),
            )
            if not self.store.alert_recorded(a.feed_name, a.incident)
        ]
        if not pending:
            return []
        transport = transport or self.transport()
        sent = []
        try:
            for alert in pending:
                message = alert_message(
                    alert,
                    sender=self.config.digest.from_address,
                    to=cfg.email,
                    cluster_name=self.config.cluster.name,
                    now=now,
                )
                try:
                    await transport.send(message, alert_key(alert), 0)
                except (TemporaryFailure, PermanentFailure) as exc:
                    # Not recorded, so the next cycle tries again.
                    log.error(
                        "could not mail the alert %r to %s: %s", alert.subject, cfg.email, exc
                    )
                    continue
                # Recorded after sending: a crash in between repeats one alert mail,
                # which is better than losing it.
                self.store.record_alert(alert.feed_name, alert.incident, alert.subject, now)
                log.warning("alert sent to %s: %s", cfg.email, alert.subject)
                sent.append(alert)
        finally:
            await transport.close()
        return sent

    def _enabled_feeds(self) -> set[str]:
        return {f.name for f in self.config.feeds if f.enabled}


def _already_holds(path: Path, keep_if: KeepIf | KeepExisting) -> bool:
    if isinstance(keep_if, KeepExisting):
        return path.is_file()  # one stat per sent digest and publish, no reading
    try:
        return keep_if.matches(path.read_bytes())
    except FileNotFoundError:
        return False


# -- rendering in worker processes ----------------------------------------------------

_RENDERER: Service | None = None


def _start_renderer(config: Config) -> None:
    """A worker's own service and store connection; it only reads."""
    global _RENDERER
    _RENDERER = Service(config, Store(config.database_url))


def _render_in_worker(delivery: Delivery) -> Prepared:
    assert _RENDERER is not None
    return _RENDERER.compose_prepared(delivery)
