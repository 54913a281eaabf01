"""Validations: the read model (requests, reviewers, reviews, information requests) and the
workflow that guards it (CONTRACT.md §5). The rules are in ``handlers/rules/validations.py``.

The members (``institutions``) and projects (``projects``, ``project_partners``) are other
domains' tables, read here with plain SQL so this module depends on their columns only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import JSON, Column
from sqlmodel import Field, Session, col, select

from handlers import confidential
from handlers.institutions import (  # moments stored in UTC, read back aware, on every database
    Institution,
    UtcDateTime,
    leaving,
    member,
    member_ids,
)
from handlers.network import Context, Decider, Event, Projection, Reads, Timer, derived_type, named, named_in
from handlers.projects import parties as project_parties, project_ids_of
from handlers.rows import TableRow
from handlers.rules import since
from handlers.rules import validations as rules
from handlers.session import children
from schemas.common import CRITERIA, Criterion, nearest
from schemas.validations import (
    CriterionScores,
    InfoProvided,
    InfoRequested,
    ReviewerAssigned,
    ReviewerUnassigned,
    ReviewOverdue,
    ReviewSubmitted,
    ValidationDecided,
    ValidationRequested,
    ValidationWithdrawn,
)

__all__ = [
    "CONFIDENTIAL",
    "DECIDERS",
    "PROJECTIONS",
    "TIMERS",
    "InfoRequest",
    "Validation",
    "ValidationReview",
    "ValidationReviewer",
    "audience",
    "validation_view",
]


def _when(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable))


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=nullable))


class Validation(TableRow, table=True):
    """One validation request and where it stands; the decision's facts once decided."""

    __tablename__ = "validations"

    validation_id: str = Field(primary_key=True, max_length=128)
    requester: str = Field(max_length=63, index=True)
    coordinator: str = Field(max_length=63, index=True)
    project_id: str | None = Field(default=None, max_length=128, index=True)
    external_ref: dict[str, Any] | None = _json()
    self_assessment: dict[str, Any] = _json(nullable=False)
    quorum: int
    due_by: datetime | None = _when()
    status: str = Field(max_length=16, index=True)
    outcome: str | None = Field(default=None, max_length=16)
    evidence_level: int | None = None
    median_scores: dict[Criterion, float] | None = _json()
    decided_by: str | None = Field(default=None, max_length=16)
    decided_at: datetime | None = _when()
    withdrawn_reason: dict[str, str] | None = _json()
    withdrawn_at: datetime | None = _when()
    requested_at: datetime = _when(nullable=False)


class ValidationReviewer(TableRow, table=True):
    """An institution the coordinator asked to review (assigning again moves its due date)."""

    __tablename__ = "validation_reviewers"

    validation_id: str = Field(primary_key=True, max_length=128)
    reviewer: str = Field(primary_key=True, max_length=63)
    due_by: datetime | None = _when()
    assigned_at: datetime = _when(nullable=False)
    overdue_noted_for: datetime | None = _when()
    """The due date for which the bus said the reviewer was late (``validation.review_overdue``)."""


class ValidationReview(TableRow, table=True):
    """A reviewer's current review; a new one replaces it (``revision`` counts them) until the decision."""

    __tablename__ = "validation_reviews"

    validation_id: str = Field(primary_key=True, max_length=128)
    reviewer: str = Field(primary_key=True, max_length=63)
    scores: dict[Criterion, int] = _json(nullable=False)
    evidence_level: int
    recommendation: str = Field(max_length=16)
    comments: dict[str, str] | None = _json()
    submitted_at: datetime = _when(nullable=False)
    revision: int = 1
    counted: bool | None = None
    """Whether the decision counted the review (its reviewer had no stake in the practice then),
    set when the validation is decided; None before (and for a decision applied before it was
    kept: then judged by the stakes as they are)."""


class InfoRequest(TableRow, table=True):
    """Questions to the requester (``id`` is the asking event's id) and the answers given so far;
    ``answered_at`` is set once every question has an answer."""

    __tablename__ = "validation_info_requests"

    id: str = Field(primary_key=True, max_length=128)
    validation_id: str = Field(max_length=128, index=True)
    asked_by: str = Field(max_length=63)
    questions: list[dict[str, Any]] = _json(nullable=False)
    asked_at: datetime = _when(nullable=False)
    answers: list[dict[str, Any]] = _json(nullable=False)
    answered_at: datetime | None = _when()


