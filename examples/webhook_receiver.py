"""Receive a collabbus network's events as webhooks: the Python standard library and
``standardwebhooks``.

    pip install standardwebhooks
    COLLABBUS_WEBHOOK_SECRET=whsec_… python webhook_receiver.py 9000

Register the endpoint with ``POST /webhooks`` (its answer shows the secret, once). Each delivery
is a structured CloudEvent signed as Standard Webhooks prescribe. This receiver

- checks the signature and the timestamp, and answers 400 to anything that fails;
- keeps the event, then answers 204 (a 2xx tells the bus the receiver has it: it is not sent
  again; anything else is tried again, and the bus waits for no one);
- drops repeats: a retry carries the same ``webhook-id``, the event's id;
- keeps, of the events about one thing (type domain and subject), the latest in the log: the
  bus sends those in log order, but a resend or a recovery brings older ones again, and each
  carries its place in the log as ``collabbus-sequence``;

and prints every new event as one JSON line (``"stale": true`` for one older than what it holds
already). A place to start from, not a product: a real receiver keeps ``seen`` and ``latest`` in
its database, stores the event (or queues its work) before answering, and does the work after.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

WEBHOOK = Webhook(os.environ["COLLABBUS_WEBHOOK_SECRET"])
LOCK = threading.Lock()
seen: set[str] = set()  # webhook-ids handled
latest: dict[tuple[str, str], int] = {}  # (domain, subject) -> the highest collabbus-sequence handled


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            event = WEBHOOK.verify(body, headers)  # the signature, and a timestamp within 5 minutes
        except WebhookVerificationError as exc:
            self.send_error(400, f"not a delivery of this endpoint: {exc}")
            return
        sequence = int(headers.get("collabbus-sequence", 0))
        thing = (event["type"].split(".", 1)[0], event.get("subject", ""))
        with LOCK:
            if headers["webhook-id"] not in seen:  # (else a retry of a delivery handled already)
                seen.add(headers["webhook-id"])
                stale = sequence < latest.get(thing, 0)
                if not stale:
                    latest[thing] = sequence
                line = {"id": event["id"], "type": event["type"], "subject": event.get("subject"), "sequence": sequence,
                        "source": event["source"], "stale": stale}
                # Under the lock: deliveries are handled in parallel, and two prints could interleave.
                print(json.dumps(line, ensure_ascii=False), flush=True)
        self.send_response(204)  # kept: now the bus may take it as delivered
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet: the JSON lines are the output
        pass


def main() -> None:
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
    server = ThreadingHTTPServer(("127.0.0.1", port), Receiver)
    print(f"listening on http://127.0.0.1:{port}/", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
