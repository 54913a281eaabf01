"""Webhook delivery (CONTRACT §7): what is owed is recorded from the log, then sent by workers.

Two halves, joined by the database:

- :class:`DeliveryRecorder` is the applier of the durable consumer ``webhooks``: for each logged
  event it records one delivery per endpoint that is owed it (by where it is in the log:
  ``store.owes``), asked for it and may see it, in the same transaction as its position. Nothing
  owed is forgotten across restarts; a replay or a redelivery adds nothing (one delivery per
  endpoint and event).
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
import re
import ssl
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
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import Connection, Engine
from sqlmodel import Session, select

from bus.consumer import Consumer, ConsumerSettings
from bus.log import readable
from bus.streams import EVENTS_STREAM, EVENTS_SUBJECTS
from connectors.webhooks import http, store, targets
from connectors.webhooks.signing import signature_header
from connectors.webhooks.store import Endpoint
from handlers.bookkeeping import ConsumerPosition, SetAside, aggregate_of, backend_pid, end_stalled, parked, read_position
from handlers.db import database_unavailable, reading, session_scope
from handlers.service import PARKED, Failure, LoggedItem
from handlers.audience import CONFIDENTIAL, audience
from ops import tracing as traces
from ops.settings import Settings
from ops.tracing import Tracing
from schemas.envelope import STRUCTURED_CONTENT_TYPE

Item = TypeVar("Item")
_Work = tuple[str, Any]
"""``("claim", (endpoint_id, limit))`` or ``("settle", (claim, outcome))``."""
Result = TypeVar("Result")

log = logging.getLogger("collabbus.webhooks")

WEBHOOKS_CONSUMER = "webhooks"
TIMEOUT = 15.0
"""Seconds a delivery request may take (CONTRACT §7)."""
_NETWORK_POSITIONS = ConsumerPosition.__table__  # type: ignore[attr-defined]
RECORD_GATHER = 0.05
"""Seconds the webhooks consumer lets a batch grow before recording what it owes: a delivery
starts at most this much later, and a trickle of events costs a transaction per few dozen."""
FAILING_LIMIT = timedelta(days=5)
"""An endpoint failing without a success for this long is disabled: a run of failures, each at
most :meth:`WebhookDispatcher.failing_gap` after the one before it."""
PRUNE_EVERY = 3600.0
"""Seconds between two removals of the settled deliveries older than the retention (the first a
minute after the start: not in the way of a bus starting)."""
RESPONSE_KEPT = 1024
RESPONSE_LOGGED = 200
"""Characters of an endpoint's answer quoted in the log line of a failed attempt (on one line)."""
JITTER = 0.2
RETRY_AFTER_STATUSES = frozenset({429, 502, 503, 504})
TRACEPARENT_FORM = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
SEQUENCE_HEADER = "collabbus-sequence"
"""The delivered event's sequence in the network's log (as ``GET /events`` gives it)."""


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


RETRY_AFTER_MOST = 86_400.0
"""The longest ``Retry-After`` honoured (a day, the default schedule's longest pause): an
endpoint asking for more is tried again after that."""


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from ``now`` (at most :data:`RETRY_AFTER_MOST`): delay-seconds or
    an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), RETRY_AFTER_MOST)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return min(max(0.0, (moment - now).total_seconds()), RETRY_AFTER_MOST)


@dataclass(frozen=True)
class Outcome:
    """What one attempt came to. Its texts come from the receiver (its body, a header quoted in
    the error) and are kept: a NUL character in them, which PostgreSQL's text cannot hold (a
    binary body, say), reads as U+FFFD, as bytes that are not UTF-8 do."""

    status_code: int | None
    latency_ms: int
    error: str | None = None
    response: str | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        for name in ("error", "response"):
            text = getattr(self, name)
            if text is not None and "\x00" in text:
                object.__setattr__(self, name, text.replace("\x00", "\ufffd"))

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
    attempts_before: int = 0
    due_at: datetime | None = None
    """The delivery's attempts and next attempt before the claim (to give it back unattempted)."""
    lease: datetime | None = None
    """The next attempt the claim wrote (no earlier than this attempt's end). The attempt's outcome
    changes the delivery only while it still says so: a delivery given up (``cancel``) or sent again
    (``resend``, ``recover``) while its attempt was under way keeps what its owner asked for (a
    success marks a given-up delivery delivered; one sent again goes again)."""


# --- recording what is owed ---------------------------------------------------------------------


class _Unrecordable(Exception):
    """The event at ``index`` of a batch could not be recorded."""

    def __init__(self, index: int, failure: Failure) -> None:
        super().__init__(failure.error)
        self.index = index
        self.failure = failure


@dataclass(frozen=True)
class _Wanting:
    """What the recorder needs of an endpoint that may be owed events (:data:`store.ENDPOINTS_OWING`)."""

    id: str
    institution: str
    event_types: list[str]
    after_seq: int
    enabled: bool
    disabled_after_seq: int | None
    enabled_after_seq: int | None
    earlier_gaps: list[list[int]]

    def owes(self, seq: int) -> bool:
        return store.owes(self.after_seq, self.disabled_after_seq, self.enabled_after_seq, self.earlier_gaps, seq)


