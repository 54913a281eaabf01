"""What the catalog refuses, and where the error points (the gate reports `loc` to partners)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from schemas import REGISTRY, spec_for
from schemas.calls import ApplicationDecided, CallPublished
from schemas.innovation_days import RegistrationRequested
from schemas.institutions import InstitutionJoined
from schemas.validations import ReviewSubmitted

pytestmark = pytest.mark.quick

FIXTURES = Path(__file__).parents[1] / "fixtures" / "events"


def data_of(type_: str, **changes: Any) -> dict[str, Any]:
    """The fixture's data for `type_`, with some top-level fields replaced."""
    event = json.loads((FIXTURES / f"{type_}.json").read_text(encoding="utf-8"))["event"]
    return {**event["data"], **changes}


def errors(type_: str, data: dict[str, Any]) -> list[ErrorDetails]:
    with pytest.raises(ValidationError) as caught:
        spec_for(type_).adapter.validate_python(data)
    return caught.value.errors(include_url=False)


def locs(type_: str, data: dict[str, Any]) -> set[tuple[str | int, ...]]:
    return {tuple(e["loc"]) for e in errors(type_, data)}


def test_models_are_frozen() -> None:
    for spec in REGISTRY.values():
        data = spec.adapter.validate_python(data_of(spec.type))
        with pytest.raises(ValidationError, match="frozen"):
            setattr(data, spec.subject_field, "other")


def test_unknown_fields_are_refused_where_they_are() -> None:
    for spec in REGISTRY.values():
        assert locs(spec.type, data_of(spec.type, titel={"en": "typo"})) == {("titel",)}
    nested = data_of("call.published", budget={"amount": "1", "currency": "EUR", "vat": "0"})
    assert locs("call.published", nested) == {("budget", "vat")}


def test_naive_datetime() -> None:
    [error] = errors("call.published", data_of("call.published", opens_at="2026-03-01T09:00:00"))
    assert (error["loc"], error["type"]) == (("opens_at",), "timezone_aware")


def test_timestamps_are_text_not_numbers() -> None:
    assert locs("call.published", data_of("call.published", opens_at=1772352000)) == {("opens_at",)}
    assert locs("project.registered", data_of("project.registered", started_on=20200401)) == {
        ("started_on",)
    }


@pytest.mark.parametrize("bad", ["TR-Mersin-BB", "tr_mersin_bb", "x", "-tr-mersin", "tr.mersin"])
def test_bad_institution_id(bad: str) -> None:
    assert locs("project.registered", data_of("project.registered", owner=bad)) == {("owner",)}


@pytest.mark.parametrize("bad", ["mersin.mahalle", "", "a" * 129, "mahalle mutfakları"])
def test_bad_aggregate_id(bad: str) -> None:
    assert locs("project.adopted", data_of("project.adopted", project_id=bad)) == {("project_id",)}


def test_localized_text() -> None:
    assert locs("project.registered", data_of("project.registered", title={})) == {("title",)}
    assert locs("project.registered", data_of("project.registered", title={"tr": ""})) == {
        ("title", "tr")
    }
    assert locs("project.registered", data_of("project.registered", title={"tr_TR": "x"})) == {
        ("title", "tr_TR", "[key]")
    }
    exact = {"tr": "  Mahalle\u00a0Mutfakları\n", "ar": "المطابخ المجتمعية ", "sv-FI": "Kök 🍲"}
    data = spec_for("project.registered").adapter.validate_python(
        data_of("project.registered", title=exact)
    )
    assert data.title == exact  # type: ignore[attr-defined]


@pytest.mark.parametrize("code", ["sports", "health_care.dentistry", "education.", ".literacy"])
def test_unknown_theme_code_is_named(code: str) -> None:
    [error] = errors("project.registered", data_of("project.registered", themes=["economy", code]))
    assert error["loc"] == ("themes", 1)
    assert repr(code) in error["msg"]


@pytest.mark.parametrize(("code", "hint"), [
    ("elderly_care", "did you mean 'health_care.elderly_care'?"),
    ("health", "did you mean 'health_care'?"),
    ("educaton.literacy", "did you mean 'education.literacy'"),
    ("sports", "the areas are economy, education, environment_urbanisation, health_care, migration_population,"),
])
def test_an_unknown_theme_code_is_answered_with_the_codes_it_was_probably_meant_to_be(code: str, hint: str) -> None:
    [error] = errors("project.registered", data_of("project.registered", themes=[code]))
    assert hint in error["msg"], error["msg"]


def test_known_theme_codes() -> None:
    themes = ["education", "education.literacy", "migration_population.ageing"]
    spec_for("project.registered").adapter.validate_python(
        data_of("project.registered", themes=themes)
    )


