"""Where messages go: a Maildir folder or an SMTP server, and what their answers mean.

A transport takes a message (an ``EmailMessage``, or its bytes already made in a
worker process) and a key, and either accepts it or raises ``TemporaryFailure`` (try
again later) or ``PermanentFailure`` (this address refuses; ``SetupFailure`` when the
server refuses *us*, so no delivery can succeed). A Maildir delivery can be checked on
disk afterwards by its key, which is what makes it exactly once after a crash.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import aiosmtplib

from clusterfeed.config import MailConfig
from clusterfeed.delivery.dkim import DkimSigner, make_signer
from clusterfeed.delivery.pacing import RateLimiter
from clusterfeed.digest.message import message_bytes
from clusterfeed.store import Delivery


class TemporaryFailure(Exception):
    """Try again later (a 4xx answer, a dropped connection)."""


class PermanentFailure(Exception):
    """Do not try again (a 5xx answer: the address or the message is refused).

    ``address`` says whether the refusal counts against the address (towards marking
    it bouncing).
    """

    def __init__(self, message: str, *, address: bool = True) -> None:
        super().__init__(message)
        self.address = address


class SetupFailure(PermanentFailure):
    """The server refuses *us* (login, sender address): no delivery can succeed, so the
    run stops and leaves every delivery waiting instead of failing them all."""

    def __init__(self, message: str) -> None:
        super().__init__(message, address=False)


@dataclass(frozen=True)
class Prepared:
    """A message already turned into its bytes (rendered in a worker process, where an
    ``EmailMessage`` would cost a second serialization to carry back)."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes


Outgoing = EmailMessage | Prepared


def prepare(message: EmailMessage) -> Prepared:
    return Prepared(
        message["From"].addresses[0].addr_spec,
        tuple(a.addr_spec for a in message["To"].addresses),
        message_bytes(message),
    )


class Transport(Protocol):
    """Where messages go. ``connections`` is how many sends may run at once."""

    connections: int

    async def send(self, message: Outgoing, key: str, slot: int) -> None: ...

    def is_delivered(self, key: str) -> bool: ...

    async def close(self) -> None: ...


def delivery_token(delivery: Delivery) -> str:
    """A file-name-safe key for one delivery, stable across restarts."""
    digest = hashlib.sha256(delivery.message_id.encode()).hexdigest()[:16]
    return f"cf{delivery.id}x{digest}"


def wire_bytes(message: Outgoing, signer: DkimSigner | None) -> bytes:
    data = message.data if isinstance(message, Prepared) else message_bytes(message)
    return signer.sign(data) if signer is not None else data


class MaildirTransport:
    """Writes each message as one file into a Maildir (``tmp/`` → ``new/``).

    This is the embedded default: nothing to install, and any mail client or a text
    editor can open the result. The move from tmp/ to new/ is atomic, and the file name
    carries the delivery's key, so after a crash ``is_delivered`` knows for sure.
    """

    connections = 1

    def __init__(self, folder: Path, signer: DkimSigner | None = None) -> None:
        self.folder = folder
        self.signer = signer
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    async def send(self, message: Outgoing, key: str, slot: int = 0) -> None:
        data = wire_bytes(message, self.signer)
        # ".eml" so that a double click opens the message in a mail client (the issue
        # promises "one .eml per message"); Maildir readers accept any unique name.
        name = f"{int(time.time())}.{key}.{self._host}.eml"
        tmp = self.folder / "tmp" / name
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.folder / "new" / name)

    def is_delivered(self, key: str) -> bool:
        token = f".{key}."
        return any(
            token in entry.name for sub in ("new", "cur") for entry in os.scandir(self.folder / sub)
        )

    async def close(self) -> None:
        return None


def _counts_against_address(code: int, message: str) -> bool:
    """A 5xx after DATA may be about the content (5.7.x policy, 5.6.x media) rather than
    the mailbox; those do not make an address bouncing."""
    status = message.split(" ", 1)[0]
    return not (status.startswith(("5.6.", "5.7.")) and code >= 500)


async def _greet(client: aiosmtplib.SMTP) -> None:
    if client.is_ehlo_or_helo_needed:
        try:
            await client.ehlo()
        except aiosmtplib.SMTPHeloError:
            await client.helo()  # a server from before ESMTP


async def _hand_over(
    client: aiosmtplib.SMTP,
    sender: str,
    recipients: Sequence[str],
    data: bytes,
    options: Sequence[str],
) -> None:
    """``client.sendmail``'s commands, with the same reset after a refusal, without its
    first pass over the message: sendmail normalizes the line ends of the whole message
    only to count its SIZE, and data() normalizes them again as it sends. That first
    pass cost about a tenth of the sending process's CPU (``bench/RESULTS.md``). The
    messages clusterfeed writes end every line in CRLF already (tests check both ways
    of composing), so their length is their SIZE."""
    await _greet(client)
    encoding = "utf-8" if "SMTPUTF8" in options else "ascii"
    mail_options = list(options)
    if client.supports_extension("size"):
        mail_options.insert(0, f"size={len(data)}")
    try:
        await client.mail(sender, options=mail_options, encoding=encoding)
        refused = []
        for address in recipients:
            try:
                await client.rcpt(address, encoding=encoding)
            except aiosmtplib.SMTPRecipientRefused as exc:
                refused.append(exc)
        if len(refused) == len(recipients):
            raise aiosmtplib.SMTPRecipientsRefused(refused)
        await client.data(data)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            await client.rset()  # a clean envelope for the connection's next message
        raise


