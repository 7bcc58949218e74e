"""Schema version 10: each entry keeps the publication date its partner gave
(``dated_at``), even one in the future; story matching compares these.

Rows stored before kept only the clamped date: it is the best stated date left.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("entries", sa.Column("dated_at", sa.DateTime(timezone=True)))
    entries = sa.table(
        "entries",
        sa.column("dated_at", sa.DateTime(timezone=True)),
        sa.column("published_at", sa.DateTime(timezone=True)),
    )
    op.execute(entries.update().values(dated_at=entries.c.published_at))
    present = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("entries")}
    if "ix_entries_dated" not in present:
        op.create_index("ix_entries_dated", "entries", ["dated_at"])
