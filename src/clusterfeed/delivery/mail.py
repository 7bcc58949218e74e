"""Hand digests to a mail transport, each exactly once.

The outbox lives in the store: one row per (digest, subscriber). A worker claims rows,
renders each message, hands it to the transport and records the acceptance, in that
order, one commit per message. If the process dies, the next start releases its
claims: a Maildir delivery can be checked on disk (its file name carries the
delivery's key), so it is exactly-once; an SMTP server's acceptance cannot be checked
afterwards, so the only message that can arrive twice is one accepted in the instant
between the server's "250 OK" and the store's commit, at most one per open connection.

A refusal decides what happens next: a 4xx answer or a lost connection comes back
after a growing delay (``next_attempt``), a 5xx answer fails the delivery at once and
counts against the address, which is marked bouncing after ``bounce_after`` in a row.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import secrets
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Protocol

import aiosmtplib

from clusterfeed.config import MailConfig, read_dkim_key
from clusterfeed.digest.digest import message_bytes
from clusterfeed.store import Delivery, Store, StoreError, worker_id

log = logging.getLogger(__name__)

CLAIM_LEASE = timedelta(minutes=15)
# Rows claimed per store transaction; a dead process's claims are released on restart,
# so the batch size changes speed, never what is delivered.
CLAIM_BATCH = 50


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


# -- retries ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RetryPolicy:
    """How long a temporary refusal waits, and when waiting is no longer worth it."""

    first: timedelta = timedelta(minutes=5)
    factor: float = 3.0
    longest: timedelta = timedelta(hours=4)
    jitter: float = 0.1
    attempts: int = 8
    max_age: timedelta = timedelta(hours=48)

    @classmethod
    def from_config(cls, cfg: MailConfig) -> RetryPolicy:
        return cls(
            first=timedelta(minutes=cfg.retry_first_minutes),
            factor=cfg.retry_factor,
            longest=timedelta(minutes=cfg.retry_max_minutes),
            jitter=cfg.retry_jitter,
            attempts=cfg.retry_attempts,
            max_age=timedelta(hours=cfg.retry_hours),
        )


def next_attempt(
    policy: RetryPolicy,
    attempts: int,
    now: datetime,
    *,
    built_at: datetime | None,
    spread: float,
) -> datetime | None:
    """When to try a temporarily refused delivery again, or None to give up.

    ``attempts`` counts the attempts made so far (this one included); ``spread`` is a
    number in [0, 1) that places the delay within +-jitter, so that deliveries refused
    together (a greylisting server, a full queue) do not all come back at once.
    Growing delays give a busy or greylisting server time; a cap keeps a late message
    from waiting for days, and the age limit drops a digest that is no longer news.
    """
    if attempts >= policy.attempts:
        return None
    base = min(
        policy.first.total_seconds() * policy.factor ** max(0, attempts - 1),
        policy.longest.total_seconds(),
    )
    delay = base * (1 + policy.jitter * (2 * spread - 1))
    when = now + timedelta(seconds=delay)
    if built_at is not None and when - built_at > policy.max_age:
        return None
    return when


def give_up_reason(delivery: Delivery, attempts: int, policy: RetryPolicy, error: str) -> str:
    if attempts >= policy.attempts:
        return f"gave up after {attempts} attempts: {error}"
    hours = policy.max_age.total_seconds() / 3600
    return f"gave up after {attempts} attempts ({hours:g} h retry limit reached): {error}"


# -- rate ------------------------------------------------------------------------------


class RateLimiter:
    """A token bucket shared by all connections: on average ``per_second`` messages, at
    most ``burst`` back to back.

    Each caller reserves the next free slot before it sleeps, so concurrent callers are
    spaced without a lock and the order is first come, first served. The clock and the
    sleep are passed in so that tests can drive it without waiting.
    """

    def __init__(
        self,
        per_second: float,
        *,
        burst: int = 1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be positive")
        self.interval = 1.0 / per_second
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    async def acquire(self) -> float:
        """Wait for a slot; returns when it was granted, on the limiter's clock."""
        now = self._clock()
        # Unused tokens pile up to ``burst``, never more.
        earliest = now - (self.burst - 1) * self.interval
        slot = earliest if self._next is None else max(self._next, earliest)
        self._next = slot + self.interval
        if slot > now:
            await self._sleep(slot - now)
        return max(slot, now)


