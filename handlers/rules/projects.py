"""The projects workflow: who may say what about a project (CONTRACT.md §5, "emitted by")."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, timedelta

from handlers.rules import Refusal, since

OWNER_ONLY = frozenset({"project.updated", "project.impact_reported", "project.completed"})


@dataclass(frozen=True)
class ProjectSnapshot:
    """What the rules need to know about a project."""

    project_id: str
    owner: str


@dataclass(frozen=True)
class ProjectAction:
    """An event about a project, reduced to what the rules look at."""

    type: str
    actor: str
    """The event's source."""
    partner: str | None = None
    """``project.partner_joined``: the institution joining."""
    adopter: str | None = None
    """``project.adopted``: the institution taking the practice up."""
    adoption_known: bool = False
    """``project.adopted``: the adoption id was used before."""
    adopter_member: bool = True
    """``project.adopted``: the adopter is a member of the network."""
    started_on: date | None = None
    ends_on: date | None = None
    """The project's dates as they would be after the event."""
    adopted_as: str | None = None
    """``project.adopted``: the adoption id under which its adopter took the practice up before."""
    period: tuple[date, date] | None = None
    """``project.impact_reported``: the first and last day of the period reported on."""
    project_started_on: date | None = None
    """``project.impact_reported``: when the project started, as registered."""
    reported_on: date | None = None
    """``project.impact_reported``: the day the report was logged (UTC)."""


def action_refusal(project: ProjectSnapshot | None, action: ProjectAction) -> Refusal | None:
    """Why ``action`` is refused given the project it is about (None: not registered), or None."""
    if action.type == "project.registered":
        if project is not None and action.actor != project.owner:
            return Refusal("already_registered", f"Project {project.project_id} is already registered by {project.owner}.")
        return None
    if project is None:
        return Refusal("unknown_project", "There is no such project.")
    if action.type in OWNER_ONLY and action.actor != project.owner:
        return Refusal("not_owner", f"Only {project.owner}, the project's owner, may do this.")
    if action.type == "project.partner_joined" and action.actor not in (project.owner, action.partner):
        return Refusal("not_owner_or_partner", f"Only {project.owner} or the joining partner may add a partner.")
    if action.type == "project.adopted":
        if action.actor not in (project.owner, action.adopter):
            return Refusal("not_owner_or_adopter", f"Only {project.owner} or the adopter may record an adoption.")
        if action.adoption_known:
            return Refusal("duplicate_adoption", "An adoption with this id was already recorded.")
        if action.adopter == project.owner and since(1):  # (the spread of a practice counts the others taking it up)
            return Refusal("own_project", f"{project.owner} owns the project: an adoption is another member taking it up.")
        if not action.adopter_member and since(1):  # a typo would otherwise count an adoption nobody made
            return Refusal("unknown_adopter", f"{action.adopter} is not a member of the network.")
        if action.adopted_as is not None and since(4):  # (the spread would count one municipality's uptake twice)
            return Refusal("already_adopted", f"{action.adopter} took this practice up already (adoption "
                                              f"{action.adopted_as}): the adoption stands as recorded.")
    period = _period_refusal(action)
    if period is not None:
        return period
    if action.started_on is not None and action.ends_on is not None and action.ends_on < action.started_on:
        return Refusal("invalid_dates", "The project would end before it starts.")
    return None


def _period_refusal(action: ProjectAction) -> Refusal | None:
    """An impact report of a period that ended before the project started, or that has not begun
    when it is reported (a day's leeway: the owner's day may be ahead of UTC's): measured results
    of neither can be, and such a report is most often a year mistyped."""
    if action.period is None or not since(4):
        return None
    start, end = action.period
    if action.project_started_on is not None and end < action.project_started_on:
        return Refusal("period_before_start", f"The period reported on ends on {end}, before the project started on "
                                              f"{action.project_started_on}: report on a period of the project.")
    if action.reported_on is not None and start > action.reported_on + timedelta(days=1):
        return Refusal("period_ahead", f"The period reported on starts on {start}, after today ({action.reported_on}): "
                                       "report the results of a period once it has begun.")
    return None
