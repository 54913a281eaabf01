"""``/events``: offering events in the three CloudEvents HTTP modes, and reading the log.

Every offered event goes through the gatekeeper (``bus.gate.admit``), exactly as over NATS: the
gateway only finds the events in the request (structured, binary or batch), enforces transport
limits (body size, rate) and maps the verdict to an HTTP status.
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import StringConstraints
from starlette.concurrency import run_in_threadpool

from bus import cloudevents, log, logpages
from bus.logpages import MAX_SEQ, MAX_TYPES
from bus.gate import INPUT_FACTOR
from bus.log import event_filter
from bus.watch import AppliedWatch
from bus.verdict import Problem
from connectors.http import resources
from connectors.http.auth import Member, Publisher, bus_of, engine_of
from connectors.http.paging import DEFAULT_LIMIT, Cursor, Limit, Page
from connectors.http.problems import ApiProblem, documented, rejection, retry_after
from bus.ratelimit import RateLimiter
from handlers.bookkeeping import applied_event
from handlers.db import reading
from schemas import registry
from schemas.common import json_type
from schemas.envelope import EVENT_ID_PATTERN, INSTITUTION_PATTERN, STRUCTURED_CONTENT_TYPE, SUBJECT_PATTERN

router = APIRouter(tags=["events"])

BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"
STRUCTURED = {"content-type": STRUCTURED_CONTENT_TYPE}
MAX_WAIT = 60
"""The longest long poll of ``GET /events``, in seconds."""
LONG_POLL_RECHECK = 5.0
"""Seconds a long poll waits for this process's consumer before it looks at the log again anyway."""
DISCONNECT_CHECK = 1.0
"""Seconds between a waiting long poll's looks whether its client is still there."""
MAX_LONG_POLLS = 8
"""Long polls one institution may have waiting at once: more are answered 429 (a follower needs
one; a shared bus does not hold connections without end)."""
#: Most events one batch may carry (also never more than the rate limit's burst).
MAX_BATCH_EVENTS = 500
#: A batch body may be this many times the largest event.
BATCH_BODY_FACTOR = 8

Mode = Literal["structured", "binary", "batch"]


def _media_type(headers: Mapping[str, str]) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def transport_mode(headers: Mapping[str, str]) -> Mode:
    """Which CloudEvents HTTP mode a request uses; 415 for a body that cannot hold JSON events.

    ``application/json`` without ``ce-`` headers is taken as a structured event (what a plain
    HTTP client sends); with them, it is binary mode's data.
    """
    media_type = _media_type(headers)
    if media_type == BATCH_CONTENT_TYPE:
        return "batch"
    if media_type == STRUCTURED_CONTENT_TYPE:
        return "structured"
    binary = any(key.lower().startswith("ce-") for key in headers)
    if not media_type.startswith("application/cloudevents") and _is_json(media_type):
        return "binary" if binary else "structured"
    if binary and not media_type:
        return "binary"
    refused = f"{media_type} is not accepted:" if media_type else "the request has no Content-Type;"
    raise ApiProblem(
        415,
        f"{refused} send {STRUCTURED_CONTENT_TYPE}, {BATCH_CONTENT_TYPE}, or ce- headers with application/json data",
        kind="unsupported",
    )


def content_coding(headers: Mapping[str, str]) -> str | None:
    """``gzip`` for a compressed body (``x-gzip`` is gzip's old name), None for a plain one
    (``identity``); 415 for a coding not taken."""
    codings = [c.strip().lower() for c in headers.get("content-encoding", "").split(",") if c.strip()]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if codings in (["gzip"], ["x-gzip"]):
        return "gzip"
    raise ApiProblem(
        415, f"Content-Encoding {headers.get('content-encoding')!r} is not accepted: send the body as it is, or gzip it",
        kind="unsupported", headers={"Accept-Encoding": "gzip"},
    )


