"""What becomes of an application the call received: the publisher's decision (awarded, with the
amount granted, or declined) or the applicant's withdrawal, when it was logged, and its comment.

Revision ID: 0013_application_decisions
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013_application_decisions"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("call_applications") as batch:
        batch.add_column(sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("awarded_amount", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("comment", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("call_applications") as batch:
        batch.drop_column("comment")
        batch.drop_column("awarded_amount")
        batch.drop_column("decided_at")
