"""Subscribing, confirming, changing and leaving: the decisions joined to their effects.

A newsletter in Europe must prove consent, so a sign-up only asks; the address gets a
mail with a signed link that expires, and only the click on that link (and a press of
the button on the page it opens, so that a mail scanner that follows links confirms
nothing) makes the address a subscriber. Every change of consent lands in the consent
log with the version of the form text the person saw.

Nobody may learn from the form whether an address is subscribed: a new address, a
subscribed one, an erased one and one over its rate limit all get the same page; what
differs is only the mail, which goes to the owner of the address alone.

The pure decisions (reading and checking a form, what a sign-up leads to) are in
``forms``; ``Subscriptions`` here joins them to the store, the clock, the secret and
the mail transport; ``web.signup`` puts them on the web app. The pages and mails are
jinja2 templates that an operator can override like the digest templates.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
from starlette.concurrency import run_in_threadpool

from clusterfeed.app.service import Service
from clusterfeed.config import Config
from clusterfeed.delivery.transports import make_transport
from clusterfeed.digest.message import address
from clusterfeed.digest.render import template_dir
from clusterfeed.model import Membership, Subscriber
from clusterfeed.resources import default_template_dir
from clusterfeed.subscribers.forms import Preferences, offered_choices, signup_outcome
from clusterfeed.subscribers.tokens import (
    CONFIRM,
    UNSUBSCRIBE,
    InvalidToken,
    keyed_hash,
    make_timed_token,
    make_token,
    read_timed_token,
    read_token,
    suppression_hash,
)

log = logging.getLogger(__name__)

UNCONFIRMED_GRACE = timedelta(days=7)


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
