"""The gatekeeper against a real nats-server (CONTRACT §4): what gets in, what is refused and why."""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import orjson
import pytest
from nats.aio.client import Client

from bus.client import offer, offer_raw
from bus.gate import ABOUT_A_MEMBER
from bus.runtime import Bus
from bus.streams import EVENTS_STREAM
from bus.verdict import Verdict
from schemas import registry
from tests.conftest import load_fixtures, unique

pytestmark = pytest.mark.quick

FIXTURES = load_fixtures()


def fresh(type_: str, **changes: Any) -> tuple[str, dict[str, Any]]:
    """(institution, event) of a fixture with a new event id; ``changes`` replace envelope attributes."""
    fixture = copy.deepcopy(FIXTURES[type_])
    event = fixture["event"]
    event["id"] = unique("ev")
    event.update(changes)
    return fixture["as"], event


async def logged(bus: Bus, seq: int) -> tuple[dict[str, Any], bytes]:
    msg = await bus.js.get_msg(EVENTS_STREAM, seq)
    assert msg.data is not None
    return orjson.loads(msg.data), msg.data


def codes(verdict: Verdict) -> set[str]:
    return {problem.type for problem in verdict.errors}


def locs(verdict: Verdict) -> set[tuple[str | int, ...]]:
    return {problem.loc for problem in verdict.errors}


async def stream_messages(bus: Bus) -> int:
    return (await bus.js.stream_info(EVENTS_STREAM)).state.messages


@pytest.fixture(autouse=True)
async def _members(members: dict[str, str]) -> None:
    """Every test here runs with the fixture institutions as members."""


# --------------------------------------------------------------------------- every type


OUTSIDE = sorted(t for t in FIXTURES if registry.spec_for(t).emitters)
BUS_ONLY = sorted(t for t in FIXTURES if not registry.spec_for(t).emitters)


def test_fixtures_cover_the_whole_catalog() -> None:
    assert sorted(FIXTURES) == registry.event_types()


@pytest.mark.parametrize("type_", OUTSIDE)
async def test_every_type_offered_from_outside_is_accepted_and_logged(bus: Bus, partner: Client, type_: str) -> None:
    institution, event = fresh(type_)
    if type_ in ABOUT_A_MEMBER:  # of a member of its own: the catalog's example may have left in another test
        from tests.conftest import join

        event["subject"] = event["data"]["id"] = unique("fi-member")
        await join(partner, event["subject"], "ngo")
    verdict = await offer(partner, institution, event)
    assert verdict.accepted, verdict.as_dict()
    assert verdict.id == event["id"] and not verdict.duplicate
    stored, _ = await logged(bus, verdict.seq or 0)
    assert stored["data"] == event["data"]
    assert stored["type"] == type_ and stored["source"] == f"/institutions/{institution}"
    msg = await bus.js.get_msg(EVENTS_STREAM, verdict.seq or 0)
    assert msg.subject == f"collab.events.{institution}.{type_}.{event['subject']}"
    assert msg.headers and msg.headers["Nats-Msg-Id"] == event["id"]


@pytest.mark.parametrize("type_", BUS_ONLY)
async def test_bus_only_types_are_logged_by_the_bus_and_refused_from_outside(
    bus: Bus, partner: Client, type_: str
) -> None:
    institution, event = fresh(type_)
    refused = await offer(partner, institution, event)
    assert refused.status == "rejected" and codes(refused) == {"kind_may_not_emit"}
    assert "workflows only" in refused.errors[0].msg

    verdict = await bus.gate.publish_internal(event)
    assert verdict.accepted, verdict.as_dict()
    stored, _ = await logged(bus, verdict.seq or 0)
    assert stored["data"] == event["data"] and stored["type"] == type_


# --------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"specversion": "1.0", "id": ', "json_invalid"),
        (b"\xff\xfe{not even text", "utf8_invalid"),
        (b'{"specversion":"1.0","id":"x\xc3\x28"}', "utf8_invalid"),
        (b"[1, 2, 3]", "json_invalid"),
        (b"", "json_invalid"),
    ],
)
async def test_malformed_bytes_are_rejected_with_a_specific_error(partner: Client, body: bytes, code: str) -> None:
    verdict = await offer_raw(partner, "collab.ingress.tr-mersin-bb.project.registered", body)
    assert verdict.status == "rejected" and verdict.reason == "malformed"
    assert codes(verdict) == {code}


async def test_an_object_naming_a_member_twice_is_refused_with_its_place_and_the_next_event_flows(bus: Bus, partner: Client) -> None:
    """JSON's parsers differ on ``{"id": "a", "id": "b"}`` (the last wins, the first, an error): which
    one the sender meant — or a proxy before the bus checked — cannot be told. The gate read the
    last; now it refuses the event, naming the member and where, in either mode."""
    institution, event = fresh("project.registered")
    subject = f"collab.ingress.{institution}.project.registered"
    text = orjson.dumps(event)
    twice_id = text.replace(b'"id":', b'"id":"ev-the-first","id":', 1)
    verdict = await offer_raw(partner, subject, twice_id)
    assert verdict.reason == "malformed" and [(p.type, p.loc) for p in verdict.errors] == [("duplicate_name", ())], verdict.as_dict()
    assert verdict.errors[0].msg == "the body names 'id' twice in one object: which one is meant cannot be told"
    title = orjson.dumps(event["data"]["title"])
    nested = text.replace(b'"title":' + title, b'"title":' + title[:-1] + b',"en":"twice"}', 1)
    assert nested != text and b'"en":' in title  # (the fixture's title has an English text)
    verdict = await offer_raw(partner, subject, nested)
    assert [(p.type, p.loc) for p in verdict.errors] == [("duplicate_name", ("data", "title"))], verdict.as_dict()
    assert "(at data.title)" in verdict.errors[0].msg
    headers = {"ce-specversion": "1.0", "ce-id": event["id"], "ce-source": event["source"], "ce-type": event["type"],
               "ce-subject": event["subject"], "Content-Type": "application/json"}
    data = orjson.dumps(event["data"])
    binary = await offer_raw(partner, subject, data.replace(b'"title":', b'"title":{},"title":', 1), headers)
    assert [(p.type, p.loc) for p in binary.errors] == [("duplicate_name", ("data",))], binary.as_dict()
    # Text that only looks like a member's name twice is the text it is; the next event flows.
    event["data"]["summary"] = {"en": 'the "title": and the "title": again'}
    verdict = await offer(partner, institution, event)
    assert verdict.accepted, verdict.as_dict()
    stored, _ = await logged(bus, verdict.seq or 0)
    assert stored["id"] == event["id"] and stored["data"]["summary"] == event["data"]["summary"]


