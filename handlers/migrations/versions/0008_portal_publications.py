"""The portal connector's publications: projects of the network marked for the portal
(``connectors.portal.store.PortalPublication``: kept across rebuilds).

Revision ID: 0008_portal_publications
Revises: 0007_portal
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_portal_publications"
down_revision = "0007_portal"
branch_labels = ("portal_publications",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "portal_publications",
        sa.Column("portal", sa.String(length=2048), primary_key=True),
        sa.Column("project_id", sa.String(length=128), primary_key=True),
        sa.Column("entry_type", sa.String(length=16), nullable=False),
        sa.Column("entry_id", sa.String(length=256), nullable=True),
        sa.Column("etag", sa.String(length=256), nullable=True),
        sa.Column("pushed", sa.JSON(), nullable=True),
        sa.Column("announced", sa.Boolean(), nullable=False),
        sa.Column("waiting_for", sa.String(length=128), nullable=True),
        sa.Column("marked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("pushed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("error", sa.String(length=2048), nullable=True),
    )
    op.create_index("ix_portal_publications_entry_id", "portal_publications", ["entry_id"])


def downgrade() -> None:
    op.drop_index("ix_portal_publications_entry_id", table_name="portal_publications")
    op.drop_table("portal_publications")
