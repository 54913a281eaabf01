"""Crash recovery: the consumer process is killed (SIGKILL) at random points while events flow;
after restarts, the read models equal a clean rebuild and every derived event is logged once."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import orjson
import pytest
import sqlalchemy as sa

from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from bus.streams import EVENTS_STREAM
from handlers.db import make_engine, table_checksums
from ops.settings import Settings
from ops.workload import Workload
from tests.commands import Command, spawn

EVENTS = 3000
KILLS = 4


def start_consumer_process(env: dict[str, str]) -> Command:
    proc = spawn("up", env=env)
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "is up" in line:
            return proc
        if proc.poll() is not None:
            raise AssertionError("collabbus up exited: " + line + proc.stderr.read())
    raise AssertionError("collabbus up did not start")


def caught_up(url: str, last_seq: int) -> bool:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            position = connection.execute(sa.text("SELECT seq FROM consumer_positions WHERE consumer = 'network'")).scalar()
            pending = connection.execute(sa.text("SELECT COUNT(*) FROM outbox")).scalar()
        return (position or 0) >= last_seq and pending == 0
    except sa.exc.OperationalError:
        return False
    finally:
        engine.dispose()


@pytest.mark.timeout(300)
async def test_sigkill_at_random_points_then_restart_equals_a_clean_rebuild(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)  # the consumer crashes, not the server
    await server.astart()
    live_url = f"sqlite:///{tmp_path / 'live.db'}"
    env = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
           "COLLABBUS_DATABASE_URL": live_url,
           "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    publisher = Bus(Settings(data_dir=tmp_path / "publisher", nats_url=server.url, nats_creds=server.bus_creds))
    await publisher.start(ingress=False, state=False)
    rng = random.Random(20261123)
    proc = start_consumer_process(env)
    kills = 0
    try:
        workload = Workload(f"k{uuid.uuid4().hex[:6]}")
        kill_at = set(rng.sample(range(300, EVENTS - 200), KILLS))
        for index, (institution, event) in enumerate(workload.events(EVENTS)):
            verdict = await publisher.gate.admit(institution, orjson.dumps(event))
            assert verdict.accepted, verdict.as_dict()
            if index in kill_at:
                await asyncio.sleep(rng.uniform(0.0, 0.3))  # somewhere inside a batch, a commit or the relay
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                proc = start_consumer_process(env)
        last_seq = (await publisher.js.stream_info(EVENTS_STREAM)).state.last_seq
        deadline = time.monotonic() + 180
        while not caught_up(live_url, last_seq):
            assert time.monotonic() < deadline, "the consumer did not catch up"
            await asyncio.sleep(0.25)
            last_seq = (await publisher.js.stream_info(EVENTS_STREAM)).state.last_seq
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        await publisher.stop()
    assert kills == KILLS

    # Every event in the log exactly once, and the derived ones are what the consumer decided.
    nc_bus = Bus(Settings(data_dir=tmp_path / "reader", nats_url=server.url, nats_creds=server.bus_creds))
    await nc_bus.start(ingress=False, state=False)
    ids: collections.Counter[str] = collections.Counter()
    info = await nc_bus.js.stream_info(EVENTS_STREAM)
    for seq in range(1, info.state.last_seq + 1):
        logged = (await nc_bus.js.get_msg(EVENTS_STREAM, seq)).data
        assert logged is not None
        ids[orjson.loads(logged)["id"]] += 1
    await nc_bus.stop()
    assert ids and max(ids.values()) == 1
    live = make_engine(live_url)
    with live.connect() as connection:
        applied = set(connection.execute(sa.text("SELECT event_id FROM applied_events")).scalars())
        derived = set(connection.execute(sa.text("SELECT event_id FROM applied_events WHERE caused_by IS NOT NULL")).scalars())
        unlogged = connection.execute(sa.text("SELECT COUNT(*) FROM applied_events WHERE seq IS NULL")).scalar()
    assert applied == set(ids)  # nothing lost, nothing applied that is not in the log
    assert len(derived) > 500  # the workload makes the workflows decide a lot
    assert unlogged == 0  # each derived event knows its place in the log, crashes or not

    # A clean rebuild from the log into a fresh database equals the state built through the crashes.
    rebuilt_url = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    result = subprocess.run(
        [sys.executable, "-m", "ops", "rebuild", "--json", "--processes", "1"],  # (in lanes: tests/bus/test_rebuild_scale.py)
        env={**env, "COLLABBUS_DATABASE_URL": rebuilt_url}, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads(result.stdout)
    assert report["events"] == info.state.messages and report["failures"] == []
    assert report["lanes"] is None  # all in one process
    rebuilt = make_engine(rebuilt_url)
    assert table_checksums(live) == table_checksums(rebuilt)
    live.dispose()
    rebuilt.dispose()
    await server.astop()
