"""Rebuilding the read models from the log: empty them, then replay every event in order.

Deciders run during the replay (they are deterministic), so the rebuilt state equals the one built
incrementally; nothing is published, since every derived event is already in the log.

The log is read by a process of its own (:func:`read_log`), which hands the events over a pipe in
batches as they arrive: receiving ~100,000 NATS messages costs nats-py a few seconds of the
interpreter, and in the applying process that time was taken in turns with applying (one
interpreter lock), a quarter of the whole rebuild. The reader runs on another core meanwhile.

With :class:`Lanes`, the domains are replayed side by side (``handlers.routes.REBUILD_LANES``):
the reader sends each lane the events of its domains, a process of its own applies each lane but
the first into a scratch SQLite database, and when the log has been replayed those rows are copied
into the read models' database. Applying events is the interpreter's work, and one interpreter
runs on one core: on two cores two lanes replay the benchmark's log in ~0.55–0.7 of the time of
one (``bench/README.md``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import pickle
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import orjson
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.tasks import stop_if_cancelled
from bus.pull import Puller, delivery_ns, log_time
from bus.streams import EVENTS_STREAM

COLLECT_EVERY = 100_000
"""While replaying, the garbage collector runs once every this many events instead of whenever
enough objects were made: the read models' rows the service keeps are many and long-lived, so
its regular passes walked them over and over (a twentieth of a rebuild's time). Applying events
leaves next to no reference cycles behind (the process's peak memory over 131,291 events was
the same either way)."""

READ_IDLE_SECONDS = 10.0
"""The reader stops when the log has brought nothing for this long before its last sequence
(messages removed by the stream's limits never arrive)."""


@dataclass
class RebuildReport:
    """What a rebuild did."""

    events: int = 0
    seconds: float = 0.0
    last_seq: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    held_rows: int | None = None
    """Read-model rows the rebuild kept in memory at most."""
    rows_let_go: int = 0
    """Rows it let go because more were held (and read again when an event needed them)."""
    lanes: list[dict[str, Any]] | None = None
    """Each process that replayed domains side by side (None: one process did it all): its
    ``domains``, the ``events`` it applied and the ``cpu_seconds`` it took."""
    dead_lettered: int = 0
    """Failures put into the read models' dead-letter queue (``ops.dlq.dead_letter_failures``):
    those not in it already."""

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.rate, 1),
            "last_seq": self.last_seq,
            "held_rows": self.held_rows,
            "rows_let_go": self.rows_let_go,
            "lanes": self.lanes,
            "failures": [{key: value for key, value in failure.items() if key != "detail"} for failure in self.failures],
            "dead_lettered": self.dead_lettered,
        }


class LogReadError(RuntimeError):
    """The reader process could not read the log to its end."""


class LaneError(RuntimeError):
    """A lane of a rebuild in several processes could not replay its part of the log."""


@dataclass
class Lanes:
    """Replay the domains side by side: ``domains[0]`` in the rebuilding process (its service must
    apply exactly those), each other lane in a process of its own writing to a scratch database in
    ``scratch`` (a directory), copied into the read models' database at the end. A lane's entries
    are domains, or event types of a domain alone (``handlers.routes.REBUILD_LANES``)."""

    domains: tuple[tuple[str, ...], ...]
    scratch: Path
    held_rows: int
    _helpers: "list[_Helper] | None" = field(default=None, init=False, repr=False, compare=False)

    def start(self) -> "list[_Helper]":
        """Start the other lanes' processes (once): a caller may start them early, so that they
        start up while it does its own work (they wait for their events)."""
        if self._helpers is None:
            self._helpers = _start_lanes(self) if len(self.domains) > 1 else []
        return self._helpers

    def close(self) -> None:
        """End the other lanes' processes and remove their scratch databases."""
        for helper in self._helpers or ():
            helper.close()
        self._helpers = None
        with contextlib.suppress(OSError):  # (left when something else is in it)
            self.scratch.rmdir()

    def kept(self, index: int) -> tuple[str, ...]:
        """The domains whose rows lane ``index`` keeps: those it has whole and no earlier lane has."""
        earlier = {entry for entries in self.domains[:index] for entry in entries}
        return tuple(entry for entry in self.domains[index] if "." not in entry and entry not in earlier)

    def routing(self) -> dict[str, list[int]]:
        """Per domain or event type, the lanes its events go to."""
        routing: dict[str, list[int]] = {}
        for index, entries in enumerate(self.domains):
            for entry in entries:
                routing.setdefault(entry, []).append(index)
        return routing

    def lane(self, index: int) -> "_Lane":
        """What lane ``index`` checks of the events it is sent."""
        entries = set(self.domains[index])
        whole = frozenset(entry for entry in entries if "." not in entry)
        types = frozenset(entry for entry in entries if "." in entry)
        others = {entry.partition(".")[0] for position, lane in enumerate(self.domains) if position != index for entry in lane}
        return _Lane(whole, types, frozenset(others - whole),
                     replicated=frozenset((whole - set(self.kept(index))) | {t.partition(".")[0] for t in types}))


