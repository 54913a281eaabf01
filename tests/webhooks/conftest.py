"""Webhook tests against real things: a bus with its gateway on the session's nats-server (read
models and webhook tables on SQLite and PostgreSQL), and real HTTP receivers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import uvicorn
from standardwebhooks import Webhook

from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from bus.streams import EVENTS_STREAM
from ops.settings import Settings
from tests.conftest import OPERATOR, unique
from tests.connectors.conftest import Gateway

SCHEDULE = [0, 0.2, 0.4, 0.8]
LOOPBACK = ["127.0.0.0/8"]
TIMEOUT = 3.0
"""The bus's webhook request timeout in these tests (15 s in production)."""


# --- receivers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """How a receiver answers one request; ``hang``: never, until the sender gives up; ``hold``:
    once the test sets this event."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b"ok"
    hang: bool = False
    hold: asyncio.Event | None = None


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    """``time.monotonic()`` on arrival."""

    def verify(self, secret: str) -> dict[str, Any]:
        """The delivery, checked with the Standard Webhooks reference implementation."""
        return Webhook(secret).verify(self.body, self.headers)  # type: ignore[no-any-return]


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # pytest owns the signals
        yield


class Receiver:
    """An HTTP server that records every request, in order, and answers each path by its script
    (the last answer of a script repeats). ``log`` interleaves arrivals and the moments a hanging
    request was given up by its sender: ``("received", path)`` / ``("abandoned", path)``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.requests: list[Received] = []
        self.log: list[tuple[str, str]] = []
        self.scripts: dict[str, list[Answer]] = {}
        self._server = _Server(uvicorn.Config(self, host="127.0.0.1", port=self.port, lifespan="off", log_level="warning", access_log=False))

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def answer(self, path: str, *answers: Answer) -> None:
        self.scripts[path] = list(answers)

    def at(self, path: str) -> list[Received]:
        return [r for r in self.requests if r.path == path]

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        self.requests.append(Received(path, headers, body, time.monotonic()))
        self.log.append(("received", path))
        script = self.scripts.get(path, [Answer()])
        answer = script.pop(0) if len(script) > 1 else script[0]
        if answer.hang:
            while (await receive())["type"] != "http.disconnect":
                pass
            self.log.append(("abandoned", path))
            return
        if answer.hold is not None:
            await answer.hold.wait()
        await send({"type": "http.response.start", "status": answer.status, "headers": [(k.encode(), v.encode()) for k, v in answer.headers.items()]})
        await send({"type": "http.response.body", "body": answer.body})

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._server.should_exit = True
        self._server.force_exit = True
        await self._task


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    running = Receiver()
    await running.start()
    yield running
    await running.stop()


async def eventually(check: Callable[[], Any], timeout: float = 20.0, what: str = "the condition") -> Any:
    """Wait until ``check()`` (or what it awaits) is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# --- a bus with its gateway, restartable on the same database --------------------------------------


class Network:
    """A bus (read models, webhooks, gateway) that can be stopped and started again on the same
    database and log, with other settings."""

    def __init__(self, nats_url: str, database_url: str, data_dir: Path, nats_creds: Path | None = None) -> None:
        self.nats_url = nats_url
        self.nats_creds = nats_creds
        self.database_url = database_url
        self.data_dir = data_dir
        self.consumer = f"wh-{uuid.uuid4().hex[:10]}"
        self.start_seq: int | None = None
        self.bus: Bus | None = None
        self.gateway: Gateway | None = None

    async def start(self, *, allow: list[str] = LOOPBACK, schedule: list[float] = SCHEDULE, timeout: float = TIMEOUT) -> Gateway:
        settings = Settings(
            data_dir=self.data_dir, nats_url=self.nats_url, nats_creds=self.nats_creds, database_url=self.database_url,
            operator=OPERATOR,
            http=f"127.0.0.1:{free_port()}", webhook_allow_networks=allow, webhook_retry_schedule=schedule,
        )
        bus = Bus(settings, webhook_timeout=timeout)
        await bus.start(ingress=False, state=False)
        if self.start_seq is None:  # the session's log holds other tests' events: start after them
            self.start_seq = (await bus.js.stream_info(EVENTS_STREAM)).state.last_seq + 1
        bus.consumer_settings = ConsumerSettings(self.consumer, start_seq=self.start_seq, backoff=(0.05, 0.1))
        await bus.start_state()
        await bus.start_http()
        self.bus = bus
        self.gateway = Gateway(bus, self.database_url, httpx.AsyncClient(base_url=bus.http.url, timeout=30))
        return self.gateway

    async def stop(self) -> None:
        if self.bus is not None and self.gateway is not None:
            await self.gateway.client.aclose()
            await self.bus.stop()
            self.bus = self.gateway = None


@pytest.fixture
async def network(nats_server: EmbeddedNats, database_url: str, tmp_path: Path) -> AsyncIterator[Network]:  # noqa: F811
    running = Network(nats_server.url, database_url, tmp_path / "bus", nats_server.bus_creds)
    try:
        yield running
    finally:
        await running.stop()
        nc = await nats.connect(nats_server.url, **nats_server.connect_options())
        for name in (running.consumer, f"{running.consumer}-webhooks"):
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_consumer(EVENTS_STREAM, name)
        await nc.close()


# --- the partner's side -------------------------------------------------------------------------


def project(owner: str, **extra: Any) -> dict[str, Any]:
    """``project.registered`` data."""
    return {
        "project_id": unique("p"),
        "title": {"tr": "Mahalle Mutfakları", "en": "Neighbourhood Kitchens"},
        "owner": owner,
        "status": "active",
        **extra,
    }


async def register(gateway: Gateway, institution: str, url: str, event_types: list[str] | None = None) -> dict[str, Any]:
    """Register an endpoint that must be accepted; returns it, with its secret."""
    response = await gateway.client.post(
        "/webhooks", json={"url": url, "event_types": event_types or [], "description": "test"}, headers=gateway.auth(institution)
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def deliveries(gateway: Gateway, institution: str, endpoint_id: str) -> list[dict[str, Any]]:
    """Every delivery of the endpoint, following the pages."""
    auth, items, cursor = gateway.auth(institution), [], None
    while True:
        params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
        response = await gateway.client.get(f"/webhooks/{endpoint_id}/deliveries", params=params, headers=auth)
        assert response.status_code == 200, response.text
        items += response.json()["items"]
        if (cursor := response.json()["next_cursor"]) is None:
            return items
