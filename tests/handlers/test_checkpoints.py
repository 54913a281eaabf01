"""The bus's SQLite write-ahead log is copied into the database file in the background, not in
its commits (real SQLite files)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from handlers.db import make_engine
from ops.wal import FALLBACK_AUTOCHECKPOINT, WalCheckpointer

ROWS = 3_000
"""Rows of ~4 KiB: well past the 1,000 pages after which SQLite's commits checkpoint by themselves."""


def fill(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE IF NOT EXISTS blobs (id INTEGER PRIMARY KEY, body BLOB)"))
    for start in range(0, ROWS, 100):  # commits of a hundred rows each, as batches of events are
        with engine.begin() as connection:
            connection.execute(sa.text("INSERT INTO blobs (body) VALUES (randomblob(4000))"), [{}] * 100)


def database_bytes(path: Path) -> int:
    return path.stat().st_size


def test_commits_leave_checkpoints_to_the_checkpointer_which_makes_them(tmp_path: Path) -> None:
    path = tmp_path / "bus.db"
    engine = make_engine(f"sqlite:///{path}", checkpoints_in_background=True)
    checkpointer = WalCheckpointer.for_engine(engine, interval=0.02)
    assert checkpointer is not None
    try:
        fill(engine)
        assert database_bytes(path) < ROWS * 4000 / 4  # the commits copied (nearly) nothing into the file
        checkpointer.start()
        deadline = time.monotonic() + 10
        while database_bytes(path) < ROWS * 4000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert database_bytes(path) >= ROWS * 4000  # the checkpointer did, without a commit
        fill(engine)  # and keeps doing it while the bus writes
        made = checkpointer.checkpoints
        checkpointer.stop()  # with a last checkpoint
        assert checkpointer.checkpoints > made
        assert database_bytes(path) >= 2 * ROWS * 4000
        idle = checkpointer.checkpoints
        checkpointer.start()
        time.sleep(0.3)  # a log nobody writes is not checkpointed again and again
        assert checkpointer.checkpoints <= idle + 1
        checkpointer.stop()
    finally:
        engine.dispose()


def test_other_engines_checkpoint_in_their_commits_as_sqlite_does(tmp_path: Path) -> None:
    """Commands other than the running bus have no checkpointer: their commits keep the log short."""
    path = tmp_path / "command.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        fill(engine)
        assert database_bytes(path) >= ROWS * 4000 / 2
    finally:
        engine.dispose()


def test_only_a_sqlite_file_gets_a_checkpointer() -> None:
    assert WalCheckpointer.for_engine(make_engine("sqlite:///:memory:")) is None
    assert WalCheckpointer.for_engine(make_engine("postgresql+psycopg://u@127.0.0.1:1/none")) is None


async def test_a_running_bus_checkpoints_its_read_models_and_its_span_store_in_the_background(tmp_path: Path, server: Any) -> None:
    import nats

    from bus.runtime import Bus
    from ops.settings import Settings
    from tests.conftest import join

    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds))
    await bus.start()
    try:
        read_models, span_store = bus.checkpointers
        assert read_models.path == tmp_path / "bus" / "collabbus.db" and span_store.path == tmp_path / "bus" / "traces.db"
        with bus.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == FALLBACK_AUTOCHECKPOINT
        made = read_models.checkpoints, span_store.checkpoints
        nc = await nats.connect(server.url, **server.connect_options())
        try:
            await join(nc, "fi-checkpoints", "university")
        finally:
            await nc.close()
        deadline = time.monotonic() + 10
        while not (read_models.checkpoints > made[0] and span_store.checkpoints > made[1]) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # what the member's joining wrote (its rows, its spans) was checkpointed
        assert read_models.checkpoints > made[0] and span_store.checkpoints > made[1]
    finally:
        await bus.stop()
    assert bus.checkpointers == [] and read_models._thread is None and span_store._thread is None


async def test_a_gatekeeper_process_checkpoints_the_span_store_it_writes(tmp_path: Path, server: Any) -> None:
    """``collabbus gate`` may run on another machine, with no bus beside it on its data dir."""
    from bus.runtime import Bus
    from ops.settings import Settings

    gate = Bus(Settings(data_dir=tmp_path / "gate", nats_url=server.url, nats_creds=server.bus_creds))
    await gate.start_gatekeeper()
    try:
        (span_store,) = gate.checkpointers
        assert span_store.path == tmp_path / "gate" / "traces.db" and span_store._thread is not None
    finally:
        await gate.stop()
    assert gate.checkpointers == [] and span_store._thread is None
