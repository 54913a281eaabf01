"""The relay's timers keep their rhythm however often it is woken."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import cast

from bus.gate import Gate
from bus.relay import Relay


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
