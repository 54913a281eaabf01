"""One process at a time owns a data dir: its nats-server store and its SQLite files.

Two buses on one data dir run two nats-servers on one JetStream store, and an event one of them
accepted can vanish from the log. ``collabbus up`` holds an exclusive lock on
``<data dir>/collabbus.lock`` (``flock``: the kernel lets go when the process ends, however it
ends) with its pid in the file; a command that would start the embedded server for itself takes
the same lock for as long as it runs.

A running bus writes where it listens into the file too (:func:`announce`): a command run on its
data dir reaches it there without being told (:func:`running_addresses`).
"""

from __future__ import annotations

import fcntl
import json
import os
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
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid, found = _read(handle.read())
        handle.close()
        raise DataDirBusy(data_dir, pid, found) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()} {what}\n")
    handle.flush()
    return handle


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
