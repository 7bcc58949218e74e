"""The ``clusterfeed`` command: thin wrappers that parse, call the service, print.

Every command takes ``--config`` (or $CLUSTERFEED_CONFIG). Errors an operator can fix
(a bad config, an unreachable database) are printed as plain sentences with exit code
2; a traceback means a bug in clusterfeed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import jinja2
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from clusterfeed import __version__
from clusterfeed.app import units
from clusterfeed.app.commands import upgrade_schema
from clusterfeed.app.health import Alert
from clusterfeed.app.scaffold import init_command
from clusterfeed.app.sequences import FetchReport, cycle, digest_run, fetch_and_match
from clusterfeed.app.service import FeedOutcome, PublishReport, Service, adhoc_digest_key
from clusterfeed.config import (
    CONFIG_ENV,
    Config,
    ConfigError,
    advice,
    all_subscribers,
    load_config,
)
from clusterfeed.delivery.outbox import SendReport
from clusterfeed.delivery.transports import PermanentFailure, SetupFailure, TemporaryFailure
from clusterfeed.digest.templatecheck import TemplateProblem, describe, template_problems
from clusterfeed.ingest.netguard import fetch_warnings
from clusterfeed.model import FeedStatus, Story
from clusterfeed.retired import retired_story_settings
from clusterfeed.store import Delivery, Store, StoreError
from clusterfeed.words import plural

F = TypeVar("F", bound=Callable[..., Any])

err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def _interactive() -> bool:
    return sys.stderr.isatty()


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if _interactive():
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=err, show_path=False)
        fmt = "%(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler tells at INFO how it adds and starts jobs ("Adding job tentatively");
    # our own lines say what runs when, so only its warnings and errors are shown.
    # Alembic tells each schema step; the store says in one line from which version to which.
    for noisy in ("httpx", "httpcore", "apscheduler", "aiosmtplib", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def config_option(func: F) -> F:
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=CONFIG_ENV,
        default=None,
        help=f"Config file (default: ${CONFIG_ENV}, else config/clusterfeed.toml).",
    )(func)


def _fail(lines: list[str], code: int = 2) -> None:
    for line in lines:
        err.print(line, markup=False)
    sys.exit(code)


@contextmanager
def _service(config_path: Path | None) -> Iterator[Service]:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(
            [f"error: {p}" for p in exc.problems]
            + [f"{plural(len(exc.problems), 'problem')} in the config."]
        )
    store = Store(config.database_url)
    service = Service(config, store)
    try:
        service.prepare()
        yield service
    except StoreError as exc:
        _fail([f"error: {exc}"])
    except ConfigError as exc:
        _fail([f"error: {p}" for p in exc.problems])
    finally:
        service.close()
        store.close()


def _warn_about_mail_settings(config: Config) -> None:
    """What ``check`` warns about, said again where digests go out."""
    for warning in advice(config):
        logging.getLogger("clusterfeed").warning("%s (%s)", warning, config.source)


def _handle_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except StoreError as exc:
            _fail([f"error: {exc}"])
        except TemplateProblem as exc:
            # Raised before anything is claimed, or with the claims given back uncounted.
            _fail(
                [f"error: {p}" for p in exc.problems]
                + ["A template cannot be rendered; nothing was sent and no delivery "
                   "attempt was counted. Fix the template (`clusterfeed check` tests them "
                   "all) and run again."]
            )  # fmt: skip
        except jinja2.TemplateError as exc:
            _fail([f"error: {describe(exc)}", "Fix the template and run again."])
        except SetupFailure as exc:
            # Nothing was failed: the deliveries wait for the next run.
            _fail([f"error: {exc}", "Nothing was marked failed; fix this and run again."])
        except KeyboardInterrupt:
            _fail(["interrupted"], 130)

    return wrapper  # type: ignore[return-value]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="clusterfeed")
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
def main(verbose: bool) -> None:
    """Merge a cluster's partner news into combined feeds and a mailed digest."""
    _setup_logging(verbose)


main.add_command(init_command)


@main.command()
@config_option
def check(config_path: Path | None) -> None:
    """Validate the config and render every template; exit non-zero listing every problem."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(
            [f"error: {p}" for p in exc.problems]
            + [f"{plural(len(exc.problems), 'problem')} in the config."],
            1,
        )
    problems = template_problems(config)
    if problems:
        _fail(
            [f"error: {p}" for p in problems]
            + [f"{plural(len(problems), 'problem')} in the templates (every template is rendered "
               "with sample data; fix these before the next digest)."],
            1,
        )  # fmt: skip
    subs = all_subscribers(config)
    out.print(f"{config.source}: OK", markup=False)
    for warning in advice(config):
        out.print(f"warning: {warning}", markup=False)
    for warning in fetch_warnings((f.name, f.url) for f in config.feeds if f.enabled):
        out.print(f"warning: {warning}", markup=False)
    for warning in retired_story_settings(config.stories):
        out.print(f"warning: {warning} ({config.source})", markup=False)
    out.print(
        f"  {plural(len(config.feeds), 'feed')}, {plural(len(subs), 'subscriber')}, "
        f"digest '{config.schedule.digest_cron}' ({config.schedule.timezone}), "
        f"mail via {config.mail.transport}, store {config.database_url.split('://')[0]}",
        markup=False,
    )


@main.command()
@config_option
@_handle_errors
def migrate(config_path: Path | None) -> None:
    """Bring the database's schema up to this version of clusterfeed, and say from which
    version to which (every command and `run` do this on their own at start-up)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(
            [f"error: {p}" for p in exc.problems]
            + [f"{plural(len(exc.problems), 'problem')} in the config."]
        )
    change, address = upgrade_schema(config.database_url)
    where = f"database {address}"
    if change.created:
        said = f"{where}: created the schema at version {change.after}"
    elif change.changed:
        said = f"{where}: upgraded the schema from version {change.before} to {change.after}"
    else:
        said = f"{where}: the schema is at version {change.after} already; nothing to do"
    out.print(said, markup=False)


