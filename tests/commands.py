"""The ``collabbus`` command in a process of its own, forked from one that has its libraries loaded.

A command's process spends ~0.4 s of CPU importing Typer, Rich, pydantic, SQLAlchemy, nats-py …
before it does anything, and the suite runs a few hundred commands. Each test worker starts one
*command server* (``python -m tests.commands``) that imports them once and forks a process per
command: a process of its own, with the arguments, environment, working directory, standard
streams and exit status it is given, running the command line's app as ``collabbus`` does (the
``ops.cli`` module is loaded in the fork, after the environment is set: it sizes its consoles by
``COLUMNS`` and the streams). Where a fork differs from a fresh interpreter: it starts with the
server's modules as they were after their import, and with the server's hash seed.

:func:`collabbus` runs a command to its end; :func:`spawn` starts one and leaves it running (a
``collabbus up``, a ``tail``), for the test to read its output as it comes and signal it. A bus
forked so takes ~2.5 s of CPU less to start than a fresh one (it loads the HTTP gateway's modules
too), and the suite starts some fifty.

Tests of the process's start itself — Ctrl-C while the command loads, output that must not depend
on the hash seed — run ``python -m ops`` as before.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import select
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

PRELOAD = (
    "typer", "click", "rich.console", "rich.table", "rich.progress", "orjson", "pydantic", "pydantic_settings",
    "sqlalchemy", "sqlmodel", "alembic", "nats", "httpx", "jsonschema", "prometheus_client", "opentelemetry.sdk.trace",
    "ops.settings", "bus.streams", "bus.credentials", "bus.server", "bus.runtime", "handlers.db", "handlers.network",
    "connectors.portal.connector", "ops.dlq", "ops.status", "ops.backup",
    "connectors.http.server", "opentelemetry.instrumentation.fastapi", "uvicorn.protocols.http.h11_impl", "alembic.command",
)
"""What the server imports before forking (``ops.cli`` excepted, see above)."""


# --- the server ----------------------------------------------------------------------------------

def _run_command(connection: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked process: become the command, report its pid and then its exit status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    pid = os.fork()
    if pid == 0:
        connection.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            sys.stdin = open(0, closefd=False)  # the process's own streams
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", buffering=1, errors="backslashreplace", closefd=False)  # as a fresh interpreter's
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = ["collabbus", *request["args"]]
            code = _main(request["args"])
        except BaseException:  # pragma: no cover - reported as the process would
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    for fd in fds:
        os.close(fd)
    connection.sendall(f"{pid}\n".encode())
    _, status, usage = os.wait4(pid, 0)
    connection.sendall(f"{os.waitstatus_to_exitcode(status)} {usage.ru_utime + usage.ru_stime}\n".encode())


def _main(args: list[str]) -> int:
    from ops.cli import app

    try:
        app(args=args, prog_name="collabbus")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        code = 130
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def serve(path: str) -> None:
    """Import, then fork a process per request on ``path`` until standard input closes."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, "a preloaded module started a thread: forking would copy its locks"
    gc.collect()
    gc.freeze()  # the forks' collectors leave what was loaded here alone (and its pages shared)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the forked processes reap themselves
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C on the suite is the test worker's (this ends with it)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    with selectors.DefaultSelector() as selector:
        selector.register(listener, selectors.EVENT_READ)
        selector.register(sys.stdin, selectors.EVENT_READ)
        while True:
            ready = [key.fileobj for key, _ in selector.select()]
            if sys.stdin in ready:
                return  # the test worker is gone
            connection, _ = listener.accept()
            message, fds, _, _ = socket.recv_fds(connection, 1 << 16, 3)
            while not message.endswith(b"\n") and (more := connection.recv(1 << 16)):
                message += more
            if os.fork() == 0:
                listener.close()
                try:
                    _run_command(connection, json.loads(message), fds)
                finally:
                    os._exit(0)
            connection.close()
            for fd in fds:
                os.close(fd)


# --- the client ----------------------------------------------------------------------------------

_server: subprocess.Popen[str] | None = None
_socket_path: str | None = None
_lock = threading.Lock()
cpu_seconds = 0.0
"""The CPU the commands run through the server took, with what they started and reaped (the
server's processes are not this one's children: ``--cpu-report`` adds it)."""


