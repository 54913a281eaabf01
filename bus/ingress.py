"""NATS ingress: ``collab.ingress.{institution}.{domain}.{event}``, request/reply, queue group ``collabbus-gate``."""

from __future__ import annotations

from typing import Any

from faststream.nats import NatsBroker, NatsMessage, NatsResponse
from opentelemetry import trace

from bus.gate import Gate
from bus.verdict import Verdict, reject
from ops import tracing

INGRESS_SUBJECT = "collab.ingress.*.>"
GATE_QUEUE = "collabbus-gate"
REPLY_HEADERS = {"Content-Type": "application/json"}


def _raw_body(message: Any) -> bytes:
    # The gate reads the bytes itself: malformed JSON must become a rejection, not a decoder error.
    return bytes(message.body)


def split_ingress_subject(subject: str) -> tuple[str, str | None]:
    """(institution, offered type) of an ingress subject; the type is None when the subject is short."""
    tokens = subject.split(".")
    institution = tokens[2] if len(tokens) > 2 else ""
    offered = ".".join(tokens[3:5]) if len(tokens) == 5 else None
    return institution, offered


def add_ingress(broker: NatsBroker, gate: Gate, *, workers: int = 64) -> None:
    """Subscribe the gate to the ingress subjects of every institution."""

    @broker.subscriber(
        INGRESS_SUBJECT,
        queue=GATE_QUEUE,
        decoder=_raw_body,
        max_workers=workers,
        include_in_schema=False,
    )
    async def ingress(body: bytes, msg: NatsMessage) -> NatsResponse:
        raw = msg.raw_message
        # The partner's entry: a span continuing the traceparent its request carries.
        with gate.tracer.start_as_current_span(
            "process collab.ingress", context=tracing.context_from_headers(raw.headers), kind=trace.SpanKind.CONSUMER,
            attributes={
                tracing.MESSAGING_SYSTEM: "nats", tracing.MESSAGING_DESTINATION: raw.subject,
                tracing.MESSAGING_OPERATION_TYPE: "process", tracing.MESSAGING_CONSUMER_GROUP: GATE_QUEUE,
            },
        ) as span:
            verdict = await _judge(raw.subject, body, raw.headers)
            if span.is_recording():
                span.set_attribute(tracing.VERDICT, verdict.status)
                if verdict.id:
                    span.set_attribute(tracing.MESSAGING_MESSAGE_ID, verdict.id)
        return NatsResponse(verdict.to_json(), headers=REPLY_HEADERS)

    async def _judge(subject: str, body: bytes, headers: dict[str, str] | None) -> Verdict:
        institution, offered = split_ingress_subject(subject)
        if offered is None:
            verdict = Verdict(
                "rejected", None, reason="invalid",
                errors=reject(
                    "invalid", "subject_invalid",
                    f"offer events on collab.ingress.{{institution}}.{{domain}}.{{event}}, not {subject}",
                ).problems,
            )
            tracing.mark_failed(trace.get_current_span(), "rejected (invalid)")
            return verdict
        return await gate.admit(institution, body, headers, offered_type=offered)
