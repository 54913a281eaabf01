"""The lease by which one bus applies a log (``bus.lease``), against a real nats-server; and
``collabbus up --standby`` taking over from a bus that was killed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.js.kv import KeyValue

from bus.lease import BUCKET, Lease, LogHeld, _machine, bucket, holder_of
from bus.server import EmbeddedNats, free_port
from tests.commands import Command, collabbus, spawn
from tests.conftest import samples, unique


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
        machine = _machine()
        assert machine  # (Linux: the boot id and the process namespace)
        await kv.put(here, orjson.dumps({"host": socket.gethostname(), "machine": machine, "pid": int(ended.stdout), "token": "y"}))
        started = time.monotonic()
        taken = Lease(js, here)
        await taken.take(patience=10)
        assert time.monotonic() - started < 1.0  # its process is gone: no need to watch it stand still
        await taken.release()
        # The same host name and pid on another machine (a clone) or in another process namespace (a
        # container) may be alive: watched, not taken.
        for elsewhere_machine in (f"another-boot/{machine.split('/', 1)[1]}", f"{machine.split('/', 1)[0]}/pid:[1]"):
            twin = unique("lease")
            await kv.put(twin, orjson.dumps({"host": socket.gethostname(), "machine": elsewhere_machine, "pid": int(ended.stdout), "token": "y"}))
            with pytest.raises(LogHeld):
                await Lease(js, twin).take(patience=0.5)
    finally:
        await nc.close()


async def test_a_takeover_whose_answer_was_lost_holds_the_lease(server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write taking a stale lease over went through, but its answer was lost (the bucket
    electing a leader, a cut): the taker waits on, finds its own value in the key — a lease of
    this process that nothing renews — and holds it at once, rather than waiting for itself to
    stand still."""
    from nats.js.errors import NoStreamResponseError

    from bus import lease as lease_module

    nc = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        name = unique("lease")
        await (await bucket(js)).put(name, orjson.dumps({"host": "another-host", "pid": 1, "token": "x"}))
        lost: list[int] = []

        async def answers_lost_once(js: Any, *, replicas: int = 1) -> KeyValue:
            kv = await bucket(js, replicas=replicas)
            update = kv.update

            async def update_answer_lost(key: str, value: bytes, last: int | None = None) -> int:
                revision = await update(key, value, last=last)
                if not lost:
                    lost.append(revision)
                    raise NoStreamResponseError
                return revision

            kv.update = update_answer_lost  # type: ignore[method-assign,assignment]
            return kv

        monkeypatch.setattr(lease_module, "bucket", answers_lost_once)
        taker = Lease(js, name, stale_after=3.0, renew_every=0.2)
        started = time.monotonic()
        await taker.take(patience=20)
        assert lost and time.monotonic() - started < 5.0  # (3 s standing still, not 3 more after its own write)
        assert taker.held and (await holder_of(js, name) or {}).get("token") == taker.me["token"]
        await asyncio.sleep(0.5)
        assert taker.held and not taker.lost  # and it renews from the revision its write made
        await taker.release()
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def _renewing_holder(server: EmbeddedNats) -> AsyncIterator[tuple[Any, KeyValue, Lease, list[dict[str, Any]]]]:
    """A lease held and renewed every 0.2 s on a connection of its own, and what its ``on_lost``
    was told: (the JetStream context, the bucket, the lease, the told holders)."""
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        told: list[dict[str, Any]] = []
        holder = Lease(js, unique("lease"), renew_every=0.2, on_lost=told.append)
        await holder.take(patience=1)
        yield js, await js.key_value(BUCKET), holder, told
    finally:
        await nc.close()


async def test_a_holder_that_lost_its_lease_is_told(server: EmbeddedNats) -> None:
    """When another bus took the lease over (this one could not renew it in time), the holder's
    next renewal is refused: it learns who holds it now, and its ``on_lost`` runs."""
    async with _renewing_holder(server) as (js, kv, holder, told):
        name = holder.name
        await kv.put(name, orjson.dumps({"host": "standby-host", "pid": 7, "token": "z"}))  # as a takeover writes it
        deadline = time.monotonic() + 5
        while not told:
            assert time.monotonic() < deadline, "the holder was not told"
            await asyncio.sleep(0.05)
        assert told[0]["host"] == "standby-host" and holder.lost == told[0] and not holder.held
        await holder.release()  # the key is the new holder's: left alone
        assert (await holder_of(js, name) or {}).get("host") == "standby-host"