def _fetch_with_progress(service: Service) -> FetchReport:
    """``fetch``: the fetch-and-match sequence, with a progress bar on a terminal."""
    with _progress(service) as (on_feed, _on_sent):
        return asyncio.run(fetch_and_match(service, on_feed=on_feed))


FeedCallback = Callable[[FeedOutcome], None]
SendCallback = Callable[[Delivery, str], None]


def _log_feed(o: FeedOutcome) -> None:
    logging.getLogger("clusterfeed.fetch").info(
        "%s: %s%s",
        o.name,
        o.state,
        f" ({o.new_entries} new, {o.updated_entries} updated)"
        if o.state == "new"
        else (f" – {o.message}" if o.message else ""),
    )


def _log_delivery(d: Delivery, outcome: str) -> None:
    logging.getLogger("clusterfeed.mail").info("%s: %s", d.subscriber.email, outcome)


@contextmanager
def _progress(service: Service) -> Iterator[tuple[FeedCallback, SendCallback]]:
    """Callbacks for each fetched feed and each delivery: progress bars on a terminal
    (one live display for both, as rich allows only one), else a log line each."""
    if not _interactive():
        yield _log_feed, _log_delivery
        return
    with Progress(
        TextColumn("{task.fields[verb]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=err,
        transient=True,
    ) as progress:
        feeds = sum(1 for f in service.config.feeds if f.enabled)
        fetching = progress.add_task("", total=feeds, verb="fetching", visible=False)
        sending = progress.add_task(
            "", total=service.queries.count_due(service.clock()), verb="sending", visible=False
        )

        def advance(o: FeedOutcome) -> None:
            progress.update(fetching, advance=1, description=o.name, visible=True)

        def sent(d: Delivery, outcome: str) -> None:
            task = progress.tasks[sending]
            if task.completed >= (task.total or 0):  # a digest planned after the first pass
                progress.update(sending, total=task.completed + 1)
            progress.update(sending, advance=1, visible=True)

        yield advance, sent


def _print_outcomes(outcomes: list[FeedOutcome]) -> None:
    new = sum(o.new_entries for o in outcomes)
    failed = [o for o in outcomes if o.state == "failed"]
    out.print(
        f"fetched {plural(len(outcomes), 'feed')}: {plural(new, 'new item')}, {len(failed)} failed",
        markup=False,
    )
    for o in failed:
        out.print(f"  FAILED {o.name}: {o.message}", markup=False)
    for o in outcomes:
        if o.state != "failed" and o.message:
            out.print(f"  warning {o.name}: {o.message}", markup=False)


@main.command()
@config_option
@_handle_errors
def fetch(config_path: Path | None) -> None:
    """Fetch every feed once and store new items."""
    with _service(config_path) as service:
        report = _fetch_with_progress(service)
        _print_outcomes(report.feeds)
        _print_alerts(report.alerts, service)


@main.command()
@config_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write the files to this folder (default: publish.output_dir).",
)
@_handle_errors
def publish(config_path: Path | None, out_dir: Path | None) -> None:
    """Write the feeds (Atom, RSS, JSON Feed; per topic and language), archive and OPML."""
    with _service(config_path) as service:
        try:
            report = asyncio.run(units.publish(service, out_dir))
        except OSError as exc:
            _fail([f"error: {exc.filename or out_dir}: cannot write ({exc.strerror or exc})"])
        _print_publish(report, report.folder / service.config.publish.filename)


def _print_publish(report: PublishReport, main_feed: Path, *, in_cycle: bool = False) -> None:
    """The main feed's fate (the line scripts look for), then every file's in numbers."""
    written = main_feed in report.written
    if in_cycle:
        out.print(f"feed {'written' if written else 'unchanged'}: {main_feed}", markup=False)
    else:
        out.print(f"{'wrote' if written else 'unchanged'}: {main_feed}", markup=False)
    out.print(
        f"published {report.folder}: {plural(len(report.written), 'file')} written, "
        f"{len(report.unchanged)} unchanged"
        + (f", {len(report.removed)} removed" if report.removed else ""),
        markup=False,
    )


def _file_name_not_option(
    ctx: click.Context, param: click.Parameter, value: Path | None
) -> Path | None:
    """``--preview --config X`` took "--config" as the file name: say what is missing."""
    if value is not None and str(value).startswith("-"):
        raise click.BadParameter(
            f"needs the name of a file to write the HTML to, such as "
            f"--preview digest.html; {str(value)!r} is an option, not a file name",
            ctx=ctx,
            param=param,
        )
    return value


