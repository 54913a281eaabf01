"""A search of gatherings (``?q=``) by an index on PostgreSQL, as 0037 gives projects, calls and
institutions (the days' own line).

Revision ID: 0038_day_search_index
Revises: 0036_day_words
"""

from __future__ import annotations

from alembic import op

from handlers.words import create_trigram_indexes

revision = "0038_day_search_index"
down_revision = "0036_day_words"
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_trigram_indexes(op.get_bind(), ("innovation_days",))


def downgrade() -> None:
    op.execute("DROP INDEX IF EXISTS ix_innovation_days_words")