async def test_a_renewal_refused_because_an_earlier_one_went_through_is_no_loss(server: EmbeddedNats) -> None:
    """A renewal whose answer was lost (a timeout, a reconnect) may have been written all the same;
    the next one, expecting the older revision, is refused: finding its own value in the key, the
    holder carries on from there instead of stopping."""
    async with _renewing_holder(server) as (js, kv, holder, told):
        name = holder.name
        await kv.put(name, holder._value())  # as a renewal whose answer never came back
        before = (await kv.get(name)).revision or 0
        await asyncio.sleep(1.0)
        assert told == [] and holder.held and holder.fresh
        assert ((await kv.get(name)).revision or 0) > before + 1  # renewed again from the revision it found
        await holder.release()
        assert await holder_of(js, name) is None


async def test_a_holder_cut_off_from_nats_stops_applying_before_anyone_may_take_over(tmp_path: Path) -> None:
    """While renewals do not go through (here: the nats-server is frozen), the holder's lease stops
    being fresh ``fence_margin`` before a taker could act, and is fresh again once they do."""
    frozen = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await frozen.astart()
    nc = await nats.connect(frozen.url, **frozen.connect_options())
    try:
        js = nc.jetstream(timeout=1)
        holder = Lease(js, unique("lease"), renew_every=0.2, stale_after=2.0, fence_margin=0.8)
        await holder.take(patience=1)
        assert holder.fresh
        assert frozen.process is not None
        frozen.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            while holder.fresh:
                await asyncio.sleep(0.02)
            lapsed = time.monotonic() - started
            assert lapsed < 2.0 - 0.8 + 0.1, lapsed  # before a taker, waiting 2 s from the last renewal it saw
            assert holder.held and holder.lost is None  # not lost: nobody took it
        finally:
            frozen.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while not holder.fresh:
            assert time.monotonic() < deadline, "renewals did not resume"
            await asyncio.sleep(0.05)
        await holder.release()
    finally:
        await nc.close()
        await frozen.astop()


async def test_freshness_counts_the_time_a_machine_slept(server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch) -> None:
    """The holder's clock is the time since boot with suspended time in it (a laptop closed, a
    host suspended): waking past its lease, it is not fresh until a renewal goes through."""
    import bus.lease

    assert abs(bus.lease.clock() - time.clock_gettime(time.CLOCK_BOOTTIME)) < 0.1
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        holder = Lease(nc.jetstream(), unique("lease"), renew_every=60)  # no renewal within the test
        await holder.take(patience=1)
        assert holder.fresh
        slept = bus.lease.clock() + 10
        monkeypatch.setattr(bus.lease, "clock", lambda: slept)  # as if the machine had been suspended 10 s
        assert not holder.fresh and (holder.renewed_ago or 0) >= 10
        await holder.release()
    finally:
        await nc.close()


async def test_a_bus_holds_events_while_its_lease_is_not_fresh(tmp_path: Path, server: EmbeddedNats) -> None:
    """The consumers ask the lease before each batch: while it is not fresh the batch is held (the
    consumer says why, as ``/readyz`` does) — the webhooks' too — and applied once it is."""
    from tests.bus.test_consumer import FIXTURE, project_event, recording_bus, wait_for
    from bus.client import offer

    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        assert bus.lease is not None and bus.consumer is not None
        margin = bus.lease.fence_margin
        bus.lease.fence_margin = bus.lease.stale_after  # as if no renewal had gone through for too long
        try:
            assert (await offer(nc, FIXTURE["as"], project_event("while-unleased"))).accepted
            await wait_for(lambda: bus.consumer is not None and "could not renew its lease" in (bus.consumer.trouble or ""))
            await wait_for(lambda: bus.webhooks is not None and "could not renew its lease" in (bus.webhooks.consumer.trouble or ""))
            await asyncio.sleep(0.5)
            assert "while-unleased" not in recorder.seen
        finally:
            bus.lease.fence_margin = margin
        await wait_for(lambda: "while-unleased" in recorder.seen)
        await wait_for(lambda: bus.webhooks is not None and bus.webhooks.consumer.trouble is None)
        assert bus.consumer.trouble is None