class _Batch:
    """The state of recording one batch: its transaction, the endpoints that may be owed its
    events (and which want each type met so far), and how far the read models have applied the
    log (read when needed)."""

    def __init__(self, session: Session, endpoints: list[_Wanting], network_consumer: str, consumer: str) -> None:
        self.session = session
        self.consumer = consumer
        """The webhooks consumer recording the batch."""
        self.endpoints = endpoints
        self._by_type: dict[str, list[_Wanting]] = {}
        self.network_consumer = network_consumer
        self._applied: int | None = None

    def applied(self) -> int:
        """The read models' position (the network consumer's); read once per batch."""
        if self._applied is None:
            self._applied = read_position(self.session.connection(), _NETWORK_POSITIONS, self.network_consumer)
        return self._applied

    def leave(self, institution: str, seq: int, now: datetime) -> list[str]:
        """Disable the endpoints of an institution that left the network at ``seq`` (a former
        member receives nothing logged from its leaving on, and its token no longer lets it
        manage them); returns the ids of those that were enabled."""
        leaving = [e for e in self.endpoints if e.institution == institution]
        if leaving:
            settled = store.settled_up_to(self.session.connection(), self.consumer)
            self.session.execute(store.ENDPOINT_DISABLED, [
                store.disabled_row(e.id, store.LEFT_REASON, now, vars(e), seq - 1, settled) for e in leaving])
            self.endpoints = [e for e in self.endpoints if e.institution != institution]
            self._by_type.clear()
        return [e.id for e in leaving if e.enabled]

    def wanting(self, event_type: str) -> list[_Wanting]:
        found = self._by_type.get(event_type)
        if found is None:
            found = self._by_type[event_type] = [e for e in self.endpoints if store.matches(e.event_types, event_type)]
        return found



def _failure(exc: Exception) -> Failure:
    return Failure(type(exc).__name__, str(exc)[:2000], permanent=False)


