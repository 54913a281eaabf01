"""Tracing across institutions, against a real nats-server, real HTTP sockets and a real OTLP
receiver: one connected trace from a partner's entry (HTTP or NATS ingress) through the
gatekeeper, the read models' consumer and its workflow, the derived event's publish, to the
webhook delivery whose receiver gets the trace's ``traceparent``; and the embedded trace store
read by ``collabbus traces`` and ``/ops/traces/{trace_id}``."""

from __future__ import annotations

import asyncio
import copy
import gzip
import json
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from bus.client import offer
from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from bus.streams import DLQ_STREAM, EVENTS_STREAM
from ops import dlq, tracing
from ops.settings import Settings
from tests.bus.test_consumer import FIXTURE, project_event, wait_for
from tests.conftest import OPERATOR, join, load_fixtures, unique
from tests.connectors.conftest import Gateway
from tests.handlers.harness import envelope
from tests.ops.conftest import bus_refusing_poison_rows, cli_env, collabbus
from tests.webhooks.conftest import Receiver, eventually, register

PARTNER_TRACE = "0af7651916cd43dd8448eb211c80319c"
PARTNER_SPAN = "b7ad6b7169203331"
CONFIRMED = "innovation_day.registration_confirmed"
RECEIVER_KEY = "k3y-in-the-query"
"""What the organizer's endpoint URL carries in its query: a receiver's token, kept out of traces."""


# --- an OTLP/HTTP receiver ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    kind: str
    service: str
    attributes: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    status: str
    status_message: str


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_STATUSES = {0: "unset", 1: "ok", 2: "error"}


@dataclass
class OtlpReceiver:
    """``POST /v1/traces`` with protobuf ``ExportTraceServiceRequest``s, decoded and kept."""

    spans: list[ReceivedSpan] = field(default_factory=list)
    requests: int = 0

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                if self.headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                assert self.path == "/v1/traces", self.path
                assert self.headers.get("content-type") == "application/x-protobuf"
                receiver.take(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def take(self, request: ExportTraceServiceRequest) -> None:
        decoded = []
        for resource_spans in request.resource_spans:
            service = next(
                (_value(a.value) for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(), span_id=span.span_id.hex(), parent_id=span.parent_span_id.hex(),
                            name=span.name, kind=_KINDS[span.kind], service=service,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                            status=_STATUSES[span.status.code], status_message=span.status.message,
                        )
                    )
        with self._lock:
            self.spans.extend(decoded)
            self.requests += 1

    def of_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    """An OTLP receiver, named by ``OTEL_EXPORTER_OTLP_ENDPOINT`` for the buses started meanwhile."""
    receiver = OtlpReceiver()
    receiver.start()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)
    yield receiver
    receiver.stop()


