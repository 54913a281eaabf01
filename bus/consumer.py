"""Durable pull consumers over the event log, with retries and dead letters (CONTRACT §4).

Acknowledgement is explicit and chosen on purpose: an event is acked only after its effects are
committed, and the handlers record what they applied — and how far they have read the log — in
the same transaction. Events are applied strictly in log order, because the workflows' decisions
depend on it (a waitlist is the order of registrations). So a handler failure is retried in place,
with the consumer's backoff between deliveries, up to ``max_deliver`` deliveries; after that — or
at once for an event that can never be read — it is published to ``collab.dlq.{consumer}`` with
headers saying why, acked and skipped, so one poison event never stalls the rest. A database
outage is not the event's fault: the batch is held (the server is told the work is in progress)
and retried until the database answers.

The database, not the consumer's ack state, is the record of progress: on start, when the
durable consumer does not agree with it (a crash between commit and ack, a rebuilt database), the
consumer is recreated to continue right after the last applied sequence, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol, TypeVar

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from bus import deadletters
from bus.pull import Puller, delivery, pending_after
from bus.streams import EVENTS_STREAM
from handlers.busy import IN_THE_LOOP, locked_at_begin
from handlers.positions import PositionTaken
from ops import tracing

log = logging.getLogger("collabbus.consumer")

T = TypeVar("T")

WAIT_RETRY = 0.2
"""Seconds before an event whose applier asked to wait is tried again."""
PULL_EXPIRES = 5.0
"""Seconds a consumer's open pull request lasts before it is asked for again."""
PULL_HEARTBEAT = 1.0
TAKE_WARNING = 5.0
"""Seconds a consumer waits to take its position over before it says what it waits for."""
STALLED_AFTER = 10.0
"""Seconds a transaction holding the position (PostgreSQL) may have sat idle before a consumer
taking the position over ends it: a bus frozen in the middle of a batch (a live one's
transactions never wait between statements that long)."""
OVERTAKEN_PAUSE = 2.0
"""Seconds a consumer whose batch another process applied waits before it continues from the
database's position: a bus that lost its lease learns it meanwhile (it renews every second)."""


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
    claim_patience: float = 0.0
    """How long starting waits for another process's pull request on the consumer to go
    (:func:`claim_consumer`); 0: as long as one of a process that ended may last."""

    def config(self) -> ConsumerConfig:
        return ConsumerConfig(
            durable_name=self.name,
            description=f"collabbus consumer group {self.name}",
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.start_seq else DeliverPolicy.ALL,
            opt_start_seq=self.start_seq,
            # Batches are applied and acknowledged in log order, so one ack for the last event applied
            # stands for the ones before it: a batch costs one ack, not one per event.
            ack_policy=AckPolicy.ALL,
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
    if "ack_policy" in changed:
        # The server cannot change a consumer's ack policy: it is made again (it continues from
        # the database's position when it starts, see ``Consumer``).
        await js.delete_consumer(stream, settings.name)
        await js.add_consumer(stream, wanted)
    elif changed:
        await js.add_consumer(stream, wanted)
        for name in changed:
            log.warning("consumer %s: %s changed from %r to %r", settings.name, name, getattr(current, name), getattr(wanted, name))
    return changed


async def call_database(inline: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` (database work) in this thread when ``inline``, else in a worker thread.

    SQLite work is local and CPU-bound: in a worker thread it took turns for the interpreter
    with the event loop at every statement (the SQLite module lets go of it around each), and a
    batch took several times as long while offers were coming in. Inline it holds the loop for
    the batch and no longer. A database across the network (PostgreSQL) waits on the network
    instead: that wait belongs in a thread, where the loop goes on meanwhile.
    """
    if inline:  # waiting only briefly for another writer's lock (handlers.busy) ...
        waiting = IN_THE_LOOP.set(True)
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if not locked_at_begin(exc):
                raise
        finally:
            IN_THE_LOOP.reset(waiting)
        log.info("the read models' database is locked by another process: waiting for it outside the event loop")
    return await asyncio.to_thread(fn, *args, **kwargs)  # ... then as long as it takes, the loop going on


def _normal(value: object) -> object:
    return round(value, 3) if isinstance(value, float) else value


class Applier(Protocol):
    """The database side (``handlers.service.NetworkService``). ``take_position`` makes this
    process the one that applies the log (before the consumer starts, and when it starts over);
    ``apply_batch`` and ``skip`` then raise ``handlers.positions.PositionTaken`` when another
    process took it over since, or applied the log from where they start (nothing of theirs is
    written)."""

    def take_position(self) -> None: ...

    def apply_batch(self, items: Sequence[Any], *, live: bool = True, replay: bool = False) -> tuple[int, Any, int]: ...

    def skip(self, seq: int, envelope: Any = None) -> None: ...

    def position(self) -> int: ...


class ConsumerBusy(RuntimeError):
    """Another process pulls from the durable consumer this one was to run."""


async def claim_consumer(js: JetStreamContext, stream: str, name: str, *, patience: float, every: float = 0.3) -> None:
    """Return once no other process pulls from the durable consumer ``name`` (or it does not
    exist yet); raise :class:`ConsumerBusy` when one still does after ``patience`` seconds.

    One process applies a consumer's events: a second would take every other batch into a state
    of its own (and, finding its database elsewhere in the log, make the consumer again under the
    first). A running consumer keeps a pull request open (:class:`bus.pull.Puller`), which the
    server counts as waiting, or, while it works through a backlog, has messages delivered and not
    yet acknowledged, and moves on between two looks. Messages left unacknowledged by a process
    that stopped do not move; a pull request it left (its connection not closed) expires within
    ``patience``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    before: tuple[int, int] | None = None
    while True:
        try:
            info = await js.consumer_info(stream, name)
        except NotFoundError:
            return
        progress = (info.delivered.stream_seq if info.delivered else 0, info.ack_floor.stream_seq if info.ack_floor else 0)
        if not info.num_waiting and (not info.num_ack_pending or progress == before):
            return
        if before is None and info.num_waiting:
            log.info("consumer %s: another process pulls from it; waiting up to %g s for it to go", name, patience)
        if loop.time() >= deadline:
            raise ConsumerBusy(
                f"another process is applying the log's {name!r} consumer (it pulls from {stream} on this NATS): "
                "one bus applies the log — stop the other one first, or run `collabbus gate` beside it for more ingress"
            )
        before = progress
        await asyncio.sleep(every)


@dataclass
class Consumer:
    """Pulls batches from the log and hands them to ``apply`` (run in a worker thread)."""

    js: JetStreamContext
    settings: ConsumerSettings
    applier: Applier
    on_derived: Any = None  # called (no arguments) when a batch decided derived events
    on_applied: Any = None  # called with the last log sequence of each batch handled
    stream: str = EVENTS_STREAM
    db_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _task: asyncio.Task[None] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    applied: int = 0
    dead_lettered: int = 0
    may_apply: Callable[[], bool] | None = None
    """Asked before each batch is applied: whether this process still holds the log (its lease,
    ``bus.lease.Lease.fresh``); while it says no, the batch is held, as while the database is down."""
    trouble: str | None = None
    """Why it is holding events (the database cannot be written), while it is; ``/readyz`` says so."""
    _trouble_since: datetime | None = None
    retrying: str | None = None
    """Which event failed and waits to be tried again (holding back the ones after it), while it
    does; ``/ops/status`` says so."""
    _handling: bool = False
    _puller: Puller = field(init=False)
    _log_time: datetime | None = None
    """When the log took the last event handled."""
    _behind: int | None = None
    """How many events the log still held for this consumer past the last one handled (None: not
    known yet)."""
    inline: bool = False
    """Apply in the event loop's thread (SQLite, see :func:`call_database`) while the bus keeps up
    with the log. A batch of a quarter of the batch size or more means a backlog: then throughput counts,
    and in a worker thread SQLite's own work runs beside the loop's (the latency a thread costs
    matters less when events wait for earlier ones anyway)."""
    gather: float = 0.0
    """Seconds to let a batch that is not full grow before it is applied. For a consumer whose
    work does not wait on it (the webhooks' recorder): under a trickle of events it then runs a
    transaction for a few dozen of them instead of one for every one or two."""

    async def start(self) -> None:
        # (Before anything is changed: the consumer may be another process's, see there.)
        await claim_consumer(self.js, self.stream, self.settings.name,
                             patience=self.settings.claim_patience or PULL_EXPIRES + 2 * PULL_HEARTBEAT + 1.0)
        await ensure_consumer(self.js, self.settings, self.stream)
        await self._take_position()
        await self._continue_from_database()
        info = await self.js.consumer_info(self.stream, self.settings.name)
        self._behind, self._log_time = (info.num_pending or 0) + (info.num_ack_pending or 0), None
        await self._open_puller()
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"consumer-{self.settings.name}")

    async def _open_puller(self) -> None:
        self._puller = Puller(self.js._nc, self.stream, self.settings.name, batch=self.settings.batch,
                              expires=PULL_EXPIRES, heartbeat=PULL_HEARTBEAT)
        await self._puller.start()

    async def _continue_from_database(self) -> None:
        position = await call_database(self.inline, self.applier.position)
        info = await self.js.consumer_info(self.stream, self.settings.name)
        expected = position or max((self.settings.start_seq or 1) - 1, 0)
        acked = info.ack_floor.stream_seq if info.ack_floor and info.ack_floor.stream_seq else 0
        if info.num_ack_pending == 0 and acked == expected:
            return
        # Messages in flight past what was applied (read ahead, or delivered when the process
        # stopped) would come back only after their ack wait, behind newer ones: the consumer is
        # made again at the database's position, so the log is applied in order. That is routine;
        # the database and the consumer disagreeing about what was applied is worth a warning.
        level = logging.INFO if acked == expected else logging.WARNING
        log.log(
            level, "consumer %s: the database has applied the log up to #%d, the consumer acked up to #%s with %d in flight; "
            "continuing from #%d", self.settings.name, position, acked, info.num_ack_pending, expected + 1,
        )
        await self.js.delete_consumer(self.stream, self.settings.name)
        config = self.settings.config()
        start_seq = expected + 1
        config.deliver_policy, config.opt_start_seq = DeliverPolicy.BY_START_SEQUENCE, start_seq
        await self.js.add_consumer(self.stream, config)

    def timers_now(self) -> datetime | None:
        """The moment up to which timers may act on what this consumer applied: now, when it has
        applied everything logged; else when the log took the last event it handled, so that a
        deadline waits for the events logged before it (an application in time must not find its
        call closed by a timer that ran ahead of a backlog); None while that is not known yet."""
        now = datetime.now(timezone.utc)
        if self._behind == 0 and not self._handling and not self._puller.buffered:
            return now
        return min(now, self._log_time) if self._log_time is not None else None

    @property
    def running(self) -> bool:
        """Whether it is following the log (started, not stopped, not crashed)."""
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        """Finish the batch in hand, then stop (a pending wait for messages is abandoned at once)."""
        self._stopping.set()
        if self._task is not None:
            if not self._handling:
                self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._hand_back(await self._puller.stop())

    async def _run(self) -> None:
        # The puller keeps a pull request open, so what is logged while a batch is applied arrives
        # meanwhile and makes the next batch; a trickle is applied as it comes.
        while not self._stopping.is_set():
            msgs = await self._fetch()
            if not msgs:
                continue
            self._handling = True  # from here on, stopping waits for these messages to be applied or handed back
            try:
                if self.gather and len(msgs) < self.settings.batch:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), self.gather)
                    msgs += await self._puller.take(self.settings.batch - len(msgs))
                if self._stopping.is_set():
                    await self._hand_back(msgs)
                    return
                await self.handle(msgs)
            except PositionTaken as taken:
                await self._overtaken(taken, msgs)
            except Exception:  # a fault of the bus itself: the consumer must not end with it
                log.exception("consumer %s: a batch of %d events could not be handled; continuing from the database's position",
                              self.settings.name, len(msgs))
                await self._restart()
            finally:
                self._handling = False

    async def _restart(self) -> None:
        """Start over from what the database has applied, as after a restart of the process:
        whatever was received and not applied is handed back and delivered again in log order."""
        self._behind = None  # not known until a batch is handled again: timers keep to the last log time
        await self._hand_back(await self._puller.stop())
        while not self._stopping.is_set():
            if self.may_apply is not None and not self.may_apply():  # not while another bus may apply the log
                await asyncio.sleep(0.2)
                continue
            try:
                await self._take_position()
                await self._continue_from_database()
                await self._open_puller()
                return
            except Exception as exc:
                log.error("consumer %s: cannot continue yet: %r", self.settings.name, exc)
                await asyncio.sleep(1.0)

    async def _take_position(self) -> None:
        """Take the position over (``Applier.take_position``), saying so when that waits: a
        transaction of another process holds it — a bus stalled or frozen in the middle of a
        batch, whose batch is committed or undone once it goes on or its connection ends."""
        taking = asyncio.ensure_future(call_database(self.inline, self.applier.take_position))
        done, _ = await asyncio.wait({taking}, timeout=TAKE_WARNING)
        if not done:
            log.warning("consumer %s: waiting to take the read models' position over: a transaction of another process "
                        "holds it (a bus stalled in the middle of a batch?); this one goes on once that one ends, "
                        "or ends it once it has sat idle for %.0f s", self.settings.name, STALLED_AFTER)
        end_stalled: Callable[[float], list[int]] | None = getattr(self.applier, "end_stalled", None)
        while not done and end_stalled is not None:
            try:
                ended = await asyncio.to_thread(end_stalled, STALLED_AFTER)
            except Exception as exc:  # (not allowed to, say: it waits as before)
                log.warning("consumer %s: could not end the transaction holding the position: %r", self.settings.name, exc)
                break
            if ended:
                log.warning("consumer %s: ended the database session(s) %s of a process stalled in a transaction holding "
                            "the position (idle for over %.0f s): its batch is undone, and it applies nothing more",
                            self.settings.name, ", ".join(map(str, ended)), STALLED_AFTER)
            done, _ = await asyncio.wait({taking}, timeout=min(TAKE_WARNING, STALLED_AFTER))
        await taking

    async def _overtaken(self, taken: PositionTaken, msgs: list[Msg]) -> None:
        """Another process took over applying the log, or applied it past where the batch in hand
        starts (this bus held it while its lease lapsed and another took over): the batch was not
        applied. Hand it back, give a bus that lost its lease the time to learn it (its next
        renewal is refused and it stops), then — still holding its lease — continue from the
        database's position."""
        log.warning("consumer %s: %s; the batch was not applied: continuing from the database's position",
                    self.settings.name, taken)
        await self._hand_back(msgs)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), OVERTAKEN_PAUSE)
        if not self._stopping.is_set():
            await self._restart()

    async def _fetch(self) -> list[Msg]:
        """The next batch, or nothing (none within half a second, or the connection is in trouble)."""
        try:
            return await self._puller.fetch(timeout=0.5)
        except Exception as exc:  # connection trouble: nats-py reconnects; try again shortly
            if not self._stopping.is_set():
                log.warning("consumer %s: fetch failed: %r", self.settings.name, exc)
                await asyncio.sleep(0.5)
            return []

    async def _hand_back(self, msgs: list[Msg]) -> None:
        """Messages received and not applied (stopping): back to the server at once, so another
        bus process sharing the consumer gets them without waiting for their ack deadline (this
        process's next start continues from the database's position, see ``start``)."""
        for msg in msgs:
            with contextlib.suppress(Exception):
                await msg.nak()

    def _inline_for(self, items: list[Any]) -> bool:
        """See :attr:`inline`: a batch of a quarter of the batch size or more is a backlog."""
        return self.inline and len(items) < self.settings.batch // 4

    def _read_ahead(self) -> list[Msg]:
        """The messages received behind the batch in hand (they wait while that one is retried)."""
        return self._puller.buffered

    async def handle(self, msgs: list[Msg]) -> None:
        """Apply a batch in order; ack what was applied, retry a failure in place, then dead-letter it."""
        from handlers.service import Failure, LoggedItem, read_logged  # the port's value types; handlers never import nats

        pending = list(msgs)
        attempts = 0
        derived = 0
        while pending:
            items: list[LoggedItem] = []
            unreadable: Failure | None = None
            for msg in pending:
                try:
                    envelope = read_logged(msg.data)
                except orjson.JSONDecodeError as exc:
                    unreadable = Failure("JSONDecodeError", str(exc), permanent=True)
                    break
                seq, logged_at = delivery(msg)
                traceparent = msg.headers.get(tracing.TRACEPARENT) if msg.headers else None
                items.append(LoggedItem(seq, envelope, logged_at, traceparent))
            applied, failure, decided = (0, None, 0)
            if items:
                outcome = await self._apply_holding(pending, items, attempts)
                if outcome is None:  # stopping while the database is down: the messages were handed back
                    return
                applied, failure, decided = outcome
            else:
                failure = unreadable
            derived += decided
            failed_event = items[applied].envelope if applied < len(items) else None  # (None: the unreadable one)
            if applied:
                await pending[applied - 1].ack()  # acknowledges the ones before it too (AckPolicy.ALL)
            self.applied += applied
            if applied:
                attempts = 0
            pending = pending[applied:]
            if failure is None and applied == len(items) and unreadable is not None:
                failure = unreadable
            if failure is None:
                continue
            if failure.wait:  # not a failure of the event: held, then tried again, for as long as it takes
                if not await self._hold(pending, WAIT_RETRY):
                    return
                continue
            head = pending[0]
            attempts += 1
            deliveries = head.metadata.num_delivered + attempts - 1
            if failure.permanent or deliveries >= self.settings.max_deliver:
                await self.dead_letter(head, failure.error, failure.detail, deliveries, set_aside=failure.behind is not None,
                                       waits_for=failure.about)
                await call_database(self.inline, self.applier.skip, head.metadata.sequence.stream, failed_event)
                await head.ack()
                pending = pending[1:]
                attempts = 0
            else:
                seq = delivery(head)[0]
                self.retrying = (f"#{seq} failed {deliveries} of {self.settings.max_deliver} times ({failure.error}); "
                                 f"to be tried again at {datetime.now(timezone.utc) + timedelta(seconds=self.settings.delay(deliveries)):%H:%M:%S} UTC, "
                                 "the events after it wait")
                try:
                    if not await self._hold(pending, self.settings.delay(deliveries)):
                        return
                finally:
                    self.retrying = None
        if msgs:
            last_seq, self._log_time = delivery(msgs[-1])
            self._behind = pending_after(msgs[-1])
            if self.on_applied is not None:
                self.on_applied(last_seq)
        if derived and self.on_derived is not None:
            self.on_derived()

    async def _hold(self, msgs: list[Msg], seconds: float) -> bool:
        """Wait before a retry, telling the server the messages are still being worked on. False
        when the consumer is stopping meanwhile: the messages are handed back (stopping is no
        failed attempt of theirs)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        while not self._stopping.is_set():
            for msg in [*msgs, *self._read_ahead()]:
                await msg.in_progress()
            left = until - loop.time()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, self.settings.ack_wait / 3))
        await self._hand_back(msgs)
        return False

    async def _apply_holding(self, msgs: list[Msg], items: list[Any], attempts: int = 0) -> tuple[int, Any, int] | None:
        """Apply in a worker thread; while the database is unreachable, keep the batch in progress.
        ``attempts``: how many times the first of ``msgs`` failed already since it was delivered."""
        wait = 0.2
        deliveries = tracing.Deliveries(lambda seq: _delivery_number(msgs, items, attempts, seq), self.settings.max_deliver)
        while True:
            unleased = False
            async with self.db_lock:
                if self.may_apply is not None and not self.may_apply():
                    unleased = True  # (checked under the lock, right before the batch would be applied)
                    self._trouble_since = self._trouble_since or datetime.now(timezone.utc)
                    self.trouble = (f"holding events since {self._trouble_since:%H:%M:%S} UTC: this bus could not renew its "
                                    "lease on the log (is NATS reachable?)")
                else:
                    try:
                        with tracing.log_contexts(items, deliveries):  # the worker thread starts in this context
                            outcome = await call_database(self._inline_for(items), self.applier.apply_batch, items)
                        self.trouble = self._trouble_since = None
                        return outcome
                    except PositionTaken:
                        self.trouble = self._trouble_since = None
                        raise
                    except Exception as exc:
                        from handlers.db import in_a_line  # (the read models' errors are SQLAlchemy's: loaded by now)

                        self._trouble_since = self._trouble_since or datetime.now(timezone.utc)
                        self.trouble = f"holding events since {self._trouble_since:%H:%M:%S} UTC: {_first_line(exc)}"
                        log.error("consumer %s: database unavailable, holding %d events: %s", self.settings.name, len(msgs), in_a_line(exc))
            if self._stopping.is_set():
                for msg in msgs:
                    await msg.nak()
                return None
            for msg in [*msgs, *self._read_ahead()]:
                with contextlib.suppress(Exception):  # (NATS may be what is away)
                    await msg.in_progress()
            await asyncio.sleep(0.1 if unleased else wait)
            wait = wait if unleased else min(wait * 2, 10.0)

    async def dead_letter(self, msg: Msg, error: str, detail: str, deliveries: int | None = None, *, set_aside: bool = False,
                          waits_for: tuple[str, str] | None = None) -> None:
        """Publish ``msg`` to ``collab.dlq.{consumer}`` with the reason in its headers
        (``set_aside``: it waits behind an earlier dead letter about ``waits_for``, its own thing
        or one its workflow reads)."""
        meta = msg.metadata
        deliveries = deliveries or meta.num_delivered
        headers = dict(msg.headers or {})
        event_id = headers.pop("Nats-Msg-Id", None)
        headers.update(
            {
                "Nats-Msg-Id": f"dlq.{self.settings.name}.{meta.sequence.stream}.{deliveries}",
                deadletters.DLQ_ERROR: deadletters.header_value(error[:200]),
                deadletters.DLQ_DETAIL: deadletters.header_value(detail),
                deadletters.DLQ_CONSUMER: self.settings.name,
                deadletters.DLQ_DELIVERIES: str(deliveries),
                deadletters.DLQ_SUBJECT: msg.subject,
                deadletters.DLQ_STREAM_NAME: meta.stream,
                deadletters.DLQ_STREAM_SEQ: str(meta.sequence.stream),
                deadletters.DLQ_FAILED_AT: datetime.now(timezone.utc).isoformat(),
                **({deadletters.DLQ_EVENT_ID: deadletters.header_value(event_id)} if event_id else {}),
                **({deadletters.DLQ_WAITS_FOR: deadletters.header_value("/".join(waits_for))} if waits_for else {}),
            }
        )
        destination = f"collab.dlq.{self.settings.name}"
        with tracing.dead_letter_span(
            self.settings.name, _envelope(msg.data), meta.sequence.stream, (msg.headers or {}).get(tracing.TRACEPARENT), destination,
            event_id=event_id, deliveries=deliveries, error=error, reason=_reason(error, detail, set_aside),
        ) as context:
            headers.update(context)  # a replay continues the trace from the dead-lettering
            await self.js.publish(destination, msg.data, headers=headers, stream="COLLAB_DLQ")
        self.dead_lettered += 1
        if set_aside:
            log.warning("consumer %s: event #%s dead-lettered: %s", self.settings.name, meta.sequence.stream, detail,
                        extra={"event_id": event_id, "consumer": self.settings.name})
            return
        log.error(
            "consumer %s: event #%s dead-lettered after %d deliveries: %s", self.settings.name, meta.sequence.stream, deliveries, error,
            extra={"event_id": event_id, "consumer": self.settings.name},
        )


def _delivery_number(msgs: Sequence[Msg], items: Sequence[Any], attempts: int, seq: int) -> int | None:
    """Which delivery of the event at log sequence ``seq`` (one of ``items``, read from ``msgs``)
    an attempt at it is: the server's count, and the first message's failed attempts since it
    was delivered (retried in place)."""
    for index, item in enumerate(items):
        if item.seq == seq:
            return msgs[index].metadata.num_delivered + (attempts if index == 0 else 0)
    return None


def _envelope(data: bytes | None) -> dict[str, Any] | None:
    try:
        envelope = orjson.loads(data or b"")
    except orjson.JSONDecodeError:
        return None
    return envelope if isinstance(envelope, dict) else None


def _reason(error: str, detail: str, set_aside: bool) -> str:
    """Why an event is dead-lettered, in one line."""
    from ops.dlq import reason_of  # (read on the way to the dead-letter queue only)

    return detail.strip() if set_aside else reason_of(error, detail.splitlines())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


