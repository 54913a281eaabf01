"""Projects and good practices: given events → when an event → then state and emitted events."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col, select

from bus.gate import canonical_bytes, log_subject
from bus.streams import DLQ_STREAM
from handlers.institutions import Institution
from ops import dlq
from handlers.projects import (
    AdoptionSpread,
    Project,
    ProjectAdoption,
    ProjectImpactReport,
    ProjectPartner,
    adoptions_by_municipality_level,
)
from tests.handlers.harness import BusScenario, Scenario, envelope, rebuilt

OWNER = "tr-mersin-bb"
COOPERATIVE = "tr-genc-isi-koop"
UNIVERSITY = "tr-mersin-uni"
TARSUS = "tr-tarsus-bld"
OUTSIDER = "fi-soste"


def joined(institution: str, kind: str, country: str = "TR", level: str | None = None) -> dict[str, Any]:
    data = {"id": institution, "name": {"tr": institution}, "kind": kind, "country": country}
    if level is not None:
        data["municipality_level"] = level
    return envelope("institution.joined", "operator", data)


MEMBERS = [
    joined(OWNER, "municipality", level="metropolitan"),
    joined(COOPERATIVE, "cooperative"),
    joined(UNIVERSITY, "university"),
    joined(TARSUS, "municipality", level="district"),
    joined(OUTSIDER, "ngo", "FI"),
]


def registered(project_id: str, *, by: str = OWNER, owner: str = OWNER, **extra: Any) -> dict[str, Any]:
    data = {
        "project_id": project_id,
        "title": {"tr": "Mahalle Mutfakları", "en": "Neighbourhood Kitchens"},
        "summary": {"tr": "Mahallelerde sıcak yemek. 🍲"},
        "themes": ["health_care.basic_services", "migration_population.cohesion"],
        "owner": owner,
        "partners": [{"institution": COOPERATIVE, "role": "partner", "relation": "procurement"}],
        "status": "active",
        "started_on": "2020-04-01",
        "location": {"country": "TR", "region": "Mersin", "municipality": "Akdeniz"},
        "service_model": "neighbourhood_based",
        "sdgs": [1, 2, 10],
        **extra,
    }
    return envelope("project.registered", by, data)


def updated(project_id: str, changes: dict[str, Any], *, by: str = OWNER) -> dict[str, Any]:
    return envelope("project.updated", by, {"project_id": project_id, "changes": changes})


def partner_joined(project_id: str, partner: str, *, by: str = OWNER, role: str = "supporter") -> dict[str, Any]:
    data = {"project_id": project_id, "partner": {"institution": partner, "role": role, "relation": "coordination"}}
    return envelope("project.partner_joined", by, data)


def adopted(project_id: str, adopter: str, *, by: str | None = None, adoption_id: str | None = None) -> dict[str, Any]:
    data = {
        "adoption_id": adoption_id or f"adopt-{uuid.uuid4().hex[:12]}",
        "project_id": project_id,
        "adopter": adopter,
        "support": ["presentation", "technical_support", "study_visit"],
        "adapted_project_id": f"{project_id}-{adopter}",
    }
    return envelope("project.adopted", by or adopter, data)


def impact_reported(project_id: str, *, by: str = OWNER, start: str = "2025-01-01", end: str = "2025-12-31") -> dict[str, Any]:
    data = {
        "project_id": project_id,
        "period": {"start": start, "end": end},
        "indicators": [{"name": {"tr": "Dağıtılan sıcak yemek", "en": "Hot meals served"}, "value": "412500", "unit": "meals"}],
    }
    return envelope("project.impact_reported", by, data)


def completed(project_id: str, *, by: str = OWNER, ended_on: str | None = "2026-04-30") -> dict[str, Any]:
    data: dict[str, Any] = {"project_id": project_id, "outcome": {"en": "Taken over by the neighbourhoods."}}
    if ended_on is not None:
        data["ended_on"] = ended_on
    return envelope("project.completed", by, data)


def the_only(emitted: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    assert [e["type"] for e in emitted] == [type_], emitted
    return emitted[0]


def refused(emitted: list[dict[str, Any]], event: dict[str, Any], code: str, *, source: str = OWNER) -> None:
    """``event`` was answered by ``project.action_rejected`` with ``code``, in ``source``'s name."""
    rejection = the_only(emitted, "project.action_rejected")
    assert rejection["source"] == f"/institutions/{source}" and rejection["causationid"] == event["id"]
    assert rejection["data"]["rejected_type"] == event["type"] and rejection["data"]["rejected_event_id"] == event["id"]
    assert rejection["data"]["actor"] == event["source"].removeprefix("/institutions/")
    assert rejection["data"]["reason"]["code"] == code


