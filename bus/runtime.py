"""The running bus: NATS (embedded or not), streams, membership, the gate and its ingress.

``Bus`` is the one composition root for everything that touches NATS; the CLI, the HTTP gateway
and the tests start it and read its parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from dataclasses import dataclass, field
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.errors import ConnectionClosedError
from nats.js import JetStreamContext

from bus.connection import connect_options, connection_state, embedded_bus_creds, embedded_server
from bus.consumer import Consumer, ConsumerSettings
from bus.gate import Gate
from bus.ingress import Ingress
from bus.logpages import LogPages
from bus.lease import BUCKET, Lease
from bus.membership import Membership
from bus.ratelimit import RateLimiter
from bus.relay import Relay
from bus.server import EmbeddedNats, EmbeddedServerError
from bus.streams import (EVENTS_STREAM, UNANSWERED, Unanswered, desired_streams, ensure_streams, jetstream_answered,
                          wait_for_jetstream)
from bus.verdict import Verdict
from bus.watch import AppliedWatch
from ops.settings import Settings
from ops.tracing import TracedNetwork, Tracing, activate
from ops.wal import WalCheckpointer
from schemas.envelope import source_of

log = logging.getLogger("collabbus.bus")

NETWORK_CONSUMER = "network"
CLAIM_PATIENCE = 8.0
"""Seconds a bus starting waits for another that applies the log to go (a killed one's lease goes
stale in ``bus.lease.STALE_AFTER``) before it refuses."""


def broker_options(settings: Settings, name: str) -> dict[str, Any]:
    """:func:`connect_options` for FastStream's broker, which takes credentials as ``security=``."""
    from faststream.nats import NatsCredentials, NatsNKey

    options = connect_options(settings, name)
    if "user_credentials" in options:
        options["security"] = NatsCredentials(options.pop("user_credentials"))
    elif "nkeys_seed" in options:
        options["security"] = NatsNKey(options.pop("nkeys_seed"))
    return options


JETSTREAM_PROBE_TIMEOUT = 2.0
"""Seconds a starting bus gives JetStream to answer before it says it waits (and asks again)."""


T = TypeVar("T")


