"""The read API's resources as response models, so ``/openapi.json`` describes every answer.

Field names are the catalog's. A resource answers only the fields it declares: a column a read
model grows reaches members once a resource names it, never by itself (a call's running total of
awards, which only the applications' parties may know, was shown to every member that way).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bus.verdict import VerdictBody
from handlers.rules.calls import ApplicationStatus

LocalizedText = dict[str, str]


class Resource(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Institution(Resource):
    id: str
    name: LocalizedText
    kind: str
    country: str
    region: str | None = None
    municipality_level: str | None = None
    themes: list[str] = []
    identifiers: list[dict[str, str]] = []
    website: str | None = None
    contact_email: str | None = None
    joined_at: datetime
    left_at: datetime | None = None
    """When a former member left (``GET /institutions/{id}``); the list has current members only."""


class MemberNats(Resource):
    """What a member's NATS credentials (``collabbus institutions creds ID``) let its client do."""

    url: str
    """Where its client connects (``COLLABBUS_NATS_PUBLIC_URL``, else the bus's own NATS address)."""
    ingress: str
    """The subjects it offers events on: ``collab.ingress.{id}.>``."""
    inbox_prefix: str
    """The inbox prefix its client connects with; its verdicts come back there."""
    live_subjects: list[str]
    """The subjects it may subscribe to: where the log's server republishes each stored event every
    member may see (``collab.live.{institution}.{domain}.{event}.{subject}``), with its sequence
    in the ``Nats-Sequence`` header."""
    log_requests: str
    """Where it asks for pages of the log it may see, what it missed while away (NATS
    request/reply: ``collab.log.{id}``, ``GET /events``'s query as JSON)."""


class MeToken(Resource):
    """The token the request was made with (``collabbus institutions access ID`` lists them so)."""

    sha256: str
    """The start of its SHA-256 (only that is stored)."""
    label: str | None = None
    """Whose or what for, as the operator said when issuing it."""
    created_at: datetime
    expires_at: datetime | None
    """When it stops working (None: when it is revoked)."""


class Me(Resource):
    """The member a token speaks for (``GET /me``)."""

    id: str
    kind: str | None
    """Its kind as the gate knows it (None: a member that has just left)."""
    institution: Institution | None
    """As the read models have it (None for a moment after it joined, until they applied that)."""
    may_emit: list[str]
    """The event types its kind may offer. Who owns a call or coordinates a validation is for the
    workflows, which refuse what the owner alone may do."""
    nats: MemberNats
    """Its way in over NATS."""
    token: MeToken | None = None
    """The token this request was made with."""


class ApplicationCounts(Resource):
    """How many applications a call has had, for its publisher alone (its competitors must not
    learn how crowded a call is): every one the call answered (``total``), and how many stand in
    each status now; with what the call has awarded so far (``awarded_amount``, in its budget's
    currency; None: nothing awarded with an amount)."""

    total: int
    received: int = 0
    rejected: int = 0
    invited: int = 0
    proposal_sent: int = 0
    awarded: int = 0
    declined: int = 0
    withdrawn: int = 0
    lapsed: int = 0
    awarded_amount: dict[str, str] | None = None


class Call(Resource):
    call_id: str
    owner: str
    title: LocalizedText
    summary: LocalizedText | None = None
    kind: str
    themes: list[str] = []
    eligible_kinds: list[str] = []
    eligible_countries: list[str] = []
    budget: dict[str, str] | None = None
    opens_at: datetime
    deadline: datetime
    deadline_model: str
    full_proposal_deadline: datetime | None = None
    """A two-stage call's deadline for full proposals (none: no limit)."""
    url: str | None = None
    status: Literal["upcoming", "open", "closed"]
    stage: Literal["first", "second", "ended"] | None = None
    """A two-stage call's stage: ``first`` until its deadline, ``second`` while those invited send
    their full proposals (its status is ``closed`` then: it takes no more applications),
    ``ended`` once the deadline for them has passed or its publisher closed it early; None for a
    single-stage call."""
    published_at: datetime
    closed_at: datetime | None = None
    closed_reason: str | None = None
    applications: ApplicationCounts | None = None
    """How many applications the call has, by status: shown to its publisher only (None to
    every other member)."""


class FullProposal(Resource):
    """What an application invited to a two-stage call's second stage sent."""

    summary: LocalizedText | None = None
    requested_amount: dict[str, str] | None = None
    url: str | None = None


