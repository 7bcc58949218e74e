"""Subscribing, confirming, changing and leaving: the decisions, the mails, the pages.

A newsletter in Europe must prove consent, so a sign-up only asks; the address gets a
mail with a signed link that expires, and only the click on that link (and a press of
the button on the page it opens, so that a mail scanner that follows links confirms
nothing) makes the address a subscriber. Every change of consent lands in the consent
log with the version of the form text the person saw.

Nobody may learn from the form whether an address is subscribed: a new address, a
subscribed one, an erased one and one over its rate limit all get the same page; what
differs is only the mail, which goes to the owner of the address alone.

The pure decisions (reading and checking a form, what a sign-up leads to) are plain
functions; ``Subscriptions`` joins them to the store, the clock, the secret and the
mail transport; ``routes`` puts them on the web app. The pages are jinja2 templates
that an operator can override like the digest templates, themed from ``[cluster]``,
without JavaScript.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from clusterfeed.app.service import Service
from clusterfeed.config import Config, normalize_email
from clusterfeed.delivery.mail import PermanentFailure, TemporaryFailure, make_transport
from clusterfeed.digest.digest import address, default_template_dir, template_dir
from clusterfeed.model import Membership, Subscriber
from clusterfeed.subscribers.tokens import (
    CONFIRM,
    UNSUBSCRIBE,
    ExpiredToken,
    InvalidToken,
    form_token_matches,
    keyed_hash,
    make_form_token,
    make_timed_token,
    make_token,
    read_timed_token,
    read_token,
    suppression_hash,
)
from clusterfeed.web.webguard import SameOriginForms, local_location

log = logging.getLogger(__name__)

FREQUENCIES = ("daily", "weekly")
CSRF_COOKIE = "clusterfeed_form"
FORM_MAX_AGE = timedelta(hours=12)
HONEYPOT = "website"
MAX_FIELD = 500
UNCONFIRMED_GRACE = timedelta(days=7)


# -- pure decisions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Choices:
    """What the form offers: the topics and languages of the configured feeds."""

    topics: tuple[str, ...]
    languages: tuple[str, ...]


def offered_choices(config: Config) -> Choices:
    topics = sorted({t for f in config.feeds if f.enabled for t in f.topics})
    languages = sorted({f.language for f in config.feeds if f.enabled})
    return Choices(tuple(topics), tuple(languages))


class FormError(ValueError):
    """One field of a form is not acceptable; ``field`` names it for the page."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Preferences:
    topics: tuple[str, ...]
    languages: tuple[str, ...]
    frequency: str
    paused: bool = False


def refuse_header_tricks(fields: Sequence[tuple[str, str]]) -> None:
    """Refuse line breaks, NULs and other control characters in any field.

    Values end up in mail headers (the address) and in the consent log; a CR or LF
    there is how header injection starts, so it is refused outright, in every field,
    rather than cleaned (a cleaned value is not what the person typed).
    """
    for name, value in fields:
        for text in (name, value):
            if any(ch in text for ch in "\r\n\0\x0b\x0c\x85\u2028\u2029"):
                raise FormError(name, "line breaks and control characters are not allowed")
            if len(text) > MAX_FIELD:
                raise FormError(name, f"at most {MAX_FIELD} characters")


def _subset(field: str, values: Sequence[str], offered: Sequence[str]) -> tuple[str, ...]:
    unknown = [v for v in values if v not in offered]
    if unknown:
        raise FormError(field, f"not offered: {', '.join(unknown)}")
    return tuple(v for v in offered if v in values)


def read_preferences(fields: Sequence[tuple[str, str]], choices: Choices) -> Preferences:
    """Topics, languages, frequency and pause from a posted form (none chosen = all)."""
    refuse_header_tricks(fields)
    topics = [v for k, v in fields if k == "topics"]
    languages = [v for k, v in fields if k == "languages"]
    frequency = next((v for k, v in fields if k == "frequency"), "daily")
    if frequency not in FREQUENCIES:
        raise FormError("frequency", "choose daily or weekly")
    return Preferences(
        topics=_subset("topics", topics, choices.topics),
        languages=_subset("languages", languages, choices.languages),
        frequency=frequency,
        paused=any(k == "paused" and v for k, v in fields),
    )


