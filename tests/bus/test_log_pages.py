"""Reading a stream's stored messages a batch per request (``bus.log.stored``), against a real
nats-server: what ``GET /events`` and ``collabbus dlq list`` page with."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from contextlib import aclosing

import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import StreamConfig
from nats.js.errors import APIError

from bus import log
from bus.server import EmbeddedNats

STREAM = "PAGETEST"


@pytest.fixture
async def nc(server: EmbeddedNats) -> AsyncIterator[Client]:
    client = await nats.connect(server.url, **server.connect_options())
    await client.jetstream().add_stream(StreamConfig(name=STREAM, subjects=["pagetest.>"], allow_direct=True))
    yield client
    await client.close()


async def fill(nc: Client, count: int) -> dict[str, list[int]]:
    """``count`` messages alternating between two subjects; their sequences by subject."""
    js = nc.jetstream()
    sequences: dict[str, list[int]] = {"pagetest.a": [], "pagetest.b": []}
    for index in range(count):
        subject = "pagetest.a" if index % 2 == 0 else "pagetest.b"
        ack = await js.publish(subject, f"{index}".encode(), headers={"Nats-Msg-Id": f"m{index}"})
        sequences[subject].append(ack.seq)
    return sequences


def count_requests(nc: Client, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The subjects of the requests ``nc`` makes from now on (the stream API's gets are requests)."""
    requested: list[str] = []
    original = nc.request

    async def counting(subject: str, *args: object, **kwargs: object) -> object:
        requested.append(subject)
        return await original(subject, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nc, "request", counting)
    return requested


async def read(nc: Client, subject: str, *, start_seq: int = 1, batch: int = 7, most: int | None = None) -> list[log.StoredMessage]:
    found: list[log.StoredMessage] = []
    async with aclosing(log.stored(nc.jetstream(), STREAM, subject, start_seq=start_seq, batch=batch)) as messages:
        async for message in messages:
            found.append(message)
            if most is not None and len(found) == most:
                break
    return found


