"""The projects workflow's rules, without a database: who may say what about a project."""

from __future__ import annotations

from datetime import date

import pytest

from handlers.rules.projects import OWNER_ONLY, ProjectAction, ProjectSnapshot, action_refusal

pytestmark = pytest.mark.quick

OWNER = "tr-mersin-bb"
PROJECT = ProjectSnapshot(project_id="mersin-mahalle-mutfaklari", owner=OWNER)


def code(project: ProjectSnapshot | None, action: ProjectAction) -> str | None:
    refusal = action_refusal(project, action)
    return refusal.code if refusal else None


def test_a_project_id_is_registered_by_one_owner() -> None:
    assert code(None, ProjectAction("project.registered", "tr-tarsus-bld")) is None
    assert code(PROJECT, ProjectAction("project.registered", OWNER)) is None  # restating it
    assert code(PROJECT, ProjectAction("project.registered", "tr-tarsus-bld")) == "already_registered"


@pytest.mark.parametrize(
    "type_",
    sorted(OWNER_ONLY | {"project.partner_joined", "project.adopted"}),
)
def test_nothing_is_said_about_an_unknown_project(type_: str) -> None:
    assert code(None, ProjectAction(type_, OWNER, partner=OWNER, adopter=OWNER)) == "unknown_project"


@pytest.mark.parametrize("type_", sorted(OWNER_ONLY))
def test_owner_only_actions(type_: str) -> None:
    assert code(PROJECT, ProjectAction(type_, OWNER)) is None
    assert code(PROJECT, ProjectAction(type_, "tr-tarsus-bld")) == "not_owner"


def test_a_partner_joins_by_the_owner_or_by_itself() -> None:
    joins = ProjectAction("project.partner_joined", OWNER, partner="tr-mersin-uni")
    assert code(PROJECT, joins) is None
    assert code(PROJECT, ProjectAction("project.partner_joined", "tr-mersin-uni", partner="tr-mersin-uni")) is None
    assert code(PROJECT, ProjectAction("project.partner_joined", "tr-tarsus-bld", partner="tr-mersin-uni")) == (
        "not_owner_or_partner"
    )


def test_an_adoption_is_recorded_by_the_adopter_or_the_owner_once() -> None:
    by_adopter = ProjectAction("project.adopted", "tr-tarsus-bld", adopter="tr-tarsus-bld")
    assert code(PROJECT, by_adopter) is None
    assert code(PROJECT, ProjectAction("project.adopted", OWNER, adopter="tr-tarsus-bld")) is None
    assert code(PROJECT, ProjectAction("project.adopted", "tr-adana-bb", adopter="tr-tarsus-bld")) == (
        "not_owner_or_adopter"
    )
    assert code(PROJECT, ProjectAction("project.adopted", OWNER, adopter="tr-tarsus-bld", adoption_known=True)) == (
        "duplicate_adoption"
    )
    # Not its own owner (the spread counts others taking it up), nor an institution not in the network (a typo).
    assert code(PROJECT, ProjectAction("project.adopted", OWNER, adopter=OWNER)) == "own_project"
    assert code(PROJECT, ProjectAction("project.adopted", OWNER, adopter="tr-tarsus-bdl", adopter_member=False)) == (
        "unknown_adopter"
    )


def test_a_project_does_not_end_before_it_starts() -> None:
    start = date(2020, 4, 1)
    assert code(PROJECT, ProjectAction("project.updated", OWNER, started_on=start, ends_on=start)) is None
    assert code(PROJECT, ProjectAction("project.updated", OWNER, started_on=start, ends_on=None)) is None
    assert code(PROJECT, ProjectAction("project.completed", OWNER, started_on=start, ends_on=date(2019, 12, 31))) == (
        "invalid_dates"
    )


def test_an_adopter_takes_a_practice_up_once() -> None:
    again = ProjectAction("project.adopted", "tr-tarsus-bld", adopter="tr-tarsus-bld", adopted_as="adopt-1")
    refusal = action_refusal(PROJECT, again)
    assert refusal is not None and refusal.code == "already_adopted" and "adopt-1" in refusal.message


def test_an_impact_report_is_of_a_period_of_the_project_that_has_begun() -> None:
    def report(start: date, end: date) -> ProjectAction:
        return ProjectAction("project.impact_reported", OWNER, period=(start, end), project_started_on=date(2020, 4, 1),
                             reported_on=date(2026, 12, 6))

    assert code(PROJECT, report(date(2025, 1, 1), date(2025, 12, 31))) is None
    assert code(PROJECT, report(date(2020, 1, 1), date(2020, 4, 1))) is None  # (its first day)
    assert code(PROJECT, report(date(2026, 12, 1), date(2026, 12, 31))) is None  # (under way)
    assert code(PROJECT, report(date(2026, 12, 7), date(2026, 12, 31))) is None  # (a day ahead of UTC)
    assert code(PROJECT, report(date(2019, 1, 1), date(2019, 12, 31))) == "period_before_start"
    assert code(PROJECT, report(date(2062, 1, 1), date(2062, 12, 31))) == "period_ahead"
