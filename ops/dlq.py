"""Dead-letter tooling (``collabbus dlq``): list, show, replay and purge ``COLLAB_DLQ``.

A dead letter is the original canonical event with headers saying which consumer gave up on it,
where it was in the log and why (``bus.consumer``). Replaying one applies the event through the
consumer's normal applier — for ``network`` the ``NetworkService``, which records applied events
by id, so a replay applies an event at most once however often it is run — and deletes the dead
letter only once the event is applied. Workflows' derived events go to the outbox as usual; the
bus's relay logs them (at once when a bus runs, else on its next start).

The ``network`` and ``webhooks`` consumers set a dead letter's thing (its domain and subject)
aside: the later events about it are dead-lettered behind it (``Parked``) rather than applied —
or owed to webhook endpoints — without it. A replay applies them in the log's order — one waits
while an earlier dead letter about the same thing stays in the queue — and once none is left,
the thing is let go (:func:`settle`, also after a purge) and its events are applied as they come
again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from contextlib import aclosing
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import orjson
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus import log
from bus.deadletters import (
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_DETAIL,
    DLQ_ERROR,
    DLQ_EVENT_ID,
    DLQ_FAILED_AT,
    DLQ_STREAM_NAME,
    DLQ_STREAM_SEQ,
    DLQ_SUBJECT,
    DLQ_WAITS_FOR,
    detail_lines,
    header_text,
    header_value,
)
from bus.streams import DLQ_STREAM, DLQ_SUBJECTS, EVENTS_STREAM

if TYPE_CHECKING:
    from bus.consumer import Applier

CONSUMERS = ("network", "webhooks")
"""The bus's consumer groups that dead-letter what they give up on (``bus.runtime.NETWORK_CONSUMER``,
``connectors.webhooks.dispatcher.WEBHOOKS_CONSUMER``): named here so that the commands need not load them."""

REASON_LENGTH = 300
"""How much of an error ``DeadLetter.reason`` keeps (the whole is in ``detail``)."""


_NOISE = ("For further information visit", "(Background on this error at:", "[SQL:", "[parameters:")
"""Lines of an error that point elsewhere (pydantic's and SQLAlchemy's links, the statement — all
its lines — and its parameters): the detail keeps them, the reason leaves them out."""

DLQ_BATCH = 256
"""Dead letters read with one request when listing them."""


def reason_of(error: str, detail: Iterable[str]) -> str:
    """An error in one line: from the line of a traceback that names the exception (without its
    module), with what follows it (a validation error's fields); else the error's name and the
    detail's own lines (``str`` of a validation error) — never the libraries' reference links."""
    lines, statement = [], False
    for line in (line.strip() for line in detail):
        if line.startswith(_NOISE):  # (a statement ends where its parameters begin, if not before)
            statement = line.startswith("[SQL:") and not line.endswith("]")
        elif statement:
            statement = not line.endswith("]")
        elif line:
            lines.append(line)
    named = [i for i, line in enumerate(lines) if error and f"{error}:" in line.split(" ", 1)[0] + " "]
    if named:
        first = lines[named[-1]]
        first = first[first.index(f"{error}:"):]
        return "; ".join([first, *lines[named[-1] + 1:]])[:REASON_LENGTH]
    text = "; ".join(lines)
    if not text or text.startswith(error):
        return (text or error)[:REASON_LENGTH]
    return (f"{error}: {text}" if error else text)[:REASON_LENGTH]


@dataclass(frozen=True)
class DeadLetter:
    """One message of ``COLLAB_DLQ``; ``seq`` is its sequence there (what the commands take)."""

    seq: int
    consumer: str
    event_id: str | None
    type: str | None
    original_seq: int | None
    original_subject: str | None
    original_stream: str | None
    deliveries: int | None
    error: str
    detail: str
    failed_at: str | None
    event: dict[str, Any] | None = field(repr=False)
    """The event as logged; None when it is not readable JSON (then ``raw`` holds it)."""
    raw: str | None = field(default=None, repr=False)
    waits_for: tuple[str, str] | None = None
    """Set aside: the thing (domain, subject) whose earlier dead letter goes first — its own, or
    one its workflow reads (a validation's project)."""

    @classmethod
    def from_message(cls, seq: int, subject: str, headers: Mapping[str, str] | None, data: bytes | None) -> "DeadLetter":
        headers = headers or {}
        try:
            event = orjson.loads(data or b"")
            raw = None
        except orjson.JSONDecodeError:
            event, raw = None, (data or b"").decode("utf-8", "replace")
        if not isinstance(event, dict):
            event, raw = None, raw if raw is not None else (data or b"").decode("utf-8", "replace")
        return cls(
            seq=seq,
            consumer=headers.get(DLQ_CONSUMER) or subject.removeprefix("collab.dlq."),
            event_id=_text(event, "id") or header_text(headers.get(DLQ_EVENT_ID)) or None,
            type=_text(event, "type"),
            original_seq=_int(headers.get(DLQ_STREAM_SEQ)),
            original_subject=headers.get(DLQ_SUBJECT),
            original_stream=headers.get(DLQ_STREAM_NAME),
            deliveries=_int(headers.get(DLQ_DELIVERIES)),
            error=header_text(headers.get(DLQ_ERROR)),
            detail="\n".join(detail_lines(header_text(headers.get(DLQ_DETAIL)))),
            failed_at=headers.get(DLQ_FAILED_AT),
            event=event,
            raw=raw,
            waits_for=_thing(header_text(headers.get(DLQ_WAITS_FOR))),
        )

    @property
    def reason(self) -> str:
        """The error in one line (:func:`reason_of`)."""
        return reason_of(self.error, self.detail.splitlines())

    def summary(self) -> dict[str, Any]:
        """What ``dlq list`` shows."""
        hidden = ("detail", "event", "raw", "original_subject", "original_stream")
        return {k: v for k, v in self.as_dict().items() if k not in hidden}

    def as_dict(self) -> dict[str, Any]:
        """Everything, as ``dlq show`` prints it (``waits_for`` as ``{domain}/{subject}``)."""
        return {**asdict(self), "waits_for": "/".join(self.waits_for) if self.waits_for else None, "reason": self.reason}


def _text(event: Any, key: str) -> str | None:
    value = event.get(key) if isinstance(event, dict) else None
    return value if isinstance(value, str) else None


def _thing(value: str) -> tuple[str, str] | None:
    domain, _, subject = value.partition("/")
    return (domain, subject) if domain and subject else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


async def dead_letters(js: JetStreamContext, consumer: str | None = None, *, after: int = 0) -> list[DeadLetter]:
    """Every dead letter (of ``consumer``, when given; ``after``: only those after that number
    in the queue), oldest first."""
    subject = f"collab.dlq.{consumer}" if consumer else DLQ_SUBJECTS
    try:
        info = await js.stream_info(DLQ_STREAM)
    except NotFoundError:
        return []
    state = info.state
    start = max(state.first_seq or 1, after + 1)
    if not state.messages or start > (state.last_seq or 0):
        return []
    replicated = (info.config.num_replicas or 1) > 1  # a replica may be a moment behind: what is listed is acted on
    found: list[DeadLetter] = []
    reading = log.stored(js, DLQ_STREAM, subject, start_seq=start, batch=DLQ_BATCH, from_leader=replicated)
    async with aclosing(reading) as messages:
        async for msg in messages:
            if msg.seq > state.last_seq:  # dead-lettered since the listing began
                break
            found.append(DeadLetter.from_message(msg.seq, msg.subject, msg.headers, msg.data))
    return found


async def dead_letter(js: JetStreamContext, seq: int) -> DeadLetter | None:
    """The dead letter at ``seq`` of ``COLLAB_DLQ``, or None."""
    try:
        msg = await js.get_msg(DLQ_STREAM, seq=seq)
    except NotFoundError:
        return None
    assert msg.subject is not None
    return DeadLetter.from_message(seq, msg.subject, msg.headers, msg.data)


async def dead_letter_failures(js: JetStreamContext, failures: Iterable[Mapping[str, Any]], consumer: str) -> int:
    """Put each event a rebuild of ``consumer``'s read models could not apply (``failures``: the
    report's, each with its log ``seq``) into its dead-letter queue, as the consumer puts one it
    gives up on — unless the queue holds it already (a dead letter the rebuild applied in its place
    and failed on again) — so that the operator sees it (``dlq list``, ``status``, ``GET
    /events/{id}``) and applies it once mended (``dlq replay``); returns how many it put there.
    (The read models lack it otherwise, with nothing left to say so but the rebuild's report.)"""
    wanted = [failure for failure in failures if isinstance(failure.get("seq"), int)]
    if not wanted:
        return 0
    queued = {letter.original_seq for letter in await dead_letters(js, consumer)}
    put = 0
    for failure in wanted:
        seq = failure["seq"]
        if seq in queued:
            continue
        try:
            msg = await js.get_msg(EVENTS_STREAM, seq=seq)
        except NotFoundError:  # (removed from the log meanwhile: nothing to replay)
            continue
        error = str(failure.get("error") or "failed")
        detail = f"a rebuild of the read models could not apply it:\n{failure.get('detail') or error}"
        headers = {
            "Nats-Msg-Id": f"dlq.{consumer}.{seq}.rebuild.{time.time_ns()}",
            DLQ_ERROR: header_value(error[:200]),
            DLQ_DETAIL: header_value(detail),
            DLQ_CONSUMER: consumer,
            DLQ_DELIVERIES: "1",
            DLQ_SUBJECT: str(msg.subject),
            DLQ_STREAM_NAME: EVENTS_STREAM,
            DLQ_STREAM_SEQ: str(seq),
            DLQ_FAILED_AT: datetime.now(timezone.utc).isoformat(),
            **({DLQ_EVENT_ID: header_value(str(failure["id"]))} if failure.get("id") else {}),
        }
        await js.publish(f"collab.dlq.{consumer}", msg.data or b"", headers=headers, stream=DLQ_STREAM)
        put += 1
    return put


async def counts(js: JetStreamContext) -> dict[str, int]:
    """How many dead letters each consumer has."""
    try:
        state = (await js.stream_info(DLQ_STREAM, subjects_filter=DLQ_SUBJECTS)).state
    except NotFoundError:
        return {}
    return {subject.removeprefix("collab.dlq."): n for subject, n in sorted((state.subjects or {}).items())}


@dataclass(frozen=True)
class Replayed:
    """What replaying one dead letter came to: ``applied`` (and removed from the DLQ), or not and
    why; ``released``: what it was about is let go after it (none of its events is left in the
    queue)."""

    seq: int
    consumer: str | None
    event_id: str | None
    applied: bool
    error: str | None = None
    released: dict[str, str] | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def found(self) -> bool:
        """Whether there was such a dead letter to replay (a number asked for may name none)."""
        return self.consumer is not None


def about(letter: DeadLetter) -> tuple[str, str] | None:
    """What a dead letter's event is about: its domain and subject (None when unreadable)."""
    from handlers.bookkeeping import aggregate_of

    return aggregate_of(letter.event)


def things(letter: DeadLetter) -> list[tuple[str, str]]:
    """What a dead letter's event is about, then — set aside behind a thing its workflow reads
    (a validation's project) — that thing."""
    own = about(letter)
    if own is None:
        return []
    waits_for = letter.waits_for
    return [own] if waits_for is None or waits_for == own else [own, waits_for]


def set_aside_behind(letters: Iterable[DeadLetter]) -> dict[int, DeadLetter]:
    """Of ``letters`` (the queue, or a consumer's part of it), those set aside (``Parked``) and
    the earliest dead letter they wait behind — the first about the same thing, or about a thing
    their workflow reads (:func:`things`) — by their number in the queue (one whose earlier
    letter is gone — purged meanwhile — is not among them)."""
    from handlers.service import PARKED

    heads: dict[tuple[str, tuple[str, str]], DeadLetter] = {}
    behind: dict[int, DeadLetter] = {}
    for letter in sorted(letters, key=_in_log_order):
        named = things(letter)
        if not named or letter.original_seq is None:
            continue
        earlier = [heads[(letter.consumer, thing)] for thing in named if (letter.consumer, thing) in heads]
        heads.setdefault((letter.consumer, named[0]), letter)
        if earlier and letter.error == PARKED:
            behind[letter.seq] = min(earlier, key=_in_log_order)
    return behind


def _in_log_order(letter: DeadLetter) -> tuple[bool, int, int]:
    return letter.original_seq is None, letter.original_seq or 0, letter.seq


def _parks(applier: Any) -> bool:
    """Whether a consumer's applier sets things aside behind its dead letters (the network's and
    the webhooks')."""
    return callable(getattr(applier, "release", None))


async def replay(
    js: JetStreamContext, appliers: Mapping[str, Applier], seqs: Iterable[int] | None = None,
    queued: list[DeadLetter] | None = None, progress: Callable[[int, int], None] | None = None,
) -> list[Replayed]:
    """Re-apply dead letters (``seqs``, or all) through their consumer's applier, oldest first.

    A dead letter is deleted once its event is applied; one that fails again stays, with why.
    The appliers are idempotent by event id, so an event already applied is not applied again.
    ``progress(done, total)`` is told after each.
    """
    if queued is None:  # (``queued``: the queue as the caller just listed it)
        queued = await dead_letters(js)
    if seqs is None:
        letters: list[DeadLetter | int] = list(queued)
    else:
        listed = {letter.seq: letter for letter in queued}
        letters = [listed.get(seq) or await dead_letter(js, seq) or seq for seq in sorted(set(seqs))]
    left: dict[tuple[str, tuple[str, str] | None], deque[DeadLetter]] = {}
    """The dead letters still in the queue about each thing, per consumer, in the log's order."""
    for queued_letter in sorted(queued, key=_in_log_order):
        left.setdefault((queued_letter.consumer, about(queued_letter)), deque()).append(queued_letter)
    results = []
    applied: dict[tuple[str, tuple[str, str] | None], int] = {}
    """The index in ``results`` of the last dead letter applied about each thing, per consumer."""
    for letter in letters:
        if isinstance(letter, int):
            results.append(Replayed(letter, None, None, False, f"no dead letter #{letter}"))
            continue
        thing = (letter.consumer, about(letter))
        waiting_on = {named: left.get((letter.consumer, named), deque()) for named in things(letter)}
        error = _waits(letter, waiting_on, appliers) or await _apply(js, appliers, letter)
        if error is None:
            await js.delete_msg(DLQ_STREAM, letter.seq)
            _gone(left.get(thing), letter)
            applied[thing] = len(results)
        results.append(Replayed(letter.seq, letter.consumer, letter.event_id, error is None, error))
        if progress is not None:
            progress(len(results), len(letters))
    for consumer, (domain, subject) in await settle(js, appliers):  # named on the last of its events applied
        if (index := applied.get((consumer, (domain, subject)))) is not None:
            results[index] = replace(results[index], released={"domain": domain, "subject": subject})
    return results


def _waits(letter: DeadLetter, queued: Mapping[tuple[str, str], Iterable[DeadLetter]], appliers: Mapping[str, Any]) -> str | None:
    """Why ``letter`` waits, when an earlier dead letter about the same thing, or about a thing
    its workflow reads (``queued``: by thing, those still in the queue, in the log's order), is
    still there: a consumer that sets things aside applies their events in the log's order."""
    if letter.original_seq is None or not _parks(appliers.get(letter.consumer)):
        return None
    firsts = [(first, thing) for thing, letters in queued.items()  # (in the log's order: the first other is the earliest)
              if (first := next((x for x in letters if x.seq != letter.seq), None)) is not None]
    earlier_ones = [(first, thing) for first, thing in firsts if first.original_seq is not None and first.original_seq < letter.original_seq]
    if not earlier_ones:
        return None
    earlier, thing = min(earlier_ones, key=lambda pair: pair[0].original_seq or 0)
    return (f"waits for dead letter #{earlier.seq} (log #{earlier.original_seq} {earlier.type}), an earlier event about "
            f"{thing[0]} {thing[1]} still in the queue: it is applied after that one (replay both, or that one first)")


def _gone(queued: deque[DeadLetter] | None, letter: DeadLetter) -> None:
    """Take a dead letter applied out of its thing's queue: the first of it, when replayed in the
    log's order."""
    if not queued:
        return
    if queued[0].seq == letter.seq:
        queued.popleft()
    else:
        for index, queued_letter in enumerate(queued):
            if queued_letter.seq == letter.seq:
                del queued[index]
                break


async def settle(js: JetStreamContext, appliers: Mapping[str, Any]) -> list[tuple[str, tuple[str, str]]]:
    """Let go what a consumer sets aside once none of its events is left in the dead-letter
    queue (replayed or purged); returns what was let go, as (consumer, (domain, subject)).

    What was set aside is read before the queue: an event set aside meanwhile either is in the
    listing (and its thing stays) or moved its thing's ``last_seq`` (and ``release`` leaves it)."""
    released = []
    for consumer, applier in appliers.items():
        if not _parks(applier):
            continue
        rows = await asyncio.to_thread(applier.parked)
        if not rows:
            continue
        still = {about(letter) for letter in await dead_letters(js, consumer)}
        for domain, subject, _first, last in rows:
            if (domain, subject) not in still and await asyncio.to_thread(applier.release, (domain, subject), last):
                released.append((consumer, (domain, subject)))
    return released


async def _apply(js: JetStreamContext, appliers: Mapping[str, Applier], letter: DeadLetter) -> str | None:
    """Apply one dead letter's event; None when applied, else why not."""
    from handlers.service import LoggedItem
    from schemas.common import nul_replaced

    applier = appliers.get(letter.consumer)
    if applier is None:
        return f"cannot replay dead letters of {letter.consumer!r} (replayable: {', '.join(sorted(appliers)) or 'none'})"
    if letter.event is None:
        return "the dead letter is not a readable event"
    if letter.original_seq is None:
        return "the dead letter does not say where the event is in the log"
    item = LoggedItem(letter.original_seq, nul_replaced(letter.event), await _logged_at(js, letter))  # as the consumer reads it
    try:
        applied, failure, _ = await asyncio.to_thread(lambda: applier.apply_batch([item], replay=True))
    except Exception as exc:  # the database, most likely: its statement's parameters (the event's data) left out
        return reason_of(type(exc).__name__, str(exc).splitlines())
    if failure is not None:
        return reason_of(failure.error, failure.detail.splitlines())
    return None if applied == 1 else "not applied"


async def _logged_at(js: JetStreamContext, letter: DeadLetter) -> datetime:
    """When the log accepted the event: the workflows judge deadlines by it, not by now."""
    assert letter.original_seq is not None
    try:
        msg = await js.get_msg(letter.original_stream or EVENTS_STREAM, seq=letter.original_seq)
        if msg.time is not None:
            return msg.time if msg.time.tzinfo else msg.time.replace(tzinfo=timezone.utc)
    except NotFoundError:
        pass
    return datetime.now(timezone.utc)


LATER_SHOWN = 20
"""How many later events about the same thing ``dlq show`` and ``replay`` name at most."""


async def later_about_it(
    js: JetStreamContext, letter: DeadLetter, limit: int = LATER_SHOWN, queued: Iterable[DeadLetter] | None = None,
) -> list[dict[str, Any]]:
    """The events logged after a dead-lettered one about the same thing (its domain and
    subject; the workflows' answers to them included), up to ``limit``, as ``{"seq", "type",
    "waiting"}``. ``waiting``: it is in the dead-letter queue too, set aside behind this one (or
    failed itself), and a replay applies it after this one. The others its consumer applied
    without it (before things were set aside, or let go by hand; a workflow's answer to an event
    about something else): replayed, this one is applied after them, while a rebuild applies all
    in the log's order. ``queued``: the dead-letter queue as just listed (read when
    not given)."""
    thing = about(letter)
    if letter.original_seq is None or thing is None:
        return []
    waiting = {x.original_seq for x in (queued if queued is not None else await dead_letters(js, letter.consumer))
               if x.consumer == letter.consumer}
    later: list[dict[str, Any]] = []
    filter_ = log.event_filter(thing[0], None, thing[1])
    async with aclosing(log.stored(js, EVENTS_STREAM, filter_, start_seq=letter.original_seq + 1)) as messages:
        async for message in messages:
            logged = log.readable(message.data)
            later.append({"seq": message.seq, "type": logged.get("type") if isinstance(logged, dict) else None,
                          "waiting": message.seq in waiting})
            if len(later) >= limit:
                break
    return later


async def purge(js: JetStreamContext, consumer: str | None = None) -> int:
    """Delete every dead letter (of ``consumer``, when given); returns how many there were."""
    subject = f"collab.dlq.{consumer}" if consumer else None
    try:
        before = (await js.stream_info(DLQ_STREAM, subjects_filter=subject or DLQ_SUBJECTS)).state
    except NotFoundError:
        return 0
    count = sum((before.subjects or {}).values())
    if count:
        await js.purge_stream(DLQ_STREAM, subject=subject)
    return count


async def discard(js: JetStreamContext, seqs: Iterable[int]) -> list[int]:
    """Delete the dead letters ``seqs`` (their numbers in the dead-letter queue); returns the ones
    that were there."""
    deleted = []
    for seq in seqs:
        try:
            if await js.delete_msg(DLQ_STREAM, seq):
                deleted.append(seq)
        except NotFoundError:
            continue
    return deleted


class Waiting:
    """A consumer's dead letters by event id, for ``GET /events/{id}`` (an event its sender was
    told is logged, which the bus could not apply or set aside). Only the dead letters added
    since the last look are read (a sender polling for its event's outcome does not have a queue
    of thousands read at each new one); one found is checked to be still there (replayed or
    purged since)."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self._read_to = 0
        """The last number in the queue read."""
        self._first = 0
        """The queue's first number at the last look."""
        self._by_id: dict[str, DeadLetter] = {}

    async def find(self, js: JetStreamContext, event_id: str) -> DeadLetter | None:
        try:
            state = (await js.stream_info(DLQ_STREAM)).state
        except NotFoundError:
            return None
        last = state.last_seq or 0
        if last < self._read_to or not state.messages:  # (a queue made anew, or emptied)
            self._by_id.clear()
            self._read_to = 0 if last < self._read_to else last
            self._first = 0
        first = state.first_seq or 0
        if first > self._first:  # the oldest gone: forget them (one found is checked anyway)
            self._by_id = {key: letter for key, letter in self._by_id.items() if letter.seq >= first}
            self._first = first
        if last > self._read_to:
            for added in await dead_letters(js, self.consumer, after=self._read_to):
                if added.seq <= last and added.event_id:
                    self._by_id[added.event_id] = added
            self._read_to = last
        letter = self._by_id.get(event_id)
        if letter is None:
            return None
        try:
            await js.get_msg(DLQ_STREAM, seq=letter.seq)
        except NotFoundError:  # replayed or purged since
            del self._by_id[event_id]
            return None
        return letter
