"""Rebuilding the read models from the log: empty them, then replay every event in order.

Deciders run during the replay (they are deterministic), so the rebuilt state equals the one built
incrementally; nothing is published, since every derived event is already in the log.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bus.pull import Puller, delivery
from bus.streams import EVENTS_STREAM


@dataclass
class RebuildReport:
    """What a rebuild did."""

    events: int = 0
    seconds: float = 0.0
    last_seq: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "events": self.events,
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.rate, 1),
            "last_seq": self.last_seq,
            "failures": self.failures,
        }


async def rebuild(
    js: JetStreamContext,
    service: Any,
    *,
    batch: int = 4000,
    progress: Callable[[int, int], None] | None = None,
) -> RebuildReport:
    """Empty the read models of ``service`` and replay the whole log into them."""
    from handlers.service import LoggedItem

    report = RebuildReport()
    info = await js.stream_info(EVENTS_STREAM)
    report.last_seq = info.state.last_seq
    total = info.state.messages
    started = time.perf_counter()
    await asyncio.to_thread(service.reset)
    if progress:
        progress(0, total)
    if total == 0:
        return report
    name = f"rebuild-{uuid.uuid4().hex[:12]}"
    await js.add_consumer(
        EVENTS_STREAM,
        ConsumerConfig(
            name=name,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=60.0,
            max_waiting=1,
        ),
    )
    puller = Puller(js._nc, EVENTS_STREAM, name, batch=batch)
    await puller.start()
    try:
        seq = idle = 0
        while seq < report.last_seq:
            # The puller keeps a request open: the next batch arrives while this one is applied.
            msgs = await puller.fetch(timeout=2.0)
            if not msgs:
                idle += 1
                if idle >= 5:  # the log has nothing more for ten seconds (messages removed by their limits)
                    break
                continue
            idle = 0
            items: list[LoggedItem] = []
            for msg in msgs:
                seq, logged_at = delivery(msg)
                if seq > report.last_seq:
                    break
                try:
                    items.append(LoggedItem(seq, orjson.loads(msg.data), logged_at))
                except orjson.JSONDecodeError as exc:  # not an event (the live consumer dead-letters it): past it
                    await _apply(service, items, report)
                    report.events += len(items) + 1
                    items = []
                    report.failures.append({"seq": seq, "id": (msg.headers or {}).get("Nats-Msg-Id"),
                                            "error": f"unreadable: {exc}"})
                    await asyncio.to_thread(service.skip, seq)
            await _apply(service, items, report)
            report.events += len(items)
            if progress:
                progress(report.events, total)
    finally:
        await puller.stop()
        try:
            await js.delete_consumer(EVENTS_STREAM, name)
        except Exception:  # it expires by itself after inactive_threshold
            pass
    report.seconds = time.perf_counter() - started
    return report


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
