"""Follow a collabbus network's event log over HTTP: for a member that cannot take webhooks
(behind a firewall that lets no request in, say).

    pip install httpx
    COLLABBUS_URL=http://127.0.0.1:8080 COLLABBUS_TOKEN=… python http_follower.py [TYPE]...

Prints every event the token's institution may see (of the ``TYPE``\s, types or domains such as
``call``, if given) as one JSON line ``{"seq": …, "event": {…}}``, in log order, as it is logged.
It asks ``GET /events?after_seq=N&wait=30``: the gateway answers as soon as there is an event
after ``N``, or with an empty page after 30 seconds. Where it got to is kept in a file
(``COLLABBUS_POSITION_FILE``, default ``collabbus-follower.position``: the ``seq`` of the last
event handled), written after each page, so a restart goes on from there: nothing is skipped,
and at most the page under way when it stopped comes again (an event's ``id`` tells a repeat).
Network trouble and a busy gateway are waited out. Exit code 2 when the gateway refuses the
request itself (a wrong token, say). A place to start from, not a library.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import httpx

WAIT = 30  # seconds the gateway holds a request while there is nothing new (at most 60)


def handle(item: dict) -> None:
    """What to do with one event: here, print it."""
    print(json.dumps(item, ensure_ascii=False), flush=True)


def follow(client: httpx.Client, position_file: Path, event_types: list[str]) -> int:
    kept = (position_file.read_text().strip() if position_file.exists() else "") or "0"
    if not kept.isdigit():
        print(f"{position_file} holds no log sequence ({kept[:40]!r}): correct it, or remove it to start from the beginning",
              file=sys.stderr)
        return 2
    after = int(kept)
    pause = 1.0
    while True:
        params: dict[str, int | list[str]] = {"after_seq": after, "wait": WAIT, "type": event_types}  # (no types: every one)
        try:
            answer = client.get("/events", params=params, timeout=WAIT + 15)  # longer than the wait
        except httpx.TransportError as exc:
            print(f"cannot reach the gateway ({exc!r}); again in {pause:.0f} s", file=sys.stderr)
            time.sleep(pause)
            pause = min(pause * 2, 60.0)
            continue
        if answer.status_code == 429 or answer.status_code >= 500:
            wait = float(answer.headers.get("Retry-After", pause))
            print(f"the gateway answered {answer.status_code}; again in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
            pause = min(pause * 2, 60.0)
            continue
        if answer.status_code != 200:  # a problem (RFC 9457): retrying the same request cannot help
            try:
                body = answer.json()
            except ValueError:  # not the gateway's answer (a proxy's page, say)
                body = {"title": answer.reason_phrase, "detail": answer.text[:200]}
            print(f"refused by the gateway ({answer.status_code} {body.get('title')}): {body.get('detail')}", file=sys.stderr)
            return 2
        pause = 1.0
        items = answer.json()["items"]
        for item in items:
            handle(item)
        if items:
            after = items[-1]["seq"]
            written = position_file.with_name(position_file.name + ".new")
            written.write_text(str(after))
            os.replace(written, position_file)  # whole or not at all, even when stopped midway


def main() -> int:
    url, token = os.environ.get("COLLABBUS_URL", "http://127.0.0.1:8080"), os.environ.get("COLLABBUS_TOKEN")
    if not token:
        print("set COLLABBUS_TOKEN (collabbus institutions token <your id>)", file=sys.stderr)
        return 2
    position_file = Path(os.environ.get("COLLABBUS_POSITION_FILE", "collabbus-follower.position"))
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as client:
        try:
            return follow(client, position_file, sys.argv[1:])
        except KeyboardInterrupt:
            return 0


if __name__ == "__main__":
    sys.exit(main())