@dataclass
class _Lane:
    """What a lane checks of the events it is sent: an event of another lane's domain under a
    subject of this lane's (written past the gate) would be applied without its handlers."""

    whole: frozenset[str]
    """The domains it applies whole."""
    types: frozenset[str]
    """The event types it applies of domains it does not have whole."""
    others: frozenset[str]
    """The domains of the other lanes' events."""
    replicated: frozenset[str] = frozenset()
    """Domains (whole or in part) it applies because its own read them, whose rows another lane keeps."""
    copies: set[str] = field(default_factory=set)
    """The ids of the replicated domains' events it applied."""

    def check(self, seq: int, envelope: Any) -> None:
        event_type = envelope.get("type") if isinstance(envelope, dict) else None
        if not isinstance(event_type, str):
            return
        domain = event_type.partition(".")[0]
        if domain in self.whole or event_type in self.types:
            if domain in self.replicated:
                self.copies.add(str(envelope.get("id")))
        elif domain in self.others:
            raise LaneError(f"#{seq} is a {event_type} event under a subject of another domain (written past the gate); "
                            "replay it in one process (collabbus rebuild --processes 1)")


async def rebuild(
    js: Any,
    service: Any,
    *,
    connect: Mapping[str, Any],
    batch: int = 4000,
    progress: Callable[[int, int], None] | None = None,
    lanes: Lanes | None = None,
) -> RebuildReport:
    """Empty the read models of ``service`` and replay the whole log into them.

    ``js``: this process's JetStream context (the log's extent); ``connect``: nats-py connection
    options for the reader process (``nats.connect(**connect)``); ``lanes``: replay the domains
    side by side (see :class:`Lanes`)."""
    from handlers.network import REBUILDING

    report = RebuildReport(held_rows=getattr(service, "held_rows", None))
    stop_if_cancelled()  # (a Ctrl-C while the caller looked for a running bus: nothing emptied)
    info = await js.stream_info(EVENTS_STREAM)
    report.last_seq = info.state.last_seq
    total = info.state.messages
    started, cpu_started = time.perf_counter(), time.process_time()
    if lanes is not None and (total == 0 or len(lanes.domains) < 2):
        lanes.close()
        lanes = None
    helpers = lanes.start() if lanes is not None else []  # (started now unless the caller did) they start up while the read models are emptied
    reader: _Reader | None = None
    try:
        epochs = await asyncio.to_thread(service.rules_epochs) if hasattr(service, "rules_epochs") else []
        for helper in helpers:  # each lane judges the events by the rules they were applied by, as this one does
            helper.send_first(epochs)
        if total:  # the reader starts up and reads ahead (into the pipes) while the read models are emptied
            try:
                reader = _start_reader(connect, report.last_seq, batch, [helper.frames_fd for helper in helpers],
                                       lanes.routing() if lanes is not None else None)
            finally:
                for helper in helpers:
                    helper.hand_over()  # the reader's now: when it exits, the lane's reading ends
        stop_if_cancelled()
        await asyncio.to_thread(service.reset)
        if progress:
            progress(0, total)
        if reader is None:
            report.seconds = time.perf_counter() - started
            return report
        lane = lanes.lane(0) if lanes is not None else None
        first_seq = info.state.first_seq

        def replayed(seq: int) -> None:
            if progress:  # with lanes, how far the log has been read (the others' events are not counted here yet)
                progress(min(seq - first_seq + 1, total) if lanes is not None else report.events, total)

        network = service.network
        if lanes is not None:  # the first lane's own position until every lane's rows are in (see there)
            network.positions_as = network.consumer + REBUILDING
        gc_was_enabled = gc.isenabled()
        gc.disable()  # collected every COLLECT_EVERY events instead (see there)
        try:
            seq = await _replay(reader, service, report, lane, replayed)
        except LogReadError:  # the reader stops when a lane has stopped: that lane's reason first
            for helper in helpers:
                helper.raise_failure()
            raise
        finally:
            if gc_was_enabled:
                gc.enable()
        own_events, own_cpu = report.events, time.process_time() - cpu_started
        results = [await asyncio.to_thread(helper.result) for helper in helpers]
        seq = max([seq, *(result["seq"] for result in results)])
        await _check_end(js, seq, report.last_seq)
        for helper, result in zip(helpers, results):
            await _merge(service, helper, result, report)
        if lanes is not None:
            network.positions_as = network.consumer
            await asyncio.to_thread(service.skip, seq)  # the furthest any lane got
            if progress:  # every lane's events now
                progress(report.events, total)
    finally:
        if reader is not None:
            reader.close()
        if lanes is not None:
            service.network.positions_as = service.network.consumer
            lanes.close()
            with contextlib.suppress(Exception):  # (a database that failed: the next rebuild empties it)
                await asyncio.to_thread(service.drop_position, service.network.consumer + REBUILDING)
    report.seconds = time.perf_counter() - started
    report.rows_let_go += getattr(service, "rows_let_go", 0)
    if lanes is not None:
        report.lanes = [{"domains": list(lanes.domains[0]), "events": own_events, "cpu_seconds": round(own_cpu, 3)}]
        report.lanes += [{"domains": list(helper.domains), "events": result["events"], "cpu_seconds": round(result["cpu_seconds"], 3)}
                         for helper, result in zip(helpers, results)]
    return report


