"""The validation rules as pure functions, and one property over whole histories through the network."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine

from handlers.db import make_engine, migrate, session_scope
from handlers.network import Event
from handlers.routes import network
from handlers.rules.validations import (
    Decision,
    Review,
    ValidationState,
    action_refusal,
    decide,
    decision_at_quorum,
    open_status,
    request_refusal,
    visible_reviews,
)
from schemas.common import CRITERIA
from schemas.validations import (
    InfoProvided,
    InfoRequested,
    ReviewerAssigned,
    ReviewSubmitted,
    ValidationDecided,
    ValidationWithdrawn,
)
from tests.handlers.harness import envelope

VALIDATION = ValidationState(
    validation_id="val-1",
    requester="tr-mersin-bb",
    coordinator="fi-thl",
    status="in_review",
    quorum=2,
    reviewers=frozenset({"fi-lut", "fi-diak"}),
    asked_questions=frozenset({"q1"}),
    project_owner="tr-mersin-bb",
    project_partners=frozenset({"tr-genc-isi-koop"}),
)
SCORES = {criterion: 4 for criterion in CRITERIA}


def review(reviewer: str, recommendation: str = "validate", evidence_level: int = 3, **scores: int) -> Review:
    return Review(reviewer, {**SCORES, **scores}, evidence_level, recommendation)  # type: ignore[arg-type, dict-item]


def submitted(recommendation: str = "validate") -> ReviewSubmitted:
    return ReviewSubmitted(validation_id="val-1", scores=SCORES, evidence_level=3, recommendation=recommendation)


def assigned(reviewer: str) -> ReviewerAssigned:
    return ReviewerAssigned(validation_id="val-1", reviewer=reviewer)


def asked() -> InfoRequested:
    return InfoRequested(validation_id="val-1", questions=[{"question_id": "q2", "text": {"en": "How?"}}])


def answered(question_id: str = "q1") -> InfoProvided:
    return InfoProvided(validation_id="val-1", answers=[{"question_id": question_id, "text": {"en": "So."}}])


def decided(decided_by: str = "coordinator") -> ValidationDecided:
    medians = {c: 3.0 for c in CRITERIA} if decided_by == "rule" else {}
    return ValidationDecided(validation_id="val-1", outcome="validated", decided_by=decided_by, median_scores=medians)


WITHDRAWN = ValidationWithdrawn(validation_id="val-1", reason={"en": "not ready"})


def code(validation: ValidationState | None, actor: str, data: Any) -> str | None:
    refusal = action_refusal(validation, actor, data)
    return refusal.code if refusal else None


# --- the decision rule -----------------------------------------------------------------------------


def test_validated_when_every_median_is_at_least_3_and_most_recommend_validate() -> None:
    decision = decide([review("a", novelty=3), review("b", novelty=2), review("c", "revise", novelty=5)])
    assert decision.outcome == "validated"
    assert decision.median_scores == {**{c: 4.0 for c in CRITERIA}, "novelty": 3.0}


def test_half_of_the_recommendations_is_not_most() -> None:
    assert decide([review("a"), review("b", "revise")]).outcome == "needs_revision"


def test_a_median_below_3_stops_validation() -> None:
    assert decide([review("a", equity=2), review("b", equity=3)]).outcome == "needs_revision"  # median 2.5


def test_not_validated_when_a_median_is_below_2() -> None:
    decision = decide([review("a", equity=1), review("b", equity=2)])
    assert (decision.outcome, decision.median_scores["equity"]) == ("not_validated", 1.5)


def test_not_validated_when_most_recommend_reject() -> None:
    assert decide([review("a", "reject"), review("b", "reject"), review("c")]).outcome == "not_validated"


def test_otherwise_needs_revision() -> None:
    assert decide([review("a", "revise"), review("b", "reject"), review("c")]).outcome == "needs_revision"


def test_evidence_level_is_the_median_rounded_down() -> None:
    assert decide([review("a", evidence_level=2), review("b", evidence_level=3)]).evidence_level == 2
    assert decide([review(r, evidence_level=e) for r, e in zip("abc", (1, 4, 5))]).evidence_level == 4


def test_the_rule_decides_once_the_current_reviews_reach_the_quorum() -> None:
    assert decision_at_quorum(VALIDATION, [], review("fi-lut")) is None
    assert decision_at_quorum(VALIDATION, [review("fi-lut")], review("fi-lut", "reject")) is None  # a replacement
    decision = decision_at_quorum(VALIDATION, [review("fi-lut", "reject")], review("fi-diak", "reject"))
    assert decision is not None and decision.outcome == "not_validated"


def test_a_reviewer_who_has_since_become_a_partner_no_longer_counts() -> None:
    later = replace(VALIDATION, quorum=2, project_partners=frozenset({"tr-genc-isi-koop", "fi-lut"}))
    assert decision_at_quorum(later, [review("fi-lut", "validate", **{c: 5 for c in CRITERIA})], review("fi-diak")) is None  # 1 of 2
    three = replace(later, quorum=1)
    decision = decision_at_quorum(three, [review("fi-lut", "reject", **{c: 1 for c in CRITERIA})], review("fi-diak"))
    assert decision is not None and decision.outcome == "validated" and decision.median_scores["novelty"] == 4.0


# --- who may do what, when -------------------------------------------------------------------------


def test_a_request_needs_a_fresh_id_and_a_competence_centre() -> None:
    def refused(already: bool, coordinator: str, kind: str | None) -> str | None:
        refusal = request_refusal(already, coordinator, kind, requester="fi-silta")  # an outside practice
        return refusal.code if refusal else None

    assert refused(False, "fi-thl", "competence_centre") is None
    assert refused(True, "fi-thl", "competence_centre") == "already_requested"
    assert refused(False, "fi-lut", "university") == "coordinator_not_competence_centre"
    assert refused(False, "nobody", None) == "coordinator_not_competence_centre"


def test_a_project_is_put_forward_by_its_owner_or_a_partner_to_a_coordinator_without_a_stake() -> None:
    project = ("tr-mersin-bb", frozenset({"tr-genc-isi-koop", "fi-thl-partner"}))

    def refused(requester: str, coordinator: str = "fi-thl", known: bool = True) -> str | None:
        refusal = request_refusal(False, coordinator, "competence_centre", requester=requester,
                                  project=project if known else None, names_project=True)
        return refusal.code if refusal else None

    assert refused("tr-mersin-bb") is None and refused("tr-genc-isi-koop") is None
    assert refused("fi-lut") == "not_owner_or_partner"  # someone else's practice
    assert refused("tr-mersin-bb", known=False) == "unknown_project"
    assert refused("tr-mersin-bb", coordinator="fi-thl-partner") == "conflict_of_interest"
    assert refused("fi-silta-centre", coordinator="fi-silta-centre") == "not_owner_or_partner"
    own = request_refusal(False, "fi-silta", "competence_centre", requester="fi-silta")  # a centre's own outside practice
    assert own is not None and own.code == "conflict_of_interest"


def test_a_coordinator_validates_a_project_once_at_a_time() -> None:
    """A request sent twice under new ids (a double click) would have the coordinator assign
    reviewers twice: while one validation of the project by the coordinator is open, another is
    refused, naming it; by the rules before version 2 (a log applied then), it was taken."""
    from handlers.rules import judged_by

    project = ("tr-mersin-bb", frozenset[str]())
    again = request_refusal(False, "fi-thl", "competence_centre", requester="tr-mersin-bb", project=project,
                            names_project=True, open_with_coordinator="val-1")
    assert again is not None and again.code == "already_open" and "in val-1, which is open" in again.message
    with judged_by(1):
        assert request_refusal(False, "fi-thl", "competence_centre", requester="tr-mersin-bb", project=project,
                               names_project=True, open_with_coordinator="val-1") is None


def test_the_coordinator_neither_reviews_nor_invents_medians() -> None:
    assert code(VALIDATION, "fi-thl", assigned("fi-thl")) == "conflict_of_interest"
    itself = action_refusal(VALIDATION, "fi-thl", assigned("fi-thl"))
    assert itself is not None and itself.message == "fi-thl coordinates the validation and may not also review it"
    invented = ValidationDecided(validation_id="val-1", outcome="validated", decided_by="coordinator",
                                 median_scores={c: 5.0 for c in CRITERIA})
    refusal = action_refusal(VALIDATION, "fi-thl", invented)
    assert refusal is not None and refusal.code == "medians_not_from_reviews" and "none" in refusal.message
    reviews = [review("fi-lut", novelty=3), review("fi-diak", novelty=5)]
    assert action_refusal(VALIDATION, "fi-thl", invented, reviews=reviews) is not None  # novelty's median is 4
    theirs = ValidationDecided(validation_id="val-1", outcome="validated", decided_by="coordinator",
                               median_scores={"novelty": 4.0, "equity": 4.0})  # partial, and theirs
    assert action_refusal(VALIDATION, "fi-thl", theirs, reviews=reviews) is None
    assert code(VALIDATION, "fi-thl", decided()) is None  # no medians at all: the coordinator's judgement


def test_a_due_date_may_not_have_passed_already() -> None:
    now = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)
    late = ReviewerAssigned(validation_id="val-1", reviewer="fi-soste", due_by=now - timedelta(days=1))
    refusal = action_refusal(VALIDATION, "fi-thl", late, now=now)
    assert refusal is not None and refusal.code == "due_in_past"
    assert action_refusal(VALIDATION, "fi-thl", replace_due(late, now + timedelta(days=30)), now=now) is None
    past = request_refusal(False, "fi-thl", "competence_centre", requester="fi-silta", due_by=now, now=now)
    assert past is not None and past.code == "due_in_past"


def replace_due(assignment: ReviewerAssigned, due_by: datetime) -> ReviewerAssigned:
    return assignment.model_copy(update={"due_by": due_by})


def test_a_question_id_is_asked_once() -> None:
    again = InfoRequested(validation_id="val-1", questions=[{"question_id": "q1", "text": {"en": "Budget?"}}])
    refusal = action_refusal(VALIDATION, "fi-lut", again)
    assert refusal is not None and refusal.code == "question_taken" and "q1" in refusal.message
    assert code(VALIDATION, "fi-lut", asked()) is None


def test_only_the_coordinator_assigns_and_never_a_conflicted_reviewer() -> None:
    assert code(VALIDATION, "fi-thl", assigned("fi-kuntoutussaatio")) is None
    assert code(VALIDATION, "fi-lut", assigned("fi-kuntoutussaatio")) == "not_coordinator"
    for conflicted in ("tr-mersin-bb", "tr-genc-isi-koop"):
        assert code(VALIDATION, "fi-thl", assigned(conflicted)) == "conflict_of_interest"
    external = replace(VALIDATION, requester="fi-silta", project_owner=None, project_partners=frozenset())
    assert code(external, "fi-thl", assigned("fi-silta")) == "conflict_of_interest"


def test_a_reviewer_must_be_a_member() -> None:
    refusal = action_refusal(VALIDATION, "fi-thl", assigned("fi-ghost"), is_member=lambda who: who != "fi-ghost")
    assert refusal is not None and refusal.code == "not_member" and "fi-ghost" in refusal.message


def test_only_assigned_unconflicted_reviewers_review() -> None:
    assert code(VALIDATION, "fi-lut", submitted()) is None
    assert code(VALIDATION, "fi-thl", submitted()) == "not_assigned"
    became_partner = replace(VALIDATION, project_partners=frozenset({"fi-lut"}))
    assert code(became_partner, "fi-lut", submitted()) == "conflict_of_interest"


def test_the_coordinator_or_a_reviewer_asks_and_the_requester_answers_asked_questions() -> None:
    assert code(VALIDATION, "fi-thl", asked()) is None
    assert code(VALIDATION, "fi-diak", asked()) is None
    assert code(VALIDATION, "tr-mersin-bb", asked()) == "not_assigned"
    assert code(VALIDATION, "tr-mersin-bb", answered()) is None
    assert code(VALIDATION, "fi-thl", answered()) == "not_requester"
    assert code(VALIDATION, "tr-mersin-bb", answered("q9")) == "unknown_question"
    unknown = action_refusal(VALIDATION, "tr-mersin-bb", answered("q9"))  # the questions asked are named
    assert unknown is not None and unknown.message == f"no such question was asked: q9 (asked: {', '.join(sorted(VALIDATION.asked_questions))})"
    nothing = action_refusal(replace(VALIDATION, asked_questions=frozenset()), "tr-mersin-bb", answered("q1"))
    assert nothing is not None and nothing.message == "no such question was asked: q1 (asked: none yet)"


def test_the_coordinator_decides_and_the_requester_withdraws() -> None:
    assert code(VALIDATION, "fi-thl", decided()) is None
    assert code(VALIDATION, "fi-lut", decided()) == "not_coordinator"
    assert code(VALIDATION, "fi-thl", decided("rule")) == "not_coordinator"
    assert code(VALIDATION, "tr-mersin-bb", WITHDRAWN) is None
    assert code(VALIDATION, "fi-thl", WITHDRAWN) == "not_requester"


@pytest.mark.parametrize("status, refused", [("decided", "already_decided"), ("withdrawn", "withdrawn")])
def test_nothing_is_accepted_after_a_decision_or_withdrawal(status: str, refused: str) -> None:
    closed = replace(VALIDATION, status=status)  # type: ignore[arg-type]
    actions = [
        ("fi-thl", assigned("fi-kuntoutussaatio")),
        ("fi-lut", submitted()),
        ("fi-thl", asked()),
        ("tr-mersin-bb", answered()),
        ("fi-thl", decided()),
        ("tr-mersin-bb", WITHDRAWN),
    ]
    assert {code(closed, actor, data) for actor, data in actions} == {refused}
    if status == "decided":  # what a requester whose practice needs revision does next
        said = action_refusal(closed, "tr-mersin-bb", WITHDRAWN)
        assert said is not None and "put forward again by a new request, with a new validation_id" in said.message


def test_events_about_an_unknown_validation_are_refused() -> None:
    assert code(None, "fi-lut", submitted()) == "unknown_validation"


def test_the_status_of_an_open_validation() -> None:
    assert open_status(has_reviewers=False, has_open_questions=False) == "requested"
    assert open_status(has_reviewers=True, has_open_questions=False) == "in_review"
    assert open_status(has_reviewers=False, has_open_questions=True) == "info_requested"


def test_reviews_are_confidential_until_the_decision() -> None:
    reviews = [review("fi-lut"), review("fi-diak")]
    for viewer in ("fi-thl", "tr-mersin-bb"):
        assert visible_reviews(VALIDATION, reviews, viewer) == reviews
    assert visible_reviews(VALIDATION, reviews, "fi-lut") == [reviews[0]]
    assert visible_reviews(VALIDATION, reviews, "tr-genc-isi-koop") == []
    assert visible_reviews(replace(VALIDATION, status="decided"), reviews, "tr-genc-isi-koop") == reviews


# --- a property of whole histories, through the network ----------------------------------------------

COORDINATOR, REQUESTER = "fi-thl", "tr-mersin-bb"
REVIEWERS = ["fi-lut", "fi-diak", "fi-soste", "fi-kuntaliitto"]

# Scores near a per-review level, so that every outcome comes up.
score_sets = st.integers(1, 5).flatmap(
    lambda level: st.fixed_dictionaries({c: st.integers(max(1, level - 1), min(5, level + 1)) for c in CRITERIA})
)
submissions = st.tuples(
    st.sampled_from(REVIEWERS), score_sets, st.integers(1, 5), st.sampled_from(["validate", "revise", "reject"])
)


@pytest.fixture(scope="module")
def sqlite_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    path: Path = tmp_path_factory.mktemp("validation-histories") / "network.db"
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    yield engine
    engine.dispose()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    quorum=st.integers(1, 4),
    assigned_reviewers=st.lists(st.sampled_from(REVIEWERS), min_size=1, unique=True),
    history=st.lists(submissions, min_size=1, max_size=12),
)
def test_the_decision_is_the_rule_over_the_current_reviews_and_ends_the_validation(
    sqlite_engine: Engine, quorum: int, assigned_reviewers: list[str], history: list[tuple[Any, ...]]
) -> None:
    """Random reviewers (assigned or not), scores, recommendations and replacements: the network
    decides exactly when the current reviews reach the quorum, with the rule's decision on them,
    and refuses every review after that."""
    validation_id = f"val-{uuid.uuid4().hex[:12]}"
    the_network = network()
    clock = iter(datetime.now(timezone.utc) + timedelta(seconds=i) for i in range(10_000))

    def apply(event_type: str, source: str, data: dict[str, Any]) -> list[Event[Any]]:
        event = Event.from_envelope(envelope(event_type, source, data), seq=None, logged_at=next(clock))
        with session_scope(sqlite_engine) as session:
            return the_network.apply(session, event, live=False)

    apply("institution.joined", "operator", {"id": COORDINATOR, "name": {"fi": "THL"}, "kind": "competence_centre", "country": "FI"})
    for reviewer in REVIEWERS:  # reviewers are members
        apply("institution.joined", "operator", {"id": reviewer, "name": {"fi": reviewer}, "kind": "university", "country": "FI"})
    request = {
        "validation_id": validation_id,
        "external_ref": {"system": "innokyla", "id": validation_id},
        "coordinator": COORDINATOR,
        "self_assessment": {"statement": {"en": "works"}},
        "quorum": quorum,
    }
    assert apply("validation.requested", REQUESTER, request) == []
    for reviewer in assigned_reviewers:
        assert apply("validation.reviewer_assigned", COORDINATOR, {"validation_id": validation_id, "reviewer": reviewer}) == []

    current: dict[str, Review] = {}
    decision: Decision | None = None
    for reviewer, scores, evidence_level, recommendation in history:
        data = {"validation_id": validation_id, "scores": scores, "evidence_level": evidence_level, "recommendation": recommendation}
        derived = apply("validation.review_submitted", reviewer, data)
        if decision is not None or reviewer not in assigned_reviewers:
            assert [(d.type, d.data.reason.code) for d in derived] == [
                ("validation.action_rejected", "already_decided" if decision else "not_assigned")
            ]
            continue
        current[reviewer] = Review(reviewer, scores, evidence_level, recommendation)
        if len(current) < quorum:
            assert derived == []
            continue
        decision = decide(list(current.values()))
        [decided_event] = derived
        assert (decided_event.type, decided_event.source) == ("validation.decided", COORDINATOR)
        assert decided_event.data.decided_by == "rule"
        assert decided_event.data.outcome == decision.outcome
        assert decided_event.data.evidence_level == decision.evidence_level
        assert decided_event.data.median_scores == decision.median_scores
    event(decision.outcome if decision else "undecided")
    if decision is not None:
        after: list[tuple[str, str, dict[str, Any]]] = [
            ("validation.reviewer_assigned", COORDINATOR, {"validation_id": validation_id, "reviewer": "fi-sitra"}),
            ("validation.info_requested", COORDINATOR, {"validation_id": validation_id, "questions": [{"question_id": "q1", "text": {"en": "?"}}]}),
            ("validation.withdrawn", REQUESTER, {"validation_id": validation_id, "reason": {"en": "late"}}),
        ]
        for event_type, source, late in after:
            assert [d.data.reason.code for d in apply(event_type, source, late)] == ["already_decided"]


def test_a_reviewer_is_not_due_after_the_validation_it_reviews() -> None:
    """A review due after the validation would make it late by the date the requester was given;
    once that date has passed, a later one is how a late reviewer is given more time."""
    from handlers.rules import judged_by

    now = datetime(2026, 12, 2, 9, 0, tzinfo=timezone.utc)
    due = now + timedelta(days=60)
    validation = replace(VALIDATION, due_by=due)
    late = ReviewerAssigned(validation_id="val-1", reviewer="fi-soste", due_by=due + timedelta(days=1))
    refusal = action_refusal(validation, "fi-thl", late, now=now)
    assert refusal is not None and refusal.code == "due_after_validation"
    assert refusal.message == (f"the reviewer's due date {late.due_by.isoformat() if late.due_by else ''} is after the validation's "
                               f"own, {due.isoformat()}: give a date by then, or none (the reviewer is due with the validation)")
    assert action_refusal(validation, "fi-thl", replace_due(late, due), now=now) is None  # by then
    assert action_refusal(VALIDATION, "fi-thl", late, now=now) is None  # a validation without a date
    assert action_refusal(validation, "fi-thl", late, now=due + timedelta(hours=1)) is None  # the validation is late already
    with judged_by(2):
        assert action_refusal(validation, "fi-thl", late, now=now) is None
