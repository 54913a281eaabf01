"""The gatekeeper: the one door into the event log (CONTRACT §4).

Every event from outside — NATS ingress or HTTP — goes through :meth:`Gate.admit`: size limit,
parse (structured or binary), envelope and data validation with every error listed, ``source``
must be the authenticated institution, the institution must be a member whose kind may emit the
type, then the event is published to the log under its id, so the same id twice is one event.
The gate keeps no state of its own, so any number of bus processes can share the ingress.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import orjson
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from opentelemetry import trace
from pydantic import BaseModel, ValidationError

from bus import cloudevents
from bus.membership import Membership
from bus.publisher import LogPublisher
from bus.streams import EVENTS_STREAM
from bus.verdict import Problem, Rejection, Verdict, reject
from ops import metrics, tracing
from ops.logs import Spell
from schemas import registry
from schemas.common import NUL_MESSAGE, InstitutionKind, error_message, json_type, unknown_name
from schemas.envelope import ATTRIBUTES, DATA_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE, CloudEvent, source_of

log = logging.getLogger("collabbus.gate")

#: What NATS adds to a message besides its payload and our headers (the HPUB line), generously.
_PROTOCOL_OVERHEAD = 256


def log_subject(event: Mapping[str, Any]) -> str:
    """``collab.events.{institution}.{domain}.{event}.{subject}`` of an accepted event."""
    institution = str(event["source"]).removeprefix("/institutions/")
    return f"collab.events.{institution}.{event['type']}.{event['subject']}"


_MODE_HINT = (
    "read as a structured CloudEvent (no ce- headers, no Content-Type application/cloudevents+json): "
    "send the whole event with that Content-Type, or the attributes as ce- headers and the data as the body"
)


def _mode_hint(raw: Mapping[str, Any] | None, headers: Mapping[str, str] | None) -> str | None:
    """Why an event without a ``specversion`` may have been read in the mode its sender did not
    mean, and what to send (None when nothing suggests it)."""
    if not cloudevents.names_mode(headers):
        return _MODE_HINT
    if cloudevents.ignores_attributes(headers):
        return ("read as a structured CloudEvent (Content-Type application/cloudevents+json), whose attributes are in "
                "the body: its ce- headers were not read. Send the attributes as ce- headers with the data's Content-Type "
                "(application/json), or the whole event in the body")
    data = raw.get("data") if raw is not None else None
    if not cloudevents.is_structured(headers) and isinstance(data, dict) and "specversion" in data:
        return ("read in binary mode (it has ce- headers), where the body is the data alone, and the body is a whole "
                "event: send it with Content-Type application/cloudevents+json and no ce- headers")
    return None


INPUT_FACTOR = 2
"""Input (a body and its ``ce-`` headers) this many times the event size limit is refused before
it is parsed; within it, the limit is checked on the event serialized."""


def canonical_bytes(event: Mapping[str, Any]) -> bytes:
    """The canonical structured JSON of an event: attributes in a fixed order, then ``data``."""
    ordered = {name: event[name] for name in ATTRIBUTES if event.get(name) is not None}
    ordered["data"] = event["data"]
    return orjson.dumps(ordered)


def _problems(exc: ValidationError, prefix: tuple[str | int, ...] = (), spec: registry.EventSpec | None = None) -> list[Problem]:
    errors = exc.errors(include_url=False)
    # A list whose only item is invalid is also "too short" once that item is left out: the item's
    # own error says what is wrong, the count would send the sender looking for a missing item.
    inner = {tuple(err["loc"][:i]) for err in errors for i in range(len(err["loc"]))}
    return [
        Problem(prefix + tuple(err["loc"]), _message(err, spec), err["type"])
        for err in errors
        if not (err["type"] == "too_short" and tuple(err["loc"]) in inner)
    ]


def _message(err: Mapping[str, Any], spec: registry.EventSpec | None) -> str:
    unknown = _unknown_name(tuple(err["loc"]), spec) if err["type"] == "extra_forbidden" else None
    return unknown or error_message(err)


ENVELOPE_NAMES = (*ATTRIBUTES, "data")


def _unknown_name(loc: tuple[str | int, ...], spec: registry.EventSpec | None) -> str | None:
    """What to say of a name an event has and its type does not, where the names it may have are
    known (an attribute of the envelope, a field of the data or of an object in it), with the
    nearest one, which is most often what was meant; None where they are not (pydantic's message
    then: inside a mapping such as a LocalizedText, say)."""
    name = loc[-1] if loc else None
    if not isinstance(name, str):
        return None
    if len(loc) == 1:
        return unknown_name(name, "an attribute the network's events have", ENVELOPE_NAMES,
                            f" (they have {', '.join(ATTRIBUTES)} and data: no other CloudEvents extension)")
    if len(loc) >= 2 and loc[0] == "data" and spec is not None:
        model = model_at(spec.model, loc[1:-1])
        if model is None:
            return None
        place = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc[1:-1])
        what = f"a field of data{place} in {spec.type}" if place else f"a field of {spec.type}'s data"
        return unknown_name(name, what, field_names(model))
    return None


def field_names(model: type[BaseModel]) -> tuple[str, ...]:
    """The names a model's fields take in JSON (their aliases, where they have one)."""
    return tuple(field.alias or field_name for field_name, field in model.model_fields.items())


