"""The ``collabbus`` command in a process of its own, forked from one that has its libraries loaded.

A command's process spends ~0.4 s of CPU importing Typer, Rich, pydantic, SQLAlchemy, nats-py …
before it does anything, and the suite runs a few hundred commands. Each test worker starts one
*command server* (``python -m tests.commands``) that imports them once and forks a process per
command: a process of its own, with the arguments, environment, working directory, standard
streams and exit status it is given, running the command line's app as ``collabbus`` does (the
``ops.cli`` module is loaded in the fork, after the environment is set: it sizes its consoles by
``COLUMNS`` and the streams). Where a fork differs from a fresh interpreter: it starts with the
server's modules as they were after their import, and with the server's hash seed.

Tests of the process's start itself — Ctrl-C while the command loads, ``collabbus up`` and its
signals, output that must not depend on the hash seed — run ``python -m ops`` as before.
"""

from __future__ import annotations

import asyncio
import atexit
import gc
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

PRELOAD = (
    "typer", "click", "rich.console", "rich.table", "rich.progress", "orjson", "pydantic", "pydantic_settings",
    "sqlalchemy", "sqlmodel", "alembic", "nats", "httpx", "jsonschema", "prometheus_client", "opentelemetry.sdk.trace",
    "ops.settings", "bus.streams", "bus.credentials", "bus.server", "bus.runtime", "handlers.db", "handlers.network",
    "connectors.portal.connector", "ops.dlq", "ops.status", "ops.backup",
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
            sys.stderr = open(2, "w", closefd=False)
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


def collabbus(*args: str, env: dict[str, str], stdin: str | bytes | None = None, timeout: float = 60,
              cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """``collabbus ARGS`` run to its end, as ``subprocess.run(..., capture_output=True, text=True)``."""
    global cpu_seconds
    with tempfile.TemporaryFile() as given, tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        given.write(stdin.encode() if isinstance(stdin, str) else stdin or b"")
        given.seek(0)
        request = {"args": list(args), "env": dict(env), "cwd": str(cwd or os.getcwd())}
        with _connect() as connection, connection.makefile("r") as answers:
            socket.send_fds(connection, [json.dumps(request).encode() + b"\n"], [given.fileno(), out.fileno(), err.fileno()])
            started = answers.readline()
            if not started:
                raise RuntimeError(f"the command server did not start `collabbus {' '.join(args)}` (its errors are on this worker's stderr)")
            pid = int(started)
            connection.settimeout(timeout)
            try:
                ended = answers.readline()
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(["collabbus", *args], timeout) from None
            if not ended:
                raise RuntimeError(f"`collabbus {' '.join(args)}` (pid {pid}): the command server's process watching it ended first")
            status, cpu = ended.split()
        with _lock:
            cpu_seconds += float(cpu)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(["collabbus", *args], int(status), out.read().decode(), err.read().decode())


async def acollabbus(*args: str, env: dict[str, str], stdin: str | bytes | None = None, timeout: float = 60,
                     cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    """:func:`collabbus` without blocking the event loop (a bus may be running in this process)."""
    return await asyncio.to_thread(collabbus, *args, env=env, stdin=stdin, timeout=timeout, cwd=cwd)


if __name__ == "__main__":
    serve(sys.argv[1])
