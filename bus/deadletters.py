"""The headers of a dead letter: what an operator needs at 3 a.m. to see what failed, where and why.

The consumers write them (``bus.consumer``); ``collabbus dlq`` and ``collabbus status`` read them.
Kept apart from the consumers so that the commands which only read do not load them.
"""

from __future__ import annotations

import contextlib
from email.header import decode_header, make_header
from urllib.parse import quote, unquote

DLQ_ERROR = "Collabbus-Error"
DLQ_DETAIL = "Collabbus-Error-Detail"
DLQ_CONSUMER = "Collabbus-Consumer"
DLQ_DELIVERIES = "Collabbus-Deliveries"
DLQ_SUBJECT = "Collabbus-Original-Subject"
DLQ_STREAM_SEQ = "Collabbus-Original-Seq"
DLQ_STREAM_NAME = "Collabbus-Original-Stream"
DLQ_FAILED_AT = "Collabbus-Failed-At"
DLQ_EVENT_ID = "Collabbus-Event-Id"
"""The logged message's ``Nats-Msg-Id`` (the event id, also when the event cannot be read)."""
DLQ_WAITS_FOR = "Collabbus-Waits-For"
"""On an event set aside: what it waits for, ``{domain}/{subject}`` — the thing whose earlier
dead letter goes first (its own, or one its workflow reads)."""

_HEADER_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) != "%")


DETAIL_LENGTH = 2000
"""The most of a text a header value keeps (a detail: ``handlers.service`` makes a traceback fit)."""


def header_value(text: str) -> str:
    """Header values are one line of printable ASCII: any other character — a line break of a
    traceback, a Turkish title in an error — is percent-encoded, as the CloudEvents NATS binding
    encodes attributes (nats-py reads a header with other bytes back as an ``email.header.Header``,
    not as text). A text longer than :data:`DETAIL_LENGTH` keeps its beginning."""
    text = text.strip()
    if len(text) > DETAIL_LENGTH:
        text = text[:DETAIL_LENGTH - 1] + "…"
    return quote(text, safe=_HEADER_SAFE)


def detail_lines(text: str) -> list[str]:
    """The lines of a dead letter's detail as :func:`header_text` reads it: written with its line
    breaks (a traceback, indented), or by a bus before, which joined them with `` | ``."""
    return text.splitlines() if "\n" in text else text.split(" | ") if text else []


def header_text(value: object) -> str:
    """A dead letter's header value as it was written (:func:`header_value`). One written before
    values were encoded may come back from nats-py as an ``email.header.Header``."""
    if value is None:
        return ""
    if isinstance(value, str):
        return unquote(value)
    with contextlib.suppress(Exception):
        return str(make_header(decode_header(value)))  # type: ignore[arg-type]
    return str(value)
