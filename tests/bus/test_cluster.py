"""A bus on a replicated log: three nats-servers in a cluster, ``COLLABBUS_STREAM_REPLICAS=3``
(README, Operations: the deployment a standby is for)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import nats
import orjson
import pytest
from nats.aio.client import Client
from sqlmodel import Session

from bus.client import offer
from bus.credentials import BUS_INBOX_PREFIX, Authority, member_inbox_prefix
from bus.runtime import Bus
from bus.server import free_port
from bus.streams import DLQ_STREAM, EVENTS_STREAM, LIVE_PREFIX
from handlers.tokens import issue
from ops.settings import Settings
from ops.tracing import Tracing
from tests.cluster import NatsCluster
from tests.commands import Command, acollabbus, collabbus, spawn
from tests.conftest import OPERATOR, join, samples, unique

MEMBER = "fi-cluster-member"
LEASES = "KV_collabbus_buses"


async def offered(bus: Bus, project_id: str, member: str = MEMBER) -> int:
    """Register a project, offering it again (the same id) while the log answers that it is
    unavailable — a stream electing its leader — as a partner does; returns its place in the log."""
    event = {
        "specversion": "1.0", "id": f"register-{project_id}", "source": f"/institutions/{member}",
        "type": "project.registered", "subject": project_id,
        "data": {"project_id": project_id, "title": {"en": project_id}, "owner": member, "status": "active"},
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        verdict = await offer(bus.nc, member, event, timeout=5)
        if verdict.accepted:
            assert verdict.seq is not None
            return verdict.seq
        assert verdict.reason == "unavailable", verdict.as_dict()
        assert loop.time() < deadline, f"the log stayed unavailable: {verdict.as_dict()}"
        await asyncio.sleep(0.25)


async def caught_up(bus: Bus, node: str) -> None:
    """Until ``node`` is a current replica of the log and of the leases' bucket again."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    for stream in (EVENTS_STREAM, LEASES):
        while True:
            replicas = (await bus.js.stream_info(stream)).cluster.replicas or []  # type: ignore[union-attr]
            if any(peer.name == node and peer.current for peer in replicas):
                break
            assert loop.time() < deadline, f"{node} did not catch up on {stream}: {replicas}"
            await asyncio.sleep(0.2)


async def replicas_seen(client: httpx.AsyncClient, *, current: int, behind: list[str]) -> None:
    """Until ``/ops/status`` says the log has ``current`` copies online and caught up (``behind``
    naming the others), and ``/metrics`` says the same."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        status = await client.get("/ops/status")
        log = status.json()["streams"][EVENTS_STREAM] if status.status_code == 200 else {}
        metrics = (await client.get("/metrics")).text
        counted = f'collabbus_stream_replicas_current{{stream="{EVENTS_STREAM}"}} {float(current)}' in metrics
        if log.get("replicas_current") == current and log.get("replicas_behind") == behind and counted:
            assert log["replicas"] == 3 and f'collabbus_stream_replicas{{stream="{EVENTS_STREAM}"}} 3.0' in metrics
            return
        assert loop.time() < deadline, (status.text, [line for line in metrics.splitlines() if "replicas" in line])
        await asyncio.sleep(0.3)


def status_table(bus: Bus) -> str:
    """What ``collabbus status`` prints of the bus's streams."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(bus.settings.data_dir), "COLLABBUS_NATS_URL": bus.settings.nats_url or "",
           "COLLABBUS_STREAM_REPLICAS": "3", "COLLABBUS_OPERATOR": OPERATOR, "COLUMNS": "200"}
    done = collabbus("status", env=env)
    return done.stdout + done.stderr