# -- signing ---------------------------------------------------------------------------

# Signed even when absent, so nobody can add them later (RFC 6376 5.4); RFC 8058 wants
# List-Unsubscribe and List-Unsubscribe-Post covered by the signature.
DKIM_HEADERS = (
    "From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version",
    "Content-Type", "Content-Transfer-Encoding", "List-Id", "List-Unsubscribe",
    "List-Unsubscribe-Post", "Precedence", "Auto-Submitted",
)  # fmt: skip


class DkimSigner:
    """Signs the bytes of a message with dkimpy; the signature goes on top."""

    def __init__(self, selector: str, domain: str, private_key: bytes) -> None:
        self.selector = selector.encode()
        self.domain = domain.encode()
        self._key = private_key
        self._headers = [h.lower().encode() for h in DKIM_HEADERS]

    def sign(self, data: bytes) -> bytes:
        import dkim

        signature: bytes = dkim.sign(
            data,
            self.selector,
            self.domain,
            self._key,
            include_headers=self._headers,
            # relaxed/relaxed survives the re-wrapping of headers and trailing blanks
            # that relays are known to do; simple body canonicalization does not.
            canonicalize=(b"relaxed", b"relaxed"),
        )
        return signature + data


def make_signer(cfg: MailConfig, config_file: Path) -> DkimSigner | None:
    """The configured signer, or None; a missing or broken key is a ConfigError."""
    if cfg.dkim is None:
        return None
    key = read_dkim_key(config_file, cfg.dkim.private_key_file, cfg.dkim.private_key_env)
    return DkimSigner(cfg.dkim.selector, cfg.dkim.domain, key)


def wire_bytes(message: Outgoing, signer: DkimSigner | None) -> bytes:
    data = message.data if isinstance(message, Prepared) else message_bytes(message)
    return signer.sign(data) if signer is not None else data


# -- transports ------------------------------------------------------------------------


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


# -- the outbox ------------------------------------------------------------------------


@dataclass
class SendReport:
    sent: int = 0
    retry: int = 0
    failed: int = 0
    skipped: int = 0
    bouncing: list[str] | None = None