@pytest.fixture
def local_store(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTLP endpoint: buses keep their spans in the embedded store."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)


# --- a network: a bus on its own nats-server, its gateway, a receiver ---------------------------


@dataclass
class Network:
    gateway: Gateway
    organizer: str
    participant: str
    day_id: str
    endpoint: dict[str, Any]

    @property
    def bus(self) -> Bus:
        return self.gateway.bus

    def registration(self, **attributes: Any) -> dict[str, Any]:
        data = {
            "day_id": self.day_id, "registration_id": unique("reg"), "participant": self.participant,
            "role": "innovator", "attendees": 2, "interests": ["health_care.basic_services"],
        }
        return envelope("innovation_day.registration_requested", self.participant, data, **attributes)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    running = Receiver()
    await running.start()
    yield running
    await running.stop()


async def start_network(data_dir: Path, server: EmbeddedNats, receiver: Receiver) -> Network:
    """A bus with its gateway, two members, an innovation day with room, and the organizer's
    webhook for confirmed registrations."""
    settings = Settings(
        data_dir=data_dir, nats_url=server.url, nats_creds=server.bus_creds, operator=OPERATOR, http=f"127.0.0.1:{free_port()}",
        webhook_allow_networks=["127.0.0.0/8"], webhook_retry_schedule=[0, 0.2, 0.4],
    )
    bus = Bus(settings, consumer_settings=ConsumerSettings("network", backoff=(0.05, 0.1)), webhook_timeout=5.0)
    await bus.start()
    await bus.start_http()
    gateway = Gateway(bus, settings.db_url, httpx.AsyncClient(base_url=bus.http.url, timeout=30))
    organizer = await gateway.join("competence_centre")
    participant = await gateway.join("municipality", country="TR")
    day = copy.deepcopy(load_fixtures()["innovation_day.scheduled"]["event"]["data"])
    day.update(
        day_id=unique("day"), capacity=50, starts_at="2099-09-17T09:00:00+03:00", ends_at="2099-09-17T16:30:00+03:00",
        registration_deadline="2099-09-03T23:59:00+03:00",
    )
    await gateway.offer(organizer, "innovation_day.scheduled", day)
    endpoint = await register(gateway, organizer, receiver.url("/confirmed") + f"?key={RECEIVER_KEY}", [CONFIRMED])
    return Network(gateway, organizer, participant, day["day_id"], endpoint)


@pytest.fixture
async def network(tmp_path: Path, server: EmbeddedNats, receiver: Receiver) -> AsyncIterator[Network]:
    running = await start_network(tmp_path / "bus", server, receiver)
    try:
        yield running
    finally:
        await running.gateway.client.aclose()
        await running.bus.stop()


async def logged(bus: Bus, event_id: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The event as the log holds it, and its message's headers."""
    info = await bus.js.stream_info(EVENTS_STREAM)
    for seq in range(info.state.last_seq, 0, -1):
        msg = await bus.js.get_msg(EVENTS_STREAM, seq)
        if (msg.headers or {}).get("Nats-Msg-Id") == event_id:
            return orjson.loads(msg.data or b""), dict(msg.headers or {})
    raise AssertionError(f"{event_id} is not in the log")


def traceparent_parts(value: str) -> tuple[str, str]:
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00" and len(trace_id) == 32 and len(span_id) == 16 and int(flags, 16) & 1, value  # sampled
    return trace_id, span_id


async def delivered_confirmation(receiver: Receiver, registration_id: str) -> dict[str, str]:
    """The headers of the webhook delivery of the registration's confirmation."""

    def find() -> dict[str, str] | None:
        for request in receiver.at("/confirmed"):
            if json.loads(request.body)["data"]["registration_id"] == registration_id:
                return request.headers
        return None

    return await eventually(find, what="the delivery of the confirmation")  # type: ignore[no-any-return]


def one(spans: list[ReceivedSpan], **wanted: Any) -> ReceivedSpan:
    """The single span with these fields and attributes (``attr_`` prefix: an attribute)."""
    found = [
        span for span in spans
        if all(
            (span.attributes.get(key[5:].replace("__", ".")) if key.startswith("attr_") else getattr(span, key)) == value
            for key, value in wanted.items()
        )
    ]
    assert len(found) == 1, (wanted, [(s.name, s.kind, s.attributes.get(tracing.EVENT_TYPE)) for s in spans])
    return found[0]


async def the_trace(otlp: OtlpReceiver, bus: Bus, trace_id: str, *, derived_id: str) -> list[ReceivedSpan]:
    """The trace's spans once the webhook delivery's client span has been exported."""
    assert bus.tracing is not None
    await asyncio.to_thread(bus.tracing.flush)

    def complete() -> list[ReceivedSpan] | None:
        spans = otlp.of_trace(trace_id)
        delivered = any(s.kind == "client" for s in spans)
        consumed = sum(1 for s in spans if s.kind == "consumer" and s.attributes.get(tracing.MESSAGING_MESSAGE_ID) == derived_id)
        return spans if delivered and consumed >= 2 else None

    return await eventually(complete, what=f"the spans of trace {trace_id}")  # type: ignore[no-any-return]


def assert_connected_journey(spans: list[ReceivedSpan], event: dict[str, Any], derived: dict[str, Any],
                             delivery_traceparent: str) -> ReceivedSpan:
    """gatekeeper → projection and workflow → derived event → its publish → webhook delivery, each
    span the child of the one before; returns the gatekeeper's producer span."""
    by_id = {span.span_id: span for span in spans}
    assert all(span.service == "collabbus" for span in spans)

    publish = one(spans, kind="producer", attr_messaging__message__id=event["id"])
    assert publish.attributes[tracing.MESSAGING_SYSTEM] == "nats"
    assert publish.attributes[tracing.MESSAGING_DESTINATION].startswith(f"collab.events.{event['source'].split('/')[-1]}.innovation_day.")
    assert publish.attributes[tracing.EVENT_TYPE] == "innovation_day.registration_requested"

    applied = one(spans, kind="consumer", name="process network", attr_messaging__message__id=event["id"])
    assert applied.parent_id == publish.span_id and (publish.trace_id, publish.span_id) in applied.links
    # No endpoint asked for the request itself: the webhooks consumer adds nothing to its trace.
    assert not [s for s in spans if s.name == "process webhooks" and s.attributes[tracing.MESSAGING_MESSAGE_ID] == event["id"]]

    # The workflow's decision continues the trace: the derived event's envelope names the deciding span.
    assert derived["causationid"] == event["id"]
    assert traceparent_parts(derived["traceparent"]) == (applied.trace_id, applied.span_id)
    relayed = one(spans, kind="producer", attr_messaging__message__id=derived["id"])
    assert relayed.parent_id == applied.span_id and relayed.attributes[tracing.EVENT_TYPE] == CONFIRMED
    for consumer in ("network", "webhooks"):
        assert one(spans, kind="consumer", name=f"process {consumer}", attr_messaging__message__id=derived["id"]).parent_id == relayed.span_id

    # The delivery is a client span of the derived event's log context, and the receiver got it.
    delivery = one(spans, kind="client")
    status = delivery.attributes.get("http.response.status_code", delivery.attributes.get("http.status_code"))
    assert delivery.parent_id == relayed.span_id and status == 200
    assert traceparent_parts(delivery_traceparent) == (delivery.trace_id, delivery.span_id)
    entries = [span for span in spans if span.parent_id not in by_id]
    assert len(entries) == 1, entries  # one connected tree, from the partner's entry
    return publish


# --- the journeys ---------------------------------------------------------------------------------


async def test_an_event_offered_over_http_is_one_trace_to_the_webhook_receiver(
    otlp: OtlpReceiver, network: Network, receiver: Receiver
) -> None:
    event = network.registration()
    response = await network.gateway.post(network.participant, event)
    assert response.status_code == 202, response.text

    headers = await delivered_confirmation(receiver, event["data"]["registration_id"])
    trace_id, _ = traceparent_parts(headers["traceparent"])
    original, original_headers = await logged(network.bus, event["id"])
    assert "traceparent" not in original  # the envelope is left as the partner sent it
    assert traceparent_parts(original_headers["traceparent"])[0] == trace_id  # the log message carries the trace
    derived_id = json.loads(next(r.body for r in receiver.at("/confirmed")))["id"]
    derived, _ = await logged(network.bus, derived_id)

    spans = await the_trace(otlp, network.bus, trace_id, derived_id=derived_id)
    publish = assert_connected_journey(spans, event, derived, headers["traceparent"])
    entry = one(spans, kind="server")
    assert entry.name == "POST /events" and entry.parent_id == ""  # the trace starts at the gateway
    assert publish.parent_id == entry.span_id
    assert traceparent_parts(original_headers["traceparent"]) == (publish.trace_id, publish.span_id)


async def test_an_event_offered_over_nats_continues_the_partners_trace(
    otlp: OtlpReceiver, network: Network, receiver: Receiver, server: EmbeddedNats
) -> None:
    event = network.registration()
    partner = await nats.connect(server.url, **server.connect_options())
    try:
        reply = await partner.request(
            f"collab.ingress.{network.participant}.innovation_day.registration_requested", orjson.dumps(event),
            headers={"Content-Type": "application/cloudevents+json", "traceparent": f"00-{PARTNER_TRACE}-{PARTNER_SPAN}-01"},
            timeout=10,
        )
    finally:
        await partner.close()
    assert json.loads(reply.data)["status"] == "accepted", reply.data

    headers = await delivered_confirmation(receiver, event["data"]["registration_id"])
    assert traceparent_parts(headers["traceparent"])[0] == PARTNER_TRACE  # the receiver can continue the partner's trace
    derived_id = next(
        json.loads(r.body)["id"] for r in receiver.at("/confirmed")
        if json.loads(r.body)["data"]["registration_id"] == event["data"]["registration_id"]
    )
    derived, _ = await logged(network.bus, derived_id)

    spans = await the_trace(otlp, network.bus, PARTNER_TRACE, derived_id=derived_id)
    publish = assert_connected_journey(spans, event, derived, headers["traceparent"])
    entry = one(spans, name="process collab.ingress")
    assert entry.kind == "consumer" and entry.parent_id == PARTNER_SPAN
    assert entry.attributes[tracing.MESSAGING_DESTINATION] == f"collab.ingress.{network.participant}.innovation_day.registration_requested"
    assert publish.parent_id == entry.span_id


async def test_a_refused_offer_marks_its_entry_span_failed(otlp: OtlpReceiver, network: Network) -> None:
    event = network.registration()
    event["data"]["attendees"] = 0
    trace_id = "5e1f0c2b7a9d4e3f8a6b0c1d2e3f4a5b"
    response = await network.gateway.post(
        network.participant, event, headers={"traceparent": f"00-{trace_id}-{PARTNER_SPAN}-01"}
    )
    assert response.status_code == 422, response.text
    assert network.bus.tracing is not None
    await asyncio.to_thread(network.bus.tracing.flush)
    spans = await eventually(lambda: otlp.of_trace(trace_id), what="the refused offer's span")
    entry = one(spans, kind="server")
    assert entry.status == "error" and entry.parent_id == PARTNER_SPAN
    assert entry.status_message.startswith("rejected (invalid): data.attendees: "), entry.status_message  # why, for the operator
    assert not [span for span in spans if span.kind == "producer"]  # nothing reached the log


async def test_a_request_refused_before_its_event_is_read_marks_its_span_failed(otlp: OtlpReceiver, network: Network) -> None:
    """No token (401): the operator sees the refusal and why on the partner's trace."""
    event = network.registration()
    trace_id = "7a1f0c2b7a9d4e3f8a6b0c1d2e3f4a5c"
    response = await network.gateway.client.post(
        "/events", json=event,
        headers={"content-type": "application/cloudevents+json", "traceparent": f"00-{trace_id}-{PARTNER_SPAN}-01"},
    )
    assert response.status_code == 401, response.text
    assert network.bus.tracing is not None
    await asyncio.to_thread(network.bus.tracing.flush)
    entry = one(await eventually(lambda: otlp.of_trace(trace_id), what="the refused request's span"), kind="server")
    assert entry.status == "error" and entry.parent_id == PARTNER_SPAN
    assert entry.status_message.startswith("401 unauthorized: send Authorization: Bearer <token>"), entry.status_message


# --- the embedded store: collabbus traces and /ops/traces ------------------------------------------


async def test_collabbus_traces_and_the_operations_endpoint_show_a_trace_from_the_local_store(
    local_store: None, network: Network, receiver: Receiver
) -> None:
    bus = network.bus
    assert bus.tracing is not None and bus.tracing.exporter == "local"
    event = network.registration()
    response = await network.gateway.post(network.participant, event)
    assert response.status_code == 202, response.text
    headers = await delivered_confirmation(receiver, event["data"]["registration_id"])
    trace_id, _ = traceparent_parts(headers["traceparent"])
    store = bus.settings.data_dir / tracing.STORE_FILE

    def stored() -> bool:
        bus.tracing.flush()  # type: ignore[union-attr]
        found = tracing.load_trace(store, trace_id)
        return found is not None and any(span["kind"] == "client" for span in tracing.walk(found))

    await eventually(lambda: asyncio.to_thread(stored), what="the trace in the local store")

    env = cli_env(bus)
    code, out, err = await collabbus("traces", "--event", event["id"], "--json", env=env)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["trace_id"] == trace_id
    (root,) = shown["roots"]
    assert (root["operation"], root["kind"], root["service"]) == ("POST /events", "server", "collabbus")
    (publish,) = root["children"]
    assert publish["kind"] == "producer" and publish["event_id"] == event["id"]
    assert publish["event_type"] == "innovation_day.registration_requested" and publish["institution"] == network.participant
    operations = {(span["operation"], span["event_type"]) for span in tracing.walk(shown)}
    assert {("process network", "innovation_day.registration_requested"), ("publish COLLAB_EVENTS", CONFIRMED),
            ("process webhooks", CONFIRMED)} <= operations
    assert all(span["status"] != "error" and span["duration_ms"] >= 0 for span in tracing.walk(shown))

    code, out, err = await collabbus("traces", trace_id, env=env)
    assert code == 0, err
    assert f"trace {trace_id}" in out
    for text in ("POST /events", "publish COLLAB_EVENTS", "process network", "POST", CONFIRMED, network.participant):
        assert text in out, (text, out)
    assert f"to {network.endpoint['id']} at 127.0.0.1  HTTP 200" in out, out  # which endpoint, where, and what came of it
    (delivery,) = [span for span in tracing.walk(shown) if span["kind"] == "client"]
    assert delivery["attributes"]["url.full"] == receiver.url("/confirmed")
    assert RECEIVER_KEY not in out and RECEIVER_KEY not in sqlite3.connect(store).execute("SELECT group_concat(attributes) FROM spans").fetchone()[0]

    code, out, err = await collabbus("traces", "--json", "--limit", "50", env=env)
    assert code == 0, err
    assert trace_id in [found["trace_id"] for found in json.loads(out)["traces"]]

    code, out, err = await collabbus("traces", "0" * 32, env=env)
    assert code == 1 and "no trace" in err
    code, out, err = await collabbus("traces", "not-a-trace", env=env)
    assert code == 2 and "not a trace id" in err

    client, auth = network.gateway.client, network.gateway.auth(OPERATOR)
    answer = await client.get(f"/ops/traces/{trace_id}", headers=auth)
    assert answer.status_code == 200, answer.text
    assert answer.json()["trace_id"] == trace_id and answer.json()["roots"][0]["operation"] == "POST /events"
    missing = await client.get(f"/ops/traces/{'f' * 32}", headers=auth)
    assert missing.status_code == 404 and missing.headers["content-type"].startswith("application/problem+json")
    assert (await client.get(f"/ops/traces/{trace_id}", headers=network.gateway.auth(network.participant))).status_code == 403
    assert (await client.get(f"/ops/traces/{trace_id}")).status_code == 401

    # Only the entry of events is traced at the gateway: reads and operations add no spans.
    assert (await client.get("/institutions", headers=auth)).status_code == 200
    marker = "7d3c1b0a9e8f4d2c6b5a4e3d2c1b0a9f"
    refused = await network.gateway.post(network.participant, {"nonsense": True}, headers={"traceparent": f"00-{marker}-{PARTNER_SPAN}-01"})
    assert refused.status_code in (400, 422), refused.text

    def gateway_spans() -> list[str] | None:
        bus.tracing.flush()  # type: ignore[union-attr]
        found = tracing.recent_traces(store, limit=1000)
        names = [span["operation"] for one in found for span in tracing.walk(one) if span["kind"] == "server"]
        return names if any(one["trace_id"] == marker for one in found) else None

    assert set(await eventually(lambda: asyncio.to_thread(gateway_spans), what="the refused offer's span")) == {"POST /events"}


def test_the_local_store_keeps_the_latest_spans_only(tmp_path: Path) -> None:
    path = tmp_path / tracing.STORE_FILE
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(tracing.SpanStore(path, limit=5)))
    tracer = provider.get_tracer("test")
    names = [f"span-{n}" for n in range(8)]
    for name in names:
        with tracer.start_as_current_span(name):
            pass
    provider.shutdown()
    kept = [span["operation"] for found in tracing.recent_traces(path, limit=20) for span in tracing.walk(found)]
    assert sorted(kept) == sorted(names[-5:])


def test_the_local_store_is_read_by_trace_and_by_event_and_has_no_index_to_keep(tmp_path: Path) -> None:
    path = tmp_path / tracing.STORE_FILE
    with sqlite3.connect(path) as made_before:  # a store as earlier versions made it: indexed by both ids
        made_before.executescript(
            "CREATE TABLE spans (id INTEGER PRIMARY KEY AUTOINCREMENT, trace_id TEXT NOT NULL, span_id TEXT NOT NULL, "
            "parent_id TEXT, name TEXT NOT NULL, kind TEXT NOT NULL, service TEXT, start_ns INTEGER NOT NULL, "
            "end_ns INTEGER NOT NULL, status TEXT NOT NULL, status_message TEXT, event_id TEXT, event_type TEXT, "
            "institution TEXT, attributes TEXT NOT NULL, events TEXT NOT NULL, links TEXT NOT NULL);"
            "CREATE INDEX spans_by_trace ON spans (trace_id); CREATE INDEX spans_by_event ON spans (event_id);")
    made_before.close()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(tracing.SpanStore(path)))
    tracer = provider.get_tracer("test")
    traces = {}
    for n in range(3):
        with tracer.start_as_current_span(f"offer-{n}", attributes={tracing.MESSAGING_MESSAGE_ID: f"ev-{n}"}) as root:
            with tracer.start_as_current_span(f"apply-{n}"):
                pass
        traces[n] = format(root.get_span_context().trace_id, "032x")
    provider.shutdown()
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall() == []
    connection.close()
    assert tracing.trace_of_event(path, "ev-1") == traces[1]
    found = tracing.load_trace(path, traces[1])
    assert found is not None and [span["operation"] for span in tracing.walk(found)] == ["offer-1", "apply-1"]
    recent = tracing.recent_traces(path, limit=2)
    assert [one["trace_id"] for one in recent] == [traces[2], traces[1]]  # newest first, each whole
    assert [[span["operation"] for span in tracing.walk(one)] for one in recent] == [["offer-2", "apply-2"], ["offer-1", "apply-1"]]