def read_signup(fields: Sequence[tuple[str, str]], choices: Choices) -> tuple[str, Preferences]:
    """The normalized address and the choices of a sign-up form, or ``FormError``."""
    refuse_header_tricks(fields)
    raw = next((v for k, v in fields if k == "email"), "").strip()
    if not raw:
        raise FormError("email", "please enter your e-mail address")
    try:
        email = normalize_email(raw)
    except ValueError as exc:
        raise FormError("email", str(exc)) from None
    prefs = read_preferences([f for f in fields if f[0] != "paused"], choices)
    return email, prefs


def signup_outcome(membership: Membership | None, suppressed: bool) -> str:
    """Which mail a sign-up for an address leads to (the page is always the same).

    ``erased``: the address was erased on request, and cannot be signed up again by
    the form (the mail says whom to ask). ``already``: a confirmed subscriber gets
    their preferences link instead of a second confirmation. ``confirm``: everyone
    else (new, pending, unsubscribed, removed) gets a confirmation link.
    """
    if suppressed and membership is None:
        return "erased"
    if membership is not None and membership.status == "confirmed":
        return "already"
    return "confirm"


def topic_label(topic: str) -> str:
    return topic.replace("-", " ").replace("_", " ").capitalize()


# Each language named in itself, as a reader of it would look for it; others show their code.
LANGUAGE_NAMES = {
    "da": "Dansk", "de": "Deutsch", "en": "English", "es": "Español", "fi": "Suomi",
    "fr": "Français", "it": "Italiano", "ja": "日本語", "ko": "한국어", "nl": "Nederlands",
    "no": "Norsk", "pl": "Polski", "pt": "Português", "sv": "Svenska", "zh": "中文",
}  # fmt: skip


def language_label(code: str) -> str:
    return LANGUAGE_NAMES.get(code.split("-")[0].lower(), code.upper())


# -- the edge: store, clock, secret, mail -----------------------------------------------


