"""``/webhooks``: an institution's webhook endpoints, their deliveries, resending and recovery
(CONTRACT §6). Each endpoint belongs to the institution whose token registered it; another
institution's endpoints answer 404, as if they did not exist.

The secret is shown twice only: when the endpoint is created and when it is rotated.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlmodel import Session, col, func, select
from starlette.concurrency import run_in_threadpool

from bus.streams import EVENTS_STREAM
from bus.verdict import Problem
from connectors.http.auth import Member, bus_of, engine_of
from connectors.http.paging import DEFAULT_LIMIT, Cursor, Limit, Page, keyset_page
from connectors.http.problems import ApiProblem, documented, retry_after
from connectors.webhooks import dispatcher, store, targets
from connectors.webhooks.signing import new_secret
from connectors.webhooks.store import Delivery, Endpoint
from handlers.db import session_scope
from schemas import registry
from schemas.common import Timestamp, without_nul
from schemas.envelope import source_of

if TYPE_CHECKING:
    from connectors.webhooks.dispatcher import WebhookDispatcher

router = APIRouter(prefix="/webhooks", tags=["webhooks"])
log = logging.getLogger("collabbus.webhooks")

ROTATION_OVERLAP = timedelta(hours=24)
MAX_ENDPOINTS = 50
"""The endpoints a member may have (enabled or not): each is sent every event it asks for, by the
one webhooks dispatcher of the bus, so one member's thousands would slow every other's."""
"""How long a rotated-out secret keeps signing, so receivers can switch at their own pace."""

EndpointId = Annotated[str, Path(min_length=1, max_length=32, description="the endpoint's `id`")]
DeliveryId = Annotated[int, Path(ge=1, le=2**31 - 1, description="the delivery's `id`")]
T = TypeVar("T")


# --- bodies -------------------------------------------------------------------------------------


class _Body(BaseModel):
    """A request body: its own fields only, each of its JSON type (``true``, not ``"yes"`` or
    ``1``; a list, not a string), and times as RFC 3339 text (not Unix timestamps)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class EndpointCreate(_Body):
    url: str = Field(max_length=targets.MAX_URL_LENGTH, description="http(s) URL that receives the events")
    event_types: list[str] = Field(
        default_factory=list, max_length=100,
        description="types (`project.registered`) or domains (`project` or `project.*`); left out or empty: every type (there is no `*`)"
    )
    description: Annotated[str, AfterValidator(without_nul)] = Field("", max_length=1000)
    ordered: bool = Field(True, description="deliveries about one thing (an event's domain and subject) in log order, "
                                            "each after the one before it was delivered or given up; false: all in any order")


class EndpointChange(_Body):
    url: str | None = Field(None, max_length=targets.MAX_URL_LENGTH)
    event_types: list[str] | None = Field(None, max_length=100)
    description: Annotated[str | None, AfterValidator(without_nul)] = Field(None, max_length=1000)
    enabled: bool | None = Field(None, description="false disables the endpoint, true enables it again")
    ordered: bool | None = Field(None, description="deliveries about one thing in log order (true) or all in any order (false)")
    rotate_secret: bool = Field(False, description="issue a new secret; the old one keeps signing for 24 h")


class Recovery(_Body):
    since: Timestamp | None = Field(None, description="the events logged from then on (give this or `after_seq`)")
    until: Timestamp | None = Field(None, description="the events logged until then (default: now)")
    after_seq: int | None = Field(None, ge=0, le=2**63 - 1, description=(
        "the events after this log sequence: the endpoint's `disabled_after_seq` for what it missed while disabled"))
    until_seq: int | None = Field(None, ge=0, le=2**63 - 1, description=(
        "the events up to this log sequence: the endpoint's `enabled_after_seq` for what it missed while disabled"))


