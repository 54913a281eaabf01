"""What a search of gatherings (``/innovation-days?q=``) looks in: ``innovation_days.words``, their
titles and summaries in every language, without case or accents (``handlers.words``), as
0035_search_words keeps them for projects, calls and institutions (``handlers.words.stored_words``);
filled in from the days there.

Revision ID: 0036_day_words
Revises: 0012_day_revision
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from handlers.words import stored_words

revision = "0036_day_words"
down_revision = "0012_day_revision"
branch_labels = None
depends_on = None


def upgrade() -> None:
    connection = op.get_bind()
    with op.batch_alter_table("innovation_days") as batch:
        batch.add_column(sa.Column("words", sa.Text(), nullable=False, server_default=""))
    for day_id, title, summary in connection.execute(sa.text("SELECT day_id, title, summary FROM innovation_days")).all():
        connection.execute(sa.text("UPDATE innovation_days SET words = :words WHERE day_id = :id"),
                           {"words": stored_words(title, summary), "id": day_id})


def downgrade() -> None:
    with op.batch_alter_table("innovation_days") as batch:
        batch.drop_column("words")
