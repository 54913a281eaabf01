"""``bus.watch.AppliedWatch``: what a long poll of ``GET /events`` waits on (pure: no server)."""

from __future__ import annotations

import asyncio

from bus.watch import AppliedWatch


async def test_a_waiter_wakes_when_the_position_passes_its_point_and_not_before() -> None:
    watch = AppliedWatch()
    watch.applied(10)
    waiting = asyncio.create_task(watch.wait_beyond(12, timeout=30))
    await asyncio.sleep(0.05)
    watch.applied(12)  # up to its point, not past it
    watch.applied(11)  # an older report changes nothing
    await asyncio.sleep(0.05)
    assert not waiting.done() and watch.position == 12
    watch.applied(13)
    assert await asyncio.wait_for(waiting, 1) is True


async def test_a_point_already_passed_answers_at_once_and_a_quiet_log_times_out() -> None:
    watch = AppliedWatch()
    watch.applied(5)
    assert await asyncio.wait_for(watch.wait_beyond(4, timeout=30), 1) is True
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await watch.wait_beyond(5, timeout=0.2) is False
    assert loop.time() - started >= 0.19


async def test_closing_wakes_every_waiter_and_answers_later_ones_at_once() -> None:
    watch = AppliedWatch()
    waiters = [asyncio.create_task(watch.wait_beyond(0, timeout=60)) for _ in range(3)]
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in waiters)
    watch.close()
    assert await asyncio.wait_for(asyncio.gather(*waiters), 1) == [False, False, False]
    assert await asyncio.wait_for(watch.wait_beyond(0, timeout=60), 1) is False
