"""What the handlers record about their own work, in the same transaction as their effects.

``AppliedEvent`` makes redelivery and replay harmless; ``OutboxEvent`` holds derived events until
the relay has them in the log; ``ConsumerPosition`` is how far a consumer has read the log.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, LargeBinary
from sqlmodel import Field

from handlers.db import driver_cursor
from handlers.rows import TableRow


class AppliedEvent(TableRow, table=True):
    """An event whose effects are in the read models (by event id: derived events are applied
    when decided, before their copy arrives from the log)."""

    __tablename__ = "applied_events"
    __table_args__ = (
        sa.Index(
            "ix_applied_events_caused_by",
            "caused_by",
            sqlite_where=sa.text("caused_by IS NOT NULL"),
            postgresql_where=sa.text("caused_by IS NOT NULL"),
        ),
    )

    event_id: str = Field(primary_key=True, max_length=128)
    seq: int | None = Field(default=None, index=True)
    """Its log sequence; a derived event gets it when its copy arrives from the log."""
    caused_by: str | None = Field(default=None, max_length=128)
    """For a derived event, the id of the event it was decided on (its ``causationid``)."""


class ConsumerPosition(TableRow, table=True):
    """The last log sequence a consumer group has applied."""

    __tablename__ = "consumer_positions"

    consumer: str = Field(primary_key=True, max_length=64)
    seq: int = 0


class OutboxEvent(TableRow, table=True):
    """A derived event decided but not yet confirmed by the log. Kept across rebuilds."""

    __tablename__ = "outbox"

    position: int | None = Field(default=None, primary_key=True)
    event_id: str = Field(unique=True, max_length=128)
    event: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    created_at: datetime


# Positions are read and written once per batch (per event on a trickle): moved forward on the
# driver's cursor (:func:`driver_cursor`), read with Core statements built once per table.


@cache
def _position_read(table: sa.Table) -> Any:
    return sa.select(table.c.seq).where(table.c.consumer == sa.bindparam("of_consumer"))


def read_position(connection: sa.Connection, table: sa.Table, consumer: str) -> int:
    """``consumer``'s position in a positions table (``consumer``, ``seq``); 0 when it has none."""
    return connection.execute(_position_read(table), {"of_consumer": consumer}).scalar() or 0


def advance_position(connection: sa.Connection, table: sa.Table, consumer: str, seq: int) -> None:
    """Move ``consumer``'s position forward to ``seq`` (never backwards)."""
    name = table.name
    with driver_cursor(connection) as (cursor, mark):
        cursor.execute(f"UPDATE {name} SET seq = {mark} WHERE consumer = {mark} AND seq < {mark}", (seq, consumer, seq))
        if cursor.rowcount == 0:
            cursor.execute(f"SELECT seq FROM {name} WHERE consumer = {mark}", (consumer,))
            if cursor.fetchone() is None:
                cursor.execute(f"INSERT INTO {name} (consumer, seq) VALUES ({mark}, {mark})", (consumer, seq))


def applied_event(connection: sa.Connection, event_id: str) -> tuple[int | None, list[tuple[str, int | None]]] | None:
    """Where an applied event is in the log (``None`` for a derived event not logged yet) and the
    events derived from it with theirs, in log order (those not logged yet last); ``None`` when no
    event of this id has been applied."""
    table = AppliedEvent.__table__  # type: ignore[attr-defined]
    row = connection.execute(sa.select(table.c.seq).where(table.c.event_id == event_id)).first()
    if row is None:
        return None
    derived = connection.execute(sa.select(table.c.event_id, table.c.seq).where(table.c.caused_by == event_id)).all()
    ordered = sorted(((str(i), s) for i, s in derived), key=lambda item: (item[1] is None, item[1] or 0, item[0]))
    return row[0], ordered


def outbox_backlog(connection: sa.Connection) -> tuple[int, datetime | None]:
    """How many derived events wait in the outbox for the relay to log them, and since when the
    oldest has waited (a UTC time; None when none waits)."""
    table = OutboxEvent.__table__  # type: ignore[attr-defined]
    waiting, oldest = connection.execute(sa.select(sa.func.count(), sa.func.min(table.c.created_at))).one()
    if oldest is not None and oldest.tzinfo is None:  # stored without its zone: it was written in UTC
        oldest = oldest.replace(tzinfo=timezone.utc)
    return int(waiting), oldest
