"""The network consumer against a real nats-server: exactly-once application, retries, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import time
from datetime import datetime, timezone
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import sqlalchemy as sa
from nats.aio.client import Client
from sqlmodel import Session, select

from bus.client import offer
from bus.consumer import Consumer, ConsumerSettings, ensure_consumer
from bus.deadletters import DLQ_CONSUMER, DLQ_DELIVERIES, DLQ_ERROR, DLQ_STREAM_SEQ
from bus.runtime import Bus
from bus.server import EmbeddedNats
from bus.streams import DLQ_STREAM, EVENTS_STREAM
from handlers.bookkeeping import AppliedEvent
from handlers.network import Event, Network, Routes
from ops.settings import Settings
from tests.conftest import join, load_fixtures, unique

FIXTURE = load_fixtures()["project.registered"]


def project_event(project_id: str) -> dict[str, Any]:
    event = copy.deepcopy(FIXTURE["event"])
    event["id"] = unique("ev")
    event["subject"] = project_id
    event["data"]["project_id"] = project_id
    return event


class Recorder:
    """A projection that records what it saw and raises for the poison project (a test seam)."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.poison: set[str] = set()
        self.attempts: dict[str, int] = {}

    def __call__(self, session: Session, event: Event[Any]) -> None:
        self.attempts[event.id] = self.attempts.get(event.id, 0) + 1
        if event.subject in self.poison:
            raise RuntimeError(f"cannot apply {event.subject}")
        self.seen.append(event.subject)


async def start_bus(tmp: Path, server: EmbeddedNats, factory: Callable[[], Network], **consumer: Any) -> Bus:
    bus = Bus(
        Settings(data_dir=tmp, nats_url=server.url, nats_creds=server.bus_creds),
        network_factory=factory,
        consumer_settings=ConsumerSettings("network", **consumer),
    )
    await bus.start()
    return bus


def recording(recorder: Recorder) -> Callable[[], Network]:
    """A network factory whose one projection, of ``project.registered``, is ``recorder``."""
    return lambda: Network(Routes().add(projections={"project.registered": recorder}))


@contextlib.asynccontextmanager
async def recording_bus(tmp: Path, server: EmbeddedNats, **consumer: Any) -> AsyncIterator[tuple[Bus, Client, Recorder]]:
    """A bus projecting ``project.registered`` into a :class:`Recorder`, and a connection to its
    NATS on which the fixture's member has joined; both closed after the block."""
    recorder = Recorder()
    bus = await start_bus(tmp, server, recording(recorder), **consumer)
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        yield bus, nc, recorder
    finally:
        await nc.close()
        await bus.stop()


async def wait_for(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out waiting"
        await asyncio.sleep(0.05)


async def test_a_second_bus_does_not_take_the_consumer_another_applies(tmp_path: Path, server: EmbeddedNats) -> None:
    """One bus applies the log: a second one on the same NATS (a data dir and read models of its
    own) refuses to start its consumers, naming why, and leaves the first one's consumer alone —
    which goes on applying; once the first has stopped, the second starts."""
    from bus.lease import LogHeld

    async with recording_bus(tmp_path / "first", server) as (first, nc, recorder):
        created = (await first.js.consumer_info(EVENTS_STREAM, "network")).created
        second_recorder = Recorder()
        second = Bus(Settings(data_dir=tmp_path / "second", nats_url=server.url, nats_creds=server.bus_creds),
                     network_factory=recording(second_recorder), consumer_settings=ConsumerSettings("network", claim_patience=1.0))
        with pytest.raises(LogHeld, match="applies the log \\(its 'network' consumer on this NATS\\)") as refused:
            await second.start()
        assert "collabbus gate" in str(refused.value) and "--standby" in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value) and str((tmp_path / "first").resolve()) in str(refused.value)
        await second.stop()
        assert (await first.js.consumer_info(EVENTS_STREAM, "network")).created == created  # not made again under it
        event = project_event("after-the-refusal")
        assert (await offer(nc, FIXTURE["as"], event)).accepted
        await wait_for(lambda: "after-the-refusal" in recorder.seen)
        assert second_recorder.seen == []

    started = time.monotonic()
    second = await start_bus(tmp_path / "second", server, recording(second_recorder), claim_patience=1.0)
    try:
        assert time.monotonic() - started < 10  # the first one's pull request went with its connection
        await wait_for(lambda: "after-the-refusal" in second_recorder.seen)  # it carries on with the whole log
    finally:
        await second.stop()


