"""Hostile and oversized input: always a rejection, never a crash, a hang or a dropped connection."""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from typing import cast

import nats
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from bus.client import offer, offer_raw
from bus.runtime import Bus
from bus.server import EmbeddedNats
from bus.verdict import Verdict
from ops.settings import Settings
from tests.conftest import join, load_fixtures, unique

FIXTURE = load_fixtures()["project.registered"]
SUBJECT = f"collab.ingress.{FIXTURE['as']}.project.registered"


def valid_event() -> dict[str, object]:
    event = copy.deepcopy(FIXTURE["event"])
    event["id"] = unique("ok")
    return event


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=6),
    max_leaves=30,
)
envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", 1]) | json_values,
        "id": st.text(max_size=40) | json_values,
        "source": st.just(f"/institutions/{FIXTURE['as']}") | json_values,
        "type": st.sampled_from(["project.registered", "call.published", "x.y"]) | json_values,
        "subject": st.text(max_size=20) | json_values,
        "time": st.just("2026-11-23T10:00:00+02:00") | json_values,
        "data": json_values,
    },
)


@pytest.fixture(autouse=True)
async def _members(members: dict[str, str]) -> None:
    """The fixture institutions are members."""


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=2048))
async def test_arbitrary_bytes_are_always_rejected(partner: Client, body: bytes) -> None:
    verdict = await offer_raw(partner, SUBJECT, body, timeout=5)
    assert verdict.status == "rejected" and verdict.reason != "unavailable", verdict.as_dict()
    assert verdict.errors


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(value=json_values | envelope_like)
async def test_arbitrary_json_is_always_rejected(partner: Client, value: object) -> None:
    verdict = await offer_raw(partner, SUBJECT, json.dumps(value).encode(), {"content-type": "application/cloudevents+json"})
    assert verdict.status == "rejected" and verdict.reason != "unavailable", verdict.as_dict()
    assert verdict.errors


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(headers=st.dictionaries(st.sampled_from(["ce-id", "ce-type", "ce-source", "ce-specversion", "ce-time", "ce-subject", "content-type", "ce-x"]),
                              st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=30), min_size=1),
       body=st.binary(max_size=256))
async def test_arbitrary_binary_mode_headers_are_always_rejected(partner: Client, headers: dict[str, str], body: bytes) -> None:
    verdict = await offer_raw(partner, SUBJECT, body, headers)
    assert verdict.status == "rejected" and verdict.reason != "unavailable", verdict.as_dict()


async def test_after_the_storm_the_bus_still_serves(bus: Bus, partner: Client) -> None:
    verdict = await offer(partner, FIXTURE["as"], valid_event())
    assert verdict.accepted, verdict.as_dict()
    assert bus.nc.is_connected and partner.is_connected


# --------------------------------------------------------------------------- NATS max_payload


@pytest.fixture(scope="module")
async def small_nats(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Bus, Client]]:
    """A server whose max_payload (32 KiB) is below the bus's event limit (256 KiB)."""
    server = EmbeddedNats(tmp_path_factory.mktemp("small"), port=0, max_payload=32 * 1024)
    await server.astart()
    bus = Bus(Settings(data_dir=tmp_path_factory.mktemp("small-data"), nats_url=server.url, nats_creds=server.bus_creds))
    await bus.start()
    nc = await nats.connect(server.url, **server.connect_options())
    await join(nc, FIXTURE["as"], FIXTURE["kind"])
    yield bus, nc
    await nc.close()
    await bus.stop()
    await server.astop()


def padded(size: int) -> bytes:
    """A valid event whose structured JSON is exactly ``size`` bytes, without ``time`` (the gate adds it)."""
    event = valid_event()
    event.pop("time")
    event["id"] = unique("pad").ljust(128, "x")
    data = cast(dict[str, object], event["data"])
    data["summary"] = {"en": ""}
    base = len(orjson.dumps(event))
    data["summary"] = {"en": "x" * (size - base)}
    body = orjson.dumps(event)
    assert len(body) == size
    return body


async def test_headers_pushing_over_max_payload_are_refused_before_nats(small_nats: tuple[Bus, Client]) -> None:
    bus, nc = small_nats
    limit = nc.max_payload
    # The partner's request fits; the logged event, with the time the gate adds and its headers, does not.
    body = padded(limit - 400)
    verdict = await offer_raw(nc, SUBJECT, body, {"content-type": "application/cloudevents+json"})
    assert verdict.status == "rejected" and verdict.reason == "too_large"
    assert {p.type for p in verdict.errors} == {"too_large_for_nats"}
    assert str(limit) in verdict.errors[0].msg
    assert bus.nc.is_connected and nc.is_connected

    assert (await offer(nc, FIXTURE["as"], valid_event())).accepted


