"""Webhook delivery (CONTRACT §7): what is owed is recorded from the log, then sent by workers.

Two halves, joined by the database:

- :class:`DeliveryRecorder` is the applier of the durable consumer ``webhooks``: for each logged
  event it records one delivery per enabled endpoint that asked for it and may see it, in the
  same transaction as its position. Nothing owed is forgotten across restarts; a replay or a
  redelivery adds nothing (one delivery per endpoint and event).
- :class:`EndpointWorker` — one per enabled endpoint, each with its own bounded queue, its own
  connections and a few concurrent attempts — sends what is due. A slow or dead endpoint holds
  only its own worker, never another endpoint's deliveries.

Attempts follow the retry schedule; the time of the next attempt is in the database, written
*before* each attempt (as if it were going to fail) and corrected after it, so a restart — even
a crash in the middle of a request — loses nothing and sends nothing earlier than the schedule.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Generic, TypeVar

import httpx
import orjson
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from sqlalchemy import Engine
from sqlmodel import Session, select

from bus.consumer import Consumer, ConsumerSettings
from bus.streams import EVENTS_STREAM, EVENTS_SUBJECTS
from connectors.webhooks import store, targets
from connectors.webhooks.signing import signature_header
from connectors.webhooks.store import Attempt, Delivery, Endpoint
from handlers.db import reading, session_scope
from handlers.service import Failure, LoggedItem
from ops import tracing as traces
from ops.settings import Settings
from ops.tracing import Tracing
from schemas.envelope import STRUCTURED_CONTENT_TYPE

Item = TypeVar("Item")
Result = TypeVar("Result")

log = logging.getLogger("collabbus.webhooks")

WEBHOOKS_CONSUMER = "webhooks"
TIMEOUT = 15.0
"""Seconds a delivery request may take (CONTRACT §7)."""
FAILING_LIMIT = timedelta(days=5)
"""An endpoint failing without a success for this long is disabled."""
RESPONSE_KEPT = 1024
JITTER = 0.2
RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})


def webhook_consumer(network: ConsumerSettings) -> ConsumerSettings:
    """The webhooks consumer's settings: the network consumer's, under a name of its own
    (``webhooks`` beside ``network``; beside another name — tests sharing a server — derived from it)."""
    name = WEBHOOKS_CONSUMER if network.name == "network" else f"{network.name}-webhooks"
    return replace(network, name=name)


# --- the schedule and what an attempt came to -------------------------------------------------


@dataclass(frozen=True)
class RetrySchedule:
    """Seconds before each attempt (``COLLABBUS_WEBHOOK_RETRY_SCHEDULE``): the first counts from
    the moment the event is recorded, each later one from the end of the failed attempt before it,
    with ±20 % jitter so that endpoints coming back are not hit by every retry at once."""

    delays: tuple[float, ...]
    rng: random.Random = field(default_factory=random.Random)

    @property
    def attempts(self) -> int:
        return len(self.delays)

    def first(self) -> timedelta:
        return timedelta(seconds=self.delays[0] if self.delays else 0.0)

    def after(self, attempts_made: int) -> float | None:
        """Seconds between the ``attempts_made``-th attempt and the next; None after the last."""
        if attempts_made >= len(self.delays):
            return None
        return self.delays[attempts_made] * self.rng.uniform(1 - JITTER, 1 + JITTER)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now``: delay-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return max(0.0, (moment - now).total_seconds())


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    response: str | None = None
    retry_after: float | None = None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class Claim:
    """A delivery taken in hand for one attempt, with what is needed to make it."""

    delivery_id: int
    endpoint_id: str
    event_id: str
    seq: int
    url: str
    secrets: tuple[str, ...]
    retry_in: float | None
    """Seconds before the next attempt should this one fail; None: it is the last."""


# --- recording what is owed ---------------------------------------------------------------------


class _Unrecordable(Exception):
    """The event at ``index`` of a batch could not be recorded."""

    def __init__(self, index: int, failure: Failure) -> None:
        super().__init__(failure.error)
        self.index = index
        self.failure = failure


class DeliveryRecorder:
    """The applier of the webhooks consumer (the port ``bus.consumer.Applier``).

    ``apply_batch`` answers, in place of derived events, how many deliveries it recorded; the
    endpoints concerned are in :attr:`touched` for the dispatcher to wake.
    """

    def __init__(self, engine: Engine, consumer: str, schedule: RetrySchedule, tracing: Tracing | None = None) -> None:
        self.engine = engine
        self.consumer = consumer
        self.schedule = schedule
        self.tracing = tracing or Tracing.off()
        self.touched: set[str] = set()

    def apply_batch(self, items: Sequence[LoggedItem], *, live: bool = True) -> tuple[int, Failure | None, int]:
        """Record what each event owes, in log order, in one transaction with the position.

        The batch is recorded straight through; an event that cannot be recorded rolls the batch
        back, the events before it are recorded again and committed, and it is reported (the
        consumer retries it, then dead-letters it).
        """
        end, failure = len(items), None
        due_at = datetime.now(timezone.utc) + self.schedule.first()
        while end:
            try:
                with session_scope(self.engine) as session:
                    endpoints = session.exec(select(Endpoint).where(Endpoint.enabled == True)).all()  # noqa: E712
                    recorded = 0
                    for index, item in enumerate(items[:end]):
                        try:
                            recorded += self._record(session, endpoints, item, due_at)
                        except Exception as exc:
                            raise _Unrecordable(index, Failure(type(exc).__name__, str(exc)[:2000], permanent=False)) from exc
                    store.advance(session, self.consumer, items[end - 1].seq)
                return end, failure, recorded
            except _Unrecordable as unrecordable:
                end, failure = unrecordable.index, unrecordable.failure
        return 0, failure, 0

    def _record(self, session: Session, endpoints: Sequence[Endpoint], item: LoggedItem, due_at: datetime) -> int:
        envelope = item.envelope
        store.note_parties(session, envelope)
        wanted = [e for e in endpoints if e.after_seq < item.seq and store.matches(e.event_types, str(envelope.get("type")))]
        if not wanted:
            return 0
        # A span only for events owed somewhere: one no endpoint asked for is no part of its trace.
        with traces.consume_span(self.consumer, envelope, item.seq, item.traceparent, tracing=self.tracing):
            allowed = store.audience(session, envelope)
            ids = [e.id for e in wanted if allowed is None or e.institution in allowed]
            self.touched.update(ids)
            return store.owe(session, ids, envelope, item.seq, due_at)

    def skip(self, seq: int) -> None:
        with session_scope(self.engine) as session:
            store.advance(session, self.consumer, seq)

    def position(self) -> int:
        with Session(reading(self.engine)) as session:
            return store.position(session, self.consumer)


# --- sending ------------------------------------------------------------------------------------


class Batched(Generic[Item, Result]):
    """Calls ``work`` in a worker thread with every item asked for meanwhile, in one go; each
    caller gets its own item's result (or the exception, which fails the whole batch)."""

    def __init__(self, work: Callable[[list[Item]], list[Result]], lock: asyncio.Lock, most: int = 256) -> None:
        self.work = work
        self.lock = lock
        """The bus's writers take turns in the process rather than in SQLite's busy handler, which
        sleeps in growing steps while it waits."""
        self.most = most
        self._waiting: list[tuple[Item, asyncio.Future[Result]]] = []
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting[: self.most], self._waiting[self.most:]
            try:
                async with self.lock:
                    results = await asyncio.to_thread(self.work, [item for item, _ in batch])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


