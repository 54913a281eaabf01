"""The relay's timers keep their rhythm however often it is woken."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import cast

import orjson

from bus.gate import Gate
from bus.relay import Relay
from bus.verdict import Verdict


class Store:
    """An outbox that is always empty, counting how often the timers ran."""

    def __init__(self) -> None:
        self.ticks = 0
        self.times: list[datetime | None] = []

    def outbox(self, limit: int = 500) -> list[tuple[str, bytes]]:
        return []

    def outbox_done(self, event_ids: list[str]) -> None:
        raise AssertionError("nothing was published")

    def tick(self, now: datetime | None = None) -> Sequence[object]:
        self.ticks += 1
        self.times.append(now)
        return []


async def test_the_timers_run_while_derived_events_keep_waking_the_relay() -> None:
    """On a busy network the relay is woken (derived events to publish) more often than its
    timer interval; deadlines must still be acted on every interval, not only after a quiet one."""
    store = Store()
    relay = Relay(gate=cast(Gate, None), store=store, db_lock=asyncio.Lock(), interval=0.2, inline=True)
    await relay.start()
    assert store.ticks == 1  # at start: deadlines passed while the bus was down
    try:
        for _ in range(30):  # woken every 40 ms for 1.2 s
            relay.wake.set()
            await asyncio.sleep(0.04)
    finally:
        await relay.stop()
    assert 4 <= store.ticks - 1 <= 7, store.ticks


async def test_a_quiet_relay_runs_the_timers_every_interval() -> None:
    store = Store()
    relay = Relay(gate=cast(Gate, None), store=store, db_lock=asyncio.Lock(), interval=0.1, inline=True)
    await relay.start()
    await asyncio.sleep(0.55)
    await relay.stop()
    assert 3 <= store.ticks - 1 <= 6, store.ticks


async def test_the_timers_act_only_as_far_as_the_clock_lets_them() -> None:
    """With the network consumer behind the log, the timers act up to the last applied event's
    log time (what the clock gives), and not at all while that is unknown."""
    store = Store()
    behind = datetime.now(timezone.utc) - timedelta(minutes=5)
    answers: list[datetime | None] = [None, behind]
    relay = Relay(gate=cast(Gate, None), store=store, db_lock=asyncio.Lock(), inline=True,
                  clock=lambda: answers.pop(0) if answers else None)
    assert await relay.tick() == 0 and store.ticks == 0  # not known yet: skipped
    await relay.tick()
    assert store.times == [behind]


class HandingStore:
    """An outbox table that also hands over what it commits (``fresh``), counting its readings."""

    def __init__(self, rows: list[tuple[str, bytes]]) -> None:
        self.table = list(rows)
        self.handed: list[tuple[str, bytes]] | None = None
        self.reads = 0

    def commit(self, event_id: str, *, handed: bool = True) -> None:
        row = (event_id, orjson.dumps({"id": event_id}))
        self.table.append(row)
        if handed and self.handed is not None:
            self.handed.append(row)
        else:
            self.handed = None  # as the timers' events: the table is to be read

    def outbox(self, limit: int = 500) -> list[tuple[str, bytes]]:
        self.reads += 1
        self.handed = []
        return self.table[:limit]

    def fresh(self) -> list[tuple[str, bytes]] | None:
        rows, self.handed = self.handed, ([] if self.handed is not None else None)
        return rows

    def outbox_done(self, event_ids: list[str]) -> None:
        self.table = [row for row in self.table if row[0] not in event_ids]

    def tick(self, now: datetime | None = None) -> Sequence[object]:
        return []


class LoggingGate:
    """Logs what the relay publishes, in order; answers ``unavailable`` for the ids in ``down``."""

    def __init__(self) -> None:
        self.logged: list[str] = []
        self.down: set[str] = set()

    async def publish_internal(self, event: dict[str, object]) -> Verdict:
        event_id = str(event["id"])
        if event_id in self.down:
            return Verdict("rejected", event_id, reason="unavailable")
        self.logged.append(event_id)
        return Verdict("accepted", event_id, seq=len(self.logged))


async def test_what_the_store_hands_over_is_published_without_reading_the_outbox() -> None:
    """On a trickle the relay publishes what was just committed as the store hands it over; the
    outbox table is read at start, after the timers, and after anything was not confirmed."""
    store, gate = HandingStore([("before", orjson.dumps({"id": "before"}))]), LoggingGate()
    relay = Relay(gate=cast(Gate, gate), store=store, db_lock=asyncio.Lock(), interval=3600, inline=True)
    await relay.start()  # what waited from before is read from the table
    try:
        assert gate.logged == ["before"] and store.table == [] and store.reads >= 1
        reads = store.reads
        for event_id in ("a", "b"):
            store.commit(event_id)
        await relay.drain()
        assert gate.logged == ["before", "a", "b"] and store.table == [] and store.reads == reads  # handed over
        store.commit("timer", handed=False)  # written where nothing is handed over
        await relay.drain()
        assert gate.logged[-1] == "timer" and store.reads > reads and store.table == []
        reads = store.reads
        gate.down.add("c")
        store.commit("c")
        await relay.drain()  # handed over, not confirmed: it stays in the table ...
        assert "c" not in gate.logged and store.table and store.reads == reads
        gate.down.clear()
        store.commit("d")
        await relay.drain()  # ... and the next drain reads the table, in its order
        assert gate.logged[-2:] == ["c", "d"] and store.reads > reads and store.table == []
    finally:
        await relay.stop()
