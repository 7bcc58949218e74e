"""Templates proved before they cost anything: compiled and rendered with sample data.

An operator edits the templates (digest, web pages, sign-up mails) with a text editor.
A typo there used to pass ``check`` and surface in the middle of a digest run, as a
traceback, after deliveries were claimed. Here every template the service renders is
rendered once with made-up stories, subscribers and links through the same functions
the service uses, and each problem is told as ``file:line: what is wrong``. The same
digest check runs before a sending run claims anything, so a broken template stops
the run with a sentence and never counts as a delivery attempt.

Sample rendering takes the common branches only; a variable that no sample reaches
(inside ``{% if %}``) is also looked up statically against what the template is given,
so a misspelt name in a rarely taken branch is found too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import jinja2
from jinja2 import meta, nodes

from clusterfeed.config import Config
from clusterfeed.digest.digest import (
    DigestLinks,
    default_template_dir,
    make_environment,
    render_digest,
    template_dir,
)
from clusterfeed.model import Entry, Source, Story, Subscriber

PAGE_TEMPLATES = (
    "subscribe.html",
    "message.html",
    "confirm.html",
    "preferences.html",
    "unsubscribe.html",
)
MAIL_TEMPLATES = ("confirm_email.txt", "already_subscribed_email.txt", "erased_email.txt")


class TemplateProblem(Exception):
    """A template cannot be rendered: the operator's error, told as ``file:line: problem``
    lines. Plain strings only, so it crosses from a rendering process intact."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(problems)
        self.problems = problems

    def __str__(self) -> str:
        return "; ".join(self.problems)


