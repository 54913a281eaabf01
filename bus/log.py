"""Reading the event log: replay from a position, then optionally follow it live."""

from __future__ import annotations

import heapq
import re
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import APIError, NotFoundError

from bus.streams import EVENTS_STREAM


@dataclass(frozen=True)
class LoggedEvent:
    """One event as it stands in the log, with its stream sequence."""

    seq: int
    subject: str
    event: dict[str, Any]
    pending: int


def event_filter(event_type: str | None = None, institution: str | None = None, subject: str | None = None) -> str:
    """The NATS subject filter for events of a type (``project`` or ``project.registered``), institution, subject."""
    inst = institution or "*"
    if event_type is None:
        domain, name = "*", "*"
    elif "." in event_type:
        domain, name = event_type.split(".", 1)
    else:
        domain, name = event_type, "*"
    return f"collab.events.{inst}.{domain}.{name}.{subject or '*'}"


_DURATION = re.compile(r"^(\d+)([smhd])$")


def parse_since(value: str | None) -> dict[str, Any]:
    """Where to start reading: ``all``, ``new``, a sequence number, a duration (``10m``) or an RFC 3339 time."""
    if value is None or value == "new":
        return {"deliver_policy": DeliverPolicy.NEW}
    if value in ("all", "start", "0"):
        return {"deliver_policy": DeliverPolicy.ALL}
    if value.isdigit():
        return {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": int(value)}
    match = _DURATION.match(value)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
        start = datetime.now(timezone.utc) - delta
    else:
        try:
            start = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"--since {value!r}: use all, new, a sequence number, a duration (10m, 2h, 1d) "
                             "or an RFC 3339 time (2026-12-01T08:00:00+02:00)") from None
        if start.tzinfo is None:
            raise ValueError(f"--since {value!r}: give a time zone offset, e.g. {value}+00:00")
    return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start.astimezone(timezone.utc).isoformat()}


def readable(data: bytes | None) -> dict[str, Any] | str:
    """A logged message's event, or why it is none (not JSON, not an object)."""
    try:
        event = orjson.loads(data or b"")
    except orjson.JSONDecodeError as exc:
        return f"not JSON: {exc}"
    if isinstance(event, dict):
        return event
    from schemas.common import json_type  # (the catalog is not loaded for reading the log)

    return f"not an event: {json_type(event)}, not a JSON object"