async def deliver_pending(
    store: Store,
    transport: Transport,
    compose: Callable[[Delivery], Outgoing],
    *,
    clock: Callable[[], datetime],
    render: Callable[[Delivery], Awaitable[Outgoing]] | None = None,
    ahead: int | None = None,
    policy: RetryPolicy | None = None,
    bounce_after: int = 3,
    spread: Callable[[], float] = random.random,
    on_progress: Callable[[Delivery, str], None] | None = None,
    batches: int | None = None,
) -> SendReport:
    """Send every delivery that is due; safe to run in several processes at once.

    ``batches`` stops after claiming that many batches of ``CLAIM_BATCH`` rows: a task
    worker sends one batch per task, so a worker that dies holds one batch's claims.

    One task claims rows in batches and has up to ``ahead`` of them rendered at once
    (``compose`` in a thread, or ``render``, e.g. in worker processes), in outbox
    order; one task per connection sends and records each answer before it takes the
    next message. Memory holds one claimed batch and a few rendered messages, however
    long the outbox is.
    """
    policy = policy or RetryPolicy()
    report = SendReport(bouncing=[])

    def recover() -> int:
        return store.recover_claims(
            clock(), CLAIM_LEASE, lambda d: transport.is_delivered(delivery_token(d))
        )

    recover()
    # One owner per run: the scheduler may send retries while a digest is going out in
    # the same process, and each run gives back only its own unfinished claims.
    me = f"{worker_id()}/{secrets.token_hex(4)}"
    connections = max(1, transport.connections)
    queue: asyncio.Queue[tuple[Delivery, Outgoing] | None] = asyncio.Queue(maxsize=2 * connections)
    window = max(1, ahead or 2)

    def start(delivery: Delivery) -> asyncio.Future[Outgoing]:
        if render is not None:
            return asyncio.ensure_future(render(delivery))
        return asyncio.ensure_future(asyncio.to_thread(compose, delivery))

    stop = asyncio.Event()
    problems: list[BaseException] = []

    async def produce() -> None:
        rendering: deque[tuple[Delivery, asyncio.Future[Outgoing]]] = deque()

        async def hand_on() -> None:
            delivery, future = rendering.popleft()
            # A template or store problem stops the run loudly. It is no delivery
            # attempt (nothing reached a server): the row goes back uncounted with the
            # other unfinished claims, so a broken template cannot use up the retries.
            message = await future
            await queue.put((delivery, message))

        claimed = 0
        try:
            while not stop.is_set() and (batches is None or claimed < batches):
                batch = store.claim_due(me, clock(), CLAIM_BATCH)
                claimed += 1
                if not batch and not recover():
                    # Nothing due, and no run beside this one died holding claims
                    # meanwhile (if one did, its rows are due again: sent by this run,
                    # not left for the next one).
                    break
                for delivery in batch:
                    if stop.is_set():
                        break
                    rendering.append((delivery, start(delivery)))
                    if len(rendering) >= window:
                        await hand_on()
            while rendering and not stop.is_set():
                await hand_on()
        except BaseException as exc:
            problems.append(exc)
            stop.set()
        finally:
            for _delivery, future in rendering:
                future.cancel()
            for _ in range(connections):
                await queue.put(None)

    def deferred(delivery: Delivery, exc: Exception) -> str:
        attempts = delivery.attempts + 1
        when = next_attempt(
            policy, attempts, clock(), built_at=delivery.digest_created, spread=spread()
        )
        if when is None:
            reason = give_up_reason(delivery, attempts, policy, str(exc))
            store.mark_failed(delivery, reason)
            report.failed += 1
            log.error("delivery to %s failed: %s", delivery.subscriber.email, reason)
            return "failed"
        store.mark_retry(delivery, str(exc), when)
        report.retry += 1
        log.warning(
            "delivery to %s deferred until %s (attempt %d of %d): %s",
            delivery.subscriber.email,
            when.isoformat(timespec="minutes"),
            attempts,
            policy.attempts,
            exc,
        )
        return "retry"

    def refused(delivery: Delivery, exc: PermanentFailure) -> str:
        email = delivery.subscriber.email
        now_bouncing = store.mark_failed(
            delivery,
            str(exc),
            refused_address=exc.address,
            now=clock(),
            bounce_after=bounce_after,
        )
        report.failed += 1
        log.error("delivery to %s failed: %s", email, exc)
        if now_bouncing:
            assert report.bouncing is not None
            report.bouncing.append(email)
            log.error(
                "%s refused %d messages in a row and is now marked bouncing: later digests "
                "skip it until you run `clusterfeed bounces clear %s` (last answer: %s)",
                email,
                bounce_after,
                email,
                exc,
            )
        return "failed"

    async def send(slot: int) -> None:
        # Runs until the producer's end marker, even after a problem (then only
        # draining the queue), so the producer never waits on a full queue.
        while True:
            item = await queue.get()
            if item is None:
                return
            delivery, message = item
            if stop.is_set():
                continue  # left claimed; released below
            try:
                await transport.send(message, delivery_token(delivery), slot)
            except TemporaryFailure as exc:
                outcome = deferred(delivery, exc)
            except SetupFailure as exc:
                # The server refuses us, not this address: no attempt is counted.
                store.release_claim(delivery, str(exc))
                problems.append(exc)
                stop.set()
                continue
            except PermanentFailure as exc:
                outcome = refused(delivery, exc)
            except Exception as exc:
                problems.append(exc)
                stop.set()
                continue
            else:
                # Before this worker takes its next message: the duplicate window.
                try:
                    recorder.record(delivery, clock(), claimed_by=me)
                except StoreError as exc:
                    # The database failed: stop every connection cleanly (this row goes
                    # back to the queue with the others) and report it.
                    problems.append(exc)
                    stop.set()
                    continue
                report.sent += 1
                outcome = "sent"
            if on_progress is not None:
                on_progress(delivery, outcome)

    recorder = store.sent_recorder()
    try:
        await asyncio.gather(produce(), *(send(i) for i in range(connections)))
    finally:
        recorder.close()
        await transport.close()
        # Rows claimed but never handed over (the run stopped early) wait again.
        store.release_claims(me)
    if problems:
        raise problems[0]
    return report
