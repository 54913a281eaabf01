"""When a webhook endpoint last failed: five days failing are a run of failures that is current,
each not long after the one before it. An endpoint that failed once and was then sent nothing for
days is failing since its next failure, not disabled by it.

An endpoint failing now is given its latest attempt as its last failure (the attempts since its
last success are its failures); one without any kept counts from ``failing_since``.

Revision ID: 0028_webhook_last_failure
Revises: 0027_webhook_disabled_positions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0028_webhook_last_failure"
down_revision = "0027_webhook_disabled_positions"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.add_column(sa.Column("last_failure_at", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE webhook_endpoints SET last_failure_at = (SELECT MAX(a.attempted_at) FROM webhook_attempts a "
               "JOIN webhook_deliveries d ON d.id = a.delivery_id WHERE d.endpoint_id = webhook_endpoints.id) "
               "WHERE failing_since IS NOT NULL")


def downgrade() -> None:
    with op.batch_alter_table("webhook_endpoints") as batch:
        batch.drop_column("last_failure_at")
