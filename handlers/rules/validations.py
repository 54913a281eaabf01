"""The validation workflow's rules (CONTRACT.md §5) as pure functions of a state snapshot.

Finland's process: the developers assess themselves (`validation.requested`), a competence centre
coordinates, assigns reviewers free of conflicts of interest, reviewers and the coordinator may ask
for more information, and at quorum the rule decides on the six criteria, recommendations and the
Nesta standards of evidence. The glue in ``handlers/validations.py`` loads a ``ValidationState``,
calls these functions and emits what they return.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol, TypeVar

import handlers.rules
from schemas.common import CRITERIA, Criterion, EventData
from schemas.validations import (
    InfoProvided,
    InfoRequested,
    ReviewerAssigned,
    ReviewerUnassigned,
    ReviewSubmitted,
    ValidationDecided,
    ValidationRefusalCode,
    ValidationWithdrawn,
)

__all__ = [
    "OPEN",
    "Decision",
    "Refusal",
    "Review",
    "ValidationState",
    "action_refusal",
    "current_reviews",
    "decide",
    "decision_at_quorum",
    "is_conflicted",
    "open_status",
    "request_refusal",
    "visible_reviews",
]

Status = Literal["requested", "in_review", "info_requested", "decided", "withdrawn"]
OPEN: frozenset[str] = frozenset({"requested", "in_review", "info_requested"})
"""Statuses in which a validation still accepts events."""

Recommendation = Literal["validate", "revise", "reject"]
Outcome = Literal["validated", "needs_revision", "not_validated"]
RefusalCode = ValidationRefusalCode


@dataclass(frozen=True)
class ValidationState:
    """What the rules need to know about one validation."""

    validation_id: str
    requester: str
    coordinator: str
    status: Status
    quorum: int
    reviewers: frozenset[str] = frozenset()
    """Institutions assigned to review."""
    asked_questions: frozenset[str] = frozenset()
    """Ids of every question asked so far (answers must name one)."""
    project_owner: str | None = None
    """None when the validation names an ``external_ref``: the requester then counts as owner."""
    project_partners: frozenset[str] = frozenset()
    due_by: datetime | None = None
    """When the validation is due (None: no date)."""


@dataclass(frozen=True)
class Review:
    """One reviewer's current review."""

    reviewer: str
    scores: Mapping[Criterion, int]
    evidence_level: int
    recommendation: Recommendation


@dataclass(frozen=True)
class Decision:
    """The rule's outcome, with what it was based on."""

    outcome: Outcome
    evidence_level: int
    median_scores: Mapping[Criterion, float]


@dataclass(frozen=True)
class Refusal(handlers.rules.Refusal):
    """Why an event is refused: a code of the validation refusals' vocabulary, and a message for
    people."""

    code: RefusalCode


def request_refusal(
    already_requested: bool,
    coordinator: str,
    coordinator_kind: str | None,
    *,
    requester: str,
    project: tuple[str, frozenset[str]] | None = None,
    names_project: bool = False,
    due_by: datetime | None = None,
    now: datetime | None = None,
    open_with_coordinator: str | None = None,
) -> Refusal | None:
    """A new validation needs a fresh id, a member competence centre as coordinator that has no
    stake in the practice, and — for a project of the network (``names_project``; ``project`` its
    owner and partners, None when unknown) — a requester that is its owner or a partner; and no
    validation of the project by the same coordinator may be open already
    (``open_with_coordinator``: its id; a request sent twice under new ids, a double click, would
    have the coordinator assign reviewers twice)."""
    if already_requested:
        return Refusal("already_requested", "a validation with this id was already requested")
    if open_with_coordinator is not None and handlers.rules.since(2):
        return Refusal("already_open", f"{coordinator} is validating the project already, in {open_with_coordinator}, "
                                       "which is open; a practice is put forward again once that one is decided or withdrawn")
    if coordinator_kind != "competence_centre":
        what = "not a member" if coordinator_kind is None else f"a {coordinator_kind}"
        return Refusal(
            "coordinator_not_competence_centre",
            f"the coordinator {coordinator} is {what}, not a competence centre",
        )
    if names_project and project is None:
        return Refusal("unknown_project", "no such project is registered (an outside practice is named by external_ref)")
    owner, partners = project if project is not None else (requester, frozenset[str]())
    if requester != owner and requester not in partners:
        return Refusal("not_owner_or_partner", f"only the project's owner {owner} or a partner requests its validation")
    if coordinator in {requester, owner, *partners}:
        return Refusal("conflict_of_interest", f"the coordinator {coordinator} has a stake in the practice and may not coordinate it")
    return _past(due_by, now)