class Subscriptions:
    """Sign-up, confirmation, preferences, unsubscribe and erase over one service."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.config = service.config
        self.store = service.store
        self.choices = offered_choices(service.config)
        self.env = page_environment(service.config)
        # Read (or made) once, here: not in the middle of a store transaction that
        # checks addresses against the suppression list.
        self._suppression_key = service.suppression_key()

    @cached_property
    def secret(self) -> str:
        # Read once: without the environment variable it is a database read.
        return self.service.secret()

    def email_hash(self, email: str) -> str:
        return suppression_hash(self._suppression_key, email)

    def client_hash(self, client: str | None) -> str | None:
        return keyed_hash(self.secret, "client", client)[:32] if client else None

    def is_suppressed(self, email: str) -> bool:
        return self.store.is_suppressed(self.email_hash(email))

    def keep_unconfirmed(self) -> timedelta:
        """How long an unconfirmed sign-up is kept: its link's life plus a week, so a late
        click still gets "expired" (not "invalid")."""
        return timedelta(hours=self.config.signup.confirm_hours) + UNCONFIRMED_GRACE

    def base_url(self) -> str:
        return self.config.web.base_url.rstrip("/")

    def confirm_url(self, membership: Membership) -> str:
        sub = membership.subscriber
        assert sub.id is not None
        token = make_timed_token(self.secret, CONFIRM, sub.id, sub.email, self.service.clock())
        return f"{self.base_url()}/confirm/{token}"

    def preferences_url(self, sub: Subscriber) -> str:
        assert sub.id is not None
        token = make_token(self.secret, UNSUBSCRIBE, sub.id, sub.email)
        return f"{self.base_url()}/preferences/{token}"

    def allowed(self, email: str, client_hash: str | None) -> tuple[bool, bool]:
        """(client within its limit, address within its limit); each attempt counts."""
        cfg = self.config.signup
        now = self.service.clock()
        client_ok = client_hash is None or self.store.take_rate(
            f"client:{client_hash}",
            now,
            timedelta(minutes=cfg.client_window_minutes),
            cfg.client_limit,
        )
        if not client_ok:
            return False, False
        address_ok = self.store.take_rate(
            f"address:{self.email_hash(email)[:32]}",
            now,
            timedelta(hours=cfg.address_window_hours),
            cfg.address_limit,
        )
        return True, address_ok

    async def sign_up(
        self,
        email: str,
        prefs: Preferences,
        *,
        ip_hash: str | None,
        action: str = "signup",
        confirmed: bool = False,
        name: str | None = None,
    ) -> str:
        """Record a sign-up and send the mail it leads to; the outcome (see signup_outcome).

        ``confirmed`` is for the operator's imports of lists whose consent they hold.
        The store's part runs in a worker thread: a database waiting for its lock must
        not hold up the web server's other requests.
        """
        outcome, mail = await run_in_threadpool(
            self.record_signup,
            email,
            prefs,
            ip_hash=ip_hash,
            action=action,
            confirmed=confirmed,
            name=name,
        )
        if mail is not None:
            await self.send(mail)
        return outcome

    def record_signup(
        self,
        email: str,
        prefs: Preferences,
        *,
        ip_hash: str | None,
        action: str = "signup",
        confirmed: bool = False,
        name: str | None = None,
    ) -> tuple[str, EmailMessage | None]:
        """``sign_up``'s decision and record: (outcome, the mail to send or None)."""
        now = self.service.clock()
        self.store.forget_unconfirmed(now - self.keep_unconfirmed())
        existing = self.store.membership(email=email)
        outcome = signup_outcome(existing, self.is_suppressed(email))
        if outcome == "erased":
            return outcome, self._erased_mail(email) if action == "signup" else None
        if outcome == "already":
            # Nothing changes: the confirmed subscriber's choices are theirs to change on
            # their preferences page, which the mail links to.
            assert existing is not None
            return outcome, self._already_mail(existing) if action == "signup" else None
        membership = self.store.record_signup(
            Subscriber(
                email=email,
                name=name,
                topics=prefs.topics,
                languages=prefs.languages,
                frequency=prefs.frequency,
            ),
            now,
            status="confirmed" if confirmed else "pending",
            origin="signup" if action == "signup" else "operator",
            action=action,
            # The form's text version only when the person saw the form.
            form_version=self.config.signup.form_version if action == "signup" else None,
            ip_hash=ip_hash,
        )
        return outcome, None if confirmed else self._confirm_mail(membership)

    def confirm(self, token: str, *, ip_hash: str | None) -> Membership:
        """Confirm the sign-up behind a confirmation token (InvalidToken/ExpiredToken)."""
        now = self.service.clock()
        sid = read_timed_token(
            self.secret,
            CONFIRM,
            token,
            self.store.email_of,
            now,
            timedelta(hours=self.config.signup.confirm_hours),
        )
        membership = self.store.membership(id=sid)
        if membership is None:
            raise InvalidToken("unknown subscriber")
        if membership.status in ("pending", "confirmed"):
            confirmed = self.store.confirm(
                sid, now, form_version=self.config.signup.form_version, ip_hash=ip_hash
            )
            assert confirmed is not None
            return confirmed
        return membership

    def member_for(self, token: str) -> Membership:
        """The subscriber behind a preferences or unsubscribe link (or InvalidToken)."""
        sid = read_token(self.secret, UNSUBSCRIBE, token, self.store.email_of)
        membership = self.store.membership(id=sid)
        if membership is None:
            raise InvalidToken("unknown subscriber")
        return membership

    def erase(self, email: str) -> bool:
        return self.store.erase(email, self.email_hash(email), self.service.clock())

    # -- mails ------------------------------------------------------------------

    async def send(self, message: EmailMessage) -> None:
        transport = make_transport(self.config.mail)
        try:
            await transport.send(message, f"signup{secrets.token_hex(8)}", 0)
        finally:
            await transport.close()

    def _message(self, to: str, subject: str, template: str, **values: Any) -> EmailMessage:
        cluster = self.config.cluster
        text = self.env.get_template(template).render(cluster=cluster, email=to, **values)
        msg = EmailMessage()
        msg["From"] = address(self.config.digest.from_address)
        msg["To"] = address(to)
        if self.config.digest.reply_to:
            msg["Reply-To"] = address(self.config.digest.reply_to)
        msg["Subject"] = subject
        msg["Date"] = format_datetime(self.service.clock())
        domain = self.config.digest.from_address.rpartition("@")[2].strip("> ") or None
        msg["Message-ID"] = make_msgid("signup", domain=domain)
        msg["Auto-Submitted"] = "auto-generated"
        msg.set_content(text, subtype="plain", charset="utf-8", cte="quoted-printable")
        return msg

    def _confirm_mail(self, membership: Membership) -> EmailMessage:
        return self._message(
            membership.subscriber.email,
            f"Please confirm your subscription to {self.config.cluster.name} news",
            "confirm_email.txt",
            confirm_url=self.confirm_url(membership),
            hours=self.config.signup.confirm_hours,
        )

    def _already_mail(self, membership: Membership) -> EmailMessage:
        return self._message(
            membership.subscriber.email,
            f"You already receive {self.config.cluster.name} news",
            "already_subscribed_email.txt",
            preferences_url=self.preferences_url(membership.subscriber),
        )

    def _erased_mail(self, email: str) -> EmailMessage:
        return self._message(
            email,
            f"About your sign-up for {self.config.cluster.name} news",
            "erased_email.txt",
        )


