"""Tracing: one trace follows an event across institutions (OpenTelemetry, W3C trace context).

The trace of an event starts where a partner hands it over — the HTTP server span of
``POST /events`` or the span of the NATS ingress, continuing the partner's ``traceparent`` — and
goes on through the gatekeeper's publish to the log (a producer span whose context travels in the
log message's ``traceparent`` header), each consumer's processing of it (consumer spans, children
of the producer and linked to it), the events the workflows derive from it (their envelope's
``traceparent`` is the deciding consumer span), the relay's publish of those, and the webhook
deliveries (client spans; the receiver gets a ``traceparent`` of the trace to continue it).

Each :class:`Bus <bus.runtime.Bus>` owns a :class:`Tracing` — its own tracer provider, never the
process-global one — configured by OpenTelemetry's own variables: with
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) spans go there over
OTLP/HTTP; otherwise to the embedded default, a bounded :class:`SpanStore` in
``<data dir>/traces.db`` that ``collabbus traces`` and ``/ops/traces/{trace_id}`` read from another
process. Spans are handed to a batch processor, which writes them from a thread of its own: the
hot path never waits for I/O. ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` turns
tracing off; ``OTEL_TRACES_SAMPLER`` and the other standard variables are honoured by the SDK.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import Event as SpanEvent
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ops.wal import FALLBACK_AUTOCHECKPOINT

log = logging.getLogger("collabbus.tracing")

TRACEPARENT = "traceparent"
STORE_FILE = "traces.db"
STORE_LIMIT = 20_000
"""Spans the embedded store keeps; the oldest are dropped beyond it."""
SERVICE = "collabbus"

# Attribute names: OpenTelemetry's messaging and CloudEvents conventions, and the project's own.
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION = "messaging.destination.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_CONSUMER_GROUP = "messaging.consumer.group.name"
EVENT_TYPE = "cloudevents.event_type"
INSTITUTION = "collabbus.institution"
LOG_SEQ = "collabbus.log.seq"
DUPLICATE = "collabbus.duplicate"
VERDICT = "collabbus.verdict"
PORTAL = "collabbus.portal"
DELIVERY = "collabbus.delivery"
"""On a failed consumer span: which delivery of the event the attempt was (1 the first)."""
MAX_DELIVER = "collabbus.max_deliver"
"""On a failed consumer span: the deliveries the consumer makes before it dead-letters an event."""
DEAD_LETTER_REASON = "collabbus.dead_letter.reason"
WEBHOOK_ENDPOINT = "collabbus.webhook.endpoint"
ERROR_TYPE = "error.type"

TRACE_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")

_propagator = TraceContextTextMapPropagator()


# --- the tracing of one bus -------------------------------------------------------------------


@dataclasses.dataclass
class Tracing:
    """A bus's tracer provider and where its spans go (``exporter``: ``local``, ``otlp`` or ``off``)."""

    tracer: trace.Tracer
    exporter: str
    provider: TracerProvider | None = None
    store: Path | None = None
    """The embedded store's file, when spans go there."""
    endpoint: str | None = None
    """The OTLP traces endpoint, when spans go there."""

    @classmethod
    def off(cls) -> "Tracing":
        """No spans at all."""
        return cls(trace.NoOpTracer(), "off")

    @classmethod
    def configure(cls, data_dir: Path, environ: Mapping[str, str] | None = None) -> "Tracing":
        """Tracing as the ``OTEL_*`` variables ask (the process environment by default)."""
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls.off()
        chosen = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if chosen == "none":
            return cls.off()
        endpoint = otlp_traces_endpoint(env)
        attributes = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: SERVICE}
        provider = TracerProvider(resource=Resource.create(attributes))
        if endpoint is not None or chosen == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            otlp = BatchSpanProcessor(WithoutParameters(OTLPSpanExporter(endpoint=endpoint)))
            provider.add_span_processor(otlp)
            return cls(_tracer(provider, otlp), "otlp", provider, endpoint=endpoint)
        store = data_dir / STORE_FILE
        # Written every tenth of a second, a few hundred spans at a time: a second's worth at once
        # (the processor's own default is five) held the interpreter for tens of milliseconds,
        # which the events arriving meanwhile waited out (the benchmark's p99 at 500 events/s:
        # 19-22 ms against 14-17 ms). ``collabbus traces`` shows at once what just happened.
        delay = None if env.get("OTEL_BSP_SCHEDULE_DELAY") else 100
        processor = BatchSpanProcessor(WithoutParameters(SpanStore(store)), schedule_delay_millis=delay, max_queue_size=8192, max_export_batch_size=1024)
        provider.add_span_processor(processor)
        return cls(_tracer(provider, processor), "local", provider, store=store)

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def describe(self) -> str:
        """Where the spans go, for people."""
        if self.exporter == "otlp":
            return f"OTLP to {self.endpoint or 'the default endpoint'}"
        if self.exporter == "local":
            return f"kept in {self.store}"
        return "off"

    def flush(self, timeout_millis: int = 10_000) -> bool:
        """Export every finished span now; True when all were exported in time."""
        return self.provider.force_flush(timeout_millis) if self.provider is not None else True

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread."""
        if self.provider is not None:
            self.provider.shutdown()

    def unsampled(self) -> Any:
        """A context manager under which nothing is traced: a trace of its own (ids from the
        provider's generator) that is not sampled, which the spans started under it follow
        (parent-based sampling) and whose ``traceparent`` (flags ``00``) travels with what is sent."""
        ids = self.provider.id_generator if self.provider is not None else RandomIdGenerator()
        context = SpanContext(ids.generate_trace_id(), ids.generate_span_id(), is_remote=False, trace_flags=TraceFlags(TraceFlags.DEFAULT))
        return trace.use_span(NonRecordingSpan(context))

    @property
    def instrumented(self) -> trace.TracerProvider | None:
        """The tracer provider given to the instrumentations (HTTP server and client spans): the
        bus's light spans when its tracer makes them, each instrumentation under its own name."""
        if isinstance(self.tracer, LightTracer):
            return LightTracerProvider(self.tracer)
        return self.provider

    def instrument_httpx(self, client: Any) -> None:
        """Client spans, with ``traceparent`` sent, for every request of an ``httpx`` client."""
        if self.provider is None:
            return
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

        HTTPXClientInstrumentor.instrument_client(client, tracer_provider=self.instrumented)

    def instrument_gateway(self, app: Any) -> None:
        """Server spans for ``/events`` of the HTTP gateway, continuing the caller's ``traceparent``.

        Only the entry of events is traced: reads, documents and probes are not part of any
        event's story, and every span costs.
        """
        if self.provider is None:
            return
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(
            app, tracer_provider=self.instrumented, excluded_urls=r"^(?!https?://[^/]+/events/?(\?|$))",
            exclude_spans=["receive", "send"],
        )


def _tracer(provider: TracerProvider, processor: SpanProcessor) -> trace.Tracer:
    """The bus's own tracer: :class:`LightTracer` under the default sampler (``OTEL_TRACES_SAMPLER``
    unset or ``parentbased_always_on``), else the SDK's."""
    sdk = provider.get_tracer(SERVICE)
    return LightTracer(sdk, processor, provider.resource) if provider.sampler is sampling.DEFAULT_ON else sdk


class LightTracer(trace.Tracer):
    """The spans of an event's journey, made without the SDK's per-span machinery.

    The SDK's span checks and copies every attribute and link under locks and asks the sampler
    and every processor: 72 µs for a consumer span with seven attributes and a link, on the
    2-core machine of ``bench/README.md``, where an event gets four or five spans. These spans
    keep their facts in plain fields and are handed, when they end, to the bus's one batch
    processor as the SDK's own ``ReadableSpan``: 12 µs, with the same exporters, ids and context
    propagation. Used under the default sampler (parent-based, always on) only: a span whose
    parent was not sampled, and every span under another sampler, is the SDK's.
    """

    def __init__(self, sdk: trace.Tracer, processor: SpanProcessor, resource: Resource) -> None:
        self._sdk = sdk
        self._ids: IdGenerator = getattr(sdk, "id_generator", None) or RandomIdGenerator()
        """The SDK tracer's id generator (``OTEL_PYTHON_ID_GENERATOR`` is honoured as by its spans)."""
        self.processor = processor
        self.resource = resource
        self.scope = InstrumentationScope(SERVICE)

    def scoped(self, scope: InstrumentationScope) -> "LightTracer":
        """A tracer like this one whose spans name ``scope`` (an instrumentation's)."""
        tracer = LightTracer(self._sdk, self.processor, self.resource)
        tracer.scope = scope
        return tracer

    def start_span(  # type: ignore[override]
        self,
        name: str,
        context: otel_context.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: Mapping[str, Any] | None = None,
        links: Sequence[Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace.Span:
        parent = trace.get_current_span(context).get_span_context()
        if parent.is_valid and not parent.trace_flags.sampled:
            return self._sdk.start_span(name, context, kind, attributes, links, start_time, record_exception, set_status_on_exception)
        span_context = SpanContext(
            parent.trace_id if parent.is_valid else self._ids.generate_trace_id(), self._ids.generate_span_id(), is_remote=False,
            trace_flags=_SAMPLED, trace_state=parent.trace_state if parent.is_valid else None,
        )
        return LightSpan(
            self, name, span_context, parent if parent.is_valid else None, kind,
            {key: value for key, value in (attributes or {}).items() if value is not None}, list(links or ()),
            start_time or time.time_ns(), record_exception=record_exception, set_status_on_exception=set_status_on_exception,
        )

    @contextlib.contextmanager
    def start_as_current_span(  # type: ignore[override]
        self, name: str, *args: Any, end_on_exit: bool = True, **options: Any
    ) -> Iterator[trace.Span]:
        """:meth:`start_span` (the same arguments) as the current span for the block."""
        span = self.start_span(name, *args, **options)
        with trace.use_span(
            span, end_on_exit=end_on_exit, record_exception=options.get("record_exception", True),
            set_status_on_exception=options.get("set_status_on_exception", True),
        ) as current:
            yield current


class LightTracerProvider(trace.TracerProvider):
    """Hands out :class:`LightTracer` s like ``tracer`` (its processor and resource), each with the
    scope it is asked for: what the instrumentations are given."""

    def __init__(self, tracer: LightTracer) -> None:
        self._tracer = tracer

    def get_tracer(  # type: ignore[override]
        self, instrumenting_module_name: str, instrumenting_library_version: str | None = None,
        schema_url: str | None = None, attributes: Any = None,
    ) -> trace.Tracer:
        return self._tracer.scoped(InstrumentationScope(instrumenting_module_name, instrumenting_library_version, schema_url))


_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


class LightSpan(trace.Span):
    """A recording span of :class:`LightTracer`: what the API allows, ended into a ``ReadableSpan``."""

    def __init__(
        self, tracer: LightTracer, name: str, context: SpanContext, parent: SpanContext | None, kind: SpanKind,
        attributes: dict[str, Any], links: list[Link], start_time: int, *, record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> None:
        self._tracer = tracer
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        self._name = name
        self._context = context
        self._parent = parent
        self._kind = kind
        self._attributes = attributes
        self._links = links
        self._events: list[SpanEvent] = []
        self._status = Status(StatusCode.UNSET)
        self._start = start_time
        self._end: int | None = None

    def get_span_context(self) -> SpanContext:
        return self._context

    @property
    def status(self) -> Status:
        return self._status

    @property
    def kind(self) -> SpanKind:
        return self._kind

    @property
    def name(self) -> str:
        return self._name

    def is_recording(self) -> bool:
        return self._end is None

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end is None and value is not None:
            self._attributes[key] = value

    def add_event(self, name: str, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None) -> None:
        if self._end is None:
            self._events.append(SpanEvent(name, dict(attributes or {}), timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Mapping[str, Any] | None = None) -> None:
        if self._end is None and context.is_valid:
            self._links.append(Link(context, dict(attributes or {})))

    def update_name(self, name: str) -> None:
        if self._end is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        # As the SDK: an OK status is final, and UNSET changes nothing.
        code = status.status_code if isinstance(status, Status) else status
        if self._end is not None or self._status.status_code is StatusCode.OK or code is StatusCode.UNSET:
            return
        self._status = status if isinstance(status, Status) else Status(status, description)

    def __exit__(self, exc_type: Any, exc_val: BaseException | None, exc_tb: Any) -> None:
        """Ends the span; as the SDK's, ``with tracer.start_span(…) as span:`` records an exception
        leaving the block (unless the span was started not to)."""
        if exc_val is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        super().__exit__(exc_type, exc_val, exc_tb)

    def record_exception(
        self, exception: BaseException, attributes: Mapping[str, Any] | None = None, timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        self.add_event("exception", {
            "exception.type": kind.__qualname__ if kind.__module__ in ("builtins", None) else f"{kind.__module__}.{kind.__qualname__}",
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
            **(attributes or {}),
        }, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end is not None:
            return
        self._end = end_time or time.time_ns()
        tracer = self._tracer
        tracer.processor.on_end(ReadableSpan(
            name=self._name, context=self._context, parent=self._parent, resource=tracer.resource,
            attributes=self._attributes, events=tuple(self._events), links=tuple(self._links), kind=self._kind,
            status=self._status, start_time=self._start, end_time=self._end, instrumentation_scope=tracer.scope,
        ))


def otlp_traces_endpoint(env: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL the standard variables name, or None."""
    traces = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if traces:
        return traces
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + "/v1/traces"
    return None


# --- the spans of an event's journey ----------------------------------------------------------

_active: ContextVar[Tracing | None] = ContextVar("collabbus_tracing", default=None)
_consuming: ContextVar[tuple[str, int | None] | None] = ContextVar("collabbus_consuming", default=None)
_log_contexts: ContextVar[Mapping[int, str]] = ContextVar("collabbus_log_contexts", default={})
_deliveries: ContextVar["Deliveries | None"] = ContextVar("collabbus_deliveries", default=None)
_failed: dict[tuple[str, int | None], SpanContext] = {}
"""The span of each consumer's last failed attempt, by (consumer, log sequence): the parent of its
dead-lettering (:func:`dead_letter_span`)."""
_failed_lock = threading.Lock()


@dataclasses.dataclass(frozen=True)
class Deliveries:
    """Which delivery of its event an attempt is: ``of(seq)``, asked only when the attempt fails,
    out of the ``limit`` the consumer makes before it dead-letters the event."""

    of: Callable[[int], int | None]
    limit: int


def active() -> Tracing | None:
    """The tracing :func:`activate` made current here (None outside a bus)."""
    return _active.get()


def activate(tracing: Tracing) -> None:
    """Make ``tracing`` the one that :func:`consume_span` uses in this context and the tasks and
    worker threads started from it (the bus calls this on start)."""
    _active.set(tracing)


def context_of(traceparent: str | None) -> otel_context.Context:
    """The trace context a ``traceparent`` value carries (empty when absent or malformed)."""
    if not traceparent:
        return otel_context.Context()
    return _propagator.extract({TRACEPARENT: traceparent}, context=otel_context.Context())


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The trace context of a message's or request's headers (W3C ``traceparent``/``tracestate``)."""
    if not headers:
        return otel_context.Context()
    return _propagator.extract(headers, context=otel_context.Context())


def inject(headers: dict[str, str]) -> None:
    """Put the current span's context in ``headers`` (nothing when there is no span)."""
    _propagator.inject(headers)


def current_traceparent() -> str | None:
    """The ``traceparent`` of the current span, for an envelope the bus produces; None without one."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def event_attributes(envelope: Mapping[str, Any]) -> dict[str, Any]:
    """What a span about ``envelope`` says of it: its id (the message id), type and institution.

    Few on purpose: every attribute costs on the hot path; the rest of the event is in the log.
    """
    return {
        MESSAGING_MESSAGE_ID: str(envelope.get("id", "")),
        EVENT_TYPE: str(envelope.get("type", "")),
        INSTITUTION: str(envelope.get("source", "")).removeprefix("/institutions/"),
    }


def mark_failed(span: trace.Span, description: str) -> None:
    """Record on ``span`` that what it stands for failed, and why."""
    if span.is_recording():
        span.set_status(Status(StatusCode.ERROR, description))


def mark_failed_unless_failed(span: trace.Span, description: str) -> None:
    """:func:`mark_failed`, unless the span says already why it failed."""
    status = getattr(span, "status", None)  # the SDK's spans and LightSpan have it; the API does not
    if not (isinstance(status, Status) and status.status_code is StatusCode.ERROR):
        mark_failed(span, description)


def mark_refused(span: trace.Span, verdict: Any) -> None:
    """Record on an entry's span that the gate refused the offer (``bus.verdict.Verdict``), with
    the first problems, so an operator sees why without the partner's help."""
    if not span.is_recording():
        return
    problems = "; ".join(
        (".".join(str(part) for part in problem.loc) + ": " if problem.loc else "") + problem.msg for problem in verdict.errors[:3]
    )
    span.set_attribute(VERDICT, verdict.status)
    mark_failed(span, f"rejected ({verdict.reason})" + (f": {problems}" if problems else ""))


@contextlib.contextmanager
def consume_span(
    consumer: str, envelope: Mapping[str, Any], seq: int | None, traceparent: str | None, *, tracing: Tracing | None = None
) -> Iterator[trace.Span | None]:
    """A consumer's processing of one logged event, as the current span.

    ``traceparent``: the log message's header (the gatekeeper's producer span); the span is its
    child and links to it. Without one (an event logged before tracing), the envelope's own
    ``traceparent`` is continued. A span already open for the same consumer and event is reused,
    so callers at two levels do not nest two spans. ``tracing``: the bus's (default: the one
    :func:`activate` made current); without one, nothing.
    """
    tracing = tracing or _active.get()
    if tracing is None or not tracing.enabled or _consuming.get() == (consumer, seq):
        yield None
        return
    span = _consumer_span(tracing.tracer, f"process {consumer}", consumer, envelope, seq, traceparent)
    with _current(span, consumer, seq):
        yield span


def _consumer_span(
    tracer: trace.Tracer, name: str, consumer: str, envelope: Mapping[str, Any], seq: int | None, traceparent: str | None
) -> trace.Span:
    """The (started) consumer span of :func:`consume_span`."""
    producer = _remote_context(traceparent or envelope.get(TRACEPARENT))
    attributes: dict[str, Any] = {
        MESSAGING_MESSAGE_ID: str(envelope.get("id", "")),
        EVENT_TYPE: str(envelope.get("type", "")),
        INSTITUTION: str(envelope.get("source", "")).removeprefix("/institutions/"),
        MESSAGING_SYSTEM: "nats",
        MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_CONSUMER_GROUP: consumer,
    }
    if seq is not None:
        attributes[LOG_SEQ] = seq
    if producer is None:
        return tracer.start_span(name, context=_ROOT, kind=SpanKind.CONSUMER, attributes=attributes)
    return tracer.start_span(
        name, context=trace.set_span_in_context(NonRecordingSpan(producer), _ROOT), kind=SpanKind.CONSUMER,
        attributes=attributes, links=(Link(producer),),
    )


_ROOT = otel_context.Context()
_TRACEPARENT_00 = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def _remote_context(traceparent: Any) -> SpanContext | None:
    """The valid span context a ``traceparent`` names, or None (what :func:`context_of` extracts,
    without building a context for the usual version-00 value)."""
    if not traceparent or not isinstance(traceparent, str):
        return None
    match = _TRACEPARENT_00.fullmatch(traceparent)
    if match is None:
        found = trace.get_current_span(context_of(traceparent)).get_span_context()
        return found if found.is_valid else None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)))


@contextlib.contextmanager
def _current(span: trace.Span, consumer: str, seq: int | None) -> Iterator[None]:
    """``span`` as the current span (log lines carry its ids) for the block, ended after it; an
    exception leaving the block is recorded on it, as ``start_as_current_span`` does."""
    token = otel_context.attach(trace.set_span_in_context(span))
    consuming = _consuming.set((consumer, seq))
    try:
        yield
    except Exception as exc:
        _record_failure(span, exc)
        _failed_attempt(span, consumer, seq)
        raise
    finally:
        _consuming.reset(consuming)
        otel_context.detach(token)
        span.end()


def _record_failure(span: trace.Span, exc: Exception) -> None:
    if span.is_recording():
        span.record_exception(exc)
        span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


def _failed_attempt(span: trace.Span, consumer: str, seq: int | None) -> None:
    """Say on a failed consumer span which delivery of its event it was, and keep its context as
    the parent of the event's dead-lettering, should the consumer give up on it."""
    if not span.is_recording():
        return
    deliveries = _deliveries.get()
    if deliveries is not None and seq is not None and (number := deliveries.of(seq)) is not None:
        span.set_attributes({DELIVERY: number, MAX_DELIVER: deliveries.limit})
    with _failed_lock:
        _failed.pop((consumer, seq), None)
        _failed[(consumer, seq)] = span.get_span_context()
        while len(_failed) > 256:
            del _failed[next(iter(_failed))]


def _traceparent_of(span: trace.Span) -> str | None:
    """The ``traceparent`` naming ``span`` (what :func:`current_traceparent` gives inside it)."""
    context = span.get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


@contextlib.contextmanager
def log_contexts(items: Sequence[Any], deliveries: Deliveries | None = None) -> Iterator[None]:
    """Make the log messages' ``traceparent`` headers of a batch (``LoggedItem``s) known to
    :class:`TracedNetwork` in this context and the worker thread applying the batch, and
    ``deliveries``: which delivery of its event a failed attempt was."""
    token = _log_contexts.set({item.seq: item.traceparent for item in items if getattr(item, "traceparent", None)})
    counted = _deliveries.set(deliveries)
    try:
        yield
    finally:
        _deliveries.reset(counted)
        _log_contexts.reset(token)


@contextlib.contextmanager
def dead_letter_span(
    consumer: str, envelope: Mapping[str, Any] | None, seq: int, traceparent: str | None, destination: str, *,
    event_id: str | None, deliveries: int, error: str, reason: str, tracing: Tracing | None = None,
) -> Iterator[dict[str, str]]:
    """A consumer's giving up on the event at log sequence ``seq``: a producer span for its publish
    to the dead-letter queue ``destination``, the child of the event's last failed attempt (else
    of its log message, ``traceparent``). Yields the trace context to put in the dead letter's
    headers (empty without tracing), which a replay continues."""
    tracing = tracing or _active.get()
    if tracing is None or not tracing.enabled:
        yield {}
        return
    with _failed_lock:
        failed = _failed.pop((consumer, seq), None)
    logged = _remote_context(traceparent)
    parent = failed if failed is not None and (logged is None or logged.trace_id == failed.trace_id) else logged
    attributes: dict[str, Any] = {
        **(event_attributes(envelope) if envelope is not None else {MESSAGING_MESSAGE_ID: event_id}),
        MESSAGING_SYSTEM: "nats",
        MESSAGING_DESTINATION: destination,
        MESSAGING_OPERATION_TYPE: "send",
        MESSAGING_CONSUMER_GROUP: consumer,
        LOG_SEQ: seq,
        DELIVERY: deliveries,
        ERROR_TYPE: error,
        DEAD_LETTER_REASON: reason,
    }
    context = trace.set_span_in_context(NonRecordingSpan(parent), _ROOT) if parent is not None else _ROOT
    with tracing.tracer.start_as_current_span(f"dead-letter {destination}", context=context, kind=SpanKind.PRODUCER,
                                              attributes={k: v for k, v in attributes.items() if v is not None}) as span:
        headers: dict[str, str] = {}
        if (said := _traceparent_of(span)) is not None:
            headers[TRACEPARENT] = said
        yield headers


class TracedNetwork:
    """The handlers' ``Network`` with each event applied inside its consumer span, and the events
    it derives carrying that span as their ``traceparent``.

    This is the seam from outside the handlers; when the service opens the span itself
    (:func:`consume_span` around ``Network.apply``) this one steps aside for it.
    """

    def __init__(self, network: Any, consumer: str, tracing: Tracing) -> None:
        from handlers.network import deciding_traceparent  # here: a gatekeeper, which applies nothing, never loads the handlers

        self._network = network
        self._consumer = consumer
        self._tracing = tracing
        self._name = f"process {consumer}"
        self._deciding = deciding_traceparent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._network, name)

    def apply(self, session: Any, event: Any, **options: Any) -> Any:
        seq = event.seq
        if not self._tracing.enabled or _consuming.get() == (self._consumer, seq):
            return self._network.apply(session, event, **options)
        span = _consumer_span(self._tracing.tracer, self._name, self._consumer, event.envelope, seq, _log_contexts.get().get(seq))
        # The workflows give what they derive this span as its traceparent.
        deciding = self._deciding.set(lambda: _traceparent_of(span))
        try:
            with _current(span, self._consumer, seq):
                return self._network.apply(session, event, **options)
        finally:
            self._deciding.reset(deciding)


@contextlib.contextmanager
def continued(traceparent: str | None) -> Iterator[None]:
    """Run the block in the trace context ``traceparent`` names (as the parent of its spans)."""
    if not traceparent:
        yield
        return
    token = otel_context.attach(context_of(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


# --- the embedded store -------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spans (
    id INTEGER PRIMARY KEY,
    trace_id TEXT NOT NULL,
    span_id TEXT NOT NULL,
    parent_id TEXT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    service TEXT,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    status TEXT NOT NULL,
    status_message TEXT,
    event_id TEXT,
    event_type TEXT,
    institution TEXT,
    attributes TEXT NOT NULL,
    events TEXT NOT NULL,
    links TEXT NOT NULL
);
DROP INDEX IF EXISTS spans_by_trace;
DROP INDEX IF EXISTS spans_by_event;
"""
"""The store has no index but its order: spans go in at the end and leave at the start, a few
thousand a second, while it is read now and then, by an operator. Indexes on the trace's and the
event's random ids cost four times what the rows themselves do to write (and their scattered pages
are what the checkpoints copy); a look-up by either id reads the ``STORE_LIMIT`` rows instead, a
few milliseconds. (Stores made with those indexes lose them when next opened.)"""

_COLUMNS = (
    "trace_id, span_id, parent_id, name, kind, service, start_ns, end_ns, status, status_message, "
    "event_id, event_type, institution, attributes, events, links"
)


def _connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
    connection.execute("PRAGMA busy_timeout = 10000")
    return connection


_INSERT = f"INSERT INTO spans ({_COLUMNS}) VALUES ({', '.join('?' * 16)})"
_KINDS = {kind: kind.name.lower() for kind in SpanKind}
_STATUSES = {code: code.name.lower() for code in StatusCode}


class WithoutParameters(SpanExporter):
    """Exports spans through ``exporter`` with a failed database statement's parameters left out
    of their errors (the status and the exceptions' messages and stack traces): they are an
    event's data, a confidential one's too, which the span store and a collector are not the
    place for (the dead letter keeps them, beside the event). Spans without an error pass as they are."""

    def __init__(self, exporter: SpanExporter) -> None:
        self.exporter = exporter

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return self.exporter.export([_without_parameters(span) if span.events or span.status.description else span for span in spans])

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.exporter.force_flush(timeout_millis)


_PARAMETERS = re.compile(r"^\[parameters: .*$\n?", re.MULTILINE)
"""SQLAlchemy's line of a failed statement's parameters, in its errors' text."""


def _without_parameters(span: ReadableSpan) -> ReadableSpan:
    def scrubbed(text: Any) -> Any:
        return _PARAMETERS.sub("", text) if isinstance(text, str) and "[parameters: " in text else text

    status = span.status
    events = tuple(event if not any(scrubbed(value) is not value for value in (event.attributes or {}).values())
                   else SpanEvent(event.name, {key: scrubbed(value) for key, value in (event.attributes or {}).items()}, event.timestamp)
                   for event in span.events)
    description = scrubbed(status.description)
    if description is status.description and all(new is old for new, old in zip(events, span.events)):
        return span
    return ReadableSpan(
        name=span.name, context=span.context, parent=span.parent, resource=span.resource, attributes=span.attributes,
        events=events, links=span.links, kind=span.kind, status=Status(status.status_code, description.rstrip() if description else description),
        start_time=span.start_time, end_time=span.end_time, instrumentation_scope=span.instrumentation_scope,
    )


class SpanStore(SpanExporter):
    """The embedded default: finished spans in a SQLite file, the last ``limit`` of them.

    Called by the batch processor's thread only; other processes (the command line) read the file.
    """

    def __init__(self, path: Path, limit: int = STORE_LIMIT) -> None:
        self.path = path
        self.limit = limit
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self._resource: Resource | None = None
        self._service: str | None = None

    def _open(self) -> sqlite3.Connection:
        if self._connection is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            connection = _connect(self.path)
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            # The running bus checkpoints the store in the background (``ops.wal``): the commit that took
            # the log past SQLite's 1,000 pages synced ~4 MB, and held up nats-server's syncs of the event log.
            connection.execute(f"PRAGMA wal_autocheckpoint = {FALLBACK_AUTOCHECKPOINT}")
            connection.executescript(_SCHEMA)
            self._connection = connection
        return self._connection

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        rows = [self._row(span) for span in spans]
        try:
            with self._lock:
                connection = self._open()
                connection.execute("BEGIN IMMEDIATE")
                try:
                    connection.executemany(_INSERT, rows)
                    last = connection.execute("SELECT max(id) FROM spans").fetchone()[0] or 0
                    if last > self.limit:
                        connection.execute("DELETE FROM spans WHERE id <= ?", (last - self.limit,))
                    connection.execute("COMMIT")
                except BaseException:
                    connection.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            log.warning("trace store %s: %d spans not kept: %s", self.path, len(rows), exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def _row(self, span: ReadableSpan) -> tuple[Any, ...]:
        """A span as a row of ``spans``: few property reads (each copies), one JSON encoding per
        column (orjson writes the attributes' tuples as arrays), ids as hex via bytes (quicker
        than formatting the integers)."""
        context = span.context
        assert context is not None
        parent = span.parent
        resource = span.resource
        if resource is not self._resource:
            self._resource, self._service = resource, str(resource.attributes.get(SERVICE_NAME, "")) or None
        attributes = _plain(span.attributes)
        status = span.status
        start = span.start_time or 0
        events = span.events
        links = span.links
        return (
            context.trace_id.to_bytes(16, "big").hex(),
            context.span_id.to_bytes(8, "big").hex(),
            parent.span_id.to_bytes(8, "big").hex() if parent is not None else None,
            span.name,
            _KINDS[span.kind],
            self._service,
            start,
            span.end_time or start,
            _STATUSES[status.status_code],
            status.description,
            attributes.get(MESSAGING_MESSAGE_ID),
            attributes.get(EVENT_TYPE),
            attributes.get(INSTITUTION),
            orjson.dumps(attributes, default=str).decode() if attributes else "{}",
            orjson.dumps(
                [{"name": event.name, "time_ns": event.timestamp, "attributes": _plain(event.attributes)} for event in events],
                default=str,
            ).decode() if events else "[]",
            _links_json(links) if links else "[]",
        )

    def shutdown(self) -> None:
        with self._lock:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


def _links_json(links: Sequence[Link]) -> str:
    """The ``links`` column: ``[{"trace_id": …, "span_id": …}, …]``."""
    return "[" + ",".join(
        f'{{"trace_id":"{link.context.trace_id.to_bytes(16, "big").hex()}","span_id":"{link.context.span_id.to_bytes(8, "big").hex()}"}}'
        for link in links
    ) + "]"


def _plain(values: Mapping[str, Any] | None) -> dict[str, Any]:
    """Attributes as a plain dict (a span's are a read-only view of the SDK's bounded mapping,
    whose ``copy`` is its dict)."""
    if not values:
        return {}
    copied = values.copy() if hasattr(values, "copy") else None
    return copied if isinstance(copied, dict) else dict(values)


# --- reading the store: traces as trees -----------------------------------------------------------


class TraceStoreMissing(Exception):
    """There is no embedded trace store (nothing traced yet, or spans go elsewhere)."""


def _read(path: Path, sql: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
    if not path.is_file():
        raise TraceStoreMissing(f"no traces kept in {path} yet")
    connection = _connect(path)
    try:
        connection.row_factory = sqlite3.Row
        try:
            return connection.execute(sql, parameters).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                raise TraceStoreMissing(f"no traces kept in {path} yet") from None
            raise
    finally:
        connection.close()


def load_trace(path: Path, trace_id: str) -> dict[str, Any] | None:
    """One trace as a tree (see :func:`trace_tree`), or None when the store does not hold it."""
    rows = _read(path, f"SELECT {_COLUMNS} FROM spans WHERE trace_id = ? ORDER BY start_ns, id", (trace_id.lower(),))
    return trace_tree(trace_id.lower(), [_span(row) for row in rows]) if rows else None


def trace_of_event(path: Path, event_id: str) -> str | None:
    """The trace in which the event was first logged (a later duplicate offer is a trace of its own)."""
    rows = _read(
        path,
        "SELECT trace_id FROM spans WHERE event_id = ? ORDER BY (kind = 'producer') DESC, start_ns LIMIT 1",
        (event_id,),
    )
    return str(rows[0]["trace_id"]) if rows else None


def recent_traces(path: Path, limit: int = 10) -> list[dict[str, Any]]:
    """The ``limit`` most recently started traces, newest first, each as a tree (read at once:
    one pass over the store for them all)."""
    rows = _read(
        path,
        "WITH recent AS (SELECT trace_id FROM spans GROUP BY trace_id ORDER BY min(start_ns) DESC LIMIT ?) "
        f"SELECT {_COLUMNS} FROM spans WHERE trace_id IN (SELECT trace_id FROM recent) ORDER BY start_ns, id",
        (limit,),
    )
    spans: dict[str, list[dict[str, Any]]] = {}
    for row in rows:  # in order of start: a trace's first span is its start
        spans.setdefault(str(row["trace_id"]), []).append(_span(row))
    newest_first = sorted(spans.items(), key=lambda item: item[1][0]["_start_ns"], reverse=True)
    return [trace_tree(trace_id, found) for trace_id, found in newest_first]


def _span(row: sqlite3.Row) -> dict[str, Any]:
    attributes = orjson.loads(row["attributes"])
    events = orjson.loads(row["events"])
    errors = [
        str(event["attributes"].get("exception.message") or event["attributes"].get("exception.type") or event["name"])
        for event in events
        if event["name"] == "exception"
    ]
    said = row["status_message"]
    if row["status"] == "error" and said:  # (it often repeats an exception's message: "RuntimeError: <message>")
        errors = [said, *(error for error in errors if error not in said)]
    return {
        "span_id": row["span_id"],
        "parent_id": row["parent_id"],
        "service": row["service"],
        "operation": row["name"],
        "kind": row["kind"],
        "institution": row["institution"],
        "event_type": row["event_type"],
        "event_id": row["event_id"],
        "started_at": _iso(row["start_ns"]),
        "duration_ms": round((row["end_ns"] - row["start_ns"]) / 1e6, 3),
        "status": row["status"],
        "errors": errors,
        "attributes": attributes,
        "links": orjson.loads(row["links"]),
        "children": [],
        "_start_ns": row["start_ns"],
        "_end_ns": row["end_ns"],
    }


def _iso(nanoseconds: int) -> str:
    return datetime.fromtimestamp(nanoseconds / 1e9, timezone.utc).isoformat(timespec="microseconds")


def trace_tree(trace_id: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"trace_id", "started_at", "duration_ms", "spans", "errors", "roots": [span…]}``: each
    span with its ``children`` in order of start; a span whose parent is not kept (the partner's
    own span) is a root."""
    by_id = {span["span_id"]: span for span in spans}
    roots: list[dict[str, Any]] = []
    for span in spans:
        parent = by_id.get(span["parent_id"]) if span["parent_id"] else None
        (parent["children"] if parent is not None else roots).append(span)
    start = min(span["_start_ns"] for span in spans)
    end = max(span["_end_ns"] for span in spans)
    for span in spans:
        del span["_start_ns"], span["_end_ns"]
    return {
        "trace_id": trace_id,
        "started_at": _iso(start),
        "duration_ms": round((end - start) / 1e6, 3),
        "spans": len(spans),
        "errors": sum(1 for span in spans if span["status"] == "error"),
        "roots": roots,
    }


def walk(trace_or_spans: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    """Every span of a trace tree, depth first."""
    stack = list(trace_or_spans["roots"] if isinstance(trace_or_spans, Mapping) else trace_or_spans)[::-1]
    while stack:
        span = stack.pop()
        yield span
        stack.extend(reversed(span["children"]))
