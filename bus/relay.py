"""Getting derived events from the outbox into the log, and running the timers.

The workflows write derived events to the outbox in the same transaction as their state; the relay
publishes them through the gate's internal path with their deterministic ids (``Nats-Msg-Id``), and
forgets them only once the log has confirmed them. A crash anywhere in between republishes the same
ids, which the log deduplicates: each derived event is logged exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Protocol

import orjson

from bus.consumer import call_database
from bus.gate import Gate
from handlers.positions import PositionTaken

log = logging.getLogger("collabbus.relay")


class Outbox(Protocol):
    def outbox(self, limit: int = 500) -> list[tuple[str, bytes]]: ...

    def outbox_done(self, event_ids: list[str]) -> None: ...

    def tick(self, now: datetime | None = None) -> Sequence[object]: ...


@dataclass
class Relay:
    """Publishes the outbox whenever woken (and every ``interval`` seconds); runs the timers too."""

    gate: Gate
    store: Outbox
    db_lock: asyncio.Lock
    interval: float = 1.0
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    published: int = 0
    _task: asyncio.Task[None] | None = None
    _stopping: bool = False
    inline: bool = False
    """Read and write the outbox in the event loop's thread (SQLite, see ``call_database``)."""
    clock: Callable[[], datetime | None] | None = None
    """The moment up to which the timers may act (the network consumer's :meth:`timers_now`):
    None skips the timers this time; without a clock they act on the wall clock."""
    _clean: bool = False
    """Whether the outbox held nothing unpublished when this relay last looked: then a store that
    hands over what it commits (``fresh``) spares reading the table on each wake. The table is
    read at start, after the timers ran (every ``interval``: also what other processes wrote),
    and whenever something was not confirmed."""

    async def start(self) -> None:
        await self.tick()  # deadlines that passed while the bus was down are acted on at once
        await self.drain()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="relay")

    async def stop(self) -> None:
        self._stopping = True
        self.wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self.drain()

    async def _run(self) -> None:
        # The timers run every ``interval`` whether or not the relay was woken meanwhile: on a busy
        # network derived events wake it more often than that, and deadlines must still be met.
        loop = asyncio.get_running_loop()
        next_tick = loop.time() + self.interval
        while not self._stopping:
            try:
                await asyncio.wait_for(self.wake.wait(), max(0.0, next_tick - loop.time()))
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            if not self._stopping and loop.time() >= next_tick:
                await self.tick()
                next_tick = loop.time() + self.interval
                self._clean = False
            await self.drain()

    async def tick(self) -> int:
        """Run the timers once (deadlines due now, or as far as the log has been applied)."""
        now = self.clock() if self.clock is not None else datetime.now(timezone.utc)
        if now is None:
            return 0
        async with self.db_lock:
            try:
                return len(await call_database(self.inline, self.store.tick, now))
            except PositionTaken as taken:  # (this bus is stopped meanwhile, or continues from the database's position)
                log.warning("timers not run: %s", taken)
                return 0
            except Exception:
                log.exception("timers failed")
                return 0

    async def drain(self) -> int:
        """Publish everything in the outbox; returns how many events the log confirmed."""
        confirmed = 0
        handed: Callable[[], list[tuple[str, bytes]] | None] | None = getattr(self.store, "fresh", None)
        first = True
        while True:
            async with self.db_lock:
                pending = handed() if first and self._clean and handed is not None else None
                from_table = pending is None
                if pending is None:
                    try:
                        pending = await call_database(self.inline, self.store.outbox)
                    except Exception as exc:
                        log.error("outbox unreadable: %s", exc)
                        self._clean = False
                        return confirmed
            first = False
            if not pending:
                self._clean = self._clean or from_table
                return confirmed
            done: list[str] = []
            # Published together and confirmed together: the messages leave on the one connection
            # in outbox order (nothing before the write yields), so the log keeps that order.
            verdicts = await asyncio.gather(*(self.gate.publish_internal(orjson.loads(body)) for _, body in pending))
            for (event_id, body), verdict in zip(pending, verdicts):
                if verdict.accepted:
                    done.append(event_id)
                elif verdict.reason == "unavailable":
                    continue  # stays in the outbox; the next drain offers it again
                else:  # a workflow decided an event the catalog refuses: a bug, kept visible in the DLQ
                    log.error("derived event %s refused by the catalog: %s", event_id, verdict.as_dict(), extra={"event_id": event_id})
                    await self.gate.js.publish(
                        "collab.dlq.relay", body,
                        headers={"Collabbus-Error": "derived event refused", "Collabbus-Error-Detail": orjson.dumps(verdict.as_dict()).decode()[:1500]},
                        stream="COLLAB_DLQ",
                    )
                    done.append(event_id)
            async with self.db_lock:
                await call_database(self.inline, self.store.outbox_done, done)
            confirmed += len(done)
            self.published += len(done)
            if len(done) < len(pending):
                self._clean = False  # what stayed is read from the table next time
                await asyncio.sleep(0.5)  # the log is not answering; try again shortly
                return confirmed
            if not from_table:  # all that was handed over is in the log; more wakes the relay again
                return confirmed
