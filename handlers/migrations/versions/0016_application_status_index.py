"""An index on the applications' status: the timer that lapses invited applications looks for
them every second, and ``GET /applications?status=`` filters by it.

Revision ID: 0016_application_status_index
Revises: 0015_two_stage_calls
"""

from __future__ import annotations

from alembic import op

revision = "0016_application_status_index"
down_revision = "0015_two_stage_calls"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_call_applications_status", "call_applications", ["status"])


def downgrade() -> None:
    op.drop_index("ix_call_applications_status", table_name="call_applications")