class WebhookEndpoint(BaseModel):
    id: str
    url: str
    event_types: list[str]
    description: str
    enabled: bool
    ordered: bool = Field(description="deliveries about one thing go in log order")
    disabled_reason: str | None
    disabled_at: datetime | None = Field(
        description="when it was last disabled (kept after it is enabled again)"
    )
    disabled_after_seq: int | None = Field(
        description="where the log was when it was last disabled: the events up to this sequence are owed to it (sent "
                    "once it is enabled again), the later ones not while it is disabled"
    )
    enabled_after_seq: int | None = Field(
        description="where the log was when it was last enabled again (null while it is disabled): the events after "
                    "this sequence are owed again; those between the two, logged while it was disabled, are not — "
                    '`POST …/recover {"after_seq": disabled_after_seq, "until_seq": enabled_after_seq}` fetches them'
    )
    created_at: datetime
    updated_at: datetime
    last_success_at: datetime | None
    failing_since: datetime | None = Field(description=(
        "the first failed attempt of its current run of failures (null while it takes deliveries): a run ends with a "
        "success, a new `url`, or a pause longer than the retry schedule's longest wait; five days of it disable the endpoint"))
    last_failure_at: datetime | None = Field(description="its last failed attempt")
    previous_secret_until: datetime | None = Field(description="until then the previous secret signs too")


class WebhookEndpointShown(WebhookEndpoint):
    held_back: int = Field(description="events for this endpoint in the bus's dead-letter queue: ones it could not record "
                                       "for webhooks, and the later events about the same things set aside behind them; "
                                       "delivered, in the log's order, once the operator replays them")


class WebhookEndpointWithSecret(WebhookEndpoint):
    secret: str = Field(description="`whsec_…`: verify deliveries with it (Standard Webhooks)")


class WebhookEndpointChanged(WebhookEndpoint):
    secret: str | None = Field(None, description="the new secret, when the change rotated it")
    cancelled: int = Field(0, description="deliveries still owed of types the changed `event_types` no longer asks for: "
                                          "cancelled by this change (`status` cancelled), not sent")


class DeliveryAttempt(BaseModel):
    attempted_at: datetime
    status_code: int | None
    latency_ms: int
    error: str | None
    response: str | None = Field(description="the first KiB of the response body")


class WebhookDelivery(BaseModel):
    id: int
    event_id: str
    event_type: str
    seq: int
    ordering_key: str | None = Field(description="what the event is about (`{domain}/{subject}`): deliveries with the same "
                                                 "key reach the endpoint in log order")
    waiting_for: int | None = Field(description="the delivery about the same thing still owed that goes first: this one "
                                                "is sent after it was delivered or given up")
    status: store.DeliveryStatus = Field(description=(
        "pending: owed; delivered; failed: given up by the bus (its retry schedule ended, the endpoint answered 410); "
        "cancelled: by the endpoint's owner (…/cancel, or its type no longer asked for: see `cancelled_by`)"))
    cancelled_by: store.CancelledBy | None = Field(None, description=(
        "how a cancelled delivery was cancelled: owner, by hand (…/cancel); filter, by a change of the endpoint's "
        "`event_types` that no longer asks for its type. Null for any other delivery (and for one cancelled before "
        "the bus kept it)"))
    next_attempt_at: datetime | None = Field(description="when it is next tried (null once delivered, given up or "
                                                        "cancelled); one waiting for another, not before that one's")
    created_at: datetime
    delivered_at: datetime | None
    attempts: list[DeliveryAttempt]


class TestSent(DeliveryAttempt):
    id: str = Field(description="the `webhook-id` the test delivery was sent as (`test_…`: no event of the log)")
    delivered: bool = Field(description="whether the endpoint answered 2xx, as a delivery needs")


class Recovered(BaseModel):
    queued: int = Field(description="events owed to the endpoint again")
    held_back: int = Field(description="events of the window not owed now: the bus set them aside behind one it could not "
                                       "record for webhooks (in its dead-letter queue); they are owed, in the log's order, "
                                       "when the operator replays it")