def test_the_otel_variables_choose_where_spans_go(tmp_path: Path) -> None:
    local = tracing.Tracing.configure(tmp_path, environ={})
    otlp = tracing.Tracing.configure(tmp_path, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"})
    traces_only = tracing.Tracing.configure(
        tmp_path, environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://traces:4318/x"}
    )
    try:
        assert (local.exporter, local.store) == ("local", tmp_path / tracing.STORE_FILE)
        assert (otlp.exporter, otlp.endpoint) == ("otlp", "http://collector:4318/v1/traces")
        assert (traces_only.exporter, traces_only.endpoint) == ("otlp", "http://traces:4318/x")
    finally:
        for configured in (local, otlp, traces_only):
            configured.shutdown()
    for off in ({"OTEL_TRACES_EXPORTER": "none"}, {"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}):
        disabled = tracing.Tracing.configure(tmp_path, environ=off)
        assert disabled.exporter == "off" and not disabled.enabled
        with disabled.tracer.start_as_current_span("nothing") as span:
            assert not span.is_recording()


# --- the bus's light spans ----------------------------------------------------------------------


def _exported(span: Any) -> dict[str, Any]:
    """What an exporter reads of a span (ids aside), to compare the light spans with the SDK's."""
    return {
        "name": span.name, "kind": span.kind, "attributes": dict(span.attributes), "status": span.status.status_code,
        "description": span.status.description, "links": [(link.context.trace_id, link.context.span_id) for link in span.links],
        "events": [(event.name, sorted(event.attributes)) for event in span.events],
        "parent": (span.parent.trace_id, span.parent.span_id) if span.parent else None,
        "resource": dict(span.resource.attributes), "scope": span.instrumentation_scope.name,
    }


def test_a_light_span_exports_as_the_sdks_span_does() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "collabbus"}))
    processor = SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    light = tracing.LightTracer(provider.get_tracer(tracing.SERVICE), processor, provider.resource)
    sdk = provider.get_tracer(tracing.SERVICE)
    partner = tracing.context_of(f"00-{PARTNER_TRACE}-{PARTNER_SPAN}-01")
    producer = trace.get_current_span(partner).get_span_context()

    def journey(tracer: Any) -> None:
        with pytest.raises(ValueError):
            with tracer.start_as_current_span(
                "publish collab", context=partner, kind=trace.SpanKind.PRODUCER,
                attributes={tracing.EVENT_TYPE: "project.registered", tracing.LOG_SEQ: 7}, links=[trace.Link(producer)],
            ) as span:
                span.set_attribute(tracing.DUPLICATE, False)
                with tracer.start_as_current_span("child") as child:
                    child.set_status(trace.Status(trace.StatusCode.OK))
                    child.set_status(trace.Status(trace.StatusCode.ERROR, "ignored: OK is final"))
                with pytest.raises(KeyError), tracer.start_span("lookup", kind=trace.SpanKind.CLIENT):
                    raise KeyError("gone")  # recorded by the span used as a context manager, as the SDK's
                with tracer.start_as_current_span("refused") as refused:
                    refused.set_status(trace.Status(trace.StatusCode.ERROR, "rejected (invalid)"))
                    refused.set_status(trace.Status(trace.StatusCode.UNSET))  # changes nothing
                raise ValueError("the log is gone")

    journey(sdk)
    from_sdk = sorted(exporter.get_finished_spans(), key=lambda span: span.name)
    exporter.clear()
    journey(light)
    from_light = sorted(exporter.get_finished_spans(), key=lambda span: span.name)
    assert [span.name for span in from_light] == ["child", "lookup", "publish collab", "refused"]
    assert _exported(from_light[2])["parent"] == (int(PARTNER_TRACE, 16), int(PARTNER_SPAN, 16))
    for ours, theirs in zip(from_light, from_sdk, strict=True):
        assert {**_exported(ours), "parent": None} == {**_exported(theirs), "parent": None}
    child, lookup, publish, refused = from_light
    assert lookup.status.description == "KeyError: 'gone'" and lookup.events[0].attributes is not None
    assert lookup.events[0].attributes["exception.escaped"] == "True"
    assert refused.status.status_code is trace.StatusCode.ERROR and refused.status.description == "rejected (invalid)"
    assert child.parent is not None and child.parent.span_id == publish.context.span_id
    assert child.context.trace_id == publish.context.trace_id == int(PARTNER_TRACE, 16)
    assert publish.status.description == "ValueError: the log is gone"
    assert publish.events[0].attributes is not None and publish.events[0].attributes["exception.message"] == "the log is gone"


