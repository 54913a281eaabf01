"""Offer an event to a collabbus network over HTTP and learn what became of it.

    pip install httpx
    COLLABBUS_URL=http://127.0.0.1:8080 COLLABBUS_TOKEN=… python http_partner.py event.json

``event.json`` is a structured CloudEvent (``collabbus schemas list`` names the types; ``source``
is ``/institutions/<your id>``). The gateway's ``202`` means the event is in the log; the network
applies it moments later, and a workflow rule may still refuse it then: the refusal is an event of
its own, found under the event's id at ``GET /events/{id}``. Exit code: 0 applied, 1 refused by the
gateway or a workflow, 3 logged but waiting for the network's operator (the bus could not apply
it), 2 for anything else. A place to start from, not a library.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx


def offer(client: httpx.Client, event: dict) -> int:
    # Over the member's rate (429), or the log cannot take it just now (503: electing a leader after
    # a server was lost): wait as told and send the same event again — safe, it is one event — for
    # up to 30 seconds.
    give_up_at = time.monotonic() + 30
    answer = client.post("/events", json=event)
    while answer.status_code in (429, 503):
        wait = float(answer.headers.get("Retry-After", "1"))
        if time.monotonic() + wait > give_up_at:
            break
        time.sleep(wait)
        answer = client.post("/events", json=event)
    body = answer.json()
    if answer.status_code != 202:
        # A problem (RFC 9457): `errors` says where, as [{"loc": [...], "msg": ..., "type": ...}]
        errors = body.get("errors", [])  # (the detail joins them: each is printed on its own line instead)
        print(f"refused by the gateway ({answer.status_code} {body.get('title')})" + ("" if errors else f": {body.get('detail')}"))
        for error in errors:
            print(f"  {'.'.join(str(part) for part in error['loc'])}: {error['msg']} [{error['type']}]")
        return 1
    print(f"accepted as #{body['seq']}" + (" (a repeat of an event already logged)" if body["duplicate"] else ""))

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # 404 until the network has applied it
        found = client.get(f"/events/{body['id']}")
        if found.status_code == 200:
            outcome = found.json()
            if outcome["outcome"] == "applied":
                derived = ", ".join(item["event"]["type"] for item in outcome["derived"])
                print("applied" + (f"; it led to {derived}" if derived else ""))
                return 0
            if outcome["outcome"] == "waiting":  # the network's operator has it in hand
                print(f"logged, not applied yet: {outcome['waiting']}")
                return 3
            refusal = outcome["refusal"]
            if refusal is not None:  # (else its refusal is decided and on its way to the log)
                reason = refusal["event"]["data"]["reason"]
                message = reason["message"]  # a LocalizedText: English when it has it
                print(f"refused by the workflow: {reason['code']} — {message.get('en') or next(iter(message.values()))}")
                return 1
        elif found.status_code != 404:
            found.raise_for_status()
        time.sleep(0.2)
    print("not applied within 30 s: is the bus holding its events (collabbus status)?")
    return 2


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    event = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    headers = {"Authorization": f"Bearer {os.environ['COLLABBUS_TOKEN']}"}
    with httpx.Client(base_url=os.environ.get("COLLABBUS_URL", "http://127.0.0.1:8080"), headers=headers, timeout=10) as client:
        return offer(client, event)


if __name__ == "__main__":
    sys.exit(main())