def partners_of(session: Any, project_id: str) -> dict[str, tuple[str, str | None]]:
    rows = session.exec(select(ProjectPartner).where(col(ProjectPartner.project_id) == project_id))
    return {row.institution: (row.role, row.relation) for row in rows}


@pytest.fixture
def project_id() -> str:
    return f"proj-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def members(scenario: Scenario) -> None:
    await scenario.given(*MEMBERS)


pytestmark = pytest.mark.usefixtures("members")


# --- registration --------------------------------------------------------------------------------


async def test_a_registered_project_is_stored_with_its_partners_and_place(scenario: Scenario, project_id: str) -> None:
    assert await scenario.when(registered(project_id)) == []
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None
        assert project.owner == OWNER and project.title["tr"] == "Mahalle Mutfakları"
        assert project.summary == {"tr": "Mahallelerde sıcak yemek. 🍲"}
        assert project.themes == ["health_care.basic_services", "migration_population.cohesion"]
        assert (project.country, project.region, project.municipality) == ("TR", "Mersin", "Akdeniz")
        assert project.started_on == date(2020, 4, 1) and project.ends_on is None
        assert project.status == "active" and project.sdgs == [1, 2, 10] and project.external_refs == []
        assert project.registered_at == project.updated_at
        assert partners_of(session, project_id) == {COOPERATIVE: ("partner", "procurement")}


