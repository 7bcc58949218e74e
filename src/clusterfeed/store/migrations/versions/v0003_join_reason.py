"""Schema version 3: why an entry joined its story (empty for a story's first entry)."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("entries", sa.Column("join_reason", sa.Text))
