"""Which schema version a database is at, and bringing it to this code's version.

The history lives in ``migrations/`` as Alembic revisions, run here on the store's own
connection (no ``alembic.ini``). Three kinds of database arrive:

* an empty one gets today's tables in one step (``schema.metadata``) and is marked with
  the newest revision, instead of replaying the whole history;
* one made before the migrations moved to Alembic has only ``schema_info.version = N``:
  it is adopted (marked as revision N) and then upgraded like any other;
* one Alembic already knows is upgraded from its revision.

All of it runs in the caller's transaction, which holds the writers' lock, so two
processes starting at once on one new database do not both create it: the second waits,
then finds the first one's work. ``schema_info.version`` is kept in step with the
revision, because releases before Alembic read only that number to refuse a database
newer than themselves.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Column, MetaData, String, Table, insert, select, update
from sqlalchemy.engine import Connection

from clusterfeed.store.schema import SCHEMA_VERSION, metadata, schema_info

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

log = logging.getLogger(__name__)

# Where Alembic records the revision; declared apart from ``schema.metadata`` because
# Alembic, not ``create_all``, creates it.
_alembic_version = Table(
    "alembic_version", MetaData(), Column("version_num", String(32), primary_key=True)
)


class NewerSchema(Exception):
    """The database was made or upgraded by a newer clusterfeed (or is not ours)."""


@dataclass(frozen=True)
class SchemaState:
    """Where a database stands: its schema version (0: empty) and whether Alembic
    records it (False for a database made by a release before Alembic)."""

    version: int
    by_alembic: bool

    @property
    def current(self) -> bool:
        return self.version == SCHEMA_VERSION and self.by_alembic


@dataclass(frozen=True)
class SchemaChange:
    """What an upgrade did: from which version (0: an empty database) to which."""

    before: int
    after: int

    @property
    def created(self) -> bool:
        return self.before == 0

    @property
    def changed(self) -> bool:
        return self.before != self.after


def revision_id(version: int) -> str:
    """The Alembic revision that brings a database to ``version`` (``0004`` for 4)."""
    return f"{version:04d}"


def read_state(conn: Connection) -> SchemaState:
    """The schema version of the database behind ``conn``, in plain SQL (no Alembic
    import: this runs at every start, and almost always finds nothing to do)."""
    dialect = conn.dialect
    if dialect.has_table(conn, "alembic_version"):
        heads = conn.execute(select(_alembic_version.c.version_num)).scalars().all()
        if len(heads) != 1 or not heads[0].isdigit():
            raise NewerSchema(
                f"its Alembic revision is {', '.join(heads) or 'empty'}, which is not one "
                "of clusterfeed's (they are numbers); is this database used by another "
                "program too?"
            )
        return SchemaState(int(heads[0]), True)
    if dialect.has_table(conn, "schema_info"):
        version = conn.execute(select(schema_info.c.version)).scalar()
        return SchemaState(int(version or 0), False)
    return SchemaState(0, False)


def bring_up_to_date(conn: Connection) -> SchemaChange:
    """Create, adopt or upgrade the schema on ``conn``, which must be inside a write
    transaction that holds the writers' lock; reads the state again under that lock."""
    from alembic import command

    state = read_state(conn)
    if state.version > SCHEMA_VERSION:
        raise NewerSchema(f"it has schema version {state.version}")
    config = _config(conn)
    if state.version == 0:
        metadata.create_all(conn)
        command.stamp(config, revision_id(SCHEMA_VERSION))
        conn.execute(insert(schema_info).values(id=1, version=SCHEMA_VERSION))
        return SchemaChange(0, SCHEMA_VERSION)
    if not state.by_alembic:
        # Made by a release before Alembic: its schema_info number is its revision.
        command.stamp(config, revision_id(state.version))
    if state.version < SCHEMA_VERSION:
        command.upgrade(config, revision_id(SCHEMA_VERSION))
        conn.execute(update(schema_info).values(version=SCHEMA_VERSION))
    return SchemaChange(state.version, SCHEMA_VERSION)


def _config(conn: Connection | None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", "clusterfeed.store:migrations")
    config.attributes["connection"] = conn
    return config


def script_directory() -> ScriptDirectory:
    """The revisions shipped with this code."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_config(None))
