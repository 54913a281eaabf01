"""The validation workflow (CONTRACT.md §5): given events → when an event → then state and emitted events."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlmodel import col, select

from handlers.validations import InfoRequest, Validation, ValidationReview, ValidationReviewer, validation_view
from schemas.common import CRITERIA
from tests.handlers.harness import envelope

COORDINATOR = "fi-thl"
OTHER_CENTRE = "fi-kuntoutussaatio"
REQUESTER = "tr-mersin-bb"
PARTNER = "tr-genc-isi-koop"
REVIEWERS = ("fi-lut", "fi-diak", "fi-soste")
OUTSIDER = "tr-ankara-univ"


def joined(institution: str, kind: str, country: str = "FI") -> dict[str, Any]:
    data = {"id": institution, "name": {"en": institution}, "kind": kind, "country": country}
    return envelope("institution.joined", "operator", data)


def members() -> list[dict[str, Any]]:
    """Everyone taking part, joining (fresh event ids each time: the log deduplicates by id)."""
    return [
        joined(COORDINATOR, "competence_centre"),
        joined(OTHER_CENTRE, "competence_centre"),
        joined(REQUESTER, "municipality", "TR"),
        joined(PARTNER, "cooperative", "TR"),
        joined(OUTSIDER, "university", "TR"),
        *(joined(reviewer, "university") for reviewer in REVIEWERS),
    ]


@dataclass(frozen=True)
class Workflow:
    """Events about one validation of one project, as its parties would offer them."""

    validation_id: str
    project_id: str

    def project_registered(self) -> dict[str, Any]:
        data = {
            "project_id": self.project_id,
            "title": {"tr": "Mahalle Mutfakları", "en": "Neighbourhood kitchens"},
            "owner": REQUESTER,
            "partners": [{"institution": PARTNER, "role": "partner", "relation": "partnership"}],
            "status": "active",
        }
        return envelope("project.registered", REQUESTER, data)

    def requested(self, *, by: str = REQUESTER, coordinator: str = COORDINATOR, quorum: int = 2, external: bool = False) -> dict[str, Any]:
        subject: dict[str, Any] = {"external_ref": {"system": "innokyla", "id": "1234"}} if external else {"project_id": self.project_id}
        data = {
            "validation_id": self.validation_id,
            **subject,
            "coordinator": coordinator,
            "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2, "statement": {"tr": "Mahalleler memnun."}},
            "quorum": quorum,
            "due_by": (datetime.now(timezone.utc) + timedelta(days=60)).isoformat(),
        }
        return envelope("validation.requested", by, data)

    def assigned(self, reviewer: str, *, by: str = COORDINATOR) -> dict[str, Any]:
        data = {"validation_id": self.validation_id, "reviewer": reviewer}
        return envelope("validation.reviewer_assigned", by, data)

    def unassigned(self, reviewer: str, *, by: str = COORDINATOR) -> dict[str, Any]:
        data = {"validation_id": self.validation_id, "reviewer": reviewer, "reason": {"en": "a conflict of interest came to light"}}
        return envelope("validation.reviewer_unassigned", by, data)

    def review(self, reviewer: str, recommendation: str = "validate", evidence_level: int = 3, **scores: int) -> dict[str, Any]:
        all_scores: dict[str, int] = {**dict.fromkeys(CRITERIA, 4), **scores}
        data = {
            "validation_id": self.validation_id,
            "scores": all_scores,
            "evidence_level": evidence_level,
            "recommendation": recommendation,
            "comments": {"fi": f"Arvio: {reviewer}"},
        }
        return envelope("validation.review_submitted", reviewer, data)

    def asked(self, by: str, *question_ids: str) -> dict[str, Any]:
        questions = [{"question_id": q, "text": {"en": f"Question {q}?"}} for q in question_ids]
        return envelope("validation.info_requested", by, {"validation_id": self.validation_id, "questions": questions})

    def answered(self, by: str, *question_ids: str) -> dict[str, Any]:
        answers = [{"question_id": q, "text": {"tr": f"Yanıt {q}"}} for q in question_ids]
        return envelope("validation.info_provided", by, {"validation_id": self.validation_id, "answers": answers})

    def decided(self, by: str = COORDINATOR, outcome: str = "needs_revision") -> dict[str, Any]:
        data = {"validation_id": self.validation_id, "outcome": outcome, "decided_by": "coordinator"}
        return envelope("validation.decided", by, data)

    def withdrawn(self, by: str = REQUESTER) -> dict[str, Any]:
        return envelope("validation.withdrawn", by, {"validation_id": self.validation_id, "reason": {"en": "not ready"}})


@pytest.fixture
def flow() -> Workflow:
    suffix = uuid.uuid4().hex[:10]
    return Workflow(validation_id=f"val-{suffix}", project_id=f"kitchens-{suffix}")


async def open_validation(scenario: Any, flow: Workflow, *reviewers: str, quorum: int = 2) -> None:
    """Members joined, the project registered, a validation requested and ``reviewers`` assigned."""
    await scenario.given(*members(), flow.project_registered(), flow.requested(quorum=quorum))
    await scenario.given(*(flow.assigned(reviewer) for reviewer in reviewers))


def refused(derived: list[dict[str, Any]], event: dict[str, Any], *, code: str, name: str = COORDINATOR) -> None:
    """The workflow answered ``event`` with exactly one refusal, in ``name``'s name."""
    [rejection] = derived
    assert rejection["type"] == "validation.action_rejected"
    assert rejection["source"] == f"/institutions/{name}"
    assert rejection["causationid"] == event["id"]
    data = rejection["data"]
    assert (data["rejected_type"], data["rejected_event_id"], data["actor"]) == (
        event["type"],
        event["id"],
        event["source"].removeprefix("/institutions/"),
    )
    assert data["reason"]["code"] == code