@main.command()
@config_option
@click.option(
    "--preview",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_file_name_not_option,
    metavar="FILE",
    help="Write the HTML a subscriber would get to this file; send nothing.",
)
@click.option(
    "--subscriber",
    "preview_for",
    metavar="EMAIL",
    help="With --preview: whose digest to show (default: the first with something new).",
)
@click.option("--dry-run", is_flag=True, help="Show who would get how many stories; send nothing.")
@_handle_errors
def digest(
    config_path: Path | None, preview: Path | None, preview_for: str | None, dry_run: bool
) -> None:
    """Send the digest now to every subscriber who has something new."""
    if preview_for is not None and preview is None:
        _fail(["error: --subscriber chooses whose digest --preview FILE shows; add --preview FILE"])
    with _service(config_path) as service:
        _warn_about_mail_settings(service.config)
        if preview is not None:
            try:
                subscriber, html = service.preview(preview_for)
            except LookupError:
                _fail(
                    [
                        f"error: {preview_for} is not a subscriber; "
                        "`clusterfeed subscribers list` shows who is"
                    ]
                )
            preview.write_text(html, encoding="utf-8")
            whose = (
                f"the digest for {subscriber.email}"
                if subscriber.id
                else "a sample digest (nobody has new stories now)"
            )
            out.print(f"preview of {whose}: {preview}", markup=False)
            return
        if dry_run:
            plan = service.plan_digest(service.clock())
            for subscriber, stories in plan:
                out.print(f"{subscriber.email}: {plural(len(stories), 'story')}", markup=False)
            out.print(
                f"{plural(len(plan), 'subscriber')} would get a digest (dry run, nothing sent)",
                markup=False,
            )
            return
        now = service.clock()
        with _progress(service) as (_on_feed, on_progress):
            run = asyncio.run(
                digest_run(service, adhoc_digest_key("manual", now), now, on_progress)
            )
        report = run.send
        # Count what the first pass delivered too: a message deferred last time and
        # sent now was reported as "0 sent". Deferred is what is still waiting for a
        # retry, from this run or an earlier one.
        waiting = service.queries.delivery_counts().get("pending", 0)
        report.retry = waiting
        out.print(
            f"digest: {run.planned} planned, {run.sent} sent, "
            f"{waiting} deferred, {run.failed} failed"
            + (
                f" (mail in {service.config.mail.maildir}/new)"
                if service.config.mail.transport == "maildir"
                else ""
            ),
            markup=False,
        )
        _print_delivery_notes(service, report)


def _print_delivery_notes(service: Service, report: SendReport) -> None:
    """What the operator must know after sending: when deferred mail is tried again,
    and which addresses were just marked bouncing."""
    if report.retry:
        when = service.queries.next_retry_at()
        out.print(
            f"deferred deliveries are tried again from {_when(when, 'now')} "
            "(by `clusterfeed run`, or the next `clusterfeed digest`)",
            markup=False,
        )
    # Rows still being sent once this run is done belong to a run started elsewhere
    # (claims of a run that died were taken over when this one started).
    elsewhere = service.queries.delivery_counts().get("sending", 0)
    if elsewhere:
        out.print(
            f"{elsewhere} {'message is' if elsewhere == 1 else 'messages are'} being sent "
            "by another run (a `clusterfeed digest` or `clusterfeed run` started at the "
            "same time); it records them, and nobody gets them twice",
            markup=False,
        )
    for email in report.bouncing or []:
        out.print(
            f"{email} is now bouncing: later digests skip it until "
            f"`clusterfeed bounces clear {email}`",
            markup=False,
        )


@main.command()
@config_option
@click.option("--host", default=None, help="Address to listen on (default: web.host).")
@click.option("--port", type=int, default=None, help="Port to listen on (default: web.port).")
@_handle_errors
def serve(config_path: Path | None, host: str | None, port: int | None) -> None:
    """Serve the published feeds, /healthz and /metrics over HTTP."""
    from clusterfeed.web.server import make_server

    with _service(config_path) as service:
        server = make_server(service, host, port)
        cfg = server.config
        err.print(f"serving {service.config.publish.output_dir} on http://{cfg.host}:{cfg.port}/",
                  markup=False)  # fmt: skip
        asyncio.run(server.serve())


