"""Schema version 5: a deferred delivery waits for its next attempt, and a subscriber's
permanent refusals in a row are counted (bouncing addresses are skipped).

Pending deliveries get no next attempt: they are due at once, as they were before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.add_column("deliveries", sa.Column("next_attempt_at", sa.DateTime(timezone=True)))
    op.add_column(
        "subscribers",
        sa.Column("hard_bounces", sa.Integer, nullable=False, server_default="0"),
    )
    op.add_column("subscribers", sa.Column("bouncing_since", sa.DateTime(timezone=True)))
