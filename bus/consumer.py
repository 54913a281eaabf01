"""Durable pull consumers over the event log, with retries and dead letters (CONTRACT §4).

Acknowledgement is explicit and chosen on purpose: an event is acked only after its effects are
committed (the handlers record what they applied in the same transaction, so a crash between
commit and ack changes nothing on redelivery). A handler failure is nak'ed with the consumer's
backoff and redelivered up to ``max_deliver`` times; after that — or at once for an event that can
never be read — it is published to ``collab.dlq.{consumer}`` with headers saying why, and acked, so
one poison event never stalls the rest. A database outage is not the event's fault: the batch is
held (the server is told the work is in progress) and retried until the database answers.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import orjson
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus.streams import EVENTS_STREAM

log = logging.getLogger("collabbus.consumer")

# Dead-letter headers: what an operator needs at 3 a.m. to see what failed, where and why.
DLQ_ERROR = "Collabbus-Error"
DLQ_DETAIL = "Collabbus-Error-Detail"
DLQ_CONSUMER = "Collabbus-Consumer"
DLQ_DELIVERIES = "Collabbus-Deliveries"
DLQ_SUBJECT = "Collabbus-Original-Subject"
DLQ_STREAM_SEQ = "Collabbus-Original-Seq"
DLQ_STREAM_NAME = "Collabbus-Original-Stream"
DLQ_FAILED_AT = "Collabbus-Failed-At"


@dataclass(frozen=True)
class ConsumerSettings:
    """A consumer group's configuration, owned by the bus: a changed value takes effect on start."""

    name: str
    filter_subject: str = "collab.events.>"
    max_deliver: int = 5
    backoff: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)
    ack_wait: float = 60.0
    batch: int = 256
    max_ack_pending: int = 4096
    start_seq: int | None = None
    """Start at this log sequence instead of the beginning (a consumer added to an existing log)."""

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.name,
            description=f"collabbus consumer group {self.name}",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.start_seq else DeliverPolicy.ALL,
            opt_start_seq=self.start_seq,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_deliver=self.max_deliver,
            filter_subject=self.filter_subject,
            max_ack_pending=self.max_ack_pending,
        )

    def delay(self, deliveries: int) -> float:
        """Backoff before redelivery after the ``deliveries``-th failed attempt."""
        if not self.backoff:
            return 0.0
        return self.backoff[min(deliveries, len(self.backoff)) - 1]


_OWNED = ("ack_wait", "max_deliver", "filter_subject", "max_ack_pending", "ack_policy", "description")


async def ensure_consumer(js: JetStreamContext, settings: ConsumerSettings, stream: str = EVENTS_STREAM) -> list[str]:
    """Create the durable consumer, or bring an existing one to ``settings``; returns what changed.

    Re-declaring a durable consumer does not update it by itself: the differences are applied
    explicitly (create-or-update) and logged.
    """
    wanted = settings.config()
    try:
        current = (await js.consumer_info(stream, settings.name)).config
    except NotFoundError:
        await js.add_consumer(stream, wanted)
        return []
    changed = [name for name in _OWNED if _normal(getattr(current, name)) != _normal(getattr(wanted, name))]
    if changed:
        await js.add_consumer(stream, wanted)
        for name in changed:
            log.warning("consumer %s: %s changed from %r to %r", settings.name, name, getattr(current, name), getattr(wanted, name))
    return changed