# --- other domains' state ---------------------------------------------------------------------


def _member_kind(session: Session, institution: str) -> str | None:
    """The kind of a current member; None for an unknown or former one."""
    found = member(session, institution)
    return found.kind if found is not None else None


def _project_parties(session: Session, validation: Validation) -> tuple[str, frozenset[str]]:
    """The project's owner and partners; for an external practice, the requester and nobody."""
    found = project_parties(session, validation.project_id) if validation.project_id is not None else None
    return found if found is not None else (validation.requester, frozenset())


# --- reading state --------------------------------------------------------------------------------


def _reviewers(session: Session, validation_id: str) -> list[ValidationReviewer]:
    rows = children(session, ValidationReviewer, "validation_id", validation_id)
    return sorted(rows, key=lambda r: (r.assigned_at, r.reviewer))


def _reviews(session: Session, validation_id: str) -> list[ValidationReview]:
    rows = children(session, ValidationReview, "validation_id", validation_id)
    return sorted(rows, key=lambda r: (r.submitted_at, r.reviewer))


def _info_requests(session: Session, validation_id: str) -> list[InfoRequest]:
    rows = children(session, InfoRequest, "validation_id", validation_id)
    return sorted(rows, key=lambda r: (r.asked_at, r.id))


def _state(session: Session, validation: Validation) -> rules.ValidationState:
    owner, partners = _project_parties(session, validation)
    return rules.ValidationState(
        validation_id=validation.validation_id,
        requester=validation.requester,
        coordinator=validation.coordinator,
        status=cast(rules.Status, validation.status),
        quorum=validation.quorum,
        reviewers=frozenset(r.reviewer for r in _reviewers(session, validation.validation_id)),
        asked_questions=frozenset(
            q["question_id"] for request in _info_requests(session, validation.validation_id) for q in request.questions
        ),
        project_owner=owner,
        project_partners=partners,
        due_by=validation.due_by,
    )


def _counted(state: rules.ValidationState, review: ValidationReview) -> bool:
    """Whether ``review`` counts: as the decision counted it, else as its reviewer's stakes are now."""
    return review.counted if review.counted is not None else not rules.is_conflicted(state, review.reviewer)


def _review(row: ValidationReview) -> rules.Review:
    return rules.Review(row.reviewer, row.scores, row.evidence_level, cast(rules.Recommendation, row.recommendation))


def _scores(scores: CriterionScores) -> dict[Criterion, int]:
    return {criterion: getattr(scores, criterion) for criterion in CRITERIA}


def _submitted(event: Event[ReviewSubmitted]) -> rules.Review:
    data = event.data
    return rules.Review(event.source, _scores(data.scores), data.evidence_level, data.recommendation)


# --- the workflow ---------------------------------------------------------------------------------


def _refuse(ctx: Context, event: Event[Any], refusal: rules.Refusal, *, name: str) -> None:
    """Refuse ``event``, answering in the name of ``name`` (the coordinator when one is known),
    and naming whom the event named (:func:`_named`): it saw the event and sees the refusal."""
    named = _named(event.data)
    ctx.refuse_action(refusal, source=name, **({"named": named} if named is not None and named != event.source else {}))


def _named(data: Any) -> str | None:
    """The institution an event of the workflow names besides its sender: the reviewer assigned or
    taken off, the coordinator asked."""
    if isinstance(data, (ReviewerAssigned, ReviewerUnassigned)):
        return data.reviewer
    if isinstance(data, ValidationRequested):
        return data.coordinator
    return None


