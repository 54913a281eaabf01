"""Projects and good practices: the read model (partners, adoptions, impact), the workflow's glue,
and how far practices spread (adoptions by municipality level).

Other domains read ``projects.owner``, ``projects.themes`` and ``project_partners.institution``
(e.g. conflicts of interest in validations). Who may say what is :mod:`handlers.rules.projects`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import date, datetime, timezone
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy import JSON, Column
from sqlmodel import Field, Session, col, select

from handlers.institutions import Institution, UtcDateTime, column_values, member, member_ids, upsert
from handlers.network import Context, Decider, Event, Projection, Reads, Timer, named
from handlers.rows import TableRow
from handlers.rules import Refusal
from handlers.rules.projects import OWNER_ONLY, ProjectAction, ProjectSnapshot, action_refusal
from handlers.session import children
from handlers.words import SEARCHED, trigram_index, words
from schemas.common import unknown_name
from schemas.institutions import MunicipalityLevel
from schemas.projects import (
    ImpactReported,
    Partner,
    PartnerJoined,
    ProjectAdopted,
    ProjectCompleted,
    ProjectRegistered,
    ProjectUpdated,
)


class Project(TableRow, table=True):
    """A project or good practice, with its location flattened for filtering."""

    __tablename__ = "projects"
    __table_args__ = (trigram_index("projects"),)

    project_id: str = Field(primary_key=True, max_length=128)
    owner: str = Field(index=True, max_length=63)
    title: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    summary: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    themes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    status: str = Field(max_length=16)
    started_on: date | None = None
    ends_on: date | None = None
    country: str | None = Field(default=None, max_length=2)
    region: str | None = Field(default=None, max_length=300)
    municipality: str | None = Field(default=None, max_length=300)
    service_model: str | None = Field(default=None, max_length=32)
    external_refs: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """``[{system, id, url}]``, e.g. the Innokylä entry."""
    sdgs: list[int] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    registered_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    updated_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    completed_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    outcome: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    words: str = Field(default="", exclude=True, sa_column=Column(sa.Text, nullable=False, server_default=""))
    """The title and summary as a search (``?q=``) reads them (:mod:`handlers.words`); no resource shows them."""

    def snapshot(self) -> ProjectSnapshot:
        """What the workflow rules see of this project."""
        return ProjectSnapshot(project_id=self.project_id, owner=self.owner)


class ProjectPartner(TableRow, table=True):
    """An institution taking part in a project (the owner is not listed unless named)."""

    __tablename__ = "project_partners"

    project_id: str = Field(primary_key=True, max_length=128)
    institution: str = Field(primary_key=True, index=True, max_length=63)
    role: str = Field(max_length=16)
    relation: str | None = Field(default=None, max_length=16)


class ProjectAdoption(TableRow, table=True):
    """Another institution took up the practice ``project_id``, with the owner's support."""

    __tablename__ = "project_adoptions"

    adoption_id: str = Field(primary_key=True, max_length=128)
    project_id: str = Field(index=True, max_length=128)
    adopter: str = Field(index=True, max_length=63)
    support: list[str] = Field(sa_column=Column(JSON, nullable=False))
    adapted_project_id: str | None = Field(default=None, max_length=128)
    adopted_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


class ProjectImpactReport(TableRow, table=True):
    """Measured results of a project over a period."""

    __tablename__ = "project_impact_reports"

    id: int | None = Field(default=None, primary_key=True)
    project_id: str = Field(index=True, max_length=128)
    period_start: date
    period_end: date
    indicators: list[dict[str, Any]] = Field(sa_column=Column(JSON, nullable=False))
    """``[{name, value, unit}]``"""
    reported_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


# --- queries -----------------------------------------------------------------------------------


def parties(session: Session, project_id: str) -> tuple[str, frozenset[str]] | None:
    """A registered project's owner and partners, as the workflows that read them judge by them
    (conflicts of interest, whose project an application or a registration brings); None when no
    project is registered under ``project_id``. Read without flushing the batch."""
    with session.no_autoflush:
        project = session.get(Project, project_id)
        if project is None:
            return None
        return project.owner, frozenset(p.institution for p in children(session, ProjectPartner, "project_id", project_id))