def stored(scenario: Any, flow: Workflow) -> Validation | None:
    with scenario.session() as session:
        return session.get(Validation, flow.validation_id)


def state(scenario: Any, flow: Workflow) -> Validation:
    validation = stored(scenario, flow)
    assert validation is not None
    return validation


def rows(scenario: Any, table: type[Any], flow: Workflow) -> list[Any]:
    with scenario.session() as session:
        return list(session.exec(select(table).where(table.validation_id == flow.validation_id)))


# --- requests ---------------------------------------------------------------------------------------


async def test_a_request_opens_a_validation(scenario: Any, flow: Workflow) -> None:
    await scenario.given(*members(), flow.project_registered())
    assert await scenario.when(flow.requested(quorum=3)) == []
    validation = state(scenario, flow)
    assert (validation.requester, validation.coordinator, validation.project_id) == (REQUESTER, COORDINATOR, flow.project_id)
    assert (validation.status, validation.quorum) == ("requested", 3)
    assert validation.self_assessment["statement"] == {"tr": "Mahalleler memnun."}


async def test_the_coordinator_must_be_a_competence_centre(scenario: Any, flow: Workflow) -> None:
    await scenario.given(*members())
    request = flow.requested(coordinator="fi-lut")
    refused(await scenario.when(request), request, code="coordinator_not_competence_centre", name=REQUESTER)
    assert stored(scenario, flow) is None


async def test_a_validation_is_requested_once(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow)
    again = flow.requested(by=PARTNER, coordinator=OTHER_CENTRE)
    refused(await scenario.when(again), again, code="already_requested")
    validation = state(scenario, flow)
    assert (validation.requester, validation.coordinator) == (REQUESTER, COORDINATOR)


async def test_events_about_an_unknown_validation_are_refused(scenario: Any, flow: Workflow) -> None:
    await scenario.given(*members())
    review = flow.review(REVIEWERS[0])
    refused(await scenario.when(review), review, code="unknown_validation", name=REVIEWERS[0])
    assert rows(scenario, ValidationReview, flow) == []


async def test_an_event_about_a_validation_id_mistyped_is_told_the_one_meant(scenario: Any, flow: Workflow) -> None:
    """A reviewer, coordinator or requester who mistyped the id was told only that there was no
    such validation, as if it had not been requested."""
    await open_validation(scenario, flow, REVIEWERS[0])
    typo = Workflow(validation_id=flow.validation_id[:-1], project_id=flow.project_id)  # (its last character left out)
    review = typo.review(REVIEWERS[0])
    derived = await scenario.when(review)
    refused(derived, review, code="unknown_validation", name=REVIEWERS[0])
    assert derived[0]["data"]["reason"]["message"]["en"] == (
        f"no validation {typo.validation_id!r} was requested; did you mean {flow.validation_id!r}?")
    assert rows(scenario, ValidationReview, flow) == []