async def test_what_a_stopped_consumer_left_unacknowledged_does_not_hold_its_successor_back(server: EmbeddedNats) -> None:
    """A process pulling from a consumer holds it (its request waits on the server); once its
    connection is gone, the messages it left unacknowledged (a killed bus's) do not."""
    from nats.js.api import AckPolicy, ConsumerConfig

    from bus.consumer import ConsumerBusy, claim_consumer

    nc = await nats.connect(server.url, **server.connect_options())
    puller = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        await js.add_stream(name="CLAIMED", subjects=["claimed.>"])
        await claim_consumer(js, "CLAIMED", "gone", patience=0.5)  # no such consumer yet: free
        await js.add_consumer("CLAIMED", ConsumerConfig(durable_name="held", ack_policy=AckPolicy.EXPLICIT))
        for n in range(5):
            await js.publish(f"claimed.{n}", b"{}")
        await claim_consumer(js, "CLAIMED", "held", patience=0.5)  # nobody pulls
        inbox = puller.new_inbox()
        got = await puller.subscribe(inbox)
        await puller.publish("$JS.API.CONSUMER.MSG.NEXT.CLAIMED.held", b'{"batch": 10, "expires": 30000000000}', reply=inbox)
        for _ in range(5):
            await got.next_msg(timeout=5)  # delivered, never acknowledged; the request waits for 5 more
        with pytest.raises(ConsumerBusy, match="'held'"):
            await claim_consumer(js, "CLAIMED", "held", patience=0.5)
        await puller.close()  # the process ends: its connection closes with it
        started = time.monotonic()
        await claim_consumer(js, "CLAIMED", "held", patience=5.0)
        assert time.monotonic() - started < 2.0
        assert (await js.consumer_info("CLAIMED", "held")).num_ack_pending == 5  # left as they were
    finally:
        await puller.close()
        await nc.close()


async def test_a_poison_event_is_dead_lettered_and_the_rest_flow(tmp_path: Path, server: EmbeddedNats) -> None:
    recorder = Recorder()
    recorder.poison.add("poison-project")
    bus = await start_bus(tmp_path, server, recording(recorder),
                          max_deliver=3, backoff=(0.05, 0.1))
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        before, poison, after = project_event("before-1"), project_event("poison-project"), project_event("after-1")
        seqs = {}
        for event in (before, poison, after):
            verdict = await offer(nc, FIXTURE["as"], event)
            assert verdict.accepted
            seqs[event["id"]] = verdict.seq
        await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
        await wait_for(lambda: "after-1" in recorder.seen)
        # The batch is rolled back when the poison fails, and the event before it applied again
        # (projections are transactional); what was committed is checked below.
        assert list(dict.fromkeys(recorder.seen)) == ["before-1", "after-1"]
        assert recorder.attempts[poison["id"]] == 3  # max_deliver deliveries, then the dead-letter queue

        msg = await bus.js.get_last_msg(DLQ_STREAM, "collab.dlq.network")
        assert msg.headers is not None
        assert msg.headers[DLQ_ERROR] == "RuntimeError"
        assert "cannot apply poison-project" in msg.headers["Collabbus-Error-Detail"]
        assert msg.headers[DLQ_CONSUMER] == "network"
        assert msg.headers[DLQ_DELIVERIES] == "3"
        assert msg.headers[DLQ_STREAM_SEQ] == str(seqs[poison["id"]])
        assert msg.headers["Collabbus-Original-Subject"].endswith(".project.registered.poison-project")
        assert msg.data == (await bus.js.get_msg(EVENTS_STREAM, seqs[poison["id"]])).data

        with Session(bus.engine) as session:
            applied = set(session.exec(select(AppliedEvent.event_id)).all())
        assert before["id"] in applied and after["id"] in applied and poison["id"] not in applied
        info = await bus.js.consumer_info(EVENTS_STREAM, "network")
        assert info.num_pending == 0 and info.num_ack_pending == 0
    finally:
        await nc.close()
        await bus.stop()


async def test_redelivery_and_restart_apply_each_event_once(tmp_path: Path, server: EmbeddedNats) -> None:
    recorder = Recorder()
    factory = recording(recorder)
    bus = await start_bus(tmp_path, server, factory)
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        events = [project_event(f"p-{i}") for i in range(20)]
        for event in events[:10]:
            assert (await offer(nc, FIXTURE["as"], event)).accepted
        await wait_for(lambda: len(recorder.seen) == 10)
        await bus.stop()
        bus = await start_bus(tmp_path, server, factory)
        for event in events[10:] + events[:3]:  # the first three again: duplicates
            assert (await offer(nc, FIXTURE["as"], event)).accepted
        await wait_for(lambda: len(recorder.seen) == 20)
        await asyncio.sleep(0.3)
        assert sorted(recorder.seen) == sorted(e["subject"] for e in events)
    finally:
        await nc.close()
        await bus.stop()


