"""HTTP tokens of the institutions (hashed).

Revision ID: 0005
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0001"
branch_labels = ("tokens",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "institution_tokens",
        sa.Column("token_hash", sa.String(length=64), primary_key=True),
        sa.Column("institution", sa.String(length=63), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_institution_tokens_institution", "institution_tokens", ["institution"])


def downgrade() -> None:
    op.drop_index("ix_institution_tokens_institution", table_name="institution_tokens")
    op.drop_table("institution_tokens")
