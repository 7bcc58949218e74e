"""Alembic's entry point; ``clusterfeed.store.versioning`` runs it, never an operator.

The store passes its own connection in ``config.attributes``, already inside a
transaction that holds the writers' lock, so Alembic opens and commits nothing here:
the whole upgrade (adopting an old database, every step, the version mark) commits at
once or not at all.
"""

from alembic import context

context.configure(connection=context.config.attributes["connection"])
with context.begin_transaction():
    context.run_migrations()