async def test_missing_and_mistyped_fields_are_all_listed(partner: Client) -> None:
    institution, event = fresh("innovation_day.registration_requested")
    del event["data"]["registration_id"]
    event["data"]["attendees"] = "3"
    event["specversion"] = 1.0
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "invalid"
    assert {("data", "registration_id"), ("data", "attendees"), ("specversion",)} <= locs(verdict)
    problems = {p.loc: p for p in verdict.errors}
    assert problems[("data", "registration_id")].type == "missing"
    assert problems[("data", "attendees")].type == "int_type"


async def test_an_amount_sent_as_a_number_is_told_to_be_text(partner: Client) -> None:
    """Amounts are decimal text (no parser rounds them): one sent as a JSON number was told
    "Input should be a valid string", which says nothing of why or how."""
    institution, event = fresh("call.published")
    event["data"]["budget"]["amount"] = 100000
    verdict = await offer(partner, institution, event)
    problems = {p.loc: p for p in verdict.errors}
    assert problems[("data", "budget", "amount")].msg == 'Input should be a string: write the number as one, "100000"'
    assert problems[("data", "budget", "amount")].type == "string_type"


async def test_a_value_of_another_type_or_outside_the_choices_is_told_what_it_was_and_the_choice_meant(
        partner: Client) -> None:
    """"Input should be a valid string" left a sender to find what it sent (a serializer's null,
    most often); a misspelt choice was answered with the whole list of choices."""
    institution, event = fresh("innovation_day.registration_requested")
    event["data"]["role"] = "funderr"
    event["data"]["attendees"] = None
    event["data"]["interests"] = {"theme": "education"}
    event["specversion"] = 1.0
    event["subject"] = None
    verdict = await offer(partner, institution, event)
    said = {p.loc: p.msg for p in verdict.errors}
    assert said[("data", "role")] == ("Input should be 'innovator', 'funder', 'observer' or 'speaker', not 'funderr'; "
                                      "did you mean 'funder'?")
    assert said[("data", "attendees")] == "Input should be a valid integer, not null"
    assert said[("data", "interests")] == "Input should be a valid array, not an object"
    assert said[("specversion",)] == "Input should be '1.0', not a number"
    assert said[("subject",)] == "Input should be a valid string, not null"


async def test_a_checks_words_are_not_prefixed_with_pydantics(partner: Client) -> None:
    institution, event = fresh("project.registered")
    event["data"]["themes"] = ["econmy"]
    verdict = await offer(partner, institution, event)
    assert [(p.loc, p.msg) for p in verdict.errors] == [
        (("data", "themes", 0), "unknown theme code 'econmy'; did you mean 'economy'?")]  # not "Value error, unknown …"


async def test_unknown_fields_in_data_are_refused(partner: Client) -> None:
    """A field the type's data does not have is refused, naming the type and the field most
    likely meant."""
    institution, event = fresh("project.registered")
    event["data"]["titel"] = {"en": "typo"}
    event["data"]["budget_eur"] = 1000
    verdict = await offer(partner, institution, event)
    assert locs(verdict) == {("data", "titel"), ("data", "budget_eur")} and codes(verdict) == {"extra_forbidden"}
    said = {p.loc: p.msg for p in verdict.errors}
    assert said[("data", "titel")] == "'titel' is not a field of project.registered's data; did you mean 'title'?"
    assert said[("data", "budget_eur")] == "'budget_eur' is not a field of project.registered's data"


async def test_an_unknown_field_inside_the_data_is_named_with_its_place_and_the_one_meant(partner: Client) -> None:
    institution, event = fresh("project.impact_reported")
    event["data"]["period"]["strat"] = event["data"]["period"].pop("start")
    event["data"]["indicators"][0]["unti"] = "meal"
    verdict = await offer(partner, institution, event)
    said = {p.loc: p.msg for p in verdict.errors if p.type == "extra_forbidden"}
    assert said == {
        ("data", "period", "strat"): "'strat' is not a field of data.period in project.impact_reported; did you mean 'start'?",
        ("data", "indicators", 0, "unti"): "'unti' is not a field of data.indicators[0] in project.impact_reported; did you mean 'unit'?",
    }
    assert {p.loc: p.type for p in verdict.errors}[("data", "period", "start")] == "missing"


async def test_an_attribute_the_envelope_does_not_have_is_refused_saying_which_it_has(partner: Client) -> None:
    """A CloudEvents extension from an SDK or a platform (`partitionkey`) and a misspelt
    attribute are refused with the attributes the network's events have, and the one meant."""
    institution, event = fresh("project.registered")
    event["partitionkey"] = "mersin"
    event["sujbect"] = event["subject"]
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "invalid" and locs(verdict) == {("partitionkey",), ("sujbect",)}
    said = {p.loc: p.msg for p in verdict.errors}
    assert said[("partitionkey",)].startswith("'partitionkey' is not an attribute the network's events have (they have specversion, id,")
    assert "correlationid, causationid, traceparent, tracestate and data: no other CloudEvents extension)" in said[("partitionkey",)]
    assert said[("sujbect",)].startswith("'sujbect' is not an attribute the network's events have; did you mean 'subject'? (they have")
    del event["partitionkey"], event["sujbect"]
    assert (await offer(partner, institution, event)).accepted  # the next good event flows


