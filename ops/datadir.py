"""One process at a time owns a data dir: its nats-server store and its SQLite files.

Two buses on one data dir run two nats-servers on one JetStream store, and an event one of them
accepted can vanish from the log. ``collabbus up`` holds an exclusive lock on
``<data dir>/collabbus.lock`` (``flock``: the kernel lets go when the process ends, however it
ends) with its pid in the file; a command that would start the embedded server for itself takes
the same lock for as long as it runs.

A running bus writes where it listens into the file too (:func:`announce`): a command run on its
data dir reaches it there without being told (:func:`running_addresses`).

A first start that fails takes back what it created (:func:`take_back`), the lock file with it: the
data dir is again one no bus has run with, which the commands refuse rather than start a network
of nobody's there. A process that took the lock checks that the file it locked is still the one at
its path, so that removing it never lets two processes hold the data dir at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from pathlib import Path
from typing import IO

LOCK_FILE = "collabbus.lock"


class DataDirBusy(RuntimeError):
    """Another process holds the data dir."""

    def __init__(self, data_dir: Path, pid: int | None, what: str | None) -> None:
        self.data_dir, self.pid, self.what = data_dir, pid, what
        self.holder = f"pid {pid}" + (f": {what}" if what else "") if pid else "another process"
        """Who holds it, for people (``pid 4242: collabbus up``)."""
        super().__init__(f"the data dir {data_dir.resolve()} is in use ({self.holder})")


def lock(data_dir: Path, what: str) -> IO[str]:
    """Take the data dir for this process (``what`` it is, for the message another one gets);
    keep the returned file open for as long as it is held. Raises :class:`DataDirBusy`."""
    while True:
        data_dir.mkdir(parents=True, exist_ok=True)
        handle = open(data_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            pid, found = _read(handle.read())
            handle.close()
            raise DataDirBusy(data_dir, pid, found) from None
        if _still_there(handle, data_dir / LOCK_FILE):
            break
        handle.close()  # taken back by the process that held it (take_back): the file at the path now is the lock
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {what}\n")
    handle.flush()
    return handle


def _still_there(handle: IO[str], path: Path) -> bool:
    """Whether ``handle`` is open on the file at ``path`` (not on one removed from there)."""
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (opened.st_dev, opened.st_ino) == (found.st_dev, found.st_ino)


def contents(data_dir: Path) -> set[str] | None:
    """The names in ``data_dir`` now, for :func:`take_back`; None when there is no such directory
    (or it cannot be read, a file where it should be: :func:`lock` then says so)."""
    try:
        return {entry.name for entry in data_dir.iterdir()}
    except OSError:
        return None


def take_back(handle: IO[str], data_dir: Path, before: set[str] | None) -> None:
    """Remove what was created in ``data_dir`` since it held ``before`` (its :func:`contents`;
    None: it was not there) while this process held it as ``handle``, the lock file with it, and
    let go — the data dir itself too, when it was created and nothing else is in it now."""
    for name in contents(data_dir) or set():
        if name in (before or set()) or name == LOCK_FILE:
            continue
        path = data_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    try:
        if LOCK_FILE not in (before or set()):
            (data_dir / LOCK_FILE).unlink(missing_ok=True)
    finally:
        handle.close()
    if before is None:
        with contextlib.suppress(OSError):  # (not empty: another process uses it now)
            data_dir.rmdir()


def announce(handle: IO[str], what: str, **addresses: str) -> None:
    """Say in the lock held as ``handle`` where the bus listens (``http``, and ``nats_listen`` for
    its embedded nats-server or ``nats="external"``), for :func:`running_addresses`."""
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {what}\n{json.dumps(addresses)}\n")
    handle.flush()


def running_addresses(data_dir: Path) -> dict[str, str]:
    """Where the bus holding ``data_dir`` listens, as it announced it; empty when no process
    holds it, or the one holding it announced nothing."""
    _, _, announced = (_held(data_dir) or "").partition("\n")
    try:
        addresses = json.loads(announced) if announced.strip() else {}
    except ValueError:
        return {}
    return {k: v for k, v in addresses.items() if isinstance(v, str)} if isinstance(addresses, dict) else {}


def _read(text: str) -> tuple[int | None, str | None]:
    pid, _, what = text.strip().partition("\n")[0].partition(" ")
    return (int(pid) if pid.isdigit() else None, what or None)


def holder(data_dir: Path) -> str | None:
    """Who holds the data dir now (``pid 4242: collabbus up``), without taking it; None: nobody."""
    held = _held(data_dir)
    if held is None:
        return None
    pid, what = _read(held)
    return f"pid {pid}" + (f": {what}" if what else "") if pid else "another process"


def _held(data_dir: Path) -> str | None:
    """What the lock file says while another process holds it, without taking it; None: nobody."""
    try:
        handle = open(data_dir / LOCK_FILE)
    except OSError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return handle.read()
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None
