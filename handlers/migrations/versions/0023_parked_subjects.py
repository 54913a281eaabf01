"""What a consumer sets aside: ``parked_subjects`` names the things (domain and subject) an event
in the dead-letter queue is about, whose later events wait there behind it.

Revision ID: 0023_parked_subjects
Revises: 0021_position_epoch
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0023_parked_subjects"
down_revision = "0021_position_epoch"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parked_subjects",
        sa.Column("consumer", sa.String(length=64), nullable=False),
        sa.Column("domain", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=128), nullable=False),
        sa.Column("first_seq", sa.Integer(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "domain", "subject"),
    )


def downgrade() -> None:
    op.drop_table("parked_subjects")
