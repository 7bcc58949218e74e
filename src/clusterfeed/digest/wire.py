"""The wire form of a digest message without EmailMessage objects.

``message.build_message`` + ``message.message_bytes`` spend most of a message's time
building and folding header objects that are the same in every message of a digest.
``MessageWriter`` folds each header with the same email package functions, but the
shared ones once, and encodes the bodies with the same quoted-printable encoder, so its
bytes equal ``message_bytes(build_message(...))`` (tests compare the two for every
subscriber).
"""

from __future__ import annotations

import email.policy
import re
from datetime import datetime
from email import quoprimime
from email.headerregistry import Address
from email.utils import format_datetime, getaddresses
from typing import Any
from zoneinfo import ZoneInfo

from clusterfeed.config import Config
from clusterfeed.digest.message import MAIL_POLICY, address, boundary_for, list_id
from clusterfeed.digest.render import DigestLinks

_HEADER_POLICY = email.policy.default  # what EmailMessage() stores headers with
# The HTML part repeats MIME-Version: ``add_alternative`` makes it an EmailMessage of its
# own, which adds one. Harmless, and kept so the bytes stay the same.
_PART_HEAD = {
    subtype: b"".join(
        MAIL_POLICY.fold_binary(n, _HEADER_POLICY.header_store_parse(n, v)[1])
        for n, v in (
            ("Content-Type", f'text/{subtype}; charset="utf-8"'),
            ("Content-Transfer-Encoding", "quoted-printable"),
            *([("MIME-Version", "1.0")] if subtype == "html" else []),
        )
    )
    + b"\r\n"
    for subtype in ("plain", "html")
}
_BODY_LINE = _HEADER_POLICY.max_line_length or 78  # where set_content breaks body lines
_TRAILER = (
    ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"),
    ("Precedence", "bulk"),
    ("Auto-Submitted", "auto-generated"),
    ("MIME-Version", "1.0"),
)


_MULTIPART = 'multipart/alternative; boundary="{}"'


def fold(name: str, value: Any) -> bytes:
    """One header as ``message_bytes`` writes it (a value with a line break is refused,
    as ``EmailMessage`` refuses it)."""
    return MAIL_POLICY.fold_binary(name, _HEADER_POLICY.header_store_parse(name, value)[1])


# ``fold`` parses every value with the email package's header parser, about a tenth of
# a millisecond per header, which made folding most of the per-subscriber cost of a
# message. The values below (an ASCII name made of plain words, a plain address, our
# own Message-IDs, an unsubscribe URL without blanks) come out of that parser
# unchanged and fit one line, so they are written as they are; anything else still
# goes through ``fold``. Tests compare both ways on generated values.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_NAME = re.compile(rf"{_ATOM}(?: {_ATOM})*")
_PLAIN_ADDRESS = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@{_DOMAIN}")
_PLAIN_MESSAGE_ID = re.compile(rf"<{_ATOM}(?:\.{_ATOM})*@{_DOMAIN}>")
_PLAIN_URL = re.compile(r"<[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;%=]+>")
_LONGEST_LINE = (MAIL_POLICY.max_line_length or 998) - 2


def _unchanged(name: str, value: str) -> bytes | None:
    line = f"{name}: {value}"
    if len(line) > _LONGEST_LINE or "=?" in value:
        return None  # folded, or read as an encoded word
    return f"{line}\r\n".encode("ascii")


def fold_to(to: Address) -> bytes:
    """``fold("To", to)``, without parsing the common case."""
    name, addr = to.display_name, to.addr_spec
    if _PLAIN_ADDRESS.fullmatch(addr) and (not name or _PLAIN_NAME.fullmatch(name)):
        folded = _unchanged("To", f"{name} <{addr}>" if name else addr)
        if folded is not None:
            return folded
    return fold("To", to)


def fold_message_id(value: str) -> bytes:
    """``fold("Message-ID", value)``, without parsing the IDs ``message_id`` makes."""
    folded = _unchanged("Message-ID", value) if _PLAIN_MESSAGE_ID.fullmatch(value) else None
    return folded if folded is not None else fold("Message-ID", value)


def fold_unsubscribe(url: str) -> bytes:
    """``fold("List-Unsubscribe", f"<{url}>")``, without parsing a URL without blanks."""
    value = f"<{url}>"
    folded = _unchanged("List-Unsubscribe", value) if _PLAIN_URL.fullmatch(value) else None
    return folded if folded is not None else fold("List-Unsubscribe", value)


def quoted_printable(text: str) -> bytes:
    """A text part's body as ``set_content(..., cte="quoted-printable")`` encodes it."""
    lines = text.encode("utf-8").splitlines()
    encoded = quoprimime.body_encode((b"\n".join(lines) + b"\n").decode("latin-1"), _BODY_LINE)
    return encoded.replace("\n", "\r\n").encode("ascii")


class MessageWriter:
    """Writes digest messages' wire bytes; folds the headers a digest shares once."""

    def __init__(self, config: Config) -> None:
        self.config = config
        cfg = config.digest
        head = fold("From", address(cfg.from_address))
        self._from = head
        self._reply_to = (
            fold("Reply-To", [address(a) for _n, a in getaddresses([cfg.reply_to]) if a])
            if cfg.reply_to
            else b""
        )
        self._list_id = fold("List-Id", list_id(config))
        self._trailer = b"".join(fold(n, v) for n, v in _TRAILER)
        self._subjects: dict[str, bytes] = {}
        self._dates: dict[datetime, bytes] = {}
        # Every boundary has the same length and characters, so its header folds the
        # same way each time: fold one, then fill in the others (checked here, once).
        sample = boundary_for("<sample@clusterfeed.invalid>")
        head, _, tail = fold("Content-Type", _MULTIPART.format(sample)).partition(
            sample.encode("ascii")
        )
        self._content_type = (head, tail) if tail else None

    def _multipart(self, boundary: bytes) -> bytes:
        if self._content_type is None:
            return fold("Content-Type", _MULTIPART.format(boundary.decode("ascii")))
        head, tail = self._content_type
        return head + boundary + tail

    def _subject(self, subject: str) -> bytes:
        folded = self._subjects.get(subject)
        if folded is None:
            if len(self._subjects) > 1000:
                self._subjects.clear()
            folded = self._subjects[subject] = fold("Subject", subject)
        return folded

    def _date(self, slot: datetime) -> bytes:
        folded = self._dates.get(slot)
        if folded is None:
            local = slot.astimezone(ZoneInfo(self.config.schedule.timezone))
            folded = self._dates[slot] = fold("Date", format_datetime(local))
        return folded

    def write(
        self,
        subject: str,
        text: bytes,
        html: bytes,
        *,
        to: Address,
        message_id: str,
        slot: datetime,
        links: DigestLinks,
    ) -> bytes:
        """The message; ``text`` and ``html`` are already quoted-printable."""
        boundary = boundary_for(message_id).encode("ascii")
        return b"".join(
            (
                self._from,
                fold_to(to),
                self._reply_to,
                self._subject(subject),
                self._date(slot),
                fold_message_id(message_id),
                self._list_id,
                fold_unsubscribe(links.unsubscribe_url),
                self._trailer,
                self._multipart(boundary),
                b"\r\n--", boundary, b"\r\n",
                _PART_HEAD["plain"], text,
                b"\r\n--", boundary, b"\r\n",
                _PART_HEAD["html"], html,
                b"\r\n--", boundary, b"--\r\n",
            )
        )  # fmt: skip