class SmtpTransport:
    """Sends over SMTP with up to ``connections`` connections, each reused for many mails.

    Every connection has at most one message in flight and its worker records the
    server's answer before it hands over the next one: that is what bounds the
    duplicate window to one message per connection.
    """

    def __init__(
        self,
        config: MailConfig,
        *,
        signer: DkimSigner | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.config = config
        self.connections = config.connections
        self.signer = signer
        self.limiter = limiter
        self._clients: dict[int, aiosmtplib.SMTP] = {}
        self._password = os.environ.get(config.password_env) if config.password_env else None

    async def _client(self, slot: int) -> aiosmtplib.SMTP:
        client = self._clients.get(slot)
        if client is not None and client.is_connected:
            return client
        cfg = self.config
        client = aiosmtplib.SMTP(
            hostname=cfg.host,
            port=cfg.effective_port,
            use_tls=cfg.security == "tls",
            start_tls=cfg.security == "starttls",
            timeout=cfg.timeout_seconds,
        )
        try:
            await client.connect()
            if cfg.username:
                await client.login(cfg.username, self._password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            client.close()
            raise SetupFailure(
                f"the SMTP server {cfg.host} refused the login of {cfg.username} "
                f"({exc.code} {exc.message}); check mail.username and the password in "
                f"${cfg.password_env}"
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TemporaryFailure(
                f"cannot connect to {cfg.host}:{cfg.effective_port}: {exc}"
            ) from exc
        self._clients[slot] = client
        return client

    async def send(self, message: Outgoing, key: str, slot: int = 0) -> None:
        data = wire_bytes(message, self.signer)
        if isinstance(message, Prepared):
            sender, recipients = message.sender, list(message.recipients)
        else:
            sender = message["From"].addresses[0].addr_spec
            recipients = [a.addr_spec for a in message["To"].addresses]
        client = await self._client(slot)
        if self.limiter is not None:
            await self.limiter.acquire()
        try:
            options = await self._options(client, sender, recipients)
            await _hand_over(client, sender, recipients, data, options)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if all(400 <= c < 500 for c in codes):
                raise TemporaryFailure(text) from exc
            raise PermanentFailure(text) from exc
        except aiosmtplib.SMTPSenderRefused as exc:
            if 400 <= exc.code < 500:
                raise TemporaryFailure(f"{exc.code} {exc.message}") from exc
            raise SetupFailure(
                f"the SMTP server {self.config.host} refuses the sender {exc.sender} "
                f"({exc.code} {exc.message}); check digest.from and what the server "
                "allows this login to send as"
            ) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise TemporaryFailure(f"{exc.code} {exc.message}") from exc
            raise PermanentFailure(
                f"{exc.code} {exc.message}",
                address=_counts_against_address(exc.code, exc.message),
            ) from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._clients.pop(slot, None)
            raise TemporaryFailure(f"connection lost: {exc}") from exc

    async def _options(
        self, client: aiosmtplib.SMTP, sender: str, recipients: Sequence[str]
    ) -> list[str]:
        """SMTPUTF8 for a mailbox with non-ASCII characters (RFC 6531); a server that
        does not offer it cannot take such a message at all, now or later."""
        if sender.isascii() and all(r.isascii() for r in recipients):
            return []
        await _greet(client)  # what the server offers is known only after EHLO
        if not client.supports_extension("smtputf8"):
            raise PermanentFailure(
                f"{', '.join(recipients)} has non-ASCII characters before the @, and the "
                f"SMTP server {self.config.host} does not offer SMTPUTF8 (RFC 6531), which "
                "such an address needs; a server that offers it (Postfix does by default) "
                "can deliver it",
                address=False,
            )
        return ["SMTPUTF8"]

    def is_delivered(self, key: str) -> bool:
        return False

    async def close(self) -> None:
        for client in self._clients.values():
            try:
                if client.is_connected:
                    await client.quit()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
        self._clients.clear()


def make_transport(config: MailConfig, config_file: Path = Path("clusterfeed.toml")) -> Transport:
    """The configured transport; ``config_file`` names the file in key errors."""
    signer = make_signer(config, config_file)
    if config.transport == "smtp":
        limiter = RateLimiter(config.rate_per_minute / 60) if config.rate_per_minute else None
        return SmtpTransport(config, signer=signer, limiter=limiter)
    return MaildirTransport(config.maildir, signer)
