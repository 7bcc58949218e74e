"""Hand digests to a mail transport, each exactly once.

The outbox lives in the store: one row per (digest, subscriber). A worker claims a
row, renders the message, hands it to the transport and records the acceptance, in
that order. If the process dies, the next start releases its claims: a Maildir
delivery can be checked on disk (its file name carries the delivery's key), so it is
exactly-once; an SMTP server's acceptance cannot be checked afterwards, so the only
message that can arrive twice is one accepted in the instant between the server's
"250 OK" and the store's commit, at most one per open connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import aiosmtplib

from clusterfeed.config import MailConfig
from clusterfeed.digest import message_bytes
from clusterfeed.store import Delivery, Store, worker_id

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 5
CLAIM_LEASE = timedelta(minutes=15)


class TemporaryFailure(Exception):
    """Try again later (a 4xx answer, a dropped connection)."""


class PermanentFailure(Exception):
    """Do not try again (a 5xx answer: the address or the message is refused)."""


class Transport(Protocol):
    """Where messages go. ``connections`` is how many sends may run at once."""

    connections: int

    async def send(self, message: EmailMessage, key: str, slot: int) -> None: ...

    def is_delivered(self, key: str) -> bool: ...

    async def close(self) -> None: ...


def delivery_token(delivery: Delivery) -> str:
    """A file-name-safe key for one delivery, stable across restarts."""
    digest = hashlib.sha256(delivery.message_id.encode()).hexdigest()[:16]
    return f"cf{delivery.id}x{digest}"


class MaildirTransport:
    """Writes each message as one file into a Maildir (``tmp/`` → ``new/``).

    This is the embedded default: nothing to install, and any mail client or a text
    editor can open the result. The move from tmp/ to new/ is atomic, and the file name
    carries the delivery's key, so after a crash ``is_delivered`` knows for sure.
    """

    connections = 1

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    async def send(self, message: EmailMessage, key: str, slot: int = 0) -> None:
        data = message_bytes(message)
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


class SmtpTransport:
    """Sends over SMTP with up to ``connections`` connections, each reused for many mails."""

    def __init__(self, config: MailConfig) -> None:
        self.config = config
        self.connections = config.connections
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
            raise PermanentFailure(f"SMTP login refused for {cfg.username}: {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            raise TemporaryFailure(
                f"cannot connect to {cfg.host}:{cfg.effective_port}: {exc}"
            ) from exc
        self._clients[slot] = client
        return client

    async def send(self, message: EmailMessage, key: str, slot: int = 0) -> None:
        client = await self._client(slot)
        try:
            sender = message["From"].addresses[0].addr_spec
            recipients = [a.addr_spec for a in message["To"].addresses]
            await client.sendmail(sender, recipients, message_bytes(message))
        except aiosmtplib.SMTPRecipientsRefused as exc:
            codes = [r.code for r in exc.recipients]
            text = "; ".join(f"{r.code} {r.message}" for r in exc.recipients)
            if all(400 <= c < 500 for c in codes):
                raise TemporaryFailure(text) from exc
            raise PermanentFailure(text) from exc
        except aiosmtplib.SMTPResponseException as exc:
            if 400 <= exc.code < 500:
                raise TemporaryFailure(f"{exc.code} {exc.message}") from exc
            raise PermanentFailure(f"{exc.code} {exc.message}") from exc
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._clients.pop(slot, None)
            raise TemporaryFailure(f"connection lost: {exc}") from exc

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


def make_transport(config: MailConfig) -> Transport:
    if config.transport == "smtp":
        return SmtpTransport(config)
    return MaildirTransport(config.maildir)


@dataclass
class SendReport:
    sent: int = 0
    retry: int = 0
    failed: int = 0
    skipped: int = 0


async def deliver_pending(
    store: Store,
    transport: Transport,
    compose: Callable[[Delivery], EmailMessage],
    *,
    clock: Callable[[], datetime],
    on_progress: Callable[[Delivery, str], None] | None = None,
) -> SendReport:
    """Send every pending delivery once; safe to run in several processes at once."""
    report = SendReport()
    store.recover_claims(clock(), CLAIM_LEASE, lambda d: transport.is_delivered(delivery_token(d)))
    queue: asyncio.Queue[Delivery] = asyncio.Queue()
    for delivery in store.pending_deliveries():
        queue.put_nowait(delivery)
    me = worker_id()

    async def worker(slot: int) -> None:
        while True:
            try:
                delivery = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            if not store.claim(delivery.id, me, clock()):
                report.skipped += 1
                continue
            outcome = "sent"
            try:
                message = compose(delivery)
                await transport.send(message, delivery_token(delivery), slot)
            except TemporaryFailure as exc:
                if delivery.attempts + 1 >= MAX_ATTEMPTS:
                    store.mark_failed(delivery, f"gave up after {MAX_ATTEMPTS} attempts: {exc}")
                    report.failed += 1
                    outcome = "failed"
                else:
                    store.mark_retry(delivery, str(exc))
                    report.retry += 1
                    outcome = "retry"
                log.warning("delivery to %s deferred: %s", delivery.subscriber.email, exc)
            except PermanentFailure as exc:
                store.mark_failed(delivery, str(exc))
                report.failed += 1
                outcome = "failed"
                log.error("delivery to %s failed: %s", delivery.subscriber.email, exc)
            except Exception as exc:
                # A template or store problem: put the row back, then stop loudly.
                store.mark_retry(delivery, f"could not compose the message: {exc}")
                raise
            else:
                store.mark_sent(delivery, clock(), claimed_by=me)
                report.sent += 1
            if on_progress is not None:
                on_progress(delivery, outcome)

    try:
        await asyncio.gather(*(worker(i) for i in range(max(1, transport.connections))))
    finally:
        await transport.close()
    return report
