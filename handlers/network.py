"""The unit of work that turns logged events into network state (projections) and consequences
(workflow decisions), exactly once.

For each event, in one transaction: the deciders registered for its type look at the state and
may *refuse* it (its effects are then not applied; a ``…_rejected`` event says why) or *emit*
derived events; the projections apply the event; each derived event is applied at once, recorded
as applied by its deterministic id, and — when live — written to the outbox for the relay to log.
When a derived event's copy later arrives from the log it is recognised and skipped.

Deciders run during a rebuild too (they are deterministic functions of state and event, using the
log's acceptance time as "now"), so a rebuilt state equals the incrementally built one; only the
outbox is left out, since the derived events are already in the log.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel
from sqlmodel import Session

from handlers.bookkeeping import (
    AppliedEvent,
    ConsumerPosition,
    OutboxEvent,
    advance_position,
    claim_position,
    read_position,
    take_position,
)
from handlers.db import driver_cursor
from handlers.rules import Refusal
from schemas import registry
from schemas.common import LOGGED, EventData

LOGGED_CONTEXT = {LOGGED: True}

D = TypeVar("D", bound=EventData)


@dataclass(frozen=True)
class Event(Generic[D]):
    """An accepted event as handlers see it: typed data, who said it, when the log took it."""

    id: str
    type: str
    source: str
    """The institution id (``source`` without ``/institutions/``)."""
    subject: str
    time: datetime
    """The producer's time."""
    logged_at: datetime
    """When the log accepted it (a derived event: its cause's). Rules about deadlines use this."""
    data: D
    seq: int | None = None
    correlationid: str | None = None
    causationid: str | None = None
    envelope: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any], *, seq: int | None, logged_at: datetime, read: bool = True) -> "Event[Any]":
        """Read a canonical envelope from the log (already validated by the gate). ``read=False``:
        for an event applied before (a derived event's copy arriving from the log, a redelivery),
        which changes nothing: its data is not read again (``data`` is None)."""
        data: Any = None
        if read:
            spec = registry.spec_for(envelope["type"], registry.parse_dataschema(envelope.get("dataschema"), envelope["type"]))
            data = spec.adapter.validate_python(envelope["data"], context=LOGGED_CONTEXT)  # as the gate accepted it then
        time = envelope.get("time")
        return cls(
            id=envelope["id"],
            type=envelope["type"],
            source=str(envelope["source"]).removeprefix("/institutions/"),
            subject=envelope["subject"],
            time=datetime.fromisoformat(time.upper()) if isinstance(time, str) else logged_at,  # RFC 3339 allows t, z
            logged_at=logged_at,
            data=data,
            seq=seq,
            correlationid=envelope.get("correlationid"),
            causationid=envelope.get("causationid"),
            envelope=envelope,
        )


deciding_traceparent: ContextVar[Callable[[], str | None] | None] = ContextVar("collabbus_deciding_traceparent", default=None)
"""Set by whoever traces the application of an event: the ``traceparent`` of the span deciding
it, which the events derived from it carry (without one: their cause's own ``traceparent``).
A function, so that only an event that derives something pays for formatting it."""


def derived_id(event_type: str, cause: str, key: str = "") -> str:
    """The deterministic id of an event derived from ``cause`` (an event id, or a timer's name)."""
    digest = hashlib.sha256(f"{cause}\x1f{event_type}\x1f{key}".encode()).hexdigest()[:32]
    return f"{event_type}.{digest}"


def derived_type(event_id: str) -> str | None:
    """The type of a derived event, read off its id (:func:`derived_id`)."""
    event_type, _, digest = event_id.rpartition(".")
    return event_type if len(digest) == 32 and event_type else None


