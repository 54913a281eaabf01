"""What a search of gatherings (``/innovation-days?q=``) looks in: ``innovation_days.words``, their
titles and summaries in every language, without case or accents (``handlers.words``), as
0035_search_words keeps them for projects, calls and institutions; filled in from the days there.

Revision ID: 0036_day_words
Revises: 0012_day_revision
"""

from __future__ import annotations

import json
import unicodedata
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0036_day_words"
down_revision = "0012_day_revision"
branch_labels = None
depends_on = None


def _folded(text: str) -> str:
    """As ``handlers.words.folded`` folds at this revision (a migration keeps its own)."""
    letters = unicodedata.normalize("NFKD", text.replace("ı", "i"))
    return "".join(c for c in letters if not unicodedata.combining(c)).casefold().strip()


def _texts(value: Any) -> list[str]:
    value = json.loads(value) if isinstance(value, str) else value
    return [str(text) for text in value.values()] if isinstance(value, dict) else []


def upgrade() -> None:
    connection = op.get_bind()
    with op.batch_alter_table("innovation_days") as batch:
        batch.add_column(sa.Column("words", sa.Text(), nullable=False, server_default=""))
    for day_id, title, summary in connection.execute(sa.text("SELECT day_id, title, summary FROM innovation_days")).all():
        words = "\n".join(_folded(text) for value in (title, summary) for text in _texts(value))
        connection.execute(sa.text("UPDATE innovation_days SET words = :words WHERE day_id = :id"), {"words": words, "id": day_id})


def downgrade() -> None:
    with op.batch_alter_table("innovation_days") as batch:
        batch.drop_column("words")