async def test_a_bus_that_lost_the_log_stops_applying_it(tmp_path: Path, server: EmbeddedNats) -> None:
    """A running bus whose lease another bus took over stops its consumer, relay and webhooks at
    once and says so; what is offered afterwards is not applied by it. `collabbus status` names
    the bus holding the log."""
    from bus.client import offer
    from ops.status import collect_status
    from tests.bus.test_consumer import FIXTURE, project_event, recording_bus, wait_for

    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        assert bus.lease is not None and bus.lease.held and bus.consumer is not None
        applied_by = (await collect_status(bus.js))["applied_by"]  # as `collabbus status` and /ops/status say
        assert applied_by["data_dir"] == str(tmp_path.resolve()) and applied_by["pid"] == os.getpid()
        assert applied_by["renewing"] is True and "token" not in applied_by
        assert (await offer(nc, FIXTURE["as"], project_event("before-the-loss"))).accepted
        await wait_for(lambda: "before-the-loss" in recorder.seen)
        kv = await bus.js.key_value(BUCKET)
        await kv.put("network", orjson.dumps({"host": "standby-host", "pid": 7, "token": "z"}))
        await asyncio.wait_for(bus.lost_lease.wait(), 5)
        assert bus.consumer is None and bus.relay is None and bus.webhooks is None
        assert (await offer(nc, FIXTURE["as"], project_event("after-the-loss"))).accepted
        await asyncio.sleep(1.0)
        assert "after-the-loss" not in recorder.seen
        applied_by = (await collect_status(bus.js))["applied_by"]
        assert applied_by["host"] == "standby-host" and applied_by["renewing"] is False  # (its key stands still)


def _up(env: dict[str, str], *args: str) -> Command:
    return spawn("up", *args, env=env)


def _wait_for_line(proc: Command, wanted: str, timeout: float = 60) -> str:
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
async def test_a_standby_that_starts_removes_the_announcements_of_standbys_that_were_killed(server: EmbeddedNats) -> None:
    """A standby killed leaves its key (it could not remove it): the next standby to start removes
    those nobody renewed for two minutes, and leaves the others — and the lease — alone."""
    from datetime import datetime, timedelta, timezone

    from bus.lease import Standby, standbys_of

    nc = await nats.connect(server.url, **server.connect_options())
    js = nc.jetstream()
    name = unique("forgetting")
    starting: Standby | None = None
    try:
        kv = await bucket(js)
        then = (datetime.now(timezone.utc) - timedelta(minutes=3)).isoformat()
        just_now = (datetime.now(timezone.utc) - timedelta(seconds=20)).isoformat()
        await kv.put(f"{name}.standby.killed", orjson.dumps({"host": "h", "pid": 1, "token": "killed", "renewed_at": then}))
        await kv.put(f"{name}.standby.quiet", orjson.dumps({"host": "h", "pid": 2, "token": "quiet", "renewed_at": just_now}))
        await kv.put(name, orjson.dumps({"host": "h", "pid": 3, "token": "holder", "renewed_at": then}))  # the lease: not a standby's
        starting = Standby(js, name, "/srv/next")
        await starting.start()
        keys = set(await kv.keys())
        assert f"{name}.standby.killed" not in keys and {f"{name}.standby.quiet", name} <= keys
        assert [standby["data_dir"] for standby in await standbys_of(js, name)] == ["/srv/next"]  # (quiet: too long ago to list)
    finally:
        if starting is not None:
            await starting.stop()
        await nc.close()