class Context:
    """What a decider gets: the session, the event (None for timers), and ways to emit or refuse."""

    def __init__(self, session: Session, event: Event[Any] | None, *, now: datetime, live: bool) -> None:
        self.session = session
        self.event = event
        self.now = now
        self.live = live
        self.derived: list[Event[Any]] = []
        self.refused = False

    def emit(
        self,
        event_type: str,
        data: EventData | Mapping[str, Any],
        *,
        source: str,
        subject: str | None = None,
        key: str = "",
        cause: str | None = None,
    ) -> Event[Any]:
        """Decide a derived event, emitted in the name of ``source`` (the aggregate's owner).

        ``key`` tells apart several events of one type from one cause (e.g. each promotion).
        """
        spec = registry.spec_for(event_type)
        model = data if isinstance(data, BaseModel) else spec.adapter.validate_python(dict(data))
        payload = model.model_dump(mode="json", exclude_unset=True)
        subject = subject or str(getattr(model, spec.subject_field))
        cause_id = cause or (self.event.id if self.event else "timer")
        event_id = derived_id(event_type, cause_id, key or subject)
        envelope: dict[str, Any] = {
            "specversion": "1.0",
            "id": event_id,
            "source": f"/institutions/{source}",
            "type": event_type,
            "subject": subject,
            "time": self.now.isoformat(),
            "datacontenttype": "application/json",
        }
        if self.event is not None:
            envelope["correlationid"] = self.event.correlationid or self.event.id
            envelope["causationid"] = self.event.id
            deciding = deciding_traceparent.get()
            traceparent = (deciding() if deciding is not None else None) or self.event.envelope.get("traceparent")
            if traceparent:
                envelope["traceparent"] = traceparent
        envelope["data"] = payload
        derived: Event[Any] = Event(
            id=event_id,
            type=event_type,
            source=source,
            subject=subject,
            time=self.now,
            logged_at=self.now,
            data=model,
            correlationid=envelope.get("correlationid"),
            causationid=envelope.get("causationid"),
            envelope=envelope,
        )
        self.derived.append(derived)
        return derived

    def refuse_action(self, refusal: Refusal, *, source: str, **extra: Any) -> Event[Any]:
        """Refuse the current event with its domain's ``….action_rejected`` (the aggregate, what
        was refused and whose it was, why, and the ``extra`` fields its type has), in the name of
        ``source``."""
        event = self.event
        assert event is not None
        refusal_type = f"{event.type.partition('.')[0]}.action_rejected"
        aggregate = registry.spec_for(refusal_type).subject_field
        return self.refuse(
            refusal_type,
            {aggregate: getattr(event.data, aggregate), "rejected_type": event.type, "rejected_event_id": event.id,
             "actor": event.source, "reason": refusal.as_reason(), **extra},
            source=source,
        )

    def refuse(self, event_type: str, data: EventData | Mapping[str, Any], *, source: str, key: str = "") -> Event[Any]:
        """Refuse the current event: its projections are skipped and ``event_type`` says why."""
        self.refused = True
        return self.emit(event_type, data, source=source, key=key or "refused")


Projection = Callable[[Session, Event[Any]], None]
Decider = Callable[[Context], None]
Timer = Callable[[Context], None]


@dataclass(frozen=True)
class Reads:
    """What a type's workflow reads of another ``domain`` to judge an event of it: the subjects
    there, from the read models and the event as logged. While one of those things is set aside
    behind a dead letter, the event waits too."""

    domain: str
    subjects: Callable[[Session, Mapping[str, Any]], Iterable[str]]

    def __call__(self, session: Session, envelope: Mapping[str, Any]) -> list[tuple[str, str]]:
        return [(self.domain, subject) for subject in self.subjects(session, envelope)]


def named_in(envelope: Mapping[str, Any], field_name: str) -> str | None:
    """What the event's data names in ``field_name``, when it is a string (an envelope as logged,
    before its data is read)."""
    data = envelope.get("data")
    value = data.get(field_name) if isinstance(data, dict) else None
    return value if isinstance(value, str) else None


def named(domain: str, field_name: str) -> Reads:
    """:class:`Reads` of the thing of ``domain`` that the event's data names in ``field_name``."""
    def subjects(_session: Session, envelope: Mapping[str, Any]) -> list[str]:
        value = named_in(envelope, field_name)
        return [value] if value is not None else []
    return Reads(domain, subjects)


def _the_sender(_session: Session, envelope: Mapping[str, Any]) -> list[str]:
    source = envelope.get("source")
    return [source.removeprefix("/institutions/")] if isinstance(source, str) else []


sender = Reads("institution", _the_sender)
""":class:`Reads` of the institution saying the event (its membership, kind, country)."""