async def _replay(reader: "_Reader", service: Any, report: RebuildReport, lane: _Lane | None,
                  progress: Callable[[int], None]) -> int:
    """Apply what the reader sends until the log's end; returns the last sequence received."""
    replay = _Frames(service, report, lane)
    while True:
        try:
            blob = await asyncio.to_thread(reader.connection.recv_bytes)
        except EOFError:
            raise LogReadError(f"the log's reader process ended unexpectedly ({reader.ended()})") from None
        if not await asyncio.to_thread(replay.take, blob):  # the end of the log, or what the reader took for it
            return replay.received
        stop_if_cancelled()
        progress(replay.received)


@dataclass
class _Frames:
    """What a lane does with each batch the reader sends: read it, apply it, collect the garbage
    every :data:`COLLECT_EVERY` events."""

    service: Any
    report: RebuildReport
    lane: _Lane | None
    received: int = 0
    """The last log sequence received."""
    collected: int = 0

    def take(self, blob: bytes) -> bool:
        """Apply one batch; False at the end of the log. The reader's failure raises."""
        frame = pickle.loads(blob)
        if frame is None:
            return False
        if isinstance(frame, dict):  # (before the events: the rules epochs, ``_Helper.send_first``)
            self.service.use_rules_epochs(frame["rules_epochs"])
            return True
        if isinstance(frame, str):
            raise LogReadError(frame)
        if frame:
            self.received = frame[-1][0]
        replay_frame(self.service, frame, self.report, self.lane)
        if self.report.events - self.collected >= COLLECT_EVERY:
            self.collected = self.report.events
            gc.collect()
        return True


def replay_frame(service: Any, frame: list[tuple[int, int, str | None, bytes]], report: RebuildReport,
                 lane: _Lane | None = None) -> None:
    """Read and apply one batch from the reader, in order; what is no event is noted and passed."""
    from handlers.service import LoggedItem, read_logged

    items: list[Any] = []
    for seq, nanos, msg_id, data in frame:
        try:
            envelope = read_logged(data)
        except orjson.JSONDecodeError as exc:  # not an event (the live consumer dead-letters it): past it
            _apply(service, items, report)
            items = []
            report.events += 1
            report.failures.append({"seq": seq, "id": msg_id, "error": f"unreadable: {exc}"})
            service.skip(seq)
            continue
        if lane is not None:
            lane.check(seq, envelope)
        items.append(LoggedItem(seq, envelope, log_time(nanos)))
    _apply(service, items, report)