class DeliveryRecorder:
    """The applier of the webhooks consumer (the port ``bus.consumer.Applier``).

    ``apply_batch`` answers, in place of derived events, how many deliveries it recorded; the
    endpoints concerned are in :attr:`touched` for the dispatcher to wake.
    """

    def __init__(self, engine: Engine, consumer: str, schedule: RetrySchedule, tracing: Tracing | None = None,
                 network_consumer: str = "network") -> None:
        self.engine = engine
        self.consumer = consumer
        self.network_consumer = network_consumer
        """Whose position in the read models says they have applied an event (they say who takes
        part in a validation)."""
        self.schedule = schedule
        self.epoch: int | None = None
        """This process's number in the consumer's position once it took that over (``take_position``)."""
        self.tracing = tracing or Tracing.off()
        self.touched: set[str] = set()
        self.retired: dict[str, str] = {}
        """Endpoints disabled because their institution left (id → institution): their workers stop."""
        self._taking: int | None = None
        """The database session taking the position over (PostgreSQL)."""
        self._parked = SetAside(consumer)
        """What this consumer sets aside behind its dead letters: the later events about the same
        thing are not owed anywhere before it (ordered deliveries would go out without it)."""

    def apply_batch(self, items: Sequence[LoggedItem], *, live: bool = True, replay: bool = False) -> tuple[int, Failure | None, int]:
        """Record what each event owes, in log order, in one transaction with the position
        (``replay``: dead letters recorded again, out of the log's order — the position is not held).

        The batch is recorded straight through; an event that cannot be recorded rolls the batch
        back, the events before it are recorded again and committed, and it is reported (the
        consumer retries it, then dead-letters it).

        Most events are owed nowhere: which endpoints want a type is worked out once per type and
        batch, so such an event costs a look-up. A workflow's confidential event (a validation's
        review, an application to a call) waits until the read models have applied it (its audience
        is who the workflow accepted as a party: a request or assignment it refused makes nobody
        one); the consumer holds it meanwhile.
        """
        end, failure = len(items), None
        due_at = datetime.now(timezone.utc) + self.schedule.first()
        while end:
            try:
                with session_scope(self.engine) as session:
                    store.claim(session, self.consumer, None if replay else items[0].seq, self.epoch)
                    first = min(item.seq for item in items[:end])  # (a replay's dead letters come in any order)
                    endpoints = [_Wanting(*row) for row in session.execute(store.ENDPOINTS_OWING, {"first": first})]
                    batch = _Batch(session, endpoints, self.network_consumer, self.consumer)
                    recorded = 0
                    for index, item in enumerate(items[:end]):
                        if self._parked and not replay:
                            self._check_set_aside(session, index, item)
                        try:
                            recorded += self._record(batch, index, item, due_at)
                        except _Unrecordable:
                            raise
                        except Exception as exc:
                            if database_unavailable(exc):  # not the event's: the consumer holds it
                                raise
                            raise _Unrecordable(index, _failure(exc)) from exc
                    store.advance(session, self.consumer, items[end - 1].seq)
                return end, failure, recorded
            except _Unrecordable as unrecordable:
                end, failure = unrecordable.index, unrecordable.failure
            except Exception as exc:
                if database_unavailable(exc):  # a connection opened read-only, or lost: new ones next time
                    self.engine.dispose()
                raise
        return 0, failure, 0

    def _record(self, batch: _Batch, index: int, item: LoggedItem, due_at: datetime) -> int:
        envelope = item.envelope
        event_type = str(envelope.get("type"))
        owed = 0
        if event_type == "institution.left":  # its endpoints stop, its own leaving included
            data = envelope.get("data")
            leaving = str(data.get("id")) if isinstance(data, dict) else ""
            gone = batch.leave(leaving, item.seq, due_at)
            self.retired.update(dict.fromkeys(gone, leaving))
            owed += len(gone)  # (what tells the dispatcher to look)
        wanted = [e for e in batch.wanting(event_type) if e.owes(item.seq)]
        if wanted and event_type in CONFIDENTIAL and batch.applied() < item.seq:
            raise _Unrecordable(index, Failure(
                "waiting", f"the read models have not applied #{item.seq} yet: its audience is not known", permanent=False, wait=True,
            ))
        if wanted:
            # A span only for events owed somewhere: one no endpoint asked for is no part of its trace.
            with traces.consume_span(self.consumer, envelope, item.seq, item.traceparent, tracing=self.tracing):
                allowed = audience(batch.session, envelope)
                ids = [e.id for e in wanted if allowed is None or e.institution in allowed]
                self.touched.update(ids)
                owed += store.owe(batch.session, ids, envelope, item.seq, due_at)
        return owed

    def _check_set_aside(self, session: Session, index: int, item: LoggedItem) -> None:
        """Refuse ``item`` when it is about a thing set aside: it waits behind that dead letter."""
        about = aggregate_of(item.envelope)
        if about is not None and (behind := self._parked.behind(session.connection(), about)) is not None:
            raise _Unrecordable(index, Failure(PARKED, SetAside.reason(about, behind), permanent=True, behind=behind, about=about))

    def skip(self, seq: int, envelope: Any = None) -> None:
        """Move past a dead-lettered event; what it is about is set aside (the service's ``skip``)."""
        about = aggregate_of(envelope)
        with session_scope(self.engine) as session:
            store.claim(session, self.consumer, seq, self.epoch)
            store.advance(session, self.consumer, seq)
            if about is not None:
                self._parked.park(session.connection(), about, seq)

    def parked(self) -> list[tuple[str, str, int, int]]:
        """What this consumer sets aside (the service's ``parked``)."""
        return self._parked.listed(self.engine)

    def release(self, about: tuple[str, str], last_seq: int) -> bool:
        """Let ``about`` go (the service's ``release``)."""
        return self._parked.release(self.engine, about, last_seq)

    def take_position(self) -> None:
        with session_scope(self.engine) as session:
            self._taking = backend_pid(session.connection())
            self.epoch = store.take(session, self.consumer)
            self._parked.load(session.connection())

    def end_stalled(self, idle_for: float) -> list[int]:
        """While :meth:`take_position` waits: the service's ``end_stalled``."""
        return end_stalled(self.engine, self._taking, idle_for)

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
    """Sends one endpoint's due deliveries, at most ``concurrency`` at a time: it claims as many
    as it has free senders (never more, so nothing is claimed that is not attempted at once),
    and claims again as each attempt ends."""

    def __init__(self, dispatcher: "WebhookDispatcher", endpoint_id: str, *, concurrency: int) -> None:
        self.dispatcher = dispatcher
        self.endpoint_id = endpoint_id
        self.concurrency = concurrency
        self.wake = asyncio.Event()
        self.sending: set[asyncio.Task[None]] = set()
        self.client = http.Client(lambda: dispatcher.ssl_context, keep_alive=concurrency)
        self._stopping = False
        self._feeder = asyncio.create_task(self._feed(), name=f"webhooks-feed-{endpoint_id}")

    async def _feed(self) -> None:
        while not self._stopping:
            self.wake.clear()
            free = self.concurrency - len(self.sending)
            wait = self.dispatcher.poll
            if free > 0:
                claiming = asyncio.ensure_future(self.dispatcher.claim(self.endpoint_id, free))
                try:
                    claims, next_due = await asyncio.shield(claiming)
                except asyncio.CancelledError:  # stopped meanwhile: what gets claimed is given back
                    claiming.add_done_callback(self.dispatcher.give_back)
                    raise
                except Exception as exc:
                    log.warning("webhooks: cannot claim the deliveries of %s: %s", self.endpoint_id, exc)
                    claims, next_due = [], None
                if self._stopping:  # claimed as the worker stopped: given back, not attempted
                    await self.dispatcher.release(claims)
                    return
                for claim in claims:
                    task = asyncio.create_task(self._send(claim))
                    self.sending.add(task)
                    task.add_done_callback(self._sent)
                if len(claims) == free:
                    wait = self.dispatcher.poll  # more may be due: a sender ending wakes the feeder
                elif next_due is not None:
                    wait = min(wait, max(0.0, (next_due - datetime.now(timezone.utc)).total_seconds()))
            try:
                await asyncio.wait_for(self.wake.wait(), wait)
            except asyncio.TimeoutError:
                pass

    def _sent(self, task: asyncio.Task[None]) -> None:
        self.sending.discard(task)
        self.wake.set()  # a sender is free, and the feeder learns when a retry is due

    async def _send(self, claim: Claim) -> None:
        try:
            await self.dispatcher.attempt(self.client, claim)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("webhooks: delivery %s to %s failed unexpectedly", claim.delivery_id, self.endpoint_id)

    async def stop(self, grace: float) -> None:
        """Stop claiming deliveries; attempts under way get ``grace`` seconds, then are interrupted
        (recorded as such; the schedule already holds their next attempt)."""
        self._stopping = True
        self.wake.set()
        _, late = await asyncio.wait([self._feeder, *self.sending], timeout=grace)
        for task in late:
            task.cancel()
        await asyncio.gather(self._feeder, *self.sending, return_exceptions=True)
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
        concurrency: int = 8,
        failing_limit: timedelta = FAILING_LIMIT,
        poll: float = 5.0,
        db_lock: asyncio.Lock | None = None,
        tracing: Tracing | None = None,
        network_consumer: str = "network",
        may_apply: Callable[[], bool] | None = None,
    ) -> None:
        self.engine = engine
        self.tracing = tracing or Tracing.off()
        self.js = js
        self.allow = targets.networks(settings.webhook_allow_networks)
        self.schedule = RetrySchedule(tuple(settings.webhook_retry_schedule) or (0.0,))
        self.timeout = timeout
        self.concurrency = concurrency
        self.failing_limit = failing_limit
        self.poll = poll
        self.failing_gap = timedelta(seconds=max(max(self.schedule.delays) * (1 + JITTER), RETRY_AFTER_MOST) + timeout + poll)
        """The longest pause between two failed attempts of one run of failures: the longest wait
        the schedule (with its jitter) or a ``Retry-After`` makes before a retry, and the attempt's
        own time. An endpoint failing after a longer pause — sent nothing meanwhile, or only what
        it took — is failing since then, not since its earlier run: five days without a success
        are five days of trying it (a quiet endpoint that failed once days ago is not disabled by
        its next failure)."""
        self.retention = timedelta(days=settings.webhook_retention_days) if settings.webhook_retention_days else None
        """How long a settled delivery and its attempts are kept (``webhook_retention_days``; None: for ever)."""
        self._pruner: asyncio.Task[None] | None = None
        consumer_settings = consumer_settings or ConsumerSettings(WEBHOOKS_CONSUMER)
        self.recorder = DeliveryRecorder(engine, consumer_settings.name, self.schedule, self.tracing, network_consumer=network_consumer)
        self.db_lock = db_lock or asyncio.Lock()
        self.consumer = Consumer(
            js, consumer_settings, self.recorder, on_derived=self._recorded, db_lock=self.db_lock,
            inline=engine.dialect.name == "sqlite",  # see bus.consumer.call_database
            gather=RECORD_GATHER, may_apply=may_apply,  # (whether this bus holds the log: its lease)
        )
        self.workers: dict[str, EndpointWorker] = {}
        self._ssl_context: ssl.SSLContext | None = None
        self._bodies: OrderedDict[int, tuple[bytes, str | None]] = OrderedDict()
        self._retiring: set[asyncio.Task[None]] = set()
        self._changing = asyncio.Lock()
        """Held while an endpoint's change is told (:meth:`endpoint_changed`)."""
        # Every worker's claims and every sender's record go to the database together: one
        # transaction for all that are waiting (records first, then claims), not one each.
        self._turns: Batched[_Work, Any] = Batched(self._turn, self.db_lock)

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """One TLS context for every endpoint's client (making one reads the CA bundle: slow)."""
        if self._ssl_context is None:
            self._ssl_context = httpx.create_ssl_context()
        return self._ssl_context

    async def start(self) -> None:
        """Start a worker for every enabled endpoint (what was owed before a restart is sent on
        schedule), then follow the log."""
        with Session(reading(self.engine)) as session:
            enabled = session.exec(select(Endpoint.id).where(Endpoint.enabled == True)).all()  # noqa: E712
        for endpoint_id in enabled:
            self._worker(endpoint_id)
        await self.consumer.start()
        if self.retention is not None:
            self._pruner = asyncio.create_task(self._prune_every(PRUNE_EVERY, first=60.0), name="webhooks-prune")

    async def stop(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            await asyncio.gather(self._pruner, return_exceptions=True)
            self._pruner = None
        await self.consumer.stop()
        workers, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(worker.stop(grace=min(self.timeout, 5.0)) for worker in workers))
        await asyncio.gather(*self._retiring, return_exceptions=True)  # claims given back, workers retired

    async def prune(self, now: datetime | None = None) -> int:
        """Remove the settled deliveries owed longer ago than the retention, with their attempts,
        a batch a transaction (between the dispatcher's own); returns how many."""
        if self.retention is None:
            return 0
        before = (now or datetime.now(timezone.utc)) - self.retention
        removed = 0
        after: int | None = 0
        while after is not None:  # window after window, from the oldest, until the young ones
            async with self.db_lock:
                batch, after = await asyncio.to_thread(self._prune_batch, before, after)
            removed += batch
        if removed:
            log.info("webhooks: removed %d settled deliveries owed before %s, with their attempts (COLLABBUS_WEBHOOK_RETENTION_DAYS)",
                     removed, f"{before:%Y-%m-%d %H:%M} UTC")
        return removed

    def _prune_batch(self, before: datetime, after: int) -> tuple[int, int | None]:
        with self.engine.begin() as connection:
            return store.prune(connection, before, after)

    async def _prune_every(self, every: float, first: float) -> None:
        await asyncio.sleep(first)
        while True:
            try:
                await self.prune()
            except Exception as exc:  # the database, most likely: next time
                log.warning("webhooks: could not remove old deliveries: %s", exc)
            await asyncio.sleep(every)

    def _worker(self, endpoint_id: str) -> EndpointWorker:
        worker = self.workers.get(endpoint_id)
        if worker is None:
            worker = self.workers[endpoint_id] = EndpointWorker(self, endpoint_id, concurrency=self.concurrency)
        return worker

    def _recorded(self) -> None:
        touched, self.recorder.touched = self.recorder.touched, set()
        for endpoint_id in touched:
            self.wake(endpoint_id)
        retired, self.recorder.retired = self.recorder.retired, {}
        for endpoint_id, institution in retired.items():
            _log_disabled(endpoint_id, institution, store.LEFT_REASON)
            task = asyncio.get_running_loop().create_task(self.endpoint_changed(endpoint_id, False, by_the_bus=True))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def wake(self, endpoint_id: str) -> None:
        """Something may be due for the endpoint."""
        worker = self.workers.get(endpoint_id)
        if worker is not None:
            worker.wake.set()

    async def endpoint_changed(self, endpoint_id: str, enabled: bool, *, by_the_bus: bool = False) -> None:
        """An endpoint was created, enabled, disabled or deleted: run its worker or stop it.

        ``by_the_bus``: the bus disabled it (a 410, failing for too long, its institution left)
        and tells so in a task of its own, which may come after its owner enabled it again (a
        change made meanwhile, told first): its worker is stopped only while the endpoint is still
        disabled; an enabling told after a later disabling (the bus's, told first) runs no worker.
        The changes are told one at a time, so that the last one told is what holds."""
        async with self._changing:
            if enabled or by_the_bus:  # (told late, maybe: what holds is what the database says now)
                enabled = await asyncio.to_thread(self._enabled, endpoint_id)
            if enabled:
                self._worker(endpoint_id).wake.set()
            elif (worker := self.workers.pop(endpoint_id, None)) is not None:
                await worker.stop(grace=0)

    def _enabled(self, endpoint_id: str) -> bool:
        with Session(reading(self.engine)) as session:
            endpoint = session.get(Endpoint, endpoint_id)
            return endpoint is not None and endpoint.enabled

    # --- claiming -------------------------------------------------------------------------------

    async def claim(self, endpoint_id: str, limit: int) -> tuple[list[Claim], datetime | None]:
        """Up to ``limit`` due deliveries of the endpoint, claimed for an attempt each (the time
        of the next one already recorded), and when the next one not among them falls due."""
        return await self._turns(("claim", (endpoint_id, limit)))  # type: ignore[no-any-return]

    def _turn(self, work: Sequence[_Work]) -> list[Any]:
        """Record the attempts and make the claims asked for meanwhile, in one transaction."""
        now = datetime.now(timezone.utc)
        answers: list[Any] = [None] * len(work)
        settles = [index for index, (kind, _) in enumerate(work) if kind == "settle"]
        claims = [index for index, (kind, _) in enumerate(work) if kind == "claim"]
        with self.engine.begin() as connection:
            if settles:
                for index, settled in zip(settles, self._settle_in(connection, [work[i][1] for i in settles], now)):
                    answers[index] = settled
            if claims:
                for index, claimed in zip(claims, self._claim_in(connection, [work[i][1] for i in claims], now)):
                    answers[index] = claimed
        return answers

    def _claim_in(self, connection: Connection, wanted: Sequence[tuple[str, int]], now: datetime) -> list[tuple[list[Claim], datetime | None]]:
        """Claim what is due for each (endpoint, limit)."""
        ids = list(dict.fromkeys(endpoint_id for endpoint_id, _ in wanted))
        endpoints = {row.id: row for row in connection.execute(store.ENDPOINTS_TO_SEND, {"ids": ids})}
        claimed: list[dict[str, Any]] = []
        interrupted: list[dict[str, Any]] = []
        answers: list[tuple[list[Claim], datetime | None]] = []
        for endpoint_id, limit in wanted:
            endpoint = endpoints.get(endpoint_id)
            if endpoint is None or not endpoint.enabled:
                answers.append(([], None))
                continue
            secrets = store.signing_secrets(endpoint.secret, endpoint.previous_secret, endpoint.previous_secret_until, now)
            due = store.DUE if endpoint.ordered else store.DUE_ANY_ORDER
            rows = connection.execute(due, {"endpoint_id": endpoint_id, "limit": limit + 1}).all()
            claims: list[Claim] = []
            next_due = None
            for row in rows:
                if row.next_attempt_at > now or len(claims) == limit:
                    next_due = row.next_attempt_at
                    break
                if row.attempts >= self.schedule.attempts:  # the last attempt was cut short by a crash
                    interrupted.append({"b_id": row.id, "b_at": now})
                    continue
                retry_in = self.schedule.after(row.attempts + 1)
                # Should this attempt never report (a crash), the next one comes no earlier than planned.
                lease = now + timedelta(seconds=self.timeout + (retry_in or 0.0) + 1.0)
                claimed.append({"b_id": row.id, "b_attempts": row.attempts + 1, "b_next": lease})
                claims.append(Claim(row.id, endpoint_id, row.event_id, row.seq, endpoint.url, secrets, retry_in,
                                    row.attempts, row.next_attempt_at, lease))
            answers.append((claims, next_due))
        if claimed:
            connection.execute(store.CLAIM, claimed)
        if interrupted:
            connection.execute(store.GIVE_UP, interrupted)
            connection.execute(store.ADD_ATTEMPT, [
                {"delivery_id": row["b_id"], "attempted_at": now, "status_code": None, "latency_ms": 0,
                 "error": "interrupted: the bus stopped during the last attempt", "response": None}
                for row in interrupted
            ])
        return answers

    def give_back(self, claiming: "asyncio.Future[tuple[list[Claim], datetime | None]]") -> None:
        """Release what a claim cut short by a stopping worker took, once it is known."""
        if claiming.cancelled() or claiming.exception() is not None or not claiming.result()[0]:
            return
        task = asyncio.get_running_loop().create_task(self.release(claiming.result()[0]))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def release(self, claims: Sequence[Claim]) -> None:
        """Give back claims that were never attempted (the worker stopped meanwhile)."""
        if not claims:
            return

        def give_back() -> None:
            with self.engine.begin() as connection:
                connection.execute(store.RELEASE, [
                    {"b_id": c.delivery_id, "b_attempts": c.attempts_before, "b_next": c.due_at, "b_lease": c.lease}
                    for c in claims
                ])

        async with self.db_lock:
            await asyncio.shield(asyncio.to_thread(give_back))

    # --- one attempt ----------------------------------------------------------------------------

    async def attempt(self, client: http.Client, claim: Claim) -> None:
        """Make one attempt of a claimed delivery and record it."""
        try:
            outcome = await self._post(client, claim)
        except asyncio.CancelledError:
            interrupted = Outcome(None, 0, "interrupted: the bus stopped during the attempt")
            await asyncio.shield(asyncio.to_thread(self._settle, claim, interrupted))
            raise
        disabled: _Disabled | None = await self._turns(("settle", (claim, outcome)))
        if disabled is not None:
            if disabled.now:
                _log_disabled(claim.endpoint_id, disabled.institution, disabled.reason)
            task = asyncio.get_running_loop().create_task(self.endpoint_changed(claim.endpoint_id, False, by_the_bus=True))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    def _settle(self, claim: Claim, outcome: Outcome) -> _Disabled | None:
        return self._settle_all([(claim, outcome)])[0]

    def _settle_all(self, settled: Sequence[tuple[Claim, Outcome]]) -> list[_Disabled | None]:
        """Record attempts, in one transaction."""
        with self.engine.begin() as connection:
            return self._settle_in(connection, settled, datetime.now(timezone.utc))

    def _settle_in(self, connection: Connection, settled: Sequence[tuple[Claim, Outcome]], now: datetime) -> list[_Disabled | None]:
        """Record attempts and what follows from them: for each, None while its endpoint is
        enabled, else how it is disabled (by this attempt or before it)."""
        endpoint_ids = list(dict.fromkeys(claim.endpoint_id for claim, _ in settled))
        endpoints = {row.id: dict(row._mapping) for row in connection.execute(store.ENDPOINTS_TO_SETTLE, {"ids": endpoint_ids})}
        leases = {row.id: row.next_attempt_at for row in connection.execute(store.DELIVERIES_LEASED, {"ids": [claim.delivery_id for claim, _ in settled]})}
        attempts: list[dict[str, Any]] = []
        delivered: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        changed: set[str] = set()
        disabled: set[str] = set()
        answers: list[_Disabled | None] = []
        for claim, outcome in settled:
            endpoint = endpoints.get(claim.endpoint_id)
            if endpoint is None or claim.delivery_id not in leases:  # deleted meanwhile
                answers.append(None)
                continue
            kept = leases[claim.delivery_id] != claim.lease  # given up or sent again meanwhile (see Claim.lease)
            attempts.append({
                "delivery_id": claim.delivery_id, "attempted_at": now - timedelta(milliseconds=outcome.latency_ms),
                "status_code": outcome.status_code, "latency_ms": outcome.latency_ms,
                "error": outcome.error[:500] if outcome.error else None, "response": outcome.response,
            })
            changed.add(claim.endpoint_id)
            if outcome.delivered:
                if endpoint["failing_since"] is not None:
                    log.info("webhooks: endpoint %s of %s takes deliveries again (failing since %s)", claim.endpoint_id,
                             endpoint["institution"], endpoint["failing_since"].isoformat(timespec="seconds"),
                             extra={"endpoint_id": claim.endpoint_id, "institution": endpoint["institution"]})
                endpoint["last_success_at"], endpoint["failing_since"] = now, None
                if not kept or leases[claim.delivery_id] is None:  # (a cancelled one too: the receiver has it)
                    delivered.append({"b_id": claim.delivery_id, "b_at": now})
                # else sent again (resend, recover) after this attempt went out: it goes again, as
                # asked (a receiver restoring a backup asks for what it may have lost since)
                answers.append(None)
                continue
            last_failure = endpoint["last_failure_at"] or endpoint["failing_since"]
            if last_failure is not None and now - last_failure > self.failing_gap:
                endpoint["failing_since"] = None  # a run of failures that ended long ago: this one starts anew
            already_failing = endpoint["failing_since"] is not None
            endpoint["failing_since"] = endpoint["failing_since"] or now
            endpoint["last_failure_at"] = now
            if kept:
                next_at = leases[claim.delivery_id]
                then = "its delivery was given up or sent again meanwhile"
            else:
                if claim.retry_in is None or outcome.status_code == 410:
                    next_at, status = None, store.FAILED
                else:
                    next_at, status = now + timedelta(seconds=max(claim.retry_in, outcome.retry_after or 0.0)), store.PENDING
                failed.append({"b_id": claim.delivery_id, "b_status": status, "b_next": next_at})
                then = f"next attempt at {next_at.isoformat(timespec='seconds')}" if next_at is not None else "no more attempts"
            # The first failure since the endpoint last took a delivery is a warning; the others, while
            # it fails, are details (one a delivery and attempt: a receiver down for a day would fill
            # the log), which `collabbus status`, /metrics and its deliveries' attempts tell anyway.
            log.log(
                logging.DEBUG if already_failing else logging.WARNING,
                "webhooks: endpoint %s did not take event %s (attempt %d: %s); %s%s", claim.endpoint_id, claim.event_id,
                claim.attempts_before + 1, _met(outcome), then,
                "" if already_failing else "; while it fails, its failed attempts are logged at debug level",
                extra={"event_id": claim.event_id, "endpoint_id": claim.endpoint_id, "institution": endpoint["institution"]},
            )
            was_enabled = endpoint["enabled"]
            if was_enabled and outcome.status_code == 410:
                endpoint["enabled"], endpoint["disabled_reason"] = False, store.GONE_REASON
                disabled.add(claim.endpoint_id)
            elif was_enabled and now - endpoint["failing_since"] >= self.failing_limit:
                days = self.failing_limit / timedelta(days=1)
                endpoint["enabled"], endpoint["disabled_reason"] = False, store.FAILING_REASON.format(days=days)
                disabled.add(claim.endpoint_id)
            answers.append(None if endpoint["enabled"] else _Disabled(endpoint["institution"], endpoint["disabled_reason"] or "", was_enabled))
        if attempts:
            connection.execute(store.ADD_ATTEMPT, attempts)
        if delivered:
            connection.execute(store.DELIVERED_NOW, delivered)
        if failed:
            connection.execute(store.NOT_DELIVERED, failed)
        if changed:
            connection.execute(store.ENDPOINT_HEALTH, [
                {"b_id": e, "b_last_success_at": endpoints[e]["last_success_at"], "b_failing_since": endpoints[e]["failing_since"],
                 "b_last_failure_at": endpoints[e]["last_failure_at"]}
                for e in changed
            ])
        if disabled:
            # Disabled where the recorder has got to: what it recorded stays owed (sent once the
            # endpoint is enabled again); what it records later is not, and is in the gap the
            # endpoint shows for /recover. (Read without holding it: the recorder holds its
            # position while it inserts deliveries, which wait for the endpoints held here.)
            recorded = read_position(connection, store.ConsumerPosition.__table__, self.recorder.consumer)  # type: ignore[attr-defined]
            past = store.settled_up_to(connection, self.recorder.consumer, recorded)
            connection.execute(store.ENDPOINT_DISABLED, [
                store.disabled_row(e, endpoints[e]["disabled_reason"], now, endpoints[e], recorded, past) for e in disabled
            ])
        return answers

    async def _post(self, client: http.Client, claim: Claim) -> Outcome:
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
        # Deliveries about different things are in no order, and a resend or recovery brings older
        # events again: the event's place in the log tells a receiver which is the later.
        headers = {SEQUENCE_HEADER: str(claim.seq)}
        # The attempt is a client span continuing the event's trace from its log message (the
        # gatekeeper's publish); the receiver gets the span's own trace context to continue.
        span = _client_span(self.tracing, target, traceparent, claim.endpoint_id)
        sent_traceparent = _traceparent_of(span) if span is not None else traceparent
        if sent_traceparent and TRACEPARENT_FORM.fullmatch(sent_traceparent):
            headers["traceparent"] = sent_traceparent
        return await post_signed(client, target, claim.event_id, claim.secrets, body, timeout=self.timeout, headers=headers,
                                 span=span)

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



