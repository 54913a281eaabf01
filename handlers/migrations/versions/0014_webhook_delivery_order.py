"""Deliveries about one thing go to an endpoint in log order: each delivery notes what its event
is about (its domain and subject), and an index finds the earlier ones still owed. An endpoint's
owner may have them all go in any order (``ordered``).

Deliveries recorded before keep no key and go in any order, as they did.

Revision ID: 0014_webhook_delivery_order
Revises: 0011_webhook_disabled_at
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014_webhook_delivery_order"
down_revision = "0011_webhook_disabled_at"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("ordered", sa.Boolean(), nullable=False, server_default=sa.true()))
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("ordering_key", sa.String(length=200), nullable=True))
    op.create_index("ix_webhook_deliveries_order", "webhook_deliveries", ["endpoint_id", "ordering_key", "seq"])


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_order", table_name="webhook_deliveries")
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("ordering_key")
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("ordered")
