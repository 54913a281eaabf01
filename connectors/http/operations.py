"""Operations: liveness, readiness, Prometheus metrics, the AsyncAPI document, the bus's status."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from nats.errors import Error as NatsError
from nats.js.errors import NotFoundError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from bus.connection import answering
from bus.verdict import Verdict
from connectors.http.auth import Member, bus_of
from connectors.http.problems import ApiProblem, documented, retry_after
from handlers.db import reading
from ops.metrics import WebhookAttempts
from ops.status import running_consumers

router = APIRouter(tags=["operations"])


class Metrics:
    """The gateway's Prometheus metrics, on a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "collabbus_http_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "collabbus_http_request_duration_seconds", "HTTP request latency", ["method", "route"], registry=self.registry
        )
        self.verdicts = Counter(
            "collabbus_http_events", "events offered over HTTP, by verdict", ["status", "reason"], registry=self.registry
        )
        self.long_polls = Gauge(
            "collabbus_http_long_polls", "long polls of GET /events waiting now (their time counts in the request duration)",
            registry=self.registry,
        )
        self.webhook_attempts = WebhookAttempts()

    def verdict(self, verdict: Verdict) -> None:
        self.verdicts.labels(verdict.status, verdict.reason or "").inc()


class MetricsMiddleware:
    """Counts and times every request by its route template (not its path: ids would explode the
    labels). Plain ASGI: Starlette's ``BaseHTTPMiddleware`` runs each request in a task group of
    its own, which cost more than many endpoints."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)


TOKEN_EXPIRES = b"collabbus-token-expires"
"""The header on every answer to a request whose token expires: when (RFC 3339, UTC), as GitHub's
API says of its expiring tokens, so that a member's client can warn while there is time to ask
for a new one."""


class TokenExpiry:
    """Adds :data:`TOKEN_EXPIRES` to the answer when the request's token expires (the auth
    dependency notes it in the request's state). Plain ASGI, as :class:`MetricsMiddleware`."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                expires = scope.get("state", {}).get("token_expires")  # (UTC: the tokens' column gives it so)
                if expires is not None:
                    stamp = expires.isoformat(timespec="seconds").replace("+00:00", "Z").encode()
                    message = {**message, "headers": [*message.get("headers", []), (TOKEN_EXPIRES, stamp)]}
            await send(message)

        await self.app(scope, receive, sending)


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    """``ready``, or ``not_ready`` with what is missing; each check is ``ok`` or the reason."""

    status: str
    checks: dict[str, str]


@router.get("/healthz", response_model=Health)
async def healthz() -> dict[str, str]:
    """The process is alive and serving."""
    return {"status": "ok"}


def database_check(engine: Any) -> str:
    """``ok`` when the read models' database answers a query; else why not."""
    if engine is None:
        return "read models not running"
    try:
        with reading(engine).connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except Exception as exc:  # any driver error means not ready
        return f"unreachable: {type(exc).__name__}"
    return "ok"


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness, "description": "not ready"}})
async def readyz(request: Request) -> JSONResponse:
    """Ready when NATS is connected, the database answers, the consumer groups are bound and NATS
    offers are judged (by the gatekeeper processes, or by this one while none is ready: a
    gatekeeper restarting says so in its check, and the bus stays ready); otherwise each failing
    check says why."""
    bus = bus_of(request)
    nats = await answering(bus.nc)
    checks = {
        "nats": nats,
        "database": await run_in_threadpool(database_check, bus.engine),
        "consumer": await _consumers_check(bus, server=nats == "ok"),
    }
    judged = True
    if bus.gates is not None:
        checks["gatekeepers"] = bus.gates.check(judging_here=bus.ingress is not None)
        # Not before every gatekeeper has been ready once (the bus starts); then one restarting
        # leaves the others, or this process, judging offers: still ready.
        judged = checks["gatekeepers"] == "ok" or (bus.gates.started and (bus.gates.ready > 0 or bus.ingress is not None))
    ready = judged and all(value == "ok" for name, value in checks.items() if name != "gatekeepers")
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503)


