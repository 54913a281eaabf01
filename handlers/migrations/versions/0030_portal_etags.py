"""A portal's ETags as long as the portal makes them (``portal_entries.etag``,
``portal_publications.etag``): an ETag is opaque and HTTP sets it no length, and one over 256
characters failed storing its page on PostgreSQL (SQLite keeps any text in either).

Revision ID: 0030_portal_etags
Revises: 0008_portal_publications
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0030_portal_etags"
down_revision = "0008_portal_publications"
branch_labels = None
depends_on = None

TABLES = ("portal_entries", "portal_publications")


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":  # (its VARCHAR is text of any length: nothing to change)
        return
    for table in TABLES:
        op.alter_column(table, "etag", type_=sa.Text(), existing_type=sa.String(length=256), existing_nullable=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table in TABLES:
        op.alter_column(table, "etag", type_=sa.String(length=256), existing_type=sa.Text(), existing_nullable=True)
