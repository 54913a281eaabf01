"""Offering events to the bus over NATS, as a partner does (used by the CLI, the demo and tests)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError

from bus import cloudevents
from bus.gate import check_fits
from bus.verdict import Problem, Rejection, Verdict


def ingress_subject(institution: str, event_type: str) -> str:
    """Where ``institution`` offers events of ``event_type``."""
    return f"collab.ingress.{institution}.{event_type}"


async def offer(
    nc: Client,
    institution: str,
    event: Mapping[str, Any],
    *,
    binary: bool = False,
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> Verdict:
    """Offer one event and return the gatekeeper's verdict.

    A message NATS itself would refuse (too large with its headers) is refused here, before it is
    sent: the server would otherwise close this connection.
    """
    if binary:
        msg_headers, body = cloudevents.to_binary(event)
    else:
        msg_headers, body = cloudevents.structured_headers(), orjson.dumps(dict(event))
    if headers:
        msg_headers.update(headers)
    return await offer_raw(
        nc, ingress_subject(institution, str(event.get("type", "unknown.unknown"))), body, msg_headers, timeout=timeout
    )


async def offer_raw(
    nc: Client, subject: str, body: bytes, headers: Mapping[str, str] | None = None, *, timeout: float = 10.0
) -> Verdict:
    """Send bytes as they are to an ingress subject and read the verdict."""
    try:
        check_fits(nc, body, headers or {})
    except Rejection as exc:
        return Verdict("rejected", None, errors=exc.problems, reason=exc.reason)
    try:
        reply = await nc.request(subject, body, timeout=timeout, headers=dict(headers) if headers else None)
    except NoRespondersError:
        return _unavailable("no gatekeeper is listening: is the bus running?")
    except NatsTimeoutError:
        return _unavailable(f"no verdict within {timeout:g} s")
    return Verdict.from_json(reply.data)


def _unavailable(msg: str) -> Verdict:
    return Verdict("rejected", None, errors=(Problem((), msg, "unavailable"),), reason="unavailable")
