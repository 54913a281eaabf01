"""``collabbus portal sync`` as a real process, killed with SIGKILL in the middle of a first sync
and started again: the log ends with exactly one ``project.registered`` per entry.

The portal has 1,000 entries (ten pages of the connector's 100): the kill comes after a quarter
of them is stored, pages into the sync, and the restart has pages left to do.
``COLLABBUS_PORTAL_KILL_ENTRIES`` sets another size."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine

from connectors.portal import store
from connectors.portal.connector import portal_key
from connectors.portal.sandbox import PortalSandbox, sample_entries
from tests.commands import PIPE, spawn
from tests.connectors.conftest import Gateway
from tests.portal.conftest import TOKEN, Network, project_events
from tests.portal.test_portal_sync import assert_exact

ENTRIES = int(os.environ.get("COLLABBUS_PORTAL_KILL_ENTRIES", "1000"))
SYNC = ["portal", "sync", "--once", "--json"]
"""``collabbus portal sync`` in a process of its own (forked by ``tests.commands``)."""


def sync_env(gateway: Gateway, sandbox: PortalSandbox, tmp_path: Path) -> dict[str, str]:
    """``collabbus portal sync`` of the sandbox into the gateway's bus, as a process of its own."""
    return {**os.environ, "COLLABBUS_NATS_URL": gateway.bus.settings.nats_url or "", "COLLABBUS_NATS_CREDS": str(gateway.bus.settings.nats_creds),
            "COLLABBUS_DATABASE_URL": gateway.database_url, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"),
            "COLLABBUS_PORTAL_URL": sandbox.url, "COLLABBUS_PORTAL_TOKEN": TOKEN,
            "COLLABBUS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8"}


def synced(engine: Engine, portal: str) -> int:
    """How many entries the connector has stored as synced."""
    with engine.connect() as connection:
        table = store.PortalEntry.__table__  # type: ignore[attr-defined]
        return int(connection.execute(sa.select(sa.func.count()).select_from(table).where(table.c.portal == portal)).scalar_one())


@pytest.mark.timeout(900)
async def test_a_killed_sync_process_restarts_into_the_exact_state(
    gateway: Gateway, sandbox: PortalSandbox, network: Network, tmp_path: Path
) -> None:
    sandbox.store.seed(sample_entries(ENTRIES, network.organisations))
    portal = portal_key(sandbox.url)
    env = sync_env(gateway, sandbox, tmp_path)

    first = spawn(*SYNC, env=env, stdout=PIPE)
    said = asyncio.ensure_future(asyncio.to_thread(first.communicate))  # (its pipes read as it writes)
    while (progress := await asyncio.to_thread(synced, gateway.bus.engine, portal)) < ENTRIES // 4:
        assert not said.done(), said.result()[1]
        await asyncio.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    await said
    assert first.returncode == -signal.SIGKILL
    stored = await asyncio.to_thread(synced, gateway.bus.engine, portal)
    assert progress <= stored < ENTRIES, "the process was not killed in the middle of the sync"
    registered_before = len(await project_events(gateway, list(network.members.values())))
    assert stored <= registered_before < ENTRIES  # events of the page under way may be logged but not stored

    second = spawn(*SYNC, env=env, stdout=PIPE)
    stdout, stderr = await asyncio.to_thread(second.communicate)
    assert second.returncode == 0, stderr
    summary = json.loads(stdout or "")
    assert summary["complete"] and summary["rejected"] == []
    assert summary["registered"] == ENTRIES - stored  # resumed from the stored cursor, not from the start
    assert summary["duplicates"] == registered_before - stored  # the page under way, recognised by its ids
    assert await asyncio.to_thread(synced, gateway.bus.engine, portal) == ENTRIES

    events = await assert_exact(gateway, sandbox, network)  # one project.registered per entry, content exact
    assert len(events) == ENTRIES and {e["type"] for e in events} == {"project.registered"}


@pytest.mark.timeout(900)
async def test_sigterm_stops_a_sync_mid_pass_and_the_next_one_carries_on(
    gateway: Gateway, sandbox: PortalSandbox, network: Network, tmp_path: Path
) -> None:
    entries = ENTRIES // 2
    sandbox.store.seed(sample_entries(entries, network.organisations))
    portal = portal_key(sandbox.url)
    env = sync_env(gateway, sandbox, tmp_path)
    first = spawn(*SYNC, env=env, stdout=PIPE)
    said = asyncio.ensure_future(asyncio.to_thread(first.communicate))  # (its pipes read as it writes)
    while await asyncio.to_thread(synced, gateway.bus.engine, portal) < entries // 4:
        assert not said.done(), said.result()[1]
        await asyncio.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    stdout, stderr = await asyncio.wait_for(said, 15)  # not at the end of the pass: now
    assert first.returncode == 1 and "stopped mid-pass" in (stderr or ""), stderr
    cut = json.loads(stdout or "")  # a script still gets a report: what the pass did until then
    assert cut["complete"] is False and cut["error"] == "interrupted" and 0 < cut["listed"] < entries
    assert await asyncio.to_thread(synced, gateway.bus.engine, portal) < entries

    second = spawn(*SYNC, env=env, stdout=PIPE)
    stdout, stderr = await asyncio.to_thread(second.communicate)
    assert second.returncode == 0 and json.loads(stdout or "")["complete"], stderr
    events = await assert_exact(gateway, sandbox, network)
    assert len(events) == entries and {e["type"] for e in events} == {"project.registered"}