async def test_a_client_never_sends_what_nats_would_refuse(small_nats: tuple[Bus, Client]) -> None:
    _, nc = small_nats
    body = padded(nc.max_payload - 10)
    verdict = await offer_raw(nc, SUBJECT, body, {"content-type": "application/cloudevents+json", "x-pad": "y" * 100})
    assert verdict.reason == "too_large" and {p.type for p in verdict.errors} == {"too_large_for_nats"}
    assert nc.is_connected
    assert (await offer(nc, FIXTURE["as"], valid_event())).accepted


# --------------------------------------------------------------------------- the event size limit


async def test_the_limit_is_the_event_as_sent_serialized(bus: Bus, partner: Client) -> None:
    """An event of exactly COLLABBUS_MAX_EVENT_BYTES is accepted, structured (its Content-Type
    header does not count, nor the time the gate adds) and binary (its attributes do count); one
    byte more is refused, with the size in the message."""
    from bus.cloudevents import to_binary

    limit = bus.settings.max_event_bytes
    structured = {"content-type": "application/cloudevents+json"}
    verdict = await offer_raw(partner, SUBJECT, padded(limit), structured)
    assert verdict.accepted, verdict.as_dict()
    verdict = await offer_raw(partner, SUBJECT, padded(limit + 1), structured)
    assert verdict.reason == "too_large" and f"is {limit + 1} bytes serialized" in verdict.errors[0].msg, verdict.as_dict()

    headers, body = to_binary(orjson.loads(padded(limit)))
    assert (await offer_raw(partner, SUBJECT, body, headers)).accepted
    headers, body = to_binary(orjson.loads(padded(limit + 1)))
    assert (await offer_raw(partner, SUBJECT, body, headers)).reason == "too_large"

    # Too large and invalid too: the size is judged first (its place in the gate's order), so a
    # sender mending the data does not learn only then that the event cannot be sent anyway.
    invalid = orjson.loads(padded(limit + 1000))
    invalid["data"]["title"] = 12
    verdict = await offer_raw(partner, SUBJECT, orjson.dumps(invalid), structured)
    assert verdict.reason == "too_large", verdict.as_dict()
    assert f"is {len(orjson.dumps(invalid))} bytes serialized" in verdict.errors[0].msg, verdict.as_dict()
    assert verdict.id == invalid["id"]

    far = padded(3 * limit)  # refused before it is parsed
    verdict = await offer_raw(partner, SUBJECT, far, structured)
    assert verdict.reason == "too_large" and "at least" in verdict.errors[0].msg
    assert (await offer(partner, FIXTURE["as"], valid_event())).accepted


async def test_data_sent_without_ce_headers_is_told_how_to_name_the_mode(partner: Client) -> None:
    data = orjson.dumps(valid_event()["data"])
    for headers in ({}, {"content-type": "application/json"}):
        verdict = await offer_raw(partner, SUBJECT, data, headers)
        assert verdict.reason == "invalid" and "mode_unclear" in {p.type for p in verdict.errors}, verdict.as_dict()
    verdict = await offer_raw(partner, SUBJECT, data, {"content-type": "application/cloudevents+json"})
    assert verdict.reason == "invalid" and "mode_unclear" not in {p.type for p in verdict.errors}


async def test_an_event_read_in_the_mode_its_sender_did_not_mean_is_told_so(partner: Client) -> None:
    from bus.cloudevents import to_binary

    event = valid_event()
    attributes, data = to_binary(event)

    def hint(verdict: Verdict) -> str:
        assert verdict.reason == "invalid", verdict.as_dict()
        [said] = [p.msg for p in verdict.errors if p.type == "mode_unclear"]
        return said

    # ce- headers under a structured Content-Type are not read: the body must be the whole event.
    ignored = await offer_raw(partner, SUBJECT, data, {**attributes, "content-type": "application/cloudevents+json"})
    assert "its ce- headers were not read" in hint(ignored)
    # A stray ce- header makes a whole event in the body the data of a binary one.
    stray = await offer_raw(partner, SUBJECT, orjson.dumps(event), {"ce-id": str(event["id"])})
    assert "the body is a whole event" in hint(stray)
    assert {p.loc for p in stray.errors if p.type == "missing"} >= {("specversion",), ("source",), ("type",)}
    assert (await offer_raw(partner, SUBJECT, data, attributes)).accepted  # the same in binary mode, as meant


async def test_a_stray_percent_in_a_ce_header_is_malformed(partner: Client) -> None:
    from bus.cloudevents import to_binary

    attributes, data = to_binary(valid_event())
    verdict = await offer_raw(partner, SUBJECT, data, {**attributes, "ce-source": "%ZZinstitutions/" + FIXTURE["as"]})
    assert verdict.reason == "malformed", verdict.as_dict()
    [problem] = verdict.errors
    assert (problem.type, problem.loc) == ("percent_encoding_invalid", ("source",))
    assert "ce-source" in problem.msg and "%25" in problem.msg
    assert (await offer_raw(partner, SUBJECT, data, attributes)).accepted