async def read(
    js: JetStreamContext,
    subject_filter: str = "collab.events.>",
    *,
    since: str | None = "all",
    follow: bool = False,
    idle_timeout: float = 1.0,
    on_unreadable: Callable[[int, str], None] | None = None,
) -> AsyncGenerator[LoggedEvent, None]:
    """Yield logged events matching the filter; stop when caught up unless ``follow``. What in the
    log is not an event (it can only have been put there by hand: the consumers dead-letter it) is
    passed, told to ``on_unreadable`` (its sequence and why).

    Each event once, in the log's order, also across a restart of NATS: ``new`` starts after the
    log's last sequence when the reading starts, and a consumer made again after a reconnection
    (nats-py's ordered consumer does that) carries on after the last event delivered — or, none
    delivered yet, after where the reading started, not from the log's beginning."""
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.api import ConsumerConfig

    start = parse_since(since)
    # Catch-up check before the consumer exists: an empty selection ends at once.
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=None)
    if not follow and info.state.messages == 0:
        return
    if start["deliver_policy"] == DeliverPolicy.NEW:  # the log as it is now: a reconnection cannot move it
        start = {"deliver_policy": DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": info.state.last_seq + 1}
    passed = _before(start)  # the last sequence not to be read (None: a time, not known)
    logged_from = datetime.fromisoformat(start["opt_start_time"]) if passed is None else None
    sub = await js.subscribe(subject_filter, ordered_consumer=True, config=ConsumerConfig(**start), stream=EVENTS_STREAM)
    ordered = sub._sub._jsi
    if ordered is not None and passed is not None:  # where nats-py makes the consumer again from (the last delivered + 1)
        ordered._sseq = max(ordered._sseq, passed)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except NatsTimeoutError:
                if follow:
                    continue
                return
            meta = msg.metadata
            seq = meta.sequence.stream
            again = seq <= passed if passed is not None else logged_from is not None and _logged_at(meta) < logged_from
            if not again:
                passed = seq
                event = readable(msg.data)
                if isinstance(event, dict):
                    yield LoggedEvent(seq, msg.subject, event, meta.num_pending)
                elif on_unreadable is not None:
                    on_unreadable(seq, event)
            if not follow and meta.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()


def _before(start: dict[str, Any]) -> int | None:
    """The log's sequence just before where a reading from ``start`` (:func:`parse_since`, ``new``
    made a sequence) begins; None for a time (the sequence is not known before the first event
    after it)."""
    policy = start["deliver_policy"]
    if policy == DeliverPolicy.BY_START_SEQUENCE:
        return max(int(start["opt_start_seq"]) - 1, 0)
    if policy == DeliverPolicy.BY_START_TIME:
        return None
    return 0


def _logged_at(meta: Any) -> datetime:
    """When the log took a delivered message."""
    stamp: datetime = meta.timestamp
    return stamp if stamp.tzinfo is not None else stamp.replace(tzinfo=timezone.utc)


DIRECT_BATCH_SINCE = (2, 11)
"""The nats-server version from which a direct get answers a batch (ADR-31): older servers answer
one message per request."""


@dataclass(frozen=True)
class StoredMessage:
    """A message as a stream stores it."""

    seq: int
    subject: str
    headers: dict[str, str]
    data: bytes


async def stored(
    js: JetStreamContext, stream: str, subject: str, *, start_seq: int = 1, batch: int = 100, from_leader: bool = False,
) -> AsyncGenerator[StoredMessage, None]:
    """The messages of ``stream`` on ``subject`` from ``start_seq`` on, in order, read ``batch``
    at a time with one request each (a page of the log: one round trip, not one per message).

    Direct gets need the stream's ``allow_direct`` (the bus's streams have it), and any replica
    of the stream answers them from its copy: one a moment behind its leader may not have the
    newest messages yet. ``from_leader`` is for a reader of a replicated stream that must see
    everything acknowledged: a replica's copy is the beginning of the leader's, so once the copy
    has no more, the leader is asked whether anything follows (one request when nothing does),
    and what does is read from the leader; so is everything when no replica answers in time. A
    server older than 2.11 is asked for each message on its own."""
    version = js._nc.connected_server_version
    seq = max(start_seq, 1)
    if (version.major, version.minor) >= DIRECT_BATCH_SINCE:
        async with aclosing(_stored_in_batches(js, stream, subject, seq, batch, fallback=from_leader)) as batches:
            async for message in batches:
                seq = message.seq + 1
                yield message
        if not from_leader:
            return
    async for message in _stored_one_by_one(js, stream, subject, seq):
        yield message


async def _stored_in_batches(
    js: JetStreamContext, stream: str, subject: str, seq: int, batch: int, *, fallback: bool,
) -> AsyncGenerator[StoredMessage, None]:
    """Batched direct gets from ``seq`` on until the answering server has no more; ``fallback``:
    a request nobody answers (in time) ends the reading instead of failing it (the caller reads
    the rest from the leader)."""
    nc = js._nc
    request_subject = f"{js._prefix}.DIRECT.GET.{stream}"
    sub = await nc.subscribe(nc.new_inbox())  # each batch is read to its end before the next is asked for
    try:
        while True:
            await nc.publish(request_subject, orjson.dumps({"seq": seq, "next_by_subj": subject, "batch": batch}),
                             reply=sub.subject)
            while True:
                try:
                    msg = await sub.next_msg(timeout=js._timeout)
                except NatsTimeoutError:
                    if fallback:
                        return
                    raise
                headers = dict(msg.headers or {})
                status = headers.get("Status")
                if status == "404":  # nothing (more) at or after seq on the subject
                    return
                if status == "204":  # the end of this batch: Nats-Num-Pending more match after it
                    if int(headers.get("Nats-Num-Pending") or 0) == 0:
                        return
                    break
                if status == "503" and fallback:  # no responders: nobody serves direct gets of the stream
                    return
                if status:
                    raise APIError(code=int(status), description=headers.get("Description") or f"direct get of {stream} failed")
                message = StoredMessage(int(headers["Nats-Sequence"]), headers["Nats-Subject"], headers, msg.data)
                seq = message.seq + 1
                yield message
    finally:
        await sub.unsubscribe()


async def stored_any(
    js: JetStreamContext, stream: str, subjects: Sequence[str], *, start_seq: int = 1, batch: int = 100, from_leader: bool = False,
) -> AsyncGenerator[StoredMessage, None]:
    """The messages of ``stream`` on any of ``subjects`` from ``start_seq`` on, in order, each
    once however the subjects overlap: :func:`stored` for each, merged by sequence."""
    wanted = list(dict.fromkeys(subjects))
    readers = [stored(js, stream, subject, start_seq=start_seq, batch=batch, from_leader=from_leader) for subject in wanted]
    try:
        heads: list[tuple[int, int, StoredMessage]] = []
        for index, reader in enumerate(readers):
            first = await anext(reader, None)
            if first is not None:
                heapq.heappush(heads, (first.seq, index, first))
        last = 0
        while heads:
            seq, index, message = heapq.heappop(heads)
            if seq != last:
                last = seq
                yield message
            following = await anext(readers[index], None)
            if following is not None:
                heapq.heappush(heads, (following.seq, index, following))
    finally:
        for reader in readers:
            await reader.aclose()


async def _stored_one_by_one(js: JetStreamContext, stream: str, subject: str, seq: int) -> AsyncGenerator[StoredMessage, None]:
    while True:
        try:  # the next message at or after ``seq`` on the subject: deleted sequences are skipped
            msg = await js.get_msg(stream, seq=seq, subject=subject, next=True)
        except NotFoundError:
            return
        assert msg.seq is not None and msg.subject is not None
        seq = msg.seq + 1
        yield StoredMessage(msg.seq, msg.subject, dict(msg.headers or {}), msg.data or b"")


@dataclass(frozen=True)
class Outcome:
    """An applied event and what became of it (``GET /events/{id}``, ``collabbus publish``)."""

    seq: int
    event: dict[str, Any]
    derived: list[tuple[int, dict[str, Any]]]
    """The events decided on it that are logged, in log order."""
    pending: list[str]
    """Ids of events decided on it that are not logged yet."""
    refused_unseen: bool = False
    """A workflow rule refused it in a refusal the caller may not see (a confidential step's)."""

    @property
    def refusal(self) -> tuple[int, dict[str, Any]] | None:
        """The ``…_rejected`` event a workflow rule logged about it, if one did."""
        return next((item for item in self.derived if str(item[1].get("type", "")).endswith("_rejected")), None)

    @property
    def refused(self) -> bool:
        from handlers.network import derived_type

        return (self.refusal is not None or self.refused_unseen
                or any(str(derived_type(event_id)).endswith("_rejected") for event_id in self.pending))

    def as_dict(self) -> dict[str, Any]:
        """As ``GET /events/{id}`` answers it."""
        refusal = self.refusal
        return {
            "seq": self.seq,
            "event": self.event,
            "outcome": "refused" if self.refused else "applied",
            "refusal": {"seq": refusal[0], "event": refusal[1]} if refusal else None,
            "derived": [{"seq": seq, "event": event} for seq, event in self.derived],
            "derived_pending": self.pending,
        }


async def logged_at(js: JetStreamContext, seq: int) -> dict[str, Any] | None:
    """The event at ``seq`` of the log (``None`` when it is no longer there)."""
    try:
        msg = await js.get_msg(EVENTS_STREAM, seq=seq)
    except NotFoundError:
        return None
    return orjson.loads(msg.data or b"{}")  # type: ignore[no-any-return]


async def outcome(
    js: JetStreamContext,
    applied: tuple[int | None, list[tuple[str, int | None]]] | None,
    visible: Callable[[dict[str, Any]], Awaitable[bool]] | None = None,
) -> Outcome | None:
    """What became of an event, from what the read models recorded of it
    (:func:`handlers.bookkeeping.applied_event`) and the log; ``None`` when it is not applied,
    not logged yet, no longer in the log or (by ``visible``) not to be shown."""
    if applied is None:
        return None
    seq, consequences = applied
    if seq is None:
        return None
    event = await logged_at(js, seq)
    if event is None or (visible is not None and not await visible(event)):
        return None
    derived: list[tuple[int, dict[str, Any]]] = []
    pending: list[str] = []
    unseen = False
    for derived_id, derived_seq in consequences:
        if derived_seq is None:
            pending.append(derived_id)
            continue
        logged = await logged_at(js, derived_seq)
        if logged is not None and (visible is None or await visible(logged)):
            derived.append((derived_seq, logged))
        elif logged is not None and str(logged.get("type", "")).endswith("_rejected"):
            unseen = True  # (the event did not take effect: not "applied", though what refused it is not shown)
    return Outcome(seq, event, derived, pending, unseen)
