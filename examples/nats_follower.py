"""Follow the public part of a collabbus network's log over NATS, as a partner's own client does:
nats-py and nothing of collabbus, so the same steps carry over to a NATS client in any language.

    pip install nats-py
    python nats_follower.py nats://127.0.0.1:4222 mersin.creds tr-mersin-bb [SUBJECT ...] [--count N]
    python nats_follower.py … --resume follower.position     # miss nothing, across restarts

- Connect with the ``.creds`` file the operator issued (``collabbus institutions creds``) and the
  inbox prefix ``_INBOX.<your id>``.
- Subscribe to the live subjects, ``collab.live.<institution>.<domain>.<event>.<subject>``, where
  the log's server republishes every event it stores, of the events every member may see
  (``collabbus institutions creds ID --json`` lists them under ``live_subjects``; any narrower
  subject works too, ``collab.live.fi-thl.project.>`` say). By default: new calls and every
  project event.
- Each message is one event as the log stored it, in the log's order: the structured CloudEvent
  as JSON, its id in the ``Nats-Msg-Id`` header and its place in the log in ``Nats-Sequence``.
  It is printed as one JSON line on standard output: ``{"seq": …, "event": {…}}``.
- Live, at most once: what is logged while this is not connected does not come again. With
  ``--resume FILE`` it misses nothing: it keeps the ``seq`` of the last event it handled in FILE
  and, once subscribed (and again after each reconnection), asks the bus for what came after it,
  a page at a time, on ``collab.log.<your id>`` (a request ``{"after_seq": seq, "limit": 500}``,
  answered ``{"items": [{"seq": …, "event": {…}}, …], "next_cursor": …}`` as ``GET /events``
  answers it over HTTP), keeping the events whose live subject its subscriptions match, then
  carries on live, dropping what it already handled by ``Nats-Sequence``. Each event is printed
  once, in log order, also across restarts. The confidential events (applications, reviews
  before a decision) are not on the live subjects for anyone: their parties read them on
  ``collab.log.<id>``, over HTTP and by webhooks.
- A subject the credentials do not allow is refused by the server: said on standard error, exit 2.

Runs until interrupted, or until ``--count`` events were printed (exit 0). A place to start
from, not a library.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import nats
import nats.errors
from nats.aio.msg import Msg

DEFAULT_SUBJECTS = ("collab.live.*.call.published.*", "collab.live.*.project.>")
PAGE = 500


def matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` is one token, ``>`` the rest (one token or more)."""
    want, have = pattern.split("."), subject.split(".")
    for at, token in enumerate(want):
        if token == ">":
            return len(have) > at
        if at >= len(have) or token not in ("*", have[at]):
            return False
    return len(want) == len(have)


def live_subject(event: dict[str, Any]) -> str:
    """Where the log's server republishes an event: ``collab.live.<source's id>.<type>.<subject>``."""
    return f"collab.live.{event['source'].rsplit('/', 1)[-1]}.{event['type']}.{event.get('subject', '')}"


class Follower:
    """Prints each event once, in log order; with a position file, also across restarts."""

    def __init__(self, subjects: list[str], count: int | None, position: Path | None) -> None:
        self.subjects, self.count, self.position = subjects, count, position
        self.last = int(position.read_text().strip() or 0) if position is not None and position.exists() else 0
        self.printed = 0
        self.done = asyncio.Event()

    def handle(self, seq: int, event: dict[str, Any]) -> None:
        if self.done.is_set() or (self.position is not None and seq <= self.last):
            return  # handled already (read over HTTP and received live as well)
        print(json.dumps({"seq": seq, "event": event}, ensure_ascii=False), flush=True)
        self.last = max(self.last, seq)
        if self.position is not None:
            written = self.position.with_name(self.position.name + ".new")
            written.write_text(str(self.last))
            os.replace(written, self.position)  # whole or not at all
        self.printed += 1
        if self.count is not None and self.printed >= self.count:
            self.done.set()

    async def catch_up(self, nc: nats.NATS, institution: str) -> None:
        """What was logged after ``last`` (and before the subscriptions took over), a page at a
        time from the bus; :class:`Refused` when it will not give them."""
        while not self.done.is_set():
            request = json.dumps({"after_seq": self.last, "limit": PAGE}).encode()
            page = json.loads((await nc.request(f"collab.log.{institution}", request, timeout=10)).data)
            if page.get("status") == "rejected":
                raise Refused(page)
            for item in page["items"]:
                if any(matches(pattern, live_subject(item["event"])) for pattern in self.subjects):
                    self.handle(item["seq"], item["event"])
                else:
                    self.last = max(self.last, item["seq"])  # not followed: passed over
            if page["next_cursor"] is None:
                return