async def test_a_standby_takes_over_from_a_bus_that_stopped_renewing(tmp_path: Path, server: EmbeddedNats, pg_server_url: str | None) -> None:
    """Two buses on one NATS and one PostgreSQL database, the second `up --standby`: it waits,
    alive but not ready over HTTP. The first is frozen (alive, silent: as a bus cut off from
    NATS or stalled); once its lease has stood still for 5 s the standby takes over, carrying on
    from the database's position — an event offered before is there, one offered after is applied
    by the standby — with the first one's tokens. Thawed, the first finds the log taken, stops
    applying and exits 1."""
    from tests.conftest import fresh_database

    database = fresh_database("postgresql", tmp_path, pg_server_url)
    url = next(database)
    ports = [free_port(), free_port()]
    common = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
              "COLLABBUS_DATABASE_URL": url, "COLLABBUS_OPERATOR": "operator"}
    envs = [{**common, "COLLABBUS_DATA_DIR": str(tmp_path / name), "COLLABBUS_HTTP": f"127.0.0.1:{port}"}
            for name, port in zip(("first", "second"), ports)]
    first = _up(envs[0])
    standby: Command | None = None
    try:
        _wait_for_line(first, "is up")
        token = collabbus("institutions", "token", "operator", env=envs[0])
        assert token.returncode == 0, token.stderr
        secret = token.stdout.strip()
        standby = _up(envs[1], "--standby")
        line = _wait_for_line(standby, "standby:")
        assert f"the bus at {(tmp_path / 'first').resolve()} (pid {first.pid}" in line
        # Alive for a supervisor, not ready for a load balancer, and no API of its own yet.
        assert httpx.get(f"http://127.0.0.1:{ports[1]}/healthz", timeout=5).json() == {"status": "ok"}
        ready = httpx.get(f"http://127.0.0.1:{ports[1]}/readyz", timeout=5)
        assert ready.status_code == 503 and ready.json()["status"] == "standby", ready.text
        assert ready.json()["checks"]["nats"] == "ok" and f"pid {first.pid}" in ready.json()["checks"]["log"]
        assert ready.json()["checks"]["database"] == "ok"
        elsewhere = httpx.get(f"http://127.0.0.1:{ports[1]}/projects", timeout=5)
        assert elsewhere.status_code == 503 and elsewhere.headers["content-type"] == "application/problem+json"
        assert elsewhere.json()["type"] == "urn:collabbus:problem:standby" and elsewhere.headers["retry-after"] == "5"
        scraped = httpx.get(f"http://127.0.0.1:{ports[1]}/metrics", timeout=5)
        assert scraped.status_code == 200, scraped.text
        assert samples(scraped.text, "collabbus_state") == {"starting": 0, "standby": 1, "running": 0}
        assert samples(httpx.get(f"http://127.0.0.1:{ports[0]}/metrics", timeout=5).text, "collabbus_state")["running"] == 1
        # `collabbus status` names the bus applying the log and the standby waiting.
        status = collabbus("status", "--json", env=envs[0])
        report = json.loads(status.stdout)
        assert report["applied_by"]["pid"] == first.pid and report["applied_by"]["renewing"] is True, status.stdout
        assert [waiting["pid"] for waiting in report["standbys"]] == [standby.pid]
        assert report["standbys"][0]["data_dir"] == str((tmp_path / "second").resolve())

        headers = {"Authorization": f"Bearer {secret}"}
        before, after = unique("before"), unique("after")
        async with httpx.AsyncClient(headers=headers, timeout=20) as http:
            offered = await http.post(f"http://127.0.0.1:{ports[0]}/events", json=_joined(before))
            assert offered.status_code == 202, offered.text
            await _until_applied(http, ports[0], before)
            answers: list[str] = []  # what the standby's address answers throughout the takeover
            polling = threading.Event()
            poller = threading.Thread(target=_poll_readiness, args=(ports[1], answers, polling))
            poller.start()
            try:
                first.send_signal(signal.SIGSTOP)
                frozen = time.monotonic()
                _wait_for_line(standby, "is up")
                assert 3.9 <= time.monotonic() - frozen < 40  # its last renewal, at most a second before, stood still for 5 s
                ready_by = time.monotonic() + 30
                while not answers or answers[-1] != "200 ready":  # (a moment may pass before every check is ok)
                    assert time.monotonic() < ready_by, answers[-5:]
                    await asyncio.sleep(0.05)
            finally:
                polling.set()
                poller.join()
            # It never stopped answering: a standby, then (maybe) starting, then the gateway, ready.
            assert answers and not [answer for answer in answers if answer.startswith("error")], answers
            phases = [answer for index, answer in enumerate(answers) if index == 0 or answers[index - 1] != answer]
            assert phases[0] == "503 standby" and phases[-1] == "200 ready", phases
            assert set(phases) <= {"503 standby", "503 starting", "503 not_ready", "200 ready"}, phases
            # The standby serves the same read models, with the first one's token.
            await _until_applied(http, ports[1], before)
            assert (await http.get(f"http://127.0.0.1:{ports[1]}/readyz")).status_code == 200  # the whole gateway now
            offered = await http.post(f"http://127.0.0.1:{ports[1]}/events", json=_joined(after))
            assert offered.status_code == 202, offered.text
            await _until_applied(http, ports[1], after)
            first.send_signal(signal.SIGCONT)
            _wait_for_line(first, "another bus took over the log while this one could not renew its lease")
            assert first.wait(timeout=60) == 1
        after_takeover = json.loads(collabbus("status", "--json", env=envs[1]).stdout)
        assert after_takeover["applied_by"]["pid"] == standby.pid and after_takeover["standbys"] == []
        standby.send_signal(signal.SIGINT)
        assert standby.wait(timeout=60) == 0
    finally:
        for proc in (first, standby):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for _ in database:
            pass


