"""Who is a member, read from the log itself.

The gate keeps no state of its own: an institution is a member when the last ``institution.*``
event about it on the log is ``joined`` or ``updated``. Positive answers are cached and kept fresh by
a subscription to the institution events as the log stores them (``collab.live``: not the log's own
subjects, where an offer is published before the log has taken or refused it — a repeat, or an
event under an id another holds); unknown ids are looked up every time, so an institution can
publish the moment its ``institution.joined`` is accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus.streams import EVENTS_STREAM, LIVE_PREFIX

log = logging.getLogger("collabbus.membership")


def kind_after(event: dict[str, object]) -> str | None:
    """The institution's kind after this ``institution.*`` event (None: not a member)."""
    if event.get("type") == "institution.left":
        return None
    data = event.get("data")
    kind = data.get("kind") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) else None


class Membership:
    """Institution id → kind, answered from the event log."""

    def __init__(self, nc: Client, js: JetStreamContext, stream: str = EVENTS_STREAM) -> None:
        self._nc = nc
        self._js = js
        self._stream = stream
        self._kinds: dict[str, str] = {}
        self._sub: Subscription | None = None
        self.on_left: Callable[[str], Awaitable[None]] | None = None
        """Called with an institution's id when its ``institution.left`` is logged (while this runs)."""

    async def start(self) -> None:
        """Follow institution events live so cached answers never go stale."""
        self._sub = await self._nc.subscribe(f"{LIVE_PREFIX}.*.institution.>", cb=self._on_event)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_event(self, msg: Msg) -> None:
        try:
            event = orjson.loads(msg.data)
            self.learn(event)
        except (orjson.JSONDecodeError, AttributeError):  # the log holds only validated events
            log.warning("unreadable institution event on %s", msg.subject)
            return
        if self.on_left is not None and event.get("type") == "institution.left" and isinstance(event.get("subject"), str):
            try:
                await self.on_left(event["subject"])
            except Exception:  # what follows a member's leaving must not stop membership being followed
                log.exception("could not act on %s leaving", event["subject"])

    def learn(self, event: dict[str, object]) -> None:
        """Apply one logged ``institution.*`` event to the cache."""
        institution = event.get("subject")
        if not isinstance(institution, str):
            return
        kind = kind_after(event)
        if kind is None:
            if event.get("type") == "institution.left":
                self._kinds.pop(institution, None)
        else:
            self._kinds[institution] = kind

    def known(self, institution: str) -> bool:
        """Whether ``institution`` is a member as far as the cache knows (no lookup)."""
        return institution in self._kinds

    async def kind_of(self, institution: str) -> str | None:
        """The member's kind, or None when it has not joined (or has left)."""
        kind = self._kinds.get(institution)
        if kind is not None:
            return kind
        try:
            msg = await self._js.get_last_msg(self._stream, f"collab.events.*.institution.*.{institution}")
        except NotFoundError:
            return None
        event = orjson.loads(msg.data or b"{}")
        kind = kind_after(event)
        if event.get("type") == "institution.updated" and kind is None:
            kind = await self._kind_before_update(institution)
        if kind is not None:
            self._kinds[institution] = kind
        return kind

    async def _kind_before_update(self, institution: str) -> str | None:
        """The kind of the last join, as the updates since then changed it: an update that does
        not restate the kind keeps the one before it (the read models' rule)."""
        try:
            msg = await self._js.get_last_msg(self._stream, f"collab.events.*.institution.joined.{institution}")
        except NotFoundError:
            return None
        kind = kind_after(orjson.loads(msg.data or b"{}"))
        seq = msg.seq or 0
        while True:  # (a member's updates are few; read one by one, in log order)
            try:
                update = await self._js.get_msg(self._stream, seq + 1, subject=f"collab.events.*.institution.updated.{institution}",
                                                next=True)
            except NotFoundError:
                return kind
            kind = kind_after(orjson.loads(update.data or b"{}")) or kind
            seq = update.seq or seq + 1
