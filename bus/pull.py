"""Batches from a JetStream pull consumer, with one pull request kept open.

nats-py's ``fetch`` makes a task (and a uuid) per message, and once a waiting request has brought
its first message it waits for the whole batch or the timeout: under a trickle every batch waited
out its timeout, which is what an event's time from offer to commit showed. Here one pull request
is kept open on the consumer, so the server pushes messages as they are logged; :meth:`Puller.fetch`
returns what has arrived as soon as there is something, and a new request goes out when the open
one is used up or has expired. At most about two batches are held (the one handed out and the one
arriving), so a slow reader holds back the server rather than filling memory.

The open request asks the server for idle heartbeats: when they stop (the connection was lost
and made again, the server restarted), the request is taken for gone and a new one goes out, so a
consumer carries on within a few seconds rather than when the lost request would have expired.

Messages keep their reply subjects: ``ack``, ``nak`` and ``in_progress`` work as usual.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timezone

import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import Header

from ops.logs import Spell

log = logging.getLogger("collabbus.consumer")

_STATUS = Header.STATUS
_DESCRIPTION = Header.DESCRIPTION
_HEARTBEAT = "100"
_DELIVERY = "$JS.ACK."
_ENDED = ("404", "408")  # no messages (no_wait), request expired: the request is over, nothing wrong
_NO_RESPONDERS = "503"


def delivery(msg: Msg) -> tuple[int, datetime]:
    """A JetStream delivery's stream sequence and when the log took it (:func:`delivery_ns`)."""
    seq, nanos = delivery_ns(msg)
    return seq, log_time(nanos)


def log_time(nanos: int) -> datetime:
    """A log time given in ns since the epoch, as the consumers read it."""
    return datetime.fromtimestamp(nanos / 1_000_000_000.0, timezone.utc)


def _ack_tokens(msg: Msg) -> tuple[str, str, str] | None:
    """(stream sequence, ns, pending) of a JetStream delivery's reply subject, as ``msg.metadata``
    reads them (that builds three objects per message; this runs per event), or None for another
    form: ``$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>``,
    or the form with a domain and an account hash after ``$JS.ACK`` (12 tokens, a 13th reserved)."""
    tokens = msg.reply.split(".")
    if tokens[:2] != ["$JS", "ACK"]:
        return None
    if len(tokens) == 9:
        return tokens[5], tokens[7], tokens[8]
    if len(tokens) >= 11:
        return tokens[7], tokens[9], tokens[10]
    return None


def delivery_ns(msg: Msg) -> tuple[int, int]:
    """A JetStream delivery's stream sequence and when the log took it (ns since the epoch)."""
    found = _ack_tokens(msg)
    if found is not None:
        return int(found[0]), int(found[1])
    meta = msg.metadata  # raises as nats-py does for what is not a JetStream delivery
    return meta.sequence.stream, round(meta.timestamp.timestamp() * 1_000_000) * 1000


def pending_after(msg: Msg) -> int | None:
    """How many messages the consumer had still to deliver after this one when it was delivered,
    or None when that is not a JetStream delivery's."""
    found = _ack_tokens(msg)
    return int(found[2]) if found is not None and found[2].isdigit() else None


class Puller:
    """Keeps one pull request open on ``stream``/``consumer`` and hands out what arrives."""

    def __init__(
        self, nc: Client, stream: str, consumer: str, *, batch: int, expires: float = 5.0, heartbeat: float = 1.0
    ) -> None:
        self.nc = nc
        self.stream = stream
        self.consumer = consumer
        self.batch = batch
        self.expires = expires
        self.heartbeat = min(heartbeat, expires / 2)
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._request_body = orjson.dumps(
            {"batch": batch, "expires": int(expires * 1e9), "idle_heartbeat": int(self.heartbeat * 1e9)}
        )
        self._buffer: list[Msg] = []
        self._open = 0
        """How many messages the open request may still bring (0: none is open)."""
        self._deadline = 0.0
        self._heard = 0.0
        """When the server last sent anything for the open request (a message or a heartbeat)."""
        self._trouble: str | None = None
        self._refused = Spell(  # (a stream electing its leader refuses them for seconds, one short of its quorum until it is back)
            log, first=f"consumer {consumer}: pull request refused: {{why}}; asking again",
            still=f"consumer {consumer}: pull requests still refused: {{why}} (refused {{times}} in {{seconds:.0f}} s)",
            ended=f"consumer {consumer}: pull requests answered again (refused {{times}} in {{seconds:.0f}} s)")
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._inbox = ""

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._take)
        await self._refresh()

    async def stop(self) -> list[Msg]:
        """Stop taking messages; returns the ones received and not handed out."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is going away: nothing more arrives either way
                pass
        self._wake.set()
        left, self._buffer = self._buffer, []
        return left

    @property
    def buffered(self) -> list[Msg]:
        """Messages received and not handed out yet."""
        return list(self._buffer)

    async def fetch(self, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages: at once when some have arrived, else the first that arrive
        within ``timeout`` s (with whatever came with them), else none."""
        if self._sub is None:
            return []
        if not self._buffer:
            await self._refresh()
            if not self._buffer:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            if not self._buffer and self._trouble is not None:
                self._refused.failed(why=self._trouble)
                self._trouble = None
                await asyncio.sleep(min(timeout, 0.5))  # e.g. the consumer is being made again
        msgs = self._buffer[: self.batch]
        del self._buffer[: self.batch]
        await self._refresh()
        return msgs

    async def take(self, most: int) -> list[Msg]:
        """Up to ``most`` of the messages received and not handed out yet, without waiting."""
        msgs = self._buffer[:most]
        del self._buffer[:most]
        await self._refresh()
        return msgs

    async def _refresh(self) -> None:
        """Open a new request when none is open and there is room for its batch."""
        if self._sub is None:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self._open and (now > self._deadline or now - self._heard > 2 * self.heartbeat + 0.5):
            self._open = 0  # its end or its heartbeats never arrived (e.g. the connection was lost meanwhile)
        if self._open or len(self._buffer) >= self.batch:
            return
        self._open = self.batch
        self._deadline = now + self.expires + 1.0
        self._heard = now
        try:
            await self.nc.publish(self._subject, self._request_body, reply=self._inbox)
        except Exception as exc:  # reconnecting: asked again after the deadline
            log.warning("consumer %s: pull request not sent: %r", self.consumer, exc)

    async def _take(self, msg: Msg) -> None:
        self._heard = asyncio.get_running_loop().time()
        headers = msg.headers
        if headers and not msg.data and _STATUS in headers:
            status = headers[_STATUS]
            if status == _HEARTBEAT:
                self._refused.ended()
                return
            self._open = 0
            if status not in _ENDED:
                description = (headers.get(_DESCRIPTION) or "").split("\n")[0].strip()  # (nats-py may run on into other headers)
                if status == _NO_RESPONDERS and not description:
                    description = "no responders: the consumer has no leader (its stream electing one, or the consumer deleted)"
                self._trouble = f"{status} {description}".strip()
            else:
                self._refused.ended()  # (a request that ended: the server answers again)
            self._wake.set()
            return
        if not msg.reply.startswith(_DELIVERY):
            # Not the server's: only a JetStream delivery carries an ack subject. Whatever else
            # reaches the inbox is no event of the log and is dropped.
            log.warning("consumer %s: dropped a message on its pull inbox that is not a JetStream delivery (reply %r)",
                        self.consumer, msg.reply[:100])
            return
        self._buffer.append(msg)
        self._refused.ended()
        if self._open:
            self._open -= 1
        self._wake.set()
        if not self._open and len(self._buffer) < self.batch:
            await self._refresh()

