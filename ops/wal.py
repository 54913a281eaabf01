"""SQLite write-ahead logs checkpointed in the background, off the commits of those who write them."""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("collabbus.wal")

CHECKPOINT_INTERVAL = 0.05
"""Seconds between the background checkpoints of a write-ahead log (:class:`WalCheckpointer`)."""
FALLBACK_AUTOCHECKPOINT = 10_000
"""Pages (of 4 KiB) a write-ahead log checkpointed in the background may reach before a commit
checkpoints it after all: should the checkpoints stop, the log stays bounded."""


class WalCheckpointer:
    """Copies a SQLite database's write-ahead log into the database file from a thread of its
    own, every :data:`CHECKPOINT_INTERVAL` seconds while the log is written to.

    SQLite does this by itself in the commit that takes the log past 1,000 pages: a commit in
    every few hundred (every fifth of a second at 500 events/s) then wrote and synced about 4 MB
    to the database file before it returned, while the events behind it waited, and the disk
    was busy for everything else on it for as long (a nats-server syncing each write to the log,
    say). Checkpoints made here are small and frequent, and never in a commit: the thread holds
    no lock a writer waits for (a passive checkpoint), and the interpreter's lock is let go while
    SQLite works. The running bus has one for its read models (an engine made with
    ``checkpoints_in_background``) and one for its span store, and each gatekeeper process one for
    the span store (a gatekeeper may run on another machine); the writers of both set
    :data:`FALLBACK_AUTOCHECKPOINT` on their connections. Checkpointers of one file take turns:
    one finding another's checkpoint under way skips its own."""

    def __init__(self, path: Path, interval: float = CHECKPOINT_INTERVAL) -> None:
        self.path = path
        self.interval = interval
        self.checkpoints = 0
        """Checkpoints made so far."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def for_engine(cls, engine: Any, interval: float = CHECKPOINT_INTERVAL) -> "WalCheckpointer | None":
        """One for ``engine``'s database when it is a SQLite file, else None."""
        database = engine.url.database
        if engine.dialect.name != "sqlite" or not database or database == ":memory:":
            return None
        return cls(Path(database), interval)

    @property
    def wal_bytes(self) -> int:
        """The size of the write-ahead log now (0 when there is none)."""
        try:
            return self.path.with_name(self.path.name + "-wal").stat().st_size
        except FileNotFoundError:
            return 0

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoints", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after a last checkpoint."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        wal = self.path.with_name(self.path.name + "-wal")
        connection: sqlite3.Connection | None = None  # opened once there is a log: it never makes the file
        last: tuple[int, int] | None = None
        failing = False
        try:
            while True:
                stopping = self._stop.wait(self.interval)
                try:
                    stat = wal.stat()
                except FileNotFoundError:
                    stat = None
                written = (stat.st_size, stat.st_mtime_ns) if stat is not None else None
                if written is not None and written != last:  # an idle log is not looked at again
                    try:
                        if connection is None:
                            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
                        _, frames, copied = connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                        self.checkpoints += 1
                        failing = False
                        # A reader of an older snapshot can keep frames from being copied: looked at again then.
                        last = written if copied >= frames else None
                    except sqlite3.Error as exc:  # commits checkpoint by themselves past the fallback
                        if not failing:
                            log.warning("checkpoint of %s failed: %s; trying again (commits checkpoint it past %d pages)",
                                        self.path, exc, FALLBACK_AUTOCHECKPOINT)
                        failing = True
                if stopping:
                    return
        finally:
            if connection is not None:
                connection.close()
