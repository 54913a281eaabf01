"""The HTTP/1.1 client of webhook deliveries: POSTs over keep-alive connections, on asyncio streams.

What a delivery needs and no more: one request at a time per connection, a body of known length,
no redirects followed, no cookies, the first KiB of the answer kept. A general client (httpx and
httpcore) spent more of the bus's CPU per delivery than everything else together; this one costs
a few tens of microseconds. Connections are per endpoint (each :class:`EndpointWorker` has its
own client), so a slow endpoint never takes another's connections.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
"""The most bytes of status line and headers read from an answer."""
DRAIN_LIMIT = 64 * 1024
"""Answer bodies up to this size are read to the end so that the connection can be used again;
beyond it the connection is closed instead."""


class HttpError(Exception):
    """The request could not be made or the answer could not be read."""


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes
    """The first ``keep`` bytes of the body."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def usable(self) -> bool:
        return not self.writer.is_closing() and not self.reader.at_eof() and not self.reader._buffer  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()


Origin = tuple[str, int, str | None]
"""Address, port and TLS server name (None: plain HTTP)."""


class Client:
    """Keep-alive connections to one endpoint's origins (at most ``keep_alive`` idle ones each)."""

    def __init__(self, tls: Callable[[], ssl.SSLContext], keep_alive: int = 8) -> None:
        self.tls = tls
        """The TLS context for https origins (made when first needed)."""
        self.keep_alive = keep_alive
        self._idle: dict[Origin, list[_Connection]] = {}
        self._closed = False

    async def post(self, origin: Origin, target: str, headers: Mapping[str, str], body: bytes, *, keep: int = 1024) -> Answer:
        """POST ``body`` to ``target`` (the path and query) at ``origin``; raises :class:`HttpError`
        (or ``OSError``/``ssl.SSLError`` while connecting) when no answer could be read."""
        head = [f"POST {target} HTTP/1.1"]
        head.extend(f"{name}: {value}" for name, value in headers.items())
        head.append(f"content-length: {len(body)}")
        text = "\r\n".join(head)
        if text.count("\n") != len(head) - 1 or text.count("\r") != len(head) - 1:
            raise HttpError("a header value holds a line break")
        request = (text + "\r\n\r\n").encode("latin-1") + body
        idle = self._idle.get(origin)
        while idle:  # a connection kept from an earlier request, if the server has not closed it
            connection = idle.pop()
            if not connection.usable():
                connection.close()
                continue
            try:
                return await self._exchange(origin, connection, request, keep)
            except _Unanswered:
                continue  # closed by the server meanwhile: the request was not taken, send it anew
        connection = await self._connect(origin)
        try:
            return await self._exchange(origin, connection, request, keep)
        except _Unanswered as exc:
            raise HttpError("the connection closed before an answer" + (f": {exc.__cause__!r}" if exc.__cause__ else "")) from None

    async def _connect(self, origin: Origin) -> _Connection:
        address, port, server_name = origin
        if server_name is None:
            reader, writer = await asyncio.open_connection(address, port, limit=MAX_HEAD)
        else:
            reader, writer = await asyncio.open_connection(address, port, ssl=self.tls(), server_hostname=server_name, limit=MAX_HEAD)
        return _Connection(reader, writer)

    async def _exchange(self, origin: Origin, connection: _Connection, request: bytes, keep: int) -> Answer:
        reusable = False
        try:
            try:
                connection.writer.write(request)
                await connection.writer.drain()
                status_line = await connection.reader.readline()
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                raise _Unanswered() from exc
            if not status_line:
                raise _Unanswered()
            while True:
                status, version = _status(status_line)
                headers = await _headers(connection.reader)
                if not 100 <= status < 200:
                    break
                status_line = await connection.reader.readline()  # an interim answer: the real one follows
            body, complete = await _body(connection.reader, status, headers, keep)
            reusable = complete and version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
            return Answer(status, headers, body)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            raise HttpError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            if reusable and not self._closed and len(idle := self._idle.setdefault(origin, [])) < self.keep_alive:
                idle.append(connection)
            else:
                connection.close()

    async def aclose(self) -> None:
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                connection.close()
        self._idle.clear()


class _Unanswered(Exception):
    """The connection failed before any byte of an answer (a kept connection the server closed)."""


def _status(line: bytes) -> tuple[int, str]:
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise HttpError(f"not an HTTP status line: {line[:100]!r}")
    return int(parts[1]), parts[0]


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    headers: dict[str, str] = {}
    read = 0
    while (line := await reader.readline()) not in (b"\r\n", b"\n"):
        read += len(line)
        if not line.endswith(b"\n") or read > MAX_HEAD:
            raise HttpError("the answer's headers are cut short or too long")
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


async def _body(reader: asyncio.StreamReader, status: int, headers: Mapping[str, str], keep: int) -> tuple[bytes, bool]:
    """The first ``keep`` bytes of the body, and whether it was read to its end (the connection
    can then carry another request)."""
    if status in (204, 304):
        return b"", True
    if "chunked" in headers.get("transfer-encoding", "").lower():
        kept = bytearray()
        total = 0
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:  # then trailers, up to an empty line
                while (line := await reader.readline()) not in (b"\r\n", b"\n"):
                    if not line:
                        return bytes(kept), False
                return bytes(kept), True
            total += size
            if total > DRAIN_LIMIT:  # more than is worth reading to keep the connection (a chunk of gigabytes, say):
                if len(kept) < keep:  # what is kept of it, and the connection closed
                    kept += await reader.readexactly(min(size, keep - len(kept)))
                return bytes(kept), False
            chunk = await reader.readexactly(size + 2)
            if len(kept) < keep:
                kept += chunk[: min(size, keep - len(kept))]
    length = headers.get("content-length")
    if length is not None:
        size = int(length)
        if size > DRAIN_LIMIT:
            return await reader.read(keep) if keep else b"", False
        data = await reader.readexactly(size)
        return data[:keep], True
    data = await reader.read(keep)  # to the end of the connection
    return data, False