def _past(due_by: datetime | None, now: datetime | None) -> Refusal | None:
    """A due date already past when the log took the event (it would be overdue from the start)."""
    if due_by is not None and now is not None and due_by <= now:
        return Refusal("due_in_past", f"the due date {due_by.isoformat()} has passed already")
    return None


def is_conflicted(validation: ValidationState, institution: str) -> bool:
    """Whether ``institution`` may not review: it is the coordinator, the requester, the
    project's owner or a partner."""
    return institution in {
        validation.coordinator, validation.requester, validation.project_owner, *validation.project_partners
    }


def action_refusal(
    validation: ValidationState | None,
    actor: str,
    data: EventData,
    *,
    is_member: Callable[[str], bool] = lambda _: True,
    reviews: Sequence[Review] = (),
    now: datetime | None = None,
) -> Refusal | None:
    """Whether ``actor`` may do what ``data`` says (any validation event but the request) now.

    None means accepted. A ``validation.decided`` reaching this function comes from outside (the
    rule's own decisions are applied as derived events), so it must be the coordinator's.
    ``is_member``: whether an institution may review (a current member that is not the bus's
    operator); ``reviews``: the current reviews (a coordinator's medians must be theirs).
    """
    if validation is None:
        return Refusal("unknown_validation", "no validation with this id was requested")
    if validation.status == "decided":
        return Refusal("already_decided", "the validation is decided; nothing more is accepted (a practice revised "
                                          "after the decision is put forward again by a new request, with a new validation_id)")
    if validation.status == "withdrawn":
        return Refusal("withdrawn", "the validation was withdrawn; nothing more is accepted")
    coordinator = validation.coordinator
    if isinstance(data, ReviewerAssigned):
        if actor != coordinator:
            return Refusal("not_coordinator", f"only the coordinator {coordinator} assigns reviewers")
        if not is_member(data.reviewer):  # a typo would otherwise hold a place no one can fill
            return Refusal("not_member", f"{data.reviewer} is not a member of the network that may review")
        if is_conflicted(validation, data.reviewer):
            return Refusal("conflict_of_interest", _conflict_message(validation, data.reviewer))
        if (past := _past(data.due_by, now)) is not None:
            return past
        # A review due after the validation would be late by the date the requester was given (once
        # that date has passed, a later one is how the coordinator gives a late reviewer more time).
        if (data.due_by is not None and validation.due_by is not None and data.due_by > validation.due_by
                and (now is None or now < validation.due_by) and handlers.rules.since(3)):
            return Refusal("due_after_validation", f"the reviewer's due date {data.due_by.isoformat()} is after the "
                                                   f"validation's own, {validation.due_by.isoformat()}: give a date by then, "
                                                   "or none (the reviewer is due with the validation)")
    elif isinstance(data, ReviewerUnassigned):
        if actor != coordinator:
            return Refusal("not_coordinator", f"only the coordinator {coordinator} unassigns reviewers")
        if data.reviewer not in validation.reviewers:
            return Refusal("not_assigned", f"{data.reviewer} is not assigned to review this validation")
        if any(review.reviewer == data.reviewer for review in reviews):  # a review in hand counts towards the quorum
            return Refusal("already_reviewed", f"{data.reviewer} has reviewed already and its review counts; "
                                               "the coordinator may decide instead")
    elif isinstance(data, ReviewSubmitted):
        if actor not in validation.reviewers:
            return Refusal("not_assigned", f"{actor} is not assigned to review this validation")
        if is_conflicted(validation, actor):  # e.g. became a partner after the assignment
            return Refusal("conflict_of_interest", _conflict_message(validation, actor))
    elif isinstance(data, InfoRequested):
        if actor != coordinator and actor not in validation.reviewers:
            return Refusal("not_assigned", "only the coordinator or an assigned reviewer asks for information")
        taken = sorted({q.question_id for q in data.questions} & validation.asked_questions)
        if taken:  # an answer names its question: two questions of one id could not be told apart
            return Refusal("question_taken", f"a question with this id was asked already: {', '.join(taken)}")
    elif isinstance(data, InfoProvided):
        if actor != validation.requester:
            return Refusal("not_requester", f"only the requester {validation.requester} provides information")
        unknown = sorted({a.question_id for a in data.answers} - validation.asked_questions)
        if unknown:
            asked = ", ".join(sorted(validation.asked_questions)) or "none yet"
            return Refusal("unknown_question", f"no such question was asked: {', '.join(unknown)} (asked: {asked})")
    elif isinstance(data, ValidationDecided):
        if actor != coordinator:
            return Refusal("not_coordinator", f"only the coordinator {coordinator} decides")
        if data.decided_by != "coordinator":
            # The catalog has no closer code; a decision by rule is the bus's alone.
            return Refusal("not_coordinator", "a coordinator's decision has decided_by 'coordinator'")
        counted = [r for r in reviews if not is_conflicted(validation, r.reviewer)]
        medians = dict(decide(counted).median_scores) if counted else {}
        if any(medians.get(criterion) != median for criterion, median in data.median_scores.items()):
            return Refusal(
                "medians_not_from_reviews",
                "the medians given must be those of the reviews that count: "
                + (", ".join(f"{c} {m:g}" for c, m in medians.items()) if medians else "(there are none: leave them out)"),
            )
    elif isinstance(data, ValidationWithdrawn):
        if actor != validation.requester:
            return Refusal("not_requester", f"only the requester {validation.requester} withdraws")
    return None