@main.command()
@config_option
@click.option("--once", is_flag=True, help="Run one full cycle (fetch, publish, digest) and exit.")
@click.option(
    "--serve",
    "with_web",
    is_flag=True,
    help="Also serve the feeds over HTTP (web.host, web.port) in the same process.",
)
@click.option("--host", default=None, help="With --serve: address to listen on (not web.host).")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=None, help="With --serve: port (not web.port)."
)
@_handle_errors
def run(
    config_path: Path | None, once: bool, with_web: bool, host: str | None, port: int | None
) -> None:
    """Start the scheduler (or run one cycle with --once)."""
    if (host is not None or port is not None) and (once or not with_web):
        _fail(["error: --host and --port are for the web server of `run --serve` "
               "(not with --once); add --serve or leave them out."])  # fmt: skip
    with _service(config_path) as service:
        _warn_about_mail_settings(service.config)
        if not once:
            asyncio.run(_run_service(service, with_web, host, port))
            return
        with _progress(service) as (on_feed, on_progress):
            done = asyncio.run(
                cycle(service, with_digest=True, on_feed=on_feed, on_progress=on_progress)
            )
        _print_outcomes(done.feeds)
        _print_alerts(done.fetched.alerts, service)
        _print_publish(done.publish, service.feed_path(), in_cycle=True)
        assert done.digest is not None
        planned = done.digest.planned
        report = done.digest.send
        report.sent = done.digest.sent
        report.failed = done.digest.failed
        where = (
            f"{service.config.mail.maildir / 'new'}"
            if service.config.mail.transport == "maildir"
            else f"{service.config.mail.host}"
        )
        out.print(
            f"digest: {report.sent} sent of {planned} planned"
            + (f", {report.failed} failed" if report.failed else "")
            + (f", {report.retry} deferred" if report.retry else "")
            + f" → {where}",
            markup=False,
        )
        _print_delivery_notes(service, report)


@main.command()
@config_option
@click.option(
    "--concurrency",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Tasks this worker runs at once.",
)
@_handle_errors
def worker(config_path: Path | None, concurrency: int) -> None:
    """Run the queued units (fetch, match, publish, plan, deliver); PostgreSQL only."""
    from clusterfeed.app.workers import NeedsPostgres, conninfo, run_worker

    with _service(config_path) as service:
        try:
            conninfo(service.config.database_url)
            asyncio.run(run_worker(service, concurrency))
        except NeedsPostgres as exc:
            _fail([f"error: {exc} ({service.config.source})"])


@main.command()
@config_option
@_handle_errors
def scheduler(config_path: Path | None) -> None:
    """Queue the units for the workers when due (one scheduler per store); PostgreSQL only."""
    from clusterfeed.app.workers import NeedsPostgres, conninfo, run_scheduler

    with _service(config_path) as service:
        try:
            conninfo(service.config.database_url)
            asyncio.run(run_scheduler(service))
        except NeedsPostgres as exc:
            _fail([f"error: {exc} ({service.config.source})"])


async def _run_service(
    service: Service, with_web: bool, host: str | None = None, port: int | None = None
) -> None:
    """The scheduler, and the web server beside it when asked; a stop ends both.

    ``host``/``port`` override web.host/web.port: a container listens on 0.0.0.0
    whatever the mounted config says, since its port is only reachable that way.
    """
    from clusterfeed.app.schedule import run_forever

    if not with_web:
        await run_forever(service)
        return
    from clusterfeed.web.server import make_server

    server = make_server(service, host, port)
    server.config.install_signal_handlers = False  # the scheduler owns SIGTERM/SIGINT
    logging.getLogger("clusterfeed.web").info(
        "serving on http://%s:%d/", server.config.host, server.config.port
    )
    web = asyncio.ensure_future(server.serve())
    try:
        await run_forever(service)
    finally:
        server.should_exit = True
        await web


def _print_alerts(alerts: list[Alert], service: Service) -> None:
    for alert in alerts:
        out.print(f"alert mailed to {service.config.alerts.email}: {alert.subject}", markup=False)


def _when(value: datetime | None, missing: str = "never") -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else missing


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def http_cell(s: FeedStatus) -> str:
    """The HTTP column of ``status``: what the server said to the last attempt.

    A file is read, not asked, so it has no status; a web feed whose last attempt got
    no answer at all (connection refused, timeout) shows "–", whatever an earlier
    attempt got. Deciding by the last success instead called such a feed "file".
    """
    if not s.fetch_url.startswith(("http://", "https://")):
        return "file"
    return str(s.last_status) if s.last_status else "–"


def _status_json(s: FeedStatus) -> dict[str, object]:
    """One feed for ``status --json``; the field names are a stable interface for scripts."""
    return {
        "name": s.name,
        "url": s.url,
        "fetch_url": s.fetch_url,
        "state": s.state,
        "last_attempt": _iso(s.last_attempt_at),
        "last_success": _iso(s.last_success_at),
        "http_status": s.last_status,
        "consecutive_errors": s.consecutive_failures,
        "failing_since": _iso(s.failing_since),
        "next_attempt": _iso(s.next_attempt_at),
        "moved_to": s.moved_to,
        "discovered_url": s.discovered_url,
        "items": s.entries,
        "items_last_30_days": s.entries_30_days,
        "newest_item": _iso(s.newest_entry_at),
        "last_error": s.last_error,
        "warning": s.last_warning,
    }


