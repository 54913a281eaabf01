"""Which version of the workflow rules applied which part of the log: ``rules_epochs``. A database
that has applied events already was applied by the rules before their first version (0), from the
log's start.

Revision ID: 0025_rules_epochs
Revises: 0023_parked_subjects
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0025_rules_epochs"
down_revision = "0023_parked_subjects"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rules_epochs",
        sa.Column("from_seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("from_seq"),
    )
    applied = op.get_bind().execute(sa.text("SELECT seq FROM consumer_positions WHERE consumer = 'network'")).scalar()
    if applied:
        op.execute(sa.text("INSERT INTO rules_epochs (from_seq, version) VALUES (1, 0)"))


def downgrade() -> None:
    op.drop_table("rules_epochs")