async def test_unknown_type_and_unknown_major_version(partner: Client) -> None:
    institution, event = fresh("project.registered", type="project.teleported")
    verdict = await offer(partner, institution, event)
    assert codes(verdict) == {"unknown_type"} and "project.teleported" in verdict.errors[0].msg

    institution, event = fresh("project.registered", type="project.registred")  # a typo: the verdict names the type meant
    verdict = await offer(partner, institution, event)
    assert codes(verdict) == {"unknown_type"} and "did you mean 'project.registered'?" in verdict.errors[0].msg

    institution, event = fresh("project.registered", dataschema="urn:collabbus:schema:project.registered:7")
    verdict = await offer(partner, institution, event)
    assert codes(verdict) == {"unknown_major"} and locs(verdict) == {("dataschema",)}


@pytest.mark.parametrize("dataschema", [{}, [], 1, True], ids=["object", "array", "number", "boolean"])
async def test_a_dataschema_that_is_no_string_is_refused_as_such_not_as_the_bus_failing(partner: Client, dataschema: Any) -> None:
    """A dataschema of another JSON type is the sender's mistake, named where it is: the bus once
    failed on it and answered ``unavailable`` (retry with the same id), which a sender would do forever."""
    institution, event = fresh("project.registered", dataschema=dataschema)
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "invalid" and locs(verdict) == {("dataschema",)}, verdict.as_dict()
    assert codes(verdict) == {"string_type"}
    institution, event = fresh("project.registered", type="project.registred", dataschema=dataschema)  # its type is judged all the same
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "invalid" and codes(verdict) == {"unknown_type", "string_type"}, verdict.as_dict()
    institution, event = fresh("project.registered")
    assert (await offer(partner, institution, event)).accepted  # the next good event flows


@pytest.mark.parametrize(
    ("attribute", "value", "loc"),
    [
        ("id", "has space", ("id",)),
        ("id", "x" * 129, ("id",)),
        ("id", 42, ("id",)),
        ("subject", "with.dot", ("subject",)),
        ("source", "/institutions/Not_Valid", ("source",)),
        ("source", "tr-mersin-bb", ("source",)),
        ("correlationid", "a b", ("correlationid",)),
    ],
)
async def test_bad_ids_are_refused(partner: Client, attribute: str, value: Any, loc: tuple[str, ...]) -> None:
    institution, event = fresh("project.registered", **{attribute: value})
    verdict = await offer(partner, institution, event)
    assert verdict.status == "rejected" and loc in locs(verdict)


async def test_bad_aggregate_id_in_data_is_refused(partner: Client) -> None:
    institution, event = fresh("project.registered")
    event["data"]["project_id"] = "has.dot"
    verdict = await offer(partner, institution, event)
    assert ("data", "project_id") in locs(verdict)


async def test_naive_datetimes_are_refused(partner: Client) -> None:
    institution, event = fresh("call.published", time="2026-11-23T10:00:00")
    event["data"]["deadline"] = "2027-01-31T23:59:59"
    verdict = await offer(partner, institution, event)
    assert {("time",), ("data", "deadline")} <= locs(verdict)
    assert codes(verdict) == {"timezone_aware"}


@pytest.mark.parametrize("text", ["2026-11-23 10:00:00Z", "2026-11-23T10:00:00+0000", "2026-11-23T10:00Z", "2026-02-30T10:00:00Z"])
async def test_times_are_rfc_3339_as_the_schemas_publish(partner: Client, text: str) -> None:
    """Python reads more than RFC 3339 (a space, +0000, no seconds); clients in other languages
    refuse such times, so the log must not carry them: refused at the gate, in the envelope and
    in the data alike."""
    institution, event = fresh("call.published", time=text)
    event["data"]["deadline"] = text
    verdict = await offer(partner, institution, event)
    assert verdict.status == "rejected"
    assert locs(verdict) == {("time",), ("data", "deadline")} and codes(verdict) == {"datetime_parsing"}
    assert all("RFC 3339" in error.msg for error in verdict.errors or [])


async def test_lower_case_t_and_z_are_rfc_3339_too(bus: Bus, partner: Client) -> None:
    from handlers.network import Event

    institution, event = fresh("call.published", time="2026-11-23t10:00:00z")
    event["data"]["deadline"] = "2099-01-31t23:59:59z"
    verdict = await offer(partner, institution, event)
    assert verdict.accepted, verdict
    assert verdict.seq is not None
    envelope, _ = await logged(bus, verdict.seq)
    applied = Event.from_envelope(envelope, seq=verdict.seq, logged_at=datetime.now(timezone.utc))  # as the consumers read it
    assert applied.time == datetime(2026, 11, 23, 10, tzinfo=timezone.utc)


async def test_a_moment_its_offset_takes_past_year_9999_or_before_year_1_is_refused(partner: Client) -> None:
    """Moments are kept, compared and counted from in UTC: `9999-12-31T23:59:59-14:00` is in year
    10000 there, which no date holds. It was logged, and its projection failed (OverflowError) for
    good. A moment is taken a day or more inside the years 1 to 9999."""
    for attribute, moment in (("ends_at", "9999-12-31T23:59:59-14:00"), ("time", "0001-01-01T00:00:00+14:00")):
        institution, event = fresh("innovation_day.scheduled")
        if attribute == "time":
            event["time"] = moment
        else:
            event["data"][attribute] = moment
        verdict = await offer(partner, institution, event)
        place = ("time",) if attribute == "time" else ("data", attribute)
        assert [(p.loc, p.type) for p in verdict.errors] == [(place, "datetime_parsing")], verdict.as_dict()
        assert verdict.errors[0].msg.endswith("in UTC, this one is not a day or more inside the years 1 to 9999")
    institution, event = fresh("innovation_day.scheduled")
    event["data"]["ends_at"] = "9999-12-30T09:59:59+14:00"  # (9999-12-29 in UTC: room for a meeting's slot after it)
    event["data"]["starts_at"] = "9999-12-30T08:00:00+14:00"
    assert (await offer(partner, institution, event)).accepted