async def test_consumer_settings_are_owned(server: EmbeddedNats) -> None:
    nc = await nats.connect(server.url, **server.connect_options())
    js = nc.jetstream()
    try:
        bus_settings = Settings(nats_url=server.url, nats_creds=server.bus_creds)
        from bus.streams import desired_streams, ensure_streams

        await ensure_streams(js, desired_streams(replicas=1, duplicate_window=60, max_msg_size=300_000))
        assert await ensure_consumer(js, ConsumerSettings("owned", max_deliver=5)) == []
        assert await ensure_consumer(js, ConsumerSettings("owned", max_deliver=5)) == []
        assert await ensure_consumer(js, ConsumerSettings("owned", max_deliver=9)) == ["max_deliver"]
        assert (await js.consumer_info(EVENTS_STREAM, "owned")).config.max_deliver == 9
        # A consumer made with an earlier ack policy (the server cannot update that one) is made again.
        from nats.js.api import AckPolicy

        old = ConsumerSettings("earlier").config()
        old.ack_policy = AckPolicy.EXPLICIT
        await js.add_consumer(EVENTS_STREAM, old)
        assert await ensure_consumer(js, ConsumerSettings("earlier")) == ["ack_policy"]
        assert (await js.consumer_info(EVENTS_STREAM, "earlier")).config.ack_policy == AckPolicy.ALL
        assert bus_settings.nats_servers == [server.url]
    finally:
        await nc.close()


