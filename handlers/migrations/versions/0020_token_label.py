"""HTTP tokens may carry a label saying whose or what for they are: ``institution_tokens.label``.

Revision ID: 0020_token_label
Revises: 0019_token_expiry
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020_token_label"
down_revision = "0019_token_expiry"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("institution_tokens", sa.Column("label", sa.String(length=100), nullable=True))


def downgrade() -> None:
    op.drop_column("institution_tokens", "label")
