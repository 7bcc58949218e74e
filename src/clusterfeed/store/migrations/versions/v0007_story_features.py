"""Schema version 7: what story matching reads of an entry (embedding and evidence),
computed once. Entries stored before the upgrade get theirs the first time a new
item's window reaches them."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("story_features"):
        return
    op.create_table(
        "story_features",
        sa.Column("entry_id", sa.Integer, sa.ForeignKey("entries.id"), primary_key=True),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),
        sa.Column("evidence", sa.JSON, nullable=False),
    )
