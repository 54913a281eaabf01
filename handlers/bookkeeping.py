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

from handlers.db import driver_cursor, reading
from handlers.positions import PositionTaken
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
    """The last log sequence a consumer group has applied, and which process applies it."""

    __tablename__ = "consumer_positions"

    consumer: str = Field(primary_key=True, max_length=64)
    seq: int = 0
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    """How many times a process took this consumer over (:func:`take_position`): a process that
    finds another number here than the one it took has been replaced."""


class ParkedSubject(TableRow, table=True):
    """A thing a consumer sets aside (its events' domain and subject): an event about it is in
    the dead-letter queue, so the later ones about it wait there behind it instead of meeting the
    read models without it (``collabbus dlq replay`` applies them in the log's order, and lets
    the thing go once none of its events is left there)."""

    __tablename__ = "parked_subjects"

    consumer: str = Field(primary_key=True, max_length=64)
    domain: str = Field(primary_key=True, max_length=64)
    subject: str = Field(primary_key=True, max_length=128)
    first_seq: int
    """The log sequence of the event that set it aside (the first dead-lettered about it)."""
    last_seq: int
    """The log sequence of the last event set aside about it: a process letting it go names the
    one it saw, so an event set aside meanwhile keeps it set aside (:func:`release`)."""


class RulesEpoch(TableRow, table=True):
    """From which log sequence on the events were applied by which version of the workflow rules
    (``handlers.rules.RULES``): a bus applying the log with another version than the last one
    recorded notes where it starts. A rebuild judges each event by the version it was applied by,
    and keeps these (as it keeps the outbox)."""

    __tablename__ = "rules_epochs"

    from_seq: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    version: int


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


@cache
def _position_claim(table: sa.Table) -> Any:
    return sa.select(table.c.seq, table.c.epoch).where(table.c.consumer == sa.bindparam("of_consumer")).with_for_update()


def _position_row(connection: sa.Connection, table: sa.Table, consumer: str) -> None:
    """Make sure ``consumer`` has a row (a second process inserting it at once waits for the first's commit)."""
    connection.execute(sa.text(f"INSERT INTO {table.name} (consumer, seq, epoch) VALUES (:of_consumer, 0, 0) "
                               "ON CONFLICT (consumer) DO NOTHING"), {"of_consumer": consumer})


def backend_pid(connection: sa.Connection) -> int | None:
    """The PostgreSQL server process of ``connection`` (None on SQLite), for :func:`end_stalled`."""
    if connection.dialect.name != "postgresql":
        return None
    return int(connection.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())


def end_stalled(engine: sa.Engine, blocked: int | None, idle_for: float) -> list[int]:
    """End the PostgreSQL sessions that the session ``blocked`` (:func:`backend_pid`) waits for
    and that have sat idle in a transaction for over ``idle_for`` seconds — a bus frozen in the
    middle of a batch (stopped, its machine paused) holding the position another process takes
    over once its lease lapsed. Its transaction is undone: it could not commit anyway (the
    position's epoch moves on), and it would hold the row until the process woke up. Returns
    the sessions' process ids (none on SQLite, whose write lock a frozen process keeps)."""
    if blocked is None or engine.dialect.name != "postgresql":
        return []
    with engine.connect() as connection:
        stalled = [int(pid) for pid in connection.execute(sa.text(
            "SELECT pid FROM pg_stat_activity WHERE pid = ANY(pg_blocking_pids(:blocked)) "
            "AND state IN ('idle in transaction', 'idle in transaction (aborted)') "
            "AND state_change < clock_timestamp() - make_interval(secs => :idle)"),
            {"blocked": blocked, "idle": float(idle_for)}).scalars()]
        for pid in stalled:
            connection.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        connection.commit()
    return stalled


def take_position(connection: sa.Connection, table: sa.Table, consumer: str) -> int:
    """Take ``consumer``'s position over for this process (a bus that starts applying the log):
    its epoch moves on, and the number returned is this process's for :func:`claim_position`.
    Waits for a transaction of the process it replaces that holds the row; any later one of
    that process's then writes nothing."""
    _position_row(connection, table, consumer)
    connection.execute(sa.text(f"UPDATE {table.name} SET epoch = epoch + 1 WHERE consumer = :of_consumer"), {"of_consumer": consumer})
    return int(connection.execute(_position_claim(table), {"of_consumer": consumer}).one()[1])