# --- reviewers ------------------------------------------------------------------------------------


async def test_the_coordinator_assigns_reviewers(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow)
    assert await scenario.when(flow.assigned(REVIEWERS[0])) == []
    assert [r.reviewer for r in rows(scenario, ValidationReviewer, flow)] == [REVIEWERS[0]]
    assert state(scenario, flow).status == "in_review"


async def test_only_the_coordinator_assigns(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow)
    assignment = flow.assigned(REVIEWERS[0], by=OTHER_CENTRE)
    refused(await scenario.when(assignment), assignment, code="not_coordinator")
    assert rows(scenario, ValidationReviewer, flow) == []


@pytest.mark.parametrize("conflicted", [REQUESTER, PARTNER], ids=["requester-and-owner", "partner"])
async def test_a_reviewer_may_not_have_a_conflict_of_interest(scenario: Any, flow: Workflow, conflicted: str) -> None:
    await open_validation(scenario, flow)
    assignment = flow.assigned(conflicted)
    refused(await scenario.when(assignment), assignment, code="conflict_of_interest")
    assert rows(scenario, ValidationReviewer, flow) == []


async def test_the_project_owner_may_not_review_a_practice_someone_else_submitted(scenario: Any, flow: Workflow) -> None:
    await scenario.given(*members(), flow.project_registered(), flow.requested(by=PARTNER))
    assignment = flow.assigned(REQUESTER)  # the owner, not the requester here
    refused(await scenario.when(assignment), assignment, code="conflict_of_interest")


async def test_for_an_external_practice_the_requester_counts_as_owner(scenario: Any, flow: Workflow) -> None:
    await scenario.given(*members(), flow.requested(external=True))
    assignment = flow.assigned(REQUESTER)
    refused(await scenario.when(assignment), assignment, code="conflict_of_interest")
    assert await scenario.when(flow.assigned(PARTNER)) == []  # no partners outside the network


async def test_the_coordinator_takes_a_reviewer_off_who_may_then_not_review(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS[:2])
    assert await scenario.when(flow.unassigned(REVIEWERS[0])) == []
    assert [r.reviewer for r in rows(scenario, ValidationReviewer, flow)] == [REVIEWERS[1]]
    assert state(scenario, flow).status == "in_review"
    review = flow.review(REVIEWERS[0])
    refused(await scenario.when(review), review, code="not_assigned")
    assert await scenario.when(flow.unassigned(REVIEWERS[1])) == []
    assert rows(scenario, ValidationReviewer, flow) == [] and state(scenario, flow).status == "requested"  # nobody to review
    assert await scenario.when(flow.assigned(REVIEWERS[0])) == []  # and may be assigned again
    assert [r.reviewer for r in rows(scenario, ValidationReviewer, flow)] == [REVIEWERS[0]]
    assert await scenario.when(flow.review(REVIEWERS[0])) == []


async def test_a_reviewer_that_leaves_the_network_before_reviewing_is_taken_off(scenario: Any, flow: Workflow) -> None:
    """A member that left could no longer review, yet the validation waited for it. It is taken off
    each open validation it had not reviewed, in the coordinator's name and saying why; a review it
    gave while a member counts, and a decided validation keeps its reviewers."""
    await open_validation(scenario, flow, *REVIEWERS, quorum=3)
    await scenario.given(flow.review(REVIEWERS[0]))
    decided = Workflow(validation_id=f"{flow.validation_id}-b", project_id=flow.project_id)
    await scenario.given(decided.requested(coordinator=OTHER_CENTRE), decided.assigned(REVIEWERS[1], by=OTHER_CENTRE),
                         decided.decided(by=OTHER_CENTRE))

    leaving = envelope("institution.left", "operator", {"id": REVIEWERS[1]})
    [off] = await scenario.when(leaving)
    assert (off["type"], off["source"], off["causationid"]) == (
        "validation.reviewer_unassigned", f"/institutions/{COORDINATOR}", leaving["id"])
    assert off["data"]["validation_id"] == flow.validation_id and off["data"]["reviewer"] == REVIEWERS[1]
    assert off["data"]["reason"]["en"].startswith(f"{REVIEWERS[1]} left the network on ")
    assert sorted(r.reviewer for r in rows(scenario, ValidationReviewer, flow)) == [REVIEWERS[0], REVIEWERS[2]]
    assert [r.reviewer for r in rows(scenario, ValidationReviewer, decided)] == [REVIEWERS[1]]

    assert await scenario.when(envelope("institution.left", "operator", {"id": REVIEWERS[0]})) == []  # it reviewed
    assert sorted(r.reviewer for r in rows(scenario, ValidationReviewer, flow)) == [REVIEWERS[0], REVIEWERS[2]]
    assert state(scenario, flow).status == "in_review"


