"""Gatekeeper processes (``bus.gates``): real ``collabbus gate`` processes on a nats-server of
their own, judging the offers of a bus whose own ingress is closed while they are ready."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from bus.client import offer
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from ops.bench import child_processes
from ops import metrics
from ops.settings import Settings
from tests.commands import spawn
from tests.conftest import OPERATOR, unique


@pytest.fixture
async def bus(server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Bus]:
    settings = Settings(
        data_dir=tmp_path / "data", nats_url=server.url, nats_creds=server.bus_creds, operator=OPERATOR, gate_processes=2,
    )
    running = Bus(settings)
    await running.start(state=False)
    try:
        await running.start_gatekeepers()
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def partner(server: EmbeddedNats, bus: Bus) -> AsyncIterator[Client]:
    nc = await nats.connect(server.url, name="partner", **server.connect_options())
    yield nc
    await nc.close()


def joined(institution: str) -> dict[str, Any]:
    return {
        "specversion": "1.0", "id": unique("join"), "source": f"/institutions/{OPERATOR}", "type": "institution.joined",
        "subject": institution, "data": {"id": institution, "name": {"en": institution}, "kind": "ngo", "country": "FI"},
    }


def judged_here() -> float:
    """The offers of ``institution.joined`` by the operator this (test) process's gate counted."""
    return metrics.OFFERED.labels("institution.joined", OPERATOR)._value.get()


def exposed(bus: Bus, sample: str) -> float:
    """A sample as ``/metrics`` shows it (this process's counts and the gatekeepers' together)."""
    text = metrics.exposition({"streams": {}, "consumers": {}, "dead_letters": {}}, None, gates=bus.gates).decode()
    lines = [line for line in text.splitlines() if line.startswith(sample + " ")]
    assert len(lines) == 1, text  # one family and one sample, whichever processes counted
    return float(lines[0].rsplit(" ", 1)[1])


def exposed_offers(bus: Bus) -> float:
    return exposed(bus, f'collabbus_events_offered_total{{institution="{OPERATOR}",type="institution.joined"}}')


async def eventually(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_gatekeeper_processes_judge_the_offers_and_metrics_add_up_their_counts(bus: Bus, partner: Client) -> None:
    assert bus.gates is not None and bus.gates.ready == 2 and bus.gates.check() == "ok"
    assert bus.ingress is None  # the bus's own process leaves NATS offers to them
    assert exposed(bus, "collabbus_gatekeepers_ready") == 2 and exposed(bus, "collabbus_gatekeeper_restarts_total") == 0
    here, shown = judged_here(), exposed_offers(bus)

    verdicts = await asyncio.gather(*(offer(partner, OPERATOR, joined(unique("m"))) for _ in range(40)))

    assert all(v.accepted for v in verdicts), [v.as_dict() for v in verdicts if not v.accepted]
    assert len({v.seq for v in verdicts}) == 40
    assert judged_here() == here  # judged elsewhere…
    assert exposed_offers(bus) == shown + 40  # …and counted where the operator looks


async def test_a_gatekeeper_that_dies_is_started_again_and_meanwhile_the_bus_judges_offers(bus: Bus, partner: Client) -> None:
    assert bus.gates is not None
    first = [p.process.pid for p in bus.gates.processes if p.process is not None]
    for pid in first:
        os.kill(pid, signal.SIGKILL)

    await eventually(lambda: bus.ingress is not None)  # none ready: this process took the offers over
    assert bus.gates.check() != "ok"
    here = judged_here()
    verdict = await offer(partner, OPERATOR, joined(unique("m")))
    assert verdict.accepted, verdict.as_dict()
    assert judged_here() == here + 1

    await eventually(lambda: bus.gates.ready == 2 and bus.ingress is None)
    assert bus.gates.restarts == 2 and bus.gates.check() == "ok"
    assert exposed(bus, "collabbus_gatekeeper_restarts_total") == 2 and exposed(bus, "collabbus_gatekeepers") == 2
    assert not {p.process.pid for p in bus.gates.processes if p.process is not None} & set(first)
    here, shown = judged_here(), exposed_offers(bus)
    assert (await offer(partner, OPERATOR, joined(unique("m")))).accepted
    assert judged_here() == here and exposed_offers(bus) == shown + 1  # the counts of the dead ones are kept


async def test_stopping_the_bus_stops_its_gatekeepers(server: EmbeddedNats, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "own", nats_url=server.url, nats_creds=server.bus_creds, operator=OPERATOR, gate_processes=1)
    running = Bus(settings)
    await running.start(state=False)
    await running.start_gatekeepers()
    process = running.gates.processes[0].process
    assert process is not None and process.returncode is None
    await running.stop()
    assert process.returncode == 0  # drained and exited on SIGTERM, not killed


async def test_a_gatekeeper_whose_bus_is_killed_stops(tmp_path: Path, server: EmbeddedNats) -> None:
    # A bus process killed outright (SIGKILL: no chance to stop its gatekeepers) leaves none behind.
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "killed"), "COLLABBUS_NATS_URL": server.url,
           "COLLABBUS_NATS_CREDS": str(server.bus_creds), "COLLABBUS_GATE_PROCESSES": "1",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    bus = spawn("up", env=env, stdout=subprocess.DEVNULL)
    try:
        assert bus.stderr is not None
        lines: list[str] = []
        while not any("Ctrl-C" in line for line in lines):
            lines.append(bus.stderr.readline())
            assert bus.poll() is None, "".join(lines)
        gatekeepers = child_processes(bus.pid, "ops gate")
        assert len(gatekeepers) == 1
    finally:
        bus.kill()
        bus.wait()
    await eventually(lambda: not Path(f"/proc/{gatekeepers[0]}").exists() or _zombie(gatekeepers[0]), timeout=20)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_no_gatekeeper_processes_when_asked_for_none(server: EmbeddedNats, tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "none", nats_url=server.url, nats_creds=server.bus_creds, operator=OPERATOR, gate_processes=0)
    running = Bus(settings)
    await running.start(state=False)
    try:
        await running.start_gatekeepers()
        assert running.gates is None and running.ingress is not None
    finally:
        await running.stop()


async def test_handing_the_ingress_over_loses_no_offer(server: EmbeddedNats, tmp_path: Path) -> None:
    """When a gatekeeper process becomes ready the bus stops judging offers itself; the offers its
    subscription held queued then were dropped — their senders' requests went unanswered ("no
    verdict within 10 s"), as the benchmark met once the bus was ready before its gatekeeper. They
    are judged before the bus lets the ingress go."""
    from bus.ingress import Ingress

    settings = Settings(data_dir=tmp_path / "data", nats_url=server.url, nats_creds=server.bus_creds, operator=OPERATOR,
                        gate_processes=0)
    here = Bus(settings)
    await here.start(state=False)  # judging offers itself
    sender = await nats.connect(server.url, name="sender", **server.connect_options())
    taker = await nats.connect(server.url, name="taker", **server.connect_options())
    other = Ingress(taker, here.gate)  # (a gatekeeper process's, in this process)
    try:
        offers = [asyncio.create_task(offer(sender, OPERATOR, joined(unique("handed")), timeout=8)) for _ in range(400)]
        await sender.flush()
        await asyncio.sleep(0.05)  # the bus's subscription holds most of them queued (64 judged at once)
        await other.start()
        await here.close_ingress()
        verdicts = await asyncio.gather(*offers)
    finally:
        await other.stop()
        await asyncio.gather(sender.close(), taker.close())
        await here.stop()
    lost = [v.as_dict() for v in verdicts if not v.accepted]
    assert lost == [], (len(lost), lost[:2])
