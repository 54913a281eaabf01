"""HTTP tokens may expire: ``institution_tokens.expires_at`` (none for the tokens issued before).

Revision ID: 0019_token_expiry
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019_token_expiry"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("institution_tokens", sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("institution_tokens", "expires_at")