async def _consumers_check(bus: Any, *, server: bool) -> str:
    """``ok`` when every consumer group of this process follows the log and (``server``: when NATS
    can be asked) its durable consumer exists; else what is wrong."""
    if bus.consumer is None:
        return "not bound"
    problems = []
    for name, consumer in running_consumers(bus).items():
        if not consumer.running:
            problems.append(f"{name} is not running")
        elif consumer.trouble is not None:  # it cannot write the database: events wait
            problems.append(f"{name} is {consumer.trouble}")
        elif server:
            try:
                await bus.js.consumer_info(consumer.stream, name, timeout=2.0)
            except NotFoundError:
                problems.append(f"{name} is missing on the server")
            except Exception as exc:  # timeouts, JetStream errors: not ready either way
                problems.append(f"{name}: {type(exc).__name__}")
    return "; ".join(problems) or "ok"


async def bus_status(bus: Any) -> dict[str, Any]:
    """Streams, consumers and their lag, dead letters, database positions, webhook endpoints, the
    last backup: what ``collabbus status`` shows (``ops.status.collect_status``)."""
    from ops.status import collect_status

    return await collect_status(bus.js, bus.engine, running=running_consumers(bus), data_dir=bus.settings.data_dir,
                                portal=bus.portal_passes.state() if bus.portal_passes is not None else None)


METRICS_NATS_TIMEOUT = 2.0
"""Seconds /metrics waits for the log's and consumers' state before it answers without them."""


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    """Prometheus text exposition: the gateway's, the process's (gate, handlers) and the bus's
    state read now (log, consumer lag, dead letters, webhook attempts and endpoints; ``ops.metrics``)."""
    from connectors.webhooks.dispatcher import webhook_consumer
    from ops.backup import last_backup
    from ops.metrics import access_expiries, exposition, outbox_waiting, set_aside_counts, webhook_endpoints
    from ops.status import collect_status, consumer_state, running_consumers

    bus = bus_of(request)
    try:  # with NATS away, the rest is still served (a scrape must not fail exactly then)
        status: dict[str, Any] | None = await asyncio.wait_for(collect_status(bus.js, lease_holders=False), METRICS_NATS_TIMEOUT)
    except Exception:
        status = None
    nats_up = (await answering(bus.nc)) == "ok" if status is None else bus.nc.is_connected  # (it answered the status)
    registry: Metrics = request.app.state.metrics
    attempts = await run_in_threadpool(registry.webhook_attempts.read, bus.engine)
    endpoints = await run_in_threadpool(webhook_endpoints, bus.engine)
    outbox = await run_in_threadpool(outbox_waiting, bus.engine)
    consumers = (bus.consumer_settings.name, webhook_consumer(bus.consumer_settings).name)
    set_aside = await run_in_threadpool(set_aside_counts, bus.engine, consumers)
    expiries = await run_in_threadpool(access_expiries, bus.engine, bus.server.authority if bus.server is not None else None)
    return Response(exposition(status, attempts, registry.registry, gates=bus.gates, nats_connected=nats_up,
                               checkpointers=bus.checkpointers, outbox=outbox,
                               backup=last_backup(bus.settings.data_dir) or {}, expiries=expiries,
                               lease_age=bus.lease.renewed_ago if bus.lease is not None else None, set_aside=set_aside,
                               webhook_endpoints=endpoints, consumers=consumer_state(running_consumers(bus)),
                               portal=bus.portal_passes),
                    media_type=CONTENT_TYPE_LATEST)


@router.get("/ops/status", responses=documented(401, 403, 503))
async def ops_status(request: Request, caller: Member) -> dict[str, Any]:
    """The bus's streams and consumers, for the network's operator."""
    bus = bus_of(request)
    if caller != bus.settings.operator:
        raise ApiProblem(403, "the bus's status is for the network's operator", kind="operator_only")
    try:
        return await asyncio.wait_for(bus_status(bus), STATUS_TIMEOUT)
    except (asyncio.TimeoutError, NatsError) as exc:  # (nats-py's TimeoutError is asyncio's too)
        raise ApiProblem(
            503, f"NATS does not answer the bus ({type(exc).__name__}): the status cannot be read now; "
                 "/readyz and /metrics say what they can", kind="unavailable", headers=retry_after(5),
        ) from None