def test_spans_under_another_sampler_or_an_unsampled_parent_are_the_sdks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    default = tracing.Tracing.configure(tmp_path, environ={})
    try:
        assert isinstance(default.tracer, tracing.LightTracer)
        unsampled = tracing.context_of(f"00-{PARTNER_TRACE}-{PARTNER_SPAN}-00")
        with default.tracer.start_as_current_span("process collab.ingress", context=unsampled) as span:
            assert not span.is_recording()
            assert f"{span.get_span_context().trace_id:032x}" == PARTNER_TRACE
    finally:
        default.shutdown()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    off = tracing.Tracing.configure(tmp_path, environ={})
    try:
        assert not isinstance(off.tracer, tracing.LightTracer)
        with off.tracer.start_as_current_span("process collab.ingress") as span:
            assert not span.is_recording()
    finally:
        off.shutdown()


def test_a_failed_spans_errors_do_not_repeat_its_status() -> None:
    """A span's status message often repeats its exception's ("RuntimeError: <message>"):
    `collabbus traces` showed both; the status says it once, other exceptions' messages stay."""
    from ops.tracing import _span

    row = {"attributes": b"{}", "links": b"[]", "span_id": "s", "parent_id": None, "service": "collabbus", "name": "apply",
           "kind": "internal", "institution": None, "event_type": None, "event_id": None, "start_ns": 0, "end_ns": 1,
           "status": "error", "status_message": "RuntimeError: cannot apply poison-a",
           "events": orjson.dumps([{"name": "exception", "attributes": {"exception.message": "cannot apply poison-a"}},
                                   {"name": "exception", "attributes": {"exception.message": "the log is gone"}}])}
    assert _span(row)["errors"] == ["RuntimeError: cannot apply poison-a", "the log is gone"]  # type: ignore[arg-type]