def check_request(ctx: Context) -> None:
    """A request needs a fresh id and a member competence centre as coordinator.

    Refused requests are answered in the coordinator's name when the validation exists, else in
    the requester's own (an unknown or non-centre coordinator owns nothing it could answer for).
    """
    event = cast(Event[ValidationRequested], ctx.event)
    existing = ctx.session.get(Validation, event.data.validation_id)
    kind = _member_kind(ctx.session, event.data.coordinator)
    project = project_parties(ctx.session, event.data.project_id) if event.data.project_id is not None else None
    open_already = None
    if existing is None and event.data.project_id is not None:  # (the batch's rows as they are, without a flush)
        open_already = next((v.validation_id for v in children(ctx.session, Validation, "project_id", event.data.project_id)
                             if v.coordinator == event.data.coordinator and v.status in rules.OPEN), None)
    refusal = rules.request_refusal(
        existing is not None, event.data.coordinator, kind,
        requester=event.source, project=project, names_project=event.data.project_id is not None,
        due_by=event.data.due_by, now=event.logged_at, open_with_coordinator=open_already,
    )
    if refusal is not None and refusal.code == "coordinator_not_competence_centre" and kind is None:
        refusal = _meant(refusal, event.data.coordinator, member_ids(ctx.session, "competence_centre"))
    elif refusal is not None and refusal.code == "unknown_project" and event.data.project_id is not None:
        refusal = _meant(refusal, event.data.project_id, project_ids_of(ctx.session, event.source))
    if refusal is not None:
        _refuse(ctx, event, refusal, name=existing.coordinator if existing else event.source)


def _meant(refusal: rules.Refusal, name: str, candidates: Iterable[str]) -> rules.Refusal:
    """``refusal`` of a name that names nothing, with the nearest of ``candidates``, which is most
    often what was meant (a typo in an id)."""
    near = nearest(name, candidates)
    return rules.Refusal(refusal.code, f"{refusal.message}; did you mean {near!r}?") if near else refusal


def check_action(ctx: Context) -> None:
    """Every later event: who may do it in which status; a review may bring the decision."""
    event = cast(Event[Any], ctx.event)
    validation = ctx.session.get(Validation, event.data.validation_id)
    state = _state(ctx.session, validation) if validation is not None else None
    may_review = {None, "operator"}  # not a member, or the bus's own institution
    # The quorum, a coordinator's medians, a reviewer who has reviewed already:
    judged_on_reviews = isinstance(event.data, (ReviewSubmitted, ValidationDecided, ReviewerUnassigned))
    reviews = [_review(r) for r in _reviews(ctx.session, state.validation_id)] if state and judged_on_reviews else []
    refusal = rules.action_refusal(state, event.source, event.data, reviews=reviews, now=event.logged_at,
                                   is_member=lambda institution: _member_kind(ctx.session, institution) not in may_review)
    if refusal is not None and refusal.code == "unknown_validation":  # (a typo in the id, most often: every member sees them all)
        validation_id = event.data.validation_id
        refusal = _meant(rules.Refusal(refusal.code, f"no validation {validation_id!r} was requested"), validation_id,
                         ctx.session.exec(select(Validation.validation_id).order_by(Validation.validation_id)))
    elif refusal is not None and refusal.code == "not_member" and isinstance(event.data, ReviewerAssigned):
        refusal = _meant(refusal, event.data.reviewer, member_ids(ctx.session))
    if refusal is not None:
        _refuse(ctx, event, refusal, name=state.coordinator if state else event.source)
        return
    if isinstance(event.data, ReviewSubmitted):
        assert state is not None
        decision = rules.decision_at_quorum(state, reviews, _submitted(event))
        if decision is not None:
            ctx.emit(
                "validation.decided",
                ValidationDecided(
                    validation_id=state.validation_id,
                    outcome=decision.outcome,
                    evidence_level=decision.evidence_level,
                    median_scores=dict(decision.median_scores),
                    decided_by="rule",
                ),
                source=state.coordinator,
            )


# --- projections ----------------------------------------------------------------------------------


def _validation(session: Session, validation_id: str) -> Validation:
    validation = session.get(Validation, validation_id)
    if validation is None:  # the deciders refuse events about unknown validations
        raise LookupError(f"unknown validation {validation_id!r}")
    return validation


def _refresh_status(session: Session, validation: Validation) -> None:
    if validation.status in rules.OPEN:
        validation.status = rules.open_status(
            has_reviewers=bool(_reviewers(session, validation.validation_id)),
            has_open_questions=any(r.answered_at is None for r in _info_requests(session, validation.validation_id)),
        )