def model_at(model: type[BaseModel], path: tuple[str | int, ...]) -> type[BaseModel] | None:
    """The model of the object at ``path`` inside an instance of ``model`` (through its fields,
    lists and optional values), or None where the path leads to anything else."""
    import typing

    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue  # an item of the list just stepped into: its model is that list's
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) or next((f for f in current.model_fields.values() if f.alias == part), None)
        if field is None:
            return None
        current = field.annotation
        while typing.get_origin(current) is not None and not (isinstance(current, type) and issubclass(current, BaseModel)):
            if typing.get_origin(current) is typing.Annotated:
                current = typing.get_args(current)[0]
                continue
            inner = [arg for arg in typing.get_args(current) if arg is not type(None) and arg is not Ellipsis]
            if len(inner) != 1:
                return None  # a mapping, a union of models, a tuple of several: not one model's names
            current = inner[0]
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


_typed_envelopes: dict[tuple[str, int], type[CloudEvent]] = {}


def typed_envelope(spec: registry.EventSpec) -> type[CloudEvent]:
    """The CloudEvent model whose ``data`` is the spec's model, built once per type."""
    key = (spec.type, spec.major)
    model = _typed_envelopes.get(key)
    if model is None:
        from pydantic import create_model

        name = "".join(part.title() for part in spec.type.replace("_", ".").split(".")) + f"V{spec.major}Event"
        model = create_model(name, __base__=CloudEvent, data=(spec.model, ...))
        _typed_envelopes[key] = model
    return model


def named_spec(raw: Mapping[str, Any]) -> tuple[registry.EventSpec | None, list[Problem]]:
    """The spec of the type and dataschema an event names, or what is wrong with them (no type
    at all: neither; :func:`validate` reports it as a missing attribute)."""
    etype = raw.get("type")
    if not isinstance(etype, str):
        return None, []
    dataschema = raw.get("dataschema")
    if dataschema is not None and not isinstance(dataschema, str):
        problems = [Problem(("dataschema",), f"dataschema is a string, {registry.DATASCHEMA_PREFIX}{{type}}:{{major}} "
                                              f"(or absent: major 1), not {json_type(dataschema)}", "string_type")]
        try:
            registry.spec_for(etype, 1)
        except registry.UnknownEventType as exc:
            problems.insert(0, Problem(("type",), str(exc), "unknown_type"))
        except registry.UnknownMajorVersion:
            pass
        return None, problems
    try:
        return registry.spec_for(etype, registry.parse_dataschema(dataschema, etype)), []
    except registry.UnknownEventType as exc:
        return None, [Problem(("type",), str(exc), "unknown_type")]
    except registry.UnknownMajorVersion as exc:
        return None, [Problem(("dataschema",), str(exc), "unknown_major")]
    except ValueError as exc:
        return None, [Problem(("dataschema",), str(exc), "dataschema_invalid")]


def _with_nul(value: Any, loc: tuple[str | int, ...] = ()) -> list[Problem]:
    """A problem for each text in an event (a name of an object's member, or a value) holding the
    NUL character: an event the log took with one would fail its projection on PostgreSQL, and be
    in the log for good."""
    if isinstance(value, str):
        return [Problem(loc, NUL_MESSAGE, "string_nul")] if "\x00" in value else []
    if isinstance(value, dict):
        found = [Problem((*loc, name), NUL_MESSAGE, "string_nul") for name in value if "\x00" in name]
        return found + [problem for name, item in value.items() for problem in _with_nul(item, (*loc, name))]
    if isinstance(value, list):
        return [problem for i, item in enumerate(value) for problem in _with_nul(item, (*loc, i))]
    return []


