"""The read models' database: SQLite (WAL) by default, PostgreSQL by URL, schema by Alembic."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy import Engine, event, make_url
from sqlmodel import Session, create_engine

from handlers.busy import IN_THE_LOOP, LOOP_WAIT_MS, THREAD_WAIT_MS
from ops.wal import FALLBACK_AUTOCHECKPOINT

MIGRATIONS = Path(__file__).parent / "migrations"
READ_ONLY = "collabbus_read_only"


def make_engine(url: str, *, checkpoints_in_background: bool = False, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL, a busy timeout and enforced foreign keys.

    ``checkpoints_in_background``: its commits leave copying the write-ahead log into the
    database file to a :class:`ops.wal.WalCheckpointer` (up to :data:`ops.wal.FALLBACK_AUTOCHECKPOINT` pages)."""
    if url.startswith("sqlite"):
        path = make_url(url).database or ""  # "" or ":memory:" for a database in memory
        in_memory = not path or path == ":memory:" or path.startswith("file::memory:")
        if not in_memory:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        # A pool big enough for the gateway's concurrent readers: a connection opened and closed
        # per request would cost more than the request.
        kwargs = kwargs if in_memory else {"pool_size": 20, "max_overflow": 20, **kwargs}
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": THREAD_WAIT_MS / 1000}, **_JSON, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # Let SQLAlchemy issue BEGIN itself: pysqlite's own transaction handling breaks SAVEPOINT.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            # WAL is a property of the file, set once; setting it again would wait for the writer.
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            if checkpoints_in_background:
                cursor.execute(f"PRAGMA wal_autocheckpoint={FALLBACK_AUTOCHECKPOINT}")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(connection: Any) -> None:
            # A writer takes the write lock at once (a deferred one could fail to upgrade its lock
            # later); a reader must not, or every read would wait for the writer's batch.
            read_only = connection.get_execution_options().get(READ_ONLY, False)
            if not read_only:  # how long to wait for another writer: briefly in the event loop (handlers.busy)
                wait = LOOP_WAIT_MS if IN_THE_LOOP.get() else THREAD_WAIT_MS
                info = connection.connection.info
                if info.get("busy_timeout") != wait:
                    connection.exec_driver_sql(f"PRAGMA busy_timeout = {wait}")
                    info["busy_timeout"] = wait
            connection.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

        return engine
    engine = create_engine(url, pool_pre_ping=True, **_JSON, **kwargs)
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "connect")
        def _utc_session(dbapi_connection: Any, _record: Any) -> None:
            # The read models' times are UTC; a column without a zone (the outbox's created_at)
            # would otherwise be written and read in the server's or the client's (PGTZ) zone.
            with dbapi_connection.cursor() as cursor:
                cursor.execute("SET TIME ZONE 'UTC'")
            dbapi_connection.commit()  # (a SET in a transaction rolled back would be undone)

    return engine


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# JSON columns are written and read with orjson: the standard library's encoder was about a
# twentieth of applying an event (titles, themes, reasons and parties are JSON).
_JSON: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


@contextmanager
def driver_cursor(connection: sa.Connection) -> Iterator[tuple[Any, str]]:
    """A DB-API cursor in ``connection``'s transaction, and the driver's placeholder (``?`` or
    ``%s``), for the statements every batch of the consumers runs besides its events' own (the
    applied ids, the position): on a trickle a batch is one event, and SQLAlchemy's execution of
    a statement (~50 µs) cost more than SQLite's. The driver's errors come out as SQLAlchemy's,
    so a database that fails is told from an event that does (:func:`database_unavailable`)."""
    dialect = connection.dialect
    dbapi = dialect.loaded_dbapi
    fairy = connection.connection
    cursor = fairy.cursor()
    try:
        yield cursor, "?" if dialect.paramstyle == "qmark" else "%s"
    except dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
        raise sa.exc.DBAPIError.instance(None, None, exc, dbapi.Error, connection_invalidated=lost, dialect=dialect) from exc
    finally:
        cursor.close()


def in_a_line(exc: BaseException) -> str:
    """``exc`` for a log line: a database error's message and the first line of its statement,
    without the statement's parameters (an event's data, which every attempt at the event would
    log again; the dead letter's detail keeps them); any other error as it says itself."""
    statement = getattr(exc, "statement", None)
    if not isinstance(exc, sa.exc.StatementError) or not isinstance(statement, str):
        return str(exc)
    orig = exc.orig
    said = (f"({type(orig).__module__}.{type(orig).__name__}) {_first_line(str(orig))}" if orig is not None
            else _first_line(str(exc.args[0]) if exc.args else type(exc).__name__))
    lines = statement.strip().splitlines() or [""]
    first = lines[0].strip()
    if len(first) > STATEMENT_SHOWN:
        first = first[:STATEMENT_SHOWN] + " …"
    elif len(lines) > 1:
        first += " …"
    return f"{said} [SQL: {first}]"