class Application(Resource):
    """An application to a call as it stands: ``received`` or ``rejected`` (with the ``reason``)
    by the call; then ``awarded`` or ``declined`` by the call's publisher, or ``withdrawn`` by the
    applicant (``decided_at``, and the decision's ``comment`` or the ``withdrawal_reason``). In a
    two-stage call a received application is ``invited`` to the second stage first
    (``invited_at``, ``invitation_comment``), then ``proposal_sent`` (``full_proposal``,
    ``full_proposal_at``), or ``lapsed`` without one when the deadline for full proposals has
    passed (``decided_at``: that deadline), unless its publisher cancelled or filled the call."""

    call_id: str
    application_id: str
    applicant: str
    project_id: str | None = None
    partners: list[str] = []
    requested_amount: dict[str, str] | None = None
    status: ApplicationStatus
    reason: dict[str, Any] | None = None
    submitted_at: datetime
    """When the answer was logged (a resubmission under a rejected application's id: its time)."""
    decided_at: datetime | None = None
    """When the publisher's decision, or the withdrawal, was logged."""
    awarded_amount: dict[str, str] | None = None
    """``{amount, currency}`` granted, when the decision names it."""
    comment: LocalizedText | None = None
    """The publisher's comment on its decision (or the applicant's reason for withdrawing, which
    ``withdrawal_reason`` names as such)."""
    withdrawal_reason: LocalizedText | None = None
    """The applicant's reason for withdrawing the application (``withdrawn``), when it gave one."""
    invited_at: datetime | None = None
    invitation_comment: LocalizedText | None = None
    full_proposal: FullProposal | None = None
    full_proposal_at: datetime | None = None


class Location(Resource):
    country: str | None = None
    region: str | None = None
    municipality: str | None = None


class ExternalRef(Resource):
    """How another system (Innokylä, say) names the project."""

    system: str
    id: str
    url: str | None = None


class Project(Resource):
    project_id: str
    owner: str
    title: LocalizedText
    summary: LocalizedText | None = None
    themes: list[str] = []
    status: str
    started_on: date | None = None
    ends_on: date | None = None
    location: Location | None = None
    service_model: str | None = None
    external_refs: list[ExternalRef] = []
    sdgs: list[int] = []
    registered_at: datetime
    updated_at: datetime
    completed_at: datetime | None = None
    """When the status became ``completed`` (by ``project.completed``, an update or a registration); null while it is not."""
    outcome: LocalizedText | None = None


class Partner(Resource):
    institution: str
    role: str
    relation: str | None = None
    joined: bool = Field(description=(
        "whether the partner joined the network (false: the project names an institution that is no member)"))
    left_at: datetime | None = Field(default=None, description="when the partner left the network (it stays listed: it took part)")


class Adoption(Resource):
    adoption_id: str
    adopter: str
    support: list[str]
    adapted_project_id: str | None = None
    adopted_at: datetime
    adopter_left_at: datetime | None = Field(default=None, description=(
        "when the adopter left the network (the adoption stands, and the statistics count it)"))


class Period(Resource):
    start: date
    end: date


class ImpactReport(Resource):
    period: Period
    indicators: list[dict[str, Any]]
    reported_at: datetime


class ProjectDetail(Project):
    owner_left_at: datetime | None = Field(default=None, description=(
        "when the owner left the network (the project stays, and nobody may change it any more)"))
    partners: list[Partner]
    adoptions: list[Adoption]
    impact: list[ImpactReport]


class Validation(Resource):
    validation_id: str
    requester: str
    coordinator: str
    project_id: str | None = None
    external_ref: dict[str, Any] | None = None
    quorum: int
    due_by: datetime | None = None
    requested_at: datetime
    status: str
    outcome: str | None = None
    evidence_level: int | None = None
    median_scores: dict[str, float] = {}
    decided_by: str | None = None
    decided_at: datetime | None = None
    assignment: dict[str, Any] | None = Field(default=None, description=(
        "with `?reviewer=` naming the caller: its own assignment — `due_by` (its own, else the validation's), "
        "`reviewed`, `overdue`"
    ))
    late_reviewers: list[dict[str, Any]] | None = Field(default=None, description=(
        "with `?overdue=true` and `coordinator` or `requester` naming the caller: whom to chase — each reviewer "
        "late with its review, `reviewer` and `due_by` (its own, else the validation's)"
    ))


class Review(Resource):
    reviewer: str
    scores: dict[str, int]
    evidence_level: int
    recommendation: str
    comments: LocalizedText | None = None
    submitted_at: datetime
    revision: int
    counted: bool = Field(description=(
        "whether the review counts towards the decision: its reviewer has had no stake in the practice since "
        "(one that became a partner or the owner does not count); once decided, whether the decision counted it"))