# --- helpers --------------------------------------------------------------------------------------


def _dispatcher(request: Request) -> "WebhookDispatcher | None":
    return bus_of(request).webhooks  # type: ignore[no-any-return]


def _check_event_types(event_types: list[str]) -> list[str]:
    """The types, each once; 422 naming every one that is neither a type nor a domain of the catalog.
    A domain is ``project.*``, or ``project`` as ``GET /events?type=`` takes it (kept as ``project.*``).
    A wildcard for everything (``*``) is told how every type is asked for: there is no such name."""
    errors = [
        Problem(("event_types", place), message + (EVERY_TYPE if _everything(event_types[place]) else ""), "unknown_event_type")
        for place, message in registry.unknown_filters(event_types)
    ]
    if errors:
        raise ApiProblem(422, "; ".join(e.msg for e in errors), kind="invalid", errors=errors)
    domains = set(registry.domains())
    return list(dict.fromkeys(f"{name}.*" if name in domains else name for name in event_types))


EVERY_TYPE = "; every type is asked for by leaving event_types out (or [])"


def _everything(name: str) -> bool:
    """Whether a name is a wildcard meant for every type (``*``, ``*.*``)."""
    return "*" in name and not name.strip("*. ")


async def _check_url(request: Request, url: str) -> None:
    """422 when the URL's host resolves to no address webhooks may go to."""
    try:
        await targets.resolve(url, targets.networks(bus_of(request).settings.webhook_allow_networks))
    except targets.RefusedTarget as exc:
        raise ApiProblem(422, str(exc), kind="refused_target", errors=[Problem(("url",), str(exc), "refused_target")]) from None


def _not_found(endpoint_id: str) -> ApiProblem:
    return ApiProblem(404, f"no webhook endpoint {endpoint_id!r}", kind="not_found")


def _check_enabled(endpoint: Endpoint) -> None:
    """409 ``endpoint_disabled`` for a disabled endpoint: nothing is sent to it, so nothing is
    owed to it by hand either (what it was owed waits, and goes once it is enabled again)."""
    if endpoint.enabled:
        return
    why = f" ({endpoint.disabled_reason})" if endpoint.disabled_reason else ""
    detail = (f"webhook endpoint {endpoint.id!r} is disabled{why}: nothing is sent to it; "
              f'PATCH /webhooks/{endpoint.id} {{"enabled": true}} enables it again')
    raise ApiProblem(409, detail, kind="endpoint_disabled", errors=[Problem((), detail, "endpoint_disabled")])


async def _in_transaction(request: Request, work: Callable[[Session], T], *, read_only: bool = False) -> T:
    """``work`` in one transaction; ``read_only``: one that only reads, so what it reads in several
    statements (deliveries, then their attempts) is one moment while the dispatcher settles attempts."""

    def run() -> T:
        with session_scope(engine_of(request), read_only=read_only) as session:
            return work(session)

    return await run_in_threadpool(run)


async def _owned(request: Request, institution: str, endpoint_id: str) -> Endpoint:
    def find(session: Session) -> Endpoint:
        endpoint = store.endpoint_of(session, institution, endpoint_id)
        if endpoint is None:
            raise _not_found(endpoint_id)
        return endpoint

    return await _in_transaction(request, find, read_only=True)


def _endpoint(endpoint: Endpoint, *, secret: bool = False) -> dict[str, Any]:
    hidden = {"institution", "after_seq", "earlier_gaps", "previous_secret"} | (set() if secret else {"secret"})
    return endpoint.model_dump(exclude=hidden)


