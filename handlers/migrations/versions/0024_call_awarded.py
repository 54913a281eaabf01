"""What a call has awarded so far: ``calls.awarded`` (decimal text, in the budget's currency), so
that an award is weighed against what is left of the budget without reading the call's
applications; filled from the awards already made.

Revision ID: 0024_call_awarded
Revises: 0018_open_calls_deadline
"""

from __future__ import annotations

import json
from decimal import Decimal

import sqlalchemy as sa
from alembic import op

revision = "0024_call_awarded"
down_revision = "0018_open_calls_deadline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.add_column(sa.Column("awarded", sa.String(length=64), nullable=True))
    connection = op.get_bind()
    totals: dict[str, Decimal] = {}
    rows = connection.execute(sa.text("SELECT call_id, awarded_amount FROM call_applications "
                                      "WHERE status = 'awarded' AND awarded_amount IS NOT NULL"))
    for call_id, amount in rows:
        money = json.loads(amount) if isinstance(amount, str) else amount
        if isinstance(money, dict) and money.get("amount") is not None:
            totals[call_id] = totals.get(call_id, Decimal(0)) + Decimal(str(money["amount"]))
    for call_id, total in totals.items():
        connection.execute(sa.text("UPDATE calls SET awarded = :total WHERE call_id = :call_id"),
                           {"total": str(total), "call_id": call_id})


def downgrade() -> None:
    with op.batch_alter_table("calls") as batch:
        batch.drop_column("awarded")
