"""Validation of social innovations: self-assessment, reviews against six criteria, decision."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, Strict, model_validator

from schemas.common import (
    CRITERIA,
    AggregateId,
    Criterion,
    EventData,
    EventId,
    EvidenceLevel,
    ExternalRef,
    InstitutionId,
    LocalizedText,
    Reason,
    Score,
    Timestamp,
    ValueObject,
    Whole,
    at_most,
)

__all__ = [
    "Answer",
    "CriterionScores",
    "InfoProvided",
    "InfoRequested",
    "Question",
    "ReviewOverdue",
    "ReviewSubmitted",
    "ReviewerAssigned",
    "ReviewerUnassigned",
    "SelfAssessment",
    "ValidationActionRejected",
    "ValidationDecided",
    "ValidationRefusal",
    "ValidationRequested",
    "ValidationWithdrawn",
]

# A median of integer scores is a whole or a half number.
MedianScore = Annotated[float, Strict(), Field(ge=1, le=5, multiple_of=0.5)]


class CriterionScores(ValueObject):
    """A reviewer's score, 1–5, for every one of the six criteria: all are required, so reviews
    can be compared and medians taken."""

    novelty: Score
    effectiveness: Score
    user_involvement: Score
    transferability: Score
    sustainability: Score
    equity: Score


class SelfAssessment(ValueObject):
    """The developers' own part of the assessment tool. Criteria they cannot judge yet may be left
    out, but the assessment must say something: a score or a statement."""

    scores: dict[Criterion, Score] = {}
    evidence_level: EvidenceLevel | None = None
    statement: LocalizedText | None = None

    model_config = ConfigDict(json_schema_extra={"anyOf": [
        {"required": ["scores"], "properties": {"scores": {"minProperties": 1}}},
        {"required": ["statement"], "properties": {"statement": {"type": "object"}}},
    ]})

    @model_validator(mode="after")
    def _not_empty(self) -> Self:
        if not self.scores and self.statement is None:
            raise ValueError("a self-assessment needs at least one score or a statement")
        return self


class ValidationRequested(EventData):
    """The source asks a competence centre (`coordinator`) to validate a project of the network
    (`project_id`) or one known elsewhere (`external_ref`) — exactly one of the two."""

    model_config = ConfigDict(json_schema_extra={"oneOf": [
        {"required": ["project_id"], "properties": {"project_id": {"type": "string"}}},
        {"required": ["external_ref"], "properties": {"external_ref": {"type": "object"}}},
    ]})

    validation_id: AggregateId
    project_id: AggregateId | None = None
    external_ref: ExternalRef | None = None
    coordinator: InstitutionId
    self_assessment: SelfAssessment
    quorum: Annotated[int, Strict(), Field(ge=1), *at_most(100), Whole] = 2
    due_by: Timestamp | None = None

    @model_validator(mode="after")
    def _one_subject(self) -> Self:
        if (self.project_id is None) == (self.external_ref is None):
            raise ValueError("give exactly one of project_id and external_ref")
        return self


class ReviewerAssigned(EventData):
    """The coordinator asks an institution to review; conflicts of interest are the workflow's."""

    validation_id: AggregateId
    reviewer: InstitutionId
    due_by: Timestamp | None = None


class ReviewerUnassigned(EventData):
    """The coordinator takes an assigned reviewer off the validation before it has reviewed (a
    conflict of interest found late, a reviewer who cannot do it); it may be assigned again.
    Public, as the assignment is: so is the reason, if one is given. The bus takes off, in the
    coordinator's name, a reviewer that leaves the network before it reviewed (version 5 of the
    rules)."""

    validation_id: AggregateId
    reviewer: InstitutionId
    reason: LocalizedText | None = None