def page_environment(config: Config) -> jinja2.Environment:
    """Pages and sign-up mails: the operator's templates first, then the bundled ones.

    An operator who copied the templates before these pages existed still gets them.
    """
    folders = [str(template_dir(config))]
    if Path(folders[0]).resolve() != default_template_dir().resolve():
        folders.append(str(default_template_dir()))
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folders),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html",), default=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


# -- the pages ---------------------------------------------------------------------------


def _page(subs: Subscriptions, template: str, status: int = 200, **values: Any) -> HTMLResponse:
    html = subs.env.get_template(template).render(
        cluster=subs.config.cluster,
        topic_label=topic_label,
        language_label=language_label,
        **values,
    )
    return HTMLResponse(
        html,
        status_code=status,
        headers={
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",  # the token in the URL stays here
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            "img-src https: http: data:; form-action 'self'; frame-ancestors 'none'",
        },
    )


def _message_page(
    subs: Subscriptions,
    title: str,
    text: str,
    status: int = 200,
    link: str | None = None,
    link_text: str | None = None,
) -> HTMLResponse:
    return _page(
        subs, "message.html", status, title=title, text=text, link=link, link_text=link_text
    )


def _bad_link(subs: Subscriptions, exc: InvalidToken) -> HTMLResponse:
    if isinstance(exc, ExpiredToken):
        return _message_page(
            subs,
            "This link has expired",
            "Confirmation links work for a limited time. Please sign up again; "
            "you will get a new link.",
            400,
            "/subscribe",
            "Sign up again",
        )
    return _message_page(
        subs,
        "This link is not valid",
        "The link is incomplete or was not made for this address. Please use the "
        "link from your most recent mail, or copy the whole link into the address bar.",
        403,
    )


async def _fields(request: Request) -> list[tuple[str, str]]:
    form = await request.form()
    return [(k, v) for k, v in form.multi_items() if isinstance(v, str)]


