"""Signed tokens for links in mails (unsubscribe, preferences).

A token is a subscriber id plus a signature over the id, the purpose and the
subscriber's address, made with the installation's secret. It is short (links stay
readable and headers need no folding), it does not reveal the address in web-server
logs, it cannot be guessed or edited to act on another subscriber, and it stops
working when the address behind the id changes. itsdangerous does the signing,
because a hand-rolled HMAC format is an easy place for subtle mistakes.
"""

from __future__ import annotations

from collections.abc import Callable

from itsdangerous import BadSignature, Signer

UNSUBSCRIBE = "clusterfeed.unsubscribe.v1"


class InvalidToken(Exception):
    """The token was not made by this installation, or was altered."""


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
    head, sep, _ = token.partition(".")
    if not sep or not head.isdigit():
        raise InvalidToken("malformed token")
    email = email_of(int(head))
    if email is None:
        raise InvalidToken("token signature does not match")
    try:
        value = _signer(secret, purpose, email).unsign(token)
    except BadSignature as exc:
        raise InvalidToken("token signature does not match") from exc
    return int(value)