async def _check_end(js: Any, received: int, last_seq: int) -> None:
    """The reader stops when the log brings nothing more for a while before its last sequence:
    fine when the messages left were removed (by the stream's limits, by hand), not when they are
    there and only did not come."""
    if received >= last_seq:
        return
    from nats.js.errors import NotFoundError

    try:
        await js.get_msg(EVENTS_STREAM, last_seq)
    except NotFoundError:
        return
    raise LogReadError(f"the log's reader stopped at #{received}, before the log's end at #{last_seq}")


def _apply(service: Any, items: list[Any], report: RebuildReport) -> None:
    """Apply ``items`` in order; an event that fails is noted in the report and passed."""
    rest = items
    while rest:
        applied, failure, _ = service.apply_batch(rest, live=False)
        if failure is None:
            break
        failed = rest[applied]
        report.failures.append({"seq": failed.seq, "id": failed.envelope.get("id"), "error": failure.error,
                                "detail": failure.detail})
        service.skip(failed.seq)
        rest = rest[applied + 1:]
    report.events += len(items)


# --------------------------------------------------------------------------- the other lanes


@dataclass
class _Helper:
    """A lane's process: it reads its events from ``frames_fd`` (handed to the reader) and answers
    on ``results``."""

    process: subprocess.Popen[bytes]
    frames_fd: int
    results: Connection
    domains: tuple[str, ...]
    kept: tuple[str, ...]
    """The domains whose rows it keeps (see :meth:`Lanes.kept`)."""
    database: Path

    def send_first(self, epochs: list[tuple[int, int]]) -> None:
        """Tell the lane, before its events, which rules applied which part of the log."""
        if self.frames_fd >= 0:
            out = Connection(os.dup(self.frames_fd), readable=False)
            try:
                out.send_bytes(pickle.dumps({"rules_epochs": epochs}))
            finally:
                out.close()

    def hand_over(self) -> None:
        """Close this process's copy of the pipe the lane reads (the reader has its own)."""
        if self.frames_fd >= 0:
            os.close(self.frames_fd)
            self.frames_fd = -1

    def raise_failure(self) -> None:
        """Raise the lane's failure if it has stopped with one."""
        if self.results.poll(2.0):
            self.result()

    def result(self) -> dict[str, Any]:
        try:
            answer = pickle.loads(self.results.recv_bytes())
        except EOFError:
            raise LaneError(f"the process replaying {', '.join(self.domains)} ended unexpectedly ({_ended(self.process)})") from None
        if isinstance(answer, str):
            raise LaneError(answer)
        return dict(answer)

    def close(self) -> None:
        self.hand_over()  # (a lane whose events never came ends on that)
        _end(self.process)
        self.results.close()
        for suffix in ("", "-wal", "-shm", "-journal"):  # (-journal: a lane ended while its database was being made)
            self.database.with_name(self.database.name + suffix).unlink(missing_ok=True)


def _start_lanes(lanes: Lanes) -> list[_Helper]:
    helpers: list[_Helper] = []
    lanes.scratch.mkdir(parents=True, exist_ok=True)
    for stale in lanes.scratch.glob("lane-*.db*"):  # a rebuild killed outright left it (one rebuild runs at a time)
        stale.unlink(missing_ok=True)
    try:
        for index, domains in enumerate(lanes.domains[1:], start=1):
            database = lanes.scratch / f"lane-{index}-{uuid.uuid4().hex[:8]}.db"
            frames_read, frames_write = os.pipe()
            results_read, results_write = os.pipe()
            arguments = {"database": str(database), "lanes": [list(entries) for entries in lanes.domains], "index": index,
                         "held_rows": lanes.held_rows, "frames_fd": frames_read, "results_fd": results_write}
            try:
                process = _python("lane_main", arguments, (frames_read, results_write))
            except BaseException:
                for fd in (frames_write, results_read):
                    os.close(fd)
                raise
            finally:
                for fd in (frames_read, results_write):
                    os.close(fd)
            helpers.append(_Helper(process, frames_write, Connection(results_read, writable=False), tuple(domains),
                                   lanes.kept(index), database))
    except BaseException:
        for helper in helpers:
            helper.process.kill()
            helper.close()
        raise
    return helpers


