"""Databases for the handler tests: every test body runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats
from handlers.db import make_engine, migrate
from ops.settings import Settings
from tests.handlers.harness import BusScenario


@pytest.fixture
async def scenario(database_url: str, tmp_path: Path) -> AsyncIterator[BusScenario]:
    """A bus of its own — own nats-server, own log — applying to this test's database."""
    server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await server.astart()
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=database_url)
    bus = Bus(settings, consumer_settings=ConsumerSettings("network", backoff=(0.05, 0.1)))
    await bus.start(ingress=False)
    # The timers act only when a test ticks them, at the moment it names: the relay's own tick
    # each second would otherwise act on a deadline between a test's events and its tick.
    assert bus.relay is not None
    bus.relay.clock = lambda: None
    try:
        yield BusScenario(bus)
    finally:
        await bus.stop()
        await server.astop()


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()
