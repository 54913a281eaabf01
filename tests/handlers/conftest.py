"""Databases for the handler tests: every test body runs on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
from sqlalchemy import Engine

from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats
from handlers.db import make_engine, migrate
from ops.settings import Settings
from tests.handlers.harness import BusScenario


@pytest.fixture(scope="module")
def scenario_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    """The nats-server of a module's scenarios: each test's bus has its streams to itself (:func:`scenario`)."""
    server = EmbeddedNats(tmp_path_factory.mktemp("scenarios") / "nats", port=0, sync_always=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def scenario(database_url: str, tmp_path: Path, scenario_server: EmbeddedNats) -> AsyncIterator[BusScenario]:
    """A bus of its own — its own log — applying to this test's database. The log is the module's
    nats-server's streams, which each test's bus makes anew and deletes when it has stopped."""
    server = scenario_server
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=database_url)
    bus = Bus(settings, consumer_settings=ConsumerSettings("network", backoff=(0.05, 0.1)))
    try:
        await bus.start(ingress=False)
        # The timers act only when a test ticks them, at the moment it names: the relay's own tick
        # each second would otherwise act on a deadline between a test's events and its tick.
        assert bus.relay is not None
        bus.relay.clock = lambda: None
        yield BusScenario(bus)
    finally:
        try:
            await bus.stop()
        finally:  # (also after a start or a stop that failed: the next test's log starts empty)
            async with await nats.connect(server.url, **server.connect_options()) as nc:
                js = nc.jetstream()
                for info in await js.streams_info():
                    await js.delete_stream(str(info.config.name))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()