async def post_signed(client: http.Client, target: targets.Target, msg_id: str, secrets: tuple[str, ...], body: bytes, *,
                      timeout: float, headers: dict[str, str] | None = None, span: trace.Span | None = None) -> Outcome:
    """POST ``body`` to ``target`` as ``msg_id``, signed with ``secrets`` (Standard Webhooks), with
    ``headers`` besides; what the endpoint answered, never raising for its faults (``span``: the
    attempt's, ended with it)."""
    timestamp = int(time.time())
    sent = {
        "host": target.host,
        "content-type": STRUCTURED_CONTENT_TYPE,
        "user-agent": "collabbus-webhooks",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(secrets, msg_id, timestamp, body),
        **(headers or {}),
    }
    url = target.url
    origin = (url.host, url.port or (443 if url.scheme == "https" else 80), target.sni)
    started = time.perf_counter()

    def elapsed() -> int:
        return round((time.perf_counter() - started) * 1000)

    try:
        async with asyncio.timeout(timeout):
            answer = await client.post(origin, url.raw_path.decode("ascii"), sent, body, keep=RESPONSE_KEPT)
    except TimeoutError:
        return _ended(span, Outcome(None, elapsed(), f"no answer within {timeout:g} s"))
    except (http.HttpError, OSError) as exc:  # OSError: connecting, TLS included
        return _ended(span, Outcome(None, elapsed(), f"{type(exc).__name__}: {exc}"))
    except BaseException as exc:
        _ended(span, Outcome(None, elapsed(), f"{type(exc).__name__}: {exc}"))
        raise
    status = answer.status
    error = None
    if not 200 <= status < 300:
        error = f"HTTP {status}"
        if 300 <= status < 400:  # where it points says what to register instead (https://…, say)
            location = answer.headers.get("location", "")[:300]
            error += f" (redirects are not followed: to {location})" if location else " (redirects are not followed)"
    retry_after = None
    if status in RETRY_AFTER_STATUSES:
        retry_after = retry_after_seconds(answer.headers.get("retry-after"), datetime.now(timezone.utc))
    text = answer.body[:RESPONSE_KEPT].decode("utf-8", "replace")
    return _ended(span, Outcome(status, elapsed(), error, text, retry_after))


