"""What the handlers record about their own work, in the same transaction as their effects.

``AppliedEvent`` makes redelivery and replay harmless; ``OutboxEvent`` holds derived events until
the relay has them in the log; ``ConsumerPosition`` is how far a consumer has read the log.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Column, LargeBinary
from sqlmodel import Field

from handlers.rows import TableRow


class AppliedEvent(TableRow, table=True):
    """An event whose effects are in the read models (by event id: derived events are applied
    when decided, before their copy arrives from the log)."""

    __tablename__ = "applied_events"

    event_id: str = Field(primary_key=True, max_length=128)
    seq: int | None = Field(default=None, index=True)


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


# Positions are read and written once per batch (per event on a trickle), with Core statements
# built once per table: the ORM's unit of work cost more than the statements themselves.


@cache
def _position_statements(table: sa.Table) -> tuple[Any, Any, Any]:
    read = sa.select(table.c.seq).where(table.c.consumer == sa.bindparam("of_consumer"))
    forward = (
        table.update()
        .where(table.c.consumer == sa.bindparam("of_consumer"), table.c.seq < sa.bindparam("to_seq"))
        .values(seq=sa.bindparam("to_seq"))
    )
    return read, forward, table.insert()


def read_position(connection: sa.Connection, table: sa.Table, consumer: str) -> int:
    """``consumer``'s position in a positions table (``consumer``, ``seq``); 0 when it has none."""
    read, _, _ = _position_statements(table)
    return connection.execute(read, {"of_consumer": consumer}).scalar() or 0


def advance_position(connection: sa.Connection, table: sa.Table, consumer: str, seq: int) -> None:
    """Move ``consumer``'s position forward to ``seq`` (never backwards)."""
    read, forward, insert = _position_statements(table)
    if connection.execute(forward, {"of_consumer": consumer, "to_seq": seq}).rowcount == 0:
        if connection.execute(read, {"of_consumer": consumer}).first() is None:
            connection.execute(insert, {"consumer": consumer, "seq": seq})
