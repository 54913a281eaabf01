"""Whether a validation's decision counted each review (``validation_reviews.counted``), kept when
the validation is decided: the stakes its reviewers had then, not the ones they gain later. Reviews
of a validation decided before stay without it (null), judged by the stakes as they are, as they
were until now.

Revision ID: 0031_review_counted
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0031_review_counted"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("validation_reviews") as batch:
        batch.add_column(sa.Column("counted", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("validation_reviews") as batch:
        batch.drop_column("counted")