def _deliveries(session: Session, endpoint: Endpoint, deliveries: Sequence[Delivery]) -> list[dict[str, Any]]:
    """The endpoint's deliveries as shown, each with its attempts and what it waits for."""
    ids = [delivery.id for delivery in deliveries if delivery.id is not None]
    attempts = store.attempts_of(session, ids)
    waiting = store.waiting_for(session, deliveries) if endpoint.ordered else {}
    shown = []
    for delivery in deliveries:
        if delivery.id is None:
            continue
        row = {**delivery.model_dump(), "waiting_for": None, "attempts": [attempt.model_dump() for attempt in attempts[delivery.id]]}
        if delivery.id in waiting:  # not before the delivery it waits for is tried again
            row["waiting_for"], first_due = waiting[delivery.id]
            row["next_attempt_at"] = _as_utc(max(delivery.next_attempt_at, first_due, key=_as_utc))
        shown.append(row)
    return shown


def _as_utc(moment: datetime | None) -> datetime:
    """(SQLite gives times without their zone, UTC.)"""
    if moment is None:
        return datetime.min.replace(tzinfo=timezone.utc)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


# --- endpoints ------------------------------------------------------------------------------------

ERRORS = documented(401, 403, 404, 422)
BODY_ERRORS = documented(400, 415)
"""A body that is not JSON; one sent as another media type, or none at all."""


@router.post("", status_code=201, response_model=WebhookEndpointWithSecret, responses={**documented(401, 403, 409, 422, 503), **BODY_ERRORS})
async def create_endpoint(request: Request, response: Response, body: EndpointCreate, institution: Member) -> dict[str, Any]:
    """Register an endpoint; it receives the events logged from now on. Keep the secret: it is not shown again.
    The answer's ``Location`` is the endpoint's (``/webhooks/{id}``)."""
    event_types = _check_event_types(body.event_types)
    await _check_url(request, body.url)
    after_seq = (await bus_of(request).js.stream_info(EVENTS_STREAM)).state.last_seq
    now = datetime.now(timezone.utc)

    def create(session: Session) -> Endpoint:
        held = session.exec(select(func.count()).select_from(Endpoint).where(Endpoint.institution == institution)).one()
        if held >= MAX_ENDPOINTS:
            raise ApiProblem(409, (
                f"{institution} has {held} webhook endpoints, as many as a member may have: delete one it no longer uses "
                "(DELETE /webhooks/{id}), or let one endpoint take more event types"), kind="conflict")
        return store.create_endpoint(session, institution, body.url, event_types, body.description, after_seq=after_seq, now=now,
                                     ordered=body.ordered)

    endpoint = await _in_transaction(request, create)
    if (running := _dispatcher(request)) is not None:
        await running.endpoint_changed(endpoint.id, True)
    response.headers["location"] = f"{router.prefix}/{endpoint.id}"
    return _endpoint(endpoint, secret=True)


