"""What an event led to: a derived event records the event it was decided on, and gets its log
sequence once its copy is logged, so an event's outcome (its refusal, its consequences) can be
looked up by its id (``GET /events/{id}``).

Revision ID: 0010_applied_causes
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_applied_causes"
down_revision = "0001"
branch_labels = ("applied_causes",)
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("applied_events") as batch:
        batch.add_column(sa.Column("caused_by", sa.String(length=128), nullable=True))
    op.create_index(
        "ix_applied_events_caused_by",
        "applied_events",
        ["caused_by"],
        sqlite_where=sa.text("caused_by IS NOT NULL"),
        postgresql_where=sa.text("caused_by IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_applied_events_caused_by", table_name="applied_events")
    with op.batch_alter_table("applied_events") as batch:
        batch.drop_column("caused_by")