STATEMENT_SHOWN = 200
"""How much of a failed statement's first line :func:`in_a_line` shows."""


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else ""


def database_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is the database failing (it cannot be written, reached or opened; the
    schema is not there), not an event's handling: the event is then held, never dead-lettered."""
    import sqlalchemy.exc as sa_exc

    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and bool(exc.connection_invalidated)


def reading(engine: Engine) -> Engine:
    """``engine`` for sessions that only read: on SQLite they do not take the write lock, so they
    never wait for a writer (WAL readers see the last commit). What one transaction reads is one
    moment of the database, whatever is committed meanwhile: a delivery and its attempts, a
    validation and its reviews, read in two statements, agree. SQLite's read transactions are
    that already; PostgreSQL's default (``READ COMMITTED``) gives each statement its own moment,
    so its readers ask for ``REPEATABLE READ`` (which never fails a transaction that only reads).
    Made once per engine: the HTTP gateway reads on every request, and a new one per call set up
    its event dispatch each time."""
    found: Engine | None = getattr(engine, "_collabbus_reading", None)
    if found is None:
        options: dict[str, Any] = {READ_ONLY: True}
        if engine.dialect.name == "postgresql":
            options["isolation_level"] = "REPEATABLE READ"
        found = engine.execution_options(**options)
        engine._collabbus_reading = found  # type: ignore[attr-defined]
    return found


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["engine"] = engine
    return config


_REVISION_LINE = re.compile(r"^(revision|down_revision|depends_on)\s*=\s*([^#\n]+)", re.MULTILINE)


def migration_heads() -> frozenset[str]:
    """What ``alembic_version`` holds once the schema is current, read from the migrations' own
    lines: every revision that no other one names as its ``down_revision`` or in ``depends_on``
    (Alembic leaves out of the table what a newer revision implies). Should a migration ever be
    written so that this differs, the schema is only brought up to date the slower way."""
    revisions: set[str] = set()
    implied: set[str] = set()
    for path in (MIGRATIONS / "versions").glob("*.py"):
        found = {name: ast.literal_eval(value.strip())
                 for name, value in _REVISION_LINE.findall(path.read_text(encoding="utf-8"))}
        revisions.add(found["revision"])
        for name in ("down_revision", "depends_on"):
            value = found.get(name)
            implied.update(value if isinstance(value, (tuple, list)) else (value,) if value else ())
    return frozenset(revisions - implied)


def _current(engine: Engine) -> frozenset[str] | None:
    """The revisions ``alembic_version`` holds; None when there is no such table yet."""
    import sqlalchemy as sa

    try:
        with engine.connect() as connection:
            return frozenset(connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
    except sa.exc.DBAPIError:
        return None


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest migration. A schema that is current is left without loading
    Alembic and its scripts (a third of a second for every command and process that opens the
    read models)."""
    try:
        heads = migration_heads()
    except (ValueError, SyntaxError, KeyError):  # a revision line that is not a plain literal: Alembic reads it
        heads = frozenset()
    if heads and _current(engine) == heads:
        return
    from alembic import command

    with engine.begin() as connection:
        config = alembic_config(engine)
        config.attributes["connection"] = connection
        command.upgrade(config, "heads")


@contextmanager
def session_scope(engine: Engine, *, read_only: bool = False) -> Iterator[Session]:
    """One transaction: committed when the block ends, rolled back if it raises. ``read_only``: a
    transaction that only reads, on :func:`reading`'s engine (one moment of the database, and on
    SQLite no write lock)."""
    with Session(reading(engine) if read_only else engine, expire_on_commit=False) as session:
        with session.begin():
            yield session


def table_checksums(engine: Engine, *, exclude: tuple[str, ...] = ("outbox",)) -> dict[str, str]:
    """A SHA-256 of every table's rows in primary-key order, to compare two databases' state (a
    position's ``epoch`` left out: it counts the processes that applied the log, not what they applied)."""
    import hashlib

    import sqlalchemy as sa
    from sqlmodel import SQLModel

    import handlers.tables  # noqa: F401

    sums: dict[str, str] = {}
    with engine.connect() as connection:
        for table in SQLModel.metadata.sorted_tables:
            if table.name in exclude:
                continue
            order = list(table.primary_key.columns) or list(table.columns)
            digest = hashlib.sha256()
            columns = [column for column in table.columns if column.name != "epoch" or table.name != "consumer_positions"]
            for row in connection.execute(sa.select(*columns).order_by(*order)):
                digest.update(repr(tuple(_comparable(v) for v in row)).encode())
            sums[table.name] = digest.hexdigest()
    return sums


def _comparable(value: Any) -> Any:
    from datetime import datetime, timezone

    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone.utc).replace(tzinfo=None)
    return value