async def test_only_the_coordinator_unassigns_only_an_assigned_reviewer_who_has_not_reviewed(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS)
    await scenario.given(flow.review(REVIEWERS[0]))
    for event, code in ((flow.unassigned(REVIEWERS[1], by=OTHER_CENTRE), "not_coordinator"),
                        (flow.unassigned(OUTSIDER), "not_assigned"),
                        (flow.unassigned(REVIEWERS[0]), "already_reviewed")):  # its review counts towards the quorum
        refused(await scenario.when(event), event, code=code)
    assert sorted(r.reviewer for r in rows(scenario, ValidationReviewer, flow)) == sorted(REVIEWERS)
    await scenario.given(flow.review(REVIEWERS[1]))  # the quorum of two: decided
    late = flow.unassigned(REVIEWERS[2])
    refused(await scenario.when(late), late, code="already_decided")


# --- reviews and the decision at quorum ---------------------------------------------------------------


async def test_an_unassigned_reviewers_review_is_refused(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, REVIEWERS[0])
    review = flow.review(REVIEWERS[1])
    refused(await scenario.when(review), review, code="not_assigned")
    assert rows(scenario, ValidationReview, flow) == []


async def test_a_second_review_replaces_the_first_before_the_decision(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS[:2])
    await scenario.given(flow.review(REVIEWERS[0], "reject", novelty=1))
    assert await scenario.when(flow.review(REVIEWERS[0], "validate", novelty=5)) == []  # still one review of two
    [review] = rows(scenario, ValidationReview, flow)
    assert (review.reviewer, review.recommendation, review.scores["novelty"], review.revision) == (REVIEWERS[0], "validate", 5, 2)
    assert state(scenario, flow).status == "in_review"


async def test_at_quorum_the_rule_decides(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS)
    await scenario.given(flow.review(REVIEWERS[0], "reject", evidence_level=2, novelty=1), flow.review(REVIEWERS[0], evidence_level=2, equity=3))
    review = flow.review(REVIEWERS[1], evidence_level=3, equity=2)
    [decision] = await scenario.when(review)
    assert (decision["type"], decision["source"], decision["causationid"]) == ("validation.decided", f"/institutions/{COORDINATOR}", review["id"])
    medians = {**{c: 4.0 for c in CRITERIA}, "equity": 2.5}
    assert decision["data"] == {
        "validation_id": flow.validation_id,
        "outcome": "needs_revision",  # equity's median is below 3
        "evidence_level": 2,
        "median_scores": medians,
        "decided_by": "rule",
    }
    validation = state(scenario, flow)
    assert (validation.status, validation.outcome, validation.decided_by, validation.evidence_level) == ("decided", "needs_revision", "rule", 2)
    assert validation.median_scores == medians and validation.decided_at is not None


async def test_a_review_after_the_decision_is_refused(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS)
    await scenario.given(flow.review(REVIEWERS[0]), flow.review(REVIEWERS[1]))
    assert state(scenario, flow).outcome == "validated"
    for late in (flow.review(REVIEWERS[2], "reject", novelty=1), flow.review(REVIEWERS[0], "reject")):
        refused(await scenario.when(late), late, code="already_decided")
    reviews = rows(scenario, ValidationReview, flow)
    assert sorted((r.reviewer, r.recommendation) for r in reviews) == [(REVIEWERS[1], "validate"), (REVIEWERS[0], "validate")]


# --- the coordinator's decision, withdrawal ------------------------------------------------------------


async def test_the_coordinator_may_decide_before_quorum(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS[:2])
    await scenario.given(flow.review(REVIEWERS[0]))
    assert await scenario.when(flow.decided(outcome="needs_revision")) == []
    validation = state(scenario, flow)
    assert (validation.status, validation.outcome, validation.decided_by) == ("decided", "needs_revision", "coordinator")
    late = flow.review(REVIEWERS[1])
    refused(await scenario.when(late), late, code="already_decided")


