"""The webhooks consumer's position names which process records deliveries:
``webhook_consumer_positions.epoch``, as ``consumer_positions.epoch`` for the read models.

Revision ID: 0022_webhook_position_epoch
Revises: 0014_webhook_delivery_order
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022_webhook_position_epoch"
down_revision = "0014_webhook_delivery_order"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("webhook_consumer_positions", sa.Column("epoch", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("webhook_consumer_positions") as batch:
        batch.drop_column("epoch")
