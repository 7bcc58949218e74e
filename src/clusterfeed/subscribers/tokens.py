"""Signed tokens for links in mails (unsubscribe, preferences).

A token is a subscriber id plus a signature over the id, the purpose and the
subscriber's address, made with the installation's secret. It is short (links stay
readable and headers need no folding), it does not reveal the address in web-server
logs, it cannot be guessed or edited to act on another subscriber, and it stops
working when the address behind the id changes. itsdangerous does the signing,
because a hand-rolled HMAC format is an easy place for subtle mistakes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from datetime import datetime, timedelta

from itsdangerous import BadSignature, SignatureExpired, Signer, TimestampSigner

UNSUBSCRIBE = "clusterfeed.unsubscribe.v1"
CONFIRM = "clusterfeed.confirm.v1"
FORM = "clusterfeed.form.v1"


class InvalidToken(Exception):
    """The token was not made by this installation, or was altered."""


class ExpiredToken(InvalidToken):
    """The token was made here but is older than it may be."""


def keyed_hash(secret: str, purpose: str, value: str) -> str:
    """An HMAC-SHA256 of ``value``: the same input gives the same hash, but without the
    secret nobody can test a guessed address or IP against it (a plain hash of an
    e-mail address is reversed by trying a list of addresses)."""
    key = hashlib.sha256(f"{purpose}\x1f{secret}".encode()).digest()
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()


def suppression_key(secret: str) -> str:
    """The key of the suppression list's hashes, derived from the signing secret.

    It is stored on first use and kept when the secret changes later (set in the
    environment, rotated): hashes made with another key would no longer recognise the
    addresses erased before. Derived one way, it reveals nothing of the secret.
    """
    return hashlib.sha256(f"suppress\x1f{secret}".encode()).hexdigest()


def suppression_hash(key: str, email: str) -> str:
    """What the suppression list keeps of an erased address (``key`` from
    ``suppression_key``); the same as ``keyed_hash(secret, "suppress", email)``."""
    return hmac.new(bytes.fromhex(key), email.strip().lower().encode(), hashlib.sha256).hexdigest()


class _ClockedSigner(TimestampSigner):
    """A timestamp signer that reads the service's clock, so expiry is testable."""

    def __init__(self, secret: str, salt: str, now: datetime) -> None:
        super().__init__(secret, salt=salt)
        self._now = int(now.timestamp())

    def get_timestamp(self) -> int:
        return self._now


def make_timed_token(
    secret: str, purpose: str, subscriber_id: int, email: str, now: datetime
) -> str:
    """Like ``make_token``, with the time it was made, for links that must expire."""
    signer = _ClockedSigner(secret, f"{purpose}\x1f{email.strip().lower()}", now)
    return signer.sign(str(subscriber_id)).decode("ascii")


def read_timed_token(
    secret: str,
    purpose: str,
    token: str,
    email_of: Callable[[int], str | None],
    now: datetime,
    max_age: timedelta,
) -> int:
    """The subscriber id in a timed token; ``ExpiredToken`` when it is older than ``max_age``."""
    email = _claimed_email(token, email_of)
    signer = _ClockedSigner(secret, f"{purpose}\x1f{email.strip().lower()}", now)
    try:
        value = signer.unsign(token, max_age=int(max_age.total_seconds()))
    except SignatureExpired as exc:
        raise ExpiredToken("token has expired") from exc
    except BadSignature as exc:
        raise InvalidToken("token signature does not match") from exc
    return int(value)


def make_form_token(secret: str, nonce: str, now: datetime) -> str:
    """The CSRF value for a form: the browser's cookie nonce, signed with a time."""
    return _ClockedSigner(secret, FORM, now).sign(nonce).decode("ascii")


def form_token_matches(
    secret: str, token: str, nonce: str, now: datetime, max_age: timedelta
) -> bool:
    """Whether a posted form token was made here, recently, for this browser's cookie."""
    if not token or not nonce:
        return False
    try:
        value = _ClockedSigner(secret, FORM, now).unsign(
            token, max_age=int(max_age.total_seconds())
        )
    except BadSignature:
        return False
    return hmac.compare_digest(value, nonce.encode())


# What a token made here looks like: a subscriber id, then itsdangerous' base64 parts
# (with a timestamp part for timed tokens). ASCII digits only: "²".isdigit() is true.
_TOKEN = re.compile(r"([1-9][0-9]{0,9})\.[A-Za-z0-9_.-]{1,200}")
# The largest id the store's integer column holds on every database (PostgreSQL's
# integer is 32 bits); a larger one could not be looked up, only fail.
MAX_ID = 2**31 - 1


def token_id(token: str) -> int:
    """The subscriber id a token claims, or ``InvalidToken`` for anything that is not
    shaped like a token made here (checked before the store is asked)."""
    match = _TOKEN.fullmatch(token)
    if match is None or int(match.group(1)) > MAX_ID:
        raise InvalidToken("malformed token")
    return int(match.group(1))


def _claimed_email(token: str, email_of: Callable[[int], str | None]) -> str:
    """The address of the id a token names, before its signature is checked against it.
    An unknown id fails like a bad signature, so tokens reveal nothing about which ids
    exist."""
    email = email_of(token_id(token))
    if email is None:
        raise InvalidToken("token signature does not match")
    return email


def _signer(secret: str, purpose: str, email: str) -> Signer:
    return Signer(secret, salt=f"{purpose}\x1f{email.strip().lower()}")


def make_token(secret: str, purpose: str, subscriber_id: int, email: str) -> str:
    """A URL-safe token binding ``purpose`` to one subscriber id and its address."""
    return _signer(secret, purpose, email).sign(str(subscriber_id)).decode("ascii")


def read_token(secret: str, purpose: str, token: str, email_of: Callable[[int], str | None]) -> int:
    """The subscriber id in ``token``, after checking it against that subscriber's address.

    ``email_of`` looks the id up (in the store); an unknown id is refused like a bad
    signature, so a token reveals nothing about which ids exist.
    """
    email = _claimed_email(token, email_of)
    try:
        value = _signer(secret, purpose, email).unsign(token)
    except BadSignature as exc:
        raise InvalidToken("token signature does not match") from exc
    return int(value)
