"""Schema version 8: the stories the cap (digest.max_stories) left out of a mail.
Earlier digests left nothing out on record (NULL), as before."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("left_out_ids", sa.JSON))
