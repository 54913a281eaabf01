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
        institution, offered = split_ingress_subject(raw.subject)
        # The partner's entry: a span continuing the traceparent its request carries.
        with gate.tracer.start_as_current_span(
            "process collab.ingress", context=tracing.context_from_headers(raw.headers), kind=trace.SpanKind.CONSUMER,
            attributes={
                tracing.MESSAGING_SYSTEM: "nats", tracing.MESSAGING_DESTINATION: raw.subject,
                tracing.MESSAGING_OPERATION_TYPE: "process", tracing.MESSAGING_CONSUMER_GROUP: GATE_QUEUE,
                tracing.INSTITUTION: institution, tracing.EVENT_TYPE: offered or "",
            },
        ) as span:
            if offered is None:
                verdict = Verdict(
                    "rejected", None, reason="invalid",
                    errors=reject(
                        "invalid", "subject_invalid",
                        f"offer events on collab.ingress.{{institution}}.{{domain}}.{{event}}, not {raw.subject}",
                    ).problems,
                )
                tracing.mark_refused(span, verdict)
            else:
                verdict = await gate.admit(institution, body, raw.headers, offered_type=offered)
            if verdict.id and span.is_recording():
                span.set_attribute(tracing.MESSAGING_MESSAGE_ID, verdict.id)
        return NatsResponse(verdict.to_json(), headers=REPLY_HEADERS)
