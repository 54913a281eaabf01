"""What the handlers record about their own work, in the same transaction as their effects.

``AppliedEvent`` makes redelivery and replay harmless; ``OutboxEvent`` holds derived events until
the relay has them in the log; ``ConsumerPosition`` is how far a consumer has read the log.
"""

from __future__ import annotations

from datetime import datetime

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
