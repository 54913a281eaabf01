"""The reason an applicant gave for withdrawing its application, in a column of its own
(``call_applications.withdrawal_reason``), as the application's resource names it; filled from
the ``comment`` the withdrawals applied before kept it in.

Revision ID: 0029_withdrawal_reason
Revises: 0024_call_awarded
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0029_withdrawal_reason"
down_revision = "0024_call_awarded"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("call_applications") as batch:
        batch.add_column(sa.Column("withdrawal_reason", sa.JSON(), nullable=True))
    op.execute("UPDATE call_applications SET withdrawal_reason = comment WHERE status = 'withdrawn' AND comment IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("call_applications") as batch:
        batch.drop_column("withdrawal_reason")