async def applied(bus: Bus, seq: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while (await asyncio.to_thread(bus.service.position)) < seq:
        assert loop.time() < deadline, f"#{seq} was not applied"
        await asyncio.sleep(0.1)


async def listed(client: httpx.AsyncClient, token: str) -> list[dict[str, Any]]:
    """Every project registration in the log, page by page over ``GET /events``."""
    items: list[dict[str, Any]] = []
    after = 0
    while True:
        page = await client.get("/events", params={"type": "project.registered", "after_seq": after, "limit": 7},
                                headers={"Authorization": f"Bearer {token}"})
        assert page.status_code == 200, page.text
        body = page.json()
        items += body["items"]
        if body["next_cursor"] is None:
            return items
        after = int(body["next_cursor"])


@contextlib.asynccontextmanager
async def bus_on_a_cluster(tmp_path: Path) -> AsyncIterator[tuple[NatsCluster, Bus]]:
    """Three nodes, and a bus on them whose streams have three replicas, its gateway serving; both
    stopped after (the cluster even when the bus's stop fails)."""
    cluster = NatsCluster(tmp_path / "cluster")
    try:
        await cluster.start()
        bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=cluster.urls, stream_replicas=3, operator=OPERATOR,
                           http=f"127.0.0.1:{free_port()}"), tracing=Tracing.off())
        try:
            await bus.start()
            await bus.start_http()
            yield cluster, bus
        finally:
            await bus.stop()
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
async def test_a_bus_on_a_three_node_cluster_keeps_its_log_and_its_lease_through_the_loss_of_their_leaders(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    async with bus_on_a_cluster(tmp_path) as (cluster, bus):
        assert bus.http is not None and bus.engine is not None
        for stream in (EVENTS_STREAM, DLQ_STREAM, LEASES):
            info = await bus.js.stream_info(stream)
            assert info.config.num_replicas == 3 and info.cluster is not None
            assert len(info.cluster.replicas or []) == 2, info.cluster
        await join(bus.nc, MEMBER, "ngo")
        with Session(bus.engine) as session:
            token = issue(session, MEMBER)
            session.commit()
        before = [await offered(bus, unique("p")) for _ in range(10)]
        await applied(bus, before[-1])

        leader = (await bus.js.stream_info(EVENTS_STREAM)).cluster.leader  # type: ignore[union-attr]
        assert leader is not None
        cluster.kill(cluster.node(leader))  # the log's leader, and with it maybe the bus's own connection
        after = [await offered(bus, unique("p")) for _ in range(10)]
        await applied(bus, after[-1])

        info = await bus.js.stream_info(EVENTS_STREAM)
        assert info.cluster is not None and info.cluster.leader not in (None, leader)
        # The operator sees the copy that is gone: in the status, its table and the metrics.
        with Session(bus.engine) as session:
            operator = issue(session, OPERATOR)
            session.commit()
        async with httpx.AsyncClient(base_url=bus.http.url, timeout=30, headers={"Authorization": f"Bearer {operator}"}) as client:
            await replicas_seen(client, current=2, behind=[leader])
        shown = await asyncio.to_thread(status_table, bus)
        assert f"2 of 3 current ({leader} behind)" in shown, shown

        # The lost node comes back and catches up; then the node leading the bucket of the buses'
        # leases goes: the bus's renewals fail until another leads it, and the bus keeps its lease.
        cluster.start_node(cluster.node(leader))
        await caught_up(bus, leader)
        async with httpx.AsyncClient(base_url=bus.http.url, timeout=30, headers={"Authorization": f"Bearer {operator}"}) as client:
            await replicas_seen(client, current=3, behind=[])
        lease_leader = (await bus.js.stream_info(LEASES)).cluster.leader  # type: ignore[union-attr]
        assert lease_leader is not None
        with caplog.at_level(logging.WARNING, logger="collabbus.lease"):
            cluster.kill(cluster.node(lease_leader))
            after += [await offered(bus, unique("p")) for _ in range(10)]
            await applied(bus, after[-1])

            def said() -> list[str]:
                return [line for record in caplog.records if record.name == "collabbus.lease"
                        and ("could not renew it" in (line := record.getMessage()) or "renewed again" in line)]

            # A spell of failed renewals may still be going on once the events are applied (a loaded
            # machine's election takes longer): its end is waited for, as the bus goes on renewing.
            deadline = time.monotonic() + 30
            while len(said()) % 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        assert not bus.lost_lease.is_set() and bus.lease is not None
        # The renewals that failed meanwhile (one a second, while the bucket elects), if any did, are
        # said once, and their end.
        lines = said()
        assert all(("could not renew it" in line) == (i % 2 == 0) for i, line in enumerate(lines)), lines
        assert len(lines) % 2 == 0, lines  # (each spell ended)
        # A member admitted now is known to the gate (it learns members from the log's copies).
        newcomer = unique("fi-new").lower()
        await join(bus.nc, newcomer, "ngo")
        after.append(await offered(bus, unique("p"), newcomer))
        await applied(bus, after[-1])
        async with httpx.AsyncClient(base_url=bus.http.url, timeout=30) as client:
            items = await listed(client, token)
            assert [item["seq"] for item in items] == before + after  # every one, once each, in the log's order
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30
            while (ready := await client.get("/readyz")).status_code != 200:  # (JetStream's API answers once the
                assert loop.time() < deadline, ready.text                     # cluster has its meta leader again)
                await asyncio.sleep(0.2)
            project = await client.get(f"/projects/{items[-1]['event']['subject']}", headers={"Authorization": f"Bearer {token}"})
            assert project.status_code == 200 and project.json()["owner"] == newcomer


@pytest.mark.timeout(240)
async def test_a_standby_waits_on_through_the_loss_of_the_lease_buckets_leader_and_takes_over_when_the_bus_goes(
    tmp_path: Path,
) -> None:
    """Two buses on the cluster and one database, the second waiting to take over. The node
    leading the leases' bucket goes: for seconds nobody can read or write the lease. The standby
    keeps waiting (it gave up with the bucket's first error), and does not take the time it could
    not look for time the bus did not renew: once the bucket answers again the bus renews and
    keeps the log. When the bus stops, the standby takes over."""
    cluster = NatsCluster(tmp_path / "cluster")
    await cluster.start()
    common: dict[str, Any] = {"nats_url": cluster.urls, "stream_replicas": 3, "operator": OPERATOR,
                              "database_url": f"sqlite:///{tmp_path / 'shared.db'}"}
    first = Bus(Settings(data_dir=tmp_path / "first", http=f"127.0.0.1:{free_port()}", **common), tracing=Tracing.off())
    second = Bus(Settings(data_dir=tmp_path / "second", http=f"127.0.0.1:{free_port()}", **common), tracing=Tracing.off())
    waiting: asyncio.Task[None] | None = None
    try:
        await first.start()
        await second.start(state=False)
        waiting = asyncio.create_task(second.take_lease(patience=None))
        await asyncio.sleep(1.5)
        assert not waiting.done()
        lease_leader = (await first.js.stream_info(LEASES)).cluster.leader  # type: ignore[union-attr]
        assert lease_leader is not None
        cluster.kill(cluster.node(lease_leader))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while first.lease is None or not first.lease.fresh or loop.time() < deadline - 50:  # (10 s at least)
            assert not waiting.done(), waiting.exception() if not waiting.cancelled() else "cancelled"
            assert loop.time() < deadline, "the bus did not renew its lease again"
            await asyncio.sleep(0.2)
        assert not first.lost_lease.is_set() and not waiting.done()
        await first.stop()  # (gives the lease up)
        await asyncio.wait_for(waiting, 30)
        assert second.lease is not None and second.lease.held
    finally:
        if waiting is not None and not waiting.done():
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
        try:
            await second.stop()
            await first.stop()
        finally:
            cluster.stop()


@pytest.mark.timeout(240)
async def test_without_a_quorum_the_gateway_answers_reads_of_the_log_503_and_serves_the_read_models(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Two nodes of three lost: the log has no leader until one is back. A partner reading it over
    HTTP is told to retry (503 `unavailable`, `Retry-After`: it was a 500 `internal_error`), the
    read models still answer, and once the cluster is whole the log is read again."""
    async with bus_on_a_cluster(tmp_path) as (cluster, bus):
        assert bus.http is not None and bus.engine is not None
        await join(bus.nc, MEMBER, "ngo")
        with Session(bus.engine) as session:
            token = issue(session, MEMBER)
            session.commit()
        project = unique("p")
        await applied(bus, await offered(bus, project))
        # The log's leader and one node more: the one left cannot be elected (a leader left alone
        # would go on answering reads from its copy).
        leader = (await bus.js.stream_info(EVENTS_STREAM)).cluster.leader  # type: ignore[union-attr]
        lost = [cluster.node(str(leader)), next(node for node in cluster.nodes if node.name != leader)]
        for node in lost:
            cluster.kill(node)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:  # until the log has no leader
            try:
                await bus.nc.jetstream(timeout=1).stream_info(EVENTS_STREAM)
            except Exception:
                break
            assert loop.time() < deadline, "the log kept its leader without a quorum"
            await asyncio.sleep(0.2)
        with caplog.at_level(logging.WARNING, logger="collabbus.gate"):
            for _ in range(3):  # a partner's offers over NATS, refused for now: the gate says so once
                away = unique("p")
                event = {"specversion": "1.0", "id": f"while-away-{away}", "source": f"/institutions/{MEMBER}",
                         "type": "project.registered", "subject": away,
                         "data": {"project_id": away, "title": {"en": away}, "owner": MEMBER, "status": "active"}}
                verdict = await offer(bus.nc, MEMBER, event, timeout=10)
                assert verdict.reason == "unavailable", verdict.as_dict()
            # One not cached (it joined through another bus, say): the gate looks it up in the log, which does not answer.
            stranger = unique("fi-stranger").lower()
            verdict = await offer(bus.nc, stranger, {**event, "id": unique("stranger"), "source": f"/institutions/{stranger}"},
                                  timeout=15)
            assert verdict.reason == "unavailable" and verdict.errors[0].type == "log_unavailable", verdict.as_dict()
            assert "the event log did not answer" in verdict.errors[0].msg
        said = [record.getMessage() for record in caplog.records if record.name == "collabbus.gate"]
        assert len(said) == 1 and said[0].startswith("the log does not answer (") and "; while-away-" in said[0], said
        async with httpx.AsyncClient(base_url=bus.http.url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as client:
            for path in ("/events?type=project.registered", f"/events/register-{project}"):
                answer = await client.get(path)
                assert answer.status_code == 503, (path, answer.text)
                problem = answer.json()
                assert problem["type"] == "urn:collabbus:problem:unavailable" and answer.headers["Retry-After"] == "2"
                assert "the event log does not answer just now" in problem["detail"], problem
                assert problem["errors"][0]["type"] == "log_unavailable"
            assert (await client.get(f"/projects/{project}")).status_code == 200
            for node in lost:
                cluster.start_node(node)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while (answer := await client.get(f"/events/register-{project}")).status_code != 200:
                assert answer.status_code == 503 and loop.time() < deadline, answer.text
                await asyncio.sleep(0.5)
            assert answer.json()["event"]["subject"] == project
        with caplog.at_level(logging.WARNING, logger="collabbus.gate"):
            await offered(bus, unique("p"))
        # (as many as reached the gate: an offer sent as the bus's connection was moving to another node may be lost)
        assert any(record.getMessage().startswith("the log answers offers again (offers answered unavailable ")
                   and " once " not in record.getMessage() for record in caplog.records), caplog.text


@pytest.mark.timeout(240)
async def test_a_bus_making_its_streams_waits_for_servers_enough_for_their_replicas(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Two nodes of three up: the cluster has its quorum and JetStream answers, but a stream with
    three replicas cannot be placed ("no suitable peers", as when nodes are still joining after a
    restart). The bus's start waited for JetStream and then failed on that; it waits for the
    servers, saying so, and makes its streams once the third is up."""
    cluster = NatsCluster(tmp_path / "cluster")
    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=cluster.urls, stream_replicas=3, operator=OPERATOR,
                       http=f"127.0.0.1:{free_port()}"), tracing=Tracing.off())
    starting: asyncio.Task[None] | None = None
    try:
        for node in cluster.nodes[:2]:
            cluster.start_node(node)
        for node in cluster.nodes[:2]:
            await cluster.serving(node)
        with caplog.at_level(logging.INFO, logger="collabbus.streams"):
            starting = asyncio.create_task(bus.start(ingress=False, state=False))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not any("waiting for servers for its 3 replicas" in r.getMessage() for r in caplog.records):
                assert not starting.done(), starting.exception() if not starting.cancelled() else "cancelled"
                assert loop.time() < deadline, caplog.text
                await asyncio.sleep(0.1)
            cluster.start_node(cluster.nodes[2])
            await asyncio.wait_for(starting, 60)
        for stream in (EVENTS_STREAM, DLQ_STREAM):
            assert (await bus.js.stream_info(stream)).config.num_replicas == 3
        assert any(r.getMessage().startswith(f"stream {EVENTS_STREAM}: placed (after ") for r in caplog.records), caplog.text
    finally:
        if starting is not None and not starting.done():
            starting.cancel()
        try:
            await bus.stop()
        finally:
            cluster.stop()