def project_ids_of(session: Session, institution: str) -> Iterable[str]:
    """The ids of the projects ``institution`` owns or is a partner of, in id order: what a "did
    you mean" of a project a member names as its own is chosen among."""
    partnered = select(ProjectPartner.project_id).where(ProjectPartner.institution == institution)
    return session.exec(select(Project.project_id).where(
        sa.or_(col(Project.owner) == institution, col(Project.project_id).in_(partnered))).order_by(Project.project_id))


MUNICIPALITY_LEVELS: tuple[MunicipalityLevel, ...] = ("metropolitan", "provincial", "district")


@dataclass(frozen=True)
class AdoptionSpread:
    """How many municipalities of one level took practices up, in how many adoptions."""

    municipality_level: MunicipalityLevel
    municipalities: int
    adoptions: int


def adoptions_by_municipality_level(session: Session, *, owner: str | None = None) -> list[AdoptionSpread]:
    """Mersin-style spread: distinct adopting municipalities and adoptions per level of the
    adopter, every level listed (zero included); ``owner``: only the practices of that owner.
    Adopters without a municipality level (not municipalities) are not counted."""
    level = col(Institution.municipality_level)
    query = (
        select(level, sa.func.count(sa.distinct(col(ProjectAdoption.adopter))), sa.func.count())
        .select_from(ProjectAdoption)
        .join(Institution, col(Institution.id) == col(ProjectAdoption.adopter))
        .where(level.is_not(None), col(Institution.kind) == "municipality")  # (a level given to another kind by an older bus)
        .group_by(level)
    )
    counts = {row[0]: (row[1], row[2]) for row in session.exec(_of_owner(query, owner))}
    return [AdoptionSpread(lvl, *counts.get(lvl, (0, 0))) for lvl in MUNICIPALITY_LEVELS]


@dataclass(frozen=True)
class UncountedAdoptions:
    """The adoptions by municipalities that have no municipality level, which no level counts:
    who they are, so that the operator can give them theirs (``institution.updated``)."""

    municipalities: list[str]
    adoptions: int


def adoptions_without_level(session: Session, *, owner: str | None = None) -> UncountedAdoptions:
    """The adoptions :func:`adoptions_by_municipality_level` leaves out for want of a level (of
    ``owner``'s practices only, when given)."""
    query = (
        select(ProjectAdoption.adopter)
        .join(Institution, col(Institution.id) == col(ProjectAdoption.adopter))
        .where(col(Institution.municipality_level).is_(None), col(Institution.kind) == "municipality")
    )
    adopters = list(session.exec(_of_owner(query, owner)))
    return UncountedAdoptions(municipalities=sorted(set(adopters)), adoptions=len(adopters))


def _of_owner(query: Any, owner: str | None) -> Any:
    """``query`` of adoptions narrowed to those of ``owner``'s practices (None: every one)."""
    if owner is None:
        return query
    return query.join(Project, col(Project.project_id) == col(ProjectAdoption.project_id)).where(col(Project.owner) == owner)


# --- workflow ----------------------------------------------------------------------------------


def _adopted_as(session: Session, project_id: str, adopter: str) -> str | None:
    """The id of an adoption of ``project_id`` by ``adopter`` recorded before, if there is one."""
    with session.no_autoflush:
        earlier = sorted(a.adoption_id for a in children(session, ProjectAdoption, "project_id", project_id) if a.adopter == adopter)
    return earlier[0] if earlier else None