async def test_only_the_coordinator_decides(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, REVIEWERS[0])
    decision = flow.decided(by=OTHER_CENTRE, outcome="validated")
    refused(await scenario.when(decision), decision, code="not_coordinator")
    assert state(scenario, flow).status == "in_review"


async def test_withdrawal_stops_everything(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, REVIEWERS[0])
    assert await scenario.when(flow.withdrawn()) == []
    validation = state(scenario, flow)
    assert (validation.status, validation.withdrawn_reason) == ("withdrawn", {"en": "not ready"})
    for late in (
        flow.review(REVIEWERS[0]),
        flow.assigned(REVIEWERS[1]),
        flow.asked(COORDINATOR, "q1"),
        flow.decided(),
        flow.withdrawn(),
    ):
        refused(await scenario.when(late), late, code="withdrawn")
    assert rows(scenario, ValidationReview, flow) == [] and len(rows(scenario, ValidationReviewer, flow)) == 1


async def test_only_the_requester_withdraws(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow)
    withdrawal = flow.withdrawn(by=COORDINATOR)
    refused(await scenario.when(withdrawal), withdrawal, code="not_requester")
    assert state(scenario, flow).status == "requested"


# --- more information ------------------------------------------------------------------------------


async def test_info_requested_and_provided(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, REVIEWERS[0])
    assert await scenario.when(flow.asked(COORDINATOR, "q1", "q2")) == []
    assert await scenario.when(flow.asked(REVIEWERS[0], "q3")) == []
    assert state(scenario, flow).status == "info_requested"

    assert await scenario.when(flow.answered(REQUESTER, "q1", "q3")) == []
    assert state(scenario, flow).status == "info_requested"  # q2 is still open
    assert await scenario.when(flow.answered(REQUESTER, "q2")) == []
    assert state(scenario, flow).status == "in_review"
    requests = sorted(rows(scenario, InfoRequest, flow), key=lambda r: r.asked_by)
    assert [(r.asked_by, [a["question_id"] for a in r.answers], r.answered_at is not None) for r in requests] == [
        (REVIEWERS[0], ["q3"], True),
        (COORDINATOR, ["q1", "q2"], True),
    ]
    assert requests[1].answers[0] == {"question_id": "q1", "text": {"tr": "Yanıt q1"}}


async def test_an_answer_given_again_replaces_the_first_which_it_keeps_as_earlier(scenario: Any, flow: Workflow) -> None:
    """A requester may correct an answer; a reviewer who read the first one sees that it changed,
    what it said and when it was replaced. The same answer given again changes nothing."""
    await open_validation(scenario, flow, REVIEWERS[0])
    await scenario.given(flow.asked(COORDINATOR, "q1", "q2"), flow.answered(REQUESTER, "q1", "q2"))

    def corrected(text: str) -> dict[str, Any]:
        return envelope("validation.info_provided", REQUESTER, {
            "validation_id": flow.validation_id, "answers": [{"question_id": "q1", "text": {"tr": text}}]})

    def answers() -> list[dict[str, Any]]:
        [request] = rows(scenario, InfoRequest, flow)
        assert request.answered_at is not None
        return request.answers

    assert await scenario.when(corrected("Düzeltilmiş yanıt")) == []
    first, second = answers()
    assert (first["question_id"], first["text"]) == ("q1", {"tr": "Düzeltilmiş yanıt"})
    [earlier] = first["earlier"]
    assert earlier["text"] == {"tr": "Yanıt q1"} and earlier["replaced_at"].endswith("Z")
    assert second == {"question_id": "q2", "text": {"tr": "Yanıt q2"}}  # not answered again: as it was

    assert await scenario.when(corrected("Düzeltilmiş yanıt")) == []
    assert answers()[0] == first  # the same text again: nothing replaced
    assert await scenario.when(corrected("Üçüncü yanıt")) == []
    third = answers()[0]
    assert third["text"] == {"tr": "Üçüncü yanıt"}
    assert [e["text"] for e in third["earlier"]] == [{"tr": "Yanıt q1"}, {"tr": "Düzeltilmiş yanıt"}]
    with scenario.session() as session:  # what the workflow's parties read over HTTP
        view = validation_view(session, flow.validation_id, COORDINATOR)
        assert view is not None
        [request] = view["info_requests"]
        assert request["answers"][0] == third