STATUS_TIMEOUT = 10.0
"""Seconds /ops/status waits for NATS to tell the log's and consumers' state."""


@router.get("/ops/traces/{trace_id}", responses=documented(401, 403, 404))
async def ops_trace(
    trace_id: Annotated[str, Path(description="a trace id (32 hexadecimal digits: the second part of an event's `traceparent`)")],
    request: Request,
    caller: Member,
) -> dict[str, Any]:
    """One trace as a tree of spans (service, operation, institution, event type, duration,
    status, errors), from the embedded trace store, for the network's operator."""
    from ops import tracing

    bus = bus_of(request)
    if caller != bus.settings.operator:
        raise ApiProblem(403, "traces are for the network's operator", kind="operator_only")
    trace_id = trace_id.lower()
    if not tracing.TRACE_ID_PATTERN.match(trace_id):
        raise ApiProblem(404, f"no trace {trace_id!r}: a trace id is 32 hexadecimal digits", kind="not_found")
    store = bus.settings.data_dir / tracing.STORE_FILE
    try:
        found = await run_in_threadpool(tracing.load_trace, store, trace_id)
    except tracing.TraceStoreMissing:
        found = None
    if found is None:
        where = "" if bus.tracing is None or bus.tracing.exporter == "local" else f" (spans are not kept here: {bus.tracing.describe()})"
        raise ApiProblem(404, f"no trace {trace_id} in the trace store{where}", kind="not_found")
    return found


def _nats_address(request: Request) -> str:
    """The bus's (first) NATS address as ``host:port``, for the document's server."""
    return str(bus_of(request).settings.nats_address)


@router.get("/asyncapi.json")
async def asyncapi_json(request: Request) -> dict[str, Any]:
    """The AsyncAPI 3 document of the NATS interface."""
    from bus.asyncapi import asyncapi_document

    return asyncapi_document(_nats_address(request))


class _Document:
    """What FastStream's HTML renderer reads of a specification: the title and the JSON."""

    def __init__(self, document: dict[str, Any]) -> None:
        self.title = document.get("info", {}).get("title", "collabbus")
        self._document = document

    def to_json(self) -> str:
        import json

        return json.dumps(self._document)


@router.get("/docs/asyncapi", response_class=HTMLResponse, responses=documented(404))
async def asyncapi_html(
    request: Request,
    domain: Annotated[str | None, Query(max_length=64, description="one domain's subjects and the schemas they use (`call`, say)")] = None,
) -> HTMLResponse:
    """The AsyncAPI document rendered for people: subjects, messages and schemas, on a page that
    needs nothing from outside the gateway; ``?domain=call`` (say) shows one domain's subjects and
    the schemas they use."""
    if domain is not None:
        from schemas import registry

        known = registry.domains()
        if domain not in known:
            raise ApiProblem(404, f"no domain {domain[:100]!r} in the catalog; the domains are {', '.join(known)}")
    return HTMLResponse(await run_in_threadpool(_asyncapi_page, _nats_address(request), domain))


@functools.lru_cache(maxsize=32)
def _asyncapi_page(address: str, domain: str | None = None) -> str:
    """The page for the NATS ``address`` partners are told (built once per domain: the catalog is fixed)."""
    from bus.asyncapi import asyncapi_document
    from connectors.http.asyncapi_page import render

    return render(asyncapi_document(address), interactive="/docs/asyncapi/interactive", domain=domain)


@router.get("/docs/asyncapi/interactive", response_class=HTMLResponse)
async def asyncapi_interactive(request: Request) -> HTMLResponse:
    """FastStream's AsyncAPI page (its script and style come from a public CDN)."""
    from faststream.specification import get_asyncapi_html

    from bus.asyncapi import asyncapi_document

    return HTMLResponse(get_asyncapi_html(_Document(asyncapi_document(_nats_address(request))), try_it_out_path=None))  # type: ignore[arg-type]