async def _merge(service: Any, helper: _Helper, result: dict[str, Any], report: RebuildReport) -> None:
    """Count a lane's events and failures in the report and copy its rows into the read models."""
    report.events += result["events"]
    known = {failure["seq"] for failure in report.failures}
    report.failures.extend(failure for failure in result["failures"] if failure["seq"] not in known)
    report.failures.sort(key=lambda failure: failure["seq"])
    report.rows_let_go += result["rows_let_go"]
    await asyncio.to_thread(copy_lane, service.engine, helper.database, helper.kept)
    service.forget()  # its session did not see those rows written


def copy_lane(engine: Any, database: Path, domains: tuple[str, ...]) -> None:
    """Copy the rows of ``domains`` and the events applied, from a lane's scratch SQLite
    ``database`` into ``engine``'s database, in one transaction."""
    import sqlalchemy as sa

    from handlers.bookkeeping import AppliedEvent
    from handlers.routes import domain_tables

    tables = [table for domain in domains for table in domain_tables(domain)]
    tables.append(AppliedEvent.__table__)  # type: ignore[attr-defined]
    if engine.dialect.name == "sqlite":  # inside SQLite, file to file
        raw = engine.raw_connection()
        try:
            cursor = raw.cursor()
            cursor.execute("ATTACH DATABASE ? AS lane", (str(database),))
            try:
                cursor.execute("BEGIN IMMEDIATE")
                try:
                    for table in tables:
                        columns = ", ".join(f'"{column.name}"' for column in table.columns)
                        cursor.execute(f'INSERT INTO main."{table.name}" ({columns}) SELECT {columns} FROM lane."{table.name}"')
                    cursor.execute("COMMIT")
                except BaseException:
                    cursor.execute("ROLLBACK")
                    raise
            finally:
                cursor.execute("DETACH DATABASE lane")
        finally:
            raw.close()
        return
    from handlers.db import make_engine

    source = make_engine(f"sqlite:///{database}")
    try:
        with source.connect() as reading, engine.begin() as writing:
            for table in tables:
                result = reading.execution_options(yield_per=5000).execute(sa.select(*table.columns))
                for rows in result.partitions():
                    writing.execute(table.insert(), [row._asdict() for row in rows])
    finally:
        source.dispose()


def lane_main() -> None:
    """A lane's process: what to replay and where is one JSON object on its standard input."""
    arguments = orjson.loads(sys.stdin.buffer.read())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the rebuilding process ends it
    frames = Connection(arguments["frames_fd"], writable=False)
    results = Connection(arguments["results_fd"], readable=False)
    try:
        answer: Any = _replay_lane(frames, arguments)
    except LaneError as exc:
        answer = str(exc)
    except LogReadError:  # the rebuilding process has it from the reader too
        return
    except Exception as exc:
        answer = f"the process replaying {', '.join(arguments['lanes'][arguments['index']])} failed: {exc.__class__.__name__}: {exc}"
    finally:
        frames.close()
    try:
        results.send_bytes(pickle.dumps(answer))
    except OSError:  # the rebuilding process has gone
        pass
    finally:
        results.close()


def _replay_lane(frames: Connection, arguments: dict[str, Any]) -> dict[str, Any]:
    from sqlmodel import SQLModel

    import handlers.tables  # noqa: F401  (every table on the metadata)
    from handlers.bookkeeping import AppliedEvent
    from handlers.db import make_engine
    from handlers.routes import network
    from handlers.service import NetworkService

    database = Path(arguments["database"])
    lanes = Lanes(tuple(tuple(entries) for entries in arguments["lanes"]), database.parent, arguments["held_rows"])
    index = arguments["index"]
    lane = lanes.lane(index)
    engine = make_engine(f"sqlite:///{database}")
    try:
        SQLModel.metadata.create_all(engine)
        service = NetworkService(engine, network(lanes.domains[index]), held_rows=lanes.held_rows)
        report = RebuildReport()
        replay = _Frames(service, report, lane)
        cpu_started = time.process_time()
        gc.disable()
        while True:
            try:
                blob = frames.recv_bytes()
            except EOFError:
                raise LogReadError("the log's reader ended") from None
            if not replay.take(blob):
                break
        applied = AppliedEvent.__table__  # type: ignore[attr-defined]
        copies = sorted(lane.copies)
        with engine.begin() as connection:  # the lane keeping a replicated domain records its events
            for start in range(0, len(copies), 500):
                connection.execute(applied.delete().where(applied.c.event_id.in_(copies[start:start + 500])))
            for domain in lane.replicated:  # and those derived from them (``handlers.network.derived_id``)
                connection.execute(applied.delete().where(applied.c.caused_by.is_not(None),
                                                          applied.c.event_id.startswith(f"{domain}.", autoescape=True)))
        rows_let_go = service.rows_let_go
        service.close()
        return {"events": report.events - len(copies), "failures": report.failures, "rows_let_go": rows_let_go,
                "seq": replay.received, "cpu_seconds": time.process_time() - cpu_started}
    finally:
        engine.dispose()


