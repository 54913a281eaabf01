"""What the operations tests share: a bus with a poison seam, and the command line in a process."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from sqlmodel import Session, select

from bus.runtime import Bus
from bus.server import EmbeddedNats
from handlers.bookkeeping import AppliedEvent
from handlers.network import Network, Routes
from tests.bus.test_consumer import FIXTURE, Recorder, start_bus
from tests.commands import acollabbus
from tests.conftest import join

async def collabbus(*args: str, env: dict[str, str], stdin: bytes = b"") -> tuple[int, str, str]:
    """The command line in its own process (without blocking the bus running in this one)."""
    done = await acollabbus(*args, env=env, stdin=stdin)
    return done.returncode, done.stdout, done.stderr


def cli_env(bus: Bus) -> dict[str, str]:
    env = {**os.environ, "COLLABBUS_NATS_URL": bus.settings.nats_servers[0], "COLLABBUS_DATA_DIR": str(bus.settings.data_dir),
           "COLLABBUS_NATS_CREDS": str(bus.settings.nats_creds), "COLUMNS": "200"}
    env.pop("COLLABBUS_DATABASE_URL", None)
    return env


class Poisoned:
    """A bus whose projection of ``project.registered`` raises for the poison projects, until fixed."""

    def __init__(self, bus: Bus, recorder: Recorder, nc: Client) -> None:
        self.bus, self.recorder, self.nc = bus, recorder, nc

    def applied(self) -> set[str]:
        with Session(self.bus.engine) as session:
            return set(session.exec(select(AppliedEvent.event_id)).all())


@pytest.fixture
async def poisoned(tmp_path: Path, server: EmbeddedNats) -> AsyncIterator[Poisoned]:  # noqa: F811
    recorder = Recorder()
    recorder.poison.update({"poison-a", "poison-b"})
    bus = await start_bus(tmp_path, server, lambda: Network(Routes().add(projections={"project.registered": recorder})),
                          max_deliver=2, backoff=(0.05,))
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        yield Poisoned(bus, recorder, nc)
    finally:
        await nc.close()
        await bus.stop()


async def bus_refusing_poison_rows(tmp_path: Path, server: EmbeddedNats, *, flush_in_handler: bool) -> Bus:
    """A bus whose projection of ``project.registered`` writes an impact report, which the database
    refuses for the poison projects (a trigger: IntegrityError) — in the handler when it flushes
    (``flush_in_handler``), else when the batch is written."""
    from datetime import date

    from handlers.projects import ProjectImpactReport

    def report(session: Any, event: Any) -> None:
        session.add(ProjectImpactReport(project_id=event.subject, period_start=date(2025, 1, 1), period_end=date(2025, 6, 30),
                                        indicators=[], reported_at=event.logged_at))
        if flush_in_handler:
            session.flush()

    bus = await start_bus(tmp_path, server, lambda: Network(Routes().add(projections={"project.registered": report})),
                          max_deliver=2, backoff=(0.05,))
    with bus.engine.begin() as connection:
        connection.exec_driver_sql(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON project_impact_reports WHEN NEW.project_id LIKE 'poison%' "
            "BEGIN SELECT RAISE(ABORT, 'impact reports of poison projects are refused'); END")
    return bus
