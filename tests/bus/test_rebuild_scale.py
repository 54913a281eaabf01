"""Rebuild at scale: a log of 20,000 events is applied incrementally by the bus's consumer, then
``collabbus rebuild`` replays it into a fresh database; it finishes, reports its rate, and every
table equals the incrementally built one.

The log is written as the gatekeeper writes it (canonical bytes, the event id as ``Nats-Msg-Id``)
by the benchmark's loader, so the consumer meets a backlog, as after an outage or when a member
joins with history.

The suite runs it over 10,000 events (one workload with its members, every workflow deciding;
~13,500 logged events with the derived ones). What makes a large log hard for a rebuild is that
its rows outgrow what the rebuild keeps in memory, so it lets rows go and reads them again; the
rebuild here keeps 2,000 rows (``--held-rows``) and the log makes more than that, which the test
checks. ``make bench`` compares a rebuild of 100,000 events, with the
default 50,000 rows held, with the live state the same way (``equals_incremental``), and
``COLLABBUS_REBUILD_TEST_EVENTS`` sets another size here.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from bus.runtime import Bus
from bus.server import EmbeddedNats
from bus.streams import EVENTS_STREAM
from handlers.db import make_engine, table_checksums
from handlers.routes import REBUILD_LANES, rebuild_lanes
from ops import bench
from ops.settings import Settings
from ops.tracing import Tracing

DOMAIN_TABLES = (
    "institutions", "projects", "project_adoptions", "calls", "call_applications", "validations",
    "validation_reviewers", "validation_reviews", "innovation_days", "innovation_day_registrations",
)
EVENTS = int(os.environ.get("COLLABBUS_REBUILD_TEST_EVENTS", "10000"))
HELD_ROWS = 2_000
"""Rows the rebuild keeps in memory here (``collabbus rebuild --held-rows``; 50,000 by default)."""


def applied_position(engine: sa.Engine) -> tuple[int, int]:
    """(the network consumer's position, events in the outbox not yet logged)."""
    with engine.connect() as connection:
        position = connection.execute(sa.text("SELECT seq FROM consumer_positions WHERE consumer = 'network'")).scalar()
        pending = connection.execute(sa.text("SELECT COUNT(*) FROM outbox")).scalar()
    return position or 0, pending or 0


@pytest.mark.timeout(900)
async def test_rebuild_of_a_large_log_finishes_reports_its_rate_and_equals_the_incremental_state(tmp_path: Path) -> None:
    # JetStream's own sync interval: what is measured here is the bus, not the disk.
    server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await server.astart()
    live_url = f"sqlite:///{tmp_path / 'live.db'}"
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=live_url)
    bus = Bus(settings, tracing=Tracing.off())
    try:
        await bus.start(ingress=False, state=False)  # the streams and the operator
        chunks = [bench.workload(f"scale{index}", min(bench.REBUILD_CHUNK, EVENTS - start))
                  for index, start in enumerate(range(0, EVENTS, bench.REBUILD_CHUNK))]
        published, _, _ = await bench.fill_log(server, chunks, EVENTS, bench.BenchOptions(fill_budget=600.0),
                                               lambda *_: None)
        assert published == EVENTS

        await bus.start_state()  # the consumer meets the whole log as a backlog
        assert bus.engine is not None
        deadline = time.monotonic() + 600
        settled_at, last = None, -1
        while True:  # the whole log, the events the workflows derive from it included
            last_seq = (await bus.js.stream_info(EVENTS_STREAM)).state.last_seq
            position, pending = await asyncio.to_thread(applied_position, bus.engine)
            if position >= last_seq and pending == 0:
                if last_seq == last and settled_at is not None and time.monotonic() - settled_at > 1.0:
                    break
                if last_seq != last:
                    settled_at, last = time.monotonic(), last_seq
            assert time.monotonic() < deadline, f"the consumer did not catch up: #{position} of #{last_seq}"
            await asyncio.sleep(0.5)
        info = await bus.js.stream_info(EVENTS_STREAM)
    finally:
        await bus.stop()

    incremental = make_engine(live_url)
    with incremental.connect() as connection:
        applied = connection.execute(sa.text("SELECT COUNT(*) FROM applied_events")).scalar()
        derived = connection.execute(sa.text("SELECT COUNT(*) FROM applied_events WHERE caused_by IS NOT NULL")).scalar()
        unlogged = connection.execute(sa.text("SELECT COUNT(*) FROM applied_events WHERE seq IS NULL")).scalar()
    assert applied == info.state.messages  # every logged event applied once, the derived ones as decided
    assert derived and derived > EVENTS // 20  # the workflows decided a good share of the log
    with incremental.connect() as connection:  # more rows than a rebuild holds: it had to let some go
        rows = sum(connection.execute(sa.text(f'SELECT COUNT(*) FROM "{table}"')).scalar() or 0 for table in DOMAIN_TABLES)
    assert rows > HELD_ROWS or EVENTS < 10_000, rows
    with incremental.connect() as connection:  # funders answered applications (two-stage calls: invited first), applicants withdrew some
        answered: dict[str, int] = dict(connection.execute(sa.text("SELECT status, COUNT(*) FROM call_applications GROUP BY status")).all())
    assert all(answered.get(status) for status in (
        "received", "rejected", "invited", "proposal_sent", "awarded", "declined", "withdrawn")), answered
    assert unlogged == 0  # and each derived event knows where its copy is in the log

    rebuilt_url = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    env = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
           "COLLABBUS_DATA_DIR": str(tmp_path / "rebuild"), "COLLABBUS_DATABASE_URL": rebuilt_url}
    refused = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops", "rebuild", "--processes", "9"], env=env, capture_output=True, text=True, timeout=120,
    )
    message = " ".join(refused.stderr.replace("│", " ").split())
    assert refused.returncode == 2 and f"in {len(REBUILD_LANES)} processes at most" in message, message
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "ops", "rebuild", "--json", "--held-rows", str(HELD_ROWS), "--processes", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:] + result.stdout[-2000:]
    report = json.loads(result.stdout)
    assert report["events"] == info.state.messages and report["failures"] == []
    # the domains replayed side by side, each lane's events counted once (a lane's copies of what it reads aside)
    assert [lane["domains"] for lane in report["lanes"]] == [list(lane) for lane in rebuild_lanes(2)]
    assert sum(lane["events"] for lane in report["lanes"]) == report["events"]
    assert not (tmp_path / "rebuild" / ".rebuild").exists()
    assert report["events_per_second"] > 0 and report["seconds"] > 0
    assert report["held_rows"] == HELD_ROWS and report["rows_let_go"] > 0  # it let rows go and read them again
    rebuilt = make_engine(rebuilt_url)
    try:
        before, after = table_checksums(incremental), table_checksums(rebuilt)
        assert sorted(name for name in before if after.get(name) != before[name]) == []
        assert before == after
    finally:
        incremental.dispose()
        rebuilt.dispose()
        await server.astop()
