"""The lease by which one bus applies a log (``bus.lease``), against a real nats-server; and
``collabbus up --standby`` taking over from a bus that was killed."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest

from bus.lease import BUCKET, Lease, LogHeld, bucket, holder_of
from bus.server import EmbeddedNats, free_port
from tests.conftest import unique


async def test_of_two_buses_taking_the_lease_at_once_one_holds_it(server: EmbeddedNats) -> None:
    """Creating the key is atomic on the server: two takers starting together, one holds the
    lease, the other is refused, naming the holder."""
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        name = unique("lease")
        first, second = Lease(js, name, data_dir="/srv/a"), Lease(js, name, data_dir="/srv/b")
        outcomes = await asyncio.gather(first.take(patience=0.5), second.take(patience=0.5), return_exceptions=True)
        held = [lease for lease, outcome in zip((first, second), outcomes) if outcome is None]
        refused = [outcome for outcome in outcomes if isinstance(outcome, LogHeld)]
        assert len(held) == 1 and len(refused) == 1
        assert f"the bus at {held[0].data_dir} (pid {os.getpid()} on {socket.gethostname()}" in str(refused[0])
        assert "--standby" in str(refused[0])
        assert (await holder_of(js, name) or {}).get("token") == held[0].me["token"]
        # It renews: the key's revision moves while it is held.
        kv = await js.key_value(BUCKET)
        before = (await kv.get(name)).revision or 0
        await asyncio.sleep(2.5)
        assert ((await kv.get(name)).revision or 0) > before
        # Released, the next taker holds it at once.
        await held[0].release()
        assert await holder_of(js, name) is None
        late = Lease(js, name, data_dir="/srv/c")
        started = time.monotonic()
        await late.take(patience=0.5)
        assert time.monotonic() - started < 0.5
        await late.release()
    finally:
        await nc.close()


async def test_a_lease_nobody_renews_is_taken_over(server: EmbeddedNats) -> None:
    """A holder on another host that stopped renewing (killed, cut off) is waited for until its
    revision has stood still ``stale_after`` seconds; one of this host whose process ended is
    taken over at once."""
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        kv = await bucket(js)
        elsewhere = unique("lease")
        await kv.put(elsewhere, orjson.dumps({"host": "another-host", "pid": 1, "data_dir": "/srv/a", "since": "then", "token": "x"}))
        taker = Lease(js, elsewhere, stale_after=1.5)
        with pytest.raises(LogHeld, match="pid 1 on another-host"):
            await taker.take(patience=0.5)  # not stale yet
        started = time.monotonic()
        taken = Lease(js, elsewhere, stale_after=1.5)
        await taken.take(patience=10)
        assert 1.4 <= time.monotonic() - started < 5
        await taken.release()

        ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
        here = unique("lease")
        pids = os.readlink("/proc/self/ns/pid")
        await kv.put(here, orjson.dumps({"host": socket.gethostname(), "pids": pids, "pid": int(ended.stdout), "token": "y"}))
        started = time.monotonic()
        taken = Lease(js, here)
        await taken.take(patience=10)
        assert time.monotonic() - started < 1.0  # its process is gone: no need to watch it stand still
        await taken.release()
        # The same pid and host name in another process namespace (a container) may be alive: watched.
        container = unique("lease")
        await kv.put(container, orjson.dumps({"host": socket.gethostname(), "pids": "pid:[1]", "pid": int(ended.stdout), "token": "y"}))
        with pytest.raises(LogHeld):
            await Lease(js, container).take(patience=0.5)
    finally:
        await nc.close()


async def test_a_holder_that_lost_its_lease_is_told(server: EmbeddedNats) -> None:
    """When another bus took the lease over (this one could not renew it in time), the holder's
    next renewal is refused: it learns who holds it now, and its ``on_lost`` runs."""
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        name = unique("lease")
        told: list[dict[str, Any]] = []
        holder = Lease(js, name, renew_every=0.2, on_lost=told.append)
        await holder.take(patience=1)
        kv = await js.key_value(BUCKET)
        await kv.put(name, orjson.dumps({"host": "standby-host", "pid": 7, "token": "z"}))  # as a takeover writes it
        deadline = time.monotonic() + 5
        while not told:
            assert time.monotonic() < deadline, "the holder was not told"
            await asyncio.sleep(0.05)
        assert told[0]["host"] == "standby-host" and holder.lost == told[0] and not holder.held
        await holder.release()  # the key is the new holder's: left alone
        assert (await holder_of(js, name) or {}).get("host") == "standby-host"
    finally:
        await nc.close()


async def test_a_bus_that_lost_the_log_stops_applying_it(tmp_path: Path, server: EmbeddedNats) -> None:
    """A running bus whose lease another bus took over stops its consumer at once and says so."""
    from bus.runtime import Bus
    from ops.settings import Settings

    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds))
    await bus.start()
    try:
        assert bus.lease is not None and bus.lease.held and bus.consumer is not None
        from ops.status import collect_status

        applied_by = (await collect_status(bus.js))["applied_by"]  # as `collabbus status` and /ops/status say
        assert applied_by["data_dir"] == str((tmp_path / "bus").resolve()) and applied_by["pid"] == os.getpid()
        assert "token" not in applied_by and applied_by["renewed_at"]
        kv = await bus.js.key_value(BUCKET)
        await kv.put("network", orjson.dumps({"host": "standby-host", "pid": 7, "token": "z"}))
        await asyncio.wait_for(bus.lost_lease.wait(), 5)
        assert bus.consumer is None and bus.relay is None and bus.webhooks is None
    finally:
        await bus.stop()


def _up(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "ops", "up", *args], env=env, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc: subprocess.Popen[str], wanted: str, timeout: float = 60) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        seen.append(line)
        if wanted in line:
            return line
        if proc.poll() is not None:
            raise AssertionError(f"collabbus up exited ({proc.returncode}) before {wanted!r}: " + "".join(seen) + proc.stderr.read())
    raise AssertionError(f"no {wanted!r} within {timeout} s: " + "".join(seen))


@pytest.mark.timeout(180)
async def test_a_standby_takes_over_from_a_killed_bus(tmp_path: Path, server: EmbeddedNats, pg_server_url: str | None) -> None:
    """Two buses on one NATS and one PostgreSQL database, the second `up --standby`: it waits
    (its HTTP gateway not listening), and when the first is killed it takes over within seconds,
    carrying on from the database's position — an event offered before the kill is there, one
    offered after is applied by the standby — with the first one's tokens."""
    from tests.conftest import fresh_database

    database = fresh_database("postgresql", tmp_path, pg_server_url)
    url = next(database)
    ports = [free_port(), free_port()]
    common = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
              "COLLABBUS_DATABASE_URL": url, "COLLABBUS_OPERATOR": "operator"}
    envs = [{**common, "COLLABBUS_DATA_DIR": str(tmp_path / name), "COLLABBUS_HTTP": f"127.0.0.1:{port}"}
            for name, port in zip(("first", "second"), ports)]
    first = _up(envs[0])
    standby: subprocess.Popen[str] | None = None
    try:
        _wait_for_line(first, "is up")
        token = subprocess.run([sys.executable, "-m", "ops", "institutions", "token", "operator"], env=envs[0],
                               capture_output=True, text=True, check=True, timeout=60)
        secret = token.stdout.strip()
        standby = _up(envs[1], "--standby")
        line = _wait_for_line(standby, "standby:")
        assert f"the bus at {(tmp_path / 'first').resolve()} (pid {first.pid}" in line
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{ports[1]}/healthz", timeout=2)

        headers = {"Authorization": f"Bearer {secret}"}
        before, after = unique("before"), unique("after")
        async with httpx.AsyncClient(headers=headers, timeout=20) as http:
            offered = await http.post(f"http://127.0.0.1:{ports[0]}/events", json=_joined(before))
            assert offered.status_code == 202, offered.text
            await _until_applied(http, ports[0], before)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed = time.monotonic()
            _wait_for_line(standby, "is up")
            assert time.monotonic() - killed < 15
            # The standby serves the same read models, with the first one's token.
            await _until_applied(http, ports[1], before)
            offered = await http.post(f"http://127.0.0.1:{ports[1]}/events", json=_joined(after))
            assert offered.status_code == 202, offered.text
            await _until_applied(http, ports[1], after)
        standby.send_signal(signal.SIGINT)
        assert standby.wait(timeout=60) == 0
    finally:
        for proc in (first, standby):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for _ in database:
            pass


