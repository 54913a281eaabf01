"""What a search of the read API (``?q=``) looks in: a row's texts for people — its title and
summary, in every language they are given in — folded as a search is: without case or accents,
Turkish's dotless ı as i. They are kept in a column of the row (``words``), so that a search is a
SQL ``LIKE`` of each word asked for, on SQLite and PostgreSQL alike, and pages in SQL."""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa

SEARCHED = ("title", "summary")
"""The fields whose texts are searched (each a LocalizedText, the summary optional)."""


def folded(text: str) -> str:
    """``text`` as it is compared: without case or accents, Turkish's dotless ı as i, so that
    ``yenisehir`` and ``YENİŞEHİR`` find ``Yenişehir``, and ``tyoelama`` ``työelämä``."""
    letters = unicodedata.normalize("NFKD", text.replace("ı", "i"))
    return "".join(c for c in letters if not unicodedata.combining(c)).casefold().strip()


def words(*texts: Mapping[str, str] | None) -> str:
    """The folded texts of ``texts`` (LocalizedTexts, or none), one a line."""
    return "\n".join(folded(value) for text in texts if text for value in text.values())


def stored_words(*texts: Any) -> str:
    """:func:`words` of LocalizedTexts as a database returns them (JSON text on SQLite, objects on
    PostgreSQL, or none): what a migration fills the column of the rows already there with."""
    read = (json.loads(text) if isinstance(text, str) else text for text in texts)
    return words(*(text for text in read if isinstance(text, dict)))


def matching(column: Any, q: str) -> list[Any]:
    """Conditions on a ``words`` column: it contains each whitespace-separated word of ``q``,
    folded, anywhere (a word's start or middle: ``kitchen`` finds ``kitchens``)."""
    from sqlmodel import col

    def literal(word: str) -> str:  # LIKE's own characters taken as themselves
        return word.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

    return [col(column).like(f"%{literal(word)}%", escape="\\") for word in folded(q).split()]


def trigram_index(table: str) -> sa.Index:
    """The index that serves a search's ``LIKE '%word%'`` of ``table``'s ``words`` on PostgreSQL:
    pg_trgm's GIN operator class, for words of three letters or more (a shorter one reads the
    index whole). SQLite has none: its ``LIKE`` reads the rows, which a network of its size
    does in milliseconds."""
    return sa.Index(f"ix_{table}_words", "words", postgresql_using="gin",
                    postgresql_ops={"words": "gin_trgm_ops"}).ddl_if(dialect="postgresql")


SEARCHED_TABLES = ("projects", "calls", "institutions", "innovation_days")
"""The tables a search (``?q=``) reads, each with its :func:`trigram_index` on PostgreSQL."""


def unindexed(connection: sa.Connection) -> list[str]:
    """Those of :data:`SEARCHED_TABLES` whose search reads every row on PostgreSQL: they have no
    :func:`trigram_index` (pg_trgm could not be had when they were migrated). None on SQLite."""
    if connection.dialect.name != "postgresql":
        return []
    names = [f"ix_{table}_words" for table in SEARCHED_TABLES]
    found = set(connection.execute(sa.text("SELECT indexname FROM pg_indexes WHERE indexname = ANY(:names)"),
                                   {"names": names}).scalars())
    return [table for table, name in zip(SEARCHED_TABLES, names) if name not in found]


def trigram_statements(tables: Sequence[str]) -> list[str]:
    """The statements creating :func:`trigram_index` of each of ``tables`` on PostgreSQL."""
    from sqlalchemy.dialects import postgresql

    indexes = [trigram_index(table) for table in tables]
    for table, index in zip(tables, indexes):  # (each on a table of its one column, as the migration knows it)
        sa.Table(table, sa.MetaData(), sa.Column("words", sa.Text), index)
    return [str(sa.schema.CreateIndex(index).compile(dialect=postgresql.dialect())) for index in indexes]


def create_trigram_indexes(connection: sa.Connection, tables: Sequence[str]) -> None:
    """Create :func:`trigram_index` of each of ``tables`` (a migration's step) with the pg_trgm
    extension it needs, trusted since PostgreSQL 13: the database's owner may create it. Where it
    cannot be had, a search reads the rows as before, and the migration says how to index it."""
    if connection.dialect.name != "postgresql":
        return
    statements = trigram_statements(tables)
    try:
        with connection.begin_nested():
            connection.execute(sa.text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
    except sa.exc.DBAPIError as exc:
        logging.getLogger("alembic").warning(
            "pg_trgm cannot be had here (%s): a search (?q=) of %s reads every row. A superuser indexes them with: %s",
            str(exc.orig).strip().splitlines()[0], ", ".join(tables), "; ".join(["CREATE EXTENSION IF NOT EXISTS pg_trgm", *statements]))
        return
    for statement in statements:
        connection.execute(sa.text(statement))