class Refused(Exception):
    """The bus answered a request for a page of the log with a refusal."""


async def follow(url: str, creds: str, institution: str, subjects: list[str], count: int | None,
                 position: Path | None = None) -> int:
    refused: list[str] = []
    follower = Follower(subjects, count, position)
    live: asyncio.Queue[Msg] = asyncio.Queue()
    behind = asyncio.Event()  # set when what was logged meanwhile must be read over HTTP
    behind.set()

    async def error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.append(str(exc))
            follower.done.set()

    async def reconnected() -> None:
        behind.set()  # what was logged while the connection was down did not come live

    async def take(msg: Msg) -> None:
        await live.put(msg)

    # A ping every 10 s, and a connection the network cut without closing it is reconnected (and
    # what it missed read over HTTP) within ~30 s, not the six minutes of nats-py's defaults.
    nc = await nats.connect(url, user_credentials=creds, inbox_prefix=f"_INBOX.{institution}", error_cb=error,
                            reconnected_cb=reconnected, ping_interval=10, max_outstanding_pings=2)
    try:
        for subject in subjects:
            await nc.subscribe(subject, cb=take)
        await nc.flush()  # the server has taken (or refused) every subscription when its answer comes
        await asyncio.sleep(0.2)
        if not refused:
            print(f"following {', '.join(subjects)}", file=sys.stderr, flush=True)
            while not follower.done.is_set():
                if position is not None and behind.is_set():
                    behind.clear()
                    try:
                        await follower.catch_up(nc, institution)
                    except Refused as exc:  # trying again cannot help
                        print(f"the bus refused the catch-up: {json.dumps(exc.args[0], ensure_ascii=False)[:500]}", file=sys.stderr)
                        return 2
                    except (nats.errors.TimeoutError, nats.errors.NoRespondersError, nats.errors.ConnectionClosedError) as exc:
                        if refused:  # credentials that may not ask for pages (issued before they could)
                            break
                        print(f"cannot read what was missed ({type(exc).__name__}: is the bus running?); again in 5 s",
                              file=sys.stderr, flush=True)
                        await asyncio.sleep(5)
                        behind.set()
                    continue
                try:
                    msg = await asyncio.wait_for(live.get(), 0.5)
                except asyncio.TimeoutError:
                    continue
                follower.handle(int((msg.headers or {}).get("Nats-Sequence", "0")), json.loads(msg.data))
    finally:
        await nc.close()
    if refused:
        if "publish" in refused[0].lower():
            print(f"the server refused the request for what was missed: {refused[0]} (credentials issued before members "
                  "could ask for pages of the log: `collabbus institutions creds ID --replace` issues ones that may)",
                  file=sys.stderr)
        else:
            print(f"the server refused a subscription: {refused[0]} (only the public live subjects are allowed; "
                  "`collabbus institutions creds ID --json` lists them)", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    arguments = list(argv)
    count, position = None, None
    if "--count" in arguments:
        at = arguments.index("--count")
        count = int(arguments[at + 1])
        del arguments[at:at + 2]
    if "--resume" in arguments:
        at = arguments.index("--resume")
        position = Path(arguments[at + 1])
        del arguments[at:at + 2]
    if len(arguments) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    url, creds, institution, *subjects = arguments
    try:
        return asyncio.run(follow(url, creds, institution, subjects or list(DEFAULT_SUBJECTS), count, position))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
