"""A search of projects, calls and institutions (``?q=``) by an index on PostgreSQL: pg_trgm's GIN
index of each one's ``words`` (``handlers.words.trigram_index``). SQLite: nothing.

Revision ID: 0037_search_index
Revises: 0035_search_words
"""

from __future__ import annotations

from alembic import op

from handlers.words import create_trigram_indexes

revision = "0037_search_index"
down_revision = "0035_search_words"
branch_labels = None
depends_on = None

TABLES = ("projects", "calls", "institutions")


def upgrade() -> None:
    create_trigram_indexes(op.get_bind(), TABLES)


def downgrade() -> None:
    for table in TABLES:
        op.execute(f"DROP INDEX IF EXISTS ix_{table}_words")
