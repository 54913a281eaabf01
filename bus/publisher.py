"""Publishing to a JetStream stream and waiting for its acknowledgement, many at a time.

What ``JetStreamContext.publish`` does, on one reply subscription whose tokens are a counter:
nats-py's request draws random bytes from the operating system for every request, which showed
in the gate's profile. Errors are nats-py's own, so callers handle them as before.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping

import nats.errors
import nats.js.errors
import orjson
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import api

_NO_RESPONDERS = "503"


class LogPublisher:
    """``publish`` to a stream and wait for its ack; ``start`` before use."""

    def __init__(self, nc: Client) -> None:
        self.nc = nc
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count(1)
        self._prefix = ""
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._prefix = self.nc.new_inbox() + "."
        self._sub = await self.nc.subscribe(self._prefix + "*", cb=self._answer)

    async def stop(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is closing
                pass
        for future in self._waiting.values():
            if not future.done():
                future.cancel()
        self._waiting.clear()

    async def _answer(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def publish(
        self, subject: str, payload: bytes, *, timeout: float, stream: str | None = None, headers: Mapping[str, str] | None = None
    ) -> api.PubAck:
        """Publish and wait for the stream's acknowledgement (raises as nats-py's ``publish``)."""
        if self._sub is None:
            raise nats.errors.ConnectionClosedError
        hdr = dict(headers or {})
        if stream is not None:
            hdr[api.Header.EXPECTED_STREAM] = stream
        token = str(next(self._tokens))
        future: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = future
        try:
            await self.nc.publish(subject, payload, reply=self._prefix + token, headers=hdr)
            msg = await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise nats.errors.TimeoutError from None
        finally:
            self._waiting.pop(token, None)
        if msg.headers and msg.headers.get(api.Header.STATUS) == _NO_RESPONDERS:
            raise nats.js.errors.NoStreamResponseError
        resp = orjson.loads(msg.data)
        if "error" in resp:
            raise nats.js.errors.APIError.from_error(resp["error"])
        return api.PubAck.from_response(resp)
