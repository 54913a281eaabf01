"""``collabbus backup`` of a running bus and ``collabbus restore`` into a new data dir: the log,
the dead letters, the read models and the server's keys come back, and the bus carries on."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from bus.client import offer
from bus.server import free_port
from bus.streams import DLQ_STREAM, EVENTS_STREAM
from ops import backup as copies
from tests.conftest import load_fixtures, unique
from tests.ops.test_cli import cli, collabbus_up


def bus_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(data_dir), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_DATABASE_URL", "COLLABBUS_NATS_CREDS"):
        env.pop(name, None)
    return env


def status_of(env: dict[str, str]) -> dict[str, Any]:
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)  # type: ignore[no-any-return]


def log_state(env: dict[str, str], status: dict[str, Any] | None = None) -> dict[str, int]:
    streams = (status or status_of(env))["streams"]
    return {name: streams[name]["messages"] for name in (EVENTS_STREAM, DLQ_STREAM)}


@pytest.mark.timeout(300)
async def test_a_backup_of_a_running_bus_restores_into_a_new_data_dir_with_its_log_state_and_keys(tmp_path: Path) -> None:
    fixture = load_fixtures()["project.registered"]
    member, project = unique("tr-backup"), unique("p")
    old = bus_env(tmp_path / "old")
    backup = tmp_path / "backup"
    with collabbus_up(old):
        added = cli("institutions", "add", member, "--name", "Backup", "--kind", fixture["kind"], "--country", "TR", env=old)
        assert added.returncode == 0, added.stderr + added.stdout
        data = dict(fixture["event"]["data"], owner=member, project_id=project, partners=[])  # (no other member)
        published = cli("publish", "project.registered", "--as", member, "--data", json.dumps(data), env=old)
        assert published.returncode == 0 and "applied #" in published.stdout, published.stdout + published.stderr
        token = cli("institutions", "token", member, env=old).stdout.strip()
        creds = tmp_path / "member.creds"
        assert cli("institutions", "creds", member, "--output", str(creds), env=old).returncode == 0
        status = status_of(old)
        before = log_state(old, status)
        assert status["backup"] is None

        made = cli("backup", str(backup), "--json", env=old)  # while the bus runs
        assert made.returncode == 0, made.stderr + made.stdout
        manifest = json.loads(made.stdout)
        assert {s["name"]: s["messages"] for s in manifest["streams"]} == before
        assert manifest["database"]["kind"] == "sqlite" and manifest["auth"] is True
        assert backup.stat().st_mode & 0o777 == 0o700
        files = manifest["files"]  # every file, with its size and checksum
        assert {f"streams/{EVENTS_STREAM}/stream.tar.s2", f"streams/{EVENTS_STREAM}/backup.json", "collabbus.db"} <= set(files)
        assert any(name.startswith("nats-auth/") for name in files)
        assert files["collabbus.db"] == {"bytes": (backup / "collabbus.db").stat().st_size,
                                         "sha256": hashlib.sha256((backup / "collabbus.db").read_bytes()).hexdigest()}
        assert (backup / "streams" / EVENTS_STREAM / "stream.tar.s2").stat().st_size > 0
        assert json.loads((backup / "streams" / EVENTS_STREAM / "backup.json").read_text())["config"]["name"] == EVENTS_STREAM

        again = cli("backup", str(backup), env=old)
        assert again.returncode == 1 and "not empty" in again.stderr
        noted = json.loads(cli("status", "--json", env=old).stdout)["backup"]
        assert noted["into"] == str(backup.resolve()) and noted["at"] == manifest["created_at"]
        assert noted["last_seq"][EVENTS_STREAM] == manifest["streams"][0]["last_seq"]
        scraped = httpx.get(f"http://{old['COLLABBUS_HTTP']}/metrics").text
        served = float(next(line.split()[1] for line in scraped.splitlines()
                            if line.startswith("collabbus_backup_last_timestamp_seconds ")))
        assert served == datetime.fromisoformat(manifest["created_at"]).timestamp()
        told = cli("backup", str(tmp_path / "second"), "--check", env=old)  # as a person reads it; the log checked first
        assert told.returncode == 0, told.stderr
        assert f"{EVENTS_STREAM}: {before[EVENTS_STREAM]:,} messages" in told.stdout
        assert "read models: collabbus.db" in told.stdout and "it holds secrets" in told.stdout
        assert f"into {tmp_path / 'second'}" in cli("status", env=old).stdout  # the last one

    new = bus_env(tmp_path / "new")
    # A backup damaged since it was made is refused before anything is written.
    damaged = tmp_path / "damaged"
    shutil.copytree(backup, damaged)
    archive = damaged / "streams" / EVENTS_STREAM / "stream.tar.s2"
    content = bytearray(archive.read_bytes())
    content[len(content) // 2] ^= 0xFF
    archive.write_bytes(bytes(content))
    refused = cli("restore", str(damaged), env=new)
    assert refused.returncode == 1 and f"the backup is damaged: {archive} is not the file" in refused.stderr, refused.stderr
    assert not (tmp_path / "new").exists()
    # One the server cannot unpack (its checksums agree: damaged before they were taken) fails
    # half-way, after the log was restored; the restore is undone, so it can be run again.
    unpackable = tmp_path / "unpackable"
    shutil.copytree(backup, unpackable)
    (unpackable / "streams" / DLQ_STREAM / "stream.tar.s2").write_bytes(os.urandom(4096))
    listed = json.loads((unpackable / "collabbus-backup.json").read_text())
    listed["files"][f"streams/{DLQ_STREAM}/stream.tar.s2"] = {
        "bytes": 4096, "sha256": hashlib.sha256((unpackable / "streams" / DLQ_STREAM / "stream.tar.s2").read_bytes()).hexdigest()}
    (unpackable / "collabbus-backup.json").write_text(json.dumps(listed))
    failed = cli("restore", str(unpackable), env=new)
    assert failed.returncode == 1 and f"error: {DLQ_STREAM}:" in failed.stderr, failed.stderr + failed.stdout
    assert "what it restored was removed again" in failed.stderr
    assert not (tmp_path / "new" / "collabbus.db").exists()
    assert not list((tmp_path / "new").rglob("nats-auth"))

    restored = cli("restore", str(backup), env=new)
    assert restored.returncode == 0, restored.stderr + restored.stdout
    assert f"{EVENTS_STREAM}: {before[EVENTS_STREAM]:,} messages" in restored.stdout
    assert "keys: restored" in restored.stdout

    refused = cli("restore", str(backup), env=new)  # not over what is there
    assert refused.returncode == 1 and "exists: restore into a new data dir" in refused.stderr

    with collabbus_up(new):
        status = status_of(new)
        assert log_state(new, status) == before
        assert status["backup"] is None  # this data dir made none
        async with httpx.AsyncClient(base_url=f"http://{new['COLLABBUS_HTTP']}", timeout=10) as http:
            # the token was issued before the backup: the read models came back with it
            answer = await http.get(f"/projects/{project}", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
            assert answer.json()["owner"] == member
        # credentials issued by the old data dir's server are good on the restored one
        nc = await nats.connect(f"nats://{new['COLLABBUS_NATS_LISTEN']}", user_credentials=str(creds),
                                inbox_prefix=f"_INBOX.{member}")
        try:
            event = dict(fixture["event"], id=unique("after"), source=f"/institutions/{member}", subject=unique("p"))
            event["data"] = dict(data, project_id=event["subject"])
            verdict = await offer(nc, member, event)
            assert verdict.accepted and verdict.seq == before[EVENTS_STREAM] + 1, verdict.as_dict()
        finally:
            await nc.close()


def test_restore_says_what_is_wrong_with_what_it_was_given(tmp_path: Path) -> None:
    env = bus_env(tmp_path / "new")
    nothing = cli("restore", str(tmp_path), env=env)
    assert nothing.returncode == 1 and "holds no collabbus backup" in nothing.stderr
    nowhere = cli("backup", str(tmp_path / "b"), env=env)
    assert nowhere.returncode == 1 and "no embedded nats-server store" in nowhere.stderr
    assert not (tmp_path / "b").exists()
    # A script asking for JSON reads why on standard output too.
    said = cli("restore", str(tmp_path), "--json", env=env)
    assert said.returncode == 1 and "holds no collabbus backup" in json.loads(said.stdout)["error"]
    said = cli("backup", str(tmp_path / "b"), "--json", env=env)
    assert said.returncode == 1 and json.loads(said.stdout)["error"].startswith("no embedded nats-server store")
    from ops.backup import FORMAT, MANIFEST, PG_DUMP

    dumped = tmp_path / "dumped"  # read models of PostgreSQL, and this data dir's are SQLite
    dumped.mkdir()
    (dumped / MANIFEST).write_text(json.dumps({"format": FORMAT, "created_at": "2026-12-05T08:00:00+00:00", "streams": []}))
    (dumped / PG_DUMP).write_bytes(b"PGDMP")
    elsewhere = cli("restore", str(dumped), env=env)
    assert elsewhere.returncode == 1 and "the database here is not PostgreSQL (sqlite)" in " ".join(elsewhere.stderr.split())
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").rglob("*.db"))


@pytest.mark.timeout(300)
async def test_a_bus_on_postgresql_and_its_own_nats_is_backed_up_to_another_nats(
    tmp_path: Path, pg_server_url: str | None
) -> None:
    """The log goes to a NATS without the network's streams, the read models in PostgreSQL (by
    ``pg_dump``) into an empty database; a database that holds tables is refused before anything
    is written. The log is a few megabytes, so the snapshot comes in many chunks under the
    server's flow control and the restore sends many."""
    import sqlalchemy as sa

    from bus.server import EmbeddedNats
    from handlers.db import make_engine, table_checksums
    from tests.conftest import fresh_database

    databases = fresh_database("postgresql", tmp_path, pg_server_url)
    database_url = next(databases)
    assert pg_server_url is not None
    empty_name = unique("restored").replace("-", "_")
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(sa.text(f"CREATE DATABASE {empty_name}"))
    empty_url = database_url.rsplit("/", 1)[0] + f"/{empty_name}"
    first, second = (EmbeddedNats(tmp_path / name, port=0, sync_always=False) for name in ("nats-a", "nats-b"))
    await first.astart()
    await second.astart()
    try:
        env = {**bus_env(tmp_path / "old"), "COLLABBUS_NATS_URL": first.url, "COLLABBUS_NATS_CREDS": str(first.bus_creds),
               "COLLABBUS_DATABASE_URL": database_url}
        with collabbus_up(env):
            member = unique("fi-pg")
            added = cli("institutions", "add", member, "--name", "PG", "--kind", "ngo", "--country", "FI", env=env)
            assert added.returncode == 0, added.stderr + added.stdout
        # Bulk for the log (with the bus stopped: it is not for applying), ~3 MB that do not compress.
        nc = await nats.connect(first.url, user_credentials=str(first.bus_creds))
        try:
            js = nc.jetstream()
            for index in range(2000):
                await js.publish(f"collab.events.{member}.project.registered.bulk{index}", os.urandom(1500),
                                 headers={"Nats-Msg-Id": unique("bulk")})
        finally:
            await nc.close()
        before = log_state(env)  # (the command starts nothing: the NATS is the bus's own)
        made = cli("backup", str(tmp_path / "backup"), "--json", env=env)
        assert made.returncode == 0, made.stderr + made.stdout
        assert (tmp_path / "backup" / "streams" / EVENTS_STREAM / "stream.tar.s2").stat().st_size > 2_500_000
        dumped = json.loads(made.stdout)["database"]
        assert dumped["kind"] == "postgresql" and dumped["file"] == "collabbus.pgdump"
        assert dumped["bytes"] == (tmp_path / "backup" / "collabbus.pgdump").stat().st_size > 0
        assert not (tmp_path / "backup" / "collabbus.db").exists() and not (tmp_path / "backup" / "nats-auth").exists()

        # A backup interrupted in the middle of the log's snapshot leaves nothing behind.
        interrupted = tmp_path / "interrupted"
        nc = await nats.connect(first.url, user_credentials=str(first.bus_creds))
        try:
            copying: asyncio.Task[Any] | None = None

            def progress(item: str, copied: int) -> None:
                if item == EVENTS_STREAM and copied and copying is not None:
                    copying.cancel()

            copying = asyncio.create_task(copies.back_up(nc, interrupted, network="operator", db_url=database_url,
                                                         auth_dir=None, progress=progress))
            with pytest.raises(asyncio.CancelledError):
                await copying
        finally:
            await nc.close()
        assert not interrupted.exists()

        target = {**env, "COLLABBUS_DATA_DIR": str(tmp_path / "new"), "COLLABBUS_NATS_URL": second.url,
                  "COLLABBUS_NATS_CREDS": str(second.bus_creds)}
        onto_tables = cli("restore", str(tmp_path / "backup"), env=target)  # (the bus's own database: it has tables)
        assert onto_tables.returncode == 1 and "holds tables already" in " ".join(onto_tables.stderr.split())
        target["COLLABBUS_DATABASE_URL"] = empty_url  # (the streams were not restored either: this one finds none)
        restored = cli("restore", str(tmp_path / "backup"), "--json", env=target)
        assert restored.returncode == 0, restored.stderr + restored.stdout
        report = json.loads(restored.stdout)
        assert report["database"].endswith(f"/{empty_name}") and report["auth"] is False and report["verified"] is True
        assert {name: state["messages"] for name, state in report["streams"].items()} == before
        assert log_state(target) == before  # read back from the other server
        engines = [make_engine(url) for url in (database_url, empty_url)]
        try:  # the read models, tokens and webhooks as they were
            assert table_checksums(engines[1]) == table_checksums(engines[0])
            with engines[1].connect() as connection:
                assert connection.execute(sa.text("SELECT count(*) FROM institutions WHERE id = :id"), {"id": member}).scalar() == 1
        finally:
            for engine in engines:
                engine.dispose()
        onto_a_network = cli("restore", str(tmp_path / "backup"), env=target)
        assert onto_a_network.returncode == 1 and "holds tables already" in " ".join(onto_a_network.stderr.split())
    finally:
        await first.astop()
        await second.astop()
        for _ in databases:
            pass
        with admin.connect() as connection:
            connection.execute(sa.text(f"DROP DATABASE IF EXISTS {empty_name} WITH (FORCE)"))
        admin.dispose()
