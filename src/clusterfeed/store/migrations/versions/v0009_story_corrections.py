"""Schema version 9: corrections made with ``clusterfeed stories split``, kept by page."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("story_corrections"):
        return
    op.create_table(
        "story_corrections",
        sa.Column("link_a", sa.String(2000), primary_key=True),
        sa.Column("link_b", sa.String(2000), primary_key=True),
        sa.Column("verdict", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