@pytest.mark.parametrize("bad", ["XX", "tr", "TUR", "UK", "EU"])
def test_bad_country(bad: str) -> None:
    location = {"country": bad, "region": "Mersin"}
    assert locs("project.registered", data_of("project.registered", location=location)) == {
        ("location", "country")
    }


@pytest.mark.parametrize("bad", ["EUX", "eur", "HRK", "XAU", "€"])
def test_bad_currency(bad: str) -> None:
    budget = {"amount": "1500000.00", "currency": bad}
    assert locs("call.published", data_of("call.published", budget=budget)) == {
        ("budget", "currency")
    }


@pytest.mark.parametrize(
    "bad", ["1.500.000,00", "1e6", "-5.00", "", ".5", "5.", "١٥٠٠", 1500000, "1 500 000"]
)
def test_bad_amount(bad: object) -> None:
    budget = {"amount": bad, "currency": "EUR"}
    assert locs("call.published", data_of("call.published", budget=budget)) == {
        ("budget", "amount")
    }


def test_indicator_values_may_be_negative_decimals() -> None:
    indicators = [{"name": {"en": "Change in waiting time"}, "value": "-3.5", "unit": "days"}]
    spec_for("project.impact_reported").adapter.validate_python(
        data_of("project.impact_reported", indicators=indicators)
    )


@pytest.mark.parametrize("bad", [0, 6, "3", 3.5, True, None])
def test_bad_score(bad: object) -> None:
    scores = {**data_of("validation.review_submitted")["scores"], "equity": bad}
    assert locs(
        "validation.review_submitted", data_of("validation.review_submitted", scores=scores)
    ) == {("scores", "equity")}


def test_a_whole_number_written_with_a_fraction_of_zero_is_the_integer() -> None:
    """JSON Schema's ``integer`` takes 4.0 (some clients write whole floats that way); the models
    read it as 4, in Python and from JSON text, and still refuse 4.5, "4" and true."""
    scores = {**data_of("validation.review_submitted")["scores"], "equity": 4.0}
    review = cast(ReviewSubmitted, spec_for("validation.review_submitted").adapter.validate_python(data_of("validation.review_submitted", scores=scores)))
    assert review.scores.equity == 4 and type(review.scores.equity) is int
    type_ = "innovation_day.registration_requested"
    registration = cast(RegistrationRequested, spec_for(type_).adapter.validate_json(json.dumps(data_of(type_, attendees=3.0))))
    assert registration.attendees == 3 and type(registration.attendees) is int
    for bad in (2.5, "2", True, 0.0):
        assert locs(type_, data_of(type_, attendees=bad)) == {("attendees",)}, bad
    assert spec_for(type_).adapter.json_schema()["properties"]["attendees"]["minimum"] == 1


def test_review_scores_every_criterion() -> None:
    scores = dict(data_of("validation.review_submitted")["scores"])
    del scores["equity"]
    assert locs(
        "validation.review_submitted", data_of("validation.review_submitted", scores=scores)
    ) == {("scores", "equity")}


def test_deadline_before_opening() -> None:
    [error] = errors(
        "call.published",
        data_of("call.published", deadline="2026-02-28T23:59:59+03:00"),
    )
    assert error["loc"] == ()
    assert "deadline must be after opens_at" in error["msg"]


def test_a_deadline_for_full_proposals_is_a_two_stage_calls_and_after_its_deadline() -> None:
    # (the fixture's call has a single stage, its deadline at 2026-05-31T23:59:59+03:00)
    [error] = errors("call.published", data_of("call.published", full_proposal_deadline="2026-06-30T23:59:59+03:00"))
    assert (error["loc"], error["type"]) == (("full_proposal_deadline",), "two_stage_only")
    two_stage = data_of("call.published", deadline_model="two_stage", full_proposal_deadline="2026-06-30T23:59:59+03:00")
    assert cast(CallPublished, spec_for("call.published").adapter.validate_python(two_stage)).full_proposal_deadline is not None
    [error] = errors("call.published", {**two_stage, "full_proposal_deadline": "2026-05-31T23:59:59+03:00"})
    assert error["loc"] == () and "full_proposal_deadline must be after deadline" in error["msg"]
    [error] = errors("call.amended", data_of("call.amended", changes={"deadline": "2026-05-31T23:59:59+03:00",
                                                                      "full_proposal_deadline": "2026-05-01T00:00:00+03:00"}))
    assert error["loc"] == ("changes",) and "full_proposal_deadline must be after deadline" in error["msg"]
    invited = data_of("call.application_decided", decision="invited", awarded_amount=None)
    assert cast(ApplicationDecided, spec_for("call.application_decided").adapter.validate_python(invited)).decision == "invited"