def template_location(exc: BaseException) -> tuple[str, int] | None:
    """The template file and line an exception came from, or None if from no template.

    jinja2 rewrites a rendering error's traceback so that its frames point into the
    template source; the innermost such frame is where the problem is.
    """
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return (exc.filename or exc.name or "<template>", exc.lineno)
    found = None
    tb = exc.__traceback__
    while tb is not None:
        if "__jinja_exception__" in tb.tb_frame.f_globals:
            found = (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return found


def describe(exc: BaseException) -> str:
    """One line an operator can act on: ``file:line: problem``."""
    if isinstance(exc, jinja2.TemplateNotFound):
        problem = f"template {exc.name!r} not found in the templates folder"
    elif isinstance(exc, jinja2.TemplateError):
        problem = exc.message or type(exc).__name__
    else:
        problem = f"{type(exc).__name__}: {exc}"
    where = template_location(exc)
    if where is None:
        return problem
    return f"{where[0]}:{where[1]}: {problem}"


# -- sample data --------------------------------------------------------------------------

SAMPLE_TIME = datetime(2026, 11, 26, 7, 0, tzinfo=UTC)


def _story(n: int, *, full: bool, topics: tuple[str, ...], language: str) -> Story:
    published = SAMPLE_TIME - timedelta(hours=n)
    link = f"https://partner{n}.example/news/{n}" if full else None
    entry = Entry(
        feed_name=f"Partner {n}",
        identity=f"sample-{n}",
        guid=link,
        link=link,
        link_key=link,
        title=f"Sample story {n}",
        summary_html="<p>What happened, in two sentences.</p>" if full else "",
        summary_text="What happened, in two sentences." if full else "",
        content_html="",
        image_url=f"https://partner{n}.example/picture.jpg" if full else None,
        image_alt="A picture" if full else None,
        author="A. Author" if full else None,
        topics=topics,
        language=language,
        published=published,
        updated=published,
        content_hash=f"{n}",
    )

    def source(m: int) -> Source:
        return Source(
            feed_name=f"Partner {m}",
            feed_title=f"Partner {m}",
            feed_url=f"https://partner{m}.example/feed",
            site_url=f"https://partner{m}.example/" if full else None,
            entry_title=entry.title,
            entry_link=link,
        )

    sources = (source(n), source(n + 10)) if full else (source(n),)
    return Story(n, f"key-{n}", entry, sources, topics, (language,), published, published)


def sample_stories(config: Config) -> list[Story]:
    """Three stories: one with everything (picture, summary, two partners), one plain,
    one with nothing optional; in the config's topics and languages."""
    feeds = [f for f in config.feeds if f.enabled] or config.feeds
    topics = [t for f in feeds for t in f.topics] or ["news"]
    languages = [f.language for f in feeds] or ["en"]
    return [
        _story(1, full=True, topics=(topics[0],), language=languages[0]),
        _story(2, full=True, topics=(topics[-1],), language=languages[-1]),
        _story(3, full=False, topics=(), language=languages[0]),
    ]


def _links(web_url: bool) -> DigestLinks:
    base = "https://news.example.org"
    return DigestLinks(
        unsubscribe_url=f"{base}/unsubscribe/TOKEN",
        preferences_url=f"{base}/preferences/TOKEN",
        feed_url=f"{base}/feed.atom",
        site_url=base,
        web_url=f"{base}/digests/2026-11-26.html" if web_url else None,
    )


# -- probing environments -------------------------------------------------------------------


class _Probe(jinja2.Template):
    """A template that notes what it was given and reports problems instead of raising,
    so one run finds the problems of every template, not only the first."""

    def new_context(
        self,
        vars: dict[str, Any] | None = None,
        shared: bool = False,
        locals: Any = None,
    ) -> Any:
        given = self.environment.given  # type: ignore[attr-defined]
        names = set(vars or ()) | set(locals or ())
        given.setdefault(self.name, set()).update(names)
        return super().new_context(vars, shared, locals)

    def render(self, *args: Any, **kwargs: Any) -> str:
        try:
            return super().render(*args, **kwargs)
        except Exception as exc:  # any error inside a template is the template's problem
            self.environment.problems.append(describe(exc))  # type: ignore[attr-defined]
            return ""


def _probing(env: jinja2.Environment) -> jinja2.Environment:
    env.template_class = _Probe
    env.given = {}  # type: ignore[attr-defined]
    env.problems = []  # type: ignore[attr-defined]
    return env


def _run(env: jinja2.Environment, action: Callable[[], object]) -> None:
    try:
        action()
    except Exception as exc:  # a syntax error is raised when the template is loaded
        env.problems.append(describe(exc))  # type: ignore[attr-defined]


def _reachable(env: jinja2.Environment, names: Iterable[str]) -> list[str]:
    """The templates ``names`` and all they include, import or extend (when named as
    plain strings), each compiled once; a syntax error is a problem of its own."""
    seen: list[str] = []
    todo: list[tuple[str, str]] = [(name, "") for name in names]
    while todo:
        name, wanted_at = todo.pop(0)
        if name in seen:
            continue
        seen.append(name)
        try:
            source, filename, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
            tree = env.parse(source, name, filename)
            env.get_template(name)
        except jinja2.TemplateNotFound:
            env.problems.append(  # type: ignore[attr-defined]
                f"{wanted_at}template {name!r} not found in the templates folder"
            )
            continue
        except Exception as exc:
            env.problems.append(describe(exc))  # type: ignore[attr-defined]
            continue
        for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
            target = getattr(node, "template", None)
            if isinstance(target, nodes.Const) and isinstance(target.value, str):
                todo.append((target.value, f"{filename}:{node.lineno}: "))
    return seen


_SPECIAL_NAMES = {"self", "loop", "super", "caller", "varargs", "kwargs"}


def _optional_names(tree: nodes.Node) -> set[str]:
    """Names a template itself treats as optional (``x is defined``, ``x | default``)."""
    optional = set()
    for node in tree.find_all((nodes.Test, nodes.Filter)):
        if node.name in ("defined", "undefined", "default", "d") and isinstance(
            node.node, nodes.Name
        ):
            optional.add(node.node.name)
    return optional


def _unknown_names(env: jinja2.Environment, names: list[str]) -> None:
    """Variables a template reads but is never given, in any branch: StrictUndefined
    would stop on them the day that branch is taken."""
    given: dict[str, set[str]] = env.given  # type: ignore[attr-defined]
    # A template that extends another hands its context on to it.
    for name in names:
        try:
            source, filename, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
            tree = env.parse(source, name, filename)
        except Exception:
            continue  # already reported
        for ext in tree.find_all(nodes.Extends):
            if isinstance(ext.template, nodes.Const) and name in given:
                given.setdefault(ext.template.value, set()).update(given[name])
    for name in names:
        if name not in given:
            continue
        try:
            source, filename, _ = env.loader.get_source(env, name)  # type: ignore[union-attr]
            tree = env.parse(source, name, filename)
        except Exception:
            continue
        known = given[name] | set(env.globals) | _optional_names(tree) | _SPECIAL_NAMES
        for var in sorted(meta.find_undeclared_variables(tree) - known):
            line = min((n.lineno for n in tree.find_all(nodes.Name) if n.name == var), default=1)
            said = f"{filename}:{line}: {var!r} is undefined"
            if said in env.problems:  # type: ignore[attr-defined]
                continue  # a sample rendering found it already
            offered = ", ".join(sorted(given[name] - set(env.globals))) or "nothing"
            env.problems.append(  # type: ignore[attr-defined]
                f"{filename}:{line}: {var!r} is undefined (this template gets: {offered})"
            )


def _dedupe(lines: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(lines))


# -- the checks -------------------------------------------------------------------------------


def _digest_render(
    env: jinja2.Environment,
    config: Config,
    subscriber: Subscriber,
    stories: list[Story],
    links: DigestLinks,
    more: int = 0,
) -> Callable[[], object]:
    return lambda: render_digest(
        env, config, subscriber, stories, slot=SAMPLE_TIME, links=links, more=more
    )


def digest_problems(config: Config) -> list[str]:
    """Problems of the digest's subject, HTML and text templates, as ``file:line: ...``.

    Rendered through ``render_digest`` (the function every digest goes through) for a
    subscriber with a name and a picture-rich digest, and for one without a name or a
    web version, each also with stories left out by the cap (``more``); with no
    stories at all too when ``send_when_empty`` is on.
    """
    env = _probing(make_environment(template_dir(config)))
    digest = config.digest
    names = [digest.subject_template, digest.html_template, digest.text_template]
    reachable = _reachable(env, names)
    if env.problems:  # type: ignore[attr-defined]
        return _dedupe(env.problems)  # type: ignore[attr-defined]
    stories = sample_stories(config)
    rita = Subscriber("rita@example.org", "Rita Reader", id=1)
    sam = Subscriber("sam@example.org", None, id=2)
    cases = [
        (rita, stories, _links(True), 0),
        (sam, stories[2:], _links(False), 0),
        (rita, stories, _links(True), 2),
        (sam, stories[2:], _links(False), 1),
    ]
    if digest.send_when_empty:
        cases.append((Subscriber("nil@example.org", None, id=3), [], _links(True), 0))
    for subscriber, chosen, links, more in cases:
        _run(env, _digest_render(env, config, subscriber, chosen, links, more))
    _unknown_names(env, reachable)
    return _dedupe(env.problems)  # type: ignore[attr-defined]


def site_problems(config: Config) -> list[str]:
    """Problems of the news pages and the digests' web versions."""
    from clusterfeed.publish.site import (
        DIGEST_INDEX_TEMPLATE,
        DIGEST_PAGE_TEMPLATE,
        SITE_TEMPLATE,
        DigestPage,
        render_digest_index,
        render_digest_page,
        site_environment,
        site_pages,
    )

    env = _probing(site_environment(template_dir(config), default_template_dir()))
    reachable = _reachable(env, [SITE_TEMPLATE, DIGEST_PAGE_TEMPLATE, DIGEST_INDEX_TEMPLATE])
    if env.problems:  # type: ignore[attr-defined]
        return _dedupe(env.problems)  # type: ignore[attr-defined]
    stories = sample_stories(config)
    for _path, render in site_pages(env, config, stories, 50):
        _run(env, render)
    local = SAMPLE_TIME.astimezone(ZoneInfo(config.schedule.timezone))
    pages = [DigestPage(1, local, 1), DigestPage(2, local, 2)]
    _run(env, lambda: render_digest_page(env, config, pages[0], stories))
    _run(env, lambda: render_digest_index(env, config, pages))
    _unknown_names(env, reachable)
    return _dedupe(env.problems)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Sample:
    """What a page or mail template gets besides the cluster (see ``subscribe.routes``)."""

    template: str
    values: dict[str, Any]


def _page_samples(choices: object) -> list[_Sample]:
    from clusterfeed.subscribers.subscribe import HONEYPOT, FormError, Preferences

    prefs = Preferences(("research",), ("de",), "weekly", paused=True)
    error = FormError("email", "please enter your e-mail address")
    form = {
        "choices": choices,
        "email": "rita@example.org",
        "prefs": prefs,
        "form_token": "TOKEN",
        "honeypot": HONEYPOT,
        "form_version": "1",
    }
    prefs_page = {
        "choices": choices,
        "email": "rita@example.org",
        "saved": True,
        "prefs": prefs,
        "action": "/preferences/TOKEN",
        "unsubscribe": "/unsubscribe/TOKEN",
    }
    return [
        _Sample("subscribe.html", {**form, "error": None}),
        _Sample("subscribe.html", {**form, "error": error}),
        _Sample(
            "message.html",
            {"title": "Done", "text": "Thank you.", "link": "/subscribe", "link_text": "Sign up"},
        ),
        _Sample(
            "message.html", {"title": "Done", "text": "Thank you.", "link": None, "link_text": None}
        ),
        _Sample("confirm.html", {"action": "/confirm/TOKEN"}),
        _Sample("preferences.html", {**prefs_page, "error": None}),
        _Sample("preferences.html", {**prefs_page, "error": error, "saved": False}),
        _Sample("unsubscribe.html", {"action": "/unsubscribe/TOKEN", "email": "rita@example.org"}),
    ]


def _mail_samples(config: Config) -> list[_Sample]:
    return [
        _Sample(
            "confirm_email.txt",
            {
                "confirm_url": "https://news.example.org/confirm/T",
                "hours": config.signup.confirm_hours,
            },
        ),
        _Sample(
            "already_subscribed_email.txt",
            {"preferences_url": "https://news.example.org/preferences/T"},
        ),
        _Sample("erased_email.txt", {}),
    ]


def page_problems(config: Config) -> list[str]:
    """Problems of the sign-up, confirm, preferences and unsubscribe pages and mails."""
    from clusterfeed.subscribers.subscribe import (
        Choices,
        language_label,
        page_environment,
        topic_label,
    )

    env = _probing(page_environment(config))
    reachable = _reachable(env, [*PAGE_TEMPLATES, *MAIL_TEMPLATES])
    if env.problems:  # type: ignore[attr-defined]
        return _dedupe(env.problems)  # type: ignore[attr-defined]
    cluster = config.cluster

    def page(sample: _Sample) -> Callable[[], object]:
        helpers = {"topic_label": topic_label, "language_label": language_label}
        return lambda: env.get_template(sample.template).render(
            cluster=cluster, **helpers, **sample.values
        )

    def mail(sample: _Sample) -> Callable[[], object]:
        return lambda: env.get_template(sample.template).render(
            cluster=cluster, email="rita@example.org", **sample.values
        )

    for sample in _page_samples(Choices(("gene-therapy", "research"), ("de", "en"))):
        _run(env, page(sample))
    for sample in _mail_samples(config):
        _run(env, mail(sample))
    _unknown_names(env, reachable)
    return _dedupe(env.problems)  # type: ignore[attr-defined]


def template_problems(config: Config) -> list[str]:
    """Every problem of every template the service renders, for ``clusterfeed check``."""
    return _dedupe([*digest_problems(config), *site_problems(config), *page_problems(config)])


def require_digest_templates(config: Config) -> None:
    """Stop before a sending run claims anything if a digest template cannot render."""
    problems = digest_problems(config)
    if problems:
        raise TemplateProblem(problems)