_UNREAD: dict[int, bytes] = {}
"""What :func:`said` read of a process's standard error past the line it waited for, by pid."""


def said(process: Command, wanted: str, timeout: float = 60) -> str:
    """What ``process`` wrote on standard error up to the line containing ``wanted``. Read from the
    pipe itself: a buffered ``readline`` can hold the line wanted where ``select`` does not see it."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    seen = _UNREAD.pop(process.pid, b"")
    until = time.monotonic() + timeout
    while (end := seen.find(wanted.encode())) < 0:
        left = until - time.monotonic()
        assert left > 0, f"{wanted!r} not said within {timeout} s: {seen.decode(errors='replace')}"
        if select.select([fd], [], [], min(left, 0.5))[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"exited with {process.wait(10)}: {seen.decode(errors='replace')}"
            seen += chunk
    line_end = seen.find(b"\n", end)
    cut = len(seen) if line_end < 0 else line_end + 1
    _UNREAD[process.pid] = seen[cut:]
    return seen[:cut].decode(errors="replace")


@pytest.mark.timeout(240)
async def test_collabbus_up_on_a_cluster_without_a_quorum_waits_for_it_and_stops_on_ctrl_c_meanwhile(tmp_path: Path) -> None:
    """Nodes restarted together, or one left alone: JetStream answers nothing until the cluster has
    elected its leaders. `collabbus up` waits for them, saying so — it exited on the first
    unanswered request ("nats: timeout") — and stops on Ctrl-C while it waits; its HTTP address
    answers meanwhile (nothing listened there), alive and not ready, saying what the start waits
    for. The commands an operator runs then say what they met, in a line (some printed a traceback)."""
    cluster = NatsCluster(tmp_path / "cluster")
    first, *others = cluster.nodes
    cluster.start_node(first)  # one of three: no quorum, no JetStream
    await cluster.serving(first)
    http = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_NATS_URL": first.url,
           "COLLABBUS_STREAM_REPLICAS": "3", "COLLABBUS_OPERATOR": OPERATOR, "COLLABBUS_HTTP": http,
           "COLLABBUS_GATE_PROCESSES": "0"}
    try:
        up = spawn("up", env=env)
        try:
            said(up, "waiting for JetStream")
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=30) == 0
            assert up.stderr is not None and "stopped" in _UNREAD.pop(up.pid, b"").decode() + up.stderr.read()
        finally:
            up.kill()
            up.wait()
        for command in (["status", "--json"], ["dlq", "list"], ["tail", "--since", "all", "--no-follow"]):
            done = await acollabbus(*command, env={**env, "COLUMNS": "300"})
            assert done.returncode == 1 and "Traceback" not in done.stderr, (command, done.stderr)
            assert "error: " in done.stderr and "a cluster electing its leaders" in done.stderr, (command, done.stderr)
            if command[0] == "status":  # (a script reads why)
                assert "try again in a few seconds" in json.loads(done.stdout)["error"]

        up = spawn("up", env=env)
        try:
            said(up, "waiting for JetStream")
            async with httpx.AsyncClient(base_url=f"http://{http}", timeout=30) as client:
                # Its address answers meanwhile: alive for a supervisor, not ready and saying why, the API 503.
                assert (await client.get("/healthz")).json() == {"status": "ok"}
                waiting = await client.get("/readyz")
                assert waiting.status_code == 503 and waiting.json()["status"] == "starting", waiting.text
                assert waiting.json()["checks"]["nats"] == "ok", waiting.text
                assert waiting.json()["checks"]["start"].startswith("waiting for JetStream: "), waiting.text
                elsewhere = await client.get("/projects")
                assert elsewhere.status_code == 503 and elsewhere.headers["retry-after"] == "2", elsewhere.text
                assert elsewhere.json()["type"] == "urn:collabbus:problem:unavailable", elsewhere.text
                assert "the bus is starting (waiting for JetStream: " in elsewhere.json()["detail"], elsewhere.text
                # A Prometheus target that is up, saying the bus starts (the log's series come once it runs).
                scraped = await client.get("/metrics")
                assert scraped.status_code == 200, scraped.text
                assert samples(scraped.text, "collabbus_state") == {"starting": 1, "standby": 0, "running": 0}
                assert samples(scraped.text, "collabbus_nats_connected") == {"": 1}
                assert samples(scraped.text, "process_resident_memory_bytes")[""] > 0
                assert "collabbus_consumer_lag" not in scraped.text
                for node in others:
                    cluster.start_node(node)
                shown = said(up, "is up")
                assert "JetStream answers" in shown and "Traceback" not in shown, shown
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.text
                running = (await client.get("/metrics")).text
                assert samples(running, "collabbus_state") == {"starting": 0, "standby": 0, "running": 1}
                assert samples(running, "collabbus_consumer_lag")["network"] == 0
            nc = await nats.connect([node.url for node in cluster.nodes])
            try:
                info = await nc.jetstream().stream_info(EVENTS_STREAM)
                assert info.config.num_replicas == 3 and info.state.messages == 1  # the operator's joining
            finally:
                await nc.close()
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=60) == 0
        finally:
            up.kill()
            up.wait()
    finally:
        cluster.stop()


@pytest.mark.timeout(240)
async def test_on_a_cluster_with_the_networks_trust_chain_a_members_credentials_work_through_every_node(tmp_path: Path) -> None:
    """The README's external deployment with authentication: each node of the cluster trusts the
    operator and the account (the lines the embedded server carries, `Authority.server_config`);
    `collabbus up` connects with the bus's credentials, `institutions creds` signs a member's with
    the account's seed (`COLLABBUS_NATS_ACCOUNT_SEED`), and the member offers as itself through
    any node and follows the log live on another; offering as another member is refused by the
    server, whichever node it reaches."""
    authority = Authority.load_or_create(tmp_path / "auth")
    bus_creds: dict[str, object] = {"user_credentials": str(authority.bus_creds), "inbox_prefix": BUS_INBOX_PREFIX}
    cluster = NatsCluster(tmp_path / "cluster", trust=authority.server_config(), connect=bus_creds)
    await cluster.start()
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_NATS_URL": cluster.urls,
           "COLLABBUS_NATS_CREDS": str(authority.bus_creds), "COLLABBUS_NATS_ACCOUNT_SEED": str(authority.account_seed_path),
           "COLLABBUS_STREAM_REPLICAS": "3", "COLLABBUS_OPERATOR": OPERATOR, "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}",
           "COLLABBUS_GATE_PROCESSES": "0"}
    up = spawn("up", env=env)
    operator: Client | None = None
    try:
        said(up, "is up")
        operator = await nats.connect([node.url for node in cluster.nodes], **bus_creds)  # type: ignore[arg-type]
        member = unique("fi-trusted").lower()
        await join(operator, member, "ngo")
        creds = tmp_path / "member.creds"
        issued = await acollabbus("institutions", "creds", member, "--output", str(creds), env=env)
        assert issued.returncode == 0, issued.stderr

        async def connect(node: Any, errors: list[Exception]) -> Client:
            async def record(exc: Exception) -> None:
                errors.append(exc)
            return await nats.connect(node.url, user_credentials=str(creds), inbox_prefix=member_inbox_prefix(member),
                                      allow_reconnect=False, error_cb=record)

        errors: list[Exception] = []
        follower = await connect(cluster.nodes[-1], errors)
        live = await follower.subscribe(f"{LIVE_PREFIX}.{member}.project.registered.>")
        try:
            for node in cluster.nodes:
                client = await connect(node, errors)
                try:
                    project = unique("p")
                    event = {"specversion": "1.0", "id": f"register-{project}", "source": f"/institutions/{member}",
                             "type": "project.registered", "subject": project,
                             "data": {"project_id": project, "title": {"en": project}, "owner": member, "status": "active"}}
                    verdict = await offer(client, member, event, timeout=10)
                    assert verdict.accepted, (node.name, verdict.as_dict())
                    seen = await live.next_msg(timeout=10)  # (republished by the log's leader, read on the last node)
                    assert orjson.loads(seen.data)["id"] == event["id"]
                    impostor = await offer(client, OPERATOR, {**event, "id": unique("as-operator")}, timeout=2)
                    assert not impostor.accepted
                finally:
                    await client.close()
            assert sum("permissions violation" in str(error).lower() for error in errors) >= len(cluster.nodes), errors
        finally:
            await follower.close()
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=60) == 0
    finally:
        if operator is not None:
            await operator.close()
        up.kill()
        up.wait()
        cluster.stop()