def test_an_amount_is_awarded_only_with_an_award() -> None:
    [error] = errors("call.application_decided", data_of("call.application_decided", decision="declined"))
    assert (error["loc"], error["type"]) == (("awarded_amount",), "awarded_only")
    assert error["msg"] == "An amount is awarded only with the decision 'awarded'"
    declined = data_of("call.application_decided", decision="declined", awarded_amount=None)
    assert cast(ApplicationDecided, spec_for("call.application_decided").adapter.validate_python(declined)).decision == "declined"
    assert locs("call.application_decided", data_of("call.application_decided", decision="granted")) == {("decision",)}


def test_call_amendment_changes_something_and_keeps_required_fields() -> None:
    assert locs("call.amended", data_of("call.amended", changes={})) == {("changes",)}
    assert locs("call.amended", data_of("call.amended", changes={"title": None})) == {
        ("changes", "title")
    }
    assert locs("call.amended", data_of("call.amended", changes={"deadlin": "x"})) == {
        ("changes", "deadlin")
    }
    amended = spec_for("call.amended").adapter.validate_python(
        data_of("call.amended", changes={"budget": None})
    )
    assert amended.changes.model_fields_set == {"budget"}  # type: ignore[attr-defined]


def test_institution_update_shape() -> None:
    assert locs("institution.updated", {"id": "tr-genc-isi-koop"}) == {()}
    assert locs("institution.updated", {"id": "tr-genc-isi-koop", "kind": None}) == {("kind",)}
    cleared = spec_for("institution.updated").adapter.validate_python(
        {"id": "tr-genc-isi-koop", "website": None}
    )
    assert cleared.model_fields_set == {"id", "website"}


def test_validation_names_exactly_one_subject() -> None:
    ref = {"system": "innokyla", "id": "toimintamalli-2231"}
    assert locs("validation.requested", data_of("validation.requested", external_ref=ref)) == {()}
    assert locs("validation.requested", data_of("validation.requested", project_id=None)) == {()}
    spec_for("validation.requested").adapter.validate_python(
        data_of("validation.requested", project_id=None, external_ref=ref)
    )


def test_decision_by_rule_carries_every_median() -> None:
    medians = {"novelty": 3.5, "effectiveness": 4}
    assert locs("validation.decided", data_of("validation.decided", median_scores=medians)) == {()}
    medians = {**data_of("validation.decided")["median_scores"], "equity": 3.25}
    assert locs("validation.decided", data_of("validation.decided", median_scores=medians)) == {
        ("median_scores", "equity")
    }
    spec_for("validation.decided").adapter.validate_python(
        data_of("validation.decided", decided_by="coordinator", median_scores={})
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"attendance_mode": "offline", "venue": None}, "needs a venue"),
        ({"attendance_mode": "online", "online_url": None}, "needs an online_url"),
        ({"ends_at": "2026-09-17T09:00:00+03:00"}, "ends_at must be after starts_at"),
        ({"registration_deadline": "2026-09-17T10:00:00+03:00"}, "must not be after starts_at"),
    ],
)
def test_innovation_day_consistency(changes: dict[str, Any], message: str) -> None:
    [error] = errors("innovation_day.scheduled", data_of("innovation_day.scheduled", **changes))
    assert error["loc"] == ()
    assert message in error["msg"]


def test_capacity_and_attendees_are_positive() -> None:
    assert locs("innovation_day.scheduled", data_of("innovation_day.scheduled", capacity=0)) == {
        ("capacity",)
    }
    type_ = "innovation_day.registration_requested"
    assert locs(type_, data_of(type_, attendees=0)) == {("attendees",)}


def test_meeting_needs_two_parties_and_a_shared_theme() -> None:
    type_ = "innovation_day.meetings_proposed"
    meeting = data_of(type_)["meetings"][0]
    assert locs(type_, data_of(type_, meetings=[{**meeting, "funder": meeting["innovator"]}])) == {
        ("meetings", 0)
    }
    assert locs(type_, data_of(type_, meetings=[{**meeting, "shared_themes": []}])) == {
        ("meetings", 0, "shared_themes")
    }


def test_impact_period_in_order() -> None:
    type_ = "project.impact_reported"
    period = {"start": "2025-12-31", "end": "2025-01-01"}
    assert locs(type_, data_of(type_, period=period)) == {("period",)}
    assert locs(type_, data_of(type_, indicators=[])) == {("indicators",)}