async def test_dates_are_dates(partner: Client) -> None:
    institution, event = fresh("project.registered")
    event["data"]["started_on"] = "2026-01-01T00:00:00Z"
    verdict = await offer(partner, institution, event)
    assert locs(verdict) == {("data", "started_on")} and codes(verdict) == {"date_parsing"}


@pytest.mark.parametrize("url", ["https://example.org/%zz", "https://[::1/x", "https://example.org/a b"])
async def test_web_addresses_are_well_formed(partner: Client, url: str) -> None:
    institution, event = fresh("call.published")
    event["data"]["url"] = url
    verdict = await offer(partner, institution, event)
    assert locs(verdict) == {("data", "url")}


async def test_web_addresses_may_be_iris(partner: Client) -> None:
    institution, event = fresh("call.published")
    event["data"]["url"] = "https://kunta.fi/päivä?kieli=fi#ohjelma"
    assert (await offer(partner, institution, event)).accepted
    assert registry.json_schema("call.published")["properties"]["url"]["anyOf"][0]["format"] == "iri"


async def test_counts_have_an_upper_bound(partner: Client) -> None:
    """A number past 64 bits was logged, then could not be stored (the consumer retried it for
    minutes, holding every later event back) or came back as a float."""
    import json

    institution, event = fresh("innovation_day.scheduled")
    event["data"]["capacity"] = 10**20  # (JSON has no limit; orjson, which the bus's own client uses, stops at 64 bits)
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.innovation_day.scheduled", json.dumps(event).encode())
    assert locs(verdict) == {("data", "capacity")}
    institution, event = fresh("validation.requested")
    event["data"]["quorum"] = 2**63
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.validation.requested", json.dumps(event).encode())
    assert locs(verdict) == {("data", "quorum")} and codes(verdict) == {"less_than_equal"}


async def test_amounts_have_at_most_fifteen_digits_before_the_point_and_twelve_after(bus: Bus, partner: Client) -> None:
    """An amount of any length was taken: past 28 digits the sum of what a call awarded was
    rounded (and written with an exponent, which is no decimal text); a quadrillion or more is a
    mistake. The most there is, is taken, and its sums are exact."""
    institution, event = fresh("call.published")
    for amount, loc_type in (("1" + "0" * 15, "decimal_whole_digits"), ("1." + "0" * 13, "decimal_max_places")):
        event["id"], event["data"]["budget"]["amount"] = unique("ev"), amount
        verdict = await offer(partner, institution, event)
        assert [(p.loc, p.type) for p in verdict.errors] == [(("data", "budget", "amount"), loc_type)], verdict.as_dict()
        assert verdict.errors[0].msg.endswith(f"not {16 if loc_type == 'decimal_whole_digits' else 13}")
    event["id"], event["data"]["budget"]["amount"] = unique("ev"), "9" * 15 + "." + "9" * 12
    assert (await offer(partner, institution, event)).accepted


def test_events_the_log_holds_are_read_as_an_earlier_gate_accepted_them() -> None:
    """The checks added to the gate (RFC 3339 text, bounds on counts, well-formed addresses) are
    not applied again to logged events: a replay of an older log (rebuild, dlq replay, the live
    consumer's backlog) would refuse events that were accepted, and all that followed from them."""
    from handlers.network import Event

    institution, event = fresh("innovation_day.scheduled")
    event["data"].update(starts_at="2026-09-17 09:00:00+03:00", capacity=250_000, attendance_mode="online",
                         online_url="https://example.fi/?q=100%")
    applied = Event.from_envelope(event, seq=7, logged_at=datetime.now(timezone.utc))
    assert applied.data.capacity == 250_000 and applied.data.starts_at == datetime.fromisoformat("2026-09-17T09:00:00+03:00")
    with pytest.raises(ValueError) as refused:  # the gate's own reading
        registry.spec_for("innovation_day.scheduled").adapter.validate_python(event["data"])
    assert {error["loc"] for error in refused.value.errors()} == {("starts_at",), ("capacity",), ("online_url",)}  # type: ignore[attr-defined]
    institution, event = fresh("call.published")
    event["data"]["budget"]["amount"] = "1" + "0" * 30
    assert Event.from_envelope(event, seq=8, logged_at=datetime.now(timezone.utc)).data.budget.amount == "1" + "0" * 30


async def test_subject_must_name_the_aggregate(partner: Client) -> None:
    institution, event = fresh("project.registered", subject="another-project")
    verdict = await offer(partner, institution, event)
    assert codes(verdict) == {"subject_mismatch"}


# --------------------------------------------------------------------------- who may publish


async def test_a_spoofed_source_is_forbidden(partner: Client) -> None:
    _, event = fresh("project.registered")
    verdict = await offer(partner, "fi-thl", event)  # fi-thl offering an event in Mersin's name
    assert verdict.reason == "forbidden" and codes(verdict) == {"source_mismatch"}


async def test_a_project_is_registered_by_its_owner(partner: Client) -> None:
    institution, event = fresh("project.registered")
    event["data"]["owner"] = "fi-thl"  # Mersin registering a project as THL's
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "forbidden" and codes(verdict) == {"owner_mismatch"}
    assert locs(verdict) == {("data", "owner")} and "must be the sender" in verdict.errors[0].msg
    institution, event = fresh("project.registered")
    assert (await offer(partner, institution, event)).accepted  # the next one, its own, goes through


async def test_an_institution_registers_itself_for_a_day(partner: Client) -> None:
    institution, event = fresh("innovation_day.registration_requested")
    for someone in ("fi-thl", "no-such-member"):  # seats in another's name that nobody could cancel
        event["data"]["participant"] = someone
        verdict = await offer(partner, institution, event)
        assert verdict.reason == "forbidden" and codes(verdict) == {"participant_mismatch"}
        assert locs(verdict) == {("data", "participant")}
    institution, event = fresh("innovation_day.registration_requested")
    assert (await offer(partner, institution, event)).accepted


