"""Projects and good practices: registration, partners, adoption by others, impact, completion."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal, Self

from pydantic import Field, Strict, model_validator

from schemas.common import (
    AggregateId,
    Changes,
    CountryCode,
    Day,
    DecimalString,
    EventData,
    EventId,
    ExternalRef,
    InstitutionId,
    Label,
    LocalizedText,
    NotClearable,
    Reason,
    Theme,
    ValueObject,
    Whole,
)

__all__ = [
    "ImpactReported",
    "Indicator",
    "Location",
    "Partner",
    "PartnerJoined",
    "Period",
    "ProjectActionRefusal",
    "ProjectActionRejected",
    "ProjectAdopted",
    "ProjectChanges",
    "ProjectCompleted",
    "ProjectRegistered",
    "ProjectUpdated",
]

ProjectStatus = Literal["planned", "active", "completed", "cancelled", "suspended"]
ServiceModel = Literal["home_based", "neighbourhood_based", "other"]
Support = Literal[
    "presentation", "technical_support", "planning_support", "study_visit", "training"
]
Sdg = Annotated[int, Strict(), Field(ge=1, le=17), Whole]


class Partner(ValueObject):
    """An institution taking part in a project. `relation` is the legal basis of working with the
    owner (Genç İşi's municipality–cooperative relations), when one is stated."""

    institution: InstitutionId
    role: Literal["lead", "partner", "funder", "supporter"]
    relation: Literal["procurement", "donation", "coordination", "partnership"] | None = None


class Location(ValueObject):
    """Where a project runs; the region and municipality are names as the owner writes them."""

    country: CountryCode
    region: Label | None = None
    municipality: Label | None = None


def _check_dates(started_on: date | None, ends_on: date | None) -> None:
    if started_on is not None and ends_on is not None and ends_on < started_on:
        raise ValueError("ends_on must not be before started_on")


class ProjectRegistered(EventData):
    """A project or good practice enters the network. `owner` is who may later update it; it is
    usually the source, but an operator or connector may register in a member's name."""

    project_id: AggregateId
    title: LocalizedText
    summary: LocalizedText | None = None
    themes: tuple[Theme, ...] = ()
    owner: InstitutionId
    partners: tuple[Partner, ...] = ()
    status: ProjectStatus
    started_on: Day | None = None
    ends_on: Day | None = None
    location: Location | None = None
    service_model: ServiceModel | None = None
    external_refs: tuple[ExternalRef, ...] = ()
    sdgs: tuple[Sdg, ...] = ()

    @model_validator(mode="after")
    def _dates_in_order(self) -> Self:
        _check_dates(self.started_on, self.ends_on)
        return self


class ProjectChanges(Changes):
    """The updatable fields of a project (the owner is not one of them); lists are replaced
    whole. Dates given together are checked here; against stored ones by the projection."""

    title: NotClearable[LocalizedText] = None
    summary: LocalizedText | None = None
    themes: NotClearable[tuple[Theme, ...]] = None
    partners: NotClearable[tuple[Partner, ...]] = None
    status: NotClearable[ProjectStatus] = None
    started_on: Day | None = None
    ends_on: Day | None = None
    location: Location | None = None
    service_model: ServiceModel | None = None
    external_refs: NotClearable[tuple[ExternalRef, ...]] = None
    sdgs: NotClearable[tuple[Sdg, ...]] = None

    @model_validator(mode="after")
    def _dates_in_order(self) -> Self:
        _check_dates(self.started_on, self.ends_on)
        return self


class ProjectUpdated(EventData):
    """The owner (or the portal connector in its name) changed some facts about a project."""

    project_id: AggregateId
    changes: ProjectChanges


class PartnerJoined(EventData):
    """One more institution takes part in a project."""

    project_id: AggregateId
    partner: Partner


class ProjectAdopted(EventData):
    """Another institution takes up a good practice, with the support its owner gives (Mersin's
    presentations, technical support and study visits). The subject is the practice's project."""

    adoption_id: AggregateId
    project_id: AggregateId
    adopter: InstitutionId
    support: Annotated[tuple[Support, ...], Field(min_length=1)]
    adapted_project_id: AggregateId | None = None


class Period(ValueObject):
    """The dates an impact report covers, both included."""

    start: Day
    end: Day

    @model_validator(mode="after")
    def _in_order(self) -> Self:
        if self.end < self.start:
            raise ValueError("period end must not be before its start")
        return self


class Indicator(ValueObject):
    """One measured result. The value is decimal text (like money) so it is never rounded."""

    name: LocalizedText
    value: DecimalString
    unit: Label


class ImpactReported(EventData):
    """Measured results of a project over a period: the network judges practices by them."""

    project_id: AggregateId
    period: Period
    indicators: Annotated[tuple[Indicator, ...], Field(min_length=1)]


class ProjectCompleted(EventData):
    """A project ended; `outcome` says what came of it."""

    project_id: AggregateId
    outcome: LocalizedText
    ended_on: Day | None = None


class ProjectActionRefusal(Reason):
    """Why the projects workflow refused an event about a project. `already_adopted`: the adopter
    took the practice up before, under another adoption id (the message names it);
    `period_before_start`, `period_ahead`: an impact report's period ended before the project
    started, or starts after the day it is reported (all version 4 of the rules)."""

    code: Literal[
        "unknown_project",
        "already_registered",
        "not_owner",
        "not_owner_or_partner",
        "not_owner_or_adopter",
        "duplicate_adoption",
        "own_project",
        "unknown_adopter",
        "invalid_dates",
        "already_adopted",
        "period_before_start",
        "period_ahead",
    ]


class ProjectActionRejected(EventData):
    """The projects workflow refused an event about a project that passed the gate (a state
    rule); emitted in the project owner's name (for an unknown project: the refused event's
    source), with `causationid` naming the refused event, repeated here with its type and source."""

    project_id: AggregateId
    rejected_type: Annotated[str, Field(pattern=r"^project\.[a-z_]+$")]
    rejected_event_id: EventId
    actor: InstitutionId
    reason: ProjectActionRefusal