@router.get("", response_model=Page[WebhookEndpoint], responses=documented(400, 401, 403, 422))
async def list_endpoints(request: Request, institution: Member, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict[str, Any]:
    """Your endpoints, oldest first."""

    def page(session: Session) -> dict[str, Any]:
        query = select(Endpoint).where(Endpoint.institution == institution)
        rows, next_cursor = keyset_page(session, query, [col(Endpoint.created_at), col(Endpoint.id)], limit=limit, cursor=cursor)
        return {"items": [_endpoint(row) for row in rows], "next_cursor": next_cursor}

    return await _in_transaction(request, page, read_only=True)


@router.get("/{endpoint_id}", response_model=WebhookEndpointShown, responses={**ERRORS, **documented(503)})
async def get_endpoint(request: Request, endpoint_id: EndpointId, institution: Member) -> dict[str, Any]:
    """One of the caller's endpoints: where it sends what, whether it is enabled and how it fares,
    and how many of its events the bus holds back in its dead-letter queue (``held_back``)."""
    endpoint = await _owned(request, institution, endpoint_id)
    bus = bus_of(request)
    held = await dispatcher.held_back(bus.js, engine_of(request), endpoint,
                                      consumer=dispatcher.webhook_consumer(bus.consumer_settings).name)
    return {**_endpoint(endpoint), "held_back": held}


@router.patch("/{endpoint_id}", response_model=WebhookEndpointChanged, responses={**ERRORS, **BODY_ERRORS})
async def change_endpoint(request: Request, endpoint_id: EndpointId, body: EndpointChange, institution: Member) -> dict[str, Any]:
    """Change the URL, the event types, the description or whether deliveries are ordered; enable
    or disable; rotate the secret (the answer then holds the new one). A new URL is not failing
    (``failing_since``) for what the old one did. Event types changed, the deliveries still owed
    of types no longer asked for are cancelled, not sent (the answer counts them: ``cancelled``)."""
    event_types = None if body.event_types is None else _check_event_types(body.event_types)
    if body.url is not None:
        await _check_url(request, body.url)
    bus = bus_of(request)
    # Where the log is, asked only of a change that enables or disables the endpoint: one disabled
    # is owed what was logged up to here, one enabled again what is logged after it (never what the
    # recorder happens to get to before or after the change). A body naming the endpoint's present
    # state changes nothing of it, and neither asks NATS nor holds the recorder.
    current = await _owned(request, institution, endpoint_id) if body.enabled is not None or event_types is not None else None
    toggles = current is not None and body.enabled is not None and body.enabled != current.enabled
    retypes = current is not None and event_types is not None and event_types != current.event_types
    logged = (await bus.js.stream_info(EVENTS_STREAM)).state.last_seq if toggles else None
    now = datetime.now(timezone.utc)
    disabled: list[str] = []
    cancelled: list[int] = []

    def change(session: Session) -> Endpoint:
        # The recorder's position first (before the endpoint's row, as the recorder takes them):
        # what it recorded already is behind the place the change is made at; of event types
        # changed, what it records from now on is of the new ones, and what it recorded is here
        # to cancel.
        consumer = dispatcher.webhook_consumer(bus.consumer_settings).name
        recorded = store.hold_recorded(session, consumer) if logged is not None or retypes else 0
        at = max(logged, recorded) if logged is not None else 0
        endpoint = store.endpoint_of(session, institution, endpoint_id)
        if endpoint is None:
            raise _not_found(endpoint_id)
        if logged is None and body.enabled is not None and body.enabled != endpoint.enabled:
            raise _Toggled()  # enabled or disabled by the bus meanwhile (a 410, say): asked again, with the log's place
        if body.url is not None and body.url != endpoint.url:
            # A receiver at a new URL starts afresh: it is not failing for what the old one did
            # (it would be disabled by its first failure, for the old URL's days without a success).
            endpoint.failing_since = None
        for name, value in (("url", body.url), ("event_types", event_types), ("description", body.description),
                            ("ordered", body.ordered)):
            if value is not None:
                setattr(endpoint, name, value)
        if body.enabled is False and endpoint.enabled:
            store.disable(endpoint, store.OWNER_REASON, now, after_seq=at, settled=store.settled_up_to(session.connection(), consumer, recorded))
            disabled.append(endpoint.id)
        elif body.enabled and not endpoint.enabled:
            store.enable(endpoint, now, after_seq=at)
        if event_types is not None:  # what it no longer asks for is not sent, though owed from before
            cancelled.append(store.cancel_unwanted(session, endpoint.id, event_types))
        if body.rotate_secret:
            endpoint.previous_secret, endpoint.previous_secret_until = endpoint.secret, now + ROTATION_OVERLAP
            endpoint.secret = new_secret()
        endpoint.updated_at = now
        session.add(endpoint)
        return endpoint

    try:
        endpoint = await _in_transaction(request, change)
    except _Toggled:
        logged = (await bus.js.stream_info(EVENTS_STREAM)).state.last_seq
        endpoint = await _in_transaction(request, change)
    if disabled:
        log.info("webhooks: endpoint %s of %s disabled by its owner", endpoint.id, institution,
                 extra={"endpoint_id": endpoint.id, "institution": institution, "disabled_reason": store.OWNER_REASON})
    if (running := _dispatcher(request)) is not None:
        await running.endpoint_changed(endpoint.id, endpoint.enabled)  # (what waited behind a cancelled delivery goes)
    return {**_endpoint(endpoint, secret=body.rotate_secret), "cancelled": sum(cancelled[-1:])}


class _Toggled(Exception):
    """The endpoint was enabled or disabled between a change's look at it and the change."""


@router.delete("/{endpoint_id}", status_code=204, response_class=Response, responses=ERRORS)
async def delete_endpoint(request: Request, endpoint_id: EndpointId, institution: Member) -> Response:
    """Forget the endpoint, its deliveries and their attempts."""

    def delete(session: Session) -> None:
        endpoint = store.endpoint_of(session, institution, endpoint_id)
        if endpoint is None:
            raise _not_found(endpoint_id)
        store.delete_endpoint(session, endpoint)

    await _owned(request, institution, endpoint_id)
    if (running := _dispatcher(request)) is not None:
        await running.endpoint_changed(endpoint_id, False)  # its attempts under way end before the delete
    await _in_transaction(request, delete)
    return Response(status_code=204)


@router.post("/{endpoint_id}/test", response_model=TestSent, responses=documented(401, 403, 404, 422, 429))
async def test_endpoint(request: Request, endpoint_id: EndpointId, institution: Member) -> dict[str, Any]:
    """Send the endpoint a test delivery now, signed as deliveries are, and answer what it
    answered: its status, how long it took, what went wrong in words, the first KiB of its answer.
    The delivery is a CloudEvent of type ``webhook.test`` (no event of the log: it has no
    ``collabbus-sequence``) with a ``webhook-id`` of its own (``test_…``). It is neither logged nor
    owed: it is not retried, not listed among the deliveries, and changes nothing of how the
    endpoint fares (``failing_since``, a 410 does not disable it); a disabled endpoint is sent it
    too, to try a receiver before enabling it again."""
    endpoint = await _owned(request, institution, endpoint_id)
    bus = bus_of(request)
    now = datetime.now(timezone.utc)
    msg_id = "test_" + secrets.token_hex(12)
    event = {
        "specversion": "1.0", "id": msg_id, "source": source_of(bus.settings.operator), "type": dispatcher.TEST_EVENT_TYPE,
        "subject": endpoint.id, "time": now.isoformat().replace("+00:00", "Z"), "datacontenttype": "application/json",
        "data": {"endpoint_id": endpoint.id, "url": endpoint.url,
                 "message": "a test delivery from collabbus: not an event of the log, nothing to keep"},
    }
    running = _dispatcher(request)
    if endpoint.id in _TESTING:  # (each test an outgoing request of up to the delivery timeout: one at a time)
        raise ApiProblem(429, f"a test delivery to {endpoint.id} is under way: ask again once it is answered",
                         kind="rate_limited", headers=retry_after(1))
    _TESTING.add(endpoint.id)
    try:
        outcome = await dispatcher.send_test(
            endpoint.url, endpoint.signing_secrets(now), msg_id, orjson.dumps(event),
            allow=targets.networks(bus.settings.webhook_allow_networks), timeout=running.timeout if running else dispatcher.TIMEOUT,
            **({"ssl_context": lambda: running.ssl_context} if running else {}),
        )
    finally:
        _TESTING.discard(endpoint.id)
    return {"id": msg_id, "attempted_at": now, "status_code": outcome.status_code, "latency_ms": outcome.latency_ms,
            "error": outcome.error, "response": outcome.response, "delivered": outcome.delivered}


_TESTING: set[str] = set()
"""The endpoints a test delivery is being sent to (by this bus process)."""


# --- deliveries -----------------------------------------------------------------------------------


@router.get("/{endpoint_id}/deliveries", response_model=Page[WebhookDelivery], responses=documented(400, 401, 403, 404, 422))
async def list_deliveries(
    request: Request,
    endpoint_id: EndpointId,
    institution: Member,
    status: Annotated[store.DeliveryStatus | None, Query(
        description="pending: owed (in flight or waiting for its retry); delivered; failed: given up by the bus (its "
                    "retry schedule ended, a 410); cancelled: by the endpoint's owner (…/cancel, or its type no longer asked for)")] = None,
    event_id: Annotated[str | None, Query(min_length=1, max_length=128, description=(
        "the delivery of this event (its `id`, which deliveries carry as `webhook-id`)"))] = None,
    event_type: Annotated[str | None, Query(max_length=128, description=(
        "deliveries of this type, or of a domain (`project`, or `project.*`)"))] = None,
    order: Annotated[Literal["asc", "desc"], Query(description=(
        "asc: the oldest first; desc: the newest first (ask for the next page, with `cursor`, in the same order)"))] = "asc",
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """The endpoint's deliveries, oldest first (``order=desc``: newest first), each with every
    attempt made (time, HTTP status, latency, error, the first KiB of the response), and for one
    held back by an earlier delivery about the same thing, which (``waiting_for``). ``event_id``
    finds an event's delivery (to ``resend`` it, say), ``event_type`` a type's or a domain's.
    Those delivered or given up are kept for the network's retention
    (``COLLABBUS_WEBHOOK_RETENTION_DAYS``, 90 days by default) after they were owed; ``POST
    …/recover`` owes events again from the log whatever was removed."""
    if event_type and (unknown := registry.unknown_filters([event_type])):
        errors = [Problem(("query", "event_type"), message, "unknown_event_type") for _, message in unknown]
        raise ApiProblem(422, errors[0].msg, kind="invalid", errors=errors)

    def page(session: Session) -> dict[str, Any]:
        endpoint = store.endpoint_of(session, institution, endpoint_id)
        if endpoint is None:
            raise _not_found(endpoint_id)
        query = select(Delivery).where(Delivery.endpoint_id == endpoint_id)
        if status is not None:
            query = query.where(Delivery.status == status)
        if event_id is not None:
            query = query.where(Delivery.event_id == event_id)
        if event_type:
            domain = event_type.removesuffix(".*")
            if domain in registry.domains():
                query = query.where(col(Delivery.event_type).startswith(f"{domain}.", autoescape=True))
            else:
                query = query.where(Delivery.event_type == event_type)
        rows, next_cursor = keyset_page(session, query, [col(Delivery.id)], limit=limit, cursor=cursor, descending=order == "desc")
        return {"items": _deliveries(session, endpoint, rows), "next_cursor": next_cursor}

    return await _in_transaction(request, page, read_only=True)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/resend", status_code=202, response_model=WebhookDelivery,
             responses={**ERRORS, **documented(409)})
async def resend_delivery(request: Request, endpoint_id: EndpointId, delivery_id: DeliveryId, institution: Member) -> dict[str, Any]:
    """Send the delivery again now, with the same ``webhook-id``, from a new round of the schedule.
    409 ``endpoint_disabled`` while the endpoint is disabled: ``PATCH {"enabled": true}`` first."""

    def resend(endpoint: Endpoint, delivery: Delivery) -> None:
        _check_enabled(endpoint)
        store.requeue(delivery, datetime.now(timezone.utc))

    return await _change_delivery(request, institution, endpoint_id, delivery_id, resend)


@router.post("/{endpoint_id}/deliveries/{delivery_id}/cancel", response_model=WebhookDelivery, responses=documented(401, 403, 404, 409, 422))
async def cancel_delivery(request: Request, endpoint_id: EndpointId, delivery_id: DeliveryId, institution: Member) -> dict[str, Any]:
    """Attempt a delivery no more: it is ``cancelled`` (not ``failed``, as one the bus gave up is),
    and the deliveries about the same thing held back behind it go (``resend`` sends it again
    later). 409 for a delivery already delivered."""

    def cancel(_endpoint: Endpoint, delivery: Delivery) -> None:
        if delivery.status == store.DELIVERED:
            raise ApiProblem(409, f"delivery {delivery.id} was delivered already: there is nothing to cancel", kind="conflict")
        if delivery.next_attempt_at is not None:  # (one the bus gave up already stays so)
            store.cancel(delivery)

    return await _change_delivery(request, institution, endpoint_id, delivery_id, cancel)


async def _change_delivery(request: Request, institution: str, endpoint_id: str, delivery_id: int,
                           change: Callable[[Endpoint, Delivery], None]) -> dict[str, Any]:
    """Apply ``change`` to one of the institution's deliveries (404 for any other), answer the
    delivery as it is then, and let the endpoint's worker look at what is due."""

    def changed(session: Session) -> dict[str, Any]:
        # Locked as the dispatcher locks it to settle an attempt: an attempt ending meanwhile is
        # settled before or after this change, never overwritten by it.
        delivery = session.get(Delivery, delivery_id, with_for_update=True)
        endpoint = store.endpoint_of(session, institution, endpoint_id)
        if endpoint is None or delivery is None or delivery.endpoint_id != endpoint_id:
            raise ApiProblem(404, f"no delivery {delivery_id} of webhook endpoint {endpoint_id!r}", kind="not_found")
        change(endpoint, delivery)
        session.add(delivery)
        session.flush()
        return _deliveries(session, endpoint, [delivery])[0]

    answer = await _in_transaction(request, changed)
    if (running := _dispatcher(request)) is not None:
        running.wake(endpoint_id)
    return answer


@router.post("/{endpoint_id}/recover", status_code=202, response_model=Recovered,
             responses={**ERRORS, **BODY_ERRORS, **documented(409, 503)})
async def recover(request: Request, endpoint_id: EndpointId, body: Recovery, institution: Member) -> dict[str, Any]:
    """Deliver again the endpoint's events that the log took between ``since`` and ``until``, or
    after ``after_seq`` and up to ``until_seq`` (read back from the log), whether they were
    delivered before or not. What it missed while it was disabled is ``{"after_seq":
    disabled_after_seq, "until_seq": enabled_after_seq}`` (of ``GET /webhooks/{id}``). 409
    ``endpoint_disabled`` while the endpoint is disabled: ``PATCH {"enabled": true}`` first."""
    if body.since is None and body.after_seq is None:
        message = "since or after_seq is required: where the window starts"
        raise ApiProblem(422, message, kind="invalid", errors=[Problem(("since",), message, "missing")])
    until = body.until or datetime.now(timezone.utc)
    if body.since is not None and body.until is None and until < body.since:
        raise ApiProblem(422, "since is in the future", kind="invalid", errors=[Problem(("since",), "in the future", "invalid_window")])
    if body.since is not None and until < body.since:
        raise ApiProblem(422, "until is before since", kind="invalid", errors=[Problem(("until",), "before since", "invalid_window")])
    if body.after_seq is not None and body.until_seq is not None and body.until_seq < body.after_seq:
        raise ApiProblem(422, "until_seq is before after_seq", kind="invalid",
                         errors=[Problem(("until_seq",), "before after_seq", "invalid_window")])
    endpoint = await _owned(request, institution, endpoint_id)
    _check_enabled(endpoint)
    bus = bus_of(request)
    queued, held_back = await dispatcher.recover(bus.js, engine_of(request), endpoint, body.since, until,
                                                 consumer=dispatcher.webhook_consumer(bus.consumer_settings).name,
                                                 after_seq=body.after_seq, until_seq=body.until_seq)
    if (running := _dispatcher(request)) is not None:
        running.wake(endpoint_id)
    return {"queued": queued, "held_back": held_back}
