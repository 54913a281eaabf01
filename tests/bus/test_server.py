"""The embedded nats-server and the streams the bus declares (CONTRACT §1, §4)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import nats
import pytest
from nats.js.api import RePublish, StorageType

from bus.client import offer
from bus.runtime import Bus
from bus.server import EmbeddedNats, EmbeddedServerError, find_binary, free_port
from bus.streams import (
    DLQ_STREAM, EVENTS_STREAM, JetStreamUnusable, StreamConfigError, desired_streams, ensure_streams, wait_for_jetstream,
)
from ops.settings import Settings
from tests.conftest import all_stopped, load_fixtures, unique


def embedded_settings(data_dir: Path, port: int, **extra: object) -> Settings:
    return Settings(data_dir=data_dir, nats_listen=f"127.0.0.1:{port}", **extra)  # type: ignore[arg-type]


async def test_restart_on_the_same_data_dir_keeps_the_log(tmp_path: Path) -> None:
    port = free_port()
    settings = embedded_settings(tmp_path, port)
    fixture = load_fixtures()["project.registered"]
    event = dict(fixture["event"], id=unique("keep"))

    bus = Bus(settings)
    await bus.start()
    try:
        assert bus.server is not None
        config = bus.server.config_path.read_text()
        assert "sync_interval: always" in config
        assert str((tmp_path / "nats" / "jetstream").resolve()) in config
        nc = await nats.connect(bus.server.url, **bus.server.connect_options())
        await _join(nc, settings.operator, fixture["as"], fixture["kind"])
        verdict = await offer(nc, fixture["as"], event)
        assert verdict.accepted, verdict.as_dict()
        await nc.close()
        before = (await bus.js.stream_info(EVENTS_STREAM)).state.messages
    finally:
        await bus.stop()

    again = Bus(embedded_settings(tmp_path, port))
    await again.start()
    try:
        streams = [s.config.name for s in await again.js.streams_info()]
        assert sorted(streams, key=str) == [DLQ_STREAM, EVENTS_STREAM, "KV_collabbus_buses"]  # the log, and who applies it
        info = await again.js.stream_info(EVENTS_STREAM)
        assert info.state.messages == before  # nothing lost, the operator is not joined twice
        assert info.config.storage == StorageType.FILE and info.config.deny_delete and info.config.deny_purge
        nc = await nats.connect(again.server.url, **again.server.connect_options())  # type: ignore[union-attr]
        duplicate = await offer(nc, fixture["as"], event)
        assert duplicate.accepted and duplicate.duplicate and duplicate.seq == verdict.seq
        await nc.close()
    finally:
        await again.stop()


async def _join(nc: nats.NATS, operator: str, institution: str, kind: str) -> None:
    from bus.client import offer as offer_

    verdict = await offer_(
        nc,
        operator,
        {
            "specversion": "1.0",
            "id": unique("join"),
            "source": f"/institutions/{operator}",
            "type": "institution.joined",
            "subject": institution,
            "data": {"id": institution, "name": {"en": institution}, "kind": kind, "country": "TR"},
        },
    )
    assert verdict.accepted, verdict.as_dict()


def test_a_taken_port_gives_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = EmbeddedNats(tmp_path, port=port)
        with pytest.raises(EmbeddedServerError, match=f"127.0.0.1:{port} is already in use"):
            server.start()


async def test_stream_settings_are_owned_and_changes_are_logged(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    nc = await nats.connect(nats_server.url, **nats_server.connect_options())
    js = nc.jetstream()
    name = unique("S").upper().replace("-", "_")
    try:
        wanted = desired_streams(replicas=1, duplicate_window=120, max_msg_size=300_000)[0]
        assert wanted.republish == RePublish(src="collab.events.>", dest="collab.live.>")
        wanted.name, wanted.subjects = name, [f"{name.lower()}.>"]
        republish, wanted.republish = RePublish(src=f"{name.lower()}.>", dest=f"{name.lower()}_live.>"), None
        assert await ensure_streams(js, [wanted]) == []
        assert await ensure_streams(js, [wanted]) == []  # declaring again changes nothing

        wanted.duplicate_window = 3600
        with caplog.at_level(logging.WARNING, logger="collabbus.streams"):
            changes = await ensure_streams(js, [wanted])
        assert [(c.field, c.new) for c in changes] == [("duplicate_window", 3600)]
        assert "duplicate_window changed" in caplog.text
        assert (await js.stream_info(name)).config.duplicate_window == 3600

        # A log from before the live subjects gets them: what it stores from then on is republished.
        wanted.republish = republish
        with caplog.at_level(logging.WARNING, logger="collabbus.streams"):
            changes = await ensure_streams(js, [wanted])
        assert [(c.field, c.new) for c in changes] == [("republish", republish)]
        assert await ensure_streams(js, [wanted]) == []
        live = await nc.subscribe(f"{name.lower()}_live.>")
        ack = await js.publish(f"{name.lower()}.a.b", b"{}", headers={"Nats-Msg-Id": "m-1"})
        copy = await live.next_msg(timeout=5)
        assert copy.subject == f"{name.lower()}_live.a.b" and copy.headers is not None
        assert copy.headers["Nats-Sequence"] == str(ack.seq) and copy.headers["Nats-Stream"] == name
        assert copy.headers["Nats-Msg-Id"] == "m-1" and copy.data == b"{}"

        wanted.storage = StorageType.MEMORY
        with pytest.raises(StreamConfigError, match="storage"):
            await ensure_streams(js, [wanted])
    finally:
        await js.delete_stream(name)
        await nc.close()


async def test_the_log_refuses_deletes_and_purges(bus: Bus) -> None:
    from nats.js.errors import APIError

    with pytest.raises(APIError, match="purge not permitted"):
        await bus.js.purge_stream(EVENTS_STREAM)
    with pytest.raises(APIError, match="delete not permitted"):
        await bus.js.delete_msg(EVENTS_STREAM, 1)


def test_a_free_port_is_one_outbound_connections_are_not_given() -> None:
    """An outbound connection draws its local port from the ephemeral range: a server's port
    picked there could be taken between the pick and the server's bind."""
    from bus.server import _ephemeral_ports

    low, high = _ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= port < low for port in ports), (ports, low, high)
    assert len(ports) > 1  # picked at random, not one port for everyone
    for port in ports:  # each free to bind
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))


