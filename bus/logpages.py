"""Pages of the event log as a member may see them — over HTTP (``GET /events``) and over NATS,
where a member asks for one on ``collab.log.{institution}`` (request/reply) and the answer comes to
its inbox.

A page is the events logged after a sequence on some subjects, in log order, each with its
sequence; the workflows' confidential events (reviews before the decision, applications and the
answers to them, …) are left out for a reader who may not see them (:mod:`handlers.audience`, the
rule webhooks deliver by). ``next_cursor`` is the sequence to go on after while more follow.

Over NATS this is how a member that follows the log live (``collab.live``, at most once) reads
what was logged while it was away, without HTTP: ``{"after_seq": 4182, "type": ["project"]}``
answers ``{"items": [{"seq": …, "event": {…}}, …], "next_cursor": "…" | null}``, as ``GET
/events?after_seq=4182&type=project`` does; a request it cannot take is answered
``{"status": "rejected", "reason": …, "errors": […]}`` as an offer is. A page is no larger than
the server's ``max_payload``: it then holds fewer events, and ``next_cursor`` goes on. An event
that alone does not fit with what a page adds around it (the gate takes events up to
``max_payload`` with their headers) is not sent: the request is refused ``too_large``
(``too_large_for_nats``), naming the event's sequence and how to read it over HTTP, and the pages
after it go on over NATS.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from contextlib import aclosing
from typing import Annotated, Any

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from bus import log
from bus.ingress import REPLY_HEADERS, drained, reply_allowed
from bus.membership import Membership
from bus.ratelimit import RateLimiter
from bus.streams import EVENTS_STREAM
from bus.verdict import Problem, Reason, Verdict
from schemas.envelope import INSTITUTION_PATTERN, SUBJECT_PATTERN

logger = logging.getLogger(__name__)

LOG_REQUESTS = "collab.log"
"""``collab.log.{institution}``: where a member asks for a page of the log (request/reply)."""
LOG_QUEUE = "collabbus-log"
MAX_SEQ = 2**63 - 1
"""The largest log sequence ``after_seq`` may name (JetStream's sequences are 64-bit)."""
MAX_TYPES = 20
"""Types or domains one page may be asked for (each is a read of the log per page)."""
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
PAGES_PER_SECOND = 10.0
PAGES_AT_ONCE = 50
"""How many pages a member may ask for, per second sustained and at once (per bus process): a
follower catching up reads 5,000 events a second so; one asking without end does not keep the
bus from others."""
_ITEM_OVERHEAD = 64
"""Bytes an item adds to a page besides its event (``{"seq":…,"event":…}``, the comma)."""
_PAGE_OVERHEAD = 256
"""Bytes a page's own JSON (``items``, ``next_cursor``) and the reply's headers take, at most."""


def member_log_requests(institution: str) -> str:
    """The subject on which ``institution`` asks for pages of the log."""
    return f"{LOG_REQUESTS}.{institution}"


def _visible(engine: Any, event: dict[str, Any], viewer: str) -> bool:
    from sqlmodel import Session

    from handlers.audience import audience
    from handlers.db import reading

    with Session(reading(engine)) as session:
        allowed = audience(session, event)
    return allowed is None or viewer in allowed


async def visible(engine: Any, event: dict[str, Any], viewer: str) -> bool:
    """Whether ``viewer`` may see ``event``: any event but a workflow's confidential one, which
    its parties may (read from the read models, in a thread)."""
    from handlers.audience import CONFIDENTIAL

    if event.get("type") not in CONFIDENTIAL:
        return True
    return await asyncio.to_thread(_visible, engine, event, viewer)


async def page(
    js: JetStreamContext, engine: Any, viewer: str, subjects: Sequence[str], after_seq: int | None, limit: int, *,
    from_leader: bool = False, max_bytes: int | None = None,
) -> dict[str, Any]:
    """The events after ``after_seq`` on ``subjects`` that ``viewer`` may see, up to ``limit`` of
    them (and, with ``max_bytes``, as many as a page of that size holds; at least one)."""
    items: list[dict[str, Any]] = []
    size = _PAGE_OVERHEAD
    more = False
    async with aclosing(log.stored_any(js, EVENTS_STREAM, subjects, start_seq=(after_seq or 0) + 1, batch=limit + 1,
                                       from_leader=from_leader)) as messages:
        async for msg in messages:
            event = log.readable(msg.data)
            if not isinstance(event, dict):  # not an event (put in the log by hand; dead-lettered by the consumers)
                continue
            if not await visible(engine, event, viewer):
                continue
            size += len(msg.data or b"") + _ITEM_OVERHEAD
            if len(items) == limit or (max_bytes is not None and items and size > max_bytes):
                more = True
                break
            if max_bytes is not None and size > max_bytes:
                raise TooLargeForPage(after_seq or 0, msg.seq, event.get("id"), len(msg.data or b""), max_bytes)
            items.append({"seq": msg.seq, "event": event})
    return {"items": items, "next_cursor": str(items[-1]["seq"]) if more else None}


class TooLargeForPage(Exception):
    """The first event a page would hold does not fit in one with what a page adds around it."""

    def __init__(self, after_seq: int, seq: int, event_id: Any, size: int, max_bytes: int) -> None:
        super().__init__(after_seq, seq, event_id, size, max_bytes)
        self.after_seq, self.seq, self.size, self.max_bytes = after_seq, seq, size, max_bytes
        self.event_id = event_id if isinstance(event_id, str) else None

    def verdict(self) -> Verdict:
        """The refusal a member reads: which event, and how to read it and go on past it."""
        return Verdict("rejected", self.event_id, reason="too_large", errors=(Problem((), (
            f"the event at sequence {self.seq} ({self.size:,} bytes) does not fit in a reply over NATS with what a page "
            f"adds to it (the server takes {self.max_bytes:,} bytes a message): read it over HTTP, "
            f"GET /events?after_seq={self.after_seq}&limit=1 with the same filters, then ask for the page after_seq {self.seq}"
        ), "too_large_for_nats"),))


TypeOrDomain = Annotated[str, StringConstraints(max_length=128)]


class PageRequest(BaseModel):
    """What a member asks ``collab.log.{institution}`` for: ``GET /events``'s query as JSON."""

    model_config = ConfigDict(extra="forbid", strict=True)

    after_seq: int = Field(0, ge=0, le=MAX_SEQ, description="start after this log sequence (the last one seen)")
    type: list[TypeOrDomain] = Field(default_factory=list, max_length=MAX_TYPES,
                                     description="types or domains (`project`, `project.*`); none: every type")
    institution: str | None = Field(None, pattern=INSTITUTION_PATTERN, description="events this institution said")
    subject: str | None = Field(None, pattern=SUBJECT_PATTERN, description="events about this thing")
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="most events on the page")

    def subjects(self) -> list[str]:
        if not self.type:
            return [log.event_filter(None, self.institution, self.subject)]
        return [log.event_filter(each, self.institution, self.subject) for each in self.type]