SENDER_NAMED: dict[str, str] = {"project.registered": "owner", "innovation_day.registration_requested": "participant"}
"""Types whose data names the institution saying them: it must be the event's source. A member
registers its own projects (one registered in another's name would be a project its registrant
cannot change, shown as the other's; others take part as partners) and itself for a day (a seat
taken in another's name — or a made-up one's — could be cancelled by nobody: only the
participant cancels)."""


ABOUT_A_MEMBER = frozenset({"institution.updated", "institution.left"})
"""Types about a current member (their subject, ``data.id``): of any other institution they
would change nothing, and the operator would be told they were accepted."""


def validate(
    raw: dict[str, Any], body: bytes | None = None, named: tuple[registry.EventSpec | None, list[Problem]] | None = None
) -> tuple[registry.EventSpec, CloudEvent]:
    """Validate envelope and data; raise a :class:`Rejection` listing every problem.

    ``body`` is the raw JSON of ``raw`` when the caller has it (structured mode), saving a dump;
    ``named`` is :func:`named_spec` of ``raw`` when the caller has looked it up already.
    """
    spec, found = named if named is not None else named_spec(raw)
    problems = list(found)
    model: type[CloudEvent] = typed_envelope(spec) if spec is not None else CloudEvent
    try:
        if body is None:
            body = orjson.dumps(raw)
    except orjson.JSONEncodeError as exc:  # data read from binary mode nested deeper than JSON is written
        raise reject("invalid", "json_invalid", f"the event cannot be read: {exc} (nested too deeply)", "data") from None
    nul = _with_nul(raw) if b"\\u0000" in body else []  # (JSON writes the character so, and only so)
    try:
        event = model.model_validate_json(body)
    except ValidationError as exc:
        # A dataschema of another JSON type is told by named_spec, not again in pydantic's words;
        # a text with a NUL that pydantic refuses anyway (an id's pattern), in pydantic's.
        told = {problem.loc for problem in problems} & {("dataschema",)}
        theirs = [problem for problem in _problems(exc, spec=spec) if problem.loc not in told]
        places = {problem.loc for problem in theirs}
        raise Rejection("invalid", *problems, *(problem for problem in nul if problem.loc not in places), *theirs) from None
    if problems or nul or spec is None:
        raise Rejection("invalid", *problems, *nul)
    data = event.data
    assert isinstance(data, BaseModel)
    expected = getattr(data, spec.subject_field, None)
    if expected is not None and str(expected) != event.subject:
        raise reject(
            "invalid",
            "subject_mismatch",
            f"subject {event.subject!r} must be the {spec.subject_field} of the data ({expected!r})",
            "subject",
        )
    field = SENDER_NAMED.get(spec.type)
    if field is not None and source_of(str(getattr(data, field))) != event.source:
        raise reject(
            "forbidden",
            f"{field}_mismatch",
            f"{field} {getattr(data, field)!r} must be the sender ({event.source!r}): "
            f"an institution says {spec.type} of its own",
            "data",
            field,
        )
    return spec, event


def _emitters(kinds: frozenset[str]) -> str:
    """The kinds that may offer a type, in words: the few, or all but the few."""
    allowed = set(map(str, kinds))
    others = sorted(set(map(str, InstitutionKind)) - allowed)
    if len(others) < len(allowed):
        return "every kind but " + " and ".join(repr(kind) for kind in others)
    return "only " + ", ".join(repr(kind) for kind in sorted(allowed))