def _normal(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else value


class Applier(Protocol):
    """The database side (``handlers.service.NetworkService``)."""

    def apply_batch(self, items: Sequence[Any], *, live: bool = True) -> tuple[list[Any], int]: ...


@dataclass
class Consumer:
    """Pulls batches from the log and hands them to ``apply`` (run in a worker thread)."""

    js: JetStreamContext
    settings: ConsumerSettings
    applier: Applier
    on_derived: Any = None  # called (no arguments) when a batch decided derived events
    stream: str = EVENTS_STREAM
    db_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task[None] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    applied: int = 0
    dead_lettered: int = 0

    async def start(self) -> None:
        await ensure_consumer(self.js, self.settings, self.stream)
        self._sub = await self.js.pull_subscribe_bind(self.settings.name, self.stream)
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.settings.name}")

    async def stop(self) -> None:
        """Finish the batch in hand, then stop."""
        self._stopping.set()
        if self._task is not None:
            await self._task
            self._task = None
        await self._sub.unsubscribe()

    async def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                msgs = await self._sub.fetch(self.settings.batch, timeout=0.5)
            except NatsTimeoutError:
                continue
            except Exception as exc:  # connection trouble: nats-py reconnects; try again shortly
                if self._stopping.is_set():
                    return
                log.warning("consumer %s: fetch failed: %s", self.settings.name, exc)
                await asyncio.sleep(0.5)
                continue
            await self.handle(msgs)

    async def handle(self, msgs: list[Msg]) -> None:
        """Apply a batch, then ack, nak or dead-letter each message."""
        from handlers.service import Failure, LoggedItem  # the port's value types; handlers never import nats

        failures: list[Any] = [None] * len(msgs)
        readable: list[int] = []
        items: list[LoggedItem] = []
        for index, msg in enumerate(msgs):
            meta = msg.metadata
            try:
                envelope = orjson.loads(msg.data)
            except orjson.JSONDecodeError as exc:
                failures[index] = Failure("JSONDecodeError", str(exc), permanent=True)
                continue
            logged_at = meta.timestamp if meta.timestamp.tzinfo else meta.timestamp.replace(tzinfo=timezone.utc)
            readable.append(index)
            items.append(LoggedItem(meta.sequence.stream, envelope, logged_at))
        outcome = await self._apply_holding(msgs, items)
        if outcome is None:  # stopping while the database is down: the messages were handed back
            return
        results, derived = outcome
        for index, failure in zip(readable, results):
            failures[index] = failure
        for msg, failure in zip(msgs, failures):
            if failure is None:
                await msg.ack()
                self.applied += 1
                continue
            deliveries = msg.metadata.num_delivered
            if failure.permanent or deliveries >= self.settings.max_deliver:
                await self.dead_letter(msg, failure.error, failure.detail)
                await msg.ack()
            else:
                await msg.nak(delay=self.settings.delay(deliveries))
        if derived and self.on_derived is not None:
            self.on_derived()

    async def _apply_holding(self, msgs: list[Msg], items: list[Any]) -> tuple[list[Any], int] | None:
        """Apply in a worker thread; while the database is unreachable, keep the batch in progress."""
        wait = 0.2
        while True:
            async with self.db_lock:
                try:
                    return await asyncio.to_thread(self.applier.apply_batch, items)
                except Exception as exc:
                    log.error("consumer %s: database unavailable, holding %d events: %s", self.settings.name, len(msgs), exc)
            if self._stopping.is_set():
                for msg in msgs:
                    await msg.nak()
                return None
            for msg in msgs:
                await msg.in_progress()
            await asyncio.sleep(wait)
            wait = min(wait * 2, 10.0)

    async def dead_letter(self, msg: Msg, error: str, detail: str) -> None:
        """Publish ``msg`` to ``collab.dlq.{consumer}`` with the reason in its headers."""
        meta = msg.metadata
        headers = dict(msg.headers or {})
        headers.pop("Nats-Msg-Id", None)
        headers.update(
            {
                "Nats-Msg-Id": f"dlq.{self.settings.name}.{meta.sequence.stream}.{meta.num_delivered}",
                DLQ_ERROR: error[:200],
                DLQ_DETAIL: _header_text(detail),
                DLQ_CONSUMER: self.settings.name,
                DLQ_DELIVERIES: str(meta.num_delivered),
                DLQ_SUBJECT: msg.subject,
                DLQ_STREAM_NAME: meta.stream,
                DLQ_STREAM_SEQ: str(meta.sequence.stream),
                DLQ_FAILED_AT: datetime.now(timezone.utc).isoformat(),
            }
        )
        await self.js.publish(f"collab.dlq.{self.settings.name}", msg.data, headers=headers, stream="COLLAB_DLQ")
        self.dead_lettered += 1
        log.error("consumer %s: event #%s dead-lettered after %d deliveries: %s", self.settings.name, meta.sequence.stream, meta.num_delivered, error)


def _header_text(text: str) -> str:
    """Header values are one line of printable text."""
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())[-1500:]
