"""An index of the deliveries still owed, by endpoint, ordering key and log sequence: an ordered
endpoint's claim asks, for each delivery due, whether an earlier one about the same thing is
still owed. Through ``ix_webhook_deliveries_order`` that question walked the key's whole
delivered history (a busy call's thousands of applications: on SQLite ~0.4 s a claim with a few
hundred owed); the partial index holds only what is owed.

Revision ID: 0026_webhook_owed_order
Revises: 0022_webhook_position_epoch
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0026_webhook_owed_order"
down_revision = "0022_webhook_position_epoch"
branch_labels = None
depends_on = None

OWED = sa.text("next_attempt_at IS NOT NULL")


def upgrade() -> None:
    op.create_index("ix_webhook_deliveries_owed", "webhook_deliveries", ["endpoint_id", "ordering_key", "seq"],
                    sqlite_where=OWED, postgresql_where=OWED)


def downgrade() -> None:
    op.drop_index("ix_webhook_deliveries_owed", table_name="webhook_deliveries")