def read_request(body: bytes) -> PageRequest:
    """The request a message's body holds (an empty body: the first page of every type);
    :class:`Refused` with each problem otherwise."""
    from bus import cloudevents
    from schemas import registry
    from schemas.common import error_message, json_type, unknown_name

    try:
        raw = cloudevents.loads(body, "request") if body.strip() else {}
    except cloudevents.Malformed as exc:
        raise Refused("malformed", [Problem(exc.loc, exc.msg, exc.code)]) from None
    if not isinstance(raw, dict):
        raise Refused("malformed", [Problem((), f"a request for a page is a JSON object, not {json_type(raw)}", "json_invalid")])
    try:
        request = PageRequest.model_validate(raw)
    except ValidationError as exc:
        fields = tuple(PageRequest.model_fields)
        problems = [
            Problem(tuple(e["loc"]), unknown_name(str(e["loc"][-1]), "a field of a request for a page", fields,
                                                  f" (it takes {', '.join(fields)})")
                    if e["type"] == "extra_forbidden" else error_message(e), e["type"])
            for e in exc.errors(include_url=False)
        ]
        raise Refused("invalid", problems) from None
    unknown = registry.unknown_filters(request.type)
    if unknown:
        raise Refused("invalid", [Problem(("type", place), message, "unknown_event_type") for place, message in unknown])
    return request


