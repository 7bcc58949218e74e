"""The schema's history as Alembic revisions, applied by ``clusterfeed migrate`` and at start-up.

Each file in ``versions/`` brings the database from one schema version to the next; its
revision id is the version number it brings the database to, zero-padded
(``0004`` makes version 4), and it spells out the columns and tables it adds instead of
importing today's tables, so it does the same thing to an old database forever.
Append, never edit: a database in the field may be at any version.

There are no downgrades: going back to an older clusterfeed means restoring the backup
taken before the upgrade (docs/operations.md). ``env.py`` runs on the connection the
store hands it, inside the store's transaction, so operators need no ``alembic.ini``.
"""
