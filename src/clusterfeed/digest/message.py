"""A rendered digest as an e-mail message: headers, parts, and its bytes on the wire.

Deterministic for a given delivery, Message-ID included, so a message sent again after
a crash is byte for byte the one that was meant. Every text that reaches a header
passes ``one_line``, so a partner's title can never start a header of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from datetime import datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.policy import SMTP, SMTPUTF8
from email.utils import format_datetime, getaddresses, parseaddr
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from clusterfeed.config import Config
from clusterfeed.digest.render import DigestLinks, RenderedDigest, one_line
from clusterfeed.model import Subscriber

# RFC 5322 allows 998 characters a line; 78 is only a recommendation. Python folds a
# long header without spaces (a List-Unsubscribe URL) by turning it into RFC 2047
# encoded words, which mail clients then cannot use as a URL. So fold at 998.
MAIL_POLICY = SMTP.clone(max_line_length=998)
MAIL_POLICY_UTF8 = SMTPUTF8.clone(max_line_length=998)


def message_id(digest_key: str, subscriber_id: int, from_address: str) -> str:
    """A Message-ID fixed by the digest and the subscriber, so a resend is recognisable."""
    try:
        domain = address(from_address).domain  # an IDN in its ASCII form, as in From
    except ValueError:
        domain = ""
    if not domain or not domain.isascii():
        domain = "clusterfeed.invalid"
    token = hashlib.sha256(f"{digest_key}\x1f{subscriber_id}".encode()).hexdigest()[:32]
    return f"<{token}.{subscriber_id}@{domain}>"


def list_id(config: Config) -> str:
    host = urlsplit(config.web.base_url).hostname or "clusterfeed.invalid"
    name = one_line(f"{config.cluster.name} digest").replace('"', "'")
    return f'"{name}" <digest.{host}>'


def address(value: str) -> Address:
    name, addr = parseaddr(one_line(value, 500))
    if not addr or "@" not in addr:
        raise ValueError(f"not an e-mail address: {value!r}")
    local, _, domain = addr.rpartition("@")
    if not domain.isascii():
        # An internationalized domain goes into headers in its IDNA form (xn--…); left
        # as it is, the email package writes it as an encoded word no server can route.
        from email_validator import EmailNotValidError, validate_email

        with contextlib.suppress(EmailNotValidError):
            domain = validate_email(addr, check_deliverability=False).ascii_domain
    return Address(display_name=one_line(name, 100), username=local, domain=domain)


def recipient(subscriber: Subscriber) -> Address:
    """The To address. The name is taken as it is, not parsed out of "name <address>":
    a name such as ``Söhne <GmbH>`` would otherwise hide the address and stop the mail."""
    mailbox = address(subscriber.email)
    if not subscriber.name:
        return mailbox
    return Address(
        display_name=one_line(subscriber.name, 100),
        username=mailbox.username,
        domain=mailbox.domain,
    )


def build_message(
    config: Config,
    rendered: RenderedDigest,
    *,
    to: Subscriber,
    message_id: str,
    slot: datetime,
    links: DigestLinks,
) -> EmailMessage:
    """The complete multipart/alternative message, text first as RFC 2046 asks."""
    msg = EmailMessage()
    msg["From"] = address(config.digest.from_address)
    msg["To"] = recipient(to)
    if config.digest.reply_to:
        msg["Reply-To"] = [address(a) for _n, a in getaddresses([config.digest.reply_to]) if a]
    msg["Subject"] = rendered.subject
    msg["Date"] = format_datetime(slot.astimezone(ZoneInfo(config.schedule.timezone)))
    msg["Message-ID"] = message_id
    msg["List-Id"] = list_id(config)
    msg["List-Unsubscribe"] = f"<{links.unsubscribe_url}>"
    msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    msg["Precedence"] = "bulk"
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content(rendered.text, subtype="plain", charset="utf-8", cte="quoted-printable")
    msg.add_alternative(rendered.html, subtype="html", charset="utf-8", cte="quoted-printable")
    msg.set_boundary(boundary_for(message_id))
    return msg


def needs_utf8(message: EmailMessage) -> bool:
    """True for mail to or from an internationalized mailbox (``jürgen@…``): its
    headers must carry the address in UTF-8 (RFC 6532) and the server must offer
    SMTPUTF8 (RFC 6531). An encoded word is no way out: it is not allowed in an
    address, and no server routes it."""
    return any(
        not a.username.isascii()
        for name in ("From", "To")
        if (header := message[name]) is not None
        for a in header.addresses
    )


def message_bytes(message: EmailMessage) -> bytes:
    """The message as it goes on the wire (CRLF line ends, headers never mangled)."""
    return message.as_bytes(policy=MAIL_POLICY_UTF8 if needs_utf8(message) else MAIL_POLICY)


def boundary_for(message_id: str) -> str:
    """A multipart boundary fixed by the Message-ID (the email package would draw a
    random one), so a message sent again is byte-for-byte the same. Both parts are
    quoted-printable, where a line can never begin with ``--=``."""
    number = int(hashlib.sha256(message_id.encode()).hexdigest()[:16], 16) % sys.maxsize
    return f"==============={number:019d}=="
