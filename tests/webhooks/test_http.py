"""The delivery HTTP client against raw servers: answers framed every way HTTP/1.1 allows,
connections kept, dropped by the server, or closed."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from connectors.webhooks import http

pytestmark = pytest.mark.quick

class RawServer:
    """Answers each request with the next of ``answers`` (raw bytes); counts connections."""

    def __init__(self, answers: list[bytes], *, close_after: bool = False) -> None:
        self.answers = answers
        self.close_after = close_after
        self.connections = 0
        self.requests: list[bytes] = []
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                self.requests.append(head + await reader.readexactly(length))
                writer.write(self.answers[min(len(self.requests), len(self.answers)) - 1])
                await writer.drain()
                if self.close_after:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    @property
    def origin(self) -> http.Origin:
        assert self.server is not None
        return ("127.0.0.1", self.server.sockets[0].getsockname()[1], None)


Serve = Callable[..., Awaitable[RawServer]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RawServer] = []

    async def start(answers: list[bytes], **options: bool) -> RawServer:
        raw = RawServer(answers, **options)
        raw.server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(raw)
        return raw

    yield start
    for raw in servers:
        assert raw.server is not None
        raw.server.close()


def client() -> http.Client:
    return http.Client(ssl.create_default_context)


HEADERS = {"host": "example.org", "content-type": "application/cloudevents+json"}


async def test_a_kept_connection_carries_the_next_requests(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"])
    sender = client()
    for _ in range(3):
        answer = await sender.post(raw.origin, "/hook?x=1", HEADERS, b'{"a":1}')
        assert (answer.status, answer.body) == (200, b"ok")
    assert raw.connections == 1
    assert raw.requests[0].startswith(b"POST /hook?x=1 HTTP/1.1\r\nhost: example.org\r\n")
    assert raw.requests[0].endswith(b'content-length: 7\r\n\r\n{"a":1}')
    await sender.aclose()


async def test_chunked_and_interim_answers_are_read_and_the_first_kib_kept(serve: Serve) -> None:
    big = b"x" * 1500
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 503 Service Unavailable\r\nRetry-After: 7\r\ntransfer-encoding: chunked\r\n\r\n"
               + f"{len(big):x}\r\n".encode() + big + b"\r\n5;ext=1\r\nhello\r\n0\r\nx-trailer: 1\r\n\r\n")
    raw = await serve([chunked, b"HTTP/1.1 204 No Content\r\n\r\n"])
    sender = client()
    answer = await sender.post(raw.origin, "/", HEADERS, b"{}", keep=1024)
    assert answer.status == 503 and answer.headers["retry-after"] == "7" and answer.body == big[:1024]
    assert (await sender.post(raw.origin, "/", HEADERS, b"{}")).status == 204
    assert raw.connections == 1  # the chunked body was read to its end
    await sender.aclose()


async def test_a_huge_chunk_is_not_read_whole(serve: Serve) -> None:
    """An answer of one chunk of 50 MB (a receiver's bug, or a hostile one): the first KiB is kept
    and the connection closed, as for a long Content-Length; the chunk was read whole, in memory
    (a chunk of gigabytes would have taken the bus down with it)."""
    head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + f"{50 * 1024 * 1024:x}\r\n".encode()
    raw = await serve([head + b"y" * 4096])  # and the rest never comes: the server keeps the connection open
    sender = client()
    answer = await asyncio.wait_for(sender.post(raw.origin, "/", HEADERS, b"{}", keep=1024), 5)
    assert (answer.status, answer.body) == (200, b"y" * 1024)
    assert (await sender.post(raw.origin, "/", HEADERS, b"{}")).status == 200 and raw.connections == 2  # not kept
    await sender.aclose()


async def test_a_connection_closed_without_an_answer_says_so(serve: Serve) -> None:
    raw = await serve([b""], close_after=True)  # it reads the request and closes
    sender = client()
    with pytest.raises(http.HttpError) as refused:
        await sender.post(raw.origin, "/", HEADERS, b"{}")
    assert str(refused.value) == "the connection closed before an answer"
    await sender.aclose()


async def test_a_connection_the_server_closed_is_replaced(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"], close_after=True)
    sender = client()
    for _ in range(3):
        assert (await sender.post(raw.origin, "/", HEADERS, b"{}")).status == 200
        await asyncio.sleep(0.05)
    assert raw.connections == 3 and len(raw.requests) == 3
    await sender.aclose()


async def test_connection_close_and_http_1_0_answers_are_not_kept(serve: Serve) -> None:
    raw = await serve([b"HTTP/1.1 410 Gone\r\nconnection: close\r\ncontent-length: 4\r\n\r\ngone",
                       b"HTTP/1.0 302 Found\r\nlocation: /x\r\n\r\nmoved"])
    sender = client()
    assert (await sender.post(raw.origin, "/", HEADERS, b"{}")).status == 410
    answer = await sender.post(raw.origin, "/", HEADERS, b"{}")
    assert (answer.status, answer.body, answer.headers["location"]) == (302, b"moved", "/x")
    assert raw.connections == 2
    await sender.aclose()


async def test_garbage_and_line_breaks_in_headers_are_errors(serve: Serve) -> None:
    raw = await serve([b"SSH-2.0-OpenSSH\r\n\r\n"])
    sender = client()
    with pytest.raises(http.HttpError):
        await sender.post(raw.origin, "/", HEADERS, b"{}")
    with pytest.raises(http.HttpError):
        await sender.post(raw.origin, "/", {**HEADERS, "webhook-id": "a\r\nx-injected: 1"}, b"{}")
    with pytest.raises(OSError):
        await sender.post(("127.0.0.1", 1, None), "/", HEADERS, b"{}")
    await sender.aclose()
