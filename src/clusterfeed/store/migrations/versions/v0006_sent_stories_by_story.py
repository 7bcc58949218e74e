"""Schema version 6: planning a digest asks who already had a story, by story; the
primary key of ``sent_stories`` only serves questions by subscriber."""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    present = {i["name"] for i in sa.inspect(op.get_bind()).get_indexes("sent_stories")}
    if "ix_sent_stories_story" not in present:
        op.create_index("ix_sent_stories_story", "sent_stories", ["story_id"])
