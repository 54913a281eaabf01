"""When a webhook endpoint was last disabled, so that its owner knows from when to recover what it
missed once it is enabled again.

Revision ID: 0011_webhook_disabled_at
Revises: 0009_webhook_parties
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_webhook_disabled_at"
down_revision = "0009_webhook_parties"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True))
    # An endpoint disabled before this knows only when it last changed.
    op.execute("UPDATE webhook_endpoints SET disabled_at = updated_at WHERE NOT enabled")


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("disabled_at")
