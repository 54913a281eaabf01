"""The network's state behind a small synchronous port, for the consumer plumbing in ``bus/``.

The consumer hands over batches of logged events; each batch is one transaction. It is first
applied straight through (no savepoints, the bookkeeping written once at the end); only when an
event fails is the batch rolled back and applied again with a savepoint per event, so the failing
event is rolled back alone and the ones before it commit.

The service is the read models' only writer, so it keeps one session and the rows it has read
(up to :data:`HELD_ROWS`, more in a rebuild) from batch to batch: members, calls, days and validations that many
events touch are read once, not once per event.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import Engine
from sqlalchemy import event as sa_event
from sqlmodel import Session

from handlers.bookkeeping import (
    AppliedEvent,
    ConsumerPosition,
    OutboxEvent,
    ParkedSubject,
    RulesEpoch,
    SetAside,
    aggregate_of,
    backend_pid,
    begin_rules_epoch,
    end_stalled,
    rules_epochs,
)
from handlers.db import database_unavailable, in_a_line, reading
from handlers.positions import PositionTaken
from handlers.network import REBUILDING, Book, Event, Network, applied_among
from handlers.rules import RULES, judged_by
from handlers.session import KnownKeysSession, tracked_tables
from ops.metrics import HANDLER_SECONDS, TIMERS_SECONDS
from schemas.common import nul_replaced

log = logging.getLogger("collabbus.handlers")

HELD_ROWS = 6_000
"""How many rows the service's session holds on to between batches; past that, the half least
recently asked for is let go (the identity map keeps rows only while something refers to them).
Each costs a few kilobytes: 6,000 keep a bus that has applied 100,000 events under 200 MB."""

REBUILD_HELD_ROWS = 50_000
"""The same for a rebuild, a process of its own that ends when the log is replayed: a network's
open days, calls and validations span many batches of a rebuild, and reading them (a day with
its registrations) again after they were let go halved its speed (~2,400 against ~4,500 events/s
over 30,000 workload events); it costs the rebuild process ~100 MB more at most."""


@dataclass(frozen=True)
class LoggedItem:
    """One event read from the log."""

    seq: int
    envelope: dict[str, Any]
    logged_at: datetime
    traceparent: str | None = None
    """The W3C trace context the log message carries (its producer's span)."""


def read_logged(data: bytes) -> dict[str, Any]:
    """An event of the log (its JSON) as the read models take it: a text holding U+0000, which
    the gate has refused since and PostgreSQL cannot store, reads as U+FFFD (:func:`nul_replaced`),
    on every database alike. Raises ``orjson.JSONDecodeError`` for what is no JSON."""
    envelope = orjson.loads(data)
    return nul_replaced(envelope) if b"\\u0000" in data else envelope  # (JSON writes the character so, and only so)


@dataclass(frozen=True)
class Failure:
    """Why one event could not be applied. ``permanent``: retrying cannot help (unreadable event);
    ``wait``: nothing is wrong with it, it is to be tried again later without counting a delivery
    (what it depends on is not there yet)."""

    error: str
    detail: str
    permanent: bool
    wait: bool = False
    behind: int | None = None
    """Set aside behind the event at this log sequence, an earlier one about the same thing (or
    about a thing its workflow reads: ``about``) that is in the dead-letter queue (:data:`PARKED`)."""
    about: tuple[str, str] | None = None
    """What it was set aside behind: the thing whose dead letter it waits for."""


PARKED = "Parked"
"""The error of an event set aside behind a dead letter about the same thing (its dead letter's
``Collabbus-Error``)."""


class NetworkService:
    """Applies logged events to the read models and runs the timers; owns the outbox."""

    def __init__(self, engine: Engine, network: Network, *, held_rows: int = HELD_ROWS) -> None:
        self.engine = engine
        self.network = network
        self.held_rows = held_rows
        self.rows_let_go = 0
        """Rows let go so far because more than ``held_rows`` were held (read again when needed)."""
        from sqlmodel import SQLModel

        import handlers.tables  # noqa: F401  (every table on the metadata)

        tracked = tracked_tables(SQLModel.metadata, leave_out=(AppliedEvent, ConsumerPosition, ParkedSubject, RulesEpoch))
        self._session = KnownKeysSession(engine, expire_on_commit=False, tracked=tracked)
        self._mutex = threading.Lock()
        self._fresh: list[tuple[str, bytes]] = []
        """Derived events this service committed to the outbox since the relay last asked (:meth:`fresh`)."""
        self._parked = SetAside(network.consumer)
        """What this consumer sets aside behind its dead letters."""
        self._taking: int | None = None
        """The database session taking the position over (:meth:`take_position`; PostgreSQL)."""
        self._withheld: set[str] = set()
        """The timers' events about things set aside, named in the log once each (:meth:`_withholding`)."""
        self._epochs: list[tuple[int, int]] = []
        """(from_seq, version) of the rules epochs (``RulesEpoch``), in log order: an event before
        :attr:`_current_from` is judged by the version that applied its part of the log. Read when
        this process takes the log over, rebuilds it or replays dead letters (:meth:`rules_epochs`)."""
        self._current_from = 0
        """Where the current rules' last epoch begins: events from here on are judged by them."""
        self._outbox_known = False
        """Whether the outbox holds nothing committed since its last reading but :attr:`_fresh`
        (not at start; not after the timers or an event-by-event batch wrote to it)."""
        held = self._session.held

        def hold(_session: Any, instance: Any) -> None:
            held[id(instance)] = instance

        # The identity map holds rows weakly; these keep them while they are likely to be used
        # again: the session moves a row it is asked for to the end, so the rows let go are the
        # ones least recently used (a network's members and open calls stay).
        sa_event.listen(self._session, "loaded_as_persistent", hold)
        sa_event.listen(self._session, "pending_to_persistent", hold)

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """One transaction on the service's session: committed when the block ends, rolled back if
        it raises (and then nothing read in it is trusted any more)."""
        with self._mutex:
            session = self._session
            held = session.held
            if len(held) > self.held_rows:  # keep the most recently used half; the rest may leave the identity map
                let_go = len(held) - self.held_rows // 2
                for _ in range(let_go):
                    held.popitem(last=False)
                self.rows_let_go += let_go
                session.forget_children(keep=0.5)  # the days and validations still in use keep their rows
            try:
                with session.begin():
                    yield session
            except BaseException as exc:
                self._forget()
                if database_unavailable(exc):  # a connection opened read-only, or lost: new ones next time
                    self.engine.dispose()
                raise

    def forget(self) -> None:
        """Drop what the service keeps of the read models; call it after writing them elsewhere."""
        with self._mutex:
            self._forget()
            self._session.forget_keys()

    def _forget(self) -> None:
        self._session.forget_children()
        self._session.expunge_all()
        self._session.held.clear()

    def close(self) -> None:
        with self._mutex:
            self._forget()
            self._session.close()

    def apply_batch(self, items: Sequence[LoggedItem], *, live: bool = True, replay: bool = False) -> tuple[int, Failure | None, int]:
        """Apply a batch in log order in one transaction, stopping at the first event that fails
        (``replay``: dead letters applied again, out of the log's order — the position is not held).

        Returns how many events were applied (the ones before the failed one are committed, the
        failed one is not), the failure if any, and how many derived events were decided. Raises
        only when the transaction itself fails (database down).

        The batch is applied straight through; when an event fails, everything is rolled back and
        the events before it are applied again and committed (handlers are deterministic, so they
        do the same again; the failed event is not run twice). When the failure cannot be pinned
        on one event (the commit itself failed), the batch is applied event by event, each in a
        savepoint.
        """
        end, failure = len(items), None
        while end:
            try:
                timings: list[tuple[str, float]] | None = [] if live else None  # (a rebuild's process serves no metrics)
                with self._transaction() as session:
                    derived, decided = self._apply(session, items[:end], live=live, timings=timings, replay=replay)
                with self._mutex:  # handed over once committed
                    self._fresh += decided
                for event_type, seconds in timings or ():  # only what was committed is counted
                    HANDLER_SECONDS.labels(event_type).observe(seconds)
                return end, failure, derived
            except _Failed as failed:
                end, failure = failed.index, failed.failure
            except PositionTaken:  # (rolled back: nothing of it was written, and what was held is forgotten)
                raise
            except Exception as exc:
                if database_unavailable(exc):  # not the events': the consumer holds them
                    raise
                log.debug("batch of %d failed as a whole (%s); applying event by event", end, exc)
                return self._apply_isolated(items, live=live, replay=replay)
        return 0, failure, 0

    def _apply_isolated(self, items: Sequence[LoggedItem], *, live: bool, replay: bool) -> tuple[int, Failure | None, int]:
        applied = 0
        failure: Failure | None = None
        book = Book()
        self._outbox_known = False  # what it decides reaches the outbox without being handed over
        with self._transaction() as session:
            self.network.claim(session, None if replay else items[0].seq)
            seen = self._seen(session, items)
            derived = 0
            for item in items:
                if (set_aside := self._set_aside(session, item, seen, live=live, replay=replay)) is not None:
                    failure = set_aside
                    break
                try:
                    event = Event.from_envelope(item.envelope, seq=item.seq, logged_at=item.logged_at, read=item.envelope.get("id") not in seen)
                except Exception as exc:  # the gate validated it; a schema change can still make it unreadable
                    failure = Failure(type(exc).__name__, str(exc)[:2000], permanent=True)
                    break
                started = time.perf_counter()
                mark = len(book.applied), len(book.logged), book.seq
                try:
                    with session.begin_nested(), self._judging(item.seq):
                        derived += len(self.network.apply(session, event, live=live, seen=seen, book=book, flush=True))
                except Exception as exc:
                    if database_unavailable(exc):
                        raise
                    del book.applied[mark[0]:]
                    del book.logged[mark[1]:]
                    book.seq = mark[2]
                    log.warning("handler failed on %s (#%s): %s", event.id, item.seq, in_a_line(exc), extra={"event_id": event.id})
                    failure = Failure(type(exc).__name__, _describe(exc), permanent=False)
                    break
                if live:
                    HANDLER_SECONDS.labels(event.type).observe(time.perf_counter() - started)
                applied += 1
            self.network.record(session, book)
        return applied, failure, derived

    def _apply(
        self, session: Session, items: Sequence[LoggedItem], *, live: bool, timings: list[tuple[str, float]] | None, replay: bool
    ) -> tuple[int, list[tuple[str, bytes]]]:
        """Apply every item straight through, noting each one's handling time in ``timings`` (if given); a
        failing event raises :class:`_Failed` (and the whole batch is rolled back). Returns how many
        derived events were decided, and what went into the outbox (id, body) in order."""
        self.network.claim(session, None if replay else items[0].seq)
        seen = self._seen(session, items)
        book = Book()
        derived = 0
        for index, item in enumerate(items):
            if (set_aside := self._set_aside(session, item, seen, live=live, replay=replay)) is not None:
                raise _Failed(index, set_aside)
            try:
                event = Event.from_envelope(item.envelope, seq=item.seq, logged_at=item.logged_at, read=item.envelope.get("id") not in seen)
            except Exception as exc:  # the gate validated it; a schema change can still make it unreadable
                raise _Failed(index, Failure(type(exc).__name__, str(exc)[:2000], permanent=True)) from exc
            started = time.perf_counter()
            try:
                if item.seq >= self._current_from:
                    derived += len(self.network.apply(session, event, live=live, seen=seen, book=book))
                else:
                    with self._judging(item.seq):
                        derived += len(self.network.apply(session, event, live=live, seen=seen, book=book))
            except Exception as exc:
                if database_unavailable(exc):  # (a handler's query flushed the session, say)
                    raise
                log.warning("handler failed on %s (#%s): %s", event.id, item.seq, in_a_line(exc), extra={"event_id": event.id})
                raise _Failed(index, Failure(type(exc).__name__, _describe(exc), permanent=False)) from exc
            if timings is not None:
                timings.append((event.type, time.perf_counter() - started))
        decided = [(row["event_id"], row["event"]) for row in book.outbox]
        self.network.record(session, book)
        return derived, decided

    def _set_aside(self, session: Session, item: LoggedItem, seen: set[str], *, live: bool, replay: bool) -> Failure | None:
        """Why ``item`` is set aside — an earlier event about the same thing, or about a thing its
        workflow reads to judge it (``Network.reads_of``: a validation's project), is in the
        dead-letter queue — or None: it is applied. Only the live bus sets events aside (a rebuild
        applies the whole log in order; a replay applies the dead letters); an event already
        applied (a derived event's copy) has nothing to wait for."""
        if not self._parked or not live or replay or item.envelope.get("id") in seen:
            return None
        if (found := self._waits_behind(session, item.envelope)) is None:
            return None
        thing, behind = found
        return Failure(PARKED, SetAside.reason(thing, behind), permanent=True, behind=behind, about=thing)

    def _waits_behind(self, session: Session, envelope: Any,
                      known: dict[tuple[str, str], int | None] | None = None) -> tuple[tuple[str, str], int] | None:
        """The first thing set aside that an event is about or its workflow reads to judge it
        (``Network.reads_of``: a validation's project), with the log sequence it waits behind;
        None when none is. ``known``: what was found of each thing already (the timers' events
        of one tick ask about the same things)."""
        about = aggregate_of(envelope)
        if about is None:
            return None
        known = {} if known is None else known
        for thing in [about, *self.network.reads_of(session, envelope)]:
            if thing not in known:
                known[thing] = self._parked.behind(session.connection(), thing)
            if (behind := known[thing]) is not None:
                return thing, behind
        return None

    @contextmanager
    def _judging(self, seq: int) -> Iterator[None]:
        """Judge the event at ``seq`` by the rules it was applied by (``handlers.rules.since``)."""
        if seq >= self._current_from or not self._epochs:
            yield
            return
        index = bisect.bisect_right(self._epochs, (seq, float("inf"))) - 1
        with judged_by(self._epochs[index][1] if index >= 0 else RULES):
            yield

    def _know_epochs(self, epochs: Sequence[tuple[int, int]]) -> None:
        """Keep the rules epochs (from_seq, version), in log order: the last of the current
        version begins :attr:`_current_from`, unless an older version follows it (a bus of an
        older version applied the log after it: then every event asks)."""
        ordered = sorted((int(seq), int(version)) for seq, version in epochs)
        current = ordered[-1][0] if ordered and ordered[-1][1] == RULES else None
        self._epochs = ordered
        self._current_from = current if current is not None else (0 if not ordered else 2**62)

    def rules_epochs(self, *, record: bool = True) -> list[tuple[int, int]]:
        """The rules epochs, which judge the events applied before by the rules they were applied
        by (a rebuild, a dead letter's replay): what the database records. ``record``: a database
        without any (new, or rebuilt without them) records that this version applies the whole log."""
        if record:
            with self._transaction() as session:
                epochs = rules_epochs(session.connection()) or begin_rules_epoch(session.connection(), 1, RULES)
        else:
            with reading(self.engine).connect() as connection:
                epochs = rules_epochs(connection)
        self._know_epochs(epochs)
        return epochs

    def use_rules_epochs(self, epochs: Sequence[tuple[int, int]]) -> None:
        """Judge by these rules epochs (a rebuild's other lanes get them from the rebuilding process)."""
        self._know_epochs(epochs)

    @staticmethod
    def _seen(session: Session, items: Sequence[LoggedItem]) -> set[str]:
        return applied_among(session, (str(item.envelope.get("id")) for item in items))

    def take_position(self) -> None:
        """Take the log's position over for this process, before its consumer starts: a process
        that applied it before (one that stalled past its lease, say) writes nothing from now on."""
        with self._transaction() as session:
            self._taking = backend_pid(session.connection())
            self.network.take(session)
            self._parked.load(session.connection())
            # What this process applies from here on is judged by its rules; what was applied before, by theirs.
            self._know_epochs(begin_rules_epoch(session.connection(), self.network.position(session) + 1, RULES))
            # A rebuild cut short left its first lane's position: no rebuild runs while a bus
            # applies the log (it holds the lease), and status would show it as a consumer behind.
            table = ConsumerPosition.__table__  # type: ignore[attr-defined]
            session.execute(table.delete().where(table.c.consumer == self.network.consumer + REBUILDING))

    def end_stalled(self, idle_for: float) -> list[int]:
        """While :meth:`take_position` waits: end the sessions it waits for that sat idle in a
        transaction for over ``idle_for`` seconds (:func:`~handlers.bookkeeping.end_stalled`)."""
        return end_stalled(self.engine, self._taking, idle_for)

    def skip(self, seq: int, envelope: Any = None) -> None:
        """Move past an event that was dead-lettered (``envelope``: the event, when readable): it
        is not applied, and what it is about is set aside — the later events about it are
        dead-lettered behind it (:meth:`_set_aside`) until ``collabbus dlq`` lets it go. A
        rebuild's process passes no envelope: it applies the rest of the log."""
        about = aggregate_of(envelope)
        with self._transaction() as session:
            self.network.claim(session, seq)
            self.network.advance(session, seq)
            if about is not None:
                self._parked.park(session.connection(), about, seq)

    def parked(self) -> list[tuple[str, str, int, int]]:
        """What this consumer sets aside: (domain, subject, first_seq, last_seq) — the log
        sequences of the first and the last event set aside about it."""
        return self._parked.listed(self.engine)

    def release(self, about: tuple[str, str], last_seq: int) -> bool:
        """Let ``about`` go (none of its events is left in the dead-letter queue), unless an event
        about it was set aside after ``last_seq``; whether it was let go."""
        gone = self._parked.release(self.engine, about, last_seq)
        if not self._parked:
            self._withheld.clear()
        return gone

    def tick(self, now: datetime | None = None) -> list[Event[Any]]:
        """Run the timers once; returns the events they decided."""
        started = time.perf_counter()
        with self._transaction() as session:
            self.network.claim(session, None)
            decided = self.network.tick(session, now, withheld=self._withholding(session) if self._parked else None)
        if decided:
            self._outbox_known = False  # the timers' events reach the outbox without being handed over
        TIMERS_SECONDS.observe(time.perf_counter() - started)
        return decided

    def _withholding(self, session: Session) -> Callable[[Event[Any]], bool]:
        """Which of the timers' events wait: those about a thing set aside (a call's closing at
        its deadline while an amendment moving the deadline is in the dead-letter queue), or
        decided on one (a day's meetings on an innovator's project: ``Network.reads_of``). They
        are decided again at each tick, and applied at the first one after the thing is let go."""
        known: dict[tuple[str, str], int | None] = {}

        def withheld(event: Event[Any]) -> bool:
            if (found := self._waits_behind(session, event.envelope, known)) is None:
                return False
            if event.id not in self._withheld:
                self._withheld.add(event.id)
                (domain, subject), behind = found
                log.warning("timers: %s about %s waits: %s %s is set aside behind #%s (collabbus dlq replay lets it go)",
                            event.type, event.subject, domain, subject, behind)
            return True

        return withheld

    def outbox(self, limit: int = 500, *, peek: bool = False) -> list[tuple[str, bytes]]:
        """Derived events waiting to be logged, oldest first. Read by the relay, which publishes
        them: what was handed over (:meth:`fresh`) is among them. ``peek``: read by someone else
        (how much waits, say), which leaves the hand-over to the relay: taken here, the relay
        would not publish what was committed meanwhile before its next reading of the table."""
        if not peek:
            with self._mutex:  # what was handed over is committed, so it is read here too
                self._fresh = []
                self._outbox_known = True
        with reading(self.engine).connect() as connection:  # a read of its own: no session, no write lock
            return [(event_id, body) for event_id, body in connection.execute(_OUTBOX, {"most": limit})]

    def fresh(self) -> list[tuple[str, bytes]] | None:
        """The derived events this service committed since the outbox was last read or this was
        last asked, in the order they were decided — or None when the outbox may hold others
        (it is to be read then): the relay publishes a trickle's derived events without reading
        the table each time. Each stays in the outbox until :meth:`outbox_done`."""
        with self._mutex:
            if not self._outbox_known:
                return None
            rows, self._fresh = self._fresh, []
            return rows

    def outbox_done(self, event_ids: Sequence[str]) -> None:
        """Forget derived events the log has confirmed."""
        if not event_ids:
            return
        with self.engine.begin() as connection:
            connection.execute(_OUTBOX_DONE, {"ids": list(event_ids)})

    def reset(self) -> None:
        """Empty every read model and the bookkeeping of what was applied (not the outbox: it
        holds derived events the log has not confirmed yet; not the positions of other consumers
        of the log, such as the webhooks'; not which rules applied which part of the log)."""
        from sqlmodel import SQLModel

        with self._transaction() as session:
            for table in reversed(SQLModel.metadata.sorted_tables):
                if table.name in (ConsumerPosition.__tablename__, ParkedSubject.__tablename__):  # other consumers' are theirs
                    own = (self.network.consumer, self.network.consumer + REBUILDING)  # (one a rebuild cut short left)
                    session.execute(table.delete().where(table.c.consumer.in_(own)))
                elif table.name not in (OutboxEvent.__tablename__, RulesEpoch.__tablename__):  # (which rules applied the log stays)
                    session.execute(table.delete())
        with self._mutex:
            self._forget()
            self._session.know_empty()
            self._parked.known.clear()
            self._withheld.clear()

    def drop_position(self, consumer: str) -> None:
        """Forget ``consumer``'s position (a rebuild's, once it is done)."""
        table = ConsumerPosition.__table__  # type: ignore[attr-defined]
        with self._transaction() as session:
            session.execute(table.delete().where(table.c.consumer == consumer))

    def position(self) -> int:
        """The last log sequence applied."""
        with self._transaction() as session:
            return self.network.position(session)


_OUTBOX_TABLE = OutboxEvent.__table__  # type: ignore[attr-defined]
_OUTBOX = (
    sa.select(_OUTBOX_TABLE.c.event_id, _OUTBOX_TABLE.c.event)
    .order_by(_OUTBOX_TABLE.c.position)
    .limit(sa.bindparam("most"))
)
_OUTBOX_DONE = _OUTBOX_TABLE.delete().where(_OUTBOX_TABLE.c.event_id.in_(sa.bindparam("ids", expanding=True)))


class _Failed(Exception):
    """The event at ``index`` of a batch applied straight through could not be read or applied."""

    def __init__(self, index: int, failure: Failure) -> None:
        super().__init__(failure.error)
        self.index = index
        self.failure = failure


def _describe(exc: BaseException) -> str:
    """A handler's failure for its dead letter, within ``DETAIL_LENGTH`` characters: a traceback
    of the project's own frames, the innermost first to be kept when not all fit, and of the frame
    where it was raised, counting those left out where they were; then the exception as it says
    itself (a database error with its statement and parameters), cut short if it is long."""
    from bus.deadletters import DETAIL_LENGTH

    summary = traceback.TracebackException.from_exception(exc)
    said = "".join(summary.format_exception_only()).strip()
    if len(said) > DETAIL_LENGTH // 2:
        said = said[:DETAIL_LENGTH // 2 - 1] + "…"
    frames = list(summary.stack)
    shown = {index: _frame(frame) for index, frame in enumerate(frames)}
    room = DETAIL_LENGTH - len(said) - 200  # (a line said before it, by a rebuild)
    kept: set[int] = set()
    for index in [*(i for i in reversed(range(len(frames))) if _own(frames[i].filename)), len(frames) - 1]:
        if index >= 0 and index not in kept and len(shown[index]) + 40 <= room:
            kept.add(index)
            room -= len(shown[index]) + 40  # (and a line counting frames left out before it)
    lines, left_out = ["Traceback (most recent call last):"], 0
    for index in range(len(frames)):
        if index not in kept:
            left_out += 1
            continue
        if left_out:
            lines.append(f"  … {left_out} frame{'s' if left_out != 1 else ''} left out")
            left_out = 0
        lines.append(shown[index])
    if left_out:
        lines.append(f"  … {left_out} frame{'s' if left_out != 1 else ''} left out")
    return "\n".join([*lines, said])


_PROJECT = Path(__file__).resolve().parents[1]
_OWN_CODE = tuple(f"{_PROJECT / package}{os.sep}" for package in ("bus", "connectors", "handlers", "ops", "schemas"))


def _own(filename: str) -> bool:
    """Whether a frame is of the project's own code (not a library's)."""
    return filename.startswith(_OWN_CODE)


def _frame(frame: traceback.FrameSummary) -> str:
    """A frame as a traceback shows it, the project's own files named from the project's root."""
    filename = frame.filename
    if _own(filename):
        filename = filename[len(f"{_PROJECT}{os.sep}"):]
    code = (frame.line or "").strip()
    return f'  File "{filename}", line {frame.lineno}, in {frame.name}' + (f"\n    {code}" if code else "")