@main.command()
@config_option
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object per feed instead of a table."
)
@click.option(
    "--max-age",
    type=click.IntRange(min=1),
    default=None,
    help="Exit 1 unless some feed was fetched successfully within this many minutes "
    "(for container health checks).",
)
@_handle_errors
def status(config_path: Path | None, as_json: bool, max_age: int | None) -> None:
    """Show each feed's last fetch, HTTP status, items and errors."""
    with _service(config_path) as service:
        if max_age is not None:
            latest = max(
                (s.last_success_at for s in service.queries.feed_statuses() if s.last_success_at),
                default=None,
            )
            fresh = latest is not None and service.clock() - latest <= timedelta(minutes=max_age)
            out.print(f"last successful fetch: {_when(latest)}", markup=False)
            sys.exit(0 if fresh else 1)
        configured = {f.name for f in service.config.feeds if f.enabled}
        now = service.clock()
        rows = [s for s in service.queries.feed_statuses(now) if s.name in configured]
        if as_json:
            click.echo(json.dumps([_status_json(s) for s in rows], indent=2, ensure_ascii=False))
            return
        table = Table(title=plural(len(rows), "feed"))
        for column in (
            "feed", "state", "last attempt", "last success", "HTTP", "errors",
            "next attempt", "items (30 d)", "problem",
        ):  # fmt: skip
            table.add_column(column)
        for s in rows:
            problem = s.last_error or s.last_warning or ""
            if s.moved_to:
                problem = f"moved to {s.moved_to}: update the config. {problem}".strip()
            if s.discovered_url and s.state != "failing":
                problem = f"reading the announced feed {s.discovered_url}. {problem}".strip()
            table.add_row(
                s.name,
                s.state,
                _when(s.last_attempt_at),
                _when(s.last_success_at),
                http_cell(s),
                str(s.consecutive_failures),
                "stopped" if s.state == "gone" else _when(s.next_attempt_at, "now"),
                f"{s.entries} ({s.entries_30_days})",
                problem,
                style="red" if s.consecutive_failures else None,
            )
        # A pipe or a log file has no width: do not squeeze the table to 80 columns.
        wide = Console(highlight=False, width=None if sys.stdout.isatty() else 220)
        wide.print(table)
        queries = service.queries
        counts = queries.delivery_counts()
        out.print(
            f"stories: {queries.count_stories()}, items: {queries.count_entries()}, "
            f"deliveries: {', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'}",
            markup=False,
        )
        _print_bouncing(service)


def _print_bouncing(service: Service) -> None:
    bouncing = service.queries.bouncing()
    if not bouncing:
        return
    out.print(
        f"bouncing addresses ({len(bouncing)}; digests skip "
        f"{'it' if len(bouncing) == 1 else 'them'} until "
        "`clusterfeed bounces clear EMAIL`):",
        markup=False,
    )
    for b in bouncing:
        out.print(
            f"  {b.email}: since {_when(b.since)}, {plural(b.refusals, 'refusal')} in a row"
            + (f"; last: {b.last_error}" if b.last_error else ""),
            markup=False,
        )


@main.group(invoke_without_command=True)
@config_option
@click.pass_context
@_handle_errors
def bounces(ctx: click.Context, config_path: Path | None) -> None:
    """List addresses marked bouncing (permanent refusals in a row)."""
    if ctx.invoked_subcommand is not None:
        return
    with _service(config_path) as service:
        if not service.queries.bouncing():
            out.print("no bouncing addresses", markup=False)
            return
        _print_bouncing(service)


@bounces.command("clear")
@config_option
@click.argument("email")
@_handle_errors
def bounces_clear(config_path: Path | None, email: str) -> None:
    """Let the next digests reach EMAIL again (after the address was fixed)."""
    with _service(config_path) as service:
        if not service.commands.clear_bouncing(email):
            _fail([f"error: {email} is not marked bouncing (see `clusterfeed bounces`)"], 1)
        out.print(f"{email} is no longer bouncing; the next digest includes it", markup=False)


@main.group(invoke_without_command=True)
@config_option
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="How many of the newest stories to show.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print every story with the GUID and link of each member item.",
)
@click.pass_context
@_handle_errors
def stories(ctx: click.Context, config_path: Path | None, limit: int, as_json: bool) -> None:
    """List recent stories with their sources and why each source was joined."""
    if ctx.invoked_subcommand is not None:
        return
    with _service(config_path) as service:
        if as_json:
            data = [_story_json(story) for story in service.queries.recent_stories()]
            click.echo(json.dumps(data, indent=2, ensure_ascii=False))
            return
        for story in service.queries.recent_stories(limit):
            out.print(f"{story.entry.title}", markup=False)
            for source in story.sources:
                reason = source.join_reason or "first version"
                out.print(
                    f"  · {source.feed_title} ({source.language or '?'}, "
                    f"{_when(source.published)}): {source.entry_title}\n"
                    f"      {source.entry_link or 'no link'}\n"
                    f"      joined because: {reason}",
                    markup=False,
                )


@stories.command("split")
@config_option
@click.argument("url")
@_handle_errors
def stories_split(config_path: Path | None, url: str) -> None:
    """Take the item at URL out of the story it was wrongly joined to, for good."""
    with _service(config_path) as service:
        result = service.commands.split_story(url)
    if not result.found:
        _fail(
            [
                f"error: no stored item has the link {url}",
                "  copy the link of the item from `clusterfeed stories` (its line below the title)",
            ]
        )
    if not result.moved:
        out.print(f"{url} is already a story of its own; nothing to split", markup=False)
        return
    out.print(
        f'split: "{result.title}" is now a story of its own; {result.left} other '
        f"item(s) stay in the story it left. They will not be joined again, also after "
        f"restarts; the published files change with the next publish or cycle.",
        markup=False,
    )


