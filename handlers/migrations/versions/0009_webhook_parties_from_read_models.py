"""The webhooks' audience of a validation's confidential events comes from the read models (the
validation's requester, coordinator and reviewers as the workflow accepted them), no longer from
a table of its own that took every request and assignment in the log, refused ones included.

Revision ID: 0009_webhook_parties
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_webhook_parties"
down_revision = "0006"
branch_labels = None
depends_on = "0003"  # the validations' tables the audience is read from


def upgrade() -> None:
    op.drop_table("webhook_validation_parties")


def downgrade() -> None:
    op.create_table(
        "webhook_validation_parties",
        sa.Column("validation_id", sa.String(length=128), primary_key=True),
        sa.Column("institution", sa.String(length=63), primary_key=True),
        sa.Column("role", sa.String(length=16), nullable=False),
    )