def _dump(value: Any) -> Any:
    return None if value is None else value.model_dump(mode="json", exclude_none=True)


def on_requested(session: Session, event: Event[ValidationRequested]) -> None:
    data = event.data
    session.add(
        Validation(
            validation_id=data.validation_id,
            requester=event.source,
            coordinator=data.coordinator,
            project_id=data.project_id,
            external_ref=_dump(data.external_ref),
            self_assessment=_dump(data.self_assessment),
            quorum=data.quorum,
            due_by=data.due_by,
            status="requested",
            requested_at=event.logged_at,
        )
    )


def on_reviewer_assigned(session: Session, event: Event[ReviewerAssigned]) -> None:
    data = event.data
    validation = _validation(session, data.validation_id)
    reviewer = session.get(ValidationReviewer, (data.validation_id, data.reviewer))
    if reviewer is None:
        session.add(
            ValidationReviewer(
                validation_id=data.validation_id,
                reviewer=data.reviewer,
                due_by=data.due_by,
                assigned_at=event.logged_at,
            )
        )
    elif "due_by" in data.model_fields_set:  # assigned again: a new due date, or the one it had
        reviewer.due_by = data.due_by
    _refresh_status(session, validation)


def on_reviewer_unassigned(session: Session, event: Event[ReviewerUnassigned]) -> None:
    data = event.data
    validation = _validation(session, data.validation_id)
    reviewer = session.get(ValidationReviewer, (data.validation_id, data.reviewer))
    if reviewer is not None:  # the decider refuses unassigning one who is not assigned
        session.delete(reviewer)
    _refresh_status(session, validation)


def on_review_submitted(session: Session, event: Event[ReviewSubmitted]) -> None:
    """A reviewer's review, replacing their earlier one."""
    data = event.data
    values: dict[str, Any] = {
        "scores": _scores(data.scores),
        "evidence_level": data.evidence_level,
        "recommendation": data.recommendation,
        "comments": data.comments,
        "submitted_at": event.logged_at,
    }
    earlier = session.get(ValidationReview, (data.validation_id, event.source))
    if earlier is None:
        session.add(ValidationReview(validation_id=data.validation_id, reviewer=event.source, **values, revision=1))
    else:
        earlier.sqlmodel_update({**values, "revision": earlier.revision + 1})
        session.add(earlier)


def on_info_requested(session: Session, event: Event[InfoRequested]) -> None:
    data = event.data
    validation = _validation(session, data.validation_id)
    session.add(
        InfoRequest(
            id=event.id,
            validation_id=data.validation_id,
            asked_by=event.source,
            questions=[_dump(q) for q in data.questions],
            asked_at=event.logged_at,
            answers=[],
        )
    )
    _refresh_status(session, validation)


def _answer(given: dict[str, Any], before: dict[str, Any] | None, at: datetime) -> dict[str, Any]:
    """The answer to keep: ``given``, which replaces the one ``before`` — that one's text kept in its
    ``earlier`` (with when it was replaced), so that a reviewer who read it sees the answer changed.
    The same text given again changes nothing."""
    if before is None:
        return given
    if before.get("text") == given.get("text"):
        return before
    earlier = [*before.get("earlier", ()), {"text": before.get("text"), "replaced_at": _iso(at)}]
    return {**given, "earlier": earlier}


def on_info_provided(session: Session, event: Event[InfoProvided]) -> None:
    """Each answer goes to every request that asked its question; a new answer replaces an old one
    (whose text it keeps in its ``earlier``)."""
    data = event.data
    validation = _validation(session, data.validation_id)
    answers = {a.question_id: _dump(a) for a in data.answers}
    for request in _info_requests(session, data.validation_id):
        asked = [q["question_id"] for q in request.questions]
        if not answers.keys() & set(asked):
            continue
        given = {a["question_id"]: a for a in request.answers}
        merged = given | {q: _answer(answers[q], given.get(q), event.logged_at) for q in asked if q in answers}
        request.answers = [merged[q] for q in asked if q in merged]  # a new list: JSON columns track assignment
        if len(request.answers) == len(asked) and request.answered_at is None:
            request.answered_at = event.logged_at
    _refresh_status(session, validation)