@dataclass
class Bus:
    """Everything that touches NATS in one bus process."""

    settings: Settings
    server: EmbeddedNats | None = None
    _watching: asyncio.Task[None] | None = None
    broker: NatsBroker = field(init=False)
    gate: Gate = field(init=False)
    membership: Membership = field(init=False)
    engine: Any = None
    checkpointers: list[WalCheckpointer] = field(default_factory=list)
    """Background checkpoints of the SQLite files this bus writes (``ops.wal``)."""
    service: Any = None
    consumer: Consumer | None = None
    relay: Relay | None = None
    ingress: Ingress | None = None
    applied: AppliedWatch | None = None
    """How far the read models have applied the log (``bus.watch``), once :meth:`start_state` ran."""
    log_pages: LogPages | None = None
    """Answers members' requests for pages of the log over NATS (``bus.logpages``), once
    :meth:`start_state` ran."""
    http: Any = None
    """The HTTP gateway (``connectors.http.server.HttpGateway``) once :meth:`start_http` ran, or
    the server that serves it then (``collabbus up`` listens before the bus starts)."""
    webhooks: Any = None
    """The webhook dispatcher (``connectors.webhooks.dispatcher.WebhookDispatcher``) once :meth:`start_state` ran."""
    webhook_timeout: float = 15.0
    """Seconds a webhook request may take (CONTRACT §7); a seam for tests."""
    network_factory: Any = None
    """Builds the handlers' ``Network`` (default: every domain's routes); a seam for tests."""
    consumer_settings: ConsumerSettings = field(default_factory=lambda: ConsumerSettings(NETWORK_CONSUMER))
    gates: Any = None
    """The gatekeeper processes (``bus.gates.GateProcesses``) once :meth:`start_gatekeepers` ran
    with any to start."""
    portal_passes: Any = None
    """How the portal connector's passes have gone (``connectors.portal.connector.Passes``) while
    this bus runs it (``COLLABBUS_PORTAL_URL``): ``/metrics`` serves them, and ``collabbus status``
    and ``/ops/status`` show them."""
    tracing: Tracing | None = None
    """Where this bus's spans go; by default as the ``OTEL_*`` variables say (``ops.tracing``)."""
    lease: Lease | None = None
    """The lease by which this bus applies the log (``bus.lease``), once it holds it."""
    lost_lease: asyncio.Event = field(default_factory=asyncio.Event)
    lost_to: dict[str, Any] | None = None
    """Who holds the lease since this bus lost it (``bus.lease.describe`` says it)."""
    """Set when another bus took the lease over while this one could not renew it: this one has
    stopped applying the log then, and should stop."""
    doing: str = "starting"
    """What the start is doing, in words, while it does: ``/readyz`` says it until the gateway
    serves (``collabbus up`` listens from its first moment)."""
    denied: str | None = None
    """The last permissions violation NATS reported on this bus's connection (a subject its
    credentials do not allow), logged as it comes."""
    _own_tracing: bool = field(default=False, init=False, repr=False)
    _state_file: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    """Writes what the consumers wait on for ``collabbus status`` (``ops.status.keep_consumer_state``)."""

    @property
    def nc(self) -> Client:
        return self.broker.connection

    @property
    def js(self) -> JetStreamContext:
        return self.broker.config.connection_state.stream

    def nats_state(self) -> str:
        """``bus.connection.connection_state`` of this bus's connection, ``connecting`` before it has one."""
        connection = self.broker._connection if hasattr(self, "broker") else None
        return "connecting" if connection is None else connection_state(connection)

    async def start(self, *, ingress: bool = True, state: bool = True) -> None:
        """Start NATS if embedded, declare the streams, bootstrap the operator, open the ingress."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self._trace()
        if settings.embedded and self.server is None:
            self.doing = "starting the embedded nats-server"
            self.server = embedded_server(settings)
            await self.server.astart()
            self._watching = asyncio.create_task(self._watch_server(), name="embedded-nats-watch")
        self.doing = f"connecting to NATS at {', '.join(settings.nats_servers)}"
        await self._connect("collabbus")
        streams = desired_streams(
            replicas=settings.stream_replicas,
            duplicate_window=settings.duplicate_window,
            max_msg_size=min(self.nc.max_payload, settings.max_event_bytes + 4096),
        )
        names = [str(stream.name) for stream in streams] + [f"KV_{BUCKET}"]
        self.doing = "waiting for JetStream"
        await wait_for_jetstream(self.nc.jetstream(timeout=JETSTREAM_PROBE_TIMEOUT), names, denied=lambda: self.denied,
                                 on_wait=self._doing)
        await self.through_elections(names, "making the streams", lambda: ensure_streams(self.js, streams, on_wait=self._doing))
        self.doing = "reading the network's members from the log"
        await self._start_gate()
        await self.through_elections(names, "registering the network's operator", self.ensure_operator)
        await self.revoke_departed()
        if ingress:
            self.doing = "opening the ingress"
            await self.open_ingress()
        await self.broker.start()
        if state:
            await self.start_state()

    async def start_gatekeeper(self) -> None:
        """Only the gatekeeper and its ingress, on a NATS whose streams the main process declared:
        a process of its own that judges offers beside the others (``collabbus gate``)."""
        self._trace()
        self._checkpoint_in_background(self._span_store_checkpointer())  # a gatekeeper on another machine has no bus beside it
        await self._connect("collabbus-gate")
        await wait_for_jetstream(self.nc.jetstream(timeout=JETSTREAM_PROBE_TIMEOUT), [EVENTS_STREAM], denied=lambda: self.denied)
        await self._start_gate()
        await self.open_ingress()

    async def through_elections(self, streams: list[str], doing: str, step: Callable[[], Awaitable[T]]) -> T:
        """A step of the start (after its first wait for JetStream): one that meets JetStream or
        ``streams`` not answering — an election begun after that wait — waits for them again
        (``wait_for_jetstream``) and is taken again, rather than failing the start."""
        while True:
            self.doing = doing
            try:
                return await step()
            except UNANSWERED as exc:
                said = isinstance(exc, Unanswered) and exc.__cause__ is None  # (else: the request's own error)
                log.warning("%s: %s; waiting for JetStream again", doing,
                            exc if said else f"JetStream stopped answering ({jetstream_answered(exc.__cause__ or exc)})")
            self.doing = "waiting for JetStream"
            await wait_for_jetstream(self.nc.jetstream(timeout=JETSTREAM_PROBE_TIMEOUT), streams, denied=lambda: self.denied,
                                     on_wait=self._doing)

    def _doing(self, words: str) -> None:
        self.doing = words

    async def _watch_server(self, every: float = 0.5) -> None:
        """The embedded nats-server is the bus's own: when it exits, it is started again (with
        growing pauses while it cannot be), and the connections carry on by themselves."""
        pause = every
        while self.server is not None:
            await asyncio.sleep(every)
            server = self.server
            process = server.process if server is not None else None
            if server is None or process is None or process.poll() is None:
                continue
            log.error("the embedded nats-server exited with code %s (its log is kept as %s); starting it again",
                      process.returncode, server.store_dir / "nats-server.log.previous")
            server.process = None
            try:
                await server.astart()
            except Exception as exc:
                log.error("the embedded nats-server could not be started again: %s; next try in %.0f s", exc, pause)
                server.process = process  # still exited: the next round tries again
                await asyncio.sleep(pause)
                pause = min(pause * 2, 30.0)
                continue
            pause = every
            log.warning("the embedded nats-server runs again at %s", server.url)

    def _span_store_checkpointer(self) -> WalCheckpointer | None:
        """A checkpointer (``ops.wal``) of the span store, when spans are kept in one."""
        return WalCheckpointer(self.tracing.store) if self.tracing is not None and self.tracing.store is not None else None

    def _checkpoint_in_background(self, *checkpointers: WalCheckpointer | None) -> None:
        """Start these checkpointers of SQLite files the process writes; they stop with the bus.
        Several on one file (the bus's and its gatekeepers' on the span store) take turns: a
        checkpoint finding another under way is skipped."""
        for checkpointer in checkpointers:
            if checkpointer is not None:
                checkpointer.start()
                self.checkpointers.append(checkpointer)

    def _trace(self) -> None:
        if self.tracing is None:
            self.tracing, self._own_tracing = Tracing.configure(self.settings.data_dir), True
        activate(self.tracing)

    async def _connect(self, name: str) -> None:
        self.broker = NatsBroker(**broker_options(self.settings, name), error_cb=self._nats_error, logger=None,
                                 disconnected_cb=self._nats_lost, reconnected_cb=self._nats_back)
        await self.broker.connect()

    async def _nats_lost(self) -> None:
        if self.broker._connection is not None and not self.broker._connection.is_closed:  # (not the bus closing it)
            log.warning("lost the connection to NATS at %s: reconnecting; offers, the log and the consumers wait until "
                        "it is back", ", ".join(self.settings.nats_servers))

    async def _nats_back(self) -> None:
        url = self.broker._connection.connected_url if self.broker._connection is not None else None
        log.info("reconnected to NATS%s", f" at {url.hostname}:{url.port}" if url is not None else "")

    async def _nats_error(self, exc: Exception) -> None:
        """nats-py's asynchronous errors: a permissions violation (a subject the credentials do not
        allow) is logged and kept (:attr:`denied`); the connection's going and coming back are said
        by :meth:`_nats_lost` and :meth:`_nats_back` (and ``/readyz``)."""
        if "permissions violation" in str(exc).lower():
            self.denied = str(exc).removeprefix("nats: ")
            log.error("NATS refused this bus: %s", self.denied)

    async def _start_gate(self) -> None:
        """The members as the log knows them, and the gate that judges offers against them."""
        assert self.tracing is not None
        self.membership = Membership(self.nc, self.js)
        if self.server is not None and self.server.authority is not None:
            self.membership.on_left = self._revoke_credentials
        await self.membership.start()
        self.gate = Gate(self.nc, self.js, self.membership, max_event_bytes=self.settings.max_event_bytes, tracer=self.tracing.tracer)
        await self.gate.start()

    async def _revoke_credentials(self, institution: str) -> None:
        """An institution left: the credentials the embedded server's account issued to it are
        revoked (it could no longer offer events, but could still connect and send)."""
        assert self.server is not None and self.server.authority is not None
        authority, server = self.server.authority, self.server
        revoked, _ = await asyncio.to_thread(authority.revoke, institution)
        if revoked:
            try:
                await asyncio.to_thread(server.reload)
            except EmbeddedServerError as exc:  # they are refused from the server's next start
                log.error("revoked %d NATS credentials of %s, which left the network; %s", revoked, institution, exc)
                return
            log.info("revoked %d NATS credentials of %s, which left the network", revoked, institution)

    async def revoke_departed(self) -> None:
        """Revoke the credentials of institutions that left while this bus was not running."""
        if self.server is None or self.server.authority is None:
            return
        for institution in sorted(await asyncio.to_thread(self.server.authority.holders)):
            if await self.membership.kind_of(institution) is None:
                await self._revoke_credentials(institution)

    async def start_gatekeepers(self) -> None:
        """Start ``COLLABBUS_GATE_PROCESSES`` gatekeeper processes (``bus.gates``) and let them judge
        NATS offers; this process judges them itself whenever none of them is ready."""
        from bus.gates import GateProcesses, default_count

        count = self.settings.gate_processes
        count = default_count() if count is None else count
        if count == 0:
            return

        seen_ready = False  # (at the start this process judges offers until the first is ready: not "again")

        async def ready(processes: int) -> None:
            nonlocal seen_ready
            if processes:
                if self.ingress is not None and seen_ready:
                    log.info("%d gatekeeper process%s ready again: %s NATS offers", processes,
                             " is" if processes == 1 else "es are", "it judges" if processes == 1 else "they judge")
                seen_ready = True
                await self.close_ingress()
            else:
                log.warning("no gatekeeper process is ready: this process judges NATS offers until one is")
                await self.open_ingress()

        creds = self.settings.nats_creds
        if creds is None and self.settings.embedded:
            creds = embedded_bus_creds(self.settings)
        self.gates = GateProcesses(self.settings, count, ready)
        await self.gates.start(creds if creds is not None and creds.exists() else None)

    async def open_ingress(self) -> None:
        """Judge offers from NATS ingress in this process (queue group ``collabbus-gate``)."""
        if self.ingress is None:
            limiter = RateLimiter(self.settings.ingress_rate_limit, self.settings.ingress_rate_burst)
            self.ingress = Ingress(self.nc, self.gate, limiter=limiter)
            await self.ingress.start()

    async def close_ingress(self) -> None:
        """Stop judging NATS offers here (other gatekeepers take them); the ones in hand are answered."""
        if self.ingress is not None:
            ingress, self.ingress = self.ingress, None
            await ingress.stop()

    async def start_state(self) -> None:
        """The read models: migrate, then run the network consumer, the timers and the outbox relay."""
        from handlers.db import make_engine, migrate
        from handlers.routes import network
        from handlers.service import NetworkService

        # Before anything is migrated or applied: a bus that applies the log elsewhere (perhaps an
        # older version, on this database) is not disturbed.
        await self.through_elections([f"KV_{BUCKET}"], "taking the lease by which one bus applies the log",
                                     lambda: self.take_lease(patience=self.consumer_settings.claim_patience or CLAIM_PATIENCE))
        self.doing = "migrating the read models"
        self.engine = make_engine(self.settings.db_url, checkpoints_in_background=True)
        await asyncio.to_thread(migrate, self.engine)
        assert self.tracing is not None
        self._checkpoint_in_background(WalCheckpointer.for_engine(self.engine), self._span_store_checkpointer())
        traced: Any = TracedNetwork((self.network_factory or network)(), self.consumer_settings.name, self.tracing)
        self.service = NetworkService(self.engine, traced)
        lock = asyncio.Lock()
        inline = self.engine.dialect.name == "sqlite"  # see bus.consumer.call_database
        self.relay = Relay(self.gate, self.service, lock, inline=inline)
        self.applied = AppliedWatch()
        lease = self.lease
        assert lease is not None
        self.consumer = consumer = Consumer(
            self.js, self.consumer_settings, self.service, on_derived=self.relay.wake.set, db_lock=lock, inline=inline,
            on_applied=self.applied.applied, may_apply=lambda: lease.fresh,
        )
        # Deadlines wait for what was logged before them; and timers act only while this bus holds the log.
        self.relay.clock = lambda: consumer.timers_now() if lease.fresh else None

        def holding(start: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
            async def started() -> None:
                if not lease.held:  # lost while migrating (or waiting for JetStream): what _lost stopped had not started yet
                    raise RuntimeError("another bus took over the log while this one was starting")
                await start()
            return started

        try:  # (the consumer is refused while another process applies the log: bus.consumer.claim_consumer)
            await self.through_elections([EVENTS_STREAM], "starting the read models' consumer", holding(consumer.start))
        except BaseException:
            self.consumer = self.relay = None  # never started: nothing of theirs to stop or drain
            raise
        await self.relay.start()
        from connectors.webhooks.dispatcher import WebhookDispatcher, webhook_consumer

        self.webhooks = WebhookDispatcher(
            self.engine, self.js, self.settings, consumer_settings=webhook_consumer(self.consumer_settings),
            timeout=self.webhook_timeout, db_lock=lock, tracing=self.tracing, network_consumer=traced.consumer,  # whose position in the read models says what they have applied
            may_apply=lambda: lease.fresh,
        )
        await self.through_elections([EVENTS_STREAM], "starting the webhooks' consumer", holding(self.webhooks.start))
        # Members read pages of the log over NATS where the read models (for what they may see) are.
        self.log_pages = LogPages(self.nc, self.js, self.engine, self.membership, from_leader=self.settings.stream_replicas > 1)
        await self.log_pages.start()
        from ops.status import keep_consumer_state, running_consumers

        self._state_file = asyncio.create_task(
            keep_consumer_state(self.settings.data_dir, lambda: running_consumers(self),
                                portal=lambda: self.portal_passes.state() if self.portal_passes is not None else None),
            name="consumer-state")

    async def take_lease(self, *, patience: float | None, on_wait: Any = None) -> None:
        """Hold the lease by which one bus applies the log (``bus.lease``), waiting up to
        ``patience`` seconds (None: until it is this bus's turn) for the bus holding it to go;
        :class:`bus.lease.LogHeld` when it does not."""
        if self.lease is not None and self.lease.held:
            return
        self.lease = Lease(self.js, self.consumer_settings.name, data_dir=str(self.settings.data_dir.resolve()),
                           replicas=self.settings.stream_replicas, on_lost=self._lost)
        try:
            await self.lease.take(patience=patience, on_wait=on_wait)
        except BaseException:
            self.lease = None
            raise

    async def _lost(self, holder: dict[str, Any]) -> None:
        """Another bus took the lease over: this one stops applying the log at once (its consumers,
        the relay, the webhooks) and says so (:attr:`lost_lease`); what it applied stays committed."""
        self.lost_to = holder
        try:
            await self._stop_state()
        finally:
            self.lost_lease.set()

    async def resume_after_rebuild(self) -> None:
        """Apply the log again once the rebuild that took it over from this bus (``rebuild --force``,
        :attr:`lost_to`) has finished: wait for it to let the lease go, then start the read models
        on what it rebuilt, as a bus starting on them does."""
        self.lease = None  # (taken from it: nothing of this bus's to release)
        await self.through_elections([f"KV_{BUCKET}"], "waiting for the rebuild to finish",
                                     lambda: self.take_lease(patience=None))
        if self._state_file is not None:
            self._state_file.cancel()
            await asyncio.gather(self._state_file, return_exceptions=True)
            self._state_file = None
        await self._close_database()
        self.lost_to = None
        self.lost_lease.clear()
        await self.start_state()

    async def _close_database(self) -> None:
        """Stop the background checkpoints of the SQLite files and let the read models' engine go."""
        for checkpointer in self.checkpointers:
            await asyncio.to_thread(checkpointer.stop)
        self.checkpointers = []
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None

    async def _stop_state(self) -> None:
        """Stop what applies the log; each part is taken before it is stopped, so that two callers
        (a stop while a lost lease is being handled) do not stop one twice."""
        log_pages, self.log_pages = self.log_pages, None
        if log_pages is not None:
            await log_pages.stop()
        webhooks, self.webhooks = self.webhooks, None
        if webhooks is not None:
            await webhooks.stop()
        consumer, self.consumer = self.consumer, None
        if consumer is not None:
            await consumer.stop()
        relay, self.relay = self.relay, None
        if relay is not None:
            await relay.stop()

    async def start_http(self) -> None:
        """Serve the HTTP gateway at ``settings.http`` in this event loop (after :meth:`start`);
        a server already listening there (:attr:`http`: what ``collabbus up`` answers while it starts
        or stands by, ``connectors.http.starting``) serves it from now on."""
        from connectors.http.server import HttpGateway

        if self.http is not None:
            self.http.serve_gateway()
            return
        host, port = self.settings.http_host_port
        self.http = HttpGateway(self, host, port)
        await self.http.start()

    async def ensure_operator(self) -> Verdict | None:
        """The network's operator is its first member, created on the first start."""
        operator = self.settings.operator
        if await self.membership.kind_of(operator) is not None:
            return None
        verdict = await self.gate.publish_internal(
            {
                "specversion": "1.0",
                "id": f"institution.joined.{operator}",
                "source": source_of(operator),
                "type": "institution.joined",
                "subject": operator,
                "data": {
                    "id": operator,
                    "name": {"en": self.settings.operator_name},
                    "kind": "operator",
                    "country": self.settings.operator_country,
                },
            }
        )
        if verdict.reason == "unavailable":
            raise Unanswered(f"the log did not take the operator {operator!r}'s joining "
                             f"({'; '.join(problem.msg for problem in verdict.errors)})")
        if not verdict.accepted:
            raise RuntimeError(f"could not register the operator {operator!r}: {verdict.as_dict()}")
        log.info("registered the network operator %r", operator)
        return verdict

    async def stop(self) -> None:
        """Drain subscriptions and connections, then stop the embedded server."""
        if self.gates is not None:
            await self.gates.stop()
            self.gates = None
        await self.close_ingress()
        if self.applied is not None:
            self.applied.close()  # long polls answer now, not at the end of their wait
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self._state_file is not None:
            self._state_file.cancel()
            await asyncio.gather(self._state_file, return_exceptions=True)
            self._state_file = None
        await self._stop_state()
        if self.lease is not None:
            await self.lease.release()  # the next bus takes it at once
            self.lease = None
        await self._close_database()
        if hasattr(self, "gate"):
            await self.gate.stop()
        if hasattr(self, "membership"):
            await self.membership.stop()
        if hasattr(self, "broker"):
            connection = self.broker._connection  # (None when it never connected)
            if connection is not None and (connection.is_reconnecting or connection.is_connecting):
                # NATS is away (an embedded server gone first, a cut): nothing can be drained, and
                # nats-py's closing may meet the socket already reset.
                with contextlib.suppress(OSError):
                    await connection.close()
            with contextlib.suppress(ConnectionClosedError, OSError):  # (closed or reset: nothing to drain either)
                await self.broker.stop()
        if self._watching is not None:
            self._watching.cancel()
            await asyncio.gather(self._watching, return_exceptions=True)
            self._watching = None
        if self.server is not None:
            await self.server.astop()
            self.server = None
        if self.tracing is not None and self._own_tracing:
            await asyncio.to_thread(self.tracing.shutdown)  # what is left is written out
            self.tracing, self._own_tracing = None, False

    async def __aenter__(self) -> "Bus":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def keep_startup_objects() -> None:
    """For a long-running process, once it has started: what start-up built (modules, schemas,
    models, the app) lives as long as the process, so the garbage collector stops walking it.
    Otherwise every full collection walks it all, and the whole process stalls for 100–200 ms
    while it does; a bus answering within milliseconds cannot have that. Young objects are also
    collected less often (most die young either way)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)


async def run_forever(bus: Bus, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then drain."""
    try:
        await stop.wait()
    finally:
        await bus.stop()