def _story_json(story: Story) -> dict[str, object]:
    return {
        "id": story.key,
        "title": story.entry.title,
        "link": story.entry.link,
        "topics": list(story.topics),
        "updated": _iso(story.updated),
        "items": [
            {
                "feed": s.feed_title,
                "title": s.entry_title,
                "guid": s.guid,
                "link": s.entry_link,
                "language": s.language,
                "published": _iso(s.published),
                "joined_because": s.join_reason,
            }
            for s in story.sources
        ],
    }


@main.group()
def feeds() -> None:
    """Share the partner list as OPML: import a feed reader's list, export the config's."""


@feeds.command("import")
@config_option
@click.argument("opml_file", metavar="FILE.opml", type=click.Path(path_type=Path))
@click.option(
    "--language",
    default="en",
    show_default=True,
    help="Language of imported feeds whose outline has no language attribute.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be added; change nothing.")
def feeds_import(config_path: Path | None, opml_file: Path, language: str, dry_run: bool) -> None:
    """Append the feeds of an OPML file to the config, skipping those already there."""
    from clusterfeed.publish.opml import OpmlError, import_opml

    try:
        result = import_opml(config_path, opml_file, language=language, dry_run=dry_run)
    except OpmlError as exc:
        _fail([f"error: {exc}"])
    except ConfigError as exc:
        _fail(
            [f"error: {p}" for p in exc.problems]
            + [f"nothing written: {plural(len(exc.problems), 'problem')} in the config."]
        )
    plan = result.plan
    if dry_run and result.appended:
        out.print(f"would append to {result.config}:", markup=False)
        out.print(result.appended.rstrip("\n"), markup=False)
        out.print("", markup=False)
    for feed in plan.added:
        topics = f"topics {', '.join(feed.topics)}; " if feed.topics else ""
        disabled = "; disabled" if not feed.enabled else ""
        out.print(
            f"  + {feed.name} <{feed.url}> ({topics}language {feed.language}{disabled})",
            markup=False,
        )
    for skipped in plan.skipped:
        out.print(f"  = {skipped.name}: {skipped.reason}", markup=False)
    for ignored in plan.ignored:
        out.print(f"  - {ignored.name}: not imported, {ignored.reason}", markup=False)
    names = f" ({', '.join(s.name for s in plan.skipped)})" if plan.skipped else ""
    out.print(
        f"{'would add' if dry_run else 'added'} {plural(len(plan.added), 'feed')}, "
        f"skipped {len(plan.skipped)} already present{names}"
        + (
            f", ignored {plural(len(plan.ignored), 'outline')} that are not feeds"
            if plan.ignored
            else ""
        ),
        markup=False,
    )
    if dry_run:
        out.print(f"dry run: {result.config} unchanged", markup=False)
    elif result.written:
        out.print(f"wrote {result.config}", markup=False)


@feeds.command("export")
@config_option
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the OPML to this file instead of standard output.",
)
def feeds_export(config_path: Path | None, out_file: Path | None) -> None:
    """Write the configured feeds as OPML 2.0 (local files are left out)."""
    from datetime import UTC

    from clusterfeed.publish.formats import write_atomic
    from clusterfeed.publish.opml import export_opml

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _fail(
            [f"error: {p}" for p in exc.problems]
            + [f"{plural(len(exc.problems), 'problem')} in the config."]
        )
    export = export_opml(config, datetime.now(UTC))
    for note in export.notes:
        err.print(f"note: {note}", markup=False)
    if out_file is None:
        click.echo(export.data, nl=False)
        return
    try:
        write_atomic(out_file, export.data)
    except OSError as exc:
        _fail([f"error: {out_file}: cannot write ({exc.strerror or exc})"])
    out.print(f"wrote {out_file}: {plural(export.exported, 'feed')}", markup=False)


# -- subscribers --------------------------------------------------------------------------

EXPORT_COLUMNS = (
    "email",
    "name",
    "topics",
    "languages",
    "frequency",
    "status",
    "paused",
    "origin",
    "created_at",
    "confirmed_at",
    "unsubscribed_at",
)
# What sending a confirmation mail can raise that the operator can fix (the server, the
# password, the Maildir folder).
MAIL_ERRORS = (TemporaryFailure, PermanentFailure, OSError)
CONSENT_COLUMNS = ("email", "at", "action", "form_version", "choices", "ip_hash")


@main.group()
def subscribers() -> None:
    """Who gets the digest: list, add, remove, import, export, erase."""


def _config_emails(service: Service) -> set[str]:
    return {s.email.lower() for s in all_subscribers(service.config)}


def _checked_address(value: str) -> str:
    from clusterfeed.config import normalize_email

    try:
        return normalize_email(value.strip())
    except ValueError as exc:
        _fail([f"error: {value!r}: {exc}"])
    raise AssertionError("unreachable")