async def _read_body(request: Request, limit: int, why: str) -> bytes:
    """The body, refused (413) as soon as it is known to exceed ``limit`` — before reading it when
    ``Content-Length`` says so; ``why`` says where the limit comes from. A gzipped body is
    inflated as it arrives, and the limit holds for what it inflates to (and for what is sent)."""
    coding = content_coding(request.headers)
    declared = request.headers.get("content-length", "")
    too_large = ApiProblem(413, f"the body is over {limit} bytes, {why}", kind="too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    inflate = zlib.decompressobj(wbits=31) if coding == "gzip" else None  # (31: with gzip's header)
    sent = 0
    async for chunk in request.stream():
        sent += len(chunk)
        if inflate is not None:
            if sent > limit:
                raise too_large
            try:  # never more than one byte past the limit: a small body may inflate to gigabytes
                chunk = inflate.decompress(chunk, limit + 1 - len(body))
            except zlib.error as exc:
                raise ApiProblem(400, f"the body is not valid gzip ({exc})", kind="malformed") from None
        body += chunk
        if len(body) > limit:
            raise too_large
    if inflate is not None:
        if inflate.unconsumed_tail:
            raise too_large
        if not inflate.eof or inflate.unused_data:
            raise ApiProblem(400, "the body is not valid gzip (it ends early, or something follows the gzip data)",
                             kind="malformed")
    return bytes(body)


def _throttle(limiter: RateLimiter, institution: str, cost: int) -> None:
    wait = limiter.take(institution, cost)
    if wait is not None:
        raise ApiProblem(
            429, f"{institution!r} is over its rate limit ({limiter.rate:g} events/s, burst {limiter.burst})",
            kind="rate_limited", headers=retry_after(wait),
        )


def _split_batch(body: bytes) -> list[bytes]:
    """The events of a batch as separate JSON documents, each for the gatekeeper to judge."""
    try:
        events = cloudevents.loads(body)
    except cloudevents.Malformed as exc:
        raise ApiProblem(400, exc.msg, kind="malformed", errors=[Problem(exc.loc, exc.msg, exc.code)]) from None
    if not isinstance(events, list):
        msg = f"a batch is a JSON array of structured events, not {json_type(events)}"
        raise ApiProblem(400, msg, kind="malformed", errors=[Problem((), msg, "json_invalid")])  # as for one event not an object
    return [orjson.dumps(event) for event in events]


CLOUD_EVENT_REF = {"$ref": "#/components/schemas/CloudEvent"}
"""The structured CloudEvent in the gateway's OpenAPI document (the app adds the component)."""

_REQUEST_BODY = {
    "required": True,
    "content": {
        STRUCTURED_CONTENT_TYPE: {"schema": CLOUD_EVENT_REF},
        BATCH_CONTENT_TYPE: {"schema": {"type": "array", "items": CLOUD_EVENT_REF, "description": "structured CloudEvents"}},
        "application/json": {"schema": {"type": "object", "description": "binary mode: the data, attributes in ce- headers"}},
    },
}


@router.post(
    "/events",
    status_code=202,
    summary="Offer events (structured, binary or batch CloudEvents)",
    response_model=resources.Verdict | list[resources.Verdict],
    responses=documented(400, 401, 403, 413, 415, 422, 429, 503),
    openapi_extra={"requestBody": _REQUEST_BODY},
)
async def offer_events(request: Request, institution: Publisher) -> JSONResponse:
    """Offer one event (structured or binary mode: 202 with the verdict, or a problem) or a batch
    (202 with one verdict per event, each judged on its own). The body may be gzipped
    (`Content-Encoding: gzip`); the size limits hold for it inflated."""
    bus = bus_of(request)
    limiter: RateLimiter = request.app.state.rate_limiter
    metrics = request.app.state.metrics
    mode = transport_mode(request.headers)
    if mode == "batch":
        events = _split_batch(await _read_body(
            request, bus.settings.max_event_bytes * BATCH_BODY_FACTOR,
            f"the most a batch may be ({BATCH_BODY_FACTOR} events of the limit of {bus.settings.max_event_bytes} bytes each)",
        ))
        most = min(MAX_BATCH_EVENTS, limiter.burst)
        if len(events) > most:
            raise ApiProblem(413, f"a batch holds at most {most} events; this one has {len(events)}", kind="too_large")
        _throttle(limiter, institution, len(events))
        verdicts = []
        for event in events:  # in order: later events of a batch may depend on earlier ones
            verdict = await bus.gate.admit(institution, event, STRUCTURED)
            metrics.verdict(verdict)
            verdicts.append(verdict.as_dict())
        return JSONResponse(verdicts, status_code=202)
    _throttle(limiter, institution, 1)
    body = await _read_body(  # the limit itself is on the event serialized (the gatekeeper's)
        request, bus.settings.max_event_bytes * INPUT_FACTOR,
        f"{INPUT_FACTOR} times an event's limit of {bus.settings.max_event_bytes} bytes: not read",
    )
    if mode == "structured":
        headers = STRUCTURED
    else:
        headers = {key: value for key, value in request.headers.items() if key.startswith("ce-") or key == "content-type"}
    verdict = await bus.gate.admit(institution, body, headers)
    metrics.verdict(verdict)
    if not verdict.accepted:
        raise rejection(verdict)
    return JSONResponse(verdict.as_dict(), status_code=202)


# --- reading the log ---------------------------------------------------------------------------

TypeOrDomain = Annotated[str, StringConstraints(max_length=128)]
"""An event type, or a domain (``project``, or ``project.*`` as webhooks take it too): judged by
the catalog (``registry.unknown_filters``), which names the one likely meant."""


@router.get(
    "/events",
    summary="Page through the event log",
    response_model=Page[resources.LoggedEvent],
    responses=documented(400, 401, 403, 422, 429, 503),
)
async def read_log(
    request: Request,
    viewer: Member,
    type: Annotated[list[TypeOrDomain] | None, Query(max_length=MAX_TYPES, description=(
        f"a type or a domain (`project`, or `project.*`); repeat it for several, up to {MAX_TYPES} "
        "(`type=call&type=project.adopted`)"))] = None,
    institution: Annotated[str | None, Query(pattern=INSTITUTION_PATTERN, description="events this institution said (their `source`)")] = None,
    subject: Annotated[str | None, Query(pattern=SUBJECT_PATTERN, description=(
        "events about this thing (their `subject`): a project, call, validation or day id, or a member's id"))] = None,
    after_seq: Annotated[int | None, Query(ge=0, le=MAX_SEQ, description=(
        "start after this log sequence; `cursor` goes on from there, so the two are not given together"))] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
    wait: Annotated[int, Query(ge=0, le=MAX_WAIT, description=(
        "a long poll: with nothing to show yet, wait up to this many seconds for an event to show "
        "(the answer comes as soon as one does; give your HTTP client a longer timeout)"))] = 0,
) -> dict[str, Any]:
    """Logged events in log order with their sequence; ``next_cursor`` is the next ``after_seq``
    (also accepted as ``cursor``) while more pages follow, and null on the last page, where a
    follower goes on from the last item's ``seq`` (not from the beginning). Confidential workflow content (reviews before the decision,
    information requests, what the validation workflow refused and whom, applications to a call
    and the answers to them) is left out for members who may not see it.

    To follow the log without webhooks (behind a firewall, say), ask again with ``after_seq``
    the ``seq`` of the last item seen and ``wait`` a number of seconds: an empty page then
    comes only after that long, and an event that shows meanwhile is answered at once."""
    bus = bus_of(request)
    if cursor is not None and after_seq is not None:
        msg = "give after_seq or cursor, not both: after_seq starts a listing, a cursor goes on with one (the previous page's next_cursor)"
        raise ApiProblem(422, msg, kind="invalid", errors=[Problem(("query", "cursor"), msg, "cursor_with_after_seq")])
    if cursor is not None:
        if not cursor.isdigit() or int(cursor) > MAX_SEQ:
            raise ApiProblem(400, "the cursor of /events is a log sequence (the previous next_cursor)", kind="bad_cursor")
        after_seq = int(cursor)
    if type and (unknown := registry.unknown_filters(type)):
        errors = [Problem(("query", "type", place), message, "unknown_event_type") for place, message in unknown]
        raise ApiProblem(422, "; ".join(e.msg for e in errors), kind="invalid", errors=errors)
    subjects = [event_filter(each, institution, subject) for each in type] if type else [event_filter(None, institution, subject)]
    watch = bus.applied
    if not wait or watch is None:
        return await _log_page(request, viewer, subjects, after_seq, limit)
    polls: Counter[str] = request.app.state.long_polls
    if polls[viewer] >= MAX_LONG_POLLS:
        raise ApiProblem(
            429, f"{viewer!r} has {MAX_LONG_POLLS} long polls of /events waiting already: let one answer first",
            kind="rate_limited", headers=retry_after(1),
        )
    polls[viewer] += 1
    gauge = request.app.state.metrics.long_polls
    gauge.inc()
    try:
        loop = asyncio.get_running_loop()
        until = loop.time() + wait
        while True:
            seen = watch.position
            page = await _log_page(request, viewer, subjects, after_seq, limit)
            left = until - loop.time()
            if page["items"] or left <= 0 or watch.closed:
                return page
            # Woken when the read models have applied more of the log; looked at again at least
            # every few seconds whatever this process's consumer says (the log may grow by other means).
            if not await _wait_while_connected(request, watch, max(seen, after_seq or 0), min(left, LONG_POLL_RECHECK)):
                return page  # nobody to answer: the poll's place is free at once
    finally:
        gauge.dec()
        polls[viewer] -= 1
        if not polls[viewer]:
            del polls[viewer]


async def _wait_while_connected(request: Request, watch: AppliedWatch, beyond: int, seconds: float) -> bool:
    """Wait up to ``seconds`` for the log to be applied past ``beyond``, making sure every second
    that the client still waits too; False as soon as it has gone (a follower that restarts must
    not find its own abandoned polls holding its places)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + seconds
    while (left := until - loop.time()) > 0:
        if await watch.wait_beyond(beyond, min(left, DISCONNECT_CHECK)) or watch.closed:
            return True
        if await request.is_disconnected():
            return False
    return True


async def _log_page(request: Request, viewer: str, subjects: list[str], after_seq: int | None, limit: int) -> dict[str, Any]:
    """One page of ``GET /events``: the events after ``after_seq`` on ``subjects`` that ``viewer`` may see."""
    bus = bus_of(request)
    # An event is on the page once its 202 was sent: a replica of the log may be a moment behind its leader.
    return await logpages.page(bus.js, engine_of(request), viewer, subjects, after_seq, limit,
                               from_leader=bus.settings.stream_replicas > 1)


async def _waiting(request: Request, event_id: str, viewer: str, visible: Callable[[dict[str, Any]], Awaitable[bool]]) -> dict[str, Any] | None:
    """An event in the read models' dead-letter queue, as ``GET /events/{id}`` shows it to those
    who may see it in the log (a confidential one: its sender, the operator and the parties the
    read models know; ``visible``) — None for anyone else, and when it is not there: it waits for
    the operator, and why — in words for a partner, without the bus's internal error."""
    from handlers.service import PARKED
    from ops.dlq import Waiting

    bus = bus_of(request)
    index: Waiting | None = getattr(request.app.state, "waiting", None)  # (this bus's: its dead letters by event id)
    if index is None:
        index = request.app.state.waiting = Waiting(bus.consumer_settings.name)
    letter = await index.find(bus.js, event_id)
    if letter is None or letter.event is None or letter.original_seq is None:
        return None
    sender = str(letter.event.get("source", "")).removeprefix("/institutions/")
    if viewer not in (sender, bus.settings.operator) and not await visible(letter.event):
        return None
    subject = f"{str(letter.event.get('type', '')).partition('.')[0]} {letter.event.get('subject')}"
    if letter.error == PARKED:
        why = (f"set aside: an earlier event about {subject} could not be applied, and the events about it after that one wait "
               "behind it for the network's operator, who applies them in the log's order")
    else:
        why = "the bus could not apply it; it waits for the network's operator, and the later events about " \
              f"{subject} wait behind it"
    return {"seq": letter.original_seq, "event": letter.event, "outcome": "waiting", "refusal": None, "derived": [],
            "derived_pending": [], "waiting": why}


def _applied(engine: Any, event_id: str) -> tuple[int | None, list[tuple[str, int | None]]] | None:
    with reading(engine).connect() as connection:
        return applied_event(connection, event_id)


@router.get(
    "/events/{event_id}",
    summary="One event and what became of it",
    response_model=resources.EventOutcome,
    responses=documented(401, 403, 404, 422, 503),
)
async def read_event(
    request: Request,
    viewer: Member,
    event_id: Annotated[str, Path(pattern=EVENT_ID_PATTERN, description="the event's `id`")],
) -> dict[str, Any]:
    """An event the network has applied, with what it led to: whether a workflow rule refused it
    (``outcome``, and the refusal with its reason) and the events the workflows decided on it.

    A ``202`` from ``POST /events`` means the event is logged; it is applied moments later, and
    a refusal (say, a change to a project by a member who is not its owner) is an event of its
    own, in the owner's name: this is where its sender finds it. An event the bus could not
    apply, or one set aside behind such an event about the same thing, is ``"outcome":
    "waiting"`` with why in ``waiting`` until the operator replays it. 404 while the event is not
    applied yet (or never was: refused at the gate) and for confidential events the caller may
    not see."""
    engine = engine_of(request)

    async def visible(event: dict[str, Any]) -> bool:
        return await logpages.visible(engine, event, viewer)

    applied = await run_in_threadpool(_applied, engine, event_id)
    bus = bus_of(request)
    found = await log.outcome(bus.js, applied, visible)
    if found is None and applied is None and (waiting := await _waiting(request, event_id, viewer, visible)) is not None:
        return waiting
    if found is None:
        raise ApiProblem(
            404,
            f"no applied event {event_id!r} that you may see: an event is applied moments after its 202 "
            "(try again), one the gateway refused was never logged, one the bus could not apply — or one about the "
            "same thing as such an event, set aside behind it — waits for the network's operator, and the workflows' confidential events "
            "(a validation's reviews and questions, applications to a call) are shown to their parties only",
            kind="not_found",
        )
    return found.as_dict()