TEST_EVENT_TYPE = "webhook.test"
"""The type of a test delivery (``POST /webhooks/{id}/test``): no event of the log has it."""


async def send_test(url: str, secrets: tuple[str, ...], msg_id: str, body: bytes, *, allow: Sequence[targets.IPNetwork], timeout: float,
                    ssl_context: Callable[[], ssl.SSLContext] = httpx.create_ssl_context) -> Outcome:
    """Send a test delivery (``body``, signed as ``msg_id``) to ``url`` now, as deliveries are
    sent (the same targets refused, the same timeout), outside the log and the deliveries owed:
    what the endpoint answered, recorded nowhere."""
    started = time.perf_counter()
    client = http.Client(ssl_context, keep_alive=0)
    try:
        try:
            target = await targets.resolve(url, allow)
        except targets.RefusedTarget as exc:
            return Outcome(None, round((time.perf_counter() - started) * 1000), f"refused: {exc}")
        return await post_signed(client, target, msg_id, secrets, body, timeout=timeout)
    finally:
        await client.aclose()


def _client_span(tracing: Tracing, target: targets.Target, traceparent: str | None, endpoint_id: str) -> trace.Span | None:
    """A client span for one attempt at endpoint ``endpoint_id``, the child of the event's log
    context; None without tracing. Its URL is the endpoint's as registered, without the query
    (which may hold the receiver's token) or credentials.

    One span made directly, not through an instrumentation of the HTTP client (which costs as
    much as the request itself)."""
    if not tracing.enabled:
        return None
    url, host = target.url, target.host
    address = host[1:host.index("]")] if host.startswith("[") else host.partition(":")[0]
    path = url.raw_path.partition(b"?")[0].decode("ascii")
    attributes: dict[str, Any] = {
        "http.request.method": "POST", "url.full": f"{url.scheme}://{host}{path}", "server.address": address,
        "server.port": url.port or (443 if url.scheme == "https" else 80), traces.WEBHOOK_ENDPOINT: endpoint_id,
    }
    return tracing.tracer.start_span("POST", context=traces.context_of(traceparent), kind=SpanKind.CLIENT, attributes=attributes)