def on_decided(session: Session, event: Event[ValidationDecided]) -> None:
    data = event.data
    validation = _validation(session, data.validation_id)
    validation.status = "decided"
    validation.outcome = data.outcome
    validation.evidence_level = data.evidence_level
    validation.median_scores = dict(data.median_scores)
    validation.decided_by = data.decided_by
    validation.decided_at = event.logged_at
    # Which reviews the decision stood on, as the stakes were then: a partner joining the project
    # later does not make a review it counted one it did not.
    state = _state(session, validation)
    for review in _reviews(session, data.validation_id):
        review.counted = not rules.is_conflicted(state, review.reviewer)


def on_withdrawn(session: Session, event: Event[ValidationWithdrawn]) -> None:
    validation = _validation(session, event.data.validation_id)
    validation.status = "withdrawn"
    validation.withdrawn_reason = event.data.reason
    validation.withdrawn_at = event.logged_at


def on_review_overdue(session: Session, event: Event[ReviewOverdue]) -> None:
    assigned = session.get(ValidationReviewer, (event.data.validation_id, event.data.reviewer))
    if assigned is not None:  # (taken off meanwhile: there is nothing to note on)
        assigned.overdue_noted_for = event.data.due_by


def note_overdue_reviews(ctx: Context) -> None:
    """Timer: a reviewer of an open validation that has not reviewed by its due date (its own,
    else the validation's, as ``overdue`` in :func:`_progress`) is named late by the coordinator
    (``validation.review_overdue``), once for each due date: the projection notes the date, so a
    second tick says nothing, and a later date (assigned again) that passes too is said again."""
    due = _due()
    noted = col(ValidationReviewer.overdue_noted_for)
    late = (
        select(ValidationReviewer.validation_id, ValidationReviewer.reviewer, due, Validation.coordinator)
        .join(Validation, col(Validation.validation_id) == col(ValidationReviewer.validation_id))
        .where(col(Validation.status).in_(sorted(rules.OPEN)), *_late_at(ctx.now), sa.or_(noted.is_(None), noted != due))
        .order_by(due, col(ValidationReviewer.validation_id), col(ValidationReviewer.reviewer))
    )
    for validation_id, reviewer, due_by, coordinator in ctx.session.exec(late).all():
        when = _iso(due_by)
        ctx.emit(
            "validation.review_overdue",
            {"validation_id": validation_id, "reviewer": reviewer, "due_by": when},
            source=coordinator,
            key=f"{validation_id}/{reviewer}/{when}",
        )