@dataclass
class Routes:
    """Which projections and deciders handle which event types: the whole routing in one table."""

    projections: dict[str, list[Projection]] = field(default_factory=dict)
    deciders: dict[str, list[Decider]] = field(default_factory=dict)
    timers: list[Timer] = field(default_factory=list)
    reads: dict[str, list[Reads]] = field(default_factory=dict)

    def add(
        self,
        projections: Mapping[str, Projection | Iterable[Projection]] = {},
        deciders: Mapping[str, Decider | Iterable[Decider]] = {},
        timers: Iterable[Timer] = (),
        reads: Mapping[str, Reads | Iterable[Reads]] = {},
    ) -> "Routes":
        for table, target in ((projections, self.projections), (deciders, self.deciders), (reads, self.reads)):
            for event_type, handlers in table.items():
                registry.spec_for(event_type)  # a typo in a route fails at start-up, not at run time
                items = [handlers] if callable(handlers) else list(handlers)
                target.setdefault(event_type, []).extend(items)  # type: ignore[arg-type]
        self.timers.extend(timers)
        return self


@dataclass
class Book:
    """What a batch applied, recorded once at its end (:meth:`Network.record`)."""

    applied: list[tuple[str, int | None, str | None]] = field(default_factory=list)
    """``(event id, log sequence, cause)``: the cause is a derived event's ``causationid``."""
    logged: list[tuple[str, int]] = field(default_factory=list)
    """Events seen again with their log sequence (a derived event's copy arriving from the log)."""
    seq: int = 0
    outbox: list[dict[str, Any]] = field(default_factory=list)
    """Derived events for the outbox, in the order they were decided."""


# The bookkeeping happens once per batch (or per event on a trickle): the applied ids and the
# position go straight to the driver's cursor (:func:`driver_cursor`), the outbox through a Core
# statement built once (its times are typed); the ORM's unit of work cost more than the statements.
_APPLIED = AppliedEvent.__table__  # type: ignore[attr-defined]
_POSITIONS = ConsumerPosition.__table__  # type: ignore[attr-defined]
_OUTBOX_INSERT = OutboxEvent.__table__.insert()  # type: ignore[attr-defined]


def applied_among(session: Session, event_ids: Iterable[str]) -> set[str]:
    """Which of ``event_ids`` have been applied."""
    ids = list(event_ids)
    if not ids:
        return set()
    with driver_cursor(session.connection()) as (cursor, mark):
        if mark == "?":
            cursor.execute(f"SELECT event_id FROM {_APPLIED.name} WHERE event_id IN ({', '.join('?' * len(ids))})", ids)
        else:  # one statement whatever the number of ids (PostgreSQL prepares what it runs often)
            cursor.execute(f"SELECT event_id FROM {_APPLIED.name} WHERE event_id = ANY(%s)", (ids,))
        return {row[0] for row in cursor.fetchall()}


REBUILDING = ":rebuild"
"""The suffix of the position a rebuild's first lane records while the others run (e.g.
``network:rebuild``): how far the rebuild has got, for ``collabbus status`` and the benchmark."""


