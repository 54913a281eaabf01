"""Bookkeeping: applied events, consumer positions, the outbox.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "applied_events",
        sa.Column("event_id", sa.String(length=128), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=True),
    )
    op.create_index("ix_applied_events_seq", "applied_events", ["seq"])
    op.create_table(
        "consumer_positions",
        sa.Column("consumer", sa.String(length=64), primary_key=True),
        sa.Column("seq", sa.Integer(), nullable=False),
    )
    op.create_table(
        "outbox",
        sa.Column("position", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("event_id", sa.String(length=128), nullable=False, unique=True),
        sa.Column("event", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("consumer_positions")
    op.drop_index("ix_applied_events_seq", table_name="applied_events")
    op.drop_table("applied_events")
