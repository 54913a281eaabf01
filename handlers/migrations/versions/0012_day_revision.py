"""How often an innovation day's organiser changed it (moved, cancelled, reported it held): the
calendar feed's SEQUENCE, without which calendar clients keep showing the day as it was.

Revision ID: 0012_day_revision
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012_day_revision"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("innovation_days") as batch:
        batch.add_column(sa.Column("revision", sa.Integer(), nullable=False, server_default="0"))
    # A day cancelled or held before this counts one change (a rebuild counts every change).
    op.execute("UPDATE innovation_days SET revision = 1 WHERE status <> 'scheduled'")


def downgrade() -> None:
    with op.batch_alter_table("innovation_days") as batch:
        batch.drop_column("revision")