async def test_a_consumer_stopped_behind_the_log_continues_in_order_and_applies_each_event_once(
    tmp_path: Path, server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    class Slow(Recorder):
        def __call__(self, session: Session, event: Event[Any]) -> None:
            time.sleep(0.02)  # applying a batch takes long enough for the next one to be read ahead
            super().__call__(session, event)

    recorder = Slow()
    factory = recording(recorder)
    bus = await start_bus(tmp_path, server, factory, batch=5)
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        events = [project_event(f"ahead-{i}") for i in range(40)]
        await asyncio.gather(*(offer(nc, FIXTURE["as"], event) for event in events))
        await wait_for(lambda: len(recorder.seen) >= 10)
        await bus.stop()  # behind the log, with a batch read ahead
        assert len(set(recorder.seen)) < 40
        caplog.set_level(logging.INFO, logger="collabbus.consumer")
        bus = await start_bus(tmp_path, server, factory, batch=5)
        await wait_for(lambda: len(set(recorder.seen)) == 40)
        # The next start continued from the database's position; nothing disagreed (no warning).
        continued = [r for r in caplog.records if r.name == "collabbus.consumer" and "continuing from" in r.getMessage()]
        assert continued and all(r.levelno == logging.INFO for r in continued)
        with Session(bus.engine) as session:
            applied = set(session.exec(select(AppliedEvent.event_id)).all())
        assert {event["id"] for event in events} <= applied
        assert sorted(recorder.seen) == sorted(event["subject"] for event in events)  # none projected twice
    finally:
        await nc.close()
        await bus.stop()


class Batches:
    """An applier that notes each batch's log sequences (the port ``bus.consumer.Applier``)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def take_position(self) -> None:
        pass

    def apply_batch(self, items: Any, *, live: bool = True, replay: bool = False) -> tuple[int, Any, int]:
        self.batches.append([item.seq for item in items])
        return len(items), None, 0

    def skip(self, seq: int, envelope: Any = None) -> None:
        raise AssertionError("nothing fails here")

    def position(self) -> int:
        return self.batches[-1][-1] if self.batches else 0


async def test_a_gathering_consumer_applies_a_trickle_in_few_batches_and_stopping_hands_back_what_it_gathers(
    server: EmbeddedNats,
) -> None:
    from nats.js.api import StreamConfig

    from bus.consumer import Consumer

    nc = await nats.connect(server.url, **server.connect_options())
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="GATHER", subjects=["gather.>"]))
        settings = ConsumerSettings("gathering", filter_subject="gather.>", batch=64)
        applier = Batches()
        consumer = Consumer(js, settings, applier, stream="GATHER", gather=0.6)
        await consumer.start()
        seqs = []
        for i in range(10):  # one every 20 ms: without gathering, a batch (a transaction) each
            seqs.append((await js.publish("gather.x", b"{}")).seq)
            await asyncio.sleep(0.02)
        await wait_for(lambda: sum(map(len, applier.batches)) == 10)
        assert [seq for batch in applier.batches for seq in batch] == seqs
        assert len(applier.batches) <= 3, applier.batches
        await wait_for(lambda: consumer.applied == 10)

        # Stopping while a batch is gathered: nothing of it is applied, and it is handed back at once.
        late = (await js.publish("gather.x", b"{}")).seq
        await asyncio.sleep(0.2)
        started = time.perf_counter()
        await consumer.stop()
        assert time.perf_counter() - started < 0.5
        assert [seq for batch in applier.batches for seq in batch] == seqs
        info = await js.consumer_info("GATHER", "gathering")
        assert late == seqs[-1] + 1 and info.ack_floor.stream_seq == seqs[-1]  # not acknowledged: applied on the next start
    finally:
        await nc.close()


async def test_a_stray_message_on_the_pull_inbox_or_a_fault_in_handling_does_not_stop_the_consumer(
    tmp_path: Path, server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        consumer = bus.consumer
        assert consumer is not None
        # Anything published to the consumer's pull inbox that the server did not deliver.
        inbox = consumer._puller._inbox
        await nc.publish(inbox, b'{"status": "accepted"}', reply="_INBOX.someone")
        await nc.publish(inbox, b"not even json")
        assert (await offer(nc, FIXTURE["as"], project_event("after-stray"))).accepted
        await wait_for(lambda: recorder.seen == ["after-stray"])
        assert consumer.running
        assert "not a JetStream delivery" in caplog.text

        # A fault of the consumer itself (not of an event): logged, and it continues from the database's position.
        handle = consumer.handle
        failed: list[int] = []

        async def faulty(msgs: Any) -> None:
            if not failed:
                failed.append(len(msgs))
                raise RuntimeError("a bug in the consumer")
            await handle(msgs)

        consumer.handle = faulty  # type: ignore[method-assign]
        events = [project_event(f"after-fault-{i}") for i in range(5)]
        for event in events:
            assert (await offer(nc, FIXTURE["as"], event)).accepted
        await wait_for(lambda: len(recorder.seen) == 6)
        await asyncio.sleep(0.3)
        assert failed and recorder.seen[1:] == [e["subject"] for e in events]  # each once, in log order
        assert consumer.running
        assert "could not be handled" in caplog.text and "a bug in the consumer" in caplog.text


async def test_a_rebuild_passes_what_is_no_event_as_the_consumer_does(tmp_path: Path, server: EmbeddedNats) -> None:
    """Something in the log that is not an event (written past the gate by a holder of the bus's
    own credentials) is dead-lettered live; a rebuild notes it, passes it, and ends with the same
    state and position."""
    from bus.rebuild import rebuild
    from handlers.service import NetworkService

    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        assert (await offer(nc, FIXTURE["as"], project_event("before-junk"))).accepted
        junk = await bus.js.publish(f"collab.events.{FIXTURE['as']}.project.registered.junk", b"not an event",
                                    headers={"Nats-Msg-Id": "junk-1"})
        after = await offer(nc, FIXTURE["as"], project_event("after-junk"))
        await wait_for(lambda: recorder.seen == ["before-junk", "after-junk"])
        assert bus.service is not None
        position = await asyncio.to_thread(bus.service.position)
        assert position == after.seq
        recorder.seen.clear()
        service = NetworkService(bus.engine, recording(recorder)())
        report = await rebuild(bus.js, service, connect={"servers": [server.url], **server.connect_options()})
        assert recorder.seen == ["before-junk", "after-junk"]
        assert [(f["seq"], f["id"]) for f in report.failures] == [(junk.seq, "junk-1")]
        assert "unreadable" in report.failures[0]["error"]
        assert await asyncio.to_thread(service.position) == position


async def test_a_rebuild_whose_log_reader_cannot_read_says_why(tmp_path: Path, server: EmbeddedNats) -> None:
    """The log is read by a process of its own: when it cannot read (here: NATS refuses its
    credentials), the rebuild fails with the reader's reason, the process is gone, and the
    garbage collector is on again."""
    import gc

    from bus.rebuild import LogReadError, rebuild
    from ops.bench import child_processes
    from handlers.service import NetworkService

    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        assert (await offer(nc, FIXTURE["as"], project_event("logged"))).accepted
        await wait_for(lambda: recorder.seen == ["logged"])
        service = NetworkService(bus.engine, recording(recorder)())
        with pytest.raises(LogReadError, match="reading the log failed: .*([Aa]uthorization|credentials)"):
            await rebuild(bus.js, service, connect={"servers": [server.url], "connect_timeout": 3})
        assert gc.isenabled()
        assert child_processes(os.getpid(), "reader_main") == []



async def test_a_database_that_cannot_be_written_holds_the_events_says_so_and_recovers(tmp_path: Path, server: EmbeddedNats) -> None:
    """A read models' file made read-only under a running bus: the events wait (they are not at
    fault, and were dead-lettered as if they were), /readyz says why, and once the file can be
    written again they are applied without a restart (SQLite keeps a connection read-only that it
    opened so: the bus opens new ones)."""
    import threading

    import httpx
    import sqlalchemy as sa
    from sqlalchemy import event as sa_event

    from bus.server import free_port

    recorder = Recorder()

    def writes(session: Session, event: Event[Any]) -> None:  # a handler whose statement writes (an autoflush, say)
        session.connection().execute(sa.text("DELETE FROM outbox WHERE event_id = 'none'"))
        recorder(session, event)

    port = free_port()
    bus = Bus(Settings(data_dir=tmp_path, nats_url=server.url, nats_creds=server.bus_creds, http=f"127.0.0.1:{port}"),
              network_factory=lambda: Network(Routes().add(projections={"project.registered": writes})),
              consumer_settings=ConsumerSettings("network", max_deliver=2, backoff=(0.05,)))
    await bus.start()
    await bus.start_http()
    assert bus.engine is not None and bus.consumer is not None and bus.webhooks is not None
    read_only = threading.Event()

    @sa_event.listens_for(bus.engine, "connect")
    def as_if_read_only(dbapi_connection: Any, _record: Any) -> None:  # SQLite answers as for a read-only file
        if read_only.is_set():
            dbapi_connection.execute("PRAGMA query_only = ON")

    nc = await nats.connect(server.url, **server.connect_options())
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await join(nc, FIXTURE["as"], FIXTURE["kind"])
            await wait_for(lambda: (bus.consumer.applied if bus.consumer else 0) >= 2)
            read_only.set()
            bus.engine.dispose()
            held = project_event("held-1")
            assert (await offer(nc, FIXTURE["as"], held)).accepted
            await wait_for(lambda: bus.consumer is not None and bus.consumer.trouble is not None)
            await asyncio.sleep(1.0)  # well past max_deliver's two deliveries
            assert bus.consumer.dead_lettered == 0 and bus.webhooks.consumer.dead_lettered == 0
            assert "held-1" not in recorder.seen
            ready = await client.get("/readyz")
            assert ready.status_code == 503, ready.text
            assert "network is holding events since" in ready.json()["checks"]["consumer"]
            assert "readonly database" in ready.json()["checks"]["consumer"]
            assert 'collabbus_consumer_holding{consumer="network"} 1.0' in (await client.get("/metrics")).text

            read_only.clear()  # the file can be written again
            await wait_for(lambda: "held-1" in recorder.seen)
            # Each consumer tries again after its own wait (up to 10 s).
            await wait_for(lambda: bus.consumer is not None and bus.consumer.trouble is None
                           and bus.webhooks is not None and bus.webhooks.consumer.trouble is None, timeout=30)
            assert (await client.get("/readyz")).status_code == 200
            assert 'collabbus_consumer_holding{consumer="network"} 0.0' in (await client.get("/metrics")).text
            assert bus.consumer.dead_lettered == 0
    finally:
        await nc.close()
        await bus.stop()


async def test_a_batch_another_bus_applied_while_this_one_held_it_is_not_applied_again(
    tmp_path: Path, server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """A bus holding a batch while its lease lapsed, and another bus taking the log over and
    applying those events meanwhile: when this one goes on, the batch is not applied a second
    time — the consumer says so and (here, its lease fresh again) continues from the database's
    position, and the next events flow, each once."""
    from handlers.bookkeeping import ConsumerPosition, advance_position, take_position

    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        consumer, engine = bus.consumer, bus.engine
        assert consumer is not None and engine is not None
        assert (await offer(nc, FIXTURE["as"], project_event("before"))).accepted
        await wait_for(lambda: "before" in recorder.seen)
        lapsed = True
        consumer.may_apply = lambda: not lapsed  # as while its lease could not be renewed
        verdicts = [await offer(nc, FIXTURE["as"], project_event(f"meanwhile-{i}")) for i in range(3)]
        seqs = [verdict.seq for verdict in verdicts]
        assert all(verdict.accepted for verdict in verdicts) and None not in seqs
        await wait_for(lambda: consumer.trouble is not None)  # held
        positions = ConsumerPosition.__table__  # type: ignore[attr-defined]
        with engine.begin() as connection:  # a bus that took over, and applied the first two
            taken = take_position(connection, positions, "network")
            advance_position(connection, positions, "network", int(seqs[1] or 0))
        caplog.set_level(logging.WARNING, logger="collabbus.consumer")
        lapsed = False
        await wait_for(lambda: "meanwhile-2" in recorder.seen)
        assert (await offer(nc, FIXTURE["as"], project_event("after"))).accepted
        await wait_for(lambda: "after" in recorder.seen)
        assert recorder.seen == ["before", "meanwhile-2", "after"]  # not the other bus's two
        warned = [r.getMessage() for r in caplog.records if r.name == "collabbus.consumer" and r.levelno == logging.WARNING]
        assert any(f"another process took over applying the log (consumer network, applied up to #{seqs[1]})" in message
                   and "continuing from the database's position" in message for message in warned), warned
        assert consumer.trouble is None and consumer.dead_lettered == 0
        with engine.connect() as connection:  # holding its lease still, it took the position back to go on
            epoch = connection.execute(sa.select(positions.c.epoch).where(positions.c.consumer == "network")).scalar()
        assert epoch == taken + 1


@contextlib.asynccontextmanager
async def another_process_holding_the_position(
    tmp_path: Path, server: EmbeddedNats, pg_server_url: str | None,
) -> AsyncIterator[tuple[sa.Connection, asyncio.Task[None], Any]]:
    """A consumer starting (its task) while a transaction of another process holds the read
    models' position on PostgreSQL (a bus frozen in the middle of a batch): that process's
    connection, its transaction open, and the starting consumer's service."""
    from nats.js.api import StreamConfig

    from handlers.db import make_engine
    from handlers.service import NetworkService
    from tests.conftest import fresh_database

    databases = fresh_database("postgresql", tmp_path, pg_server_url)
    url = next(databases)
    engines = [make_engine(url) for _ in range(2)]
    service = NetworkService(engines[0], Network(Routes()))
    nc = await nats.connect(server.url, **server.connect_options())
    consumer: Consumer | None = None
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="TAKING", subjects=["taking.>"]))
        frozen = engines[1].connect()
        frozen.begin()
        frozen.execute(sa.text("INSERT INTO consumer_positions (consumer, seq, epoch) VALUES ('network', 0, 4)"))
        consumer = Consumer(js, ConsumerSettings("taking", filter_subject="taking.>"), service, stream="TAKING")
        yield frozen, asyncio.create_task(consumer.start()), service
    finally:
        if consumer is not None:
            await consumer.stop()
        await nc.close()
        service.close()
        for engine in engines:
            engine.dispose()
        for _ in databases:
            pass


