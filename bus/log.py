"""Reading the event log: replay from a position, then optionally follow it live."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

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
        start = datetime.fromisoformat(value)
        if start.tzinfo is None:
            raise ValueError(f"--since {value!r}: give a time zone offset, e.g. {value}+00:00")
    return {"deliver_policy": DeliverPolicy.BY_START_TIME, "opt_start_time": start.astimezone(timezone.utc).isoformat()}


async def read(
    js: JetStreamContext,
    subject_filter: str = "collab.events.>",
    *,
    since: str | None = "all",
    follow: bool = False,
    idle_timeout: float = 1.0,
) -> AsyncGenerator[LoggedEvent, None]:
    """Yield logged events matching the filter; stop when caught up unless ``follow``."""
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.api import ConsumerConfig

    start = parse_since(since)
    # Catch-up check before the consumer exists: an empty selection ends at once.
    info = await js.stream_info(EVENTS_STREAM, subjects_filter=None)
    if not follow and info.state.messages == 0:
        return
    config = ConsumerConfig(**start)
    sub = await js.subscribe(subject_filter, ordered_consumer=True, config=config, stream=EVENTS_STREAM)
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=idle_timeout)
            except NatsTimeoutError:
                if follow:
                    continue
                return
            meta = msg.metadata
            yield LoggedEvent(meta.sequence.stream, msg.subject, orjson.loads(msg.data), meta.num_pending)
            if not follow and meta.num_pending == 0:
                return
    finally:
        await sub.unsubscribe()
