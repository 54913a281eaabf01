"""Shared fixtures: a real nats-server per test session, a running bus, members of every kind."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from bus.client import offer
from bus.runtime import Bus
from bus.server import EmbeddedNats
from ops.settings import Settings

FIXTURES = Path(__file__).parent / "fixtures" / "events"
OPERATOR = "operator"


def load_fixtures() -> dict[str, dict[str, Any]]:
    """type → {"as", "kind", "event"} for every catalog fixture."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(FIXTURES.glob("*.json"))}


def unique(prefix: str = "t") -> str:
    """A fresh id usable as event id and aggregate id."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    # Tests do not survive power cuts; JetStream's default sync interval keeps them fast.
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=0, sync_always=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def settings(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), nats_url=nats_server.url, operator=OPERATOR)


@pytest.fixture(scope="session")
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    running = Bus(settings)
    await running.start(state=False)  # the gate alone; scenario tests run their own network consumers
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def partner(nats_server: EmbeddedNats, bus: Bus) -> AsyncIterator[Client]:
    """A partner's own NATS connection, as a client in another process would have."""
    nc = await nats.connect(nats_server.url, name="partner")
    yield nc
    await nc.close()


async def join(nc: Client, institution: str, kind: str, country: str = "FI", **extra: Any) -> None:
    """The operator admits a member."""
    event = {
        "specversion": "1.0",
        "id": unique("join"),
        "source": f"/institutions/{OPERATOR}",
        "type": "institution.joined",
        "subject": institution,
        "data": {"id": institution, "name": {"en": institution}, "kind": kind, "country": country, **extra},
    }
    verdict = await offer(nc, OPERATOR, event)
    assert verdict.accepted, verdict.as_dict()


@pytest.fixture(scope="session")
async def members(partner: Client) -> dict[str, str]:
    """The institutions the fixtures publish as, joined once per session: id → kind."""
    wanted: dict[str, str] = {}
    for fixture in load_fixtures().values():
        if fixture["kind"] != "operator":
            wanted[fixture["as"]] = fixture["kind"]
    for institution, kind in wanted.items():
        await join(partner, institution, kind)
    return wanted
