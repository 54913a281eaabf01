"""What a search of projects, calls and institutions (``?q=``) looks in: ``projects.words``,
``calls.words`` (their titles and summaries) and ``institutions.words`` (their names), in every
language, without case or accents (``handlers.words``); filled in from the rows already there.

Revision ID: 0035_search_words
Revises: 0029_withdrawal_reason
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0035_search_words"
down_revision = "0029_withdrawal_reason"
branch_labels = None
depends_on = None

TABLES = {"projects": ("project_id", ("title", "summary")), "calls": ("call_id", ("title", "summary")),
          "institutions": ("id", ("name",))}


def _folded(text: str) -> str:
    """As ``handlers.words.folded`` folds at this revision (a migration keeps its own)."""
    letters = unicodedata.normalize("NFKD", text.replace("ı", "i"))
    return "".join(c for c in letters if not unicodedata.combining(c)).casefold().strip()


def _texts(value: Any) -> list[str]:
    value = json.loads(value) if isinstance(value, str) else value
    return [str(text) for text in value.values()] if isinstance(value, dict) else []


def upgrade() -> None:
    connection = op.get_bind()
    for table, (key, columns) in TABLES.items():
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("words", sa.Text(), nullable=False, server_default=""))
        for row_id, *texts in connection.execute(sa.text(f"SELECT {key}, {', '.join(columns)} FROM {table}")).all():
            words = "\n".join(_folded(text) for value in texts for text in _texts(value))
            connection.execute(sa.text(f"UPDATE {table} SET words = :words WHERE {key} = :id"), {"words": words, "id": row_id})


def downgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.drop_column("words")