def _end(process: subprocess.Popen[bytes]) -> None:
    """Wait a moment for a process that has ended or is ending by itself, then kill it."""
    try:
        process.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _ended(process: subprocess.Popen[bytes]) -> str:
    """How a process ended, for a message."""
    try:
        code = process.wait(timeout=5.0)
    except subprocess.TimeoutExpired:
        return "it is still running"
    return f"killed by signal {-code}" if code < 0 else f"exit code {code}"


def _python(entry: str, arguments: dict[str, Any], fds: tuple[int, ...]) -> subprocess.Popen[bytes]:
    """Start ``bus.rebuild.<entry>()`` in a Python process of its own. Not ``multiprocessing``'s:
    that would import the calling program's main module again in the child. It imports from this
    process's ``sys.path`` (the same ``bus`` however collabbus is installed), is told what to do
    on its standard input (connection options may hold credentials, which a command line shows to
    every user), and runs in a session of its own (a Ctrl-C at the terminal is the rebuilding
    process's to handle)."""
    bootstrap = f"import json, sys; sys.path[:] = json.loads(sys.argv[1]); from bus.rebuild import {entry}; {entry}()"
    process = subprocess.Popen(
        [sys.executable, "-c", bootstrap, orjson.dumps(sys.path).decode()],
        pass_fds=fds, stdin=subprocess.PIPE, start_new_session=True,
    )
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(orjson.dumps(arguments))
    return process


# --------------------------------------------------------------------------- the reader process


@dataclass
class _Reader:
    process: subprocess.Popen[bytes]
    connection: Connection

    def ended(self) -> str:
        """How the process ended, for a message."""
        return _ended(self.process)

    def close(self) -> None:
        """End the reader (it has ended by itself after the log's end), then close the pipe: in
        that order, a thread still reading the pipe gets its end rather than a closed descriptor."""
        _end(self.process)
        self.connection.close()


def _start_reader(connect: Mapping[str, Any], last_seq: int, batch: int, lane_fds: list[int] | None = None,
                  routing: dict[str, list[int]] | None = None) -> _Reader:
    """Start the reader process (:func:`reader_main`), writing to a pipe of which this process
    keeps the reading end, and to ``lane_fds`` (the other lanes' pipes, by ``routing``)."""
    read_fd, write_fd = os.pipe()
    fds = [write_fd, *(lane_fds or ())]
    arguments = {"connect": dict(connect), "stream": EVENTS_STREAM, "last_seq": last_seq, "batch": batch, "fds": fds,
                 "routing": routing}
    try:
        process = _python("reader_main", arguments, tuple(fds))
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the reader's end: when it exits, reading ends instead of waiting
    return _Reader(process, Connection(read_fd, writable=False))


def reader_main() -> None:
    """The reader process's entry point: what to read is one JSON object on its standard input."""
    arguments = orjson.loads(sys.stdin.buffer.read())
    outs = [Connection(fd, readable=False) for fd in arguments["fds"]]
    read_log(arguments["connect"], arguments["stream"], arguments["last_seq"], arguments["batch"], outs,
             arguments.get("routing"))