def test_processes_picking_ports_at_once_are_not_handed_the_same_one() -> None:
    """Test workers pick ports for servers they start a moment later: until a server listens, its
    port looks free to every other process. Three processes picking 400 each at once (from the
    10,000 below the ephemeral range, a common port among them is all but certain by chance)
    are handed none in common."""
    pick = "import json; from bus.server import free_port; print(json.dumps([free_port() for _ in range(400)]))"
    pickers = [subprocess.Popen([sys.executable, "-c", pick], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    picked = [json.loads(picker.communicate(timeout=60)[0]) for picker in pickers]
    assert all(len(set(ports)) == 400 for ports in picked)
    assert len(set().union(*picked)) == 1200


async def test_a_connection_that_stopped_reading_is_found_stale_and_reconnected(
    server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """nats-py stops reading a connection for good when the PONG of a flush that timed out comes
    late (a server stalled past the flush's timeout: nats-py flushes so itself after a reconnect):
    nothing arrives on it any more, though it looks connected. The bus's connections ping their
    server often enough to find that out and reconnect, reading again — with nats-py's own
    settings (a ping every 2 minutes, stale after the third unanswered) it took six minutes."""
    import os
    import signal

    import nats.errors

    from bus import connection

    monkeypatch.setattr(connection, "PING_INTERVAL", 1)  # stale after ~3 s rather than ~30
    options = connection.connect_options(Settings(data_dir=tmp_path, nats_url=server.url, nats_creds=server.bus_creds), "t")
    nc = await nats.connect(**options)
    other = await nats.connect(server.url, **server.connect_options())
    try:
        sub = await nc.subscribe("stale.test")
        await nc.flush()
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            await all_stopped(server.process.pid)  # (not at once: a thread may still answer the PING otherwise)
            with pytest.raises(nats.errors.TimeoutError):
                await nc.flush(timeout=1)
        finally:
            os.kill(server.process.pid, signal.SIGCONT)
        # The late PONG has ended nats-py's reading of the connection; the next message is read
        # only on the connection that replaces it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        received = None
        while received is None:
            assert loop.time() < deadline, "the connection still reads nothing"
            await other.publish("stale.test", b"after")
            try:
                received = await sub.next_msg(timeout=0.5)
            except nats.errors.TimeoutError:
                continue
        assert received.data == b"after"
    finally:
        await other.close()
        await nc.close()


async def test_the_bus_says_when_it_loses_nats_and_when_it_is_back(
    server: EmbeddedNats, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An operator reading the bus's log sees the connection go and come back (before, only the
    lease's renewals failing said anything); stopping the bus says neither."""
    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds))
    await bus.start(state=False)
    try:
        with caplog.at_level(logging.INFO, logger="collabbus.bus"):
            await server.astop()
            await server.astart()  # same port, same store
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20
            while not any("reconnected to NATS at 127.0.0.1" in r.getMessage() for r in caplog.records):
                assert loop.time() < deadline, caplog.text
                await asyncio.sleep(0.05)
        [lost] = [r for r in caplog.records if "lost the connection to NATS" in r.getMessage()]
        assert lost.levelno == logging.WARNING and server.url in lost.getMessage()
        caplog.clear()
    finally:
        await bus.stop()
    assert "lost the connection" not in caplog.text


async def test_the_bus_and_its_gatekeepers_connect_with_those_pings(bus: Bus) -> None:
    """The ping settings reach the connection FastStream's broker makes (the bus's and each
    gatekeeper process's), not only ``nats.connect``'s."""
    from bus.connection import MAX_OUTSTANDING_PINGS, PING_INTERVAL

    assert (bus.nc.options["ping_interval"], bus.nc.options["max_outstanding_pings"]) == (PING_INTERVAL, MAX_OUTSTANDING_PINGS)


@pytest.mark.parametrize("where", ["server", "account"])
async def test_a_nats_without_jetstream_is_named_at_once_not_waited_for(tmp_path: Path, where: str) -> None:
    """A bus starting waits while JetStream does not answer (a cluster electing), but not for a
    JetStream that is not there: not enabled on the server (nothing answers its API), or not for
    the account (JetStream answers so)."""
    port = free_port()
    config = tmp_path / "nats-server.conf"
    lines = [f'listen: "127.0.0.1:{port}"']
    if where == "account":  # JetStream on the server, not for the account the client is in
        lines += [f'jetstream {{ store_dir: "{tmp_path / "js"}" }}',
                  "accounts { A: { users: [{user: a, password: a}] } }"]
    config.write_text("\n".join(lines) + "\n")
    server = subprocess.Popen([str(find_binary()), "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"nats://a:a@127.0.0.1:{port}" if where == "account" else f"nats://127.0.0.1:{port}"
        for _ in range(100):
            try:
                nc = await nats.connect(url, allow_reconnect=False)
                break
            except Exception:
                await asyncio.sleep(0.05)
        try:
            expected = "not enabled on its server" if where == "server" else "not enabled for the bus's NATS account"
            with pytest.raises(JetStreamUnusable, match=expected):
                await asyncio.wait_for(wait_for_jetstream(nc.jetstream(timeout=2), [EVENTS_STREAM]), 10)
        finally:
            await nc.close()
    finally:
        server.terminate()
        server.wait()


async def test_a_start_that_meets_jetstream_not_answering_after_its_wait_waits_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """An election can begin after the start's wait for JetStream: the streams' declaration then
    meets a request unanswered, or the log answers the operator's joining `unavailable`. Each
    failed the start (exit 1); each now waits for JetStream again and is taken again — the
    streams made, the operator joined once. (The failures are injected once each, in front of
    the real calls: a cluster cannot be made to begin an election at that moment.)"""
    from nats.errors import TimeoutError as NatsTimeout

    import bus.runtime as runtime
    from bus.gate import Gate
    from bus.verdict import Problem, Verdict

    real_ensure, real_publish = runtime.ensure_streams, Gate.publish_internal
    met: list[str] = []

    async def ensure_once_unanswered(*args: object, **kwargs: object) -> object:
        if "streams" not in met:
            met.append("streams")
            raise NatsTimeout
        return await real_ensure(*args, **kwargs)  # type: ignore[arg-type]

    async def publish_once_unavailable(self: Gate, event: dict[str, object], *args: object, **kwargs: object) -> Verdict:
        if "operator" not in met:
            met.append("operator")
            return Verdict("rejected", str(event["id"]), reason="unavailable",
                           errors=(Problem((), "the log did not confirm it (nats: timeout)", "log_unavailable"),))
        return await real_publish(self, event, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "ensure_streams", ensure_once_unanswered)
    monkeypatch.setattr(Gate, "publish_internal", publish_once_unavailable)
    bus = Bus(embedded_settings(tmp_path, free_port(), operator="fi-operator"))
    caplog.set_level(logging.INFO, logger="collabbus")
    try:
        await asyncio.wait_for(bus.start(state=False), 60)
        assert met == ["streams", "operator"]
        said = [record.getMessage() for record in caplog.records if record.name == "collabbus.bus"]
        assert ("making the streams: JetStream stopped answering (no answer from JetStream (TimeoutError)); "
                "waiting for JetStream again") in said, said
        assert ("registering the network's operator: the log did not take the operator 'fi-operator''s joining "
                "(the log did not confirm it (nats: timeout)); waiting for JetStream again") in said, said
        info = await bus.js.stream_info(EVENTS_STREAM)
        assert info.state.messages == 1  # the operator's joining, once
        assert await bus.membership.kind_of("fi-operator") == "operator"
    finally:
        await bus.stop()


async def test_the_lease_and_consumers_meeting_jetstream_not_answering_as_they_start_wait_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The lease's bucket is looked up, and the read models' consumer and the webhooks' are made,
    as the bus starts (after the wait for JetStream): a request unanswered there — an election
    begun meanwhile — failed the start. Each now waits for JetStream again and is taken again,
    and the log is applied. (The failure is injected once for each, in front of the real request.)"""
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js import JetStreamContext
    from sqlalchemy import text

    real_add = JetStreamContext.add_consumer
    failed: list[str] = []

    async def add_once_unanswered(self: JetStreamContext, stream: str, config: object = None, **params: object) -> object:
        name = getattr(config, "durable_name", None)
        if name not in failed:
            failed.append(str(name))
            raise NatsTimeout
        return await real_add(self, stream, config, **params)  # type: ignore[arg-type]

    real_bucket = JetStreamContext.key_value

    async def bucket_once_unanswered(self: JetStreamContext, bucket: str) -> object:
        if "bucket" not in failed:
            failed.append("bucket")
            raise NatsTimeout
        return await real_bucket(self, bucket)

    monkeypatch.setattr(JetStreamContext, "add_consumer", add_once_unanswered)
    monkeypatch.setattr(JetStreamContext, "key_value", bucket_once_unanswered)
    bus = Bus(embedded_settings(tmp_path, free_port(), operator="fi-operator"))
    caplog.set_level(logging.INFO, logger="collabbus")
    try:
        await asyncio.wait_for(bus.start(), 60)
        assert failed == ["bucket", "network", "webhooks"], failed
        said = [record.getMessage() for record in caplog.records if record.name == "collabbus.bus"]
        for step in ("taking the lease by which one bus applies the log", "starting the read models' consumer",
                     "starting the webhooks' consumer"):
            assert (f"{step}: JetStream stopped answering (no answer from JetStream (TimeoutError)); "
                    "waiting for JetStream again") in said, said
        assert bus.lease is not None and bus.lease.held
        names = {info.name for info in await bus.js.consumers_info(EVENTS_STREAM)}
        assert {"network", "webhooks"} <= names, names
        assert bus.applied is not None and await bus.applied.wait_beyond(0, timeout=30)  # the operator's joining, applied
        with bus.engine.connect() as connection:
            assert connection.execute(text("SELECT id FROM institutions")).scalars().all() == ["fi-operator"]
    finally:
        await bus.stop()


async def test_a_bus_whose_nats_went_away_stops_cleanly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NATS gone while the bus runs (an external server stopped, the embedded one signalled with
    the bus by a service manager): stopping the bus then met nats-py's close on a socket already
    reset — "cannot reach NATS: Connection lost", exit 1 of a bus that was only asked to stop. Nor
    does it wait for the lease's deletion to time out (5 s): it goes stale."""
    nats_server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await nats_server.astart()
    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=nats_server.url, nats_creds=nats_server.bus_creds,
                       operator="fi-operator", http=f"127.0.0.1:{free_port()}"))  # type: ignore[call-arg]
    try:
        await bus.start()
        await bus.start_http()
    finally:
        await nats_server.astop()
    await asyncio.sleep(0.3)
    caplog.set_level(logging.INFO, logger="collabbus")
    await asyncio.wait_for(bus.stop(), 60)  # (raised ConnectionResetError)
    assert bus.http is None and bus.consumer is None
    said = [record.getMessage() for record in caplog.records if record.name == "collabbus.lease"]
    assert "lease network: not deleted, NATS being away: it goes stale in 5 s (at once for a bus started on this host)" in said, said
