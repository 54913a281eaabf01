"""Calls for funding, partnership, tenders, challenges and trainings, and applications to them."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.common import (
    AggregateId,
    Changes,
    CountryCode,
    EventData,
    EventId,
    InstitutionId,
    InstitutionKind,
    LocalizedText,
    Money,
    NotClearable,
    Reason,
    Theme,
    Timestamp,
    WebUrl,
    null_unless,
)

__all__ = [
    "ApplicationDecided",
    "ApplicationLapsed",
    "ApplicationReceived",
    "ApplicationRefusal",
    "ApplicationRejected",
    "ApplicationSubmitted",
    "ApplicationWithdrawn",
    "CallActionRefusal",
    "CallActionRejected",
    "CallAmended",
    "CallChanges",
    "CallClosed",
    "CallPublished",
    "FullProposalSubmitted",
]

CallKind = Literal["funding", "partnership", "tender", "challenge", "training"]
DeadlineModel = Literal["single_stage", "two_stage"]


def _check_window(opens_at: datetime | None, deadline: datetime | None, full_proposal_deadline: datetime | None = None) -> None:
    if opens_at is not None and deadline is not None and deadline <= opens_at:
        raise ValueError("deadline must be after opens_at")
    if deadline is not None and full_proposal_deadline is not None and full_proposal_deadline <= deadline:
        raise ValueError("full_proposal_deadline must be after deadline (the first stage's)")


class CallPublished(EventData):
    """A call opened to the network. The publisher (the event's source) owns it. Empty
    `eligible_kinds` / `eligible_countries` mean everyone.

    A `two_stage` call takes short applications until its `deadline`; its publisher invites some
    of them (`call.application_decided` with `invited`) to send a full proposal
    (`call.full_proposal_submitted`) by the `full_proposal_deadline` (none: no limit), and awards
    only applications with one. An invited application without one when that deadline has
    passed lapses (`call.application_lapsed`), unless the publisher cancelled or filled the call."""

    model_config = ConfigDict(json_schema_extra=null_unless("deadline_model", "two_stage", "full_proposal_deadline"))

    call_id: AggregateId
    title: LocalizedText
    summary: LocalizedText | None = None
    kind: CallKind
    themes: tuple[Theme, ...] = ()
    eligible_kinds: tuple[InstitutionKind, ...] = ()
    eligible_countries: tuple[CountryCode, ...] = ()
    budget: Money | None = None
    opens_at: Timestamp
    deadline: Timestamp
    deadline_model: DeadlineModel
    full_proposal_deadline: Timestamp | None = None
    url: WebUrl | None = None

    @field_validator("full_proposal_deadline")
    @classmethod
    def _second_stage_only(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        if value is not None and info.data.get("deadline_model", "two_stage") != "two_stage":
            raise PydanticCustomError("two_stage_only", "A full_proposal_deadline is for a two_stage call only")
        return value

    @model_validator(mode="after")
    def _deadline_after_opening(self) -> Self:
        _check_window(self.opens_at, self.deadline, self.full_proposal_deadline)
        return self


class CallChanges(Changes):
    """The amendable fields of a call. Only the window given here is checked; whether a new
    deadline fits the call's stored `opens_at` is the calls workflow's business, as is the
    `budget`: not below what the call awarded, nor removed once it awarded anything, nor in
    another currency once it received an application or awarded."""

    title: NotClearable[LocalizedText] = None
    summary: LocalizedText | None = None
    themes: NotClearable[tuple[Theme, ...]] = None
    eligible_kinds: NotClearable[tuple[InstitutionKind, ...]] = None
    eligible_countries: NotClearable[tuple[CountryCode, ...]] = None
    budget: Money | None = None
    opens_at: NotClearable[Timestamp] = None
    deadline: NotClearable[Timestamp] = None
    full_proposal_deadline: Timestamp | None = None
    """A two-stage call's second deadline (null: no limit)."""
    url: WebUrl | None = None

    @model_validator(mode="after")
    def _deadline_after_opening(self) -> Self:
        _check_window(self.opens_at, self.deadline, self.full_proposal_deadline)
        return self


class CallAmended(EventData):
    """The call's owner changed some of its terms, and says why."""

    call_id: AggregateId
    changes: CallChanges
    reason: LocalizedText


class CallClosed(EventData):
    """No more applications: by the owner, or by the bus at the deadline (`deadline_passed`, once
    the deadline has come; before it, the owner closes as `cancelled` or `filled`). The bus closes
    the calls still open of an owner that leaves the network, in its name, as `cancelled`
    (version 5 of the rules)."""

    call_id: AggregateId
    reason: Literal["deadline_passed", "cancelled", "filled"]


class ApplicationSubmitted(EventData):
    """An institution (the source) applies to a call, possibly with partners and a project. The
    `partners` are other members, each named once (they see the application); the `project_id` is
    a registered project the applicant owns or is a partner of."""

    call_id: AggregateId
    application_id: AggregateId
    project_id: AggregateId | None = None
    partners: tuple[InstitutionId, ...] = ()
    requested_amount: Money | None = None


class ApplicationReceived(EventData):
    """The calls workflow accepted an application; emitted in the call owner's name."""

    call_id: AggregateId
    application_id: AggregateId
    applicant: InstitutionId


class ApplicationRefusal(Reason):
    """Why an application was refused."""

    code: Literal[
        "unknown_call",
        "before_opening",
        "after_deadline",
        "call_closed",
        "ineligible_kind",
        "ineligible_country",
        "duplicate_application",
        "currency_mismatch",
        "unknown_partner",
        "invalid_partner",
        "unknown_project",
        "not_project_party",
        "too_many_decimals",
        "over_budget",
        "own_call",
    ]


class ApplicationRejected(EventData):
    """The calls workflow refused an application; `causationid` names the submission, and what
    it asked for is repeated (`project_id`, `partners`, `requested_amount`, when it named them)."""

    call_id: AggregateId
    application_id: AggregateId
    applicant: InstitutionId
    reason: ApplicationRefusal
    project_id: AggregateId | None = None
    partners: tuple[InstitutionId, ...] = ()
    requested_amount: Money | None = None


class ApplicationDecided(EventData):
    """The call's publisher decides on a received application: it is `awarded` (with the amount
    granted, when the call gives money: a call with a budget does; a call without one awards in
    the currency of its first award) or `declined`; in a two-stage call it is first `invited`
    to send a full proposal, and awarded only once it has. The `comment` is for the applicant and
    its partners, who alone see the decision with the publisher. The bus declines, in its name,
    the applications still waiting for the decision of a publisher that leaves the network, the
    `comment` saying so (version 8 of the rules)."""

    model_config = ConfigDict(json_schema_extra=null_unless("decision", "awarded", "awarded_amount"))

    call_id: AggregateId
    application_id: AggregateId
    decision: Literal["awarded", "declined", "invited"]
    awarded_amount: Money | None = None
    comment: LocalizedText | None = None

    @field_validator("awarded_amount")
    @classmethod
    def _amount_only_when_awarded(cls, amount: Money | None, info: ValidationInfo) -> Money | None:
        if amount is not None and info.data.get("decision", "awarded") != "awarded":
            raise PydanticCustomError("awarded_only", "An amount is awarded only with the decision 'awarded'")
        return amount


class ApplicationWithdrawn(EventData):
    """The applicant takes back an application the call received, before its publisher decided
    on it. The bus withdraws, in its name, the applications still waiting for a decision of an
    applicant that leaves the network, its `reason` saying so (version 7 of the rules)."""

    call_id: AggregateId
    application_id: AggregateId
    reason: LocalizedText | None = None


class FullProposalSubmitted(EventData):
    """The applicant of an application invited to a two-stage call's second stage sends its full
    proposal: what it now asks for (`requested_amount`, in the budget's currency), a `summary`
    and where the proposal is (`url`)."""

    call_id: AggregateId
    application_id: AggregateId
    summary: LocalizedText | None = None
    requested_amount: Money | None = None
    url: WebUrl | None = None


class ApplicationLapsed(EventData):
    """An application invited to a two-stage call's second stage sent no full proposal by the
    call's `full_proposal_deadline`: the bus says so once that deadline has passed, in the
    publisher's name. Nothing more can be done with the application."""

    call_id: AggregateId
    application_id: AggregateId
    applicant: InstitutionId


class CallActionRefusal(Reason):
    """Why the calls workflow refused a publication, an amendment, a closing, or a decision on,
    withdrawal of or full proposal for an application."""

    code: Literal[
        "unknown_call",
        "already_published",
        "not_owner",
        "call_closed",
        "invalid_window",
        "deadline_in_past",
        "already_open",
        "unknown_application",
        "not_received",
        "not_applicant",
        "already_decided",
        "already_withdrawn",
        "currency_mismatch",
        "over_budget",
        "single_stage",
        "not_invited",
        "no_full_proposal",
        "already_submitted",
        "after_full_proposal_deadline",
        "lapsed",
        "already_awarded",
        "before_deadline",
        "no_amount",
        "too_many_decimals",
        "above_request",
    ]


class CallActionRejected(EventData):
    """The calls workflow refused an event about a call that passed the gate (a state rule);
    emitted in the call owner's name (for an unknown call: the refused event's source), with
    `causationid` naming the refused event, repeated here with its type and source."""

    call_id: AggregateId
    rejected_type: Annotated[str, Field(pattern=r"^call\.[a-z_]+$")]
    rejected_event_id: EventId
    actor: InstitutionId
    reason: CallActionRefusal
    application_id: AggregateId | None = None
    """The application a refused decision, withdrawal or full proposal was about."""
