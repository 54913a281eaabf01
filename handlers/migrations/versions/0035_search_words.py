"""What a search of projects, calls and institutions (``?q=``) looks in: ``projects.words``,
``calls.words`` (their titles and summaries) and ``institutions.words`` (their names), in every
language, without case or accents (``handlers.words``); filled in from the rows already there.

Revision ID: 0035_search_words
Revises: 0029_withdrawal_reason
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from handlers.words import stored_words

revision = "0035_search_words"
down_revision = "0029_withdrawal_reason"
branch_labels = None
depends_on = None

TABLES = {"projects": ("project_id", ("title", "summary")), "calls": ("call_id", ("title", "summary")),
          "institutions": ("id", ("name",))}


def upgrade() -> None:
    connection = op.get_bind()
    for table, (key, columns) in TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("words", sa.Text(), nullable=False, server_default=""))
        for row_id, *texts in connection.execute(sa.text(f"SELECT {key}, {', '.join(columns)} FROM {table}")).all():
            connection.execute(sa.text(f"UPDATE {table} SET words = :words WHERE {key} = :id"),
                               {"words": stored_words(*texts), "id": row_id})


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("words")
