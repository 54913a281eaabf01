"""Rebuilding the read models from the log: empty them, then replay every event in order.

Deciders run during the replay (they are deterministic), so the rebuilt state equals the one built
incrementally; nothing is published, since every derived event is already in the log.

The log is read by a process of its own (:func:`read_log`), which hands the events over a pipe in
batches as they arrive: receiving ~100,000 NATS messages costs nats-py a few seconds of the
interpreter, and in the applying process that time was taken in turns with applying (one
interpreter lock), a quarter of the whole rebuild. The reader runs on another core meanwhile.
"""

from __future__ import annotations

import asyncio
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
            "failures": self.failures,
        }


class LogReadError(RuntimeError):
    """The reader process could not read the log to its end."""


async def rebuild(
    js: Any,
    service: Any,
    *,
    connect: Mapping[str, Any],
    batch: int = 4000,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Empty the read models of ``service`` and replay the whole log into them.

    ``js``: this process's JetStream context (the log's extent); ``connect``: nats-py connection
    options for the reader process (``nats.connect(**connect)``)."""
    from handlers.service import LoggedItem

    report = RebuildReport(held_rows=getattr(service, "held_rows", None))
    info = await js.stream_info(EVENTS_STREAM)
    report.last_seq = info.state.last_seq
    total = info.state.messages
    started = time.perf_counter()
    await asyncio.to_thread(service.reset)
    if progress:
        progress(0, total)
    if total == 0:
        report.seconds = time.perf_counter() - started
        return report
    reader = _start_reader(connect, report.last_seq, batch)
    receiving = reader.connection
    collected = received = 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # collected every COLLECT_EVERY events instead (see there)
    try:
        while True:
            try:
                blob = await asyncio.to_thread(receiving.recv_bytes)
            except EOFError:
                raise LogReadError(f"the log's reader process ended unexpectedly ({reader.ended()})") from None
            frame = pickle.loads(blob)
            if frame is None:  # the end of the log, or what the reader took for it
                await _check_end(js, received, report.last_seq)
                break
            if isinstance(frame, str):
                raise LogReadError(frame)
            if frame:
                received = frame[-1][0]
            items: list[LoggedItem] = []
            for seq, nanos, msg_id, data in frame:
                try:
                    items.append(LoggedItem(seq, orjson.loads(data), log_time(nanos)))
                except orjson.JSONDecodeError as exc:  # not an event (the live consumer dead-letters it): past it
                    await _apply(service, items, report)
                    report.events += len(items) + 1
                    items = []
                    report.failures.append({"seq": seq, "id": msg_id, "error": f"unreadable: {exc}"})
                    await asyncio.to_thread(service.skip, seq)
            await _apply(service, items, report)
            report.events += len(items)
            if report.events - collected >= COLLECT_EVERY:
                collected = report.events
                gc.collect()
            if progress:
                progress(report.events, total)
    finally:
        if gc_was_enabled:
            gc.enable()
        reader.close()
    report.seconds = time.perf_counter() - started
    report.rows_let_go = getattr(service, "rows_let_go", 0)
    return report


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


async def _apply(service: Any, items: list[Any], report: RebuildReport) -> None:
    """Apply ``items`` in order; an event that fails is noted in the report and passed."""
    rest = items
    while rest:
        applied, failure, _ = await asyncio.to_thread(service.apply_batch, rest, live=False)
        if failure is None:
            break
        failed = rest[applied]
        report.failures.append({"seq": failed.seq, "id": failed.envelope.get("id"), "error": failure.error})
        await asyncio.to_thread(service.skip, failed.seq)
        rest = rest[applied + 1:]


# --------------------------------------------------------------------------- the reader process


@dataclass
class _Reader:
    process: subprocess.Popen[bytes]
    connection: Connection

    def ended(self) -> str:
        """How the process ended, for a message."""
        try:
            code = self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            return "it is still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def close(self) -> None:
        """End the reader (it has ended by itself after the log's end), then close the pipe: in
        that order, a thread still reading the pipe gets its end rather than a closed descriptor."""
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.connection.close()


def _start_reader(connect: Mapping[str, Any], last_seq: int, batch: int) -> _Reader:
    """Start the reader process (:func:`reader_main`), writing to a pipe of which this process
    keeps the reading end. A process of its own, not ``multiprocessing``'s: that would import the
    calling program's main module again in the child. It imports from this process's ``sys.path``
    (the same ``bus`` however collabbus is installed), is told what to read on its standard input
    (connection options may hold credentials, which a command line shows to every user), and runs
    in a session of its own (a Ctrl-C at the terminal is the rebuilding process's to handle)."""
    read_fd, write_fd = os.pipe()
    arguments = orjson.dumps({"connect": dict(connect), "stream": EVENTS_STREAM, "last_seq": last_seq,
                              "batch": batch, "fd": write_fd})
    bootstrap = "import json, sys; sys.path[:] = json.loads(sys.argv[1]); from bus.rebuild import reader_main; reader_main()"
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", bootstrap, orjson.dumps(sys.path).decode()],
            pass_fds=(write_fd,), stdin=subprocess.PIPE, start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)  # the reader's end: when it exits, reading ends instead of waiting
    assert process.stdin is not None
    with process.stdin:
        process.stdin.write(arguments)
    return _Reader(process, Connection(read_fd, writable=False))


def reader_main() -> None:
    """The reader process's entry point: what to read is one JSON object on its standard input."""
    arguments = orjson.loads(sys.stdin.buffer.read())
    out = Connection(arguments["fd"], readable=False)
    read_log(arguments["connect"], arguments["stream"], arguments["last_seq"], arguments["batch"], out)


def read_log(connect: dict[str, Any], stream: str, last_seq: int, batch: int, out: Connection) -> None:
    """The reader process: every message of ``stream`` up to ``last_seq``, in order, sent to
    ``out`` as pickled lists of ``(sequence, logged at in ns, Nats-Msg-Id, bytes)`` per batch
    received; then ``None``. A failure is sent as its description (a ``str``)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # (sent to the group of a session it is not in, or by hand)
    try:
        asyncio.run(_read(connect, stream, last_seq, batch, out))
        out.send_bytes(pickle.dumps(None))
    except BrokenPipeError:  # the rebuilding process has gone: nothing to tell
        pass
    except Exception as exc:
        _send_failure(out, exc)
    finally:
        out.close()


def _send_failure(out: Connection, exc: BaseException) -> None:
    try:
        out.send_bytes(pickle.dumps(f"reading the log failed: {exc.__class__.__name__}: {exc}"))
    except OSError:
        pass


async def _read(connect: dict[str, Any], stream: str, last_seq: int, batch: int, out: Connection) -> None:
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
        sending: asyncio.Future[None] | None = None
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
                frame = []
                for msg in msgs:
                    seq, nanos = delivery_ns(msg)
                    if seq > last_seq:
                        break
                    frame.append((seq, nanos, (msg.headers or {}).get("Nats-Msg-Id"), msg.data))
                if sending is not None:
                    await sending  # one batch in the pipe at a time, in order
                idle_since = time.monotonic()  # (waiting for the rebuilding process is not the log being idle)
                sending = asyncio.ensure_future(asyncio.to_thread(out.send_bytes, pickle.dumps(frame, protocol=5)))
            if sending is not None:
                await sending
        finally:
            await puller.stop()
            try:
                await js.delete_consumer(stream, name)
            except Exception:  # it expires by itself after inactive_threshold
                pass
    finally:
        await nc.close()