def _traceparent_of(span: trace.Span) -> str | None:
    """The W3C ``traceparent`` naming ``span`` (what the receiver continues)."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _ended(span: trace.Span | None, outcome: Outcome) -> Outcome:
    """End the attempt's span with what came of it."""
    if span is not None:
        if outcome.status_code is not None:
            span.set_attribute("http.response.status_code", outcome.status_code)
        if outcome.status_code is None or outcome.status_code >= 400:
            span.set_attribute("error.type", str(outcome.status_code or "error"))
            span.set_status(Status(StatusCode.ERROR, outcome.error or ""))
        span.end()
    return outcome


@dataclass(frozen=True)
class _Disabled:
    """An endpoint found disabled as an attempt was recorded: its institution, why, and whether
    that attempt disabled it (``now``; else it was before, by its owner meanwhile)."""

    institution: str
    reason: str
    now: bool


def _log_disabled(endpoint_id: str, institution: str, reason: str) -> None:
    """The operator's line for an endpoint the bus disabled, saying why (``collabbus status`` and
    ``GET /webhooks/{id}`` say it too)."""
    log.warning("webhooks: endpoint %s of %s disabled: %s", endpoint_id, institution, reason,
                extra={"endpoint_id": endpoint_id, "institution": institution, "disabled_reason": reason})