class Refused(Exception):
    def __init__(self, reason: Reason, problems: list[Problem]) -> None:
        super().__init__(reason)
        self.reason, self.problems = reason, problems


class LogPages:
    """Answers members' requests for pages of the log on ``collab.log.{institution}`` (queue group
    ``collabbus-log``), a few at a time; a reply goes only to an inbox of the asking institution's
    own, as a verdict does (a request with any other reply subject is not answered)."""

    def __init__(self, nc: Client, js: JetStreamContext, engine: Any, membership: Membership, *,
                 from_leader: bool = False, workers: int = 8) -> None:
        self.nc, self.js, self.engine, self.membership = nc, js, engine, membership
        self.from_leader = from_leader
        self.limiter = RateLimiter(PAGES_PER_SECOND, PAGES_AT_ONCE)
        self._slots = asyncio.Semaphore(workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._said: dict[tuple[str, str], float] = {}
        self._sub: Any = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(f"{LOG_REQUESTS}.*", queue=LOG_QUEUE, cb=self._received)

    async def stop(self) -> None:
        """Stop taking requests, answering those in hand (drained, as the ingress is)."""
        sub, self._sub = self._sub, None
        await drained(sub, self._tasks)

    async def _received(self, msg: Msg) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            institution = msg.subject[len(LOG_REQUESTS) + 1:]
            if not msg.reply or not reply_allowed(msg.reply, institution):
                if self._first_in_a_minute(("reply", institution)):
                    logger.warning("a request for a page of the log on %s was not answered: its reply subject %r is not "
                                   "an inbox of %s (the client's inbox prefix must be _INBOX.%s); said once a minute",
                                   msg.subject, (msg.reply or "")[:200], institution, institution)
                return
            await self.nc.publish(msg.reply, await self.answer(institution, msg.data), headers=REPLY_HEADERS)
        except Exception:  # a failed answer costs this request only; the member asks again
            logger.exception("could not answer a request for a page of the log on %s", msg.subject)
        finally:
            self._slots.release()

    async def answer(self, institution: str, body: bytes) -> bytes:
        """The reply to ``institution``'s request: a page, or why there is none."""
        from nats.errors import Error as NatsError
        from nats.errors import TimeoutError as NatsTimeoutError
        from nats.js.errors import Error as JetStreamError

        if not await self.membership.kind_of(institution):
            return _refusal("forbidden", [Problem((), f"{institution!r} is not a member of the network", "not_member")])
        if (wait := self.limiter.take(institution)) is not None:
            return Verdict("rejected", None, reason="unavailable", retry_after=wait, errors=(Problem((), (
                f"{institution!r} asks for pages faster than {self.limiter.rate:g} a second (at once {self.limiter.burst}); "
                f"ask again in {wait:.3f} s"), "rate_limited"),)).to_json()
        try:
            request = read_request(body)
        except Refused as exc:
            return _refusal(exc.reason, exc.problems)
        try:
            found = await page(self.js, self.engine, institution, request.subjects(), request.after_seq, request.limit,
                               from_leader=self.from_leader, max_bytes=self.nc.max_payload)
        except (NatsTimeoutError, NatsError, JetStreamError) as exc:
            return _refusal("unavailable", [Problem((), f"the event log did not answer ({type(exc).__name__}); ask again",
                                                    "log_unavailable")])
        except TooLargeForPage as exc:
            if self._first_in_a_minute(("too_large", institution)):
                logger.warning("%s asked over NATS for a page beginning with the event at sequence %d (%d bytes), which "
                               "does not fit in a reply (max_payload %d): refused, telling it to read that event over HTTP; "
                               "said once a minute", institution, exc.seq, exc.size, exc.max_bytes)
            return exc.verdict().to_json()
        return orjson.dumps(found)

    def _first_in_a_minute(self, key: tuple[str, str]) -> bool:
        now = time.monotonic()
        if now - self._said.get(key, -60.0) < 60.0:
            return False
        self._said[key] = now
        return True


def _refusal(reason: Reason, problems: list[Problem]) -> bytes:
    return Verdict("rejected", None, errors=tuple(problems), reason=reason).to_json()