def _poll_readiness(port: int, answers: list[str], done: threading.Event) -> None:
    """``/readyz`` at ``port`` every 20 ms until ``done``: its status code and status, or the error."""
    with httpx.Client(timeout=5) as client:
        while not done.is_set():
            try:
                ready = client.get(f"http://127.0.0.1:{port}/readyz")
                answers.append(f"{ready.status_code} {ready.json()['status']}")
            except Exception as exc:
                answers.append(f"error {exc!r}")
            done.wait(0.02)


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


@pytest.mark.timeout(120)
async def test_a_standby_says_when_its_database_does_not_answer(tmp_path: Path, server: EmbeddedNats) -> None:
    """A standby whose database does not answer could only fail when it takes over: its
    `/readyz` says so while it waits; taking over, it exits 1 with the reason, no traceback, and
    lets the lease go."""
    closed = free_port()  # (nothing listens there)
    env = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
           "COLLABBUS_DATABASE_URL": f"postgresql+psycopg://collabbus:secret@127.0.0.1:{closed}/readmodels",
           "COLLABBUS_DATA_DIR": str(tmp_path / "standby"), "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    nc = await nats.connect(server.url, **server.connect_options())
    standby: Command | None = None
    try:
        holder = Lease(nc.jetstream(), "network", data_dir="/srv/holder", renew_every=0.2)
        await holder.take(patience=1)
        standby = _up(env, "--standby")
        await asyncio.to_thread(_wait_for_line, standby, "standby:")
        async with httpx.AsyncClient(timeout=10) as http:
            ready = await http.get(f"http://{env['COLLABBUS_HTTP']}/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "standby", ready.text
        assert ready.json()["checks"]["database"] == "unreachable: OperationalError", ready.text
        assert ready.json()["checks"]["nats"] == "ok"
        await holder.release()
        assert await asyncio.to_thread(standby.wait, 60) == 1
        assert standby.stderr is not None
        said = standby.stderr.read()
        assert "the read models' database cannot be used" in said and "Traceback" not in said, said
        assert await holder_of(nc.jetstream(), "network") is None, said  # let go: the next standby may take it
    finally:
        if standby is not None and standby.poll() is None:
            standby.kill()
            standby.wait()
        await nc.close()


def test_a_standby_needs_a_shared_nats_and_database(tmp_path: Path) -> None:
    """A standby on the embedded nats-server, or on SQLite in its data dir, could never take over
    anything: refused at once, saying what it needs."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path)}
    env.pop("COLLABBUS_NATS_URL", None)
    embedded = collabbus("up", "--standby", env=env)
    assert embedded.returncode == 2 and "COLLABBUS_NATS_URL" in embedded.stderr
    sqlite = collabbus("up", "--standby", env={**env, "COLLABBUS_NATS_URL": "nats://127.0.0.1:1"})
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
        rebuilding = spawn("rebuild", "--processes", "1", env=env, stdout=subprocess.PIPE)
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
        with pytest.raises(RuntimeError, match=r"credentials must allow the stream KV_collabbus_buses and the subjects \$KV\.collabbus_buses\.>"):
            await Lease(nc.jetstream(timeout=2), "network").take(patience=1)
    finally:
        await nc.close()


async def test_a_standby_meeting_jetstream_not_answering_as_it_announces_itself_waits_and_stands_by(
        tmp_path: Path, server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """`up --standby` announces itself in the leases' bucket, then waits for the lease: a request
    unanswered there (an election begun after the start's wait) failed it. It waits for JetStream
    again, announces itself and takes the lease (nobody holding it here). (The failure is injected
    once, in front of the real look-up of the bucket.)"""
    import logging

    from nats.errors import TimeoutError as NatsTimeout
    from nats.js import JetStreamContext

    from bus.runtime import Bus
    from connectors.http.starting import Starting
    from ops.cli import _wait_for_the_log
    from ops.settings import Settings

    bus = Bus(Settings(data_dir=tmp_path / "standby", nats_url=server.url, nats_creds=server.bus_creds,
                       operator="fi-operator"))  # type: ignore[call-arg]
    await bus.start(state=False)
    real_bucket = JetStreamContext.key_value
    failed: list[str] = []

    async def bucket_once_unanswered(self: JetStreamContext, name: str) -> object:
        if not failed:
            failed.append(name)
            raise NatsTimeout
        return await real_bucket(self, name)

    monkeypatch.setattr(JetStreamContext, "key_value", bucket_once_unanswered)
    caplog.set_level(logging.INFO, logger="collabbus")
    starting = Starting(nats=bus.nats_state, doing=lambda: bus.doing)
    try:
        assert await asyncio.wait_for(_wait_for_the_log(bus, asyncio.Event(), starting), 60) is True
        assert failed == [BUCKET]
        said = [record.getMessage() for record in caplog.records if record.name == "collabbus.bus"]
        assert ("announcing this standby: JetStream stopped answering (no answer from JetStream (TimeoutError)); "
                "waiting for JetStream again") in said, said
        assert bus.lease is not None and bus.lease.held and starting.applying is None  # taken: "starting" from here
    finally:
        await bus.stop()


@pytest.mark.timeout(120)
async def test_ctrl_c_stops_a_bus_waiting_for_the_lease_at_once(tmp_path: Path, server: EmbeddedNats) -> None:
    """A bus started while another applies the log waits up to 8 s for it to go (and the rest of
    its start may wait for JetStream): Ctrl-C meanwhile went unheard until the wait ended, and the
    bus then exited 1 saying another bus applies the log. It stops at once ("stopped", exit 0);
    its address said what it waited for."""
    env = {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
           "COLLABBUS_DATA_DIR": str(tmp_path / "second"), "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}",
           "COLLABBUS_GATE_PROCESSES": "0"}
    nc = await nats.connect(server.url, **server.connect_options())
    up: Command | None = None
    try:
        holder = Lease(nc.jetstream(), "network", data_dir="/srv/holder", renew_every=0.2)
        await holder.take(patience=1)
        up = _up(env)
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 60
            while True:
                assert time.monotonic() < deadline and up.poll() is None, "the lease was not waited for"
                try:
                    ready = (await http.get(f"http://{env['COLLABBUS_HTTP']}/readyz")).json()
                    if ready["checks"].get("start") == "taking the lease by which one bus applies the log":
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.05)
        up.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(up.wait, 30) == 0  # (unheard, the wait ended in 8 s: exit 1, "another bus applies the log")
        assert up.stderr is not None and "stopped" in up.stderr.read()
        await holder.release()
    finally:
        if up is not None and up.poll() is None:
            up.kill()
            up.wait()
        await nc.close()
