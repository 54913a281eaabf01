"""The due date for which the bus said a reviewer was late (``validation.review_overdue``): the
timer names a late reviewer once for each due date.

Revision ID: 0017_review_overdue
Revises: 0016_application_status_index
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0017_review_overdue"
down_revision = "0016_application_status_index"
branch_labels = None
depends_on = "0003"  # (validation_reviewers is the validations branch's table)


def upgrade() -> None:
    with op.batch_alter_table("validation_reviewers") as batch:
        batch.add_column(sa.Column("overdue_noted_for", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("validation_reviewers") as batch:
        batch.drop_column("overdue_noted_for")
