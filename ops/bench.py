"""The benchmark (CONTRACT §9): how close the bus comes to nats-py alone, measured in one run.

Each phase gets a fresh nats-server in a temporary directory, in one of two configurations: the
shipped default (``sync_interval: always``, an fsync per write) and JetStream's own default (sync
every two minutes). The bus runs as a separate process (``collabbus up`` pointed at that server),
so its memory is its own; the bench offers events to it as partners do and reads how far it has
committed by polling the network consumer's position in the SQLite read model (read-only; WAL lets
a reader look while the bus writes).

Every phase has a time budget: a bus that is too slow is reported as such ("timed_out", with what
was measured until then) instead of holding the run.
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import hashlib
import hmac
import json
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from bus.client import offer
from bus.gate import canonical_bytes, log_subject
from bus.pull import Puller
from bus.server import EmbeddedNats, find_binary, free_port
from bus.streams import EVENTS_STREAM, EVENTS_SUBJECTS
from ops.workload import Workload

Event = tuple[str, dict[str, Any]]
Progress = Callable[[str, int, int | None], None]
"""``progress(description, done, total)``: what a phase reports while it runs."""

CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "sync_always": {"sync_always": True, "nats": "sync_interval: always (the shipped default, fsync per write)"},
    "sync_default": {"sync_always": False, "nats": "JetStream's default sync interval (2 min)"},
}
PHASES = ("raw", "bus", "http", "latency", "webhooks", "rebuild")
# Which phases run on which configuration: throughput on both; latency and webhooks on the shipped
# default; the rebuild needs 100,000 events in the log, which only the default interval writes fast.
PLAN: dict[str, tuple[str, ...]] = {
    "sync_always": ("raw", "bus", "http", "latency", "webhooks"),
    "sync_default": ("raw", "bus", "http", "rebuild"),
}
POLL_INTERVAL = 0.002
"""Seconds between two reads of the committed position (the latency's resolution)."""
REBUILD_POLL_INTERVAL = 0.2
"""The same while a rebuild runs (its rate is its own report's; the position shows progress)."""
NETWORK_CONSUMER = "network"
MEMBERS = 40
WEBHOOK_TYPES = ("project.registered", "project.adopted")
"""What the webhook endpoints ask for (not ``project.*``: the workflows' own ``project.action_rejected``
would make the number of deliveries owed depend on the order the offers were logged in)."""
REBUILD_CHUNK = 10_000
"""Events per ``Workload`` when filling the log for the rebuild (several runs, each with its own members)."""
REBUILD_OVERHEAD = 25.0
"""Seconds the rebuild phase needs beside its budgets (servers, the bus started three times, checksums)."""
REBUILD_TAIL = 12.0
"""Of those, the seconds after the live apply (the bus stopped, checksums, the rebuild started, the server stopped)."""


@dataclass(frozen=True)
class BenchOptions:
    """What to measure, how much, and how long each phase may take."""

    events: int = 5000
    concurrency: int = 64
    latency_rate: float = 500.0
    latency_seconds: float = 5.0
    latency_warmup: float = 1.0
    """Seconds of events offered at the latency phase's rate before it measures."""
    webhook_endpoints: int = 20
    webhook_events: int = 500
    rebuild_events: int = 100_000
    phases: tuple[str, ...] = PHASES
    configurations: tuple[str, ...] = tuple(CONFIGURATIONS)
    budget: float = 12.0
    """Seconds a bus throughput phase may take from the first offer to the last commit."""
    latency_drain: float = 5.0
    webhook_budget: float = 15.0
    fill_budget: float = 90.0
    """Seconds to fill the log for the rebuild (a safety net: nats-py alone does it in seconds)."""
    live_budget: float = 110.0
    """Seconds the bus may take to apply the filled log live."""
    rebuild_budget: float = 60.0
    total_budget: float = 280.0
    """Seconds the whole run may take: the rebuild phase, the last, gets what is left of it
    (:meth:`within`, :meth:`fitted`), so a slow machine still finishes in five minutes."""
    quick: bool = False

    phase_ends: float | None = None
    """When (``time.perf_counter``) the rebuild phase must be done, under the run's limit (:meth:`within`)."""

    def within(self, seconds_left: float) -> "BenchOptions":
        """These options for a rebuild phase that must be done in ``seconds_left``: its fill
        budget shortened in proportion when the three budgets ask for more (less
        ``REBUILD_OVERHEAD`` for starting and stopping servers and the bus, and the checksums);
        the live and rebuild budgets are fitted when their turn comes (:meth:`fitted`)."""
        wanted = self.fill_budget + self.live_budget + self.rebuild_budget
        share = min(max((seconds_left - REBUILD_OVERHEAD) / wanted, 0.1), 1.0)  # past the limit: still measure a little
        return replace(self, fill_budget=self.fill_budget * share, phase_ends=time.perf_counter() + seconds_left)

    def fitted(self, budget: float, *following: float) -> float:
        """``budget``, or under the run's limit what is left of the phase for it now, shared in
        proportion with the ``following`` budgets (what the fill did not use goes to the others)."""
        if self.phase_ends is None:
            return budget
        left = self.phase_ends - time.perf_counter() - REBUILD_TAIL
        return max(min(budget, left * budget / (budget + sum(following))), budget * 0.1)

    @classmethod
    def quick_run(cls, **changes: Any) -> "BenchOptions":
        """A smoke run of every phase in well under a minute of measuring."""
        base = cls(events=200, latency_seconds=1.0, latency_warmup=0.2, webhook_events=20, rebuild_events=1000, budget=60.0,
                   latency_drain=30.0, webhook_budget=60.0, live_budget=60.0, rebuild_budget=60.0, total_budget=900.0,
                   quick=True)
        return replace(base, **changes)


def figure(value: float | int | None, unit: str, digits: int = 1) -> dict[str, Any]:
    """A measured value with its unit (None when it could not be measured)."""
    return {"value": None if value is None else round(float(value), digits), "unit": unit}


# --- the machine ------------------------------------------------------------------------------


def machine(temp_dir: Path) -> dict[str, Any]:
    """CPU, cores, memory, Python, nats-server and the disk under the temporary directory."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    mem_kb = next((int(line.split()[1]) for line in _read_lines("/proc/meminfo") if line.startswith("MemTotal:")), 0)
    try:
        version = subprocess.run([str(find_binary()), "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        version = f"unknown ({exc})"
    usage = shutil.disk_usage(temp_dir)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory": figure(mem_kb * 1024 / 1e9, "GB"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": version,
        "disk": {"path": str(temp_dir), **_mount_of(temp_dir), "size": figure(usage.total / 1e9, "GB")},
    }


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return []


def _mount_of(path: Path) -> dict[str, str]:
    """The device and file system that hold ``path`` (the longest mount point above it)."""
    best = ("", "", "")
    resolved = str(path.resolve())
    for line in _read_lines("/proc/mounts"):
        parts = line.split()
        if len(parts) >= 3 and (resolved == parts[1] or resolved.startswith(parts[1].rstrip("/") + "/")):
            if len(parts[1]) > len(best[1]):
                best = (parts[0], parts[1], parts[2])
    return {"device": best[0], "mount": best[1], "filesystem": best[2]}


def child_processes(parent: int, command: str) -> list[int]:
    """Pids of ``parent``'s child processes whose command line contains ``command``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == parent and command in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return found


def memory_of(pid: int) -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` (peak) of a process, in bytes ({} once it is gone)."""
    found: dict[str, int] = {}
    for line in _read_lines(f"/proc/{pid}/status"):
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(rest.split()[0]) * 1024
    return found


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User and system CPU seconds a process has used so far, all its threads (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


CPU_PARTS = ("bus", "gatekeepers", "nats_server", "bench")
CPU_PHASES = (("raw", "raw nats-py"), ("bus_nats", "bus over NATS"), ("bus_http", "bus over HTTP"),
              ("latency", "latency at the fixed rate"))
"""The processes whose CPU a phase measures (:class:`CpuMeter`), and the phases that measure it."""


class CpuMeter:
    """CPU seconds each part of a phase takes between :meth:`start` and :meth:`stop`: the bus
    process, its gatekeeper processes, the phase's nats-server and the bench's own process (which
    offers the events and watches the committed position; in the raw phase it is nats-py's
    publisher and consumer). Where the two cores went is what says what bounds a figure."""

    def __init__(self, server: EmbeddedNats, bus: "BusProcess | None" = None) -> None:
        self.pids: dict[str, list[int]] = {"nats_server": [server.process.pid] if server.process is not None else []}
        if bus is not None and bus.process is not None:
            self.pids["bus"] = [bus.process.pid]
            self.pids["gatekeepers"] = child_processes(bus.process.pid, "ops gate")
        self._before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _now(self) -> dict[str, float]:
        now = {part: sum(cpu_seconds(pid) or 0.0 for pid in pids) for part, pids in self.pids.items()}
        now["bench"] = time.process_time()
        return now

    def start(self) -> "CpuMeter":
        self._before = self._now()
        return self

    def stop(self) -> None:
        after = self._now()
        self.used = {part: max(after[part] - self._before.get(part, 0.0), 0.0) for part in after}

    def figures(self, events: int) -> dict[str, Any]:
        """``cpu_seconds`` per part, and ``cpu_per_event`` (µs of each part per event of the phase)."""
        order = [part for part in CPU_PARTS if part in self.used]
        return {
            "cpu_seconds": {part: figure(self.used[part], "s", 2) for part in order},
            "cpu_per_event": {part: figure(self.used[part] / events * 1e6 if events else None, "µs") for part in order},
        }


# --- watching the committed position --------------------------------------------------------------


class PositionWatcher:
    """Polls the network consumer's applied position in the bus's SQLite database from a thread,
    read-only, every ``POLL_INTERVAL`` s, and remembers when each new position was first seen.
    ``consumers``: the furthest of these positions (a rebuild's first lane records its own)."""

    def __init__(self, database: Path, consumers: tuple[str, ...] = (NETWORK_CONSUMER,), interval: float = POLL_INTERVAL) -> None:
        self.database = database
        self.consumers = consumers
        self.interval = interval
        self.times: list[float] = []
        self.positions: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-position", daemon=True)

    @property
    def position(self) -> int:
        return self.positions[-1] if self.positions else 0

    def start(self) -> "PositionWatcher":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        connection: sqlite3.Connection | None = None
        query = f"SELECT MAX(seq) FROM consumer_positions WHERE consumer IN ({', '.join('?' * len(self.consumers))})"
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=1.0)
                row = connection.execute(query, self.consumers).fetchone()
            except sqlite3.Error:  # not created or migrated yet
                if connection is not None:
                    connection.close()
                connection = None
                row = None
            now = time.perf_counter()
            seq = int(row[0]) if row and row[0] is not None else 0
            if seq != self.position:
                if self.positions and seq < self.position:  # emptied by a rebuild: start over
                    self.times.clear()
                    self.positions.clear()
                self.times.append(now)
                self.positions.append(seq)
            self._stop.wait(self.interval)
        if connection is not None:
            connection.close()

    def reached_at(self, seq: int) -> float | None:
        """When the position was first seen at or past ``seq`` (None: not yet)."""
        index = bisect.bisect_left(self.positions, seq)
        return self.times[index] if index < len(self.positions) else None

    async def wait_for(self, seq: int, deadline: float, progress: Callable[[int], None] | None = None) -> float | None:
        """Wait until the position reaches ``seq`` or ``deadline`` (perf_counter) passes."""
        while True:
            reached = self.reached_at(seq)
            if progress is not None:
                progress(self.position)
            if reached is not None or time.perf_counter() >= deadline:
                return reached
            await asyncio.sleep(0.02)


# --- the bus in its own process ------------------------------------------------------------------


class BusProcess:
    """``collabbus up`` in a process of its own, pointed at the phase's nats-server."""

    def __init__(self, nats_url: str, work_dir: Path, nats_creds: Path | None = None) -> None:
        self.work_dir = work_dir
        self.data_dir = work_dir / "bus"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("COLLABBUS_", "OTEL_"))}
        self.env.update(
            COLLABBUS_NATS_URL=nats_url,
            # The same credentials as the raw side's connections: both pay the same for authentication.
            **({"COLLABBUS_NATS_CREDS": str(nats_creds)} if nats_creds else {}),
            COLLABBUS_DATA_DIR=str(self.data_dir),
            COLLABBUS_HTTP=f"127.0.0.1:{self.port}",
            # The per-institution rate limits (HTTP, NATS) protect a shared bus; the bench measures its speed.
            COLLABBUS_HTTP_RATE_LIMIT="1000000",
            COLLABBUS_HTTP_RATE_BURST="1000000",
            COLLABBUS_INGRESS_RATE_LIMIT="1000000",
            COLLABBUS_INGRESS_RATE_BURST="1000000",
            COLLABBUS_WEBHOOK_ALLOW_NETWORKS="127.0.0.0/8",
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.peak_rss = 0

    @property
    def database(self) -> Path:
        return self.data_dir / "collabbus.db"

    @property
    def log_path(self) -> Path:
        return self.work_dir / "bus.log"

    def command(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        """Another ``collabbus`` command on the same data (e.g. ``rebuild``)."""
        return subprocess.run([sys.executable, "-m", "ops", *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    async def start(self, timeout: float = 60.0) -> None:
        """Start the bus and wait until ``/readyz`` says it is ready."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "ops", "up"], env=self.env, stdout=log, stderr=log)
        deadline = time.perf_counter() + timeout
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.perf_counter() < deadline:
                if self.process.poll() is not None:
                    raise BenchError(f"the bus exited with code {self.process.returncode}: {self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                await asyncio.sleep(0.1)
        raise BenchError(f"the bus was not ready within {timeout:g} s: {self.log_tail()}")

    def memory(self) -> dict[str, int]:
        """The bus's current and peak RSS, in bytes, and its gatekeeper processes' RSS together
        (``Gatekeepers``); remembers the peaks for after it stopped."""
        if self.process is None:
            return {}
        found = memory_of(self.process.pid)
        self.peak_rss = max(self.peak_rss, found.get("VmHWM", 0))
        found["Gatekeepers"] = sum(memory_of(pid).get("VmRSS", 0) for pid in child_processes(self.process.pid, "ops gate"))
        return found

    def rss(self, memory: dict[str, int]) -> dict[str, Any]:
        """The memory figures of a phase: the bus process's RSS now and at its peak, and beside it
        its gatekeeper processes' (``bus.gates``), which hold no state and do not grow with the log."""
        return {
            "rss": figure(memory.get("VmRSS", 0) / 1e6, "MB"),
            "rss_peak": figure(self.peak_rss / 1e6, "MB"),
            "gatekeepers_rss": figure(memory.get("Gatekeepers", 0) / 1e6, "MB"),
        }

    async def stop(self, grace: float = 2.0) -> None:
        """SIGTERM (the bus drains), then SIGKILL after ``grace`` s: a bus with a backlog would
        otherwise spend the run's time finishing work nobody measures (its database stays
        consistent either way: every batch is one transaction)."""
        if self.process is None:
            return
        self.memory()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self.process = None

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def issue_tokens(self, institutions: Iterable[str]) -> dict[str, str]:
        """HTTP tokens for institutions, written as ``collabbus institutions token`` does."""
        from handlers import tokens
        from handlers.db import make_engine, session_scope

        engine = make_engine(f"sqlite:///{self.database}")
        try:
            with session_scope(engine) as session:
                return {institution: tokens.issue(session, institution) for institution in institutions}
        finally:
            engine.dispose()


class BenchError(RuntimeError):
    """Something the bench needs did not work (the bus did not start, refused events, …)."""


@contextlib.asynccontextmanager
async def fresh_server(root: Path, name: str, configuration: str) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of its own for one phase, in ``configuration``, removed afterwards."""
    work = root / name
    server = EmbeddedNats(work / "nats", port=0, sync_always=CONFIGURATIONS[configuration]["sync_always"])
    await server.astart()
    try:
        yield server
    finally:
        await server.astop()
        shutil.rmtree(work, ignore_errors=True)


@contextlib.asynccontextmanager
async def running_bus(server: EmbeddedNats, work: Path) -> AsyncIterator[tuple[BusProcess, PositionWatcher]]:
    """A started bus process and a watcher of its committed position."""
    bus = BusProcess(server.url, work, server.bus_creds)
    try:
        await bus.start()
        watcher = PositionWatcher(bus.database).start()
        try:
            yield bus, watcher
        finally:
            watcher.stop()
    finally:
        await bus.stop()


# --- offering ------------------------------------------------------------------------------------


def workload(run: str, n: int) -> tuple[list[Event], list[Event]]:
    """``n`` catalog events: (the members joining, the rest)."""
    events = list(Workload(run, members=MEMBERS).events(n))
    return events[:MEMBERS], events[MEMBERS:]


@dataclass
class Offers:
    """What came back from offering events."""

    accepted: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    last_seq: int = 0
    seqs: list[int] = field(default_factory=list)

    def take(self, accepted: bool, seq: int | None, detail: Any) -> None:
        if accepted and seq is not None:
            self.accepted += 1
            self.seqs.append(seq)
            self.last_seq = max(self.last_seq, seq)
        elif len(self.rejected) < 5:
            self.rejected.append(detail)
        else:
            self.rejected.append({})


async def pipelined(items: list[Any], send: Callable[[Any], Any], concurrency: int, deadline: float) -> int:
    """Send ``items`` with ``concurrency`` requests in flight; stops starting new ones at ``deadline``.
    Returns how many were sent."""
    feed = iter(items)
    sent = 0

    async def worker() -> None:
        nonlocal sent
        for item in feed:
            if time.perf_counter() >= deadline:
                return
            sent += 1
            await send(item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sent


class NatsOfferer:
    """Offers events over NATS ingress as a partner does (``bus.client.offer``)."""

    def __init__(self, nc: Client, offers: Offers) -> None:
        self.nc = nc
        self.offers = offers

    async def __call__(self, item: Event) -> None:
        institution, event = item
        verdict = await offer(self.nc, institution, event)
        self.offers.take(verdict.accepted, verdict.seq, verdict.as_dict())


class HttpConnections:
    """Keep-alive HTTP/1.1 connections to the gateway, one request at a time on each.

    The sender must not be what is measured: httpx's connection pool tops out at a few hundred
    requests per second on this machine, far below what a plain socket sends, so the benchmark
    speaks the few lines of HTTP/1.1 it needs itself.
    """

    def __init__(self, url: str, size: int) -> None:
        parsed = httpx.URL(url)
        self.host, self.port = parsed.host, parsed.port or 80
        self.idle: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.size = size
        self.opened = 0

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        if self.idle.empty() and self.opened < self.size:
            self.opened += 1
            self.idle.put_nowait(await asyncio.open_connection(self.host, self.port))
        reader, writer = await self.idle.get()
        try:
            head = f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(body)}\r\n"
            head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
            writer.write(head.encode() + b"\r\n" + body)
            status_line, *lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines if line)}
            content = await reader.readexactly(int(fields.get("content-length", "0")))
        except BaseException:
            writer.close()
            self.opened -= 1
            raise
        self.idle.put_nowait((reader, writer))
        return int(status_line.split()[1]), content

    async def close(self) -> None:
        while not self.idle.empty():
            _, writer = self.idle.get_nowait()
            writer.close()


class HttpOfferer:
    """Offers events with ``POST /events`` (structured mode), each with its institution's token."""

    def __init__(self, connections: HttpConnections, tokens: dict[str, str], offers: Offers) -> None:
        self.connections = connections
        self.tokens = tokens
        self.offers = offers

    async def __call__(self, item: Event) -> None:
        institution, event = item
        headers = {"Authorization": f"Bearer {self.tokens[institution]}", "Content-Type": "application/cloudevents+json"}
        try:
            status, content = await self.connections.post("/events", orjson.dumps(event), headers)
            body = orjson.loads(content) if content else {}
        except (OSError, asyncio.IncompleteReadError, orjson.JSONDecodeError) as exc:
            self.offers.take(False, None, {"error": repr(exc)})
            return
        accepted = status == 202 and body.get("status") == "accepted"
        self.offers.take(accepted, body.get("seq"), {"status": status, **body})


# --- phases ------------------------------------------------------------------------------------------


def as_logged(events: Iterable[Event]) -> list[tuple[str, bytes, str]]:
    """Each event as the gate logs it, for nats-py alone to publish: (its log subject, its
    canonical bytes with the time the gate adds, its id for ``Nats-Msg-Id``)."""
    messages = []
    for _, event in events:
        logged = {**event, "time": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
        messages.append((log_subject(logged), canonical_bytes(logged), str(event["id"])))
    return messages


async def raw_stream(js: Any, name: str, **consumer: Any) -> None:
    """A file stream ``name`` on the log's subjects, keeping ids as the log does (24 h), with an
    explicitly acked consumer ``bench``: where nats-py alone publishes and consumes."""
    await js.add_stream(StreamConfig(name=name, subjects=[EVENTS_SUBJECTS], storage=StorageType.FILE, duplicate_window=86400.0))
    await js.add_consumer(name, ConsumerConfig(durable_name="bench", ack_policy=AckPolicy.EXPLICIT, **consumer))


async def raw_phase(server: EmbeddedNats, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """nats-py alone: the events' canonical bytes published to a file stream with ``Nats-Msg-Id``,
    ``concurrency`` publishes in flight, pull-consumed in batches and acked, at the same time."""
    members, rest = workload("raw", options.events)
    messages = as_logged(members + rest)
    n = len(messages)
    nc = await nats.connect(server.url, name="bench-raw", **server.connect_options())
    try:
        js = nc.jetstream()
        await raw_stream(js, "BENCH_RAW", max_ack_pending=options.concurrency * 256)
        sub = await js.pull_subscribe_bind("bench", "BENCH_RAW")
        meter = CpuMeter(server).start()
        started = time.perf_counter()
        deadline = started + max(options.budget * 3, 60.0)
        acked = 0
        published = 0

        async def consume() -> float:
            nonlocal acked
            while acked < n and time.perf_counter() < deadline:
                try:
                    msgs = await sub.fetch(256, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    await msg.ack()
                acked += len(msgs)
                progress("raw nats-py", acked, n)
            return time.perf_counter()

        async def publish(message: tuple[str, bytes, str]) -> None:
            nonlocal published
            subject, payload, event_id = message
            await js.publish(subject, payload, headers={"Nats-Msg-Id": event_id})
            published += 1

        consumer = asyncio.create_task(consume())
        await pipelined(messages, publish, options.concurrency, deadline)
        published_at = time.perf_counter()
        finished = await consumer
        meter.stop()
        await nc.flush()
    finally:
        await nc.close()
    seconds = finished - started
    return {
        "status": "ok" if acked >= n else "timed_out",
        "events": n,
        "published": published,
        "acked": acked,
        "seconds": figure(seconds, "s", 3),
        "publish_rate": figure(published / (published_at - started), "events/s"),
        "throughput": figure(acked / seconds, "events/s"),
        **meter.figures(acked),
    }


async def bus_phase(server: EmbeddedNats, work: Path, via: str, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """The same events offered to the bus (over NATS ingress or ``POST /events``), validated,
    logged, projected and committed; the clock stops when the committed position reaches the
    last offered event's log sequence."""
    members, rest = workload(via, options.events)
    label = "bus over NATS" if via == "nats" else "bus over HTTP"
    async with running_bus(server, work) as (bus, watcher), _sender(via, server, bus, options.concurrency) as make_offerer, \
            _log_reader(server) as log_js:
        offers = Offers()
        send = await make_offerer(offers, [institution for institution, _ in members + rest])
        n = len(members) + len(rest)
        logged_before = (await log_js.stream_info(EVENTS_STREAM)).state.last_seq
        meter = CpuMeter(server, bus).start()
        started = time.perf_counter()
        deadline = started + options.budget
        await pipelined(members, send, options.concurrency, deadline)  # members first: every event passes the gate

        async def report_offers() -> None:
            while True:
                progress(f"{label}: offering", offers.accepted, n)
                await asyncio.sleep(0.2)

        reporter = asyncio.create_task(report_offers())
        try:
            sent = len(members) + await pipelined(rest, send, options.concurrency, deadline)
        finally:
            reporter.cancel()
        offered_at = time.perf_counter()
        reached = await watcher.wait_for(
            offers.last_seq, deadline,
            lambda position: progress(f"{label}: committing", sum(1 for s in offers.seqs if s <= position), n),
        )
        meter.stop()
        end = reached if reached is not None else time.perf_counter()
        committed = sum(1 for seq in offers.seqs if (watcher.reached_at(seq) or end + 1) <= end)
        memory = bus.memory()
        logged = await _log_grown(log_js, logged_before, time.perf_counter() + 2.0)
    seconds = end - started
    status = "ok" if reached is not None and sent == n and offers.accepted == n else "timed_out"
    if offers.rejected:
        status = "failed"
    return {
        "status": status,
        "events": n,
        "offered": sent,
        "accepted": offers.accepted,
        "rejected": len(offers.rejected),
        "rejections": offers.rejected[:5],
        "committed": committed,
        "last_seq": offers.last_seq,
        "seconds": figure(seconds, "s", 3),
        "offer_rate": figure(sent / (offered_at - started), "events/s"),
        "throughput": figure(committed / seconds if seconds > 0 else None, "events/s"),
        "logged": logged,
        "logged_per_event": figure(logged / offers.accepted if offers.accepted else None, "log writes/event", 3),
        **meter.figures(committed),
        **bus.rss(memory),
    }


@contextlib.asynccontextmanager
async def _log_reader(server: EmbeddedNats) -> AsyncIterator[Any]:
    """A JetStream context on the phase's server, to read the log's state."""
    nc = await nats.connect(server.url, name="bench-log", **server.connect_options())
    try:
        yield nc.jetstream()
    finally:
        await nc.close()


async def _log_grown(js: Any, before: int, deadline: float) -> int:
    """How many messages the log took since it held ``before``, once it has stopped growing for
    a fifth of a second (the events the last offers' workflows derived come after their commit)."""
    last = -1
    while True:
        seq = (await js.stream_info(EVENTS_STREAM)).state.last_seq
        if seq == last or time.perf_counter() >= deadline:
            return seq - before
        last = seq
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def _sender(via: str, server: EmbeddedNats, bus: BusProcess, concurrency: int) -> AsyncIterator[Callable[..., Any]]:
    """A factory of offerers over NATS or HTTP; HTTP tokens are issued for every institution first."""
    if via == "nats":
        nc = await nats.connect(server.url, name="bench-partner", **server.connect_options())
        try:
            async def make(offers: Offers, institutions: list[str]) -> Callable[[Event], Any]:
                return NatsOfferer(nc, offers)

            yield make
        finally:
            await nc.close()
    else:
        connections = HttpConnections(bus.url, concurrency)
        try:
            async def make(offers: Offers, institutions: list[str]) -> Callable[[Event], Any]:
                tokens = await asyncio.to_thread(bus.issue_tokens, sorted(set(institutions)))
                return HttpOfferer(connections, tokens, offers)

            yield make
        finally:
            await connections.close()


@dataclass
class Timed:
    """Events offered at a fixed rate: when each was sent and answered, and its log sequence."""

    sent_at: list[float]
    answered_at: list[float]
    seqs: list[int | None]
    rejected: list[Any] = field(default_factory=list)
    unanswered: int = 0
    started: float = 0.0
    last_sent: float = 0.0


async def at_fixed_rate(nc: Client, events: list[Event], rate: float, progress: Callable[[int], None]) -> Timed:
    """Offer ``events`` over NATS at ``rate`` a second, open loop (each at its time, whatever
    became of those before it); returns when every offer has its answer."""
    timed = Timed([0.0] * len(events), [0.0] * len(events), [None] * len(events))

    async def one(index: int) -> None:
        institution, event = events[index]
        timed.sent_at[index] = time.perf_counter()
        verdict = await offer(nc, institution, event)
        timed.answered_at[index] = time.perf_counter()
        if verdict.accepted:
            timed.seqs[index] = verdict.seq
        elif verdict.reason == "unavailable":  # no verdict in time: the bus is behind, not refusing
            timed.unanswered += 1
        else:
            timed.rejected.append(verdict.as_dict())

    timed.started, timed.last_sent = await _at_rate(len(events), rate, one, progress)
    return timed


async def _at_rate(n: int, rate: float, one: Callable[[int], Coroutine[Any, Any, None]], progress: Callable[[int], None]) -> tuple[float, float]:
    """Start ``one(0)`` … ``one(n - 1)`` at ``rate`` a second, each at its time whatever became of
    those before it; returns (when the first was started, when the last was), once all are done."""
    tasks = []
    started = time.perf_counter()
    for index in range(n):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
        if index % 50 == 0:
            progress(index)
    last_sent = time.perf_counter()
    await asyncio.gather(*tasks)
    return started, last_sent


RAW_LATENCY_STREAM = "BENCH_RAW_LATENCY"


async def raw_at_fixed_rate(server: EmbeddedNats, events: list[Event], warm: int, rate: float,
                            progress: Callable[[int], None], deadline: float) -> dict[str, Any]:
    """nats-py alone at the latency phase's rate, on the phase's server before the bus starts: each
    event's canonical bytes published with ``Nats-Msg-Id`` to a file stream of its own, taken by a
    pull consumer kept open as the bus keeps its own (:class:`bus.pull.Puller`) and acked. Per event,
    publish → acknowledged (the log has it) and publish → received by the consumer; the first
    ``warm`` events are not measured. What the server and the disk take alone, under the bus's figures."""
    messages = as_logged(events)
    index = {event_id: i for i, (_, _, event_id) in enumerate(messages)}
    n = len(messages)
    sent_at, acked_at, received_at = [0.0] * n, [0.0] * n, [0.0] * n
    nc = await nats.connect(server.url, name="bench-raw-latency", **server.connect_options())
    try:
        js = nc.jetstream()
        await raw_stream(js, RAW_LATENCY_STREAM)
        puller = Puller(nc, RAW_LATENCY_STREAM, "bench", batch=256)
        await puller.start()
        received = 0

        async def consume() -> None:
            nonlocal received
            while received < n and time.perf_counter() < deadline:
                msgs = await puller.fetch(timeout=0.5)
                now = time.perf_counter()
                for msg in msgs:
                    received_at[index[(msg.headers or {})["Nats-Msg-Id"]]] = now
                    await msg.ack()
                received += len(msgs)

        async def one(i: int) -> None:
            subject, payload, event_id = messages[i]
            sent_at[i] = time.perf_counter()
            await js.publish(subject, payload, headers={"Nats-Msg-Id": event_id})
            acked_at[i] = time.perf_counter()

        consumer = asyncio.create_task(consume())
        try:
            await _at_rate(n, rate, one, progress)
            await consumer
        finally:
            consumer.cancel()
            await puller.stop()
            await js.delete_stream(RAW_LATENCY_STREAM)  # the bus's log takes these subjects next
    finally:
        await nc.close()
    measured = range(warm, n)
    to_received = sorted((received_at[i] - sent_at[i]) * 1000 if received_at[i] else float("inf") for i in measured)
    to_ack = sorted((acked_at[i] - sent_at[i]) * 1000 for i in measured)
    return {
        "events": len(measured),
        "received": sum(1 for i in measured if received_at[i]),
        "p50": figure(_percentile(to_received, 0.50), "ms", 2),
        "p99": figure(_percentile(to_received, 0.99), "ms", 2),
        "max": figure(_percentile(to_received, 1.0), "ms", 2),
        "ack_p50": figure(_percentile(to_ack, 0.50), "ms", 2),
        "ack_p99": figure(_percentile(to_ack, 0.99), "ms", 2),
    }


async def latency_phase(server: EmbeddedNats, work: Path, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """Events offered over NATS at a fixed rate (open loop: each at its time, whatever the answers
    before it); per event, the time from sending it to the committed position passing its sequence.
    The first ``latency_warmup`` seconds of them are offered the same way and not measured."""
    total = int(options.latency_rate * options.latency_seconds)
    warm = int(options.latency_rate * options.latency_warmup)
    members, rest = workload("latency", total + warm + MEMBERS)
    warmup_events, rest = rest[:warm], rest[warm:]
    raw = await raw_at_fixed_rate(server, warmup_events + rest, warm, options.latency_rate,
                                  lambda i: progress("latency at a fixed rate: raw nats-py", i, warm + total),
                                  time.perf_counter() + options.latency_seconds + options.latency_warmup + options.latency_drain)
    async with running_bus(server, work) as (bus, watcher):
        nc = await nats.connect(server.url, name="bench-latency", **server.connect_options())
        try:
            joined = Offers()
            await pipelined(members, NatsOfferer(nc, joined), options.concurrency, time.perf_counter() + options.budget)
            if joined.rejected or not await watcher.wait_for(joined.last_seq, time.perf_counter() + options.budget):
                raise BenchError(f"the members did not join: {joined.rejected[:1]}")
            # Every event type's first events meet code paths the bus has not run yet (statements
            # compiled, rows read into its session): a warm-up at the same rate, not measured.
            warmed = await at_fixed_rate(nc, warmup_events, options.latency_rate,
                                         lambda i: progress("latency at a fixed rate: warming up", i, len(warmup_events)))
            if warmed.rejected:
                raise BenchError(f"the warm-up was refused: {warmed.rejected[:1]}")
            await watcher.wait_for(max((s for s in warmed.seqs if s is not None), default=0), time.perf_counter() + options.budget)
            meter = CpuMeter(server, bus).start()
            timed = await at_fixed_rate(nc, rest, options.latency_rate,
                                        lambda i: progress("latency at a fixed rate: offering", i, len(rest)))
            accepted = [s for s in timed.seqs if s is not None]
            deadline = time.perf_counter() + options.latency_drain
            await watcher.wait_for(max(accepted, default=0), deadline,
                                   lambda p: progress("latency at a fixed rate: committing", sum(1 for s in accepted if s <= p), len(rest)))
            meter.stop()
        finally:
            await nc.close()
        memory = bus.memory()
    latencies: list[float] = []
    for when, seq in zip(timed.sent_at, timed.seqs):
        reached = watcher.reached_at(seq) if seq is not None else None
        latencies.append((reached - when) * 1000 if reached is not None else float("inf"))
    latencies.sort()
    committed = sum(1 for value in latencies if value != float("inf"))
    logging_times = sorted((answered - sent) * 1000 for sent, answered, seq in zip(timed.sent_at, timed.answered_at, timed.seqs)
                           if seq is not None)
    status = "failed" if timed.rejected else ("ok" if committed == len(rest) else "timed_out")
    return {
        "status": status,
        "rate": figure(options.latency_rate, "events/s"),
        "events": len(rest),
        "warmup_events": len(warmup_events),
        "achieved_rate": figure(len(rest) / (timed.last_sent - timed.started) if timed.last_sent > timed.started else None, "events/s"),
        "rejected": len(timed.rejected),
        "rejections": timed.rejected[:5],
        "unanswered": timed.unanswered,
        "committed": committed,
        "p50": figure(_percentile(latencies, 0.50), "ms", 2),
        "p99": figure(_percentile(latencies, 0.99), "ms", 2),
        "max": figure(_percentile(latencies, 1.0), "ms", 2),
        "logged_p50": figure(_percentile(logging_times, 0.50), "ms", 2),
        "logged_p99": figure(_percentile(logging_times, 0.99), "ms", 2),
        "poll_interval": figure(POLL_INTERVAL * 1000, "ms", 1),
        "raw": raw,
        **meter.figures(len(rest)),
        **bus.rss(memory),
    }


def _percentile(ordered: list[float], q: float) -> float | None:
    """The nearest-rank percentile; None when it falls on an event never committed."""
    if not ordered:
        return None
    value = ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
    return None if value == float("inf") else value


class WebhookReceiver:
    """Local endpoints ``/hook/{i}`` that count deliveries and check each Standard Webhooks signature."""

    def __init__(self) -> None:
        self.port = free_port()
        self.secrets: dict[str, bytes] = {}
        self.seen: set[tuple[str, str]] = set()
        self.deliveries = 0
        self.duplicates = 0
        self.verified = 0
        self.invalid = 0
        self.first_at: float | None = None
        self.last_at: float | None = None
        self._server: Any = None
        self._task: asyncio.Task[None] | None = None

    def url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.port}/hook/{index}"

    def add_secret(self, index: int, secret: str) -> None:
        self.secrets[str(index)] = base64.b64decode(secret.removeprefix("whsec_"))

    def check(self, endpoint: str, headers: dict[str, str], body: bytes) -> bool:
        """Standard Webhooks 1.0: base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}`` among the ``v1,`` signatures."""
        key = self.secrets.get(endpoint)
        msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
        if key is None or not msg_id or not stamp.isdigit():
            return False
        expected = base64.b64encode(hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()).decode()
        offered = [part.partition(",")[2] for part in headers.get("webhook-signature", "").split() if part.startswith("v1,")]
        return any(hmac.compare_digest(expected, candidate) for candidate in offered)

    async def app(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[dict[str, Any]], Any]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        endpoint = scope["path"].rpartition("/")[2]
        now = time.perf_counter()
        self.first_at = self.first_at or now
        self.last_at = now
        key = (endpoint, headers.get("webhook-id", ""))
        if key in self.seen:
            self.duplicates += 1
        else:
            self.seen.add(key)
            self.deliveries += 1
        if self.check(endpoint, headers, body):
            self.verified += 1
        else:
            self.invalid += 1
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def start(self) -> None:
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False,
                                lifespan="off", backlog=2048, interface="asgi3")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                self._task.result()
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.wait_for(self._task, 10)


async def webhooks_phase(server: EmbeddedNats, work: Path, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """Endpoints registered through the HTTP API, then project events offered over NATS; the
    rate is the deliveries received (each signature checked) from the first offer to the last delivery."""
    members, rest = workload("webhooks", MEMBERS + options.webhook_events * 12)
    projects = [item for item in rest if item[1]["type"] in WEBHOOK_TYPES][: options.webhook_events]
    owner = members[0][0]
    expected = len(projects) * options.webhook_endpoints
    receiver = WebhookReceiver()
    await receiver.start()
    try:
        async with running_bus(server, work) as (bus, watcher):
            nc = await nats.connect(server.url, name="bench-webhooks", **server.connect_options())
            try:
                joined = Offers()
                await pipelined(members, NatsOfferer(nc, joined), options.concurrency, time.perf_counter() + options.budget)
                token = (await asyncio.to_thread(bus.issue_tokens, [owner]))[owner]
                async with httpx.AsyncClient(timeout=30.0) as client:
                    for index in range(options.webhook_endpoints):
                        response = await client.post(
                            f"{bus.url}/webhooks", headers={"Authorization": f"Bearer {token}"},
                            json={"url": receiver.url(index), "event_types": list(WEBHOOK_TYPES), "description": f"bench {index}"},
                        )
                        if response.status_code != 201:
                            raise BenchError(f"registering a webhook endpoint: {response.status_code} {response.text[:300]}")
                        receiver.add_secret(index, response.json()["secret"])
                offers = Offers()
                started = time.perf_counter()
                deadline = started + options.webhook_budget
                reporter = asyncio.create_task(_report_until(
                    lambda: progress("webhook deliveries", receiver.deliveries, expected),
                    lambda: receiver.deliveries >= expected or time.perf_counter() >= deadline))
                await pipelined(projects, NatsOfferer(nc, offers), options.concurrency, deadline)
                await reporter
            finally:
                await nc.close()
            memory = bus.memory()
    finally:
        await receiver.stop()
    end = receiver.last_at if receiver.deliveries >= expected and receiver.last_at else time.perf_counter()
    seconds = end - started
    status = "ok" if receiver.deliveries >= expected and receiver.invalid == 0 else "timed_out"
    if offers.rejected or receiver.invalid:
        status = "failed"
    return {
        "status": status,
        "endpoints": options.webhook_endpoints,
        "events": len(projects),
        "accepted": offers.accepted,
        "expected": expected,
        "delivered": receiver.deliveries,
        "duplicates": receiver.duplicates,
        "signatures_verified": receiver.verified,
        "signatures_invalid": receiver.invalid,
        "seconds": figure(seconds, "s", 3),
        "throughput": figure(receiver.deliveries / seconds if seconds > 0 else None, "deliveries/s"),
        **bus.rss(memory),
    }


async def _report_until(report: Callable[[], None], done: Callable[[], bool]) -> None:
    while not done():
        report()
        await asyncio.sleep(0.05)
    report()


async def rebuild_phase(server: EmbeddedNats, work: Path, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """Fill the log with ``rebuild_events`` canonical events, published as the gate would while
    the bus is stopped; start the bus and let it apply them live (its memory after them is
    measured); then stop it and run ``collabbus rebuild --json`` over them in a process of its own."""
    chunks = []
    for index, start in enumerate(range(0, options.rebuild_events, REBUILD_CHUNK)):
        members, rest = workload(f"rb{index}", min(REBUILD_CHUNK, options.rebuild_events - start))
        chunks.append((members, rest))
    n = sum(len(members) + len(rest) for members, rest in chunks)
    bus = BusProcess(server.url, work, server.bus_creds)
    await bus.start()  # the streams, the operator, the migrated database
    await bus.stop()
    published, last_seq, fill_seconds = await fill_log(server, chunks, n, options, progress)
    budgets = {"fill": options.fill_budget, "live": options.fitted(options.live_budget, options.rebuild_budget)}
    try:
        await bus.start()
        watcher = PositionWatcher(bus.database).start()
        try:
            started = time.perf_counter()
            reached = await watcher.wait_for(last_seq, started + budgets["live"],
                                             lambda p: progress("rebuild: the bus applies the log live", min(p, last_seq), last_seq))
            memory = bus.memory()
            end = reached if reached is not None else time.perf_counter()
            applied = min(watcher.position, last_seq)
            if reached is not None:  # the workflows' derived events follow in the log: let them be applied too
                settled = await _settle(server, watcher, started + budgets["live"])
                reached = reached if settled else None
        finally:
            watcher.stop()
    finally:
        await bus.stop()
    live = {
        "status": "ok" if reached is not None and published == n else "timed_out",
        "events": n,
        "published": published,
        "publish_rate": figure(published / fill_seconds if fill_seconds else None, "events/s"),
        "log_seq": last_seq,
        "applied": applied,
        "throughput": figure(applied / (end - started), "events/s"),
        **bus.rss(memory),
    }
    incremental = await asyncio.to_thread(_checksums, bus.database) if live["status"] == "ok" else None
    budgets["rebuild"] = options.fitted(options.rebuild_budget)
    result = await _rebuild(bus, replace(options, rebuild_budget=budgets["rebuild"]), progress)
    if incremental is not None and result["status"] == "ok":
        rebuilt = await asyncio.to_thread(_checksums, bus.database)
        result["equals_incremental"] = rebuilt == incremental
        result["differing_tables"] = sorted(name for name in incremental if rebuilt.get(name) != incremental[name])
        if rebuilt != incremental:
            result["status"] = "failed"
    else:
        result["equals_incremental"] = None  # not compared: the live apply did not finish in its budget
    limited = {"budgets": {name: figure(seconds, "s") for name, seconds in budgets.items()}} if options.phase_ends else {}
    return {"status": result["status"], "events": n, "live": live, **{k: v for k, v in result.items() if k != "status"}, **limited}


def _checksums(database: Path) -> dict[str, str]:
    """Every read-model table's checksum (``handlers.db.table_checksums``) of the bus's database."""
    from handlers.db import make_engine, table_checksums

    engine = make_engine(f"sqlite:///{database}")
    try:
        return table_checksums(engine)
    finally:
        engine.dispose()


async def _settle(server: EmbeddedNats, watcher: "PositionWatcher", deadline: float) -> bool:
    """Wait until the bus has applied the whole log, the events its workflows derived included,
    and the log has stopped growing for a second."""
    async with _log_reader(server) as js:
        last, since = -1, time.perf_counter()
        while time.perf_counter() < deadline:
            seq = (await js.stream_info(EVENTS_STREAM)).state.last_seq
            if seq != last:
                last, since = seq, time.perf_counter()
            elif watcher.position >= seq and time.perf_counter() - since >= 1.0:
                return True
            await asyncio.sleep(0.1)
        return False


async def fill_log(server: EmbeddedNats, chunks: list[tuple[list[Event], list[Event]]], n: int,
                    options: BenchOptions, progress: Progress) -> tuple[int, int, float]:
    """Publish the events to the log as the gate does (canonical bytes, ``Nats-Msg-Id``, each
    workload's members first); returns (published, last sequence, seconds)."""
    nc = await nats.connect(server.url, name="bench-loader", **server.connect_options())
    js = nc.jetstream()
    published = last_seq = 0

    async def publish(item: Event) -> None:
        nonlocal published, last_seq
        event = {**item[1], "time": datetime.now(timezone.utc).isoformat(timespec="microseconds")}
        ack = await js.publish(log_subject(event), canonical_bytes(event),
                               headers={"Nats-Msg-Id": str(event["id"]), "Content-Type": "application/cloudevents+json"})
        published += 1
        last_seq = max(last_seq, ack.seq)
        if published % 500 == 0:
            progress("rebuild: filling the log", published, n)

    started = time.perf_counter()
    deadline = started + options.fill_budget
    try:
        for members, rest in chunks:
            await pipelined(members, publish, options.concurrency, deadline)
            await pipelined(rest, publish, options.concurrency, deadline)
    finally:
        await nc.close()
    return published, last_seq, time.perf_counter() - started


async def _rebuild(bus: BusProcess, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    """``collabbus rebuild --json`` with a time budget; its own report, or (timed out) the rate
    read from the read model's position while it ran (in lanes: the first lane's, see ``bus.rebuild``)."""
    from handlers.network import REBUILDING

    # The rate is the command's own report; the position is looked at for the progress display
    # (and a rate if it runs out of time), five times a second rather than every 2 ms as for the
    # latency: on two cores the bench's own queries were load on the rebuild it measures.
    watcher = PositionWatcher(bus.database, (NETWORK_CONSUMER, NETWORK_CONSUMER + REBUILDING), interval=REBUILD_POLL_INTERVAL).start()
    peak = reader_peak = 0
    readers: list[int] = []
    lanes: list[int] = []
    lane_peaks: dict[int, int] = {}
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "ops", "rebuild", "--json", "--force", env=bus.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    output = asyncio.create_task(process.communicate())
    deadline = started + options.rebuild_budget
    try:
        while not output.done() and time.perf_counter() < deadline:
            peak = max(peak, memory_of(process.pid).get("VmHWM", 0))
            readers = readers or child_processes(process.pid, "reader_main")  # the process reading the log for it
            for reader in readers:
                reader_peak = max(reader_peak, memory_of(reader).get("VmHWM", 0))
            lanes = lanes or child_processes(process.pid, "lane_main")  # the other lanes' processes
            for lane in lanes:
                lane_peaks[lane] = max(lane_peaks.get(lane, 0), memory_of(lane).get("VmHWM", 0))
            progress("rebuild: replaying the log", watcher.position, None)
            await asyncio.wait([output], timeout=0.2)
        timed_out = not output.done()
        if timed_out:
            process.kill()
        stdout, stderr = await output
    finally:
        watcher.stop()
    seconds = time.perf_counter() - started
    lanes_rss = [figure(lane_peaks[pid] / 1e6, "MB") for pid in lanes if lane_peaks.get(pid)]
    if timed_out:
        done = watcher.position
        span = (watcher.times[-1] - watcher.times[0]) if len(watcher.times) > 1 else 0.0
        return {
            "status": "timed_out",
            "replayed": done,
            "seconds": figure(seconds, "s", 3),
            "throughput": figure((watcher.positions[-1] - watcher.positions[0]) / span if span else None, "events/s"),
            "measured_by": "the read model's position while the rebuild ran (it did not finish in its budget)",
            "process_rss_peak": figure(peak / 1e6, "MB"),
            "reader_rss_peak": figure(reader_peak / 1e6 if reader_peak else None, "MB"),
            "lanes_rss_peak": lanes_rss,
        }
    try:
        report = json.loads(stdout)
    except json.JSONDecodeError:
        return {"status": "failed", "error": f"collabbus rebuild exited {process.returncode}: {stderr.decode()[-500:]}"}
    return {
        "status": "ok" if process.returncode == 0 else "failed",
        "replayed": report["events"],
        "failures": len(report.get("failures", [])),
        "seconds": figure(report["seconds"], "s", 3),
        "throughput": figure(report["events_per_second"], "events/s"),
        "measured_by": "collabbus rebuild --json",
        "lanes": report.get("lanes"),
        "process_seconds": figure(seconds, "s", 3),
        "process_rss_peak": figure(peak / 1e6, "MB"),
        "reader_rss_peak": figure(reader_peak / 1e6 if reader_peak else None, "MB"),
        "lanes_rss_peak": lanes_rss,
    }


# --- the run --------------------------------------------------------------------------------------------


TARGETS: tuple[tuple[str, str, str, float, str], ...] = (
    ("bus over NATS ≥ 0.75 × raw (sync_interval: always)", "sync_always.ratio", ">=", 0.75, "ratio"),
    ("bus over NATS ≥ 0.5 × raw (default sync interval)", "sync_default.ratio", ">=", 0.5, "ratio"),
    ("publish→committed p99 ≤ 20 ms at 500 events/s", "sync_always.latency.p99", "<=", 20.0, "ms"),
    ("rebuild ≥ 10,000 events/s", "sync_default.rebuild.throughput", ">=", 10_000.0, "events/s"),
    ("webhook fan-out ≥ 1,000 signed deliveries/s", "sync_always.webhooks.throughput", ">=", 1_000.0, "deliveries/s"),
    ("bus RSS ≤ 200 MB after 100,000 events", "sync_default.rebuild.live.rss", "<=", 200.0, "MB"),
)


def _lookup(results: dict[str, Any], path: str) -> tuple[Any, str | None]:
    """The figure at ``path`` and the status of the phase holding it."""
    node: Any = results["configurations"]
    status = None
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None, None
        node = node[part]
        if isinstance(node, dict) and "status" in node:
            status = node["status"]
    return node, status


def judge(results: dict[str, Any], options: BenchOptions) -> list[dict[str, Any]]:
    """Each target of the issue with the measured value and whether it is met."""
    judged = []
    for name, path, op, bound, unit in TARGETS:
        node, status = _lookup(results, path)
        value = node.get("value") if isinstance(node, dict) else None
        met: bool | None = None
        note = None
        if node is None:
            note = "not measured in this run"
        elif value is None:
            met, note = False, f"no value ({status})"
        else:
            met = value >= bound if op == ">=" else value <= bound
            if status not in (None, "ok"):
                met, note = False, f"the phase {status}"
        if path.endswith("live.rss") and node is not None:
            live = results["configurations"]["sync_default"]["rebuild"]["live"]
            if live.get("applied", 0) < 100_000:
                met, note = False, f"after {live.get('applied', 0):,} events, not 100,000"
        judged.append({"target": name, "figure": path, "bound": {"value": bound, "unit": unit, "op": op},
                       "measured": {"value": value, "unit": unit}, "met": met, "note": note})
    return judged


async def run(options: BenchOptions, progress: Progress, temp_root: Path | None = None) -> dict[str, Any]:
    """Run the phases of every configuration asked for and return the results (JSON-ready)."""
    root = Path(tempfile.mkdtemp(prefix="collabbus-bench-", dir=temp_root))
    began = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "collabbus bench",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(root),
        "options": {
            "events": options.events, "concurrency": options.concurrency, "quick": options.quick,
            "latency_rate": figure(options.latency_rate, "events/s"), "latency_seconds": figure(options.latency_seconds, "s"),
            "latency_warmup": figure(options.latency_warmup, "s"),
            "webhook_endpoints": options.webhook_endpoints, "webhook_events": options.webhook_events,
            "rebuild_events": options.rebuild_events, "poll_interval": figure(POLL_INTERVAL * 1000, "ms"),
            "budgets": {"bus": figure(options.budget, "s"), "latency_drain": figure(options.latency_drain, "s"),
                        "webhooks": figure(options.webhook_budget, "s"), "fill": figure(options.fill_budget, "s"),
                        "live": figure(options.live_budget, "s"),
                        "rebuild": figure(options.rebuild_budget, "s"), "total": figure(options.total_budget, "s")},
        },
        "configurations": {},
    }
    try:
        for configuration in options.configurations:
            section: dict[str, Any] = {"nats": CONFIGURATIONS[configuration]["nats"]}
            results["configurations"][configuration] = section
            for phase in PLAN[configuration]:
                if phase not in options.phases:
                    continue
                key = {"bus": "bus_nats", "http": "bus_http"}.get(phase, phase)
                async with fresh_server(root, f"{configuration}-{phase}", configuration) as server:
                    work = root / f"{configuration}-{phase}"
                    step = (lambda description, done, total, c=configuration:  # noqa: E731
                            progress(f"{c} · {description}", done, total))
                    began_phase = time.perf_counter()
                    fitted = options.within(options.total_budget - (began_phase - began)) if phase == "rebuild" else options
                    try:
                        section[key] = await _phase(phase, server, work, fitted, step)
                    except BenchError as exc:
                        section[key] = {"status": "failed", "error": str(exc)}
                    section[key]["wall_seconds"] = figure(time.perf_counter() - began_phase, "s")
            raw, bus = section.get("raw", {}), section.get("bus_nats", {})
            if raw.get("throughput", {}).get("value") and bus.get("throughput", {}).get("value") is not None:
                ratio = bus["throughput"]["value"] / raw["throughput"]["value"]
                section["ratio"] = {**figure(ratio, "ratio", 3), "of": "bus_nats.throughput / raw.throughput"}
                if section.get("bus_http", {}).get("throughput", {}).get("value") is not None:
                    section["ratio_http"] = {**figure(section["bus_http"]["throughput"]["value"] / raw["throughput"]["value"], "ratio", 3),
                                             "of": "bus_http.throughput / raw.throughput"}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    peaks = [measured["rss_peak"]["value"] for section in results["configurations"].values() for phase in section.values()
             if isinstance(phase, dict) for measured in (phase, phase.get("live") or {})
             if isinstance(measured.get("rss_peak"), dict) and measured["rss_peak"]["value"]]
    results["bus_rss_peak"] = {**figure(max(peaks) if peaks else None, "MB"), "of": "the largest VmHWM of the bus processes"}
    results["targets"] = judge(results, options)
    results["seconds"] = figure(time.perf_counter() - began, "s")
    return results


async def _phase(phase: str, server: EmbeddedNats, work: Path, options: BenchOptions, progress: Progress) -> dict[str, Any]:
    if phase == "raw":
        return await raw_phase(server, options, progress)
    if phase in ("bus", "http"):
        return await bus_phase(server, work, "nats" if phase == "bus" else "http", options, progress)
    if phase == "latency":
        return await latency_phase(server, work, options, progress)
    if phase == "webhooks":
        return await webhooks_phase(server, work, options, progress)
    return await rebuild_phase(server, work, options, progress)


def failed_phases(results: dict[str, Any]) -> list[str]:
    """``configuration.phase`` of every phase that failed (not merely slow)."""
    return [f"{name}.{key}" for name, section in results["configurations"].items() for key, phase in section.items()
            if isinstance(phase, dict) and phase.get("status") == "failed"]


def rows(results: dict[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(configuration, figure, value with unit, status) for the table a person reads."""

    def show(value: dict[str, Any] | None) -> str:
        if not value or value.get("value") is None:
            return "—"
        number = value["value"]
        text = f"{number:,.3f}" if value["unit"] == "ratio" else f"{number:,.2f}" if value["unit"] == "ms" else f"{number:,.0f}"
        return f"{text} {value['unit']}"

    for name, section in results["configurations"].items():
        for key, label, metric in (
            ("raw", "raw nats-py: publish → ack", "throughput"),
            ("bus_nats", "bus over NATS: offer → committed", "throughput"),
            ("bus_http", "bus over HTTP: offer → committed", "throughput"),
            ("latency", "latency p50 at the fixed rate", "p50"),
            ("latency", "latency p99 at the fixed rate", "p99"),
            ("latency", "its offer → logged part, p99", "logged_p99"),
            ("latency", "raw nats-py at that rate: publish → received, p99", "raw.p99"),
            ("webhooks", "webhook deliveries (signed)", "throughput"),
            ("rebuild", "bus applying the log live", None),
            ("rebuild", "collabbus rebuild", "throughput"),
        ):
            phase = section.get(key)
            if not isinstance(phase, dict):
                continue
            if key == "rebuild" and metric is None:
                live = phase.get("live", {})
                if live:
                    yield name, label, show(live.get("throughput")), live.get("status", "")
                    yield name, "bus RSS after the live log", show(live.get("rss")) + f" ({live.get('applied', 0):,} events)", live.get("status", "")
                    if (live.get("gatekeepers_rss") or {}).get("value"):
                        yield name, "its gatekeeper processes' RSS", show(live.get("gatekeepers_rss")), live.get("status", "")
                continue
            value: Any = phase
            for part in (metric or "").split("."):
                value = value.get(part) if isinstance(value, dict) else None
            yield name, label, show(value), phase.get("status", "") + (f": {phase['error']}" if phase.get("error") else "")
            if key == "rebuild" and phase.get("equals_incremental") is not None:
                same = "yes" if phase["equals_incremental"] else "no: " + ", ".join(phase.get("differing_tables", []))
                yield name, "rebuilt state = incremental state", same, phase.get("status", "")
        if "ratio" in section:
            yield name, "bus/raw (NATS)", show(section["ratio"]), ""
        if "ratio_http" in section:
            yield name, "bus/raw (HTTP)", show(section["ratio_http"]), ""
    yield "", "bus peak RSS (VmHWM)", show(results.get("bus_rss_peak")), ""


def cpu_rows(results: dict[str, Any]) -> Iterator[tuple[str, str, list[float | None], float]]:
    """(configuration, phase, µs of CPU an event of each of :data:`CPU_PARTS` — None for a part
    the phase does not run —, their sum): where the cores went, for the table a person reads."""
    for name, section in results["configurations"].items():
        for key, label in CPU_PHASES:
            phase = section.get(key)
            per_event = phase.get("cpu_per_event") if isinstance(phase, dict) else None
            if not per_event:
                continue
            parts = [per_event[part]["value"] if part in per_event else None for part in CPU_PARTS]
            yield name, label, parts, sum(value or 0.0 for value in parts)


def write(results: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