def _assignments_of_leaver(session: Session, envelope: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(validation, coordinator) of each open validation the institution leaving reviews and has
    not reviewed yet, in the validations' order."""
    member = named_in(envelope, "id")
    if member is None:
        return []
    reviewed = select(ValidationReview.validation_id).where(ValidationReview.reviewer == member)
    assigned = (
        select(ValidationReviewer.validation_id, Validation.coordinator)
        .join(Validation, col(Validation.validation_id) == col(ValidationReviewer.validation_id))
        .where(ValidationReviewer.reviewer == member, col(Validation.status).in_(sorted(rules.OPEN)),
               col(ValidationReviewer.validation_id).not_in(reviewed))
        .order_by(col(ValidationReviewer.validation_id))
    )
    return [(validation_id, coordinator) for validation_id, coordinator in session.exec(assigned).all()]


def release_departed_reviewer(ctx: Context) -> None:
    """A member leaves the network (``institution.left``): each open validation it was assigned
    to review and has not reviewed takes it off, in the coordinator's name
    (``validation.reviewer_unassigned``, saying why): it could no longer review, yet the
    validation waited for it (``quorum_reachable`` counted it) and the timer went on naming it
    late. A review it gave while a member stands. A rule of version 5: a log applied before left
    the assignments."""
    gone = leaving(ctx, 5)
    if gone is None:
        return
    for validation_id, coordinator in _assignments_of_leaver(ctx.session, gone.envelope):
        ctx.emit(
            "validation.reviewer_unassigned",
            {"validation_id": validation_id, "reviewer": gone.member,
             "reason": {"en": f"{gone.member} left the network on {gone.at:%Y-%m-%d}: it can no longer review"}},
            source=coordinator,
            key=f"{validation_id}/{gone.member}",
        )


PROJECTIONS: dict[str, Projection] = {
    "validation.requested": on_requested,
    "validation.reviewer_assigned": on_reviewer_assigned,
    "validation.reviewer_unassigned": on_reviewer_unassigned,
    "validation.review_submitted": on_review_submitted,
    "validation.info_requested": on_info_requested,
    "validation.info_provided": on_info_provided,
    "validation.decided": on_decided,
    "validation.withdrawn": on_withdrawn,
    "validation.review_overdue": on_review_overdue,
}
DECIDERS: dict[str, Decider] = {
    "validation.requested": check_request,
    **{event_type: check_action for event_type in PROJECTIONS if event_type not in ("validation.requested", "validation.review_overdue")},
    "institution.left": release_departed_reviewer,
}
TIMERS: list[Timer] = [note_overdue_reviews]


def _the_validations_project(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    validation = session.get(Validation, envelope.get("subject"))
    return [validation.project_id] if validation is not None and validation.project_id else []


_VALIDATIONS_PROJECT = Reads("project", _the_validations_project)
"""Every event after the request is judged with the parties of the validation's project (a
reviewer may be neither its owner nor a partner)."""

READS: dict[str, list[Reads]] = {
    # A request names the project (unknown: refused; its sender must be owner or partner) and
    # the coordinator (a member competence centre); an assignment, a member reviewer.
    "validation.requested": [named("project", "project_id"), named("institution", "coordinator")],
    **{event_type: [_VALIDATIONS_PROJECT] for event_type in DECIDERS if event_type.startswith("validation.") and event_type != "validation.requested"},
    "validation.reviewer_assigned": [_VALIDATIONS_PROJECT, named("institution", "reviewer")],
    # A member's leaving takes it off the validations it was to review.
    "institution.left": [Reads("validation", lambda session, envelope: [v for v, _ in _assignments_of_leaver(session, envelope)])],
}


# --- the resource, for the read API ---------------------------------------------------------------


def _iso(moment: datetime | None) -> str | None:
    """A moment as the rest of the API writes it (UTC, ``Z``)."""
    return None if moment is None else moment.isoformat().replace("+00:00", "Z")


def _progress(validation: Validation, assigned: ValidationReviewer, reviewed: bool, now: datetime) -> dict[str, Any]:
    """How far a reviewer is: its due date (its own, else the validation's), whether it has
    reviewed, and whether it is late (the validation open, no review, the due date past)."""
    due = assigned.due_by or validation.due_by
    late = validation.status in rules.OPEN and not reviewed and due is not None and due < now
    return {"due_by": due, "reviewed": reviewed, "overdue": late}


def overdue_reviewers(now: datetime, reviewer: str | None = None) -> Any:
    """A condition on ``Validation``: it is open and a reviewer (``reviewer``, else any) has not
    reviewed by its due date (its own, else the validation's) — what ``overdue`` in
    :func:`_progress` says of one reviewer, for a query."""
    late = select(ValidationReviewer.reviewer).where(
        ValidationReviewer.validation_id == Validation.validation_id, *_late_at(now))
    if reviewer is not None:
        late = late.where(ValidationReviewer.reviewer == reviewer)
    return sa.and_(col(Validation.status).in_(sorted(rules.OPEN)), late.exists())


def _due() -> Any:
    """A reviewer's due date, its own else its validation's (``ValidationReviewer`` with ``Validation``)."""
    return sa.func.coalesce(ValidationReviewer.due_by, Validation.due_by)


def _late_at(now: datetime) -> tuple[Any, Any]:
    """The conditions of a reviewer (with its validation) late at ``now``: no review, its due date past."""
    reviewed = select(ValidationReview.reviewer).where(
        ValidationReview.validation_id == ValidationReviewer.validation_id, ValidationReview.reviewer == ValidationReviewer.reviewer)
    return ~reviewed.exists(), _due() < sa.bindparam("now", now, type_=UtcDateTime())


def late_reviewers_of(session: Session, validations: list[Validation], now: datetime) -> dict[str, list[dict[str, Any]]]:
    """The reviewers late with their review at ``now`` in each of ``validations`` that is open, with
    their due dates (its own, else the validation's): whom its coordinator chases."""
    ids = [v.validation_id for v in validations]
    if not ids:
        return {}
    late: dict[str, list[dict[str, Any]]] = {}
    rows = session.exec(
        select(ValidationReviewer.validation_id, ValidationReviewer.reviewer, _due())
        .join(Validation, col(Validation.validation_id) == col(ValidationReviewer.validation_id))
        .where(col(ValidationReviewer.validation_id).in_(ids), col(Validation.status).in_(sorted(rules.OPEN)), *_late_at(now))
        .order_by(_due(), col(ValidationReviewer.reviewer))
    )
    for validation_id, reviewer, due in rows:
        late.setdefault(validation_id, []).append({"reviewer": reviewer, "due_by": due})
    return late


def assignments_of(session: Session, reviewer: str, validations: list[Validation]) -> dict[str, dict[str, Any]]:
    """``reviewer``'s own assignment in each of ``validations`` it is assigned to (its work list)."""
    ids = [v.validation_id for v in validations]
    if not ids:
        return {}
    assigned = {r.validation_id: r for r in session.exec(select(ValidationReviewer).where(
        ValidationReviewer.reviewer == reviewer, col(ValidationReviewer.validation_id).in_(ids)))}
    reviewed = set(session.exec(select(ValidationReview.validation_id).where(
        ValidationReview.reviewer == reviewer, col(ValidationReview.validation_id).in_(ids))))
    now = datetime.now(timezone.utc)
    return {
        v.validation_id: _progress(v, assigned[v.validation_id], v.validation_id in reviewed, now)
        for v in validations if v.validation_id in assigned
    }


def validation_view(session: Session, validation_id: str, viewer: str) -> dict[str, Any] | None:
    """``/validations/{id}`` as ``viewer`` (a member) may see it, with the catalog's field names;
    None when unknown. ``reviews`` is present only when the viewer may see some (scores and
    comments are confidential until the decision); the information asked and given is shown to
    the parties of the workflow (coordinator, requester, reviewers) only."""
    validation = session.get(Validation, validation_id)
    if validation is None:
        return None
    reviewers = _reviewers(session, validation_id)
    view: dict[str, Any] = {
        "validation_id": validation.validation_id,
        "requester": validation.requester,
        "coordinator": validation.coordinator,
        "project_id": validation.project_id,
        "external_ref": validation.external_ref,
        "self_assessment": validation.self_assessment,
        "quorum": validation.quorum,
        "due_by": _iso(validation.due_by),
        "requested_at": _iso(validation.requested_at),
        "status": validation.status,
        "outcome": validation.outcome,
        "evidence_level": validation.evidence_level,
        "median_scores": validation.median_scores or {},
        "decided_by": validation.decided_by,
        "decided_at": _iso(validation.decided_at),
        "withdrawn_reason": validation.withdrawn_reason,
        "withdrawn_at": _iso(validation.withdrawn_at),
        "reviewers": [  # a reviewer's own due date, else the validation's
            {"reviewer": r.reviewer, "due_by": _iso(r.due_by or validation.due_by), "assigned_at": _iso(r.assigned_at)}
            for r in reviewers
        ],
    }
    state = _state(session, validation)
    parties = {state.coordinator, state.requester, *state.reviewers}
    reviews = _reviews(session, validation_id)
    if viewer in parties:  # who has reviewed, and who is late, is the workflow's own business
        reviewed = {r.reviewer: r for r in reviews}
        now = datetime.now(timezone.utc)
        eligible = 0
        for shown, row in zip(view["reviewers"], reviewers):
            progress = _progress(validation, row, row.reviewer in reviewed, now)
            free = not rules.is_conflicted(state, row.reviewer)
            counted = progress["reviewed"] and _counted(state, reviewed[row.reviewer])
            shown.update(reviewed=progress["reviewed"], counted=counted, overdue=progress["overdue"])
            eligible += free
        view["quorum_reachable"] = state.status not in rules.OPEN or eligible >= validation.quorum
    if state.status == "decided" or viewer in parties:
        view["reviews"] = [
            {
                "reviewer": r.reviewer,
                "scores": r.scores,
                "evidence_level": r.evidence_level,
                "recommendation": r.recommendation,
                "comments": r.comments,
                "submitted_at": _iso(r.submitted_at),
                "revision": r.revision,
                "counted": _counted(state, r),
            }
            for r in rules.visible_reviews(state, reviews, viewer)
        ]
    if viewer in parties:
        view["info_requests"] = [
            {
                "asked_by": r.asked_by,
                "questions": r.questions,
                "asked_at": _iso(r.asked_at),
                "answers": r.answers,
                "answered_at": _iso(r.answered_at),
            }
            for r in _info_requests(session, validation_id)
        ]
    return view


# --- who may see the workflow's events -------------------------------------------------------------

CONFIDENTIAL = confidential.VALIDATION_EVENTS
"""The validation workflow's event types that not every member may see (:mod:`handlers.confidential`)."""


def _refused(session: Session, event_id: str) -> bool:
    """Whether the workflow refused the event ``event_id``: a refusal is among what was derived from it
    (what ``GET /events/{id}`` reads: :func:`handlers.bookkeeping.applied_event`)."""
    from handlers.bookkeeping import applied_event

    applied = applied_event(session.connection(), event_id)
    return applied is not None and any(derived_type(derived) == "validation.action_rejected" for derived, _ in applied[1])


def audience(session: Session, envelope: Mapping[str, Any]) -> frozenset[str] | None:
    """The institutions that may see a logged event, as ``GET /events`` shows it and webhooks
    deliver it; None: every member. The rule of :func:`validation_view`:

    - a review: its reviewer and the coordinator; the requester too when the workflow took it
      (its reviewer has a review); every member once the validation is decided, when it took it;
    - information asked and given, and a reviewer named late: the parties (coordinator,
      requester, assigned reviewers; the late reviewer also once taken off); information asked or
      given that the workflow refused, its sender and the coordinator only;
    - a refusal (``validation.action_rejected``): the parties, the institution it refused and the
      one the refused event named (``named``: a reviewer assigned, a coordinator asked).

    Whoever said an event sees it. The parties are those the workflow accepted, as the read models
    have them — never a request or an assignment it refused; of a validation the read models do
    not know (yet), only who said the event and whom it refused.
    """
    event_type = envelope.get("type")
    if event_type not in CONFIDENTIAL:
        return None
    data = envelope.get("data")
    data = data if isinstance(data, Mapping) else {}
    validation_id = str(data.get("validation_id"))
    source = str(envelope.get("source")).removeprefix("/institutions/")
    allowed = {source}
    if event_type == "validation.action_rejected":
        allowed.update(str(data[name]) for name in ("actor", "named") if data.get(name))
    found = session.exec(
        select(Validation.requester, Validation.coordinator, Validation.status).where(Validation.validation_id == validation_id)
    ).first()
    if found is None:
        return frozenset(allowed)
    requester, coordinator, status = found
    allowed.add(coordinator)  # refused events too: they were refused in its name
    if event_type in ("validation.info_requested", "validation.info_provided") and _refused(session, str(envelope.get("id"))):
        return frozenset(allowed)  # (questions from outside the workflow, say: not delivered to its parties)
    if event_type == "validation.review_submitted":
        if _refused(session, str(envelope.get("id"))):  # (its reviewer may have another review, taken)
            return frozenset(allowed)
        taken = session.exec(select(ValidationReview.reviewer).where(
            ValidationReview.validation_id == validation_id, ValidationReview.reviewer == source)).first() is not None
        if taken and status == "decided":
            return None
        if taken:
            allowed.add(requester)
        return frozenset(allowed)
    allowed.add(requester)
    allowed.update(session.exec(select(ValidationReviewer.reviewer).where(ValidationReviewer.validation_id == validation_id)))
    if event_type == "validation.review_overdue":
        allowed.add(str(data.get("reviewer")))  # the late reviewer, also once taken off
    return frozenset(allowed)