def _connect() -> socket.socket:
    global _server, _socket_path  # one server per test worker
    with _lock:
        if _server is None or _server.poll() is not None:
            place = tempfile.mkdtemp(prefix="collabbus-commands-")
            _socket_path = str(Path(place) / "socket")
            _server = subprocess.Popen([sys.executable, "-m", "tests.commands", _socket_path],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert _server.stdout is not None and _server.stdout.readline() == "ready\n", "the command server did not start"
            atexit.register(shutil.rmtree, place, ignore_errors=True)
            atexit.register(_server.terminate)
        assert _socket_path is not None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect(_socket_path)
    return connection


class Command:
    """``collabbus ARGS`` running in a process forked by the command server: what the tests use of
    :class:`subprocess.Popen` (its pid for signals, its standard streams as pipes, its exit status).

    The process is not this one's child: the command server's process that forked it waits for it
    and says its exit status on the connection, which :meth:`poll` and :meth:`wait` read."""

    def __init__(self, args: list[str], pid: int, connection: socket.socket, stdout: IO[str] | None, stderr: IO[str] | None) -> None:
        self.args = args
        self.pid = pid
        self.stdout = stdout
        self.stderr = stderr
        self.returncode: int | None = None
        self._connection = connection
        self._said = b""

    def _read_status(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._said.endswith(b"\n"):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self._connection], [], [], left)[0]:
                return None
            more = self._connection.recv(256)
            if not more:
                raise RuntimeError(f"`{' '.join(self.args)}` (pid {self.pid}): the command server's process watching it ended first")
            self._said += more
        global cpu_seconds
        status, cpu = self._said.split()
        with _lock:
            cpu_seconds += float(cpu)
        self.returncode = int(status)
        self._connection.close()
        return self.returncode

    def poll(self) -> int | None:
        return self._read_status(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read_status(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        return code

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        """Read the pipes to their end (each in a thread of its own, as ``Popen`` does), then wait."""
        read: dict[str, str] = {}

        def read_to_the_end(name: str, stream: IO[str]) -> None:
            with stream:
                read[name] = stream.read()

        readers = [threading.Thread(target=read_to_the_end, args=(name, stream), daemon=True)
                   for name, stream in (("stdout", self.stdout), ("stderr", self.stderr)) if stream is not None and not stream.closed]
        for reader in readers:
            reader.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for reader in readers:
            reader.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if reader.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return read.get("stdout"), read.get("stderr")

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __del__(self) -> None:
        # What a test did not read to the end (a pipe it read up to a line, a command it never waited for).
        for held in (self.stdout, self.stderr, self._connection):
            if held is not None:
                held.close()


PIPE, DEVNULL = subprocess.PIPE, subprocess.DEVNULL


def spawn(*args: str, env: dict[str, str], stdin: IO[Any] | None = None, stdout: int | IO[Any] | None = None,
          stderr: int | IO[Any] | None = PIPE, cwd: str | Path | None = None) -> Command:
    """``collabbus ARGS`` started and left running, as ``subprocess.Popen([...], text=True)``:
    ``stdout``/``stderr`` are ``PIPE``, ``DEVNULL``, an open file or None (this process's own);
    its standard input is ``stdin``, an open file, or empty."""
    ends: list[int] = []  # what the command is given
    ours: dict[str, IO[str]] = {}
    with open(os.devnull, "rb") as nothing:
        ends.append(os.dup((stdin or nothing).fileno()))
        for name, how, own in (("stdout", stdout, 1), ("stderr", stderr, 2)):
            if how == PIPE:
                reading, writing = os.pipe()
                ours[name] = open(reading, encoding="utf-8", errors="replace")
                ends.append(writing)
            elif how == DEVNULL:
                ends.append(os.dup(nothing.fileno()))
            else:
                ends.append(os.dup(own if how is None else how if isinstance(how, int) else how.fileno()))
    request = {"args": list(args), "env": dict(env), "cwd": str(cwd or os.getcwd())}
    connection = _connect()
    try:
        socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], ends)
    finally:
        for fd in ends:
            os.close(fd)
    said = b""
    while not said.endswith(b"\n"):
        more = connection.recv(1)  # (the pid's line only: the exit status comes after it)
        if not more:
            connection.close()
            raise RuntimeError(f"the command server did not start `collabbus {' '.join(args)}` (its errors are on this worker's stderr)")
        said += more
    return Command(["collabbus", *args], int(said), connection, ours.get("stdout"), ours.get("stderr"))


def collabbus(*args: str, env: dict[str, str], stdin: str | bytes | None = None, timeout: float = 60,
              cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``collabbus ARGS`` run to its end, as ``subprocess.run(..., capture_output=True, text=True)``."""
    with tempfile.TemporaryFile() as given, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        given.write(stdin.encode() if isinstance(stdin, str) else stdin or b"")
        given.seek(0)
        command = spawn(*args, env=env, stdin=given, stdout=out, stderr=err, cwd=cwd)
        try:
            status = command.wait(timeout)
        except subprocess.TimeoutExpired:
            command.kill()
            raise
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command.args, status, out.read().decode(), err.read().decode())


async def acollabbus(*args: str, env: dict[str, str], stdin: str | bytes | None = None, timeout: float = 60,
                     cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`collabbus` without blocking the event loop (a bus may be running in this process)."""
    return await asyncio.to_thread(collabbus, *args, env=env, stdin=stdin, timeout=timeout, cwd=cwd)


if __name__ == "__main__":
    serve(sys.argv[1])