@subscribers.command("list")
@config_option
@click.option("--all", "show_all", is_flag=True, help="Also list unsubscribed and removed ones.")
@_handle_errors
def subscribers_list(config_path: Path | None, show_all: bool) -> None:
    """Show subscribers with their state and choices (empty choices mean "all")."""
    with _service(config_path) as service:
        members = service.queries.memberships()
        shown = [m for m in members if show_all or m.status in ("confirmed", "pending")]
        # Plain aligned columns, every cell in full whatever the terminal's width: the
        # address is what the operator copies into the next command.
        rows = [("email", "state", "topics", "languages", "frequency", "since")]
        for m in shown:
            s = m.subscriber
            rows.append(
                (
                    s.email,
                    m.status + (",paused" if m.paused else ""),
                    ",".join(s.topics) or "all",
                    ",".join(s.languages) or "all",
                    s.frequency,
                    (m.confirmed_at or m.created_at).date().isoformat(),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            line = "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
            out.print(line.rstrip(), markup=False)
        receiving = sum(1 for m in members if m.receives_digests)
        out.print(
            f"{receiving} {'receives' if receiving == 1 else 'receive'} the digest; "
            f"{len(shown)} listed of {len(members)} known",
            markup=False,
        )


@subscribers.command("add")
@config_option
@click.argument("email")
@click.option("--topic", "topics", multiple=True, help="A topic to get (repeat; none = all).")
@click.option("--language", "languages", multiple=True, help="A language (repeat; none = all).")
@click.option("--frequency", type=click.Choice(["daily", "weekly"]), default="daily")
@click.option(
    "--confirmed",
    is_flag=True,
    help="You hold their consent already: no confirmation mail, digests start at once.",
)
@_handle_errors
def subscribers_add(
    config_path: Path | None,
    email: str,
    topics: tuple[str, ...],
    languages: tuple[str, ...],
    frequency: str,
    confirmed: bool,
) -> None:
    """Add one address; without --confirmed it gets a confirmation mail first."""
    from clusterfeed.subscribers.csvtext import not_offered
    from clusterfeed.subscribers.forms import Preferences
    from clusterfeed.subscribers.subscribe import Subscriptions

    address = _checked_address(email)
    topics = tuple(t.strip().lower() for t in topics)
    languages = tuple(lang.strip().lower() for lang in languages)
    with _service(config_path) as service:
        subs = Subscriptions(service)
        wrong = not_offered(
            {"topics": topics, "languages": languages},
            (subs.choices.topics, subs.choices.languages),
        )
        if wrong:  # stored, it would match no story: say so instead
            _fail([f"error: --{column[:-1]}: {message}" for column, message in wrong])
        if subs.is_suppressed(address):
            _fail(
                [
                    f"error: {address} was erased on request and is on the suppression list; "
                    "it cannot be added again"
                ]
            )
        prefs = Preferences(tuple(topics), tuple(languages), frequency)
        try:
            outcome = asyncio.run(
                subs.sign_up(address, prefs, ip_hash=None, action="add", confirmed=confirmed)
            )
        except MAIL_ERRORS as exc:
            _fail(
                [
                    f"error: {address} is stored as pending, but the confirmation mail could "
                    f"not be sent ({exc}); check [mail] and run the command again"
                ]
            )
            raise
        if outcome == "already":
            out.print(f"{address} is already subscribed; nothing changed", markup=False)
        elif confirmed:
            out.print(f"added {address} (confirmed)", markup=False)
        else:
            out.print(f"added {address}; a confirmation mail was sent", markup=False)


@subscribers.command("remove")
@config_option
@click.argument("email")
@_handle_errors
def subscribers_remove(config_path: Path | None, email: str) -> None:
    """Stop the digest to one address; their record stays (see erase)."""
    address = _checked_address(email)
    with _service(config_path) as service:
        if address.lower() in _config_emails(service):
            _fail(
                [
                    f"error: {address} is listed in {service.config.source} (subscribers or "
                    "subscribers_csv); remove it there, it would come back at the next start"
                ]
            )
        membership = service.queries.membership(address)
        if membership is None:
            _fail([f"error: {address} is not a subscriber"])
        assert membership is not None and membership.subscriber.id is not None
        if service.commands.remove_subscriber(membership.subscriber.id):
            out.print(f"removed {address}", markup=False)
        else:
            out.print(f"{address} was not subscribed; nothing changed", markup=False)


@subscribers.command("import")
@config_option
@click.argument("csv_file", metavar="FILE.csv", type=click.Path(path_type=Path))
@click.option(
    "--confirmed",
    is_flag=True,
    help="You hold the consent of everyone in the file: no confirmation mails.",
)
@click.option(
    "--encoding",
    default=None,
    metavar="NAME",
    help="The file's encoding, e.g. utf-8, cp1252, utf-16, mac_roman (default: found "
    "from its byte order mark, else UTF-8, else Windows-1252).",
)
@_handle_errors
def subscribers_import(
    config_path: Path | None, csv_file: Path, confirmed: bool, encoding: str | None
) -> None:
    """Add the addresses of a CSV file (header row; email, topics, languages, frequency).

    Without --confirmed every new address is pending and gets a confirmation mail.
    Rows with a status of unsubscribed or removed (as ``export --all`` writes them)
    are skipped, so a round trip never re-subscribes anyone. Comma, semicolon or TAB
    separated, as spreadsheets write them; topics and languages must be ones the
    feeds offer.
    """
    from clusterfeed.config import read_subscribers_csv
    from clusterfeed.subscribers.forms import Preferences, offered_choices
    from clusterfeed.subscribers.subscribe import Subscriptions

    extra = set(EXPORT_COLUMNS) - {"email", "name", "topics", "languages", "frequency"}
    try:
        config = load_config(config_path)
    except ConfigError:
        config = None  # said by _service below, with every problem of the config
    try:
        choices = offered_choices(config) if config is not None else None
        rows = read_subscribers_csv(
            csv_file,
            ignore=extra,
            skip=lambda row: row.get("status", "") in ("unsubscribed", "removed"),
            encoding=encoding,
            offered=(choices.topics, choices.languages) if choices else None,
        )
    except ConfigError as exc:
        _fail(
            [f"error: {p}" for p in exc.problems]
            + [f"nothing imported: {plural(len(exc.problems), 'problem')} in {csv_file}"]
        )
    with _service(config_path) as service:
        subs = Subscriptions(service)
        erased = [r.email for r in rows if subs.is_suppressed(r.email)]
        counts = {"confirm": 0, "already": 0}

        async def run() -> None:
            for row in rows:
                if row.email in erased:
                    continue
                prefs = Preferences(tuple(row.topics), tuple(row.languages), row.frequency)
                outcome = await subs.sign_up(
                    row.email,
                    prefs,
                    ip_hash=None,
                    action="import",
                    confirmed=confirmed,
                    name=row.name,
                )
                counts[outcome] = counts.get(outcome, 0) + 1

        try:
            asyncio.run(run())
        except MAIL_ERRORS as exc:
            _fail(
                [
                    f"error: {csv_file}: a confirmation mail could not be sent ({exc}); "
                    f"{plural(counts['confirm'], 'address')} imported before it. Check [mail] and "
                    "import the file again (pending addresses get a new mail)"
                ]
            )
        for address in erased:
            err.print(
                f"refused: {csv_file}: {address} was erased on request and is on the "
                "suppression list; remove it from the file",
                markup=False,
            )
        state = "confirmed" if confirmed else "pending, confirmation mails sent"
        out.print(
            f"imported {counts['confirm']} ({state}), {counts['already']} already subscribed, "
            f"{len(erased)} refused as erased",
            markup=False,
        )


def _csv_text(header: tuple[str, ...], rows: list[list[str]]) -> str:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


@subscribers.command("export")
@config_option
@click.option("--all", "export_all", is_flag=True, help="Also unsubscribed and removed ones.")
@click.option("--consents", is_flag=True, help="Export the consent record instead.")
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the CSV to this file instead of standard output.",
)
@_handle_errors
def subscribers_export(
    config_path: Path | None, export_all: bool, consents: bool, out_file: Path | None
) -> None:
    """Write subscribers (or, with --consents, every consent change) as CSV."""
    from clusterfeed.publish.formats import write_atomic
    from clusterfeed.subscribers.forms import consent_row

    with _service(config_path) as service:
        header: tuple[str, ...]
        if consents:
            header = CONSENT_COLUMNS
            rows = [
                [
                    c.email,
                    c.at.isoformat(),
                    c.action,
                    c.form_version or "",
                    consent_row(c.choices),
                    c.ip_hash or "",
                ]
                for c in service.queries.consents()
            ]
        else:
            header = EXPORT_COLUMNS
            rows = [
                [
                    m.subscriber.email,
                    m.subscriber.name or "",
                    ";".join(m.subscriber.topics),
                    ";".join(m.subscriber.languages),
                    m.subscriber.frequency,
                    m.status,
                    "yes" if m.paused else "",
                    m.origin,
                    m.created_at.isoformat(),
                    _iso(m.confirmed_at) or "",
                    _iso(m.unsubscribed_at) or "",
                ]
                for m in service.queries.memberships()
                if export_all or m.status in ("confirmed", "pending")
            ]
    data = _csv_text(header, rows)
    if out_file is None:
        click.echo(data, nl=False)
        return
    try:
        write_atomic(out_file, data.encode("utf-8"))
    except OSError as exc:
        _fail([f"error: {out_file}: cannot write ({exc.strerror or exc})"])
    out.print(f"wrote {out_file}: {plural(len(rows), 'row')}", markup=False)


@subscribers.command("erase")
@config_option
@click.argument("email")
@_handle_errors
def subscribers_erase(config_path: Path | None, email: str) -> None:
    """Delete every personal datum of an address (GDPR erasure); keep a keyed hash so it
    cannot be imported or signed up again by mistake."""
    from clusterfeed.subscribers.subscribe import Subscriptions

    address = _checked_address(email)
    with _service(config_path) as service:
        address = address.lower()
        found = Subscriptions(service).erase(address)
        what = "erased" if found else "not in the store; added to the suppression list"
        out.print(f"{address}: {what}", markup=False)
        if address.lower() in _config_emails(service):
            err.print(
                f"note: {address} is still listed in {service.config.source}; remove it "
                "there (it gets no mail meanwhile)",
                markup=False,
            )