class EndpointWorker:
    """Sends one endpoint's due deliveries: a feeder fills a bounded queue from the database, and
    ``concurrency`` senders take from it."""

    def __init__(self, dispatcher: "WebhookDispatcher", endpoint_id: str, *, concurrency: int, queue_size: int) -> None:
        self.dispatcher = dispatcher
        self.endpoint_id = endpoint_id
        self.queue: asyncio.Queue[int | None] = asyncio.Queue(queue_size)
        self.held: set[int] = set()
        """Deliveries queued or being attempted here."""
        self.wake = asyncio.Event()
        self._backlog = False
        """The last read filled the queue: more may be due as soon as a sender is free."""
        self.client = httpx.AsyncClient(
            follow_redirects=False, timeout=dispatcher.timeout, limits=httpx.Limits(max_connections=concurrency),
        )
        dispatcher.tracing.instrument_httpx(self.client)  # a client span per attempt, its traceparent sent
        self._feeder = asyncio.create_task(self._feed(), name=f"webhooks-feed-{endpoint_id}")
        self._senders = [asyncio.create_task(self._send(), name=f"webhooks-send-{endpoint_id}") for _ in range(concurrency)]

    async def _feed(self) -> None:
        while True:
            self.wake.clear()
            free = self.queue.maxsize - self.queue.qsize()
            wait = self.dispatcher.poll
            if free > 0:
                try:
                    ready, next_due = await asyncio.to_thread(self.dispatcher.due, self.endpoint_id, set(self.held), free)
                except Exception as exc:
                    log.warning("webhooks: cannot read the deliveries of %s: %s", self.endpoint_id, exc)
                    ready, next_due = [], None
                for delivery_id in ready:
                    self.held.add(delivery_id)
                    self.queue.put_nowait(delivery_id)
                self._backlog = len(ready) == free
                if not self._backlog and next_due is not None:
                    wait = min(wait, max(0.0, (next_due - datetime.now(timezone.utc)).total_seconds()))
            try:
                await asyncio.wait_for(self.wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def _send(self) -> None:
        while (delivery_id := await self.queue.get()) is not None:
            owed = True
            try:
                owed = await self.dispatcher.attempt(self.client, delivery_id)
            except Exception:
                log.exception("webhooks: delivery %s to %s failed unexpectedly", delivery_id, self.endpoint_id)
            finally:
                self.held.discard(delivery_id)
                if owed or self._backlog:  # the feeder learns when the retry is due, or fills the queue up
                    self.wake.set()

    async def stop(self, grace: float) -> None:
        """Stop taking deliveries; attempts under way get ``grace`` seconds, then are interrupted
        (recorded as such; the schedule already holds their next attempt)."""
        self._feeder.cancel()
        while not self.queue.empty():
            self.queue.get_nowait()
        for _ in self._senders:
            self.queue.put_nowait(None)
        _, late = await asyncio.wait([self._feeder, *self._senders], timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(self._feeder, *self._senders, return_exceptions=True)
        await self.client.aclose()


class WebhookDispatcher:
    """The webhooks consumer and one :class:`EndpointWorker` per enabled endpoint."""

    def __init__(
        self,
        engine: Engine,
        js: JetStreamContext,
        settings: Settings,
        *,
        consumer_settings: ConsumerSettings | None = None,
        timeout: float = TIMEOUT,
        concurrency: int = 4,
        queue_size: int = 64,
        failing_limit: timedelta = FAILING_LIMIT,
        poll: float = 5.0,
        db_lock: asyncio.Lock | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.engine = engine
        self.tracing = tracing or Tracing.off()
        self.js = js
        self.allow = targets.networks(settings.webhook_allow_networks)
        self.schedule = RetrySchedule(tuple(settings.webhook_retry_schedule) or (0.0,))
        self.timeout = timeout
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.failing_limit = failing_limit
        self.poll = poll
        consumer_settings = consumer_settings or ConsumerSettings(WEBHOOKS_CONSUMER)
        self.recorder = DeliveryRecorder(engine, consumer_settings.name, self.schedule, self.tracing)
        self.db_lock = db_lock or asyncio.Lock()
        self.consumer = Consumer(js, consumer_settings, self.recorder, on_derived=self._recorded, db_lock=self.db_lock)
        self.workers: dict[str, EndpointWorker] = {}
        self._bodies: OrderedDict[int, tuple[bytes, str | None]] = OrderedDict()
        self._retiring: set[asyncio.Task[None]] = set()
        # Every sender's claim and record go to the database together: one transaction for all
        # that are waiting, not one each.
        self._claims: Batched[int, Claim | None] = Batched(self._claim_all, self.db_lock)
        self._settles: Batched[tuple[Claim, Outcome], tuple[bool, bool]] = Batched(self._settle_all, self.db_lock)

    async def start(self) -> None:
        """Start a worker for every enabled endpoint (what was owed before a restart is sent on
        schedule), then follow the log."""
        with Session(reading(self.engine)) as session:
            enabled = session.exec(select(Endpoint.id).where(Endpoint.enabled == True)).all()  # noqa: E712
        for endpoint_id in enabled:
            self._worker(endpoint_id)
        await self.consumer.start()

    async def stop(self) -> None:
        await self.consumer.stop()
        workers, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(worker.stop(grace=min(self.timeout, 5.0)) for worker in workers))

    def _worker(self, endpoint_id: str) -> EndpointWorker:
        worker = self.workers.get(endpoint_id)
        if worker is None:
            worker = self.workers[endpoint_id] = EndpointWorker(
                self, endpoint_id, concurrency=self.concurrency, queue_size=self.queue_size
            )
        return worker

    def _recorded(self) -> None:
        touched, self.recorder.touched = self.recorder.touched, set()
        for endpoint_id in touched:
            self.wake(endpoint_id)

    def wake(self, endpoint_id: str) -> None:
        """Something may be due for the endpoint."""
        worker = self.workers.get(endpoint_id)
        if worker is not None:
            worker.wake.set()

    async def endpoint_changed(self, endpoint_id: str, enabled: bool) -> None:
        """An endpoint was created, enabled, disabled or deleted: run its worker or stop it."""
        if enabled:
            self._worker(endpoint_id).wake.set()
        elif (worker := self.workers.pop(endpoint_id, None)) is not None:
            await worker.stop(grace=0)

    # --- one attempt ----------------------------------------------------------------------------

    def due(self, endpoint_id: str, held: set[int], limit: int) -> tuple[list[int], datetime | None]:
        with Session(reading(self.engine)) as session:
            return store.due(session, endpoint_id, datetime.now(timezone.utc), held=held, limit=limit)

    async def attempt(self, client: httpx.AsyncClient, delivery_id: int) -> bool:
        """Make one attempt of a due delivery and record it; True while the delivery is still owed."""
        claim = await self._claims(delivery_id)
        if claim is None:
            return False
        try:
            outcome = await self._post(client, claim)
        except asyncio.CancelledError:
            interrupted = Outcome(None, 0, "interrupted: the bus stopped during the attempt")
            await asyncio.shield(asyncio.to_thread(self._settle, claim, interrupted))
            raise
        owed, disabled = await self._settles((claim, outcome))
        if disabled:
            log.warning("webhooks: endpoint %s disabled", claim.endpoint_id)
            task = asyncio.get_running_loop().create_task(self.endpoint_changed(claim.endpoint_id, False))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return owed

    def _claim_all(self, delivery_ids: Sequence[int]) -> list[Claim | None]:
        """Claim deliveries for attempts, in one transaction."""
        now = datetime.now(timezone.utc)
        with session_scope(self.engine) as session:
            return [self._claim_in(session, delivery_id, now) for delivery_id in delivery_ids]

    def _claim_in(self, session: Session, delivery_id: int, now: datetime) -> Claim | None:
        """Take a due delivery for an attempt, with the time of the next one already recorded."""
        delivery = session.exec(select(Delivery).where(Delivery.id == delivery_id).with_for_update()).first()
        if delivery is None or delivery.next_attempt_at is None or delivery.next_attempt_at > now:
            return None  # delivered, resent or taken meanwhile
        endpoint = session.get(Endpoint, delivery.endpoint_id)
        if endpoint is None or not endpoint.enabled:
            return None
        if delivery.attempts >= self.schedule.attempts:  # the last attempt was cut short by a crash
            delivery.status, delivery.next_attempt_at = store.FAILED, None
            session.add(Attempt(delivery_id=delivery_id, attempted_at=now, error="interrupted: the bus stopped during the last attempt"))
            return None
        delivery.attempts += 1
        retry_in = self.schedule.after(delivery.attempts)
        # Should this attempt never report (a crash), the next one comes no earlier than planned.
        delivery.next_attempt_at = now + timedelta(seconds=self.timeout + (retry_in or 0.0) + 1.0)
        session.add(delivery)
        return Claim(
            delivery_id, endpoint.id, delivery.event_id, delivery.seq, endpoint.url, endpoint.signing_secrets(now), retry_in
        )

    def _settle(self, claim: Claim, outcome: Outcome) -> tuple[bool, bool]:
        return self._settle_all([(claim, outcome)])[0]

    def _settle_all(self, settled: Sequence[tuple[Claim, Outcome]]) -> list[tuple[bool, bool]]:
        """Record attempts, in one transaction."""
        now = datetime.now(timezone.utc)
        with session_scope(self.engine) as session:
            return [self._settle_in(session, claim, outcome, now) for claim, outcome in settled]

    def _settle_in(self, session: Session, claim: Claim, outcome: Outcome, now: datetime) -> tuple[bool, bool]:
        """Record the attempt and what follows from it: whether the delivery is still owed, and
        whether the endpoint got disabled."""
        delivery = session.get(Delivery, claim.delivery_id)
        endpoint = session.get(Endpoint, claim.endpoint_id)
        if delivery is None or endpoint is None:  # deleted meanwhile
            return False, False
        session.add(
            Attempt(
                delivery_id=claim.delivery_id, attempted_at=now - timedelta(milliseconds=outcome.latency_ms),
                status_code=outcome.status_code, latency_ms=outcome.latency_ms,
                error=outcome.error[:500] if outcome.error else None, response=outcome.response,
            )
        )
        if outcome.delivered:
            delivery.status, delivery.delivered_at, delivery.next_attempt_at = store.DELIVERED, now, None
            endpoint.last_success_at, endpoint.failing_since = now, None
            return False, False
        endpoint.failing_since = endpoint.failing_since or now
        if claim.retry_in is None or outcome.status_code == 410:
            delivery.status, delivery.next_attempt_at = store.FAILED, None
        else:
            delay = max(claim.retry_in, outcome.retry_after or 0.0)
            delivery.next_attempt_at = now + timedelta(seconds=delay)
        if outcome.status_code == 410:
            store.disable(endpoint, "the endpoint answered 410 Gone", now)
        elif endpoint.enabled and now - endpoint.failing_since >= self.failing_limit:
            days = self.failing_limit / timedelta(days=1)
            store.disable(endpoint, f"no successful delivery for {days:g} days", now)
        return delivery.next_attempt_at is not None, not endpoint.enabled

    async def _post(self, client: httpx.AsyncClient, claim: Claim) -> Outcome:
        """POST the event to the endpoint, signed; never raises for the endpoint's faults."""
        started = time.perf_counter()

        def elapsed() -> int:
            return round((time.perf_counter() - started) * 1000)

        try:
            target = await targets.resolve(claim.url, self.allow)
        except targets.RefusedTarget as exc:
            return Outcome(None, elapsed(), f"refused: {exc}")
        try:
            body, traceparent = await self._event(claim.seq)
        except Exception as exc:
            return Outcome(None, elapsed(), f"the event could not be read from the log: {exc!r}")
        timestamp = int(time.time())
        headers = {
            "host": target.host,
            "content-type": STRUCTURED_CONTENT_TYPE,
            "user-agent": "collabbus-webhooks",
            "webhook-id": claim.event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": signature_header(claim.secrets, claim.event_id, timestamp, body),
            **({"traceparent": traceparent} if traceparent else {}),
        }
        extensions = {"sni_hostname": target.sni} if target.sni else {}
        started = time.perf_counter()
        try:
            # The attempt continues the event's trace from its log message (the gatekeeper's publish).
            async with asyncio.timeout(self.timeout):
                with traces.continued(traceparent):
                    async with client.stream("POST", target.url, content=body, headers=headers, extensions=extensions) as response:
                        kept = bytearray()
                        async for chunk in response.aiter_raw():
                            kept += chunk
                            if len(kept) >= RESPONSE_KEPT:
                                break
        except (TimeoutError, httpx.TimeoutException):
            return Outcome(None, elapsed(), f"no answer within {self.timeout:g} s")
        except httpx.HTTPError as exc:
            return Outcome(None, elapsed(), f"{type(exc).__name__}: {exc}")
        status = response.status_code
        error = None
        if not 200 <= status < 300:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
        retry_after = None
        if status in RETRY_AFTER_STATUSES:
            retry_after = retry_after_seconds(response.headers.get("retry-after"), datetime.now(timezone.utc))
        text = bytes(kept[:RESPONSE_KEPT]).decode("utf-8", "replace")
        return Outcome(status, elapsed(), error, text, retry_after)

    async def _event(self, seq: int) -> tuple[bytes, str | None]:
        """The event's canonical bytes from the log, and the trace context to deliver it in: the
        log message's (the gatekeeper's publish), else the envelope's own ``traceparent`` (recent
        ones cached: every endpoint receives the same event at about the same time)."""
        cached = self._bodies.get(seq)
        if cached is None:
            msg = await self.js.get_msg(EVENTS_STREAM, seq=seq)
            body = msg.data or b""
            traceparent = (msg.headers or {}).get(traces.TRACEPARENT) or orjson.loads(body).get("traceparent")
            cached = self._bodies[seq] = (body, traceparent if isinstance(traceparent, str) else None)
            while len(self._bodies) > 256:
                self._bodies.popitem(last=False)
        return cached


# --- recovery ----------------------------------------------------------------------------------


async def recover(js: JetStreamContext, engine: Engine, endpoint: Endpoint, since: datetime, until: datetime) -> int:
    """Owe the endpoint again every event it asked for (and may see) that the log took between
    ``since`` and ``until``, delivered before or not; returns how many. Who may see a
    confidential event is judged by the validation's parties as they are now."""
    events = [
        (seq, envelope)
        async for seq, envelope in logged_between(js, since, until)
        if store.matches(endpoint.event_types, str(envelope.get("type")))
    ]

    def owe_again() -> int:
        with session_scope(engine) as session:
            visible = [
                (seq, envelope) for seq, envelope in events
                if (allowed := store.audience(session, envelope)) is None or endpoint.institution in allowed
            ]
            return store.owe_again(session, endpoint.id, visible, datetime.now(timezone.utc))

    return await asyncio.to_thread(owe_again)


async def logged_between(js: JetStreamContext, since: datetime, until: datetime) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(seq, envelope) of the events the log took from ``since`` to ``until``, in order."""
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    if last == 0 or since > until:
        return
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since)
    sub = await js.subscribe(EVENTS_SUBJECTS, ordered_consumer=True, config=config, stream=EVENTS_STREAM)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=1.0)
            except NatsTimeoutError:
                return  # nothing logged since then
            meta = msg.metadata
            logged_at = meta.timestamp if meta.timestamp.tzinfo else meta.timestamp.replace(tzinfo=timezone.utc)
            if logged_at > until:
                return
            yield meta.sequence.stream, orjson.loads(msg.data)
            if meta.sequence.stream >= last or meta.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()