def _action(session: Session, event: Event[Any], project: Project | None) -> ProjectAction:
    """The event as the rules see it, with the dates the project would have afterwards."""
    data = event.data
    action = ProjectAction(type=event.type, actor=event.source)
    if isinstance(data, PartnerJoined):
        return replace(action, partner=data.partner.institution)
    if isinstance(data, ProjectAdopted):
        known = session.get(ProjectAdoption, data.adoption_id) is not None
        return replace(action, adopter=data.adopter, adoption_known=known, adopter_member=member(session, data.adopter) is not None,
                       adopted_as=_adopted_as(session, data.project_id, data.adopter))
    if project is not None and isinstance(data, ProjectUpdated):
        changed = data.changes.model_fields_set
        return replace(
            action,
            started_on=data.changes.started_on if "started_on" in changed else project.started_on,
            ends_on=data.changes.ends_on if "ends_on" in changed else project.ends_on,
        )
    if project is not None and isinstance(data, ImpactReported):
        return replace(action, period=(data.period.start, data.period.end), project_started_on=project.started_on,
                       reported_on=event.logged_at.astimezone(timezone.utc).date())
    if project is not None and isinstance(data, ProjectCompleted):
        return replace(action, started_on=project.started_on, ends_on=data.ended_on or project.ends_on)
    return action


def _meant(session: Session, refusal: Refusal | None, event: Event[Any]) -> Refusal | None:
    """``refusal`` of a name that names nothing (a project, an adopter), saying which and the
    nearest one that does, which is most often what was meant (a typo in an id): among the
    projects (the source's own or partnered, for what only an owner says), among the members; an
    adopter that left is told so."""
    if refusal is None:
        return None
    data = event.data
    if refusal.code == "unknown_project":
        known = (project_ids_of(session, event.source) if event.type in OWNER_ONLY  # (an owner's own; another member's
                 else session.exec(select(Project.project_id).order_by(Project.project_id)))  # practice is adopted or joined)
        return Refusal(refusal.code, unknown_name(data.project_id, "a registered project", known))
    if refusal.code == "unknown_adopter":
        former = session.get(Institution, data.adopter)
        if former is not None and former.left_at is not None:
            return Refusal(refusal.code, f"{data.adopter} left the network on {former.left_at:%Y-%m-%d}: an adopter must be a member.")
        return Refusal(refusal.code, unknown_name(data.adopter, "a member of the network", member_ids(session),
                                                  " (an adopter must be one: name it as the network does, GET /institutions)."))
    return refusal


def decide(ctx: Context) -> None:
    """Refuse an event about a project from someone who may not say it (see the rules), in the
    owner's name (unknown project: in the source's name)."""
    event = ctx.event
    assert event is not None
    project = ctx.session.get(Project, event.data.project_id)
    refusal = _meant(ctx.session, action_refusal(project.snapshot() if project else None, _action(ctx.session, event, project)),
                     event)
    if refusal is None:
        return
    ctx.refuse_action(refusal, source=project.owner if project is not None else event.source)


# --- projections -------------------------------------------------------------------------------


def _join(session: Session, project_id: str, partner: Partner) -> None:
    values = {"project_id": project_id, **column_values(partner, {"institution", "role", "relation"})}
    upsert(session, ProjectPartner, (project_id, partner.institution), values)


def _set_partners(session: Session, project_id: str, partners: tuple[Partner, ...]) -> None:
    """The partner list is replaced whole (an institution named twice: the last mention wins)."""
    wanted = {partner.institution: partner for partner in partners}
    for row in children(session, ProjectPartner, "project_id", project_id):
        if row.institution not in wanted:
            session.delete(row)
    for partner in wanted.values():
        _join(session, project_id, partner)


def _columns(facts: BaseModel, fields: set[str]) -> dict[str, Any]:
    """``fields`` of a registration or a change set as the project's columns (partners aside)."""
    values = column_values(facts, fields - {"location", "partners"})
    if "location" in fields:
        location = getattr(facts, "location")
        values["country"] = location.country if location else None
        values["region"] = location.region if location else None
        values["municipality"] = location.municipality if location else None
    return values


def _completed_at(project: Project | None, status: str, at: datetime) -> datetime | None:
    """When the project became ``completed`` as its status is set to ``status`` at ``at``: kept
    while it stays completed, ``at`` when it becomes so (an update or a registration saying so,
    an archived portal entry, say, as well as ``project.completed``), none while it is not."""
    if status != "completed":
        return None
    if project is not None and project.status == "completed" and project.completed_at is not None:
        return project.completed_at
    return at