async def test_the_ingress_subject_must_match_the_type(partner: Client) -> None:
    institution, event = fresh("project.registered")
    body = orjson.dumps(event)
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project.updated", body)
    assert codes(verdict) == {"type_mismatch"}
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project", body)
    assert codes(verdict) == {"subject_invalid"}


async def test_a_kind_that_may_not_emit_the_type_is_forbidden(partner: Client) -> None:
    institution, event = fresh("call.published")
    event["source"] = "/institutions/operator"
    verdict = await offer(partner, "operator", event)
    assert verdict.reason == "forbidden" and codes(verdict) == {"kind_may_not_emit"}
    assert verdict.errors[0].msg == ("an institution of kind 'operator' may not emit call.published: every kind but "
                                     "'operator' may (GET /me lists what yours may)")
    event = fresh("validation.reviewer_assigned")[1]
    verdict = await offer(partner, institution, {**event, "source": f"/institutions/{institution}"})
    assert codes(verdict) == {"kind_may_not_emit"}
    assert ": only 'competence_centre' may (GET /me" in verdict.errors[0].msg


async def test_who_may_say_it_is_judged_before_what_it_says(partner: Client) -> None:
    # A workflow-only type with data that would not validate: forbidden, not a list of data errors.
    institution, event = fresh("project.registered")
    event.update(type="call.application_received", subject=event["subject"], data={"nothing": "right"})
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "forbidden" and codes(verdict) == {"kind_may_not_emit"}, verdict.as_dict()
    assert "workflows only" in verdict.errors[0].msg
    # A spoofed source with broken data: the source is what is refused.
    institution, event = fresh("project.registered", source="/institutions/someone-else")
    event["data"] = {"project_id": 7}
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "forbidden" and codes(verdict) == {"source_mismatch"}, verdict.as_dict()


async def test_non_members_may_not_publish(partner: Client) -> None:
    _, event = fresh("project.registered", source="/institutions/xx-stranger")
    verdict = await offer(partner, "xx-stranger", event)
    assert verdict.reason == "forbidden" and codes(verdict) == {"not_member"}


async def test_a_member_can_publish_as_soon_as_it_has_joined(bus: Bus, partner: Client) -> None:
    from tests.conftest import join

    newcomer = unique("fi-new")
    await join(partner, newcomer, "ngo")
    _, event = fresh("project.registered", source=f"/institutions/{newcomer}")
    event["data"]["owner"] = newcomer
    verdict = await offer(partner, newcomer, event)
    assert verdict.accepted, verdict.as_dict()


async def test_updates_and_leaving_are_about_members_only(bus: Bus, partner: Client) -> None:
    from tests.conftest import OPERATOR, join

    def about(event_type: str, institution: str, **data: Any) -> dict[str, Any]:
        return {"specversion": "1.0", "id": unique("ev"), "source": f"/institutions/{OPERATOR}", "type": event_type,
                "subject": institution, "data": {"id": institution, **data}}

    ghost = unique("xx-ghost")  # a typo of the operator's: it would be accepted and change nothing
    for refused in (about("institution.updated", ghost, website="https://example.org"),
                    about("institution.left", ghost)):
        verdict = await offer(partner, OPERATOR, refused)
        assert verdict.reason == "invalid" and [(p.loc, p.type) for p in verdict.errors] == [(("data", "id"), "not_member")]
        assert f"{ghost!r} is not a member of the network" in verdict.errors[0].msg
    member = unique("fi-member")
    await join(partner, member, "ngo")
    assert (await offer(partner, OPERATOR, about("institution.updated", member, website="https://example.org"))).accepted
    assert (await offer(partner, OPERATOR, about("institution.left", member))).accepted
    again = await offer(partner, OPERATOR, about("institution.left", member))  # it left already
    assert codes(again) == {"not_member"}
    # The network's operator stays one: it alone admits, changes and removes members.
    for locked in (about("institution.updated", OPERATOR, kind="university"), about("institution.left", OPERATOR),
                   {**about("institution.joined", OPERATOR, name={"en": "x"}, kind="ngo", country="FI")}):
        verdict = await offer(partner, OPERATOR, locked)
        assert verdict.reason == "forbidden" and codes(verdict) == {"operator_kept"}, verdict.as_dict()
    assert (await offer(partner, OPERATOR, about("institution.updated", OPERATOR, website="https://example.org"))).accepted


async def test_a_municipality_level_is_refused_for_a_member_that_is_no_municipality(bus: Bus, partner: Client) -> None:
    from tests.conftest import OPERATOR, join

    def update(institution: str, **changes: Any) -> dict[str, Any]:
        return {"specversion": "1.0", "id": unique("ev"), "source": f"/institutions/{OPERATOR}",
                "type": "institution.updated", "subject": institution, "data": {"id": institution, **changes}}

    ngo, town = unique("tr-ngo"), unique("tr-town")
    await join(partner, ngo, "ngo", "TR")
    await join(partner, town, "municipality", "TR", municipality_level="district")
    refused = await offer(partner, OPERATOR, update(ngo, municipality_level="district"))
    assert refused.reason == "invalid" and [(p.loc, p.type) for p in refused.errors] == [
        (("data", "municipality_level"), "municipalities_only")]
    assert f"{ngo!r} is of kind 'ngo'" in refused.errors[0].msg
    said_kind = await offer(partner, OPERATOR, update(town, kind="university", municipality_level="district"))
    assert said_kind.reason == "invalid" and codes(said_kind) == {"municipalities_only"}
    for accepted in (update(town, municipality_level="metropolitan"),  # a municipality's level changes
                     update(ngo, kind="municipality", municipality_level="provincial"),  # it becomes one
                     update(town, kind="cooperative"),  # it stops being one (and loses its level)
                     update(town, municipality_level=None)):
        verdict = await offer(partner, OPERATOR, accepted)
        assert verdict.accepted, verdict.as_dict()
    joined_wrong = await offer(partner, OPERATOR, {
        "specversion": "1.0", "id": unique("ev"), "source": f"/institutions/{OPERATOR}", "type": "institution.joined",
        "subject": unique("fi-uni"), "data": {"id": "x", "name": {"en": "U"}, "kind": "university", "country": "FI",
                                              "municipality_level": "district"}})
    assert ("data", "municipality_level") in [p.loc for p in joined_wrong.errors] and "municipalities_only" in codes(joined_wrong)


