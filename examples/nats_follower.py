"""Follow the public part of a collabbus network's log over NATS, as a partner's own client does:
nats-py and nothing of collabbus, so the same steps carry over to a NATS client in any language.

    pip install nats-py
    python nats_follower.py nats://127.0.0.1:4222 mersin.creds tr-mersin-bb [SUBJECT ...] [--count N]

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
- Live, at most once: what is logged while this is not connected does not come again. A follower
  that must miss nothing keeps the last ``seq`` it handled and, once connected again, reads what
  came after over HTTP (``GET /events?after_seq={seq}``), dropping what it then also receives
  live by ``seq``. The confidential events (applications, reviews before a decision) are not on
  these subjects for anyone: their parties read them over HTTP and webhooks.
- A subject the credentials do not allow is refused by the server: said on standard error, exit 2.

Runs until interrupted, or until ``--count`` events were printed (exit 0). A place to start
from, not a library.
"""

from __future__ import annotations

import asyncio
import json
import sys

import nats
from nats.aio.msg import Msg

DEFAULT_SUBJECTS = ("collab.live.*.call.published.*", "collab.live.*.project.>")


async def follow(url: str, creds: str, institution: str, subjects: list[str], count: int | None) -> int:
    refused: list[str] = []
    done = asyncio.Event()
    printed = 0

    async def error(exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            refused.append(str(exc))
            done.set()

    async def show(msg: Msg) -> None:
        nonlocal printed
        if done.is_set():
            return
        seq = int((msg.headers or {}).get("Nats-Sequence", "0"))
        print(json.dumps({"seq": seq, "event": json.loads(msg.data)}, ensure_ascii=False), flush=True)
        printed += 1
        if count is not None and printed >= count:
            done.set()

    nc = await nats.connect(url, user_credentials=creds, inbox_prefix=f"_INBOX.{institution}", error_cb=error)
    try:
        for subject in subjects:
            await nc.subscribe(subject, cb=show)
        await nc.flush()  # the server has taken (or refused) every subscription when its answer comes
        await asyncio.sleep(0.2)
        if not refused:
            print(f"following {', '.join(subjects)}", file=sys.stderr, flush=True)
            await done.wait()
    finally:
        await nc.close()
    if refused:
        print(f"the server refused a subscription: {refused[0]} (only the public live subjects are allowed; "
              "`collabbus institutions creds ID --json` lists them)", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str]) -> int:
    arguments = list(argv)
    count = None
    if "--count" in arguments:
        at = arguments.index("--count")
        count = int(arguments[at + 1])
        del arguments[at:at + 2]
    if len(arguments) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    url, creds, institution, *subjects = arguments
    try:
        return asyncio.run(follow(url, creds, institution, subjects or list(DEFAULT_SUBJECTS), count))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
