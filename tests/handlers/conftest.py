"""Databases for the handler tests: every test body runs on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats
from handlers.db import make_engine, migrate
from ops.settings import Settings
from tests.handlers.harness import BusScenario
from tests.postgres import postgres_url


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str | None]:
    with postgres_url() as url:
        yield url


_templates: dict[str, str] = {}


def _template(kind: str, pg_server_url: str | None) -> str:
    """A database migrated once per test process; each test gets a copy (migrating is slow)."""
    if kind not in _templates:
        if kind == "sqlite":
            path = Path(tempfile.mkdtemp(prefix="collabbus-template-")) / "network.db"
            url = f"sqlite:///{path}"
            _templates[kind] = str(path)
        else:
            assert pg_server_url is not None
            name = f"template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(sa.text(f"CREATE DATABASE {name}"))
            admin.dispose()
            url = pg_server_url.rsplit("/", 1)[0] + f"/{name}"
            _templates[kind] = name
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()  # also checkpoints SQLite's write-ahead log into the file
    return _templates[kind]


def fresh_database(kind: str, tmp_path: object, pg_server_url: str | None) -> Iterator[str]:
    """A migrated database of ``kind`` for one test, dropped afterwards."""
    if kind == "sqlite":
        target = Path(str(tmp_path)) / "network.db"
        shutil.copyfile(_template("sqlite", None), target)
        yield f"sqlite:///{target}"
        return
    if pg_server_url is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI: no PostgreSQL binaries or COLLABBUS_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL on this machine (set COLLABBUS_TEST_POSTGRES_URL)")
    template = _template("postgresql", pg_server_url)
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield pg_server_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: object, pg_server_url: str | None) -> Iterator[str]:
    yield from fresh_database(request.param, tmp_path, pg_server_url)


@pytest.fixture
async def scenario(database_url: str, tmp_path: Path) -> AsyncIterator[BusScenario]:
    """A bus of its own — own nats-server, own log — applying to this test's database."""
    server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await server.astart()
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, database_url=database_url)
    bus = Bus(settings, consumer_settings=ConsumerSettings("network", backoff=(0.05, 0.1)))
    await bus.start(ingress=False)
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
