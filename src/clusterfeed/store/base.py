"""The engine, the writers' lock and the schema's version: what every part of the store shares.

SQLAlchemy Core (not the ORM) keeps the SQL visible and lets the same statements run
on both databases; the URL alone picks one. Writes that belong together happen in one
transaction (``_tx``), so a crash leaves either the old state or the new one, never half.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine

from clusterfeed.store.schema import SCHEMA_VERSION
from clusterfeed.store.versioning import NewerSchema, SchemaChange, bring_up_to_date, read_state

log = logging.getLogger("clusterfeed.store")


class StoreError(Exception):
    """The database cannot be used; the message says which and why."""


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Writers take one lock for the length of their transaction. Store writes are short
# (one feed's entries, one outbox row), so one lock costs little and rules out the
# races between "is there a story for this link?" and "insert a new story".
_WRITING: ContextVar[bool] = ContextVar("clusterfeed_store_writing", default=False)
_LOCK_KEY = 0x636C7573  # "clus"


def _chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StoreBase:
    """The connection to the database and its transactions; every part of ``Store``
    builds on it."""

    def __init__(self, url: str, *, echo: bool = False) -> None:
        self.url = url
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            connect_args = {"timeout": 30, "check_same_thread": False}
        try:
            self.engine: Engine = create_engine(
                url, echo=echo, connect_args=connect_args, future=True
            )
        except Exception as exc:  # bad URL or a missing driver: tell the operator which
            raise StoreError(f"cannot use database {self._safe_url()}: {exc}") from exc
        if url.startswith("sqlite"):
            self._tune_sqlite(self.engine)

    def safe_url(self) -> str:
        """The database URL without its password, for messages to the operator."""
        return self._safe_url()

    def _safe_url(self) -> str:
        try:
            from sqlalchemy.engine import make_url

            return make_url(self.url).render_as_string(hide_password=True)
        except Exception:
            return "(unparseable URL)"

    @staticmethod
    def _tune_sqlite(engine: Engine) -> None:
        # WAL lets readers go on while a cycle writes; a busy timeout lets a second
        # process wait for the lock instead of failing.
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        # A write transaction takes the write lock when it begins (BEGIN IMMEDIATE), not
        # at its first write: two feeds' updates that both look for a matching story
        # then run one after the other instead of both deciding "new story".
        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if _WRITING.get() else "BEGIN")

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        """A write transaction, serialized against other writers on both databases."""
        token = _WRITING.set(True)
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
                yield conn
        finally:
            _WRITING.reset(token)

    def close(self) -> None:
        self.engine.dispose()

    def schema_version(self) -> int:
        """The schema version the database is at (0: empty)."""
        with self.engine.connect() as conn:
            return read_state(conn).version

    def migrate(self) -> int:
        """Bring the schema to the current version; safe to call on every start."""
        return self.upgrade_schema().after

    def upgrade_schema(self) -> SchemaChange:
        """Create, adopt or upgrade the schema (``versioning``) and say from which
        version to which. Nothing to do costs one read and takes no lock."""
        try:
            # Inside the try: a folder that cannot be made (a file of that name is in
            # the way) is an operator's mistake to report, not a traceback.
            if self.url.startswith("sqlite:///"):
                path = self.url.removeprefix("sqlite:///")
                if path and path != ":memory:":
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with self.engine.connect() as conn:
                state = read_state(conn)
        except NewerSchema as exc:
            raise self._newer(exc) from exc
        except Exception as exc:
            raise StoreError(f"cannot open database {self._safe_url()}: {exc}") from exc
        if state.current:
            return SchemaChange(SCHEMA_VERSION, SCHEMA_VERSION)
        if state.version > SCHEMA_VERSION:
            raise self._newer(NewerSchema(f"it has schema version {state.version}"))
        try:
            # One transaction for the whole upgrade, under the writers' lock: it
            # happens completely or not at all, and a second process waits for it.
            with self._tx() as conn:
                change = bring_up_to_date(conn)
        except NewerSchema as exc:
            raise self._newer(exc) from exc
        except Exception as exc:
            raise StoreError(
                f"could not upgrade database {self._safe_url()} from schema version "
                f"{state.version} to {SCHEMA_VERSION}: {exc}. Nothing was changed (the "
                "upgrade is one transaction); fix the cause and start again, or restore "
                "the backup and keep the previous clusterfeed"
            ) from exc
        if change.created:
            log.info("created the database schema (version %d)", change.after)
        elif change.changed:
            log.info(
                "upgraded the database schema from version %d to %d", change.before, change.after
            )
        return change

    def _newer(self, exc: NewerSchema) -> StoreError:
        return StoreError(
            f"database {self._safe_url()} is newer than this clusterfeed understands "
            f"(schema version {SCHEMA_VERSION}): {exc}. Upgrade clusterfeed, or restore "
            "the backup made before the newer version first ran"
        )
