"""Offer an event to a collabbus network over NATS, as a partner's own client does: nats-py and
nothing of collabbus, so the same steps carry over to a NATS client in any language.

    pip install nats-py
    python nats_partner.py nats://127.0.0.1:4222 mersin.creds tr-mersin-bb event.json [--binary]

- Connect with the ``.creds`` file the operator issued (``collabbus institutions creds``) and the
  inbox prefix ``_INBOX.<your id>``: the verdict comes back on your own inboxes.
- Send the event as a request to ``collab.ingress.<your id>.<domain>.<event>``:
  - structured mode: the whole CloudEvent as the JSON body, ``Content-Type:
    application/cloudevents+json``;
  - binary mode (``--binary``): each attribute in a ``ce-<name>`` header, percent-encoded UTF-8 as
    the CloudEvents NATS binding has it, and ``data`` as the JSON body (``Content-Type:
    application/json``).
- The reply is the verdict: ``{"status": "accepted", "id", "seq", "duplicate"}``, or
  ``{"status": "rejected", "id", "errors": [{"loc", "msg", "type"}]}``. Sending the same event
  again is safe: it answers ``duplicate: true`` with the same ``seq``.
- So an offer the network cannot take just now — ``"reason": "unavailable"`` (the log electing a
  leader after a server was lost, your institution over its rate: then ``retry_after`` says how
  long), no verdict in time, no gatekeeper listening — is sent again, the same event, for up to
  30 seconds. Any other rejection is final: the event needs mending.

Exit code: 0 accepted, 1 rejected, 2 for anything else. A place to start from, not a library.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors


def percent_encoded(value: str) -> str:
    """A header value as the CloudEvents bindings write it: UTF-8, with space, ``"``, ``%`` and
    everything outside printable ASCII as ``%XX``."""
    return "".join(chr(byte) if 0x21 <= byte <= 0x7E and chr(byte) not in '"%' else f"%{byte:02X}"
                   for byte in value.encode("utf-8"))


def binary(event: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    """The event in binary mode: its attributes as ``ce-`` headers, its data as the body."""
    headers = {f"ce-{name}": percent_encoded(str(value)) for name, value in event.items()
               if name not in ("data", "datacontenttype")}
    headers["Content-Type"] = "application/json"
    return headers, json.dumps(event["data"], ensure_ascii=False).encode("utf-8")


RETRY_FOR = 30.0
"""Seconds an offer the network cannot take just now is sent again."""


async def offer(url: str, creds: str, institution: str, event: dict[str, Any], *, binary_mode: bool) -> int:
    nc = await nats.connect(url, user_credentials=creds, inbox_prefix=f"_INBOX.{institution}")
    try:
        subject = f"collab.ingress.{institution}.{event['type']}"  # the type is <domain>.<event>
        if binary_mode:
            headers, body = binary(event)
        else:
            headers = {"Content-Type": "application/cloudevents+json"}
            body = json.dumps(event, ensure_ascii=False).encode("utf-8")
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + RETRY_FOR
        while True:
            verdict: dict[str, Any] | None = None
            try:
                reply = await nc.request(subject, body, headers=headers, timeout=10)
                verdict = json.loads(reply.data)
                if verdict["status"] == "accepted" or verdict.get("reason") != "unavailable":
                    break
                wait, why = float(verdict.get("retry_after") or 1.0), verdict["errors"][0]["msg"]
            except nats.errors.NoRespondersError:
                wait, why = 1.0, "no gatekeeper is listening"
            except nats.errors.TimeoutError:
                wait, why = 1.0, "no verdict within 10 s"
            if loop.time() + wait > give_up_at:
                if verdict is None:
                    print(f"not offered: {why}")
                    return 2
                break
            print(f"not taken just now ({why}); sending it again in {wait:g} s", file=sys.stderr)
            await asyncio.sleep(wait)
    finally:
        await nc.close()
    if verdict["status"] == "accepted":
        print(f"accepted as #{verdict['seq']}" + (" (sent before: the same event)" if verdict["duplicate"] else ""))
        return 0
    print(f"rejected ({verdict.get('reason', 'invalid')}):")
    for error in verdict["errors"]:
        print(f"  {'.'.join(str(part) for part in error['loc'])}: {error['msg']} [{error['type']}]")
    return 1


def main() -> int:
    args = [arg for arg in sys.argv[1:] if arg != "--binary"]
    if len(args) != 4:
        print(__doc__)
        return 2
    url, creds, institution, path = args
    event = json.loads(Path(path).read_text(encoding="utf-8"))
    return asyncio.run(offer(url, creds, institution, event, binary_mode="--binary" in sys.argv))


if __name__ == "__main__":
    sys.exit(main())