# --------------------------------------------------------------------------- size


async def test_an_oversize_event_is_refused_and_the_next_one_flows(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    event["data"]["summary"] = {"en": "x" * (bus.settings.max_event_bytes + 10)}
    before = await stream_messages(bus)
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "too_large" and codes(verdict) == {"too_large"}
    assert str(bus.settings.max_event_bytes) in verdict.errors[0].msg
    assert await stream_messages(bus) == before

    institution, event = fresh("project.registered")
    assert (await offer(partner, institution, event)).accepted


# --------------------------------------------------------------------------- idempotence


async def test_the_same_id_twice_is_one_event(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    first = await offer(partner, institution, event)
    before = await stream_messages(bus)
    second = await offer(partner, institution, event)
    assert first.accepted and second.accepted
    assert (first.duplicate, second.duplicate) == (False, True)
    assert second.seq == first.seq
    assert await stream_messages(bus) == before


async def test_an_id_taken_by_another_institution_is_refused(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    assert (await offer(partner, institution, event)).accepted
    other, second = fresh("validation.reviewer_assigned", id=event["id"])
    assert other != institution
    verdict = await offer(partner, other, second)
    assert verdict.status == "rejected" and codes(verdict) == {"id_taken"}


async def test_an_id_used_again_for_a_different_event_is_refused_not_dropped(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    first = await offer(partner, institution, event)
    retry = await offer(partner, institution, {**event, "time": "2026-12-01T10:00:00Z"})  # the same event, sent again later
    assert retry.accepted and retry.duplicate and retry.seq == first.seq
    changed = copy.deepcopy(event)
    changed["data"]["title"] = {"en": "Another project under the same id"}
    verdict = await offer(partner, institution, changed)  # it answered "duplicate" and dropped it
    assert verdict.reason == "invalid" and codes(verdict) == {"id_taken"} and locs(verdict) == {("id",)}
    assert f"already used (#{first.seq}) for a different event (its data differ)" in verdict.errors[0].msg


# --------------------------------------------------------------------------- binary mode and text


async def test_binary_mode_is_accepted_and_stored_structured(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered", time="2026-11-23T09:30:00+03:00", correlationid="conv:mersin.1")
    verdict = await offer(partner, institution, event, binary=True)
    assert verdict.accepted, verdict.as_dict()
    msg = await bus.js.get_msg(EVENTS_STREAM, verdict.seq or 0)
    assert msg.headers and msg.headers["Content-Type"] == "application/cloudevents+json"
    stored = orjson.loads(msg.data or b"")
    assert stored == {**event, "datacontenttype": "application/json"}


async def test_binary_mode_values_are_percent_decoded(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    headers = {
        "ce-specversion": "1.0",
        "ce-id": event["id"],
        "ce-source": "%2Finstitutions%2F" + institution,
        "ce-type": "project.registered",
        "ce-subject": event["subject"],
        "ce-time": "2026-11-23T09%3A30%3A00%2B03%3A00",
        "Content-Type": "application/json",
    }
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project.registered", orjson.dumps(event["data"]), headers)
    assert verdict.accepted, verdict.as_dict()
    stored, _ = await logged(bus, verdict.seq or 0)
    assert stored["time"] == "2026-11-23T09:30:00+03:00"
    assert stored["source"] == f"/institutions/{institution}"
    assert stored["datacontenttype"] == "application/json"


async def test_binary_mode_with_bad_percent_encoding_is_rejected(partner: Client) -> None:
    institution, event = fresh("project.registered")
    headers = {"ce-specversion": "1.0", "ce-id": "%FF%FE", "ce-type": "project.registered"}
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project.registered", b"{}", headers)
    assert verdict.reason == "malformed" and codes(verdict) == {"utf8_invalid"}


async def test_a_ce_header_value_outside_ascii_is_refused_saying_so_and_the_next_event_flows(partner: Client) -> None:
    """A binding's header values are percent-encoded UTF-8: a value sent as UTF-8 as it is, or as
    bytes that are not UTF-8 (nats-py reads them as U+FFFD), is told so, not that it misses a
    pattern."""
    from bus.cloudevents import to_binary

    institution, event = fresh("project.registered")
    attributes, data = to_binary(event)
    subject = f"collab.ingress.{institution}.project.registered"
    as_is = await offer_raw(partner, subject, data, {**attributes, "ce-subject": "proj-köök"})
    assert as_is.reason == "malformed" and codes(as_is) == {"percent_encoding_invalid"}, as_is.as_dict()
    assert as_is.errors[0].loc == ("subject",) and "'ö', outside ASCII" in as_is.errors[0].msg
    sent = partner._send_command

    async def not_utf8(command: bytes, priority: bool = False) -> None:  # the same length on the wire
        await sent(command.replace(b"proj-NOTUTF8", b"proj-\xff\xfe\xfdUTF8"), priority)

    partner._send_command = not_utf8  # type: ignore[method-assign, assignment]
    try:
        garbled = await offer_raw(partner, subject, data, {**attributes, "ce-subject": "proj-NOTUTF8"})
    finally:
        partner._send_command = sent  # type: ignore[method-assign]
    assert garbled.reason == "malformed" and codes(garbled) == {"utf8_invalid"}, garbled.as_dict()
    assert "ce-subject holds bytes that are not UTF-8" in garbled.errors[0].msg
    assert (await offer_raw(partner, subject, data, attributes)).accepted


async def test_a_text_holding_the_nul_character_is_refused_where_it_is_and_the_next_event_flows(partner: Client) -> None:
    """U+0000 is valid JSON and was logged; PostgreSQL's text cannot hold it, so the event's
    projection failed there, for good (the log keeps what it took). It is refused, in either mode,
    at each place it is (a text, a member's name); an attribute's or an id's pattern refuses it in
    its own words."""
    from bus.cloudevents import to_binary

    institution, event = fresh("project.registered")
    event["data"]["title"]["en"] = "Neighbourhood\u0000kitchens"
    event["data"]["location"] = {"country": "TR", "region": "Mersin\u0000"}
    event["id"] = "ev\u0000nul"
    verdict = await offer(partner, institution, event)
    assert verdict.reason == "invalid", verdict.as_dict()
    said = {p.loc: (p.type, p.msg) for p in verdict.errors}
    nul = ("string_nul", "Input should be text without the NUL character (U+0000), which the network's databases cannot store")
    assert said[("data", "title", "en")] == said[("data", "location", "region")] == nul
    assert said[("id",)][0] == "string_pattern_mismatch" and len(verdict.errors) == 3, verdict.as_dict()
    institution, event = fresh("project.registered")
    attributes, data = to_binary(event)
    subject = f"collab.ingress.{institution}.project.registered"
    binary = await offer_raw(partner, subject, data.replace(b'"title":{', b'"title":{"en-GB":"a\\u0000",', 1), attributes)
    assert [(p.loc, p.type) for p in binary.errors] == [(("data", "title", "en-GB"), "string_nul")], binary.as_dict()
    named = await offer_raw(partner, subject, data.replace(b'"title":{', b'"title":{"x\\u0000":"y",', 1), attributes)
    assert (("data", "title", "x\x00"), "string_nul") in [(p.loc, p.type) for p in named.errors], named.as_dict()
    assert (await offer_raw(partner, subject, data, attributes)).accepted
    escaped = copy.deepcopy(event)  # a backslash before u0000 is text, no NUL
    escaped["id"], escaped["data"]["title"]["en"] = unique("ev"), "C:\\u0000"
    assert (await offer(partner, institution, escaped)).accepted


async def test_deeply_nested_data_is_refused_in_either_mode_and_the_next_event_flows(partner: Client) -> None:
    institution, event = fresh("project.registered")
    nested = b'{"zz": ' + b"[" * 400 + b"]" * 400 + b"}"
    headers = {"ce-specversion": "1.0", "ce-id": event["id"], "ce-source": event["source"], "ce-type": event["type"],
               "ce-subject": event["subject"], "Content-Type": "application/json"}
    subject = f"collab.ingress.{institution}.project.registered"
    binary = await offer_raw(partner, subject, nested, headers)  # (it was an internal error, "retry with the same id")
    structured = orjson.dumps({k: v for k, v in event.items() if k != "data"})[:-1] + b', "data": ' + nested + b"}"
    whole = await offer_raw(partner, subject, structured, {"Content-Type": "application/cloudevents+json"})
    for verdict in (binary, whole):
        assert verdict.reason == "invalid" and codes(verdict) == {"json_invalid"}, verdict.as_dict()
    assert (await offer(partner, institution, event)).accepted


@pytest.mark.parametrize("content_type, says", [
    ("application/cloudevents-batch+json", "is offered over HTTP (POST /events)"),
    ("application/cloudevents+xml", "a structured event is application/cloudevents+json"),
    ("application/cloudevents+json; charset=latin-1", "charset latin-1 is not supported"),
    ("application/json; charset=iso-8859-9", "charset iso-8859-9 is not supported"),
])
async def test_content_types_that_are_not_one_json_event_are_unsupported(partner: Client, content_type: str, says: str) -> None:
    institution, event = fresh("project.registered")
    body = orjson.dumps([event] if "batch" in content_type else event)
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project.registered", body, {"Content-Type": content_type})
    assert verdict.reason == "unsupported" and codes(verdict) == {"unsupported_content_type"}, verdict.as_dict()
    assert says in verdict.errors[0].msg
    fine = await offer_raw(partner, f"collab.ingress.{institution}.project.registered", orjson.dumps(event),
                           {"Content-Type": "application/cloudevents+json; charset=UTF-8"})
    assert fine.accepted, fine.as_dict()


async def test_binary_data_that_is_not_json_is_unsupported_as_over_http(partner: Client) -> None:
    """A binary-mode offer whose Content-Type says its data is not JSON is refused as POST /events
    refuses it (unsupported, 415 there), naming the id its ce-id header gives."""
    from bus.cloudevents import to_binary

    institution, event = fresh("project.registered")
    headers, body = to_binary(event)
    subject = f"collab.ingress.{institution}.project.registered"
    verdict = await offer_raw(partner, subject, body, {**headers, "content-type": "text/plain"})
    assert verdict.reason == "unsupported" and codes(verdict) == {"unsupported_content_type"}, verdict.as_dict()
    assert "text/plain is not accepted" in verdict.errors[0].msg and verdict.id == event["id"]
    fine = await offer_raw(partner, subject, body, {**headers, "content-type": "application/json; charset=utf-8"})
    assert fine.accepted, fine.as_dict()


@pytest.mark.parametrize("mode", ["structured", "binary"])
async def test_json_data_with_its_charset_said_is_json(partner: Client, bus: Bus, mode: str) -> None:
    """`application/json; charset=utf-8` as the datacontenttype is application/json (what a
    CloudEvents SDK may send): accepted and logged as that; another charset is still refused."""
    from bus.cloudevents import to_binary

    institution, event = fresh("project.registered")
    event["datacontenttype"] = "application/json; charset=UTF-8"
    subject = f"collab.ingress.{institution}.project.registered"
    if mode == "structured":
        verdict = await offer_raw(partner, subject, orjson.dumps(event), {"Content-Type": "application/cloudevents+json"})
    else:
        headers, body = to_binary({k: v for k, v in event.items() if k != "datacontenttype"})
        headers.pop("content-type")
        headers["ce-datacontenttype"] = "application/json;charset=utf-8"
        verdict = await offer_raw(partner, subject, body, headers)
    assert verdict.accepted, verdict.as_dict()
    logged = orjson.loads((await bus.js.get_msg(EVENTS_STREAM, verdict.seq)).data or b"")
    assert logged["datacontenttype"] == "application/json"
    _, other = fresh("project.registered", datacontenttype="application/json; charset=latin-1")
    refused = await offer_raw(partner, subject, orjson.dumps(other), {"Content-Type": "application/cloudevents+json"})
    assert refused.reason == "invalid" and refused.errors[0].loc == ("datacontenttype",), refused.as_dict()


async def test_a_ce_data_header_is_refused_rather_than_dropped(partner: Client) -> None:
    from bus.cloudevents import to_binary

    institution, event = fresh("project.registered")
    headers, body = to_binary(event)
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project.registered", body, {**headers, "ce-data": "x"})
    assert verdict.reason == "malformed" and verdict.errors[0].type == "data_in_header" and verdict.id == event["id"]


@pytest.mark.parametrize("broken", ["data", "header"])
async def test_a_binary_offer_whose_data_or_a_header_cannot_be_read_is_refused_by_its_id(partner: Client, broken: str) -> None:
    """Its ce-id could be read: the refusal names it (as for any other refusal of a readable id)."""
    from bus.cloudevents import to_binary

    institution, event = fresh("project.registered")
    headers, body = to_binary(event)
    headers["ce-id"] = quote(event["id"] + "-ä")  # (percent-encoded, as the binding has it)
    if broken == "data":
        body = b"not json"
    else:
        headers["ce-tracestate"] = "k=%FF"
    verdict = await offer_raw(partner, f"collab.ingress.{institution}.project.registered", body, headers)
    assert verdict.reason == "malformed" and verdict.id == event["id"] + "-ä", verdict.as_dict()


TEXTS = {
    "fi": "Sosiaalisten innovaatioiden osaamiskeskus – äö å ÄÖÅ",
    "tr": "Mahalle Mutfakları: İyi uygulamaların ışığında ıIiİ ğüşöç",
    "ar": "مراكز الابتكار الاجتماعي تدعم المبتكرين",
    "en": "Neighbourhood kitchens 🍲🤝 with zero-width joiner 👩‍🍳",
}


async def test_unicode_survives_byte_for_byte(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    event["data"]["title"] = TEXTS
    event["data"]["summary"] = {"ar": TEXTS["ar"], "tr": TEXTS["tr"]}
    for binary in (False, True):
        event["id"] = unique("uni")
        verdict = await offer(partner, institution, event, binary=binary)
        assert verdict.accepted, verdict.as_dict()
        stored, raw = await logged(bus, verdict.seq or 0)
        assert stored["data"]["title"] == TEXTS
        for text in TEXTS.values():
            assert text.encode("utf-8") in raw  # stored as UTF-8, not escaped or normalised


# --------------------------------------------------------------------------- time


async def test_the_gate_sets_the_time_when_absent(bus: Bus, partner: Client) -> None:
    institution, event = fresh("project.registered")
    event.pop("time", None)
    verdict = await offer(partner, institution, event)
    stored, _ = await logged(bus, verdict.seq or 0)
    assert stored["time"].endswith("+00:00")


async def test_a_members_kind_is_the_last_one_an_update_gave_it_also_when_read_afresh(bus: Bus, partner: Client) -> None:
    """A gate that starts (or restarts) reads a member's kind from the log: an update that does not
    restate the kind keeps the one an earlier update gave, not the one it joined with."""
    from bus.membership import Membership
    from tests.conftest import OPERATOR, join

    institution = unique("fi-promoted")
    await join(partner, institution, "public_agency")

    async def update(**data: Any) -> None:
        event = {"specversion": "1.0", "id": unique("ev"), "source": f"/institutions/{OPERATOR}", "type": "institution.updated",
                 "subject": institution, "data": {"id": institution, **data}}
        assert (await offer(partner, OPERATOR, event)).accepted

    await update(kind="competence_centre")
    await update(website="https://example.org")
    fresh = Membership(bus.nc, bus.js)  # nothing cached: as after a restart
    assert await fresh.kind_of(institution) == "competence_centre"


async def test_a_members_kind_follows_the_log_not_an_update_the_log_refused(bus: Bus, partner: Client) -> None:
    """The gate's members come from the institution events the log stored: an update offered under
    an id another event holds is published to the log's subject before the log refuses it
    (``id_taken``), and changes nothing; a stored update does."""
    from tests.conftest import OPERATOR, join

    institution = unique("fi-kept")
    await join(partner, institution, "public_agency")
    assert await bus.gate.membership.kind_of(institution) == "public_agency"

    def update(event_id: str, kind: str) -> dict[str, Any]:
        return {"specversion": "1.0", "id": event_id, "source": f"/institutions/{OPERATOR}", "type": "institution.updated",
                "subject": institution, "data": {"id": institution, "kind": kind}}

    taken_id = unique("ev")
    assert (await offer(partner, OPERATOR, update(taken_id, "public_agency"))).accepted
    clash = await offer(partner, OPERATOR, update(taken_id, "competence_centre"))
    assert not clash.accepted and clash.errors[0].type == "id_taken", clash.as_dict()
    await bus.nc.flush()  # (what the gate's connection was sent before its verdict has been read by now)
    await asyncio.sleep(0.1)
    assert await bus.gate.membership.kind_of(institution) == "public_agency"  # the cached kind

    assert (await offer(partner, OPERATOR, update(unique("ev"), "university"))).accepted
    deadline = asyncio.get_running_loop().time() + 5
    while await bus.gate.membership.kind_of(institution) != "university" and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
    assert await bus.gate.membership.kind_of(institution) == "university"