def _joined(institution: str) -> dict[str, Any]:
    return {
        "specversion": "1.0", "id": unique("ev"), "source": "/institutions/operator", "type": "institution.joined",
        "subject": institution, "data": {"id": institution, "name": {"en": institution}, "kind": "ngo", "country": "FI"},
    }


async def _until_applied(http: httpx.AsyncClient, port: int, institution: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (await http.get(f"http://127.0.0.1:{port}/institutions/{institution}")).status_code != 200:
        assert time.monotonic() < deadline, f"{institution} was not applied"
        await asyncio.sleep(0.2)


def test_a_standby_needs_a_shared_nats_and_database(tmp_path: Path) -> None:
    """A standby on the embedded nats-server, or on SQLite in its data dir, could never take over
    anything: refused at once, saying what it needs."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path)}
    env.pop("COLLABBUS_NATS_URL", None)
    embedded = subprocess.run([sys.executable, "-m", "ops", "up", "--standby"], env=env, capture_output=True, text=True, timeout=60)
    assert embedded.returncode == 2 and "COLLABBUS_NATS_URL" in embedded.stderr
    sqlite = subprocess.run([sys.executable, "-m", "ops", "up", "--standby"], capture_output=True, text=True, timeout=60,
                            env={**env, "COLLABBUS_NATS_URL": "nats://127.0.0.1:1"})
    assert sqlite.returncode == 2 and "postgresql" in sqlite.stderr and "SQLite" in sqlite.stderr


async def test_a_rebuild_holds_the_log_while_it_replays(tmp_path: Path, server: EmbeddedNats) -> None:
    """`collabbus rebuild` holds the lease while it empties and replays the read models, so a
    bus starting meanwhile is refused naming the rebuild; and it refuses to start while another
    bus holds it (here one on another host, still renewing)."""
    from bus.runtime import Bus
    from ops.settings import Settings
    from ops.workload import Workload

    publisher = Bus(Settings(data_dir=tmp_path / "publisher", nats_url=server.url, nats_creds=server.bus_creds))
    await publisher.start(ingress=False, state=False)
    try:
        for institution, event in Workload(unique("w")).events(1500):
            assert (await publisher.gate.admit(institution, orjson.dumps(event))).accepted
        env = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
               "COLLABBUS_DATA_DIR": str(tmp_path / "rebuilt")}
        rebuilding = subprocess.Popen([sys.executable, "-m", "ops", "rebuild", "--processes", "1"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        seen: dict[str, Any] | None = None
        while rebuilding.poll() is None and seen is None:
            held = await holder_of(publisher.js, "network")
            seen = held if held and held.get("pid") == rebuilding.pid else None
            await asyncio.sleep(0.05)
        assert seen is not None and seen["role"] == "rebuild", "the rebuild did not hold the lease"
        rebuilding.send_signal(signal.SIGSTOP)  # held where it is, whatever its speed (its lease is not stale before 5 s)
        try:
            with pytest.raises(LogHeld, match=f"the rebuild of the read models at {tmp_path / 'rebuilt'} .* is replaying the log"):
                await Lease(publisher.js, "network").take(patience=0.3)  # as a bus starting meanwhile
        finally:
            rebuilding.send_signal(signal.SIGCONT)
        out, err = rebuilding.communicate(timeout=120)
        assert rebuilding.returncode == 0, err
        assert await holder_of(publisher.js, "network") is None  # released

        kv = await publisher.js.key_value(BUCKET)
        other = {"host": "another-host", "pid": 1, "data_dir": "/srv/collabbus", "since": "then", "token": "x"}
        renewing = True

        async def renew() -> None:
            revision = await kv.put("network", orjson.dumps(other))
            while renewing:
                await asyncio.sleep(0.3)
                revision = await kv.update("network", orjson.dumps(other), last=revision)

        renewer = asyncio.create_task(renew())
        try:
            blocked = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "ops", "rebuild", "--processes", "1"],
                                              env=env, capture_output=True, text=True, timeout=120)
        finally:
            renewing = False
            await renewer
        assert blocked.returncode == 1
        assert "the bus at /srv/collabbus (pid 1 on another-host" in blocked.stderr and "--force" in blocked.stderr
    finally:
        await publisher.stop()


async def test_credentials_without_the_bucket_are_told_what_they_need(server: EmbeddedNats, tmp_path: Path) -> None:
    """A bus whose NATS credentials do not reach the leases' bucket (an external server's account
    set up for the streams only) is told which stream and subjects it needs, not a bare timeout."""
    from bus.credentials import member_inbox_prefix, partner_creds

    assert server.authority is not None
    creds = tmp_path / "narrow.creds"
    creds.write_text(partner_creds(server.authority.account, "fi-narrow"))
    nc = await nats.connect(server.url, user_credentials=str(creds), inbox_prefix=member_inbox_prefix("fi-narrow"))
    try:
        with pytest.raises(RuntimeError, match=r"credentials need the stream KV_collabbus_buses and the subjects \$KV\.collabbus_buses\.>"):
            await Lease(nc.jetstream(timeout=2), "network").take(patience=1)
    finally:
        await nc.close()