def test_a_spans_errors_print_as_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    """An error may quote a member's text (a title refused, a reason): Rich read its brackets as
    markup (`[/fi]` failed `collabbus traces` with a MarkupError) and a terminal acts on its
    escapes. The trace's lines print it as written, a control character as `\\x1b`."""
    from ops.cli import _span_line, out
    from ops.tracing import DEAD_LETTER_REASON, _span

    said = "ValueError: title 'Kylä [/fi] ja\x1b[2J' is not allowed"
    row = {"attributes": orjson.dumps({DEAD_LETTER_REASON: said}), "links": b"[]", "span_id": "s", "parent_id": None,
           "service": "collabbus", "name": "process network", "kind": "consumer", "institution": "fi-kyla",
           "event_type": "project.registered", "event_id": "e-1", "start_ns": 0, "end_ns": 1, "status": "error",
           "status_message": said, "events": b"[]"}
    out.print(_span_line(_span(row)))  # type: ignore[arg-type]
    printed = " ".join(capsys.readouterr().out.split())
    assert printed.count("title 'Kylä [/fi] ja\\x1b[2J' is not allowed") == 2 and "\x1b" not in printed, printed


# --- an event that fails: its attempts, and its dead-lettering, in its trace ---------------------


async def test_a_failed_attempt_says_why_and_which_delivery_it_was_and_its_dead_lettering_follows(
    local_store: None, tmp_path: Path, server: EmbeddedNats
) -> None:
    """The read models refuse the event's row (a trigger: IntegrityError when the batch is
    written, not inside the handler): each attempt's span fails with the error and its delivery,
    and the dead-lettering after the last is a span under it. The spans keep the failed
    statement, not its parameters (the event's data: the store kept them)."""
    bus = await bus_refusing_poison_rows(tmp_path, server, flush_in_handler=False)
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        event = project_event("poison-a")
        assert (await offer(nc, FIXTURE["as"], event)).accepted
        await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
        bus.tracing.flush()  # type: ignore[union-attr]
        env = cli_env(bus)

        code, out, err = await collabbus("traces", "--event", event["id"], "--json", env=env)
        assert code == 0, err
        shown = json.loads(out)
        failed = [span for span in tracing.walk(shown) if span["operation"] == "process network" and span["status"] == "error"]
        assert [(span["attributes"][tracing.DELIVERY], span["attributes"][tracing.MAX_DELIVER]) for span in failed] == [(1, 2), (2, 2)]
        for span in failed:
            assert span["errors"][0].startswith("IntegrityError: ") and "impact reports of poison projects are refused" in span["errors"][0]
        (dead_lettered,) = failed[-1]["children"]
        assert (dead_lettered["operation"], dead_lettered["kind"], dead_lettered["event_id"]) == (
            "dead-letter collab.dlq.network", "producer", event["id"])
        assert dead_lettered["attributes"][tracing.DELIVERY] == 2 and dead_lettered["attributes"]["error.type"] == "IntegrityError"
        assert shown["errors"] == 2
        assert all("[SQL: INSERT INTO project_impact_reports" in span["errors"][0] for span in failed), failed
        store = sqlite3.connect(tmp_path / tracing.STORE_FILE)
        try:
            kept = [" ".join(str(value) for value in row) for row in store.execute("SELECT * FROM spans")]
        finally:
            store.close()
        assert any("[SQL: INSERT INTO project_impact_reports" in row for row in kept)
        assert not [row for row in kept if "2025-06-30" in row or "[parameters: " in row]  # (the report's period_end)

        code, out, err = await collabbus("traces", "--event", event["id"], env=env)
        assert code == 0, err
        assert "failed: IntegrityError: " in out and "delivery 1 of 2" in out and "delivery 2 of 2" in out, out
        assert "dead-letter collab.dlq.network" in out and "dead-lettered after 2 deliveries: IntegrityError: " in out, out

        # The dead letter carries the dead-lettering's trace context, which a replay continues.
        (letter,) = await dlq.dead_letters(bus.js)
        stored = await bus.js.get_msg(DLQ_STREAM, seq=letter.seq)
        assert (stored.headers or {})["traceparent"].split("-")[1:3] == [shown["trace_id"], dead_lettered["span_id"]]
    finally:
        await nc.close()
        await bus.stop()