def _met(outcome: Outcome) -> str:
    """What a failed attempt met, for its log line: the status and the start of the endpoint's
    answer on one line (at most :data:`RESPONSE_LOGGED` characters of it), or the error."""
    if outcome.status_code is None:
        return (outcome.error or "no answer")[:200]
    status = outcome.error or f"HTTP {outcome.status_code}"
    answer = "".join(c if c.isprintable() else " " for c in (outcome.response or "")[:RESPONSE_LOGGED * 2])
    answer = " ".join(answer.split())[:RESPONSE_LOGGED]
    return f"{status}: {answer}" if answer else status


# --- recovery ----------------------------------------------------------------------------------


async def recover(js: JetStreamContext, engine: Engine, endpoint: Endpoint, since: datetime | None, until: datetime,
                  consumer: str = WEBHOOKS_CONSUMER, *, after_seq: int | None = None, until_seq: int | None = None) -> tuple[int, int]:
    """Owe the endpoint again every event it asked for (and may see) that the log took between
    ``since`` and ``until`` (and after ``after_seq``, up to ``until_seq``: the window is where
    they all hold), delivered before or not; returns how many, and how many of the
    window's events were held back instead: those ``consumer`` (the webhooks' consumer) set
    aside behind a dead letter, from the dead letter on, are owed when ``collabbus dlq replay``
    records them in the log's order — owed now, an ordered endpoint would get a thing's later
    events before the one still waiting. Who may see a confidential event is judged by the read
    models as they are now (a review the workflow took is every member's once the validation is
    decided, as over HTTP).

    The window is read and owed ``RECOVER_BATCH`` events at a time, each batch in a transaction of
    its own, so that a window of any size holds no more than a batch in memory and in one
    statement (SQLite and PostgreSQL bound a statement's parameters). A recovery that fails
    part-way leaves the batches before owed; asked again, they are owed again from a new round."""
    queued = waiting = 0
    batch: list[tuple[int, dict[str, Any]]] = []
    async for seq, envelope in logged_between(js, since, until, after_seq=after_seq, until_seq=until_seq):
        if store.matches(endpoint.event_types, str(envelope.get("type"))):
            batch.append((seq, envelope))
        if len(batch) >= RECOVER_BATCH:
            owed, held = await asyncio.to_thread(_owe_again, engine, endpoint, batch, consumer)
            queued, waiting, batch = queued + owed, waiting + held, []
    if batch:
        owed, held = await asyncio.to_thread(_owe_again, engine, endpoint, batch, consumer)
        queued, waiting = queued + owed, waiting + held
    return queued, waiting