def registered(session: Session, event: Event[ProjectRegistered]) -> None:
    """A new project, or its owner restating every fact of it (e.g. a re-sync)."""
    data = event.data
    values = {**_columns(data, set(ProjectRegistered.model_fields)), "updated_at": event.logged_at}
    known = session.get(Project, data.project_id)
    if known is None:
        values["registered_at"] = event.logged_at
    values["completed_at"] = _completed_at(known, data.status, event.logged_at)
    values["words"] = words(data.title, data.summary)
    upsert(session, Project, data.project_id, values)
    _set_partners(session, data.project_id, data.partners)


def _project(session: Session, project_id: str, event: Event[Any]) -> Project:
    project = session.get(Project, project_id)
    assert project is not None  # the decider refused events about unknown projects
    project.updated_at = event.logged_at
    session.add(project)
    return project


def updated(session: Session, event: Event[ProjectUpdated]) -> None:
    """Only the fields present change; a present null clears; lists are replaced whole."""
    project = _project(session, event.data.project_id, event)
    changes = event.data.changes
    if changes.status is not None:
        project.completed_at = _completed_at(project, changes.status, event.logged_at)
    project.sqlmodel_update(_columns(changes, set(changes.model_fields_set)))
    if changes.model_fields_set & set(SEARCHED):
        project.words = words(project.title, project.summary)
    if changes.partners is not None:
        _set_partners(session, project.project_id, changes.partners)


def partner_joined(session: Session, event: Event[PartnerJoined]) -> None:
    """One more partner (a partner already listed gets the new role and relation)."""
    _project(session, event.data.project_id, event)
    _join(session, event.data.project_id, event.data.partner)


def adopted(session: Session, event: Event[ProjectAdopted]) -> None:
    data = event.data
    session.add(
        ProjectAdoption(
            **column_values(data, {"adoption_id", "project_id", "adopter", "support", "adapted_project_id"}),
            adopted_at=event.logged_at,
        )
    )


def impact_reported(session: Session, event: Event[ImpactReported]) -> None:
    data = event.data
    session.add(
        ProjectImpactReport(
            project_id=data.project_id,
            period_start=data.period.start,
            period_end=data.period.end,
            indicators=column_values(data, {"indicators"})["indicators"],
            reported_at=event.logged_at,
        )
    )


def completed(session: Session, event: Event[ProjectCompleted]) -> None:
    project = _project(session, event.data.project_id, event)
    project.completed_at = _completed_at(project, "completed", event.logged_at)  # (a second one: the outcome restated)
    project.status = "completed"
    project.outcome = dict(event.data.outcome)
    if event.data.ended_on is not None:
        project.ends_on = event.data.ended_on


PROJECTIONS: dict[str, Projection] = {
    "project.registered": registered,
    "project.updated": updated,
    "project.partner_joined": partner_joined,
    "project.adopted": adopted,
    "project.impact_reported": impact_reported,
    "project.completed": completed,
}
DECIDERS: dict[str, Decider] = {event_type: decide for event_type in PROJECTIONS}
TIMERS: tuple[Timer, ...] = ()
READS: dict[str, Reads] = {"project.adopted": named("institution", "adopter")}
"""An adoption is judged on its adopter's membership."""

THEMES_DECIDED_BY: tuple[str, ...] = ("project.registered", "project.updated", "project.completed")
"""What a project's row, owner and themes come from: the events that set them (a registration,
an update) and every event that changes what decides whether those stand (the owner, set at the
registration; the dates, which a completion can move). Applied alone, with their deciders, they
give every project's ``owner``, ``themes`` and dates as all of the domain's events do (adoptions,
partners and impact reports change none of them): what another domain may read of projects
without applying the rest (a rebuild's lane, ``handlers.routes.REBUILD_LANES``)."""

PARTIES_DECIDED_BY: tuple[str, ...] = (*THEMES_DECIDED_BY, "project.partner_joined")
"""What a project's owner and partners come from, as :data:`THEMES_DECIDED_BY` for its themes:
those events, and a partner joining (judged on the owner alone). Applied alone, they give every
project's ``owner`` and ``project_partners`` as all of the domain's events do."""