def claim_position(connection: sa.Connection, table: sa.Table, consumer: str, first: int | None, epoch: int | None = None) -> None:
    """At the start of a transaction that applies the log from ``first`` on (or, with ``first``
    None, writes what a process applying it writes: the timers'): hold ``consumer``'s position
    until it ends (PostgreSQL locks the row; a SQLite writer holds the whole database from its
    ``BEGIN IMMEDIATE``), and raise :class:`PositionTaken` if it is ``first`` or past it already,
    or if its epoch is no longer ``epoch`` (when given: this process's, from :func:`take_position`).

    Two processes applying one log — a bus that stalled past its lease with a batch in hand, and
    the one that took over — thus never both write: whatever the stalled one had in hand is
    committed before the other takes the position over, or not at all."""
    if first is None and epoch is None:
        return
    found = connection.execute(_position_claim(table), {"of_consumer": consumer}).first()
    if found is None:
        _position_row(connection, table, consumer)
        found = connection.execute(_position_claim(table), {"of_consumer": consumer}).one()
    position, held_by = int(found[0] or 0), int(found[1] or 0)
    if epoch is not None and held_by != epoch:
        raise PositionTaken(consumer, position)
    if first is not None and position >= first:
        raise PositionTaken(consumer, position, first)


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


def aggregate_of(envelope: Any) -> tuple[str, str] | None:
    """What an event is about, as the log's subjects name it: its type's domain and its subject
    (``("project", "p-1")``); None when the event does not say (an unreadable one)."""
    if not isinstance(envelope, dict):
        return None
    event_type, subject = envelope.get("type"), envelope.get("subject")
    if not isinstance(event_type, str) or not isinstance(subject, str) or "." not in event_type:
        return None
    return event_type.split(".", 1)[0], subject


def _parked_table() -> sa.Table:
    return ParkedSubject.__table__  # type: ignore[attr-defined,no-any-return]


def park(connection: sa.Connection, consumer: str, about: tuple[str, str], seq: int) -> int:
    """Set ``about`` aside for ``consumer`` from the dead-lettered event at ``seq`` on (or note
    another event set aside behind it); returns the log sequence of the first event set aside."""
    table = _parked_table()
    connection.execute(
        sa.text(f"INSERT INTO {table.name} (consumer, domain, subject, first_seq, last_seq) "
                "VALUES (:consumer, :domain, :subject, :seq, :seq) "
                "ON CONFLICT (consumer, domain, subject) DO UPDATE SET last_seq = excluded.last_seq"),
        {"consumer": consumer, "domain": about[0], "subject": about[1], "seq": seq},
    )
    return int(parked_behind(connection, consumer, about) or seq)


def parked_behind(connection: sa.Connection, consumer: str, about: tuple[str, str]) -> int | None:
    """The log sequence ``about``'s events wait behind, or None when it is not set aside."""
    table = _parked_table()
    return connection.execute(
        sa.select(table.c.first_seq).where(table.c.consumer == consumer, table.c.domain == about[0], table.c.subject == about[1])
    ).scalar()


def parked(connection: sa.Connection, consumer: str | None = None) -> list[tuple[str, str, str, int, int]]:
    """What ``consumer`` (None: every consumer) sets aside: (consumer, domain, subject,
    first_seq, last_seq), oldest first."""
    table = _parked_table()
    query = sa.select(table.c.consumer, table.c.domain, table.c.subject, table.c.first_seq, table.c.last_seq)
    if consumer is not None:
        query = query.where(table.c.consumer == consumer)
    return [(str(c), str(d), str(s), int(f), int(l)) for c, d, s, f, l in connection.execute(query.order_by(table.c.first_seq))]


