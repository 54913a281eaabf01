"""Two-stage calls: a call's deadline for full proposals; an application's invitation to the
second stage (when, and the publisher's comment) and its full proposal (what it gave, and when).

Revision ID: 0015_two_stage_calls
Revises: 0013_application_decisions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015_two_stage_calls"
down_revision = "0013_application_decisions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("full_proposal_deadline", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("call_applications") as batch:
        batch.add_column(sa.Column("invited_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("invitation_comment", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("full_proposal", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("full_proposal_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("call_applications") as batch:
        batch.drop_column("full_proposal_at")
        batch.drop_column("full_proposal")
        batch.drop_column("invitation_comment")
        batch.drop_column("invited_at")
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("full_proposal_deadline")