RECOVER_BATCH = 1_000
"""Events of a recovery's window owed in one transaction (:func:`recover`)."""


def _owe_again(engine: Engine, endpoint: Endpoint, events: list[tuple[int, dict[str, Any]]], consumer: str) -> tuple[int, int]:
    """Owe ``events`` (of a recovery's window) to the endpoint again, but those set aside behind a
    dead letter and those it may not see; returns (how many owed, how many held back)."""
    with session_scope(engine) as session:
        aside = {(domain, subject): first for _, domain, subject, first, _ in parked(session.connection(), consumer)}
        waiting = {seq for seq, envelope in events
                   if (about := aggregate_of(envelope)) is not None and seq >= aside.get(about, seq + 1)}
        visible = [
            (seq, envelope) for seq, envelope in events
            if seq not in waiting and ((allowed := audience(session, envelope)) is None or endpoint.institution in allowed)
        ]
        return store.owe_again(session, endpoint.id, visible, datetime.now(timezone.utc)), len(waiting)


async def held_back(js: JetStreamContext, engine: Engine, endpoint: Endpoint, consumer: str = WEBHOOKS_CONSUMER) -> int:
    """How many events the endpoint asked for (and may see) wait in the dead-letter queue of
    ``consumer`` (the webhooks'): those the bus could not record for webhooks and those set
    aside behind them, owed in the log's order once the operator replays them (to a disabled
    endpoint, those logged before it was disabled: sent once it is enabled again). One whose
    audience cannot be worked out is not counted."""
    from ops import dlq

    if not (await dlq.counts(js)).get(consumer):
        return 0
    letters = [letter.event for letter in await dlq.dead_letters(js, consumer)
               if letter.event is not None and endpoint.owes(letter.original_seq or 0)
               and store.matches(endpoint.event_types, str(letter.type))]

    def visible() -> int:
        with Session(reading(engine)) as session:
            count = 0
            for event in letters:
                try:
                    allowed = audience(session, event)
                except Exception:  # (what the recorder may have failed on)
                    continue
                count += allowed is None or endpoint.institution in allowed
            return count

    return await asyncio.to_thread(visible) if letters else 0


async def logged_between(js: JetStreamContext, since: datetime | None, until: datetime | None, *, after_seq: int | None = None,
                         until_seq: int | None = None) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """(seq, envelope) of the events the log took from ``since`` to ``until`` and after
    ``after_seq`` up to ``until_seq`` (None: no bound), in order."""
    last = (await js.stream_info(EVENTS_STREAM)).state.last_seq
    start = (after_seq or 0) + 1
    if last == 0 or (since is not None and until is not None and since > until) or start > min(last, last if until_seq is None else until_seq):
        return
    if after_seq is not None or since is None:  # (a sequence is exact: it starts there)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    else:
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
            if (until is not None and logged_at > until) or (until_seq is not None and meta.sequence.stream > until_seq):
                return
            if since is not None and logged_at < since:  # (started by sequence, before the time asked for)
                if meta.sequence.stream >= last or meta.num_pending == 0:
                    return
                continue
            event = readable(msg.data)
            if isinstance(event, dict):  # (what is not an event was never delivered: nothing to recover)
                yield meta.sequence.stream, event
            if meta.sequence.stream >= last or meta.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()
