"""A running HTTP gateway for the connector tests: a bus of its own (on the session's nats-server)
with read models on SQLite and on PostgreSQL, served by uvicorn on a free port, and an httpx client."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from bus.streams import EVENTS_STREAM
from handlers import tokens
from handlers.db import session_scope
from ops.settings import Settings
from tests.conftest import OPERATOR
from tests.conftest import fresh_database
from tests.handlers.harness import envelope


def institution_id(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@dataclass
class Gateway:
    """The gateway under test and what a test needs around it."""

    bus: Bus
    database_url: str
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return str(self.client.base_url)

    def token(self, institution: str) -> str:
        """A new token, as ``collabbus institutions token`` issues it."""
        with session_scope(self.bus.engine) as session:
            return tokens.issue(session, institution)

    def auth(self, institution: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(institution)}"}

    async def post(self, institution: str | dict[str, str], event: Any, **kwargs: Any) -> httpx.Response:
        """POST one structured event (or anything JSON) as ``institution``."""
        headers = institution if isinstance(institution, dict) else self.auth(institution)
        headers = {"content-type": "application/cloudevents+json", **headers, **kwargs.pop("headers", {})}
        return await self.client.post("/events", json=event, headers=headers, **kwargs)

    async def offer(self, institution: str, event_type: str, data: dict[str, Any], **attributes: Any) -> dict[str, Any]:
        """Offer an event that must be accepted; returns the verdict."""
        response = await self.post(institution, envelope(event_type, institution, data, **attributes))
        assert response.status_code == 202, response.text
        return response.json()  # type: ignore[no-any-return]

    async def join(self, kind: str, country: str = "FI", prefix: str = "t", **extra: Any) -> str:
        """A new member of ``kind``, admitted by the operator over HTTP and applied to the read
        models (an accepted offer is logged, not yet applied: a test reading the member at once
        could find nothing); returns its id."""
        institution = institution_id(prefix)
        data = {"id": institution, "name": {"en": institution}, "kind": kind, "country": country, **extra}
        await self.offer(OPERATOR, "institution.joined", data)
        await self.settle()
        return institution

    async def settle(self) -> None:
        """Wait until the read models have applied the whole log (and the workflows' answers)."""
        service, relay = self.bus.service, self.bus.relay
        assert service is not None and relay is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            last = (await self.bus.js.stream_info(EVENTS_STREAM)).state.last_seq
            position = await asyncio.to_thread(service.position)
            if position >= last and not await asyncio.to_thread(service.outbox, peek=True):
                return
            assert loop.time() < deadline, f"the read models did not catch up (at {position}, log at {last})"
            relay.wake.set()
            # Woken as soon as the consumer applies more of the log; looked at again after a
            # while in any case (the relay's marking an outbox row published wakes nobody).
            assert self.bus.applied is not None
            await self.bus.applied.wait_beyond(position, 0.05)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
async def gateway(
    request: pytest.FixtureRequest,
    nats_server: EmbeddedNats,
    tmp_path_factory: pytest.TempPathFactory,
    pg_server_url: str | None,
) -> AsyncIterator[Gateway]:
    """``collabbus up``'s gateway on a bus whose consumer starts after what is already logged."""
    tmp_path: Path = tmp_path_factory.mktemp("gateway")
    databases = fresh_database(request.param, tmp_path, pg_server_url)
    database_url = next(databases)
    settings = Settings(
        data_dir=tmp_path / "bus", nats_url=nats_server.url, nats_creds=nats_server.bus_creds, database_url=database_url,
        operator=OPERATOR, http=f"127.0.0.1:{free_port()}",
    )
    bus = Bus(settings, consumer_settings=ConsumerSettings(f"gateway-{uuid.uuid4().hex[:10]}"))
    await bus.start(ingress=False, state=False)
    last = (await bus.js.stream_info(EVENTS_STREAM)).state.last_seq
    bus.consumer_settings = ConsumerSettings(bus.consumer_settings.name, start_seq=last + 1, backoff=(0.05, 0.1))
    await bus.start_state()
    await bus.start_http()
    try:
        async with httpx.AsyncClient(base_url=bus.http.url, timeout=30) as client:
            yield Gateway(bus, database_url, client)
    finally:
        await bus.stop()
        nc = await nats.connect(nats_server.url, **nats_server.connect_options())
        await nc.jetstream().delete_consumer(EVENTS_STREAM, bus.consumer_settings.name)
        await nc.close()
        next(databases, None)