def release(connection: sa.Connection, consumer: str, about: tuple[str, str], last_seq: int) -> bool:
    """Let ``about`` go, unless an event was set aside about it since ``last_seq`` was read
    (then it stays, with that event in the dead-letter queue); whether it was let go."""
    table = _parked_table()
    gone = connection.execute(table.delete().where(
        table.c.consumer == consumer, table.c.domain == about[0], table.c.subject == about[1], table.c.last_seq == last_seq,
    ))
    return bool(gone.rowcount)


class SetAside:
    """What one consumer sets aside behind its dead letters (:class:`ParkedSubject`), as this
    process last knew it: read when the process takes the log over (:meth:`load`), added to when
    it sets something aside. ``collabbus dlq`` lets things go from another process, so a thing
    remembered is checked against the table (:meth:`behind`); while none is, nothing is read."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self.known: dict[tuple[str, str], int] = {}
        """(domain, subject) → the log sequence of the first event set aside about it."""

    def __bool__(self) -> bool:
        return bool(self.known)

    def load(self, connection: sa.Connection) -> None:
        self.known = {(domain, subject): first for _, domain, subject, first, _ in parked(connection, self.consumer)}

    def behind(self, connection: sa.Connection, about: tuple[str, str] | None) -> int | None:
        """The log sequence events about ``about`` wait behind, or None: not set aside (or let go
        since, by another process)."""
        if about is None or about not in self.known:
            return None
        first = parked_behind(connection, self.consumer, about)
        if first is None:
            self.known.pop(about, None)
        return first

    def park(self, connection: sa.Connection, about: tuple[str, str], seq: int) -> None:
        """Set ``about`` aside from the dead-lettered event at ``seq`` on (:func:`park`), in the
        caller's transaction (remembered at once: were it not committed, :meth:`behind` finds so)."""
        self.known[about] = park(connection, self.consumer, about, seq)

    def listed(self, engine: sa.Engine) -> list[tuple[str, str, int, int]]:
        """What is set aside: (domain, subject, first_seq, last_seq) — the log sequences of the
        first and the last event set aside about it."""
        with reading(engine).connect() as connection:
            return [(domain, subject, first, last) for _, domain, subject, first, last in parked(connection, self.consumer)]

    def release(self, engine: sa.Engine, about: tuple[str, str], last_seq: int) -> bool:
        """Let ``about`` go (none of its events is left in the dead-letter queue), unless an event
        about it was set aside after ``last_seq`` (:func:`release`); whether it was let go."""
        with engine.begin() as connection:
            gone = release(connection, self.consumer, about, last_seq)
        if gone:
            self.known.pop(about, None)
        return gone

    @staticmethod
    def reason(about: tuple[str, str], behind: int) -> str:
        """Why an event about ``about`` is set aside, for its dead letter's detail."""
        return (f"set aside behind #{behind}: an earlier event about {about[0]} {about[1]} is in the dead-letter queue; "
                "`collabbus dlq replay` applies them in the log's order")


def rules_epochs(connection: sa.Connection) -> list[tuple[int, int]]:
    """(from_seq, version) of each rules epoch, in log order."""
    table = RulesEpoch.__table__  # type: ignore[attr-defined]
    return [(int(seq), int(version)) for seq, version in connection.execute(
        sa.select(table.c.from_seq, table.c.version).order_by(table.c.from_seq))]


def begin_rules_epoch(connection: sa.Connection, from_seq: int, version: int) -> list[tuple[int, int]]:
    """Note that the events from ``from_seq`` on are applied by rules of ``version``, unless the
    last epoch is of that version already; returns the epochs. The first epoch begins at the
    log's start (whatever ``from_seq``: what was applied before any was noted, this version
    applied — a rebuild without the record); one that would begin where the last one begins
    (nothing applied in between) replaces it."""
    epochs = rules_epochs(connection)
    if epochs and epochs[-1][1] == version:
        return epochs
    from_seq = from_seq if epochs else 1
    table = RulesEpoch.__table__  # type: ignore[attr-defined]
    if epochs and epochs[-1][0] >= from_seq:
        connection.execute(table.delete().where(table.c.from_seq >= from_seq))
    connection.execute(table.insert().values(from_seq=from_seq, version=version))
    return [*(epoch for epoch in epochs if epoch[0] < from_seq), (from_seq, version)]