async def test_only_the_coordinator_or_a_reviewer_asks(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, REVIEWERS[0])
    for asker in (REVIEWERS[1], REQUESTER):
        question = flow.asked(asker, "q1")
        refused(await scenario.when(question), question, code="not_assigned")
    assert rows(scenario, InfoRequest, flow) == []


async def test_only_the_requester_answers_and_only_asked_questions(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, REVIEWERS[0])
    await scenario.given(flow.asked(COORDINATOR, "q1"))
    answer = flow.answered(PARTNER, "q1")
    refused(await scenario.when(answer), answer, code="not_requester")
    answer = flow.answered(REQUESTER, "q1", "q9")
    refused(await scenario.when(answer), answer, code="unknown_question")
    [request] = rows(scenario, InfoRequest, flow)
    assert (request.answers, request.answered_at) == ([], None)


# --- confidentiality ------------------------------------------------------------------------------


async def test_reviews_are_confidential_until_the_decision(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS, quorum=3)
    await scenario.given(flow.review(REVIEWERS[0]), flow.review(REVIEWERS[1], "revise"))

    def seen_by(viewer: str) -> list[str] | None:
        with scenario.session() as session:
            view = validation_view(session, flow.validation_id, viewer)
        assert view is not None and view["validation_id"] == flow.validation_id
        return None if "reviews" not in view else sorted(r["reviewer"] for r in view["reviews"])

    both = sorted(REVIEWERS[:2])
    assert seen_by(COORDINATOR) == both and seen_by(REQUESTER) == both
    assert seen_by(REVIEWERS[0]) == [REVIEWERS[0]]
    assert seen_by(REVIEWERS[2]) == []
    assert seen_by(OUTSIDER) is None

    await scenario.given(flow.review(REVIEWERS[2]))
    assert seen_by(OUTSIDER) == sorted(REVIEWERS)
    with scenario.session() as session:
        view = validation_view(session, flow.validation_id, OUTSIDER)
    assert view is not None and (view["status"], view["outcome"], view["evidence_level"]) == ("decided", "validated", 3)
    assert view["reviews"][0]["comments"] == {"fi": f"Arvio: {view['reviews'][0]['reviewer']}"}
    assert "info_requests" not in view


async def test_a_request_for_another_institutions_or_an_unknown_project_is_refused(scenario: Any, flow: Workflow) -> None:
    await scenario.given(*members(), flow.project_registered())
    someone_else = flow.requested(by=OUTSIDER)
    refused(await scenario.when(someone_else), someone_else, code="not_owner_or_partner", name=OUTSIDER)
    by_partner = flow.requested(by=PARTNER)  # a partner puts the practice forward: accepted
    assert await scenario.when(by_partner) == [] and state(scenario, flow).requester == PARTNER

    unknown = Workflow(validation_id=f"val-{uuid.uuid4().hex[:10]}", project_id="no-such-project")
    ghost = unknown.requested()
    refused(await scenario.when(ghost), ghost, code="unknown_project", name=REQUESTER)
    assert stored(scenario, unknown) is None


async def test_a_review_that_stops_counting_shows_and_so_does_an_unreachable_quorum(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, *REVIEWERS[:2])
    await scenario.given(flow.review(REVIEWERS[0]))
    joined = {"project_id": flow.project_id, "partner": {"institution": REVIEWERS[0], "role": "partner"}}
    await scenario.given(envelope("project.partner_joined", REQUESTER, joined))  # the first reviewer gains a stake
    assert await scenario.when(flow.review(REVIEWERS[1])) == []  # two reviews, one counts: no decision
    with scenario.session() as session:
        view = validation_view(session, flow.validation_id, COORDINATOR)
    assert view is not None and view["status"] == "in_review"
    assert {r["reviewer"]: r["counted"] for r in view["reviewers"]} == {REVIEWERS[0]: False, REVIEWERS[1]: True}
    assert view["quorum_reachable"] is False  # the coordinator has to assign another reviewer


