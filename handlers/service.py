"""The network's state behind a small synchronous port, for the consumer plumbing in ``bus/``.

The consumer hands over batches of logged events; each batch is one transaction, each event a
savepoint in it, so one failing event is rolled back alone and the rest of the batch commits.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete
from sqlmodel import col, select

from handlers.bookkeeping import AppliedEvent, OutboxEvent
from handlers.db import session_scope
from handlers.network import Event, Network
from ops.metrics import HANDLER_SECONDS

log = logging.getLogger("collabbus.handlers")


@dataclass(frozen=True)
class LoggedItem:
    """One event read from the log."""

    seq: int
    envelope: dict[str, Any]
    logged_at: datetime


@dataclass(frozen=True)
class Failure:
    """Why one event could not be applied. ``permanent``: retrying cannot help (unreadable event)."""

    error: str
    detail: str
    permanent: bool


class NetworkService:
    """Applies logged events to the read models and runs the timers; owns the outbox."""

    def __init__(self, engine: Engine, network: Network) -> None:
        self.engine = engine
        self.network = network

    def apply_batch(self, items: Sequence[LoggedItem], *, live: bool = True) -> tuple[int, Failure | None, int]:
        """Apply a batch in log order in one transaction, stopping at the first event that fails.

        Returns how many events were applied (the failed one is rolled back alone; the ones before
        it are committed), the failure if any, and how many derived events were decided. Raises
        only when the transaction itself fails (database down).
        """
        applied = derived = 0
        failure: Failure | None = None
        with session_scope(self.engine) as session:
            ids = [str(item.envelope.get("id")) for item in items]
            seen = set(session.exec(select(AppliedEvent.event_id).where(col(AppliedEvent.event_id).in_(ids))).all())
            for item in items:
                try:
                    event = Event.from_envelope(item.envelope, seq=item.seq, logged_at=item.logged_at)
                except Exception as exc:  # the gate validated it; a schema change can still make it unreadable
                    failure = Failure(type(exc).__name__, str(exc)[:2000], permanent=True)
                    break
                started = time.perf_counter()
                try:
                    with session.begin_nested():
                        derived += len(self.network.apply(session, event, live=live, seen=seen))
                except Exception as exc:
                    log.warning("handler failed on %s (#%s): %s", event.id, item.seq, exc, extra={"event_id": event.id})
                    failure = Failure(type(exc).__name__, _describe(exc), permanent=False)
                    break
                HANDLER_SECONDS.labels(event.type).observe(time.perf_counter() - started)
                applied += 1
        return applied, failure, derived

    def skip(self, seq: int) -> None:
        """Move past an event that was dead-lettered: it is not applied, and later events are."""
        with session_scope(self.engine) as session:
            self.network.advance(session, seq)

    def tick(self, now: datetime | None = None) -> int:
        """Run the timers once; returns how many events they decided."""
        with session_scope(self.engine) as session:
            return len(self.network.tick(session, now))

    def outbox(self, limit: int = 500) -> list[tuple[str, bytes]]:
        """Derived events waiting to be logged, oldest first."""
        with session_scope(self.engine) as session:
            rows = session.exec(select(OutboxEvent).order_by(col(OutboxEvent.position)).limit(limit)).all()
            return [(row.event_id, row.event) for row in rows]

    def outbox_done(self, event_ids: Sequence[str]) -> None:
        """Forget derived events the log has confirmed."""
        if not event_ids:
            return
        with session_scope(self.engine) as session:
            session.exec(delete(OutboxEvent).where(OutboxEvent.event_id.in_(event_ids)))  # type: ignore[call-overload,attr-defined]

    def reset(self) -> None:
        """Empty every read model and the bookkeeping of what was applied (not the outbox: it
        holds derived events the log has not confirmed yet)."""
        from sqlmodel import SQLModel

        import handlers.tables  # noqa: F401  (every table on the metadata)

        with session_scope(self.engine) as session:
            for table in reversed(SQLModel.metadata.sorted_tables):
                if table.name != OutboxEvent.__tablename__:
                    session.execute(table.delete())

    def position(self) -> int:
        """The last log sequence applied."""
        with session_scope(self.engine) as session:
            return self.network.position(session)


def _describe(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))[-2000:]