class ReviewOverdue(EventData):
    """The bus says, in the coordinator's name, that an assigned reviewer of an open validation
    has not reviewed by its due date (its own, else the validation's): once for each due date, so
    a reviewer assigned again with a later date that passes too is named again. Who is late is the
    workflow's own business: seen by the validation's parties (the coordinator, the requester, the
    reviewers) only."""

    validation_id: AggregateId
    reviewer: InstitutionId
    due_by: Timestamp


class Question(ValueObject):
    """One question to the requester; the id lets answers point at it."""

    question_id: AggregateId
    text: LocalizedText


class Answer(ValueObject):
    """The requester's answer to one earlier question."""

    question_id: AggregateId
    text: LocalizedText


class InfoRequested(EventData):
    """The coordinator or a reviewer asks the requester for more information."""

    validation_id: AggregateId
    questions: Annotated[tuple[Question, ...], Field(min_length=1)]


class InfoProvided(EventData):
    """The requester answers questions asked earlier."""

    validation_id: AggregateId
    answers: Annotated[tuple[Answer, ...], Field(min_length=1)]


class ReviewSubmitted(EventData):
    """An assigned reviewer (the source) scores the innovation; a later review by the same
    reviewer replaces this one until the decision."""

    validation_id: AggregateId
    scores: CriterionScores
    evidence_level: EvidenceLevel
    recommendation: Literal["validate", "revise", "reject"]
    comments: LocalizedText | None = None


class ValidationDecided(EventData):
    """The outcome. By `rule` at quorum (then every criterion has a median), or by the
    coordinator, who may decide on fewer reviews (then medians may be partial or empty)."""

    model_config = ConfigDict(json_schema_extra={
        "if": {"properties": {"decided_by": {"const": "rule"}}},
        "then": {"required": ["median_scores"], "properties": {"median_scores": {"required": list(CRITERIA)}}},
    })

    validation_id: AggregateId
    outcome: Literal["validated", "needs_revision", "not_validated"]
    evidence_level: EvidenceLevel | None = None
    median_scores: dict[Criterion, MedianScore] = {}
    decided_by: Literal["rule", "coordinator"]

    @model_validator(mode="after")
    def _rule_has_all_medians(self) -> Self:
        if self.decided_by == "rule" and set(self.median_scores) != set(CRITERIA):
            raise ValueError(
                "a decision by rule is the bus's own and carries the median of every criterion; "
                "a coordinator decides with decided_by 'coordinator'"
            )
        return self


class ValidationWithdrawn(EventData):
    """The requester withdraws; nothing is accepted for this validation afterwards."""

    validation_id: AggregateId
    reason: LocalizedText


ValidationRefusalCode = Literal[
    "unknown_validation",
    "already_requested",
    "coordinator_not_competence_centre",
    "not_coordinator",
    "not_requester",
    "conflict_of_interest",
    "not_member",
    "not_assigned",
    "already_reviewed",
    "unknown_question",
    "already_decided",
    "withdrawn",
    "unknown_project",
    "not_owner_or_partner",
    "question_taken",
    "medians_not_from_reviews",
    "due_in_past",
    "already_open",
    "due_after_validation",
]
"""The validation workflow's refusal codes (the rules decide them; the catalog carries them)."""


class ValidationRefusal(Reason):
    """Why the validation workflow refused an event."""

    code: ValidationRefusalCode


class ValidationActionRejected(EventData):
    """The validation workflow refused an event that passed the gate (a state rule); emitted in
    the coordinator's name, with `causationid` naming the refused event, repeated here with its
    type and source so a reader of this event alone knows what happened to whom."""

    validation_id: AggregateId
    rejected_type: Annotated[str, Field(pattern=r"^validation\.[a-z_]+$")]
    rejected_event_id: EventId
    actor: InstitutionId
    reason: ValidationRefusal
    named: InstitutionId | None = Field(None, description=(
        "the institution the refused event named besides its sender — the reviewer of an assignment "
        "or of taking one off, the coordinator of a request —, which is told of the refusal too"))
