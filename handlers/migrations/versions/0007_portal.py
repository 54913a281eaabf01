"""The portal connector's own state: sync cursors and what each entry last became
(``connectors.portal.store``: kept across rebuilds).

Revision ID: 0007_portal
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_portal"
down_revision = "0001"
branch_labels = ("portal",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "portal_cursors",
        sa.Column("portal", sa.String(length=2048), primary_key=True),
        sa.Column("updated_since", sa.String(length=64), nullable=True),
        sa.Column("cursor", sa.String(length=2048), nullable=True),
        sa.Column("high_water", sa.String(length=64), nullable=True),
        sa.Column("mapping", sa.String(length=64), nullable=True),
        sa.Column("saved_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "portal_entries",
        sa.Column("portal", sa.String(length=2048), primary_key=True),
        sa.Column("entry_id", sa.String(length=256), primary_key=True),
        sa.Column("project_id", sa.String(length=128), nullable=False),
        sa.Column("owner", sa.String(length=63), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("etag", sa.String(length=256), nullable=True),
        sa.Column("synced_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_portal_entries_project_id", "portal_entries", ["project_id"])


def downgrade() -> None:
    op.drop_index("ix_portal_entries_project_id", table_name="portal_entries")
    op.drop_table("portal_entries")
    op.drop_table("portal_cursors")