def _patterns(schema: Any) -> set[str]:
    if isinstance(schema, dict):
        return {v for k, v in schema.items() if k == "pattern" and isinstance(v, str)} | {
            p for v in schema.values() for p in _patterns(v)
        }
    if isinstance(schema, list):
        return {p for v in schema for p in _patterns(v)}
    return set()


def test_every_pattern_in_what_a_member_sends_is_said_in_words() -> None:
    from schemas.common import _PATTERN_WORDS
    from schemas.envelope import CloudEvent

    offered = [spec for spec in REGISTRY.values() if spec.emitters]  # (what only the workflows emit, nobody sends)
    patterns = _patterns(CloudEvent.model_json_schema()) | {
        p for spec in offered for p in _patterns(spec.adapter.json_schema(mode="validation"))
    }
    assert patterns and not patterns - set(_PATTERN_WORDS), sorted(patterns - set(_PATTERN_WORDS))


def test_a_pattern_mismatch_says_what_is_wanted_in_words() -> None:
    from schemas.common import error_message

    (error,) = errors("project.registered", data_of("project.registered", project_id="has spaces"))
    assert error["type"] == "string_pattern_mismatch" and "pattern" in error["msg"]
    assert error_message(error) == "Input should be an id of 1 to 128 letters (A-Z, a-z), digits, '_', ':' and '-' (no dots or spaces)"
    other = {"type": "string_pattern_mismatch", "msg": "String should match pattern '^x$'", "ctx": {"pattern": "^x$"}}
    assert error_message(other) == other["msg"]  # a pattern without words keeps pydantic's message


def test_too_few_items_are_said_in_json_words() -> None:
    """An empty array or object where one item is needed, as JSON names them (pydantic says
    "Tuple …" and "Dictionary … after validation")."""
    from schemas.common import error_message

    (indicators,) = errors("project.impact_reported", data_of("project.impact_reported", indicators=[]))
    assert (indicators["type"], error_message(indicators)) == ("too_short", "Input should be an array of at least 1 item, not 0")
    (title,) = errors("project.registered", data_of("project.registered", title={}))
    assert (title["type"], error_message(title)) == ("too_short", "Input should be an object with at least 1 entry, not 0")


def test_a_municipality_level_is_given_to_municipalities_only() -> None:
    [error] = errors("institution.joined", data_of("institution.joined", kind="university", municipality_level="district"))
    assert (error["loc"], error["type"]) == (("municipality_level",), "municipalities_only")
    assert error["msg"] == "A municipality level is for municipalities only; this institution's kind is 'university'"
    joined = cast(InstitutionJoined, spec_for("institution.joined").adapter.validate_python(
        data_of("institution.joined", kind="municipality", municipality_level="district")))
    assert joined.municipality_level == "district"
    assert cast(InstitutionJoined, spec_for("institution.joined").adapter.validate_python(
        data_of("institution.joined", kind="university", municipality_level=None))).municipality_level is None
    changed = {"id": "tr-tarsus-bld", "kind": "ngo", "municipality_level": "district"}
    assert locs("institution.updated", changed) == {("municipality_level",)}
    # Without a kind the event cannot tell: the gate asks what the member is.
    assert spec_for("institution.updated").adapter.validate_python({"id": "tr-tarsus-bld", "municipality_level": "district"})
    assert spec_for("institution.updated").adapter.validate_python({**changed, "municipality_level": None})


def test_a_municipality_level_logged_before_the_check_is_read_as_it_was() -> None:
    from schemas.common import LOGGED

    data = data_of("institution.joined", kind="university", municipality_level="district")
    read = cast(InstitutionJoined, spec_for("institution.joined").adapter.validate_python(data, context={LOGGED: True}))
    assert (read.kind, read.municipality_level) == ("university", "district")


def test_the_nearest_name_is_the_one_did_you_mean_offers() -> None:
    """One choice of the name most likely meant, for every "did you mean": the nearest of the
    candidates, none when none is near enough."""
    from schemas.common import nearest, unknown_name

    assert nearest("call-2026-kitchens", ["call-2026-kitchen", "call-2025-kitchens-x", "other"]) == "call-2026-kitchen"
    assert nearest("proj-a", ["completely-different", "zzz"]) is None
    assert nearest("x", []) is None
    assert nearest("proj-a", ["proj-a2", "proj-a1"]) == "proj-a2"  # of equally near ones, the first given
    assert nearest("ownr", {"owner": True, "theme": False}) == "owner"  # a mapping's keys, as iterating it gives
    assert unknown_name("sujbect", "an attribute", iter(["subject", "source"])) == "'sujbect' is not an attribute; did you mean 'subject'?"