async def test_every_message_on_a_subject_in_order_across_batches(nc: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    sequences = await fill(nc, 40)
    requests: list[bytes] = []
    original = nc.publish

    async def counting(subject: str, payload: bytes = b"", **kwargs: object) -> None:
        if subject == f"$JS.API.DIRECT.GET.{STREAM}":
            requests.append(payload)
        await original(subject, payload, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nc, "publish", counting)
    found = await read(nc, "pagetest.a", batch=7)  # 20 messages: three full batches and a part
    assert len(requests) == 3  # one request per batch
    assert [m.seq for m in found] == sequences["pagetest.a"]
    assert [m.data for m in found] == [f"{i}".encode() for i in range(0, 40, 2)]
    assert {m.subject for m in found} == {"pagetest.a"}
    assert found[0].headers["Nats-Msg-Id"] == "m0"  # the message's own headers come along
    assert [m.seq for m in await read(nc, "pagetest.>", batch=40)] == list(range(1, 41))


async def test_reading_starts_at_a_sequence_and_stops_where_asked(nc: Client) -> None:
    sequences = await fill(nc, 30)
    b = sequences["pagetest.b"]
    assert [m.seq for m in await read(nc, "pagetest.b", start_seq=b[4])] == b[4:]
    assert [m.seq for m in await read(nc, "pagetest.b", start_seq=b[4] + 1)] == b[5:]
    assert [m.seq for m in await read(nc, "pagetest.b", start_seq=b[2], most=3)] == b[2:5]
    assert await read(nc, "pagetest.b", start_seq=31) == []  # past the end
    assert await read(nc, "pagetest.c") == []  # a subject with nothing on it


async def test_an_empty_stream_and_deleted_messages(nc: Client) -> None:
    assert await read(nc, "pagetest.>") == []
    await fill(nc, 10)
    js = nc.jetstream()
    for seq in (1, 4, 5, 10):
        await js.delete_msg(STREAM, seq)
    assert [m.seq for m in await read(nc, "pagetest.>", batch=2)] == [2, 3, 6, 7, 8, 9]


async def test_a_server_without_batched_direct_gets_is_read_one_message_at_a_time(
    nc: Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sequences = await fill(nc, 12)
    batched = await read(nc, "pagetest.b", start_seq=3, batch=2)
    monkeypatch.setattr(log, "DIRECT_BATCH_SINCE", (99, 0))  # as if the server were older than 2.11
    requested = count_requests(nc, monkeypatch)
    one_by_one = await read(nc, "pagetest.b", start_seq=3, batch=2)
    assert [(m.seq, m.subject, m.data) for m in one_by_one] == [(m.seq, m.subject, m.data) for m in batched]
    assert [m.seq for m in batched] == sequences["pagetest.b"][1:]
    assert requested.count(f"$JS.API.STREAM.MSG.GET.{STREAM}") == len(batched) + 1  # and one finding no more


async def test_a_reader_that_must_see_all_that_was_acknowledged_asks_the_leader_what_follows(
    nc: Client, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any replica answers a direct get, from its copy of the stream; the leader answers the
    stream API's own get. A reader that must see all that was acknowledged (a replicated log's)
    reads in batches, then asks the leader whether anything follows: one request, not one per
    message."""
    sequences = await fill(nc, 30)
    requested = count_requests(nc, monkeypatch)
    found = [message.seq async for message in log.stored(nc.jetstream(), STREAM, "pagetest.a", batch=4, from_leader=True)]
    assert found == sequences["pagetest.a"]
    assert requested == [f"$JS.API.STREAM.MSG.GET.{STREAM}"]  # (the batches are published, not requested)


async def test_what_a_replica_does_not_have_yet_is_read_from_the_leader(nc: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica a moment behind its leader answers with the beginning of the stream only: the
    rest comes from the leader. A stream whose replicas do not answer direct gets (not in time,
    or none serves them) is read from the leader whole."""
    sequences = await fill(nc, 20)
    batches = log._stored_in_batches

    async def behind(*args: Any, **kwargs: Any) -> AsyncIterator[log.StoredMessage]:
        async with aclosing(batches(*args, **kwargs)) as messages:
            async for message in messages:
                if message.seq > 11:  # the replica's copy ends here
                    return
                yield message

    monkeypatch.setattr(log, "_stored_in_batches", behind)
    found = [m.seq async for m in log.stored(nc.jetstream(), STREAM, "pagetest.b", batch=3, from_leader=True)]
    assert found == sequences["pagetest.b"]
    assert [m.seq async for m in log.stored(nc.jetstream(), STREAM, "pagetest.b", batch=3)] == [s for s in sequences["pagetest.b"] if s <= 11]
    monkeypatch.setattr(log, "_stored_in_batches", batches)

    js = nc.jetstream(timeout=0.5)
    await js.update_stream(StreamConfig(name=STREAM, subjects=["pagetest.>"], allow_direct=False))
    silent = await nc.subscribe(f"$JS.API.DIRECT.GET.{STREAM}")  # a replica that takes requests and says nothing
    requested = count_requests(nc, monkeypatch)
    assert [m.seq async for m in log.stored(js, STREAM, "pagetest.a", batch=3, from_leader=True)] == sequences["pagetest.a"]
    assert requested.count(f"$JS.API.STREAM.MSG.GET.{STREAM}") == len(sequences["pagetest.a"]) + 1
    with pytest.raises(nats.errors.TimeoutError):  # a reader content with a replica's copy is told
        [m async for m in log.stored(js, STREAM, "pagetest.a", batch=3)]
    await silent.unsubscribe()
    # Nobody serving direct gets at all (no responders): the same.
    assert [m.seq async for m in log.stored(js, STREAM, "pagetest.a", batch=3, from_leader=True)] == sequences["pagetest.a"]
    with pytest.raises(APIError):
        [m async for m in log.stored(js, STREAM, "pagetest.a", batch=3)]