class Network:
    """Applies events to the read models through ``routes``, recording what it applied."""

    def __init__(self, routes: Routes, consumer: str = "network") -> None:
        self.routes = routes
        self.consumer = consumer
        self.positions_as = consumer
        """Whose position it records how far the log has been applied as: its consumer's, but a
        rebuild's first lane records its own (:data:`REBUILDING`) until the other lanes' rows are
        in (``bus.rebuild``), so that a bus started after the rebuild was cut short starts from
        the log's beginning (passing what was applied), not from where that lane got."""
        self.epoch: int | None = None
        """This process's number in its consumer's position once it took that over (:meth:`take`);
        None: not checked (a rebuild's replay)."""

    def reads_of(self, session: Session, envelope: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The things of other domains the event's workflow reads to judge it (:class:`Reads`)."""
        readers = self.routes.reads.get(str(envelope.get("type")), ())
        return [thing for read in readers for thing in read(session, envelope)]

    def apply(
        self,
        session: Session,
        event: Event[Any],
        *,
        live: bool,
        seen: set[str] | None = None,
        book: "Book | None" = None,
        flush: bool = False,
    ) -> list[Event[Any]]:
        """Apply one logged event; returns the derived events decided. A seen id changes nothing.

        ``seen``: the ids among a batch already applied, when the caller looked them up at once.
        ``book``: collect what was applied and how far the log was read, for the caller to record
        once per batch (:meth:`record`); without it, both are recorded at once. ``flush``: write
        the event's changes before returning, so that a write the database refuses fails here,
        in the event's own span, rather than at the commit.
        """
        own = book is None
        book = book or Book()
        if event.id in (seen if seen is not None else applied_among(session, [event.id])):
            derived: list[Event[Any]] = []
            if event.seq is not None:  # a derived event's copy: where it is in the log
                book.logged.append((event.id, event.seq))
        else:
            context = Context(session, event, now=event.logged_at, live=live)
            for decide in self.routes.deciders.get(event.type, ()):
                decide(context)
            if not context.refused:
                self._project(session, event)
            book.applied.append((event.id, event.seq, None))
            self._apply_derived(session, context.derived, live=live, check=False, book=book)
            derived = context.derived
            if seen is not None:  # a derived event's copy can come later in the same batch (a rebuild)
                seen.update([event.id, *(d.id for d in derived)])
        if event.seq is not None and event.seq > book.seq:
            book.seq = event.seq
        if own:
            self.record(session, book)
        if flush:
            session.flush()
        return derived

    def record(self, session: Session, book: "Book") -> None:
        """Write down what ``book`` collected: the applied ids, the log sequences of derived
        events' copies and the outbox in one statement each, the position once."""
        connection = session.connection()  # straight to the connection: the session has nothing to track here
        if book.applied or book.logged:
            with driver_cursor(connection) as (cursor, mark):
                if book.applied:
                    cursor.executemany(f"INSERT INTO {_APPLIED.name} (event_id, seq, caused_by) VALUES ({mark}, {mark}, {mark})",
                                       book.applied)
                if book.logged:
                    cursor.executemany(f"UPDATE {_APPLIED.name} SET seq = {mark} WHERE event_id = {mark} AND seq IS NULL",
                                       [(seq, event_id) for event_id, seq in book.logged])
        if book.outbox:
            connection.execute(_OUTBOX_INSERT, book.outbox)
        if book.seq:
            self.advance(session, book.seq)
        book.applied.clear()
        book.logged.clear()
        book.outbox.clear()

    def tick(self, session: Session, now: datetime | None = None, *, live: bool = True,
             withheld: Callable[[Event[Any]], bool] | None = None) -> list[Event[Any]]:
        """Run the timers (deadlines): events due at ``now`` are decided and applied. ``withheld``:
        which of them wait (about a thing set aside behind a dead letter): not applied now, they
        are decided again at a later tick — the timers act on the state as it is then."""
        context = Context(session, None, now=now or datetime.now(timezone.utc), live=live)
        for timer in self.routes.timers:
            timer(context)
        decided = context.derived if withheld is None else [event for event in context.derived if not withheld(event)]
        book = Book()
        self._apply_derived(session, decided, live=live, check=True, book=book)
        self.record(session, book)
        return decided

    def _project(self, session: Session, event: Event[Any]) -> None:
        for project in self.routes.projections.get(event.type, ()):
            project(session, event)

    def _apply_derived(self, session: Session, derived: list[Event[Any]], *, live: bool, check: bool, book: "Book") -> None:
        # An event's consequences are new by construction (their ids derive from a cause applied
        # once); a timer's may have been decided before, so those are looked up.
        recorded = {event_id for event_id, _, _ in book.applied} if check else set()
        for event in derived:
            if check and (event.id in recorded or applied_among(session, [event.id])):
                continue
            recorded.add(event.id)
            self._project(session, event)
            book.applied.append((event.id, None, event.causationid))
            if live:
                book.outbox.append(
                    {"event_id": event.id, "event": orjson.dumps(dict(event.envelope)), "created_at": datetime.now(timezone.utc)}
                )

    def advance(self, session: Session, seq: int | None) -> None:
        """Record that the log has been read up to ``seq`` (never backwards)."""
        if seq is None:
            return
        advance_position(session.connection(), _POSITIONS, self.positions_as, seq)

    def take(self, session: Session) -> None:
        """Take the consumer's position over for this process (:func:`~handlers.bookkeeping.take_position`)."""
        self.epoch = take_position(session.connection(), _POSITIONS, self.consumer)

    def claim(self, session: Session, first: int | None) -> None:
        """Hold the position for this transaction, which applies the log from ``first`` on (None:
        the timers'), and make sure no other process took it over
        (:func:`~handlers.bookkeeping.claim_position`)."""
        epoch = self.epoch if self.positions_as == self.consumer else None
        claim_position(session.connection(), _POSITIONS, self.positions_as, first, epoch)

    def position(self, session: Session) -> int:
        """The last log sequence applied."""
        return read_position(session.connection(), _POSITIONS, self.consumer)
