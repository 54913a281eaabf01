"""The puller and the log publisher against a real nats-server: what a consumer and the gate rely on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import nats.errors
import nats.js.errors
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from bus.publisher import LogPublisher
from bus.pull import Puller, delivery
from bus.server import EmbeddedNats

STREAM = "PULLTEST"


@pytest.fixture
async def nc(server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(server.url, **server.connect_options())
    await client.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["pulltest.>"]))
    yield client
    await client.close()


async def consumer(nc: Client, name: str = "c") -> str:
    await nc.jetstream().add_consumer(STREAM, ConsumerConfig(durable_name=name, ack_policy=AckPolicy.ALL))
    return name


async def publish(nc: Client, *bodies: bytes) -> list[int]:
    js = nc.jetstream()
    return [(await js.publish("pulltest.x", body)).seq for body in bodies]


async def test_what_has_arrived_is_handed_out_without_waiting_for_a_full_batch(nc: Client) -> None:
    puller = Puller(nc, STREAM, await consumer(nc), batch=100)
    await puller.start()
    try:
        seqs = await publish(nc, b"one", b"two", b"three")
        got: list[bytes] = []
        while len(got) < 3:  # nats-py's fetch(100, timeout=60) would wait out the minute for 97 more
            got += [msg.data for msg in await asyncio.wait_for(puller.fetch(timeout=60), 10)]
        assert got == [b"one", b"two", b"three"]
        assert await puller.fetch(timeout=0.2) == []
        later = await publish(nc, b"four")
        msgs = await asyncio.wait_for(puller.fetch(timeout=60), 10)
        assert [m.data for m in msgs] == [b"four"]
        assert (msgs[0].metadata.sequence.stream, msgs[0].metadata.num_delivered) == (later[0], 1) and seqs == [1, 2, 3]
    finally:
        await puller.stop()


async def test_it_holds_at_most_about_two_batches_and_hands_them_out_in_log_order(nc: Client) -> None:
    await publish(nc, *(str(i).encode() for i in range(50)))
    puller = Puller(nc, STREAM, await consumer(nc), batch=10)
    await puller.start()
    try:
        await asyncio.sleep(0.5)  # the server delivers what the open request asks for, no more
        assert len(puller.buffered) <= 20
        seen: list[int] = []
        while len(seen) < 50:
            msgs = await puller.fetch(timeout=5)
            assert 0 < len(msgs) <= 10
            seen += [int(m.data) for m in msgs]
            await msgs[-1].ack()
        assert seen == list(range(50))
    finally:
        await puller.stop()


async def test_a_new_request_goes_out_when_the_open_one_expires(nc: Client) -> None:
    puller = Puller(nc, STREAM, await consumer(nc), batch=10, expires=0.3)
    await puller.start()
    try:
        assert await puller.fetch(timeout=1.0) == []  # the first request expired meanwhile
        await publish(nc, b"late")
        msgs = await asyncio.wait_for(puller.fetch(timeout=60), 10)
        assert [m.data for m in msgs] == [b"late"]
    finally:
        await puller.stop()


async def test_stopping_returns_what_was_received_and_not_handed_out(nc: Client) -> None:
    await publish(nc, b"a", b"b", b"c")
    puller = Puller(nc, STREAM, await consumer(nc), batch=2)
    await puller.start()
    first = await puller.fetch(timeout=5)
    await asyncio.sleep(0.3)
    left = await puller.stop()
    assert [m.data for m in first + left] == [b"a", b"b", b"c"]
    assert await puller.fetch(timeout=0.1) == []


async def test_a_consumer_that_goes_away_and_comes_back(nc: Client, caplog: pytest.LogCaptureFixture) -> None:
    name = await consumer(nc)
    puller = Puller(nc, STREAM, name, batch=10, expires=2.0)
    await puller.start()
    try:
        assert await puller.fetch(timeout=0.05) == []  # a request is open when the consumer goes
        await nc.jetstream().delete_consumer(STREAM, name)
        with caplog.at_level("WARNING", logger="collabbus.consumer"):
            for _ in range(4):  # refused each time: said once (not twice a second), in one line
                assert await puller.fetch(timeout=1.0) == []
            said = [r.getMessage() for r in caplog.records]
            assert len([line for line in said if "pull request" in line]) == 1, said
            assert "pull request refused: " in said[0] and "\n" not in said[0], said
            await consumer(nc)
            await publish(nc, b"again")
            got: list[bytes] = []
            for _ in range(20):
                got += [m.data for m in await puller.fetch(timeout=0.5)]
                if got:
                    break
        assert got == [b"again"]
        assert any("pull requests answered again (refused " in r.getMessage() for r in caplog.records), caplog.text
    finally:
        await puller.stop()


async def test_after_the_server_is_back_it_asks_again_without_waiting_for_the_lost_request(server: EmbeddedNats) -> None:
    client = await nats.connect(server.url, reconnect_time_wait=0.2, max_reconnect_attempts=-1, **server.connect_options())
    try:
        await client.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["pulltest.>"]))
        # The request would stay open for a minute: only the missing heartbeats tell it is gone.
        puller = Puller(client, STREAM, await consumer(client), batch=10, expires=60, heartbeat=0.5)
        await puller.start()
        await publish(client, b"before")
        assert [m.data for m in await asyncio.wait_for(puller.fetch(timeout=5), 10)] == [b"before"]
        await server.astop()
        await server.astart()  # same port, same store: the client reconnects, the open request is lost
        while not client.is_connected:
            await asyncio.sleep(0.05)
        await publish(client, b"after")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        got: list[bytes] = []
        while not got:
            assert loop.time() < deadline, "the puller still waits on the request the restart lost"
            got = [m.data for m in await puller.fetch(timeout=0.5)]
        assert got == [b"after"]
        await puller.stop()
    finally:
        await client.close()


async def test_the_log_publisher_answers_as_jetstream_publish_does(nc: Client) -> None:
    publisher = LogPublisher(nc)
    await publisher.start()
    try:
        acks = await asyncio.gather(*(publisher.publish("pulltest.p", b"x", timeout=5, headers={"Nats-Msg-Id": f"id-{i % 3}"}) for i in range(6)))
        assert sorted(a.seq for a in acks if not a.duplicate) == [1, 2, 3]
        assert sum(1 for a in acks if a.duplicate) == 3 and all(a.stream == STREAM for a in acks)
        with pytest.raises(nats.js.errors.NoStreamResponseError):
            await publisher.publish("nowhere.p", b"x", timeout=5)
        with pytest.raises(nats.js.errors.APIError):  # the stream expected is not the one that answers
            await publisher.publish("pulltest.p", b"x", timeout=5, stream="OTHER")
    finally:
        await publisher.stop()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await publisher.publish("pulltest.p", b"x", timeout=5)


async def test_a_deliverys_sequence_and_log_time_are_read_as_nats_py_reads_them(nc: Client) -> None:
    seqs = await publish(nc, b"one", b"two")
    puller = Puller(nc, STREAM, await consumer(nc), batch=10)
    await puller.start()
    try:
        msgs: list[Msg] = []
        while len(msgs) < 2:
            msgs += await asyncio.wait_for(puller.fetch(timeout=5), 10)
    finally:
        await puller.stop()
    assert [delivery(msg) for msg in msgs] == [(msg.metadata.sequence.stream, msg.metadata.timestamp) for msg in msgs]
    assert [seq for seq, _ in map(delivery, msgs)] == seqs
    # The form with a domain and an account hash (servers since 2.9 may send it).
    long = Msg(nc, subject="pulltest.x", reply="$JS.ACK.hub.ACCHASH.PULLTEST.c.3.41.40.1764669652548947000.0.rnd")
    assert delivery(long) == (long.metadata.sequence.stream, long.metadata.timestamp) == (41, long.metadata.timestamp)
    with pytest.raises(nats.errors.NotJSMessageError):
        delivery(Msg(nc, subject="pulltest.x", reply="_INBOX.abc"))