async def test_a_reviewer_late_with_its_review_is_named_once_for_each_due_date(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow, "fi-lut", "fi-diak", "fi-soste", quorum=3)
    await scenario.given(flow.review("fi-diak"))
    with scenario.session() as session:
        validation = session.get(Validation, flow.validation_id)
        assert validation is not None and validation.due_by is not None
        due = validation.due_by  # the reviewers have no due date of their own: the validation's
    assert await scenario.tick(due - timedelta(seconds=1)) == []  # not late yet
    ticked = await scenario.tick(due + timedelta(days=1))
    assert [(e["type"], e["data"]["reviewer"]) for e in ticked] == [
        ("validation.review_overdue", "fi-lut"), ("validation.review_overdue", "fi-soste")]  # not the one that reviewed
    assert {e["source"] for e in ticked} == {f"/institutions/{COORDINATOR}"}  # in the coordinator's name
    assert all(datetime.fromisoformat(e["data"]["due_by"]) == due and e["data"]["validation_id"] == flow.validation_id for e in ticked)
    assert await scenario.tick(due + timedelta(days=2)) == []  # once
    with scenario.session() as session:
        noted = {r.reviewer: r.overdue_noted_for for r in session.exec(
            select(ValidationReviewer).where(ValidationReviewer.validation_id == flow.validation_id))}
        assert noted == {"fi-lut": due, "fi-diak": None, "fi-soste": due}

    # Assigned again with another date of its own (by the validation's: it is logged before that
    # one has passed): named again once that one has passed, not before.
    later = due - timedelta(days=1)
    again = envelope("validation.reviewer_assigned", COORDINATOR,
                     {"validation_id": flow.validation_id, "reviewer": "fi-lut", "due_by": later.isoformat()})
    assert await scenario.when(again) == []
    assert await scenario.tick(later - timedelta(seconds=1)) == []
    [renamed] = await scenario.tick(later + timedelta(seconds=1))
    assert renamed["type"] == "validation.review_overdue" and renamed["data"]["reviewer"] == "fi-lut"
    assert datetime.fromisoformat(renamed["data"]["due_by"]) == later

    # Nobody is named late in a validation that is decided or withdrawn (each with a reviewer
    # that has not reviewed and whose date passes).
    assert await scenario.when(flow.decided()) == []
    decided = Workflow(validation_id=f"{flow.validation_id}-d", project_id=flow.project_id)
    withdrawn = Workflow(validation_id=f"{flow.validation_id}-w", project_id=flow.project_id)
    await scenario.given(decided.requested(), decided.assigned("fi-soste"), decided.decided(),
                         withdrawn.requested(), withdrawn.assigned("fi-soste"), withdrawn.withdrawn())
    with scenario.session() as session:
        ended = {v.validation_id: v.status for v in session.exec(
            select(Validation).where(col(Validation.validation_id).in_([decided.validation_id, withdrawn.validation_id])))}
        assert ended == {decided.validation_id: "decided", withdrawn.validation_id: "withdrawn"}
        assert session.get(ValidationReviewer, (decided.validation_id, "fi-soste")) is not None
    assert await scenario.tick(later + timedelta(days=100)) == []


async def test_a_reviewer_due_after_the_validation_is_refused_naming_both_dates(scenario: Any, flow: Workflow) -> None:
    await open_validation(scenario, flow)
    validation = stored(scenario, flow)
    assert validation is not None and validation.due_by is not None
    due = validation.due_by
    after = envelope("validation.reviewer_assigned", COORDINATOR,
                     {"validation_id": flow.validation_id, "reviewer": "fi-lut", "due_by": (due + timedelta(days=7)).isoformat()})
    derived = await scenario.when(after)
    refused(derived, after, code="due_after_validation")
    message = derived[0]["data"]["reason"]["message"]["en"]
    assert (due + timedelta(days=7)).isoformat() in message and f"the validation's own, {due.isoformat()}" in message
    by_then = envelope("validation.reviewer_assigned", COORDINATOR,
                       {"validation_id": flow.validation_id, "reviewer": "fi-lut", "due_by": due.isoformat()})
    assert await scenario.when(by_then) == []
    with scenario.session() as session:
        assigned = session.exec(select(ValidationReviewer).where(ValidationReviewer.validation_id == flow.validation_id)).all()
        assert [(r.reviewer, r.due_by) for r in assigned] == [("fi-lut", due)]
