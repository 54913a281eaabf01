"""Serving the gateway with uvicorn inside the bus's own event loop.

One loop for both: the endpoints call the gate, the membership cache and JetStream directly,
which belong to the bus's loop. The bus owns the signals (Ctrl-C drains everything), so uvicorn
installs none; the socket is bound here, so an address in use is an ordinary ``OSError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import uvicorn

from connectors.http.app import create_app
from connectors.http.problems import KeepConnection
from bus.ratelimit import RateLimiter

if TYPE_CHECKING:
    from bus.runtime import Bus

log = logging.getLogger("collabbus.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpGateway:
    """The HTTP gateway of ``bus`` at ``host:port`` (port 0: any free port, see :attr:`port`)."""

    def __init__(self, bus: "Bus", host: str, port: int, *, rate_limiter: RateLimiter | None = None, app: Any = None) -> None:
        self.bus = bus
        self.host = host
        self.port = port
        self.app: Any = app
        """The gateway (``connectors.http.app``), or another app served the same way (a standby's)."""
        if app is None:
            self.serve_gateway(rate_limiter=rate_limiter)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    def serve_gateway(self, *, rate_limiter: RateLimiter | None = None) -> None:
        """Answer with the gateway from now on — a standby's server once its bus took the log
        over: the address goes on answering throughout, and each request after this one is the
        gateway's (connections kept alive included)."""
        app = create_app(self.bus, rate_limiter=rate_limiter)
        if self.bus.tracing is not None:
            self.bus.tracing.instrument_gateway(app)
        self.app = app

    async def _current(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Listen and serve; returns once requests are being answered. Raises ``OSError`` when
        the address cannot be bound."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP named: asyncio turns Nagle's algorithm off only on sockets that say they are
        # TCP, and with it on, every response waits ~40 ms for the client's delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"the HTTP gateway cannot listen on {self.host}:{self.port}: {exc.strerror}") from None
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            KeepConnection(self._current), lifespan="off", log_level="warning", access_log=False, timeout_graceful_shutdown=5,
            log_config=None,  # uvicorn's records go to the process's logging (ops.logs), not handlers of its own
            server_header=False,
            # Longer than the idle time of partners' pooled connections (uvicorn's 5 s default
            # makes a client reusing a just-closed connection see a reset).
            timeout_keep_alive=75,
        )
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="http-gateway")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise RuntimeError("the HTTP gateway stopped while starting")
            await asyncio.sleep(0.01)
        log.info("HTTP gateway at %s", self.url)

    async def stop(self) -> None:
        """Stop accepting, let requests in progress finish (5 s at most), close."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._server = self._task = None