def read_log(connect: dict[str, Any], stream: str, last_seq: int, batch: int, outs: list[Connection],
             routing: dict[str, list[int]] | None = None) -> None:
    """The reader process: every message of ``stream`` up to ``last_seq``, in order, sent to
    ``outs`` as pickled lists of ``(sequence, logged at in ns, Nats-Msg-Id, bytes)`` per batch
    received; then ``None``. A failure is sent as its description (a ``str``). With ``routing``
    (per domain, the indexes of ``outs`` its events go to), each message goes where the domain
    its subject names is routed (``collab.events.{institution}.{domain}.…``), else to the first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (sent to the group of a session it is not in, or by hand)
    try:
        asyncio.run(_read(connect, stream, last_seq, batch, outs, routing or {}))
        for out in outs:
            out.send_bytes(pickle.dumps(None))
    except BrokenPipeError:  # a rebuilding process has gone: nothing to tell
        pass
    except Exception as exc:
        for out in outs:
            _send_failure(out, exc)
    finally:
        for out in outs:
            out.close()


def _send_failure(out: Connection, exc: BaseException) -> None:
    try:
        out.send_bytes(pickle.dumps(f"reading the log failed: {exc.__class__.__name__}: {exc}"))
    except OSError:
        pass


async def _read(connect: dict[str, Any], stream: str, last_seq: int, batch: int, outs: list[Connection],
                routing: dict[str, list[int]]) -> None:
    import nats

    async def quiet(_exc: Exception) -> None:  # a lost connection ends the read below, with its reason
        return None

    nc = await nats.connect(**{**connect, "allow_reconnect": False, "error_cb": quiet})
    try:
        js = nc.jetstream()
        name = f"rebuild-{uuid.uuid4().hex[:12]}"
        await js.add_consumer(stream, ConsumerConfig(
            name=name, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=60.0, max_waiting=1,
        ))
        puller = Puller(nc, stream, name, batch=batch)
        await puller.start()
        sending: list[asyncio.Future[None] | None] = [None] * len(outs)
        first = [0]
        by_type = {entry.partition(".")[0] for entry in routing if "." in entry}
        try:
            seq, idle_since = 0, time.monotonic()
            while seq < last_seq:
                # The puller keeps a request open: the next batch arrives while this one is sent.
                msgs = await puller.fetch(timeout=2.0)
                if not msgs:
                    if nc.is_closed or not nc.is_connected:
                        raise ConnectionError(f"the connection to NATS was lost after #{seq} of #{last_seq}")
                    if time.monotonic() - idle_since >= READ_IDLE_SECONDS:
                        break
                    continue
                frames: list[list[tuple[int, int, str | None, bytes]]] = [[] for _ in outs]
                for msg in msgs:
                    seq, nanos = delivery_ns(msg)
                    if seq > last_seq:
                        break
                    record = (seq, nanos, (msg.headers or {}).get("Nats-Msg-Id"), msg.data)
                    for lane in _lanes_of(msg.subject, routing, by_type) if routing else first:
                        frames[lane].append(record)
                for index, (out, frame) in enumerate(zip(outs, frames)):
                    if not frame:
                        continue
                    previous = sending[index]
                    if previous is not None:
                        await previous  # one batch in each pipe at a time, in order
                    sending[index] = asyncio.ensure_future(asyncio.to_thread(out.send_bytes, pickle.dumps(frame, protocol=5)))
                idle_since = time.monotonic()  # (waiting for the rebuilding processes is not the log being idle)
            for previous in sending:
                if previous is not None:
                    await previous
        finally:
            await puller.stop()
            try:
                await js.delete_consumer(stream, name)
            except Exception:  # it expires by itself after inactive_threshold
                pass
    finally:
        await nc.close()


def _lanes_of(subject: str, routing: dict[str, list[int]], by_type: set[str]) -> list[int]:
    """The lanes a log message goes to, by the domain and event its subject names
    (``collab.events.{institution}.{domain}.{event}.{subject}``); the first when it names none.
    ``by_type``: the domains some lane takes only some event types of."""
    tokens = subject.split(".", 5)
    if len(tokens) < 5:
        return [0]
    lanes = routing.get(tokens[3], [0])
    if tokens[3] in by_type:
        alone = routing.get(f"{tokens[3]}.{tokens[4]}")
        if alone:  # the event type goes to the lanes that have it alone as well
            return sorted({*lanes, *alone}) if tokens[3] in routing else alone
    return lanes