def routes(service: Service) -> list[Route]:
    """The sign-up, confirm, preferences and unsubscribe pages, for ``web.create_app``."""
    subs = Subscriptions(service)

    def client(request: Request) -> str | None:
        # Behind a trusted proxy, proxies.ForwardedClient has put the client here.
        return subs.client_hash(request.client.host if request.client else None)

    from_our_pages = SameOriginForms(
        service.config.web,
        lambda: _message_page(
            subs,
            "This form came from another site",
            "For your safety, our forms are only accepted from our own pages. Please "
            "open the page from the link in your mail and send the form from there.",
            403,
        ),
    )

    def signup_page(
        request: Request,
        *,
        status: int = 200,
        error: FormError | None = None,
        email: str = "",
        prefs: Preferences | None = None,
    ) -> Response:
        nonce = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(18)
        response = _page(
            subs,
            "subscribe.html",
            status,
            choices=subs.choices,
            error=error,
            email=email,
            prefs=prefs or Preferences((), (), "daily"),
            form_token=make_form_token(subs.secret, nonce, service.clock()),
            honeypot=HONEYPOT,
            form_version=service.config.signup.form_version,
        )
        response.set_cookie(
            CSRF_COOKIE,
            nonce,
            max_age=int(FORM_MAX_AGE.total_seconds()),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/subscribe",
        )
        return response

    def disabled() -> Response:
        return _message_page(
            subs,
            "Sign-up is closed",
            "This news service does not take sign-ups on the web. "
            "Please ask the cluster office to add you.",
            404,
        )

    def sent_page() -> Response:
        return _message_page(
            subs,
            "Please check your inbox",
            "If the address can receive our news, a mail with a link to confirm is on its "
            "way. Nothing is sent to you until you confirm.",
        )

    async def subscribe(request: Request) -> Response:
        if not service.config.signup.enabled:
            return disabled()
        if request.method == "GET":
            return signup_page(request)
        fields = await _fields(request)
        values = dict(fields)
        if not form_token_matches(
            subs.secret,
            values.get("form_token", ""),
            request.cookies.get(CSRF_COOKIE, ""),
            service.clock(),
            FORM_MAX_AGE,
        ):
            return _message_page(
                subs,
                "Please try again",
                "The form had expired or came from another page. Please open the "
                "sign-up page again and send the form from there.",
                403,
                "/subscribe",
                "Open the sign-up page",
            )
        if values.get(HONEYPOT):
            log.info("sign-up refused: the hidden field was filled in (a bot)")
            return sent_page()
        kept = [f for f in fields if f[0] not in ("form_token", HONEYPOT)]
        try:
            email, prefs = read_signup(kept, subs.choices)
        except FormError as exc:
            shown = values.get("email", "")
            return signup_page(
                request,
                status=400,
                error=exc,
                email="" if exc.field == "email" and "\n" in shown else shown,
            )
        ip_hash = client(request)
        client_ok, address_ok = await run_in_threadpool(subs.allowed, email, ip_hash)
        if not client_ok:
            return _message_page(
                subs,
                "Too many sign-ups",
                "Too many sign-ups came from your network. Please try again in an hour.",
                429,
            )
        if address_ok:
            try:
                await subs.sign_up(email, prefs, ip_hash=ip_hash)
            except (TemporaryFailure, PermanentFailure, OSError) as exc:
                log.error("could not send the sign-up mail: %s", exc)
                return _message_page(
                    subs,
                    "Please try again later",
                    "We could not send the confirmation mail just now.",
                    503,
                )
        return sent_page()

    async def confirm(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            if request.method == "GET":
                # Only check the link; the button confirms (link scanners press nothing).
                await run_in_threadpool(
                    read_timed_token,
                    subs.secret,
                    CONFIRM,
                    token,
                    service.store.email_of,
                    service.clock(),
                    timedelta(hours=service.config.signup.confirm_hours),
                )
                return _page(subs, "confirm.html", action=f"/confirm/{token}")
            membership = await run_in_threadpool(subs.confirm, token, ip_hash=client(request))
        except InvalidToken as exc:
            return _bad_link(subs, exc)
        if membership.status != "confirmed":
            return _message_page(
                subs,
                "This sign-up was withdrawn",
                "The address was unsubscribed since. Please sign up again.",
                400,
                "/subscribe",
                "Sign up again",
            )
        return _message_page(
            subs,
            "You are subscribed",
            f"Thank you. {service.config.cluster.name} news will come to "
            f"{membership.subscriber.email}. Every mail has a link to change what you get "
            "or to leave.",
            link=subs.preferences_url(membership.subscriber),
            link_text="Your preferences",
        )

    async def preferences(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            membership = await run_in_threadpool(subs.member_for, token)
        except InvalidToken as exc:
            return _bad_link(subs, exc)
        if membership.status != "confirmed":
            return _message_page(
                subs,
                "You do not receive our news",
                f"{membership.subscriber.email} is not subscribed (any more).",
                link="/subscribe" if service.config.signup.enabled else None,
                link_text="Sign up",
            )
        saved = False
        error: FormError | None = None
        if request.method == "POST":
            try:
                prefs = read_preferences(await _fields(request), subs.choices)
            except FormError as exc:
                error = exc
            else:
                await run_in_threadpool(
                    service.store.set_preferences,
                    membership.subscriber.id or 0,
                    service.clock(),
                    topics=prefs.topics,
                    languages=prefs.languages,
                    frequency=prefs.frequency,
                    paused=prefs.paused,
                    form_version=service.config.signup.form_version,
                    ip_hash=client(request),
                )
                return RedirectResponse(
                    local_location(f"/preferences/{token}", "saved=1"), status_code=303
                )
        saved = request.query_params.get("saved") == "1"
        sub = membership.subscriber
        return _page(
            subs,
            "preferences.html",
            400 if error else 200,
            choices=subs.choices,
            email=sub.email,
            saved=saved,
            error=error,
            prefs=Preferences(sub.topics, sub.languages, sub.frequency, membership.paused),
            action=f"/preferences/{token}",
            unsubscribe=f"/unsubscribe/{token}",
        )

    async def unsubscribe(request: Request) -> Response:
        token = request.path_params["token"]
        try:
            membership = await run_in_threadpool(subs.member_for, token)
        except InvalidToken as exc:
            return _bad_link(subs, exc)
        if request.method == "GET":
            return _page(
                subs,
                "unsubscribe.html",
                action=f"/unsubscribe/{token}",
                email=membership.subscriber.email,
            )
        # RFC 8058: a POST unsubscribes at once. Mail providers post
        # "List-Unsubscribe=One-Click" without cookies or a form token; the token in
        # the URL is the proof, so nothing else is asked for.
        await run_in_threadpool(
            service.store.unsubscribe,
            membership.subscriber.id or 0,
            service.clock(),
            ip_hash=client(request),
        )
        return _message_page(
            subs,
            "You are unsubscribed",
            f"{membership.subscriber.email} will get no more news from "
            f"{service.config.cluster.name}.",
            link="/subscribe" if service.config.signup.enabled else None,
            link_text="Changed your mind? Sign up again",
        )

    return [
        Route("/subscribe", from_our_pages(subscribe), methods=["GET", "POST"]),
        Route("/confirm/{token}", from_our_pages(confirm), methods=["GET", "POST"]),
        Route("/preferences/{token}", from_our_pages(preferences), methods=["GET", "POST"]),
        Route(
            "/unsubscribe/{token}",
            from_our_pages(unsubscribe, one_click=True),
            methods=["GET", "POST"],
        ),
    ]


def consent_row(choices: Mapping[str, object]) -> str:
    """Choices as one readable cell for the consent export."""
    parts = []
    for key in ("topics", "languages", "frequency", "paused"):
        if key in choices:
            value = choices[key]
            if isinstance(value, list | tuple):
                value = ";".join(str(v) for v in value) or "all"
            parts.append(f"{key}={value}")
    return " ".join(parts)