async def test_another_institution_cannot_register_the_same_project_id(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    again = registered(project_id, by=TARSUS, owner=TARSUS, partners=[])
    refused(await scenario.when(again), again, "already_registered")
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None and project.owner == OWNER
        assert partners_of(session, project_id) == {COOPERATIVE: ("partner", "procurement")}


async def test_the_owner_registering_again_restates_the_project(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    restated = registered(project_id, partners=[{"institution": UNIVERSITY, "role": "supporter"}], summary=None)
    assert await scenario.when(restated) == []
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None and project.summary is None
        assert partners_of(session, project_id) == {UNIVERSITY: ("supporter", None)}


# --- changes by the owner ------------------------------------------------------------------------


async def test_the_owner_updates_the_project(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    changes = {
        "summary": None,
        "sdgs": [1, 2, 5, 10],
        "location": {"country": "TR", "region": "Mersin"},
        "partners": [{"institution": UNIVERSITY, "role": "supporter", "relation": "coordination"}],
        "external_refs": [{"system": "innokyla", "id": "1234", "url": "https://innokyla.example.fi/1234"}],
    }
    assert await scenario.when(updated(project_id, changes)) == []
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None
        assert project.summary is None and project.sdgs == [1, 2, 5, 10]
        assert (project.country, project.region, project.municipality) == ("TR", "Mersin", None)
        assert project.external_refs == [{"system": "innokyla", "id": "1234", "url": "https://innokyla.example.fi/1234"}]
        assert project.title["en"] == "Neighbourhood Kitchens"  # untouched
        assert project.updated_at > project.registered_at
        assert partners_of(session, project_id) == {UNIVERSITY: ("supporter", "coordination")}


@pytest.mark.parametrize("make", [
    lambda p: updated(p, {"status": "suspended"}, by=COOPERATIVE),
    lambda p: impact_reported(p, by=COOPERATIVE),
    lambda p: completed(p, by=COOPERATIVE),
], ids=["updated", "impact_reported", "completed"])  # fmt: skip
async def test_only_the_owner_updates_reports_impact_and_completes(scenario: Scenario, project_id: str, make: Any) -> None:
    await scenario.given(registered(project_id))
    event = make(project_id)
    refused(await scenario.when(event), event, "not_owner")  # even a partner may not
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None and project.status == "active" and project.completed_at is None
        assert session.exec(select(ProjectImpactReport).where(col(ProjectImpactReport.project_id) == project_id)).all() == []


async def test_a_project_cannot_end_before_it_starts(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    event = updated(project_id, {"ends_on": "2019-12-31"})
    refused(await scenario.when(event), event, "invalid_dates")
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None and project.ends_on is None


async def test_the_owner_reports_impact(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    assert await scenario.when(impact_reported(project_id)) == []
    with scenario.session() as session:
        [report] = session.exec(select(ProjectImpactReport).where(col(ProjectImpactReport.project_id) == project_id)).all()
        assert (report.period_start, report.period_end) == (date(2025, 1, 1), date(2025, 12, 31))
        assert report.indicators == [
            {"name": {"tr": "Dağıtılan sıcak yemek", "en": "Hot meals served"}, "value": "412500", "unit": "meals"}
        ]


async def test_the_owner_completes_the_project(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    assert await scenario.when(completed(project_id)) == []
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None and project.status == "completed"
        assert project.outcome == {"en": "Taken over by the neighbourhoods."}
        assert project.ends_on == date(2026, 4, 30) and project.completed_at is not None


async def test_a_project_is_completed_since_its_status_says_so_however_it_came_to(scenario: Scenario, project_id: str) -> None:
    """``completed_at`` is set whenever the status becomes ``completed`` — by ``project.completed``,
    by an update (a portal entry archived) or by a registration — kept while it stays completed
    (a second completion restates the outcome) and cleared when the owner takes the project up again."""

    def completed_at() -> Any:
        with scenario.session() as session:
            project = session.get(Project, project_id)
            assert project is not None
            return project.status, project.completed_at

    await scenario.given(registered(project_id))
    assert completed_at() == ("active", None)
    assert await scenario.when(updated(project_id, {"status": "completed"})) == []
    status, first = completed_at()
    assert status == "completed" and first is not None
    assert await scenario.when(updated(project_id, {"status": "completed", "summary": {"en": "Done."}})) == []
    assert await scenario.when(completed(project_id)) == []
    assert completed_at() == ("completed", first)
    assert await scenario.when(updated(project_id, {"status": "active"})) == []
    assert completed_at() == ("active", None)
    assert await scenario.when(completed(project_id)) == []
    status, again = completed_at()
    assert status == "completed" and again is not None and again > first

    archived = f"{project_id}-archived"
    assert await scenario.when(registered(archived, status="completed")) == []
    with scenario.session() as session:
        project = session.get(Project, archived)
        assert project is not None and project.completed_at == project.registered_at


# --- partners and adoptions ----------------------------------------------------------------------


async def test_a_partner_joins_by_the_owner_or_by_itself_but_not_by_a_third(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    assert await scenario.when(partner_joined(project_id, UNIVERSITY)) == []
    assert await scenario.when(partner_joined(project_id, TARSUS, by=TARSUS, role="partner")) == []
    by_third = partner_joined(project_id, OUTSIDER, by=COOPERATIVE)
    refused(await scenario.when(by_third), by_third, "not_owner_or_partner")
    with scenario.session() as session:
        assert partners_of(session, project_id) == {
            COOPERATIVE: ("partner", "procurement"),
            UNIVERSITY: ("supporter", "coordination"),
            TARSUS: ("partner", "coordination"),
        }


async def test_an_adoption_is_recorded_by_the_adopter_or_the_owner(scenario: Scenario, project_id: str) -> None:
    await scenario.given(registered(project_id))
    by_adopter = adopted(project_id, TARSUS, adoption_id=f"{project_id}-tarsus")
    assert await scenario.when(by_adopter) == []
    assert await scenario.when(adopted(project_id, OUTSIDER, by=OWNER)) == []
    by_third = adopted(project_id, UNIVERSITY, by=COOPERATIVE)
    refused(await scenario.when(by_third), by_third, "not_owner_or_adopter")
    duplicate = adopted(project_id, UNIVERSITY, by=OWNER, adoption_id=f"{project_id}-tarsus")
    refused(await scenario.when(duplicate), duplicate, "duplicate_adoption")
    own = adopted(project_id, OWNER, by=OWNER)
    refused(await scenario.when(own), own, "own_project")
    misspelt = adopted(project_id, "tr-tarsus-bdl", by=OWNER)
    refused(await scenario.when(misspelt), misspelt, "unknown_adopter")
    [rejection] = await scenario.when(adopted(project_id, "tr-tarsus-bdl", by=OWNER))  # told the member meant
    assert rejection["data"]["reason"]["message"]["en"] == (
        "'tr-tarsus-bdl' is not a member of the network; did you mean 'tr-tarsus-bld'? (an adopter must be one: name it as "
        "the network does, GET /institutions).")
    gone = f"tr-gone-{uuid.uuid4().hex[:8]}"
    await scenario.given(joined(gone, "municipality", level="district"), envelope("institution.left", "operator", {"id": gone}))
    [rejection] = await scenario.when(adopted(project_id, gone, by=OWNER))  # told it left
    assert rejection["data"]["reason"]["message"]["en"].startswith(f"{gone} left the network on ")
    with scenario.session() as session:
        adoptions = session.exec(select(ProjectAdoption).where(col(ProjectAdoption.project_id) == project_id)).all()
        assert sorted(a.adopter for a in adoptions) == sorted([TARSUS, OUTSIDER])
        tarsus = session.get(ProjectAdoption, f"{project_id}-tarsus")
        assert tarsus is not None and tarsus.support == ["presentation", "technical_support", "study_visit"]
        assert tarsus.adapted_project_id == f"{project_id}-{TARSUS}"


@pytest.mark.parametrize("make", [
    lambda p: updated(p, {"status": "suspended"}, by=TARSUS),
    lambda p: partner_joined(p, TARSUS, by=TARSUS),
    lambda p: adopted(p, TARSUS),
    lambda p: impact_reported(p, by=TARSUS),
    lambda p: completed(p, by=TARSUS),
], ids=["updated", "partner_joined", "adopted", "impact_reported", "completed"])  # fmt: skip
async def test_events_about_an_unknown_project_are_refused_in_the_sources_name(
    scenario: Scenario, project_id: str, make: Any
) -> None:
    event = make(project_id)
    refused(await scenario.when(event), event, "unknown_project", source=TARSUS)
    with scenario.session() as session:
        assert session.get(Project, project_id) is None
        assert session.exec(select(ProjectAdoption).where(col(ProjectAdoption.project_id) == project_id)).all() == []


async def test_an_event_about_a_misspelt_project_is_told_the_project_meant(scenario: Scenario, project_id: str) -> None:
    """The refusal named no project ("There is no such project."): the owner is told its own project
    nearest to the id it sent, an adopter the practice nearest to it, whoever owns it."""
    await scenario.given(registered(project_id))
    misspelt = project_id[:-1]
    for event in (updated(misspelt, {"status": "suspended"}), adopted(misspelt, TARSUS)):
        [rejection] = await scenario.when(event)
        assert rejection["data"]["reason"] == {"code": "unknown_project", "message": {
            "en": f"{misspelt!r} is not a registered project; did you mean {project_id!r}?"}}
    # What only an owner says is matched among the sender's own projects (and those it is a partner of).
    stranger = f"tr-ilce-{uuid.uuid4().hex[:8]}"  # (owning nothing, partner in nothing)
    await scenario.given(joined(stranger, "municipality", level="district"))
    [rejection] = await scenario.when(impact_reported(misspelt, by=stranger))
    assert rejection["data"]["reason"]["message"]["en"] == f"{misspelt!r} is not a registered project"


async def test_adoptions_counted_by_municipality_level(scenario: Scenario) -> None:
    """Mersin spreads its practices: how many metropolitan, provincial and district municipalities
    took them up, in how many adoptions (the same municipality may adopt several practices)."""
    owner = f"tr-mersin-{uuid.uuid4().hex[:8]}"  # its own owner, so other tests' adoptions do not count
    municipalities = {
        "metropolitan": [f"tr-metro-{i}-{owner[-8:]}" for i in range(2)],
        "provincial": [f"tr-il-{owner[-8:]}"],
        "district": [f"tr-ilce-{i}-{owner[-8:]}" for i in range(3)],
    }
    await scenario.given(
        joined(owner, "municipality", level="metropolitan"),
        *(joined(m, "municipality", level=level) for level, ms in municipalities.items() for m in ms),
    )
    kitchens, climate = f"{owner}-kitchens", f"{owner}-climate"
    await scenario.given(registered(kitchens, by=owner, owner=owner), registered(climate, by=owner, owner=owner))
    metro, provincial, district = municipalities["metropolitan"], municipalities["provincial"], municipalities["district"]
    await scenario.given(
        *(adopted(kitchens, m) for m in metro + provincial + district),
        adopted(climate, metro[0]),
        adopted(climate, district[0]),
        adopted(climate, COOPERATIVE, by=owner),  # not a municipality: not counted
    )
    with scenario.session() as session:
        assert adoptions_by_municipality_level(session, owner=owner) == [
            AdoptionSpread("metropolitan", municipalities=2, adoptions=3),
            AdoptionSpread("provincial", municipalities=1, adoptions=1),
            AdoptionSpread("district", municipalities=3, adoptions=4),
        ]
        assert adoptions_by_municipality_level(session, owner=OUTSIDER) == [
            AdoptionSpread(level, 0, 0) for level in ("metropolitan", "provincial", "district")
        ]
        network_wide = {s.municipality_level: s for s in adoptions_by_municipality_level(session)}
        assert network_wide["district"].adoptions >= 4


async def test_a_member_that_stops_being_a_municipality_loses_its_level_and_is_not_counted(scenario: Scenario) -> None:
    owner = f"tr-mersin-{uuid.uuid4().hex[:8]}"
    metro, district = f"tr-metro-{owner[-8:]}", f"tr-ilce-{owner[-8:]}"
    await scenario.given(
        joined(owner, "municipality", level="metropolitan"),
        joined(metro, "municipality", level="metropolitan"),
        joined(district, "municipality", level="district"),
    )
    kitchens = f"{owner}-kitchens"
    await scenario.given(registered(kitchens, by=owner, owner=owner), adopted(kitchens, metro), adopted(kitchens, district))
    with scenario.session() as session:
        assert [s.adoptions for s in adoptions_by_municipality_level(session, owner=owner)] == [1, 0, 1]

    # The operator corrects a kind: a cooperative has no municipality level.
    await scenario.when(envelope("institution.updated", "operator", {"id": district, "kind": "cooperative"}))
    with scenario.session() as session:
        former = session.get(Institution, district)
        assert former is not None and (former.kind, former.municipality_level) == ("cooperative", None)
        assert [s.adoptions for s in adoptions_by_municipality_level(session, owner=owner)] == [1, 0, 0]

    # A level given to another kind before the bus refused that still does not count it.
    with scenario.session() as session:
        session.execute(sa.update(Institution).where(col(Institution.id) == metro).values(kind="university"))
        session.commit()
    with scenario.session() as session:
        assert [s.adoptions for s in adoptions_by_municipality_level(session, owner=owner)] == [0, 0, 0]


# --- rules of version 4 ----------------------------------------------------------------------------


async def test_an_adopter_takes_a_practice_up_once(scenario: Scenario, project_id: str) -> None:
    """A municipality's second adoption of the same practice, under another id, is refused naming the
    first: the spread counted it twice. Another practice it takes up, and another adopter, stand."""
    await scenario.given(registered(project_id), registered(f"{project_id}-2"), adopted(project_id, TARSUS, adoption_id=f"{project_id}-a"))
    again = adopted(project_id, TARSUS, by=OWNER)
    refused(await scenario.when(again), again, "already_adopted")
    [rejection] = await scenario.when(adopted(project_id, TARSUS))
    assert f"adoption {project_id}-a" in rejection["data"]["reason"]["message"]["en"]
    assert await scenario.when(adopted(f"{project_id}-2", TARSUS)) == []
    assert await scenario.when(adopted(project_id, UNIVERSITY)) == []
    with scenario.session() as session:
        adoptions = session.exec(select(ProjectAdoption).where(col(ProjectAdoption.project_id) == project_id)).all()
        assert sorted(a.adopter for a in adoptions) == sorted([TARSUS, UNIVERSITY])


async def test_an_impact_report_is_of_a_period_of_the_project_that_has_begun(scenario: Scenario, project_id: str) -> None:
    """A report of a period that ended before the project started, or that has not begun (a year
    mistyped, 2019 for 2025 or 2062 for 2026), is refused saying which dates are amiss; the
    project's impact stays as reported."""
    await scenario.given(registered(project_id))  # (started on 2020-04-01)
    before = impact_reported(project_id, start="2019-01-01", end="2019-12-31")
    refused(await scenario.when(before), before, "period_before_start")
    [rejection] = await scenario.when(impact_reported(project_id, start="2019-01-01", end="2019-12-31"))
    assert "ends on 2019-12-31, before the project started on 2020-04-01" in rejection["data"]["reason"]["message"]["en"]
    ahead = impact_reported(project_id, start="2062-01-01", end="2062-06-30")
    refused(await scenario.when(ahead), ahead, "period_ahead")
    assert await scenario.when(impact_reported(project_id)) == []
    with scenario.session() as session:
        reports = session.exec(select(ProjectImpactReport).where(col(ProjectImpactReport.project_id) == project_id)).all()
        assert [(r.period_start, r.period_end) for r in reports] == [(date(2025, 1, 1), date(2025, 12, 31))]


async def test_a_text_with_nul_the_log_holds_from_before_the_gate_refused_it_is_kept_as_u_fffd(
    scenario: BusScenario, project_id: str, tmp_path: Path, database_url: str, pg_server_url: str | None
) -> None:
    """PostgreSQL cannot store U+0000: a log that took such an event before the gate refused it
    (`string_nul`) had it dead-lettered there, for good. The read models take the character as
    U+FFFD, as live, in a rebuild and in a dead letter's replay, on every database."""
    await scenario.given(*MEMBERS)
    event = registered(project_id, title={"tr": "Mahalle\u0000Mutfakları"}, summary={"en": "hot\u0000meals"})
    bus = scenario.bus
    logged = await bus.js.publish(log_subject(event), canonical_bytes(event), headers={"Nats-Msg-Id": event["id"]})
    await scenario.settle(logged.seq)
    assert bus.consumer is not None and bus.consumer.dead_lettered == 0
    with scenario.session() as session:
        project = session.get(Project, project_id)
        assert project is not None and project.title == {"tr": "Mahalle\ufffdMutfakları"}
        assert project.summary == {"en": "hot\ufffdmeals"}

    async with rebuilt(bus, database_url, tmp_path / "rebuilt", pg_server_url) as engine:
        with Session(engine) as session:
            again = session.get(Project, project_id)
            assert again is not None and again.title == project.title and again.summary == project.summary

    # One that a PostgreSQL network dead-lettered then is applied so when the operator replays it.
    waiting = registered(f"{project_id}-2", title={"tr": "\u0000"})
    headers = {"Collabbus-Consumer": "network", "Collabbus-Original-Seq": str(logged.seq), "Collabbus-Original-Stream": "COLLAB_EVENTS",
               "Collabbus-Error": "DataError", "Nats-Msg-Id": "dead-letter-of-nul"}
    await bus.js.publish("collab.dlq.network", canonical_bytes(waiting), headers=headers, stream=DLQ_STREAM)
    replayed = await dlq.replay(bus.js, {"network": bus.service})
    assert [(r.event_id, r.applied, r.error) for r in replayed] == [(waiting["id"], True, None)]
    with scenario.session() as session:
        project = session.get(Project, f"{project_id}-2")
        assert project is not None and project.title == {"tr": "\ufffd"}
