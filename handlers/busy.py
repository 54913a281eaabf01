"""How long a SQLite writer waits for another's write lock.

SQLite work runs in the event loop's thread (``bus.consumer.call_database``): waiting there for a
lock another process holds (a backup tool, an operator's ``sqlite3`` shell) would stop the whole
bus — its HTTP answers, the renewals of its lease — for as long as SQLite's busy timeout. There
a transaction waits only :data:`LOOP_WAIT_MS` to begin; if the database is still locked then,
the work is done again in a worker thread, which waits the full :data:`THREAD_WAIT_MS` while the
loop goes on. (A light module: the engine's ``begin`` hook and the consumer read it.)
"""

from __future__ import annotations

from contextvars import ContextVar

IN_THE_LOOP: ContextVar[bool] = ContextVar("collabbus_sqlite_in_the_loop", default=False)
"""True while SQLite work runs in the event loop's thread."""

LOOP_WAIT_MS = 200
THREAD_WAIT_MS = 30_000


def locked_at_begin(exc: BaseException) -> bool:
    """Whether ``exc`` is SQLite's "database is locked" on beginning a transaction (nothing was
    done yet: the work can be done again elsewhere)."""
    statement = str(getattr(exc, "statement", "") or "")
    return statement.startswith("BEGIN") and "database is locked" in str(getattr(exc, "orig", exc))
