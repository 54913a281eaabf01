"""An index on the open calls' deadlines: the timer that closes calls at their deadline looks
for them every second, and closed calls keep their past deadlines (the index on the deadline
alone grows with every call ever published).

Revision ID: 0018_open_calls_deadline
Revises: 0017_review_overdue
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018_open_calls_deadline"
down_revision = "0017_review_overdue"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_calls_open_deadline", "calls", ["deadline"],
                    sqlite_where=sa.text("closed_at IS NULL"), postgresql_where=sa.text("closed_at IS NULL"))


def downgrade() -> None:
    op.drop_index("ix_calls_open_deadline", table_name="calls")