class ValidationDetail(Validation):
    """``reviews`` and ``info_requests`` are present only when the caller may see them."""

    self_assessment: dict[str, Any] | None = None
    withdrawn_reason: LocalizedText | None = None
    withdrawn_at: datetime | None = None
    reviewers: list[dict[str, Any]] = Field(default=[], description=(
        "`reviewer`, `due_by` (its own, else the validation's), `assigned_at`; for the workflow's parties also "
        "`reviewed`, `counted` (its review counts towards the quorum: it has no stake in the practice since) "
        "and `overdue` (open, not reviewed, past `due_by`)"
    ))
    quorum_reachable: bool | None = Field(default=None, description=(
        "for the workflow's parties: whether enough reviewers without a stake in the practice are assigned for the "
        "quorum (false: the rule cannot decide until the coordinator assigns more)"
    ))
    reviews: list[Review] | None = Field(default=None, description="absent when the caller may not see reviews")
    info_requests: list[dict[str, Any]] | None = Field(default=None, description=(
        "for the workflow's parties only: who asked, the questions, the answers (an answer given again replaces the first, "
        "kept in its `earlier` with when it was replaced) and when every question had one"))


class WaitlistEntry(Resource):
    registration_id: str
    participant: str
    attendees: int | None = None
    position: int | None = None


class InnovationDay(Resource):
    day_id: str
    organizer: str
    title: LocalizedText
    summary: LocalizedText | None = None
    format: str
    starts_at: datetime
    ends_at: datetime
    attendance_mode: str
    venue: dict[str, Any] | None = None
    online_url: str | None = None
    capacity: int
    registration_deadline: datetime
    themes: list[str] = []
    languages: list[str] = []
    status: str
    cancelled_reason: LocalizedText | None = Field(None, description="why it was cancelled (status cancelled)")
    held_attendees: int | None = Field(None, description="how many attended, as its organiser reported (status held)")
    held_summary: LocalizedText | None = Field(None, description="its organiser's summary (status held)")
    meetings_proposed_at: datetime | None = Field(None, description="when the matchmaking proposed its meetings")
    confirmed: int = Field(description="confirmed attendees")
    seats_left: int = Field(description="attendees the gathering still seats (its capacity less those confirmed)")
    waitlisted: list[WaitlistEntry] = []


class Registration(Resource):
    registration_id: str
    day_id: str
    participant: str
    role: str | None = None
    attendees: int | None = None
    project_id: str | None = None
    interests: list[str] = []
    status: str
    position: int | None = None
    reason: dict[str, Any] | None = None
    requested_at: datetime | None = None
    decided_at: datetime | None = None


class Meeting(Resource):
    innovator: str
    funder: str
    project_id: str | None = None
    slot_start: datetime
    slot_end: datetime
    shared_themes: list[str] = []


class LoggedEvent(BaseModel):
    """An event as it stands in the log (canonical structured CloudEvent) with its sequence."""

    seq: int
    event: dict[str, Any]


class EventOutcome(BaseModel):
    """One logged event and what became of it once the network applied it."""

    seq: int = Field(description="its log sequence")
    event: dict[str, Any] = Field(description="the event as logged (canonical structured CloudEvent)")
    outcome: Literal["applied", "refused", "waiting"] = Field(
        description="`refused`: a workflow rule refused it (its effects were not applied; `refusal` says why); "
                    "`waiting` (shown to whoever may see the event: a confidential one to its sender, its parties and the "
                    "operator): the bus could not apply it, or set it "
                    "aside behind an earlier event about the same thing that it could not apply — it waits in the "
                    "dead-letter queue for the network's operator (`waiting` says which)"
    )
    refusal: LoggedEvent | None = Field(
        description="the `…_rejected` event the bus logged about it, with the reason (`data.reason.code`); null "
                    "with `refused` when the refusal is a confidential step's that only its parties see "
                    "(a reviewer assignment the validation's coordinator was refused, say)"
    )
    derived: list[LoggedEvent] = Field(
        description="every event the workflows decided on it (the refusal included), in log order"
    )
    derived_pending: list[str] = Field(
        description="ids of events decided on it that the bus is still logging (they appear in `derived` moments later)"
    )
    waiting: str | None = Field(
        default=None, description="with `waiting`: why it was not applied, for its sender (no internal error is repeated)"
    )


class LevelSpread(BaseModel):
    municipality_level: str
    municipalities: int = Field(description="distinct adopting municipalities of this level")
    adoptions: int


class UncountedAdoptions(BaseModel):
    municipalities: list[str] = Field(description="the adopting municipalities that have no `municipality_level`, by id")
    adoptions: int = Field(description="their adoptions, which no level counts")


class AdoptionStats(BaseModel):
    by_municipality_level: list[LevelSpread]
    without_level: UncountedAdoptions = Field(description=(
        "adoptions by municipalities whose level is not known, counted under no level: the operator gives them "
        "theirs with `institution.updated`"))


Verdict = VerdictBody