class Gate:
    """Admits events to the log. One instance per bus process; stateless apart from caches."""

    def __init__(
        self,
        nc: Client,
        js: JetStreamContext,
        membership: Membership,
        *,
        max_event_bytes: int,
        stream: str = EVENTS_STREAM,
        publish_timeout: float = 5.0,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.nc = nc
        self.tracer = tracer or trace.NoOpTracer()
        self.js = js
        self.membership = membership
        self.max_event_bytes = max_event_bytes
        self.stream = stream
        self.publish_timeout = publish_timeout
        self.publisher = LogPublisher(nc)
        self.unanswered = Spell(
            log, first="the log does not answer ({why}; {event_id} first): offers are answered unavailable (log_unavailable) "
                       "until it does",
            still="the log still does not answer ({why}): offers answered unavailable {times} in {seconds:.0f} s",
            ended="the log answers offers again (offers answered unavailable {times} in {seconds:.0f} s)")

    async def start(self) -> None:
        """Open the subscription the log's acknowledgements come back on (before the first event)."""
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    async def admit(
        self,
        institution: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        *,
        offered_type: str | None = None,
        extra_headers: Mapping[str, str] | None = None,
    ) -> Verdict:
        """Judge an event offered by ``institution`` (already authenticated) and log it if good.

        Never raises: anything wrong with the input, or with the log, becomes a rejection.
        """
        raw: dict[str, Any] | None = None
        try:
            raw, size = self._parse(body, headers)
            self._check_size(raw, size)
            changed = cloudevents.plain_json_content_type(raw)
            # Who may say it is judged before what it says: a sender is not asked to correct data
            # it may not send at all. What could not be judged yet (no readable source or type) is
            # judged once the envelope is valid.
            named = named_spec(raw)
            judged = isinstance(raw.get("source"), str) and named[0] is not None
            await self._check_sender(institution, raw.get("source"), named[0])
            spec, event = validate(raw, body if cloudevents.is_structured(headers) and not changed else None, named)
            if offered_type is not None and offered_type != event.type:
                raise reject(
                    "invalid", "type_mismatch",
                    f"type {event.type!r} does not match the ingress subject's {offered_type!r}", "type",
                )
            if not judged:
                await self._check_sender(institution, event.source, spec)
            if spec.type in ABOUT_A_MEMBER or spec.type == "institution.joined":
                await self._check_membership_change(spec.type, event.subject, raw.get("data"))
            verdict = await self._log(raw, spec, extra_headers)
        except Rejection as exc:
            event_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else cloudevents.offered_id(headers)
            problems = exc.problems
            if any(p.type == "missing" and p.loc == ("specversion",) for p in problems):
                hint = _mode_hint(raw, headers)
                if hint is not None:
                    problems = (*problems, Problem((), hint, "mode_unclear"))
            verdict = Verdict("rejected", event_id, errors=problems, reason=exc.reason)
        except (NatsTimeoutError, NatsError, JetStreamError) as exc:  # the log did not answer a look-up (a member not cached)
            event_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else cloudevents.offered_id(headers)
            self.unanswered.failed(why=exc, event_id=event_id)
            verdict = Verdict("rejected", event_id, reason="unavailable", errors=(
                Problem((), f"the event log did not answer ({type(exc).__name__}); retry with the same id", "log_unavailable"),))
        except Exception:  # a bug must cost one event, never the gate
            event_id = raw.get("id") if isinstance(raw, dict) and isinstance(raw.get("id"), str) else cloudevents.offered_id(headers)
            log.exception("gate failed on an offered event", extra={"event_id": event_id})
            verdict = Verdict(
                "rejected", event_id, reason="unavailable",
                errors=(Problem((), "internal error while judging the event; retry with the same id", "internal"),),
            )
        member = institution if self.membership.known(institution) else metrics.OTHER_INSTITUTION
        metrics.count_offer(member, raw if isinstance(raw, dict) else None, offered_type, verdict)
        if not verdict.accepted:  # the entry's span (HTTP or ingress) says the offer was refused, and why
            tracing.mark_refused(trace.get_current_span(), verdict)
        return verdict

    async def _check_sender(self, institution: str, source: Any, spec: registry.EventSpec | None) -> None:
        """Refuse a ``source`` other than the authenticated institution, a sender that is not a
        member, and a type its kind may not emit (``spec`` None: not known yet, not checked)."""
        if isinstance(source, str) and source != source_of(institution):
            raise reject(
                "forbidden", "source_mismatch",
                f"source {source!r} is not the authenticated institution ({source_of(institution)!r})",
                "source",
            )
        if spec is None:
            return
        kind = await self.membership.kind_of(institution)
        if kind is None:
            raise reject("forbidden", "not_member", f"{institution!r} is not a member of the network", "source")
        if not registry.may_emit(kind, spec.type, spec.major):
            if not spec.emitters:
                msg = f"{spec.type} is emitted by the bus's workflows only"
            else:
                msg = (f"an institution of kind {kind!r} may not emit {spec.type}: {_emitters(spec.emitters)} may "
                       "(GET /me lists what yours may)")
            raise reject("forbidden", "kind_may_not_emit", msg, "type")

    async def _check_membership_change(self, event_type: str, institution: str, data: Any) -> None:
        """Refuse an update or a leaving of an institution that is not a member, a municipality
        level for a member that is not a municipality, and anything that would make the network's
        operator stop being one: it alone admits, changes and removes members, so the network
        would have nobody left who can (and the log cannot be undone)."""
        kind = await self.membership.kind_of(institution)
        if event_type in ABOUT_A_MEMBER and kind is None:
            raise reject(
                "invalid", "not_member",
                f"{institution!r} is not a member of the network: {event_type} is about a member "
                "(institution.joined makes one)", "data", "id",
            )
        if (event_type == "institution.updated" and kind is not None and isinstance(data, Mapping)
                and data.get("municipality_level") is not None and data.get("kind", kind) != "municipality"):
            raise reject(
                "invalid", "municipalities_only",
                f"a municipality level is for municipalities only; {institution!r} is of kind {kind!r} "
                "(an update that makes it a municipality may give it one)", "data", "municipality_level",
            )
        if kind != "operator":
            return
        if event_type == "institution.left":
            raise reject("forbidden", "operator_kept", f"{institution!r} is the network's operator: it cannot leave", "data", "id")
        new_kind = data.get("kind") if isinstance(data, Mapping) else None
        if new_kind is not None and new_kind != "operator":
            raise reject(
                "forbidden", "operator_kept",
                f"{institution!r} is the network's operator: its kind stays operator (it alone admits and changes members)",
                "data", "kind",
            )

    async def publish_internal(self, event: Mapping[str, Any], extra_headers: Mapping[str, str] | None = None) -> Verdict:
        """Log an event the bus itself emits (workflows, the operator's bootstrap).

        The same validation as outside events, without the emitter checks: workflow events are
        emitted in the name of the aggregate's owner.
        """
        raw = dict(event)
        try:
            spec, _ = validate(raw)
            return await self._log(raw, spec, extra_headers)
        except Rejection as exc:
            return Verdict("rejected", raw.get("id"), errors=exc.problems, reason=exc.reason)

    def _parse(self, body: bytes, headers: Mapping[str, str] | None) -> tuple[dict[str, Any], int]:
        """The event offered, and its size as sent (the body and its ``ce-`` headers)."""
        # The limit is on the event serialized (``_log``); what is far beyond it is not even read.
        size = len(body) + sum(len(k) + len(v) for k, v in (headers or {}).items() if k[:3].lower() == "ce-")
        if size > INPUT_FACTOR * self.max_event_bytes:
            raise reject(
                "too_large", "too_large",
                f"the event is at least {size} bytes; the limit is {self.max_event_bytes} bytes serialized",
            )
        unsupported = cloudevents.unsupported_content_type(headers)
        if unsupported is not None:
            raise reject("unsupported", "unsupported_content_type", unsupported)
        try:
            return cloudevents.parse(body, headers), size
        except cloudevents.Malformed as exc:
            raise reject("malformed", exc.code, exc.msg, *exc.loc) from None

    def _check_size(self, raw: Mapping[str, Any], size: int) -> None:
        """The size limit on an event parsed, before it is validated: a sender mending a field
        would meet it next. (What was sent bounds the event serialized, but for the spelling of
        numbers: only a large one is measured; ``_log`` measures the event as logged.)"""
        if size <= self.max_event_bytes:  # (``size``: as sent, what ``_parse`` measured)
            return
        serialized = len(orjson.dumps({name: value for name, value in raw.items() if value is not None}))
        if serialized > self.max_event_bytes:
            raise reject(
                "too_large", "too_large",
                f"the event is {serialized} bytes serialized; the limit is {self.max_event_bytes} bytes",
            )

    async def _log(
        self, raw: dict[str, Any], spec: registry.EventSpec, extra_headers: Mapping[str, str] | None
    ) -> Verdict:
        added = 0  # what the gate sets is not the sender's to count: the limit is on the event as sent
        if raw.get("time") is None:
            raw["time"] = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            added += len(raw["time"]) + len('"time":"",')
        if raw.get("datacontenttype") is None:
            raw["datacontenttype"] = DATA_CONTENT_TYPE
            added += len(DATA_CONTENT_TYPE) + len('"datacontenttype":"",')
        payload = canonical_bytes(raw)
        if len(payload) - added > self.max_event_bytes:
            raise reject(
                "too_large", "too_large",
                f"the event is {len(payload) - added} bytes serialized; the limit is {self.max_event_bytes} bytes",
            )
        event_id = str(raw["id"])
        headers = {"Nats-Msg-Id": event_id, "Content-Type": STRUCTURED_CONTENT_TYPE}
        if extra_headers:
            headers.update(extra_headers)
        subject = log_subject(raw)
        with self._producer_span(raw, subject) as span:
            # The log message carries the producer's context; the envelope's traceparent stays the partner's.
            tracing.inject(headers)
            check_fits(self.nc, payload, headers)
            try:
                # (No Nats-Expected-Stream: the log's subjects are its alone, and the live copies
                # carry the stored headers to partners, who may forward them to streams of theirs.)
                ack = await self.publisher.publish(subject, payload, timeout=self.publish_timeout, headers=headers)
            except (NatsTimeoutError, NatsError, JetStreamError) as exc:
                self.unanswered.failed(why=exc, event_id=event_id)
                raise reject(
                    "unavailable", "log_unavailable",
                    f"the event log did not confirm the event ({type(exc).__name__}); retry with the same id",
                ) from None
            self.unanswered.ended()
            if span.is_recording():
                span.set_attributes({tracing.LOG_SEQ: ack.seq, tracing.DUPLICATE: bool(ack.duplicate)})
            if ack.duplicate:
                await self._check_duplicate(raw, ack.seq)
            elif spec.domain == "institution":
                self.membership.learn(raw)
        return Verdict("accepted", event_id, seq=ack.seq, duplicate=bool(ack.duplicate), event=raw)

    def _producer_span(self, raw: Mapping[str, Any], subject: str) -> Any:
        """The publish to the log: a producer span, child of the current one (the entry's) or, for
        an event the bus emits, of the deciding span its envelope names; linked to the envelope's
        ``traceparent`` (the context the event was created in) when that is another."""
        parent = None
        links = None
        created = tracing.context_of(raw.get("traceparent"))
        created_span = trace.get_current_span(created).get_span_context()
        if not trace.get_current_span().get_span_context().is_valid:
            parent = created
        elif created_span.is_valid:
            links = [trace.Link(created_span)]
        attributes = tracing.event_attributes(raw)
        attributes.update({tracing.MESSAGING_SYSTEM: "nats", tracing.MESSAGING_DESTINATION: subject, tracing.MESSAGING_OPERATION_TYPE: "send"})
        return self.tracer.start_as_current_span(
            f"publish {self.stream}", context=parent, kind=trace.SpanKind.PRODUCER, attributes=attributes, links=links,
        )

    async def _check_duplicate(self, raw: Mapping[str, Any], seq: int) -> None:
        # JetStream deduplicates on the id alone; an id another institution used first is a clash, not a retry.
        try:
            logged = orjson.loads((await self.js.get_msg(self.stream, seq)).data or b"{}")
        except (NatsError, JetStreamError):
            return
        if logged.get("source") != raw.get("source"):
            raise reject(
                "invalid", "id_taken",
                f"event id {raw.get('id')!r} is already used by another institution; choose a unique id", "id",
            )
        # A retry is the same event again; a new event under a used id would be dropped unseen.
        differing = [name for name in ("type", "subject", "data") if logged.get(name) != raw.get(name)]
        if differing:
            raise reject(
                "invalid", "id_taken",
                f"event id {raw.get('id')!r} is already used (#{seq}) for a different event (its {' and '.join(differing)} "
                "differ): a retry sends the same event again; a new event needs a new id", "id",
            )


def check_fits(nc: Client, payload: bytes, headers: Mapping[str, str]) -> None:
    """Refuse a message NATS would refuse: headers + payload over the server's ``max_payload``.

    nats-py checks only the payload; a larger message makes the server close the connection.
    """
    size = len(payload) + sum(len(k) + len(v) + 4 for k, v in headers.items()) + _PROTOCOL_OVERHEAD
    limit = nc.max_payload
    if size > limit:
        raise reject(
            "too_large", "too_large_for_nats",
            f"the event with its headers is {size} bytes; the NATS server accepts at most {limit} bytes per message",
        )
