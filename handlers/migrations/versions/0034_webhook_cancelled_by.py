"""How a cancelled webhook delivery was cancelled (``webhook_deliveries.cancelled_by``): by its
endpoint's owner by hand (``owner``, ``…/cancel``) or by a change of the endpoint's event types that
no longer ask for its type (``filter``). Both read ``cancelled``, and a receiver's developer could
not tell them apart. Deliveries cancelled before stay without it (null): which it was is not known.

Revision ID: 0034_webhook_cancelled_by
Revises: 0028_webhook_last_failure
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0034_webhook_cancelled_by"
down_revision = "0028_webhook_last_failure"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.add_column(sa.Column("cancelled_by", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries") as batch:
        batch.drop_column("cancelled_by")