async def test_a_consumer_says_when_another_process_holds_its_position_and_goes_on_once_released(
    tmp_path: Path, server: EmbeddedNats, pg_server_url: str | None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Taking the position over waits for a transaction of another process that holds it (on
    PostgreSQL: a bus frozen in the middle of a batch); the consumer says so, and starts once
    that transaction ends — with the position's next epoch."""
    import bus.consumer

    monkeypatch.setattr(bus.consumer, "TAKE_WARNING", 0.3)
    caplog.set_level(logging.WARNING, logger="collabbus.consumer")
    async with another_process_holding_the_position(tmp_path, server, pg_server_url) as (frozen, starting, service):
        await wait_for(lambda: any("waiting to take the read models' position over" in r.getMessage() for r in caplog.records))
        assert not starting.done()
        frozen.commit()
        frozen.close()
        await asyncio.wait_for(starting, 20)
        assert service.network.epoch == 5  # the next one after the other process's


async def test_a_consumer_ends_a_transaction_that_sat_idle_holding_its_position(
    tmp_path: Path, server: EmbeddedNats, pg_server_url: str | None, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bus frozen in the middle of a batch (stopped, its machine paused) holds the position on
    PostgreSQL until it wakes: the process taking over (its lease lapsed) ends that transaction
    once it has sat idle for ``STALLED_AFTER`` and starts. A transaction that keeps working is
    not ended: it is waited for."""
    import bus.consumer

    monkeypatch.setattr(bus.consumer, "TAKE_WARNING", 0.2)
    monkeypatch.setattr(bus.consumer, "STALLED_AFTER", 1.5)
    caplog.set_level(logging.WARNING, logger="collabbus.consumer")
    async with another_process_holding_the_position(tmp_path, server, pg_server_url) as (frozen, starting, service):
        busy = time.monotonic() + 1.0
        while time.monotonic() < busy:  # working (a statement now and then): waited for
            frozen.execute(sa.text("SELECT 1"))
            await asyncio.sleep(0.1)
        assert not starting.done()
        idle = time.monotonic()
        await asyncio.wait_for(starting, 20)  # idle from here on: ended after 1.5 s
        assert time.monotonic() - idle >= 1.4
        assert service.network.epoch == 1  # its row was never committed: this one's is the first epoch
        assert any("ended the database session" in r.getMessage() for r in caplog.records)
        with pytest.raises(sa.exc.OperationalError):
            frozen.execute(sa.text("SELECT 1"))
        frozen.invalidate()


async def test_timers_wait_for_what_was_logged_before_their_deadline(tmp_path: Path, server: EmbeddedNats) -> None:
    """While the network consumer is behind the log, the timers' "now" is the log time of the
    last event it handled, not the wall clock: a deadline passing meanwhile is acted on only once
    the events logged before it are applied (an application in time found its call closed)."""
    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        consumer = bus.consumer
        relay, lease = bus.relay, bus.lease
        assert consumer is not None and relay is not None and relay.clock is not None and lease is not None
        await wait_for(lambda: (now := consumer.timers_now()) is not None
                       and abs((datetime.now(timezone.utc) - now).total_seconds()) < 1)  # caught up: the wall clock
        clock = relay.clock
        assert (now := clock()) is not None and abs((datetime.now(timezone.utc) - now).total_seconds()) < 1
        margin = lease.fence_margin
        lease.fence_margin = lease.stale_after  # as if no renewal had gone through for too long
        try:
            assert clock() is None  # the timers wait: this bus may no longer hold the log
        finally:
            lease.fence_margin = margin

        release = asyncio.Event()
        handle = consumer.handle

        async def held(msgs: list[Any]) -> None:
            await release.wait()
            await handle(msgs)

        consumer.handle = held  # type: ignore[method-assign]
        before = datetime.now(timezone.utc)
        assert (await offer(nc, FIXTURE["as"], project_event("held-back"))).accepted
        await asyncio.sleep(0.5)
        behind = consumer.timers_now()
        assert behind is not None and behind < before  # the last event applied was logged before the held one
        relay_now = clock()  # what the timers act on: the consumer's moment (this bus holds the log)
        assert relay_now == behind
        release.set()
        await wait_for(lambda: recorder.seen == ["held-back"])
        await wait_for(lambda: (now := consumer.timers_now()) is not None and now > before)


@contextlib.asynccontextmanager
async def retrying_bus(tmp: Path, server: EmbeddedNats, backoff: float) -> AsyncIterator[tuple[Bus, Consumer, int]]:
    """A bus whose one event failed once and waits ``backoff`` s to be tried again (the last time):
    (the bus, its network consumer, the event's log sequence); stopped after the block."""
    recorder = Recorder()
    recorder.poison.add("poison-project")
    bus = await start_bus(tmp, server, recording(recorder), max_deliver=2, backoff=(backoff,))
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        verdict = await offer(nc, FIXTURE["as"], project_event("poison-project"))
        consumer = bus.consumer
        assert consumer is not None and verdict.seq is not None
        await wait_for(lambda: consumer.retrying is not None)
        yield bus, consumer, verdict.seq
    finally:
        await nc.close()
        await bus.stop()


async def test_an_event_waiting_for_its_retry_is_named_in_the_status(tmp_path: Path, server: EmbeddedNats) -> None:
    """While a failed event waits to be tried again, the events after it wait too: the bus's
    status names it, how often it failed and when it is tried again, then forgets it."""
    from ops.status import collect_status

    async with retrying_bus(tmp_path, server, backoff=1.5) as (bus, consumer, seq):
        assert f"#{seq} failed 1 of 2 times (RuntimeError)" in (consumer.retrying or "")
        report = await collect_status(bus.js, bus.engine, running={"network": consumer})
        assert report["consumers"]["network"]["retrying"] == consumer.retrying
        await wait_for(lambda: consumer.dead_lettered == 1)
        assert consumer.retrying is None


async def test_collabbus_status_in_another_process_names_the_event_waiting_for_its_retry(
    tmp_path: Path, server: EmbeddedNats
) -> None:
    """``collabbus status`` runs in a process of its own: the bus writes what its consumers wait on
    into the data dir, the command reads it while the bus runs, and the file goes when it stops."""
    import json

    from ops.status import STATE_FILE
    from tests.ops.conftest import cli_env, collabbus

    async with retrying_bus(tmp_path, server, backoff=60.0) as (bus, consumer, seq):
        env = cli_env(bus)
        deadline = time.monotonic() + 30
        while True:  # the bus writes the file every second
            code, out, err = await collabbus("status", "--json", env=env)
            assert code == 0, err
            network = json.loads(out)["consumers"]["network"]
            if network.get("retrying") or time.monotonic() > deadline:
                break
        assert network["retrying"] == consumer.retrying and f"#{seq} failed 1 of 2 times" in network["retrying"]
        assert network["holding"] is None
        code, out, err = await collabbus("status", env=env)
        assert code == 0 and f"network: #{seq} failed 1 of 2 times (RuntimeError)" in out, out + err
    assert not (tmp_path / STATE_FILE).exists()  # a stopped bus's consumers wait on nothing


async def test_a_rebuild_whose_reader_stopped_early_fails_unless_the_rest_was_removed(tmp_path: Path, server: EmbeddedNats) -> None:
    """The reader stops when the log brings nothing more for a while; a rebuild that did not get
    to the log's end must not report success, unless the messages left are gone from the log."""
    from bus.rebuild import LogReadError, _check_end

    async with recording_bus(tmp_path, server) as (bus, nc, recorder):
        seqs = []
        for n in range(3):
            verdict = await offer(nc, FIXTURE["as"], project_event(f"end-{n}"))
            assert verdict.accepted and verdict.seq is not None
            seqs.append(verdict.seq)
        await _check_end(bus.js, seqs[-1], seqs[-1])  # got to the end
        with pytest.raises(LogReadError, match=f"stopped at #{seqs[0]}, before the log's end at #{seqs[-1]}"):
            await _check_end(bus.js, seqs[0], seqs[-1])
        # (The log refuses deletes; what its limits removed is not there either.)
        await _check_end(bus.js, seqs[-1], seqs[-1] + 1000)  # the rest is not there: that is its end


async def test_a_sqlite_database_locked_by_another_process_does_not_stop_the_bus(tmp_path: Path, server: EmbeddedNats) -> None:
    """SQLite work runs in the event loop's thread: another process holding the database's write
    lock (an operator's sqlite3 shell, a backup tool) used to stop the whole bus — HTTP answers,
    the lease's renewals — for as long as SQLite waits (30 s). Now the loop waits only briefly,
    the batch waits for the lock in a worker thread, and is applied once the lock is let go."""
    import sqlite3
    import threading

    bus = Bus(Settings(data_dir=tmp_path, nats_url=server.url, nats_creds=server.bus_creds))
    await bus.start()
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        assert bus.engine is not None and bus.lease is not None

        def applied(project_id: str) -> bool:  # (read on a connection of its own: a reader waits for no lock)
            reader = sqlite3.connect(tmp_path / "collabbus.db")
            try:
                return reader.execute("SELECT 1 FROM projects WHERE project_id = ?", (project_id,)).fetchone() is not None
            finally:
                reader.close()

        locked, release = threading.Event(), threading.Event()

        def hold_the_lock() -> None:
            other = sqlite3.connect(tmp_path / "collabbus.db", isolation_level=None)
            other.execute("BEGIN EXCLUSIVE")
            locked.set()
            release.wait(10)
            other.execute("COMMIT")
            other.close()

        holder = threading.Thread(target=hold_the_lock)
        holder.start()
        assert await asyncio.to_thread(locked.wait, 10)
        gaps: list[float] = []  # how long the loop went without running this task, while the lock was held
        try:
            assert (await offer(nc, FIXTURE["as"], project_event("during-the-lock"))).accepted
            loop = asyncio.get_running_loop()
            last = loop.time()
            for _ in range(60):  # 3 s
                await asyncio.sleep(0.05)
                gaps.append(loop.time() - last)
                last = loop.time()
            assert not applied("during-the-lock")  # (it waits for the lock)
            assert bus.lease.fresh  # renewed meanwhile
        finally:
            release.set()
            await asyncio.to_thread(holder.join)
        assert max(gaps) < 1.0, max(gaps)  # was 30 s, SQLite's busy timeout, in the loop
        await wait_for(lambda: applied("during-the-lock"))
        assert (await offer(nc, FIXTURE["as"], project_event("after-the-lock"))).accepted
        await wait_for(lambda: applied("after-the-lock"))
    finally:
        await nc.close()
        await bus.stop()
