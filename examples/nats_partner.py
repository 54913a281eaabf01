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

Exit code: 0 accepted, 1 rejected, 2 for anything else. A place to start from, not a library.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import nats


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


async def offer(url: str, creds: str, institution: str, event: dict[str, Any], *, binary_mode: bool) -> int:
    nc = await nats.connect(url, user_credentials=creds, inbox_prefix=f"_INBOX.{institution}")
    try:
        subject = f"collab.ingress.{institution}.{event['type']}"  # the type is <domain>.<event>
        if binary_mode:
            headers, body = binary(event)
        else:
            headers = {"Content-Type": "application/cloudevents+json"}
            body = json.dumps(event, ensure_ascii=False).encode("utf-8")
        reply = await nc.request(subject, body, headers=headers, timeout=10)
    finally:
        await nc.close()
    verdict = json.loads(reply.data)
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