def _conflict_message(validation: ValidationState, reviewer: str) -> str:
    if reviewer == validation.coordinator:
        return f"{reviewer} coordinates the validation and may not also review it"
    if reviewer == validation.requester:
        role = "the requester"
    elif reviewer == validation.project_owner:
        role = "the project's owner"
    else:
        role = "a partner of the project"
    return f"{reviewer} is {role} and may not review it"


def current_reviews(reviews: Iterable[Review], review: Review) -> list[Review]:
    """The reviews once ``review`` is in: a reviewer's new review replaces their earlier one."""
    return [*(r for r in reviews if r.reviewer != review.reviewer), review]


def decision_at_quorum(validation: ValidationState, reviews: Iterable[Review], review: Review) -> Decision | None:
    """The rule's decision when ``review`` brings the current reviews to the quorum, else None.

    A review counts only while its reviewer may review: one who has since become the project's
    owner or a partner (a conflict of interest) no longer counts towards the quorum or the medians.
    """
    current = [r for r in current_reviews(reviews, review) if not is_conflicted(validation, r.reviewer)]
    return decide(current) if len(current) >= validation.quorum else None


def decide(reviews: Sequence[Review]) -> Decision:
    """The decision rule over the current reviews (at least one).

    - The median of each criterion is the usual median of the reviewers' scores (the mean of the
      two middle ones for an even count, so a whole or half number).
    - "Most recommendations" means a strict majority of the reviews: more than half of them
      (2 of 3, 3 of 4; 1 of 2 is not most).
    - ``validated`` when every criterion's median is ≥ 3 and most recommend ``validate``;
      ``not_validated`` when any criterion's median is < 2 or most recommend ``reject``;
      otherwise ``needs_revision``. The two conditions cannot both hold.
    - The evidence level is the median of the reviewers' evidence levels rounded down: the
      decision claims no more evidence than the middle reviewer saw (Nesta levels are ordinal).
    """
    if not reviews:
        raise ValueError("a decision needs at least one review")
    medians: dict[Criterion, float] = {
        criterion: float(statistics.median(r.scores[criterion] for r in reviews)) for criterion in CRITERIA
    }

    def most(recommendation: Recommendation) -> bool:
        return 2 * sum(r.recommendation == recommendation for r in reviews) > len(reviews)

    outcome: Outcome
    if all(m >= 3 for m in medians.values()) and most("validate"):
        outcome = "validated"
    elif any(m < 2 for m in medians.values()) or most("reject"):
        outcome = "not_validated"
    else:
        outcome = "needs_revision"
    evidence_level = math.floor(statistics.median(r.evidence_level for r in reviews))
    return Decision(outcome=outcome, evidence_level=evidence_level, median_scores=medians)


def open_status(has_reviewers: bool, has_open_questions: bool) -> Status:
    """The status of a validation still open: waiting for answers, under review, or just requested."""
    if has_open_questions:
        return "info_requested"
    return "in_review" if has_reviewers else "requested"


class _ByReviewer(Protocol):
    @property
    def reviewer(self) -> str: ...


R = TypeVar("R", bound=_ByReviewer)


def visible_reviews(validation: ValidationState, reviews: Iterable[R], viewer: str) -> list[R]:
    """The reviews ``viewer`` may see: until the decision only the coordinator and the requester
    see them all and a reviewer their own (reviews are confidential); after it every member."""
    if validation.status == "decided" or viewer in (validation.coordinator, validation.requester):
        return list(reviews)
    return [r for r in reviews if r.reviewer == viewer]
