"""Where the log was when a webhook endpoint was disabled and enabled again: what it is owed
depends on where an event is in the log, not on when the recorder gets to it (an event logged
just before the endpoint was disabled was never owed to it when the recorder got there after the
disabling), and ``/recover`` takes the gap between the two exactly.

An endpoint disabled before this counts as disabled where the webhooks' recorder has got to: it
was owed what was recorded, and nothing after, as it was.

Revision ID: 0027_webhook_disabled_positions
Revises: 0026_webhook_owed_order
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0027_webhook_disabled_positions"
down_revision = "0026_webhook_owed_order"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("disabled_after_seq", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("enabled_after_seq", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("earlier_gaps", sa.JSON(), nullable=False, server_default="[]"))
    op.execute("UPDATE webhook_endpoints SET disabled_after_seq = (SELECT COALESCE(MAX(seq), 0) FROM webhook_consumer_positions) "
               "WHERE NOT enabled")


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("earlier_gaps")
        batch.drop_column("enabled_after_seq")
        batch.drop_column("disabled_after_seq")
