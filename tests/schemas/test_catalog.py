"""The catalog as a whole: every type has a model, a fixture and a JSON Schema that agree."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from pydantic import BaseModel, ValidationError

from schemas import (
    REGISTRY,
    EventData,
    UnknownEventType,
    UnknownMajorVersion,
    calls,
    common,
    event_types,
    export_json_schemas,
    innovation_days,
    institutions,
    json_schema,
    may_emit,
    parse_dataschema,
    projects,
    spec_for,
    validations,
)
from schemas.common import InstitutionKind, ValueObject

pytestmark = pytest.mark.quick

FIXTURES = Path(__file__).parents[1] / "fixtures" / "events"
FIXTURE_FILES = sorted(FIXTURES.glob("*.json"))

CATALOG_V1 = {
    "institution.joined", "institution.updated", "institution.left",
    "call.published", "call.amended", "call.closed", "call.application_submitted",
    "call.application_received", "call.application_rejected", "call.application_decided",
    "call.application_withdrawn", "call.full_proposal_submitted", "call.application_lapsed", "call.action_rejected",
    "project.registered", "project.updated", "project.partner_joined", "project.adopted",
    "project.impact_reported", "project.completed", "project.action_rejected",
    "validation.requested", "validation.reviewer_assigned", "validation.reviewer_unassigned", "validation.info_requested",
    "validation.info_provided", "validation.review_submitted", "validation.review_overdue", "validation.decided",
    "validation.withdrawn", "validation.action_rejected",
    "innovation_day.scheduled", "innovation_day.rescheduled", "innovation_day.cancelled",
    "innovation_day.held", "innovation_day.registration_requested",
    "innovation_day.registration_confirmed", "innovation_day.registration_waitlisted",
    "innovation_day.registration_rejected", "innovation_day.registration_changed", "innovation_day.registration_cancelled",
    "innovation_day.meetings_proposed", "innovation_day.action_rejected",
}  # fmt: skip
"""The contract's v1 catalog, with ``innovation_day.action_rejected`` added by the bus (an
organiser's event that cannot stand is refused, as calls', projects' and validations' are) and
``validation.reviewer_unassigned`` (a coordinator could assign a reviewer, never take one off),
``call.application_decided`` and ``call.application_withdrawn`` (a funder could receive
applications, never say which it funds; an applicant could not take one back), and
``call.full_proposal_submitted`` and ``call.application_lapsed`` (a call's ``two_stage`` deadline
model had no second stage), and ``validation.review_overdue`` (a coordinator learnt of a late
reviewer only by looking), and ``innovation_day.registration_changed`` (a participant bringing one
more or one fewer had to give its seat up and register again, behind the waitlist)."""


def load(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(params=FIXTURE_FILES, ids=lambda p: p.stem)
def fixture(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


# --- the registry -----------------------------------------------------------------------------


def test_registry_covers_exactly_the_v1_catalog() -> None:
    assert len(CATALOG_V1) == 43
    assert set(event_types()) == CATALOG_V1
    assert event_types() == sorted(CATALOG_V1)
    assert set(REGISTRY) == {(t, 1) for t in CATALOG_V1}
    assert {p.stem for p in FIXTURE_FILES} == CATALOG_V1


def test_spec_parts() -> None:
    spec = spec_for("project.registered")
    assert (spec.domain, spec.event, spec.major) == ("project", "registered", 1)
    assert spec.dataschema == "urn:collabbus:schema:project.registered:1"
    assert spec.subject_field == "project_id"
    assert spec_for("institution.left").subject_field == "id"
    assert spec.adapter is spec_for("project.registered").adapter  # built once


def test_every_model_is_frozen_and_refuses_unknown_fields() -> None:
    for spec in REGISTRY.values():
        assert issubclass(spec.model, EventData)
        assert spec.model.model_config.get("frozen") is True, spec.type
        assert spec.model.model_config.get("extra") == "forbid", spec.type
    # Nested parts too: every model in the package is event data or a frozen value object.
    for module in (common, institutions, calls, projects, validations, innovation_days):
        for name, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, BaseModel) and value is not BaseModel:
                assert issubclass(value, (EventData, ValueObject)), name


def test_lookup_errors_name_what_is_unknown() -> None:
    with pytest.raises(UnknownEventType, match=r"project\.deleted") as unknown:
        spec_for("project.deleted")
    assert "did you mean" not in str(unknown.value)  # nothing in the catalog is near it
    with pytest.raises(UnknownEventType, match=r"unknown event type 'project\.registerd'; did you mean 'project\.registered'\?"):
        spec_for("project.registerd")
    with pytest.raises(UnknownMajorVersion, match="no major version 2"):
        spec_for("project.registered", 2)


def test_dataschema() -> None:
    assert parse_dataschema(None, "call.closed") == 1
    assert parse_dataschema("urn:collabbus:schema:call.closed:1", "call.closed") == 1
    assert parse_dataschema("urn:collabbus:schema:call.closed:2", "call.closed") == 2
    with pytest.raises(ValueError, match=r"names type 'call\.published'"):
        parse_dataschema("urn:collabbus:schema:call.published:1", "call.closed")
    for malformed in ("urn:collabbus:schema:call.closed", "urn:collabbus:schema:call.closed:0",
                      "urn:collabbus:schema:call.closed:v1", "https://example.org/call.closed",
                      "urn:collabbus:schema:call.closed:1 ", ""):  # fmt: skip
        with pytest.raises(ValueError, match="is not of the form"):
            parse_dataschema(malformed, "call.closed")
    # The major parses; whether it exists is the registry's answer.
    with pytest.raises(UnknownMajorVersion):
        spec_for(
            "call.closed", parse_dataschema("urn:collabbus:schema:call.closed:7", "call.closed")
        )


@pytest.mark.parametrize(
    ("kind", "type_", "allowed"),
    [
        ("operator", "call.published", False),
        ("municipality", "call.published", True),
        ("funder", "call.closed", True),
        ("operator", "institution.joined", True),
        ("municipality", "institution.joined", False),
        ("competence_centre", "validation.decided", True),
        ("university", "validation.decided", False),
        ("competence_centre", "validation.reviewer_assigned", True),
        ("ngo", "validation.reviewer_assigned", False),
        ("operator", "project.registered", True),
        ("cooperative", "innovation_day.registration_requested", True),
        ("competence_centre", "validation.action_rejected", False),
        ("funder", "call.action_rejected", False),
        ("municipality", "project.action_rejected", False),
        ("funder", "call.application_received", False),
        ("municipality", "no.such_type", False),
        ("municipality", "project.registered", True),
        ("municipality", "project.registered", True),
        ("astronaut", "project.registered", False),
    ],
)
def test_may_emit(kind: str, type_: str, allowed: bool) -> None:
    assert may_emit(kind, type_) is allowed


def test_nobody_outside_emits_bus_only_types() -> None:
    bus_only = {
        "call.application_received", "call.application_rejected", "call.application_lapsed", "call.action_rejected",
        "project.action_rejected", "validation.review_overdue", "validation.action_rejected",
        "innovation_day.registration_confirmed", "innovation_day.registration_waitlisted",
        "innovation_day.registration_rejected", "innovation_day.meetings_proposed", "innovation_day.action_rejected",
    }  # fmt: skip
    for type_ in bus_only:
        assert spec_for(type_).workflow and not spec_for(type_).emitters
        assert not any(may_emit(kind, type_) for kind in InstitutionKind)
    assert spec_for("call.closed").workflow and spec_for("validation.decided").workflow
    assert {t for t in CATALOG_V1 if spec_for(t).workflow} == bus_only | {
        "call.closed",
        "validation.decided",
    }


# --- the fixtures -----------------------------------------------------------------------------


def test_fixture_validates_and_is_well_formed(fixture: dict[str, Any]) -> None:
    event = fixture["event"]
    spec = spec_for(event["type"])
    data = spec.adapter.validate_python(event["data"])
    assert spec.adapter.validate_json(json.dumps(event["data"])) == data
    assert event["specversion"] == "1.0"
    assert event["datacontenttype"] == "application/json"
    assert event["source"] == f"/institutions/{fixture['as']}"
    assert event["subject"] == event["data"][spec.subject_field]
    assert re.search(r"[+-]\d\d:\d\d$", event["time"])
    assert fixture["kind"] in set(InstitutionKind)
    if spec.emitters:
        assert may_emit(fixture["kind"], spec.type)


def test_fixture_round_trips_unchanged(fixture: dict[str, Any]) -> None:
    """What a consumer re-serialises is what the producer sent: text byte for byte."""
    spec = spec_for(fixture["event"]["type"])
    data = spec.adapter.validate_python(fixture["event"]["data"])
    assert (
        spec.adapter.dump_python(data, mode="json", exclude_unset=True) == fixture["event"]["data"]
    )


def test_fixtures_have_unique_ids_and_every_script() -> None:
    events = [load(p)["event"] for p in FIXTURE_FILES]
    assert len({e["id"] for e in events}) == len(events)
    text = "".join(p.read_text(encoding="utf-8") for p in FIXTURE_FILES)
    for needle in ("ı", "İ", "ä", "ö", "ع", "🍲"):
        assert needle in text, needle


# --- JSON Schemas -----------------------------------------------------------------------------


def test_json_schema_head() -> None:
    schema = json_schema("validation.review_submitted")
    assert schema["$id"] == "urn:collabbus:schema:validation.review_submitted:1"
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "validation.review_submitted v1"
    Draft202012Validator.check_schema(schema)


def test_exported_schemas_agree_with_the_models(tmp_path: Path) -> None:
    paths = export_json_schemas(tmp_path)
    assert len(paths) == len(CATALOG_V1)
    assert {p.name for p in tmp_path.iterdir()} == {f"{t}.v1.json" for t in CATALOG_V1}
    for path in FIXTURE_FILES:
        event = load(path)["event"]
        schema = load(tmp_path / f"{event['type']}.v1.json")
        Draft202012Validator.check_schema(schema)
        validator = Draft202012Validator(schema)
        data = event["data"]
        assert not list(validator.iter_errors(data)), event["type"]

        subject_field = spec_for(event["type"]).subject_field
        for invalid in (
            {**data, "unexpected": 1},
            {k: v for k, v in data.items() if k != subject_field},
            {**data, subject_field: "has.a.dot"},
        ):
            assert not validator.is_valid(invalid), (event["type"], invalid)
            with pytest.raises(ValidationError):
                spec_for(event["type"]).adapter.validate_python(invalid)


def fixture_data(event_type: str, **changes: Any) -> dict[str, Any]:
    data = {**load(FIXTURES / f"{event_type}.json")["event"]["data"], **changes}
    return {key: value for key, value in data.items() if value is not DROP}


DROP = object()
"""A field left out by :func:`fixture_data`."""


@pytest.mark.parametrize(("event_type", "changes", "valid"), [
    # An offline gathering needs a venue, an online one an online_url, a mixed one both.
    ("innovation_day.scheduled", {"attendance_mode": "offline", "online_url": DROP}, True),
    ("innovation_day.scheduled", {"attendance_mode": "offline", "venue": DROP}, False),
    ("innovation_day.scheduled", {"attendance_mode": "online", "venue": DROP}, True),
    ("innovation_day.scheduled", {"attendance_mode": "online", "online_url": DROP}, False),
    ("innovation_day.scheduled", {"attendance_mode": "mixed", "online_url": None}, False),
    # A validation is of a project of the network or of one known elsewhere: exactly one.
    ("validation.requested", {"project_id": DROP, "external_ref": {"system": "innokyla", "id": "1234"}}, True),
    ("validation.requested", {"external_ref": {"system": "innokyla", "id": "1234"}}, False),
    ("validation.requested", {"project_id": DROP}, False),
    ("validation.requested", {"project_id": None, "external_ref": {"system": "innokyla", "id": "1234"}}, True),
    # A self-assessment says something: a score or a statement.
    ("validation.requested", {"self_assessment": {"scores": {"novelty": 4}}}, True),
    ("validation.requested", {"self_assessment": {"statement": {"en": "we think it works"}}}, True),
    ("validation.requested", {"self_assessment": {"scores": {}}}, False),
    ("validation.requested", {"self_assessment": {"evidence_level": 2}}, False),
    # A decision by the rule carries every criterion's median; a coordinator's need not.
    ("validation.decided", {"decided_by": "rule", "median_scores": {"novelty": 4}}, False),
    ("validation.decided", {"decided_by": "coordinator", "median_scores": {"novelty": 4}}, True),
    ("validation.decided", {"decided_by": "rule", "median_scores": DROP}, False),
    ("validation.decided", {"decided_by": "coordinator", "median_scores": DROP}, True),
    # An amount is awarded with the decision 'awarded' alone.
    ("call.application_decided", {"decision": "declined"}, False),
    ("call.application_decided", {"decision": "invited", "awarded_amount": None}, True),
    # A full proposal's deadline is a two-stage call's.
    ("call.published", {"deadline_model": "single_stage", "full_proposal_deadline": "2026-10-01T12:00:00+02:00"}, False),
    ("call.published", {"deadline_model": "single_stage", "full_proposal_deadline": DROP}, True),
    # A municipality level is a municipality's.
    ("institution.joined", {"municipality_level": "district"}, False),
    ("institution.joined", {"kind": "municipality", "municipality_level": "district"}, True),
    ("institution.updated", {"kind": "ngo", "municipality_level": "district"}, False),
    ("institution.updated", {"municipality_level": "district"}, True),
])
def test_exported_schema_says_which_fields_go_together_as_the_model_does(
    tmp_path: Path, event_type: str, changes: dict[str, Any], valid: bool
) -> None:
    """Rules across fields that JSON Schema can state (not the order of times): a partner's own
    validator refuses what the gate refuses."""
    export_json_schemas(tmp_path)
    validator = Draft202012Validator(load(tmp_path / f"{event_type}.v1.json"))
    data = fixture_data(event_type, **changes)
    assert validator.is_valid(data) is valid, list(validator.iter_errors(data))
    if valid:
        spec_for(event_type).adapter.validate_python(data)
    else:
        with pytest.raises(ValidationError):
            spec_for(event_type).adapter.validate_python(data)


def test_exported_schemas_refuse_the_nul_character_the_gate_refuses(tmp_path: Path) -> None:
    """The gate refuses U+0000 in any text (`string_nul`, by one search of the body, not by the
    models): the schemas say so of every free text, so a partner's validator refuses it first."""
    from schemas.envelope import CloudEvent

    export_json_schemas(tmp_path)
    project = Draft202012Validator(load(tmp_path / "project.registered.v1.json"))
    data = load(FIXTURES / "project.registered.json")["event"]["data"]
    assert project.is_valid(data)
    for invalid in (
        {**data, "title": {"en": "Mahalle\u0000Mutfakları"}},
        {**data, "location": {**data["location"], "region": "Mersin\u0000"}},
        {**data, "external_refs": [{"system": "innokyla", "id": "\u0000"}]},
    ):
        assert not project.is_valid(invalid), invalid
    member = Draft202012Validator(load(tmp_path / "institution.joined.v1.json"))
    joined = load(FIXTURES / "institution.joined.json")["event"]["data"]
    assert not member.is_valid({**joined, "identifiers": [{"scheme": "fi-business-id", "value": "1234567-8\u0000"}]})
    envelope = Draft202012Validator(CloudEvent.model_json_schema())
    event = load(FIXTURES / "project.registered.json")["event"]
    assert envelope.is_valid({**event, "tracestate": "vendor=1"})
    assert not envelope.is_valid({**event, "tracestate": "vendor=\u0000"})


def test_exported_schema_refuses_what_the_model_refuses_in_vocabularies(tmp_path: Path) -> None:
    export_json_schemas(tmp_path)
    validator = Draft202012Validator(load(tmp_path / "project.registered.v1.json"))
    data = load(FIXTURES / "project.registered.json")["event"]["data"]
    for invalid in (
        {**data, "themes": ["sports"]},
        {**data, "location": {"country": "XX"}},
        {**data, "title": {}},
        {**data, "title": {"tr_TR": "Mahalle Mutfakları"}},
        {**data, "sdgs": [18]},
    ):
        assert not validator.is_valid(invalid), invalid
