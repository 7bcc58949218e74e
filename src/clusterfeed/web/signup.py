"""The sign-up, confirm, preferences and unsubscribe pages on the web app.

Thin: each route reads the request, lets ``subscribers.subscribe.Subscriptions``
decide and act, and renders the operator's page template. Every form carries a token
and a cookie of this site and must come from our own pages (``webguard``), links in
mails are checked before anything changes, and a bad or expired link gets a page
that says what to do. The pages are themed from ``[cluster]`` and work without
JavaScript.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from clusterfeed.app.service import Service
from clusterfeed.delivery.transports import PermanentFailure, TemporaryFailure
from clusterfeed.subscribers.forms import (
    HONEYPOT,
    FormError,
    Preferences,
    language_label,
    read_preferences,
    read_signup,
    topic_label,
)
from clusterfeed.subscribers.subscribe import Subscriptions
from clusterfeed.subscribers.tokens import (
    CONFIRM,
    ExpiredToken,
    InvalidToken,
    form_token_matches,
    make_form_token,
    read_timed_token,
)
from clusterfeed.web.webguard import SameOriginForms, local_location

log = logging.getLogger(__name__)

CSRF_COOKIE = "clusterfeed_form"
FORM_MAX_AGE = timedelta(hours=12)


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
                    service.queries.email_of,
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
                    service.commands.set_preferences,
                    membership.subscriber.id or 0,
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
            service.commands.unsubscribe,
            membership.subscriber.id or 0,
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
