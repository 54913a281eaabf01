"""A consumer's position names which process applies it: ``consumer_positions.epoch``, moved on by
each process that takes the consumer over; one finding another number there than its own writes
nothing.

Revision ID: 0021_position_epoch
Revises: 0010_applied_causes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021_position_epoch"
down_revision = "0010_applied_causes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("consumer_positions", sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("consumer_positions") as batch:
        batch.drop_column("epoch")
