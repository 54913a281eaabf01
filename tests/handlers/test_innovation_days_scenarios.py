"""Innovation days (CONTRACT.md §5): given events → when an event → then state and emitted events.

Every body runs on SQLite and on PostgreSQL. Times are relative to the real clock, since the log's
acceptance time is what the deadline rules use.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine
from sqlmodel import Session

from handlers import innovation_days
from handlers.db import session_scope
from handlers.innovation_days import InnovationDay, ProposedMeetingRow, Registration, day_view, meetings, registrations
from handlers.network import Event
from handlers.routes import network
from tests.handlers.harness import Scenario, applied_by_rules, envelope

ORGANIZER = "fi-thl"
MERSIN = "tr-mersin-bb"
GENC_ISI = "tr-genc-isi-koop"
AMMAN = "jo-amman-sic"
ESF = "eu-esf-fund"
SITRA = "fi-sitra"
OUTSIDER = "tr-ankara-univ"


def the_only(emitted: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    assert [e["type"] for e in emitted] == [type_], emitted
    return emitted[0]


MEMBERS = {
    ORGANIZER: ("competence_centre", "FI"),
    MERSIN: ("municipality", "TR"),
    GENC_ISI: ("cooperative", "TR"),
    AMMAN: ("ngo", "JO"),
    ESF: ("funder", "BE"),
    SITRA: ("funder", "FI"),
    OUTSIDER: ("university", "TR"),
}


@pytest.fixture
async def members(scenario: Scenario) -> None:
    """The organiser and the participants are members of the network."""
    await scenario.given(*(
        envelope("institution.joined", "operator", {"id": member, "name": {"en": member}, "kind": kind, "country": country})
        for member, (kind, country) in MEMBERS.items()
    ))


def _iso(moment: datetime) -> str:
    return moment.isoformat()


@dataclass(frozen=True)
class Day:
    """Events about one gathering, as its organiser and participants would offer them."""

    day_id: str
    starts_at: datetime
    deadline: datetime

    @classmethod
    def fresh(cls, *, deadline_in: timedelta = timedelta(days=14)) -> "Day":
        now = datetime.now(timezone.utc)
        return cls(f"day-{uuid.uuid4().hex[:12]}", now + timedelta(days=30), now + deadline_in)

    def scheduled(self, capacity: int = 10, *, themes: tuple[str, ...] = ("health_care",), by: str = ORGANIZER) -> dict[str, Any]:
        data = {
            "day_id": self.day_id,
            "title": {"fi": "Sosiaalisten innovaatioiden päivä", "en": "Social Innovation Day"},
            "format": "innovation_day",
            "starts_at": _iso(self.starts_at),
            "ends_at": _iso(self.starts_at + timedelta(hours=2)),
            "attendance_mode": "mixed",
            "venue": {"name": {"fi": "Tieteiden talo"}, "municipality": "Helsinki", "country": "FI"},
            "online_url": "https://events.example.fi/si-day",
            "capacity": capacity,
            "registration_deadline": _iso(self.deadline),
            "themes": list(themes),
            "languages": ["fi", "sv", "en"],
        }
        return envelope("innovation_day.scheduled", by, data)

    def registration(
        self,
        participant: str,
        attendees: int = 1,
        *,
        role: str = "observer",
        registration_id: str | None = None,
        interests: tuple[str, ...] = (),
        project_id: str | None = None,
    ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "day_id": self.day_id,
            "registration_id": registration_id or f"reg-{uuid.uuid4().hex[:12]}",
            "participant": participant,
            "role": role,
            "attendees": attendees,
            "interests": list(interests),
        }
        if project_id:
            data["project_id"] = project_id
        return envelope("innovation_day.registration_requested", participant, data)

    def change(self, registration: dict[str, Any], attendees: int, *, by: str | None = None) -> dict[str, Any]:
        data = {"day_id": self.day_id, "registration_id": registration["data"]["registration_id"], "attendees": attendees}
        return envelope("innovation_day.registration_changed", by or registration["data"]["participant"], data)

    def cancellation(self, registration: dict[str, Any], *, by: str | None = None) -> dict[str, Any]:
        data = {"day_id": self.day_id, "registration_id": registration["data"]["registration_id"]}
        return envelope("innovation_day.registration_cancelled", by or registration["data"]["participant"], data)

    def rescheduled(self, *, deadline: datetime | None = None, capacity: int | None = None, by: str = ORGANIZER) -> dict[str, Any]:
        data: dict[str, Any] = {
            "day_id": self.day_id,
            "starts_at": _iso(self.starts_at + timedelta(days=1)),
            "ends_at": _iso(self.starts_at + timedelta(days=1, hours=2)),
        }
        if deadline is not None:
            data["registration_deadline"] = _iso(deadline)
        if capacity is not None:
            data["capacity"] = capacity
        return envelope("innovation_day.rescheduled", by, data)

    def begun(self, *, by: str = ORGANIZER) -> dict[str, Any]:
        """The organiser moves the day to have begun a minute ago (registration closes with it):
        a day is reported held once it has started."""
        started = datetime.now(timezone.utc) - timedelta(minutes=1)
        return envelope("innovation_day.rescheduled", by, {
            "day_id": self.day_id, "starts_at": _iso(started), "ends_at": _iso(started + timedelta(hours=2))})

    def cancelled(self, *, by: str = ORGANIZER) -> dict[str, Any]:
        return envelope("innovation_day.cancelled", by, {"day_id": self.day_id, "reason": {"en": "storm warning"}})

    def held(self, *, by: str = ORGANIZER) -> dict[str, Any]:
        return envelope("innovation_day.held", by, {"day_id": self.day_id, "attendees": 7})


def only(events: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(events) == 1, events
    return events[0]


def rid(event: dict[str, Any]) -> str:
    return str(event["data"]["registration_id"])


def view(scenario: Scenario, day_id: str) -> dict[str, Any]:
    with scenario.session() as session:
        found = day_view(session, day_id)
    assert found is not None
    return found


def registrations_of(scenario: Scenario, day_id: str) -> dict[str, str]:
    """The day's registrations and their status."""
    with scenario.session() as session:
        return {r["registration_id"]: r["status"] for r in registrations(session, day_id)}


def waitlist(scenario: Scenario, day_id: str) -> list[tuple[str, int]]:
    return [(w["registration_id"], w["position"]) for w in view(scenario, day_id)["waitlisted"]]


def assert_rejected(derived: list[dict[str, Any]], code: str, *, source: str = ORGANIZER) -> dict[str, Any]:
    rejected = only(derived)
    assert rejected["type"] == "innovation_day.registration_rejected"
    assert rejected["data"]["reason"]["code"] == code
    assert rejected["source"] == f"/institutions/{source}"
    return rejected


def assert_cancellation_refused(derived: list[dict[str, Any]], cancellation: dict[str, Any], code: str) -> dict[str, Any]:
    """The cancellation (or change) is refused as what it is, naming who tried and the
    registration, which stands: no registration_rejected tells anybody that registration was
    rejected."""
    refused = the_only(derived, "innovation_day.action_rejected")
    assert refused["source"] == f"/institutions/{ORGANIZER}" and refused["causationid"] == cancellation["id"]
    assert refused["data"] == {
        "day_id": cancellation["data"]["day_id"], "rejected_type": cancellation["type"],
        "rejected_event_id": cancellation["id"], "actor": cancellation["source"].removeprefix("/institutions/"),
        "registration_id": rid(cancellation), "reason": refused["data"]["reason"],
    }
    assert refused["data"]["reason"]["code"] == code
    return refused


# --- scheduling and the organiser -------------------------------------------------------------


@pytest.mark.usefixtures("members")
async def test_a_scheduled_day_is_read_with_the_catalogs_field_names(scenario: Scenario) -> None:
    day = Day.fresh()
    scheduled = day.scheduled(120, themes=("health_care", "economy.disadvantaged_groups"))
    assert await scenario.when(scheduled) == []

    found = view(scenario, day.day_id)
    assert found["organizer"] == ORGANIZER
    assert found["title"] == scheduled["data"]["title"]
    assert found["venue"] == scheduled["data"]["venue"]
    assert datetime.fromisoformat(found["starts_at"]) == day.starts_at
    assert datetime.fromisoformat(found["registration_deadline"]) == day.deadline
    assert (found["capacity"], found["confirmed"], found["waitlisted"], found["status"]) == (120, 0, [], "scheduled")
    assert found["themes"] == ["health_care", "economy.disadvantaged_groups"]


@pytest.mark.usefixtures("members")
async def test_only_the_organiser_reschedules_cancels_or_marks_a_day_held(scenario: Scenario) -> None:
    day = Day.fresh()
    await scenario.given(day.scheduled())
    new_deadline = day.deadline + timedelta(days=2)

    for foreign in (day.rescheduled(deadline=new_deadline, by=OUTSIDER), day.cancelled(by=OUTSIDER), day.held(by=OUTSIDER)):
        refusal = the_only(await scenario.when(foreign), "innovation_day.action_rejected")
        assert refusal["source"] == f"/institutions/{ORGANIZER}" and refusal["causationid"] == foreign["id"]
        assert refusal["data"]["reason"]["code"] == "not_organizer" and refusal["data"]["actor"] == OUTSIDER
        assert refusal["data"]["rejected_type"] == foreign["type"]
    unchanged = view(scenario, day.day_id)
    assert unchanged["status"] == "scheduled"
    assert datetime.fromisoformat(unchanged["registration_deadline"]) == day.deadline

    await scenario.when(day.rescheduled(deadline=new_deadline))
    moved = view(scenario, day.day_id)
    assert datetime.fromisoformat(moved["starts_at"]) == day.starts_at + timedelta(days=1)
    assert datetime.fromisoformat(moved["registration_deadline"]) == new_deadline

    await scenario.given(day.begun(), day.held())
    held = view(scenario, day.day_id)
    assert (held["status"], held["held_attendees"]) == ("held", 7)
    for late in (day.cancelled(), day.rescheduled(deadline=new_deadline)):  # a day held stays held
        assert the_only(await scenario.when(late), "innovation_day.action_rejected")["data"]["reason"]["code"] == "day_held"


@pytest.mark.usefixtures("members")
async def test_a_day_is_reported_held_once_it_has_started(scenario: Scenario) -> None:
    """A report that the day was held before it started closed its registration and matchmaking
    for good: it is refused (not_started), saying when it starts and how to move it."""
    day = Day.fresh()
    seated = day.registration(MERSIN, 2)
    await scenario.given(day.scheduled(), seated)

    early = day.held()
    refusal = the_only(await scenario.when(early), "innovation_day.action_rejected")
    assert (refusal["causationid"], refusal["data"]["reason"]["code"]) == (early["id"], "not_started")
    assert day.starts_at.isoformat() in refusal["data"]["reason"]["message"]["en"]
    assert (view(scenario, day.day_id)["status"], view(scenario, day.day_id)["held_attendees"]) == ("scheduled", None)
    assert only(await scenario.when(day.registration(AMMAN)))["type"] == "innovation_day.registration_confirmed"

    await scenario.given(day.begun())
    assert await scenario.when(day.held()) == []
    assert view(scenario, day.day_id)["status"] == "held"


@pytest.mark.usefixtures("members")
async def test_a_day_is_announced_once_and_an_unknown_day_cannot_be_moved(scenario: Scenario) -> None:
    day = Day.fresh()
    unknown = day.cancelled()
    assert the_only(await scenario.when(unknown), "innovation_day.action_rejected")["data"]["reason"]["code"] == "unknown_day"
    await scenario.given(day.scheduled())
    again = day.scheduled(by=OUTSIDER)
    refusal = the_only(await scenario.when(again), "innovation_day.action_rejected")
    assert refusal["data"]["reason"]["code"] == "already_scheduled" and refusal["source"] == f"/institutions/{ORGANIZER}"
    assert view(scenario, day.day_id)["organizer"] == ORGANIZER
    await scenario.when(day.cancelled())
    assert the_only(await scenario.when(day.cancelled()), "innovation_day.action_rejected")["data"]["reason"]["code"] == "day_cancelled"


@pytest.mark.usefixtures("members")
async def test_a_reschedule_without_a_deadline_keeps_it(scenario: Scenario) -> None:
    day = Day.fresh()
    await scenario.given(day.scheduled(), day.rescheduled())
    assert datetime.fromisoformat(view(scenario, day.day_id)["registration_deadline"]) == day.deadline


# --- registrations, capacity and the waitlist -------------------------------------------------


@pytest.mark.usefixtures("members")
async def test_a_registration_within_capacity_is_confirmed_in_the_organisers_name(scenario: Scenario) -> None:
    day = Day.fresh()
    await scenario.given(day.scheduled(10))
    request = day.registration(MERSIN, 4)

    confirmed = only(await scenario.when(request))
    assert confirmed["type"] == "innovation_day.registration_confirmed"
    assert confirmed["source"] == f"/institutions/{ORGANIZER}"
    assert confirmed["causationid"] == request["id"]
    assert confirmed["data"] == {"day_id": day.day_id, "registration_id": rid(request), "participant": MERSIN, "attendees": 4}
    assert view(scenario, day.day_id)["confirmed"] == 4
    with scenario.session() as session:
        assert [r["status"] for r in registrations(session, day.day_id)] == ["confirmed"]


@pytest.mark.usefixtures("members")
async def test_a_full_house_waitlists_in_order_of_the_log(scenario: Scenario) -> None:
    day = Day.fresh()
    await scenario.given(day.scheduled(5), day.registration(MERSIN, 5))
    requests = [day.registration(GENC_ISI, 2), day.registration(AMMAN, 1), day.registration(ESF, 3)]

    answers = [only(await scenario.when(request)) for request in requests]
    assert [a["type"] for a in answers] == ["innovation_day.registration_waitlisted"] * 3
    assert [a["data"]["position"] for a in answers] == [1, 2, 3]
    assert waitlist(scenario, day.day_id) == [(rid(r), n) for n, r in enumerate(requests, start=1)]
    assert view(scenario, day.day_id)["confirmed"] == 5


@pytest.mark.usefixtures("members")
async def test_a_cancellation_promotes_the_first_waitlisted_and_the_rest_move_up(scenario: Scenario) -> None:
    day = Day.fresh()
    seated = day.registration(MERSIN, 2)
    first, second, third = day.registration(GENC_ISI, 2), day.registration(AMMAN, 1), day.registration(ESF, 3)
    await scenario.given(day.scheduled(3), seated, day.registration(SITRA, 1), first, second, third)

    cancellation = day.cancellation(seated)
    promoted = only(await scenario.when(cancellation))
    assert promoted["type"] == "innovation_day.registration_confirmed"
    assert (rid(promoted), promoted["source"], promoted["causationid"]) == (rid(first), f"/institutions/{ORGANIZER}", cancellation["id"])
    assert waitlist(scenario, day.day_id) == [(rid(second), 1), (rid(third), 2)]
    assert view(scenario, day.day_id)["confirmed"] == 3


@pytest.mark.usefixtures("members")
async def test_promotion_is_strictly_in_order(scenario: Scenario) -> None:
    """One seat frees up; the head needs two, so the one-seat registration behind it waits too."""
    day = Day.fresh()
    seated = day.registration(MERSIN, 1)
    head, behind = day.registration(GENC_ISI, 2), day.registration(AMMAN, 1)
    await scenario.given(day.scheduled(3), seated, day.registration(SITRA, 2), head, behind)

    assert await scenario.when(day.cancellation(seated)) == []
    assert waitlist(scenario, day.day_id) == [(rid(head), 1), (rid(behind), 2)]


@pytest.mark.usefixtures("members")
async def test_a_cancelled_waitlisted_registration_leaves_the_queue(scenario: Scenario) -> None:
    day = Day.fresh()
    first, second, third = day.registration(GENC_ISI, 2), day.registration(AMMAN, 2), day.registration(ESF, 2)
    await scenario.given(day.scheduled(2), day.registration(MERSIN, 2), first, second, third)

    assert await scenario.when(day.cancellation(second)) == []
    assert waitlist(scenario, day.day_id) == [(rid(first), 1), (rid(third), 2)]
    with scenario.session() as session:
        statuses = {r["registration_id"]: r["status"] for r in registrations(session, day.day_id)}
    assert statuses[rid(second)] == "cancelled"


@pytest.mark.usefixtures("members")
async def test_a_registration_after_the_deadline_is_rejected(scenario: Scenario) -> None:
    day = Day.fresh(deadline_in=-timedelta(minutes=1))
    await scenario.given(day.scheduled())
    late = day.registration(MERSIN)

    rejected = assert_rejected(await scenario.when(late), "after_deadline")
    assert rejected["causationid"] == late["id"]
    assert view(scenario, day.day_id)["confirmed"] == 0
    with scenario.session() as session:
        [kept] = registrations(session, day.day_id)
    assert (kept["status"], kept["reason"]["code"]) == ("rejected", "after_deadline")


def attendees_of(scenario: Scenario, day_id: str) -> dict[str, tuple[str, int]]:
    with scenario.session() as session:
        return {r["registration_id"]: (r["status"], r["attendees"]) for r in registrations(session, day_id)}


@pytest.mark.usefixtures("members")
async def test_a_registration_bringing_fewer_frees_seats_for_the_waitlist_in_order(scenario: Scenario) -> None:
    """A participant bringing fewer gives the seats back: the waitlist is seated from its head
    while it fits, in the organiser's name, as after a cancellation."""
    day = Day.fresh()
    seated, first, second, blocked = day.registration(MERSIN, 4), day.registration(AMMAN, 1), day.registration(ESF, 1), day.registration(SITRA, 3)
    await scenario.given(day.scheduled(5), seated, day.registration(GENC_ISI, 1), first, second, blocked)
    change = day.change(seated, 1)
    answers = await scenario.when(change)
    assert [(e["type"], rid(e), e["source"], e["causationid"]) for e in answers] == [
        ("innovation_day.registration_confirmed", rid(r), f"/institutions/{ORGANIZER}", change["id"]) for r in (first, second)]
    assert attendees_of(scenario, day.day_id)[rid(seated)] == ("confirmed", 1)
    assert waitlist(scenario, day.day_id) == [(rid(blocked), 1)] and view(scenario, day.day_id)["confirmed"] == 4


@pytest.mark.usefixtures("members")
async def test_a_registration_bringing_more_takes_free_seats_but_never_passes_the_waitlist(scenario: Scenario) -> None:
    day = Day.fresh()
    seated, other = day.registration(MERSIN, 2), day.registration(AMMAN, 1)
    await scenario.given(day.scheduled(5), seated, other)
    assert await scenario.when(day.change(seated, 4)) == []  # two of the two seats free
    assert attendees_of(scenario, day.day_id)[rid(seated)] == ("confirmed", 4) and view(scenario, day.day_id)["seats_left"] == 0

    for change, code, message in ((day.change(other, 2), "no_room", "0 seats are free: the registration keeps its 1"),
                                  (day.change(seated, 6), "exceeds_capacity", "6 attendees is more than the gathering's whole capacity of 5"),
                                  (day.change(seated, 3, by=AMMAN), "not_participant", "only the registered participant may change")):
        refused = assert_cancellation_refused(await scenario.when(change), change, code)
        assert refused["data"]["rejected_type"] == "innovation_day.registration_changed"
        assert refused["data"]["reason"]["message"]["en"].startswith(message), refused
    waiting = day.registration(ESF, 1)
    await scenario.given(waiting, day.change(seated, 3))  # a seat frees, and goes to the one waiting
    assert waitlist(scenario, day.day_id) == [] and view(scenario, day.day_id)["seats_left"] == 0
    late = day.registration(SITRA, 2)
    await scenario.given(late)
    await scenario.given(day.change(seated, 2))  # one seat free, the waitlist's head needs two
    more = day.change(other, 2)
    refused = assert_cancellation_refused(await scenario.when(more), more, "no_room")
    assert refused["data"]["reason"]["message"]["en"].startswith("1 seat is free and 1 registration waiting for them")
    assert attendees_of(scenario, day.day_id) == {rid(seated): ("confirmed", 2), rid(other): ("confirmed", 1),
                                                  rid(waiting): ("confirmed", 1), rid(late): ("waitlisted", 2)}


@pytest.mark.usefixtures("members")
async def test_a_waitlisted_registration_changed_keeps_its_place_and_is_seated_once_it_fits(scenario: Scenario) -> None:
    day = Day.fresh()
    head, behind = day.registration(AMMAN, 3), day.registration(ESF, 1)
    await scenario.given(day.scheduled(4), day.registration(MERSIN, 2), head, behind)
    assert waitlist(scenario, day.day_id) == [(rid(head), 1), (rid(behind), 2)]
    assert await scenario.when(day.change(behind, 2)) == []  # more, in its place
    assert waitlist(scenario, day.day_id) == [(rid(head), 1), (rid(behind), 2)]
    seated = only(await scenario.when(day.change(head, 2)))  # now it fits: seated, and the one behind waits on
    assert (seated["type"], rid(seated)) == ("innovation_day.registration_confirmed", rid(head))
    assert attendees_of(scenario, day.day_id)[rid(head)] == ("confirmed", 2) and waitlist(scenario, day.day_id) == [(rid(behind), 1)]


@pytest.mark.usefixtures("members")
async def test_a_change_once_registration_closed_or_of_a_registration_no_longer_live_is_refused(scenario: Scenario) -> None:
    day = Day.fresh()
    seated, gone = day.registration(MERSIN, 2), day.registration(AMMAN, 1)
    await scenario.given(day.scheduled(), seated, gone, day.cancellation(gone))
    change = day.change(gone, 2)
    assert_cancellation_refused(await scenario.when(change), change, "already_cancelled")
    await scenario.given(day.rescheduled(deadline=datetime.now(timezone.utc) - timedelta(seconds=1)))
    late = day.change(seated, 1)
    assert_cancellation_refused(await scenario.when(late), late, "after_deadline")
    assert attendees_of(scenario, day.day_id)[rid(seated)] == ("confirmed", 2)


@pytest.mark.usefixtures("members")
async def test_a_cancellation_after_the_deadline_is_rejected(scenario: Scenario) -> None:
    day = Day.fresh()
    seated = day.registration(MERSIN, 2)
    # the organiser moves the deadline into the past: registration is closed
    await scenario.given(day.scheduled(), seated, day.rescheduled(deadline=datetime.now(timezone.utc) - timedelta(seconds=1)))

    late = day.cancellation(seated)
    assert_cancellation_refused(await scenario.when(late), late, "after_deadline")
    assert_rejected(await scenario.when(day.registration(AMMAN)), "after_deadline")
    assert view(scenario, day.day_id)["confirmed"] == 2


@pytest.mark.usefixtures("members")
async def test_a_day_held_refuses_registrations_and_cancellations_as_held(scenario: Scenario) -> None:
    """Once the organiser reports the day held, a cancellation (and a registration) is refused
    saying so (day_held): after_deadline told the participant its deadline had passed, while
    registration was still open."""
    day = Day.fresh()
    seated = day.registration(MERSIN, 2)
    await scenario.given(day.scheduled(), seated, day.begun(), day.held())

    late = day.cancellation(seated)
    refused = assert_cancellation_refused(await scenario.when(late), late, "day_held")
    assert "held" in refused["data"]["reason"]["message"]["en"]
    assert assert_rejected(await scenario.when(day.registration(AMMAN)), "day_held")["data"]["reason"]["message"]["en"]
    assert registrations_of(scenario, day.day_id)[rid(seated)] == "confirmed"


@pytest.mark.usefixtures("members")
async def test_registrations_to_an_unknown_or_cancelled_day_are_rejected(scenario: Scenario) -> None:
    unknown = Day.fresh()
    assert_rejected(await scenario.when(unknown.registration(MERSIN)), "unknown_day", source=MERSIN)

    day = Day.fresh()
    await scenario.given(day.scheduled(), day.cancelled())
    assert_rejected(await scenario.when(day.registration(MERSIN)), "day_cancelled")
    assert view(scenario, day.day_id)["status"] == "cancelled"


@pytest.mark.usefixtures("members")
async def test_a_registration_bigger_than_the_whole_day_is_rejected_and_the_waitlist_stays_as_it_was(scenario: Scenario) -> None:
    day = Day.fresh()
    waiting = day.registration(AMMAN, 2)
    await scenario.given(day.scheduled(3), day.registration(MERSIN, 2), waiting)
    assert waitlist(scenario, day.day_id) == [(rid(waiting), 1)]

    too_big = day.registration(GENC_ISI, 4, role="innovator", project_id="genc-isi-egitim")
    rejected = assert_rejected(await scenario.when(too_big), "exceeds_capacity")
    assert "capacity of 3" in rejected["data"]["reason"]["message"]["en"]
    asked = {"participant": GENC_ISI, "role": "innovator", "attendees": 4, "project_id": "genc-isi-egitim"}
    assert {key: rejected["data"][key] for key in asked} == asked  # what was asked, for the organiser
    with scenario.session() as session:
        [kept] = [r for r in registrations(session, day.day_id) if r["registration_id"] == rid(too_big)]
    assert (kept["status"], kept["role"], kept["attendees"], kept["project_id"]) == ("rejected", "innovator", 4, "genc-isi-egitim")
    assert waitlist(scenario, day.day_id) == [(rid(waiting), 1)]
    later = day.registration(OUTSIDER, 1)
    assert only(await scenario.when(later))["type"] == "innovation_day.registration_waitlisted"
    assert waitlist(scenario, day.day_id) == [(rid(waiting), 1), (rid(later), 2)]


@pytest.mark.usefixtures("members")
async def test_a_duplicate_registration_id_is_rejected_and_the_first_stands(scenario: Scenario) -> None:
    day = Day.fresh()
    first = day.registration(MERSIN, 2)
    await scenario.given(day.scheduled(), first)

    again = day.registration(GENC_ISI, 3, registration_id=rid(first))
    assert_rejected(await scenario.when(again), "already_registered")
    with scenario.session() as session:
        [kept] = registrations(session, day.day_id)
    assert (kept["participant"], kept["attendees"], kept["status"]) == (MERSIN, 2, "confirmed")


@pytest.mark.usefixtures("members")
async def test_an_institution_registers_once_for_a_day_while_its_registration_is_live(scenario: Scenario) -> None:
    """A second registration would take a second seat (or a place in the queue besides the seat):
    it is refused, naming the first, which stands. Once that is cancelled, it may register again."""
    day = Day.fresh()
    first = day.registration(MERSIN, 2)
    await scenario.given(day.scheduled(2), first)

    second = day.registration(MERSIN, 1, role="speaker")
    rejected = assert_rejected(await scenario.when(second), "already_registered")
    assert rid(first) in rejected["data"]["reason"]["message"]["en"]
    assert (rejected["data"]["registration_id"], rejected["data"]["participant"], rejected["data"]["role"]) == (rid(second), MERSIN, "speaker")
    assert registrations_of(scenario, day.day_id) == {rid(first): "confirmed", rid(second): "rejected"}
    assert (view(scenario, day.day_id)["confirmed"], waitlist(scenario, day.day_id)) == (2, [])

    await scenario.given(day.cancellation(first))
    assert only(await scenario.when(day.registration(MERSIN, 1)))["type"] == "innovation_day.registration_confirmed"


@pytest.mark.usefixtures("members")
async def test_only_the_participant_cancels_a_live_registration(scenario: Scenario) -> None:
    day = Day.fresh()
    seated = day.registration(MERSIN, 2)
    await scenario.given(day.scheduled(), seated)

    foreign = day.cancellation(seated, by=OUTSIDER)
    refused = assert_cancellation_refused(await scenario.when(foreign), foreign, "not_participant")
    assert "participant" in refused["data"]["reason"]["message"]["en"]
    assert (view(scenario, day.day_id)["confirmed"], registrations_of(scenario, day.day_id)) == (2, {rid(seated): "confirmed"})
    unknown = day.cancellation(day.registration(MERSIN))  # of a registration never offered
    assert_cancellation_refused(await scenario.when(unknown), unknown, "unknown_registration")
    assert await scenario.when(day.cancellation(seated)) == []
    again = day.cancellation(seated)
    assert_cancellation_refused(await scenario.when(again), again, "already_cancelled")
    assert view(scenario, day.day_id)["confirmed"] == 0
    with scenario.session() as session:
        assert [r["registration_id"] for r in registrations(session, day.day_id)] == [rid(seated)]


@pytest.mark.usefixtures("members")
async def test_a_participant_cancelling_again_or_registering_again_is_told_what_became_of_its_registration(scenario: Scenario) -> None:
    """A second click on "cancel" was answered that there is no such registration, and a
    registration again under the cancelled one's id that the registration exists: the participant
    learns it cancelled already, that a refused registration holds nothing to cancel, and that
    a new request needs a new id."""
    day = Day.fresh()
    seated, too_big = day.registration(MERSIN, 2), day.registration(AMMAN, 11)
    await scenario.given(day.scheduled(), seated, too_big, day.cancellation(seated))

    again = day.cancellation(seated)
    refused = assert_cancellation_refused(await scenario.when(again), again, "already_cancelled")
    assert "cancelled already" in refused["data"]["reason"]["message"]["en"]
    never = day.cancellation(too_big)
    refused = assert_cancellation_refused(await scenario.when(never), never, "unknown_registration")
    assert "was refused" in refused["data"]["reason"]["message"]["en"]
    foreign = day.cancellation(seated, by=OUTSIDER)  # another's learns nothing of it
    assert assert_cancellation_refused(await scenario.when(foreign), foreign, "unknown_registration")

    reused = day.registration(MERSIN, 1, registration_id=rid(seated))
    message = assert_rejected(await scenario.when(reused), "already_registered")["data"]["reason"]["message"]["en"]
    assert "new registration_id" in message
    assert registrations_of(scenario, day.day_id) == {rid(seated): "cancelled", rid(too_big): "rejected"}


def kitchens(owner: str = MERSIN, *, project_id: str = "mahalle-mutfaklari", partners: tuple[str, ...] = ()) -> dict[str, Any]:
    """Mersin's neighbourhood kitchens registered as a project (once: a second registration of
    the id is refused and changes nothing)."""
    return envelope("project.registered", owner, {
        "project_id": project_id, "title": {"tr": "Mahalle Mutfakları"}, "owner": owner, "status": "active",
        "themes": ["health_care.basic_services"],
        "partners": [{"institution": p, "role": "partner", "relation": "partnership"} for p in partners]})


@pytest.mark.usefixtures("members")
async def test_a_registration_brings_a_registered_project_of_its_participants(scenario: Scenario) -> None:
    """Funders were proposed meetings about the project a registration named, registered or not,
    anybody's: a registration brings a registered project it owns or is a partner of."""
    project_id = f"p-{uuid.uuid4().hex[:8]}"
    day = Day.fresh()
    await scenario.given(kitchens(project_id=project_id, partners=(GENC_ISI,)), day.scheduled())

    unregistered = assert_rejected(await scenario.when(
        day.registration(AMMAN, role="innovator", project_id=f"{project_id}-typo")), "unknown_project")
    assert f"{project_id}-typo" in unregistered["data"]["reason"]["message"]["en"]
    foreign = assert_rejected(await scenario.when(day.registration(AMMAN, role="innovator", project_id=project_id)), "not_project_party")
    assert MERSIN in foreign["data"]["reason"]["message"]["en"]
    for party in (MERSIN, GENC_ISI):  # the owner and a partner
        assert only(await scenario.when(day.registration(party, role="innovator", project_id=project_id)))["type"] == (
            "innovation_day.registration_confirmed")
    assert sorted(registrations_of(scenario, day.day_id).values()) == ["confirmed", "confirmed", "rejected", "rejected"]


# --- matchmaking ------------------------------------------------------------------------------


def left(member: str) -> dict[str, Any]:
    return envelope("institution.left", "operator", {"id": member, "reason": {"en": "the cooperative was wound up"}})


@pytest.mark.usefixtures("members")
async def test_a_member_that_leaves_gives_up_its_registrations_and_the_waitlists_move_up(scenario: Scenario) -> None:
    """A member leaving the network held its seats and places on the waitlists for good: it could
    not cancel (the gate takes nothing from a former member), and those waiting behind it waited
    for nothing. Its registrations for the days still taking them are released, each told so in
    the organiser's name, and each day's waitlist is promoted into the seats freed, in order; a
    day cancelled keeps what it had."""
    full, queue, cancelled = Day.fresh(), Day.fresh(), Day.fresh()
    seated, other, first, second = (full.registration(GENC_ISI, 2), full.registration(AMMAN, 1),
                                    full.registration(ESF, 1), full.registration(SITRA, 2))
    ahead, waiting, behind = queue.registration(MERSIN, 1), queue.registration(GENC_ISI, 1), queue.registration(AMMAN, 1)
    kept = cancelled.registration(GENC_ISI, 1)
    await scenario.given(full.scheduled(3), seated, other, first, second,
                         queue.scheduled(1, by=SITRA), ahead, waiting, behind,
                         cancelled.scheduled(5), kept, cancelled.cancelled())
    assert waitlist(scenario, full.day_id) == [(rid(first), 1), (rid(second), 2)]
    assert waitlist(scenario, queue.day_id) == [(rid(waiting), 1), (rid(behind), 2)]

    leaving = left(GENC_ISI)
    told = await scenario.when(leaving)
    by_day = {day.day_id: [(e["type"].removeprefix("innovation_day."), rid(e), e["source"].removeprefix("/institutions/"))
                           for e in told if e["data"]["day_id"] == day.day_id] for day in (full, queue, cancelled)}
    # its seats (2) go to the head of the waitlist (1), and the next (2) does not fit: strict order
    assert by_day[full.day_id] == [("registration_rejected", rid(seated), ORGANIZER), ("registration_confirmed", rid(first), ORGANIZER)]
    assert by_day[queue.day_id] == [("registration_rejected", rid(waiting), SITRA)]
    assert by_day[cancelled.day_id] == []
    assert len(told) == 3 and all(e["causationid"] == leaving["id"] for e in told)
    said = {rid(e): e for e in told}
    for registration in (seated, waiting):
        data = said[rid(registration)]["data"]
        assert (data["participant"], data["attendees"], data["role"]) == (GENC_ISI, registration["data"]["attendees"], "observer")
        assert data["reason"]["code"] == "member_left" and data["reason"]["message"]["en"].startswith(f"{GENC_ISI} left the network on ")
    assert said[rid(seated)]["data"]["reason"]["message"]["en"].endswith("its 2 seats go to the waitlist")
    assert said[rid(waiting)]["data"]["reason"]["message"]["en"].endswith("it leaves the waitlist, where it was number 1")

    assert registrations_of(scenario, full.day_id) == {
        rid(seated): "rejected", rid(other): "confirmed", rid(first): "confirmed", rid(second): "waitlisted"}
    assert waitlist(scenario, full.day_id) == [(rid(second), 1)] and view(scenario, full.day_id)["confirmed"] == 2
    assert waitlist(scenario, queue.day_id) == [(rid(behind), 1)]
    assert registrations_of(scenario, cancelled.day_id) == {rid(kept): "confirmed"}
    with scenario.session() as session:
        reasons = {r["registration_id"]: (r["reason"] or {}).get("code") for r in registrations(session, full.day_id)}
    assert reasons[rid(seated)] == "member_left"


@pytest.mark.usefixtures("members")
async def test_a_member_that_leaves_after_the_deadline_keeps_its_seat_and_its_meetings(scenario: Scenario) -> None:
    """Once registration closed nobody could take a seat freed: the registration stands, as do
    the meetings proposed with it."""
    day = Day.fresh(deadline_in=timedelta(seconds=2))
    innovator, funder = (day.registration(MERSIN, role="innovator", interests=("health_care",)),
                         day.registration(ESF, role="funder", interests=("health_care",)))
    await scenario.given(day.scheduled(2, themes=("health_care",)), innovator, funder)
    await asyncio.sleep(max(0.0, (day.deadline - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    assert "innovation_day.meetings_proposed" in [e["type"] for e in await scenario.tick(day.deadline + timedelta(seconds=1))]
    assert await scenario.when(left(MERSIN)) == []
    assert registrations_of(scenario, day.day_id) == {rid(innovator): "confirmed", rid(funder): "confirmed"}
    with scenario.session() as session:
        assert [m["innovator"] for m in meetings(session, day.day_id)] == [MERSIN]


@pytest.mark.usefixtures("members")
async def test_an_organiser_that_leaves_calls_off_its_gatherings_that_have_not_begun(scenario: Scenario) -> None:
    """The gatherings of an organiser that left stayed scheduled: they took registrations and were
    matched, and nobody could move, cancel or report them. Those that have not begun are called
    off in its name, their meetings withdrawn; one that has begun, and one cancelled already,
    stand as they were; another organiser's gathering is not touched."""
    matched, ahead, begun, called_off, others = (Day.fresh(deadline_in=timedelta(seconds=2)), Day.fresh(), Day.fresh(),
                                                 Day.fresh(), Day.fresh())
    innovator, funder = (matched.registration(MERSIN, role="innovator", interests=("health_care",)),
                         matched.registration(ESF, role="funder", interests=("health_care",)))
    seated = ahead.registration(AMMAN, 2)
    await scenario.given(matched.scheduled(4, themes=("health_care",), by=SITRA), innovator, funder,
                         ahead.scheduled(5, by=SITRA), seated, begun.scheduled(5, by=SITRA), begun.begun(by=SITRA),
                         called_off.scheduled(5, by=SITRA), called_off.cancelled(by=SITRA), others.scheduled(5))
    await asyncio.sleep(max(0.0, (matched.deadline - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    assert "innovation_day.meetings_proposed" in [e["type"] for e in await scenario.tick(matched.deadline + timedelta(seconds=1))]
    with scenario.session() as session:
        assert [m["innovator"] for m in meetings(session, matched.day_id)] == [MERSIN]

    leaving = left(SITRA)
    told = await scenario.when(leaving)
    assert sorted((e["type"], e["data"]["day_id"]) for e in told) == sorted(
        [("innovation_day.cancelled", matched.day_id), ("innovation_day.meetings_proposed", matched.day_id),
         ("innovation_day.cancelled", ahead.day_id)])
    for event in told:
        assert event["source"] == f"/institutions/{SITRA}" and event["causationid"] == leaving["id"]
        if event["type"] == "innovation_day.cancelled":
            assert event["data"]["reason"]["en"].startswith(f"{SITRA}, its organiser, left the network on ")
        else:
            assert event["data"]["meetings"] == []  # withdrawn, as for any cancellation
    statuses = {day.day_id: view(scenario, day.day_id)["status"] for day in (matched, ahead, begun, called_off, others)}
    assert statuses == {matched.day_id: "cancelled", ahead.day_id: "cancelled", begun.day_id: "scheduled",
                        called_off.day_id: "cancelled", others.day_id: "scheduled"}
    with scenario.session() as session:
        assert meetings(session, matched.day_id) == []
        kept = session.get(InnovationDay, called_off.day_id)
        assert kept is not None and kept.cancelled_reason == {"en": "storm warning"}
    assert registrations_of(scenario, ahead.day_id) == {rid(seated): "confirmed"}  # (the day is off; what it had stays)


@pytest.mark.usefixtures("members")
async def test_the_timer_proposes_meetings_once_at_the_deadline(scenario: Scenario) -> None:
    day = Day.fresh(deadline_in=timedelta(hours=1))
    later = Day.fresh(deadline_in=timedelta(days=3))
    await scenario.given(
        kitchens(),
        day.scheduled(20, themes=("health_care",)),
        later.scheduled(20),
        day.registration(MERSIN, role="innovator", interests=("economy.disadvantaged_groups",), project_id="mahalle-mutfaklari"),
        day.registration(GENC_ISI, role="innovator", interests=("education.lifelong_learning",)),
        day.registration(AMMAN, role="innovator"),  # no interests: the day's themes
        day.registration(ESF, role="funder", interests=("economy", "education")),
        day.registration(SITRA, role="funder", interests=("health_care.elderly_care",)),
        day.registration(OUTSIDER, role="observer", interests=("health_care",)),
    )
    assert await scenario.tick(datetime.now(timezone.utc)) == []  # before the deadline

    proposed = only(await scenario.tick(day.deadline + timedelta(seconds=1)))
    assert proposed["type"] == "innovation_day.meetings_proposed"
    assert proposed["source"] == f"/institutions/{ORGANIZER}"
    slot = day.starts_at.astimezone(timezone.utc)
    expected = [
        (MERSIN, ESF, "mahalle-mutfaklari", slot, ["economy.disadvantaged_groups"]),
        (AMMAN, SITRA, None, slot, ["health_care.elderly_care"]),
        (GENC_ISI, ESF, None, slot + timedelta(minutes=20), ["education.lifelong_learning"]),
    ]
    got = [(m["innovator"], m["funder"], m.get("project_id"), datetime.fromisoformat(m["slot_start"]), m["shared_themes"]) for m in proposed["data"]["meetings"]]
    assert sorted(got, key=str) == sorted(expected, key=str)

    assert await scenario.tick(day.deadline + timedelta(minutes=5)) == []
    with scenario.session() as session:
        stored, not_yet = meetings(session, day.day_id), meetings(session, later.day_id)
    assert [(m["innovator"], m["funder"]) for m in stored] == [(i, f) for i, f, *_ in sorted(expected, key=lambda e: (e[3], e[1], e[0]))]
    assert not_yet == []
    assert view(scenario, day.day_id)["meetings_proposed_at"] is not None


@pytest.mark.usefixtures("members")
async def test_the_registrations_still_waiting_at_the_deadline_are_told_no_seat_came_free(scenario: Scenario) -> None:
    """After the registration deadline nothing is taken, cancellations neither: the waitlist does
    not move again. Its registrations stayed `waitlisted` for good, their participants waiting for
    a seat until the day; each is told at the deadline, in the organiser's name, and the day says
    how many seats are left."""
    day = Day.fresh(deadline_in=timedelta(hours=1))
    seated, first, second = day.registration(MERSIN, 3), day.registration(AMMAN, 2), day.registration(ESF, 1)
    await scenario.given(day.scheduled(4), seated, first, second)
    assert waitlist(scenario, day.day_id) == [(rid(first), 1), (rid(second), 2)]
    assert (view(scenario, day.day_id)["confirmed"], view(scenario, day.day_id)["seats_left"]) == (3, 1)

    told = await scenario.tick(day.deadline + timedelta(seconds=1))
    assert [e["type"] for e in told] == ["innovation_day.registration_rejected"] * 2 + ["innovation_day.meetings_proposed"]
    for event, waiting, number in zip(told, (first, second), (1, 2)):
        assert event["source"] == f"/institutions/{ORGANIZER}" and rid(event) == rid(waiting)
        assert event["data"]["participant"] == waiting["data"]["participant"] and event["data"]["attendees"] == waiting["data"]["attendees"]
        assert event["data"]["reason"]["code"] == "waitlist_closed"
        assert event["data"]["reason"]["message"]["en"].endswith(f"no seat came free for this registration, number {number} of the waitlist")
    assert registrations_of(scenario, day.day_id) == {rid(seated): "confirmed", rid(first): "rejected", rid(second): "rejected"}
    assert waitlist(scenario, day.day_id) == [] and view(scenario, day.day_id)["seats_left"] == 1
    assert await scenario.tick(day.deadline + timedelta(minutes=5)) == []  # told once


@pytest.mark.usefixtures("members")
async def test_a_move_that_opens_registration_again_puts_the_waitlist_the_deadline_closed_back_in_its_order(scenario: Scenario) -> None:
    """The registrations the deadline told that no seat came free waited for nothing more once the
    organiser moved the day and opened registration again: a seat freed then went to a newcomer,
    and they had to register again behind it. They are back on the waitlist in their order, each
    told so in the organiser's name, as had the day been moved before its deadline."""
    day = Day.fresh(deadline_in=timedelta(hours=1))
    seated, first, second = day.registration(MERSIN, 2), day.registration(AMMAN, 1), day.registration(ESF, 1)
    await scenario.given(day.scheduled(2), seated, first, second)
    told = await scenario.tick(day.deadline + timedelta(seconds=1))
    assert [e["data"]["reason"]["code"] for e in told if e["type"] == "innovation_day.registration_rejected"] == ["waitlist_closed"] * 2

    move = day.rescheduled(deadline=datetime.now(timezone.utc) + timedelta(hours=2))
    answers = await scenario.when(move)
    back = [e for e in answers if e["type"] == "innovation_day.registration_waitlisted"]
    assert [(rid(e), e["data"]["position"], e["data"]["participant"], e["source"], e["causationid"]) for e in back] == [
        (rid(first), 1, AMMAN, f"/institutions/{ORGANIZER}", move["id"]), (rid(second), 2, ESF, f"/institutions/{ORGANIZER}", move["id"])]
    assert waitlist(scenario, day.day_id) == [(rid(first), 1), (rid(second), 2)]
    with scenario.session() as session:
        assert {r["registration_id"]: r["reason"] for r in registrations(session, day.day_id)}[rid(first)] is None

    newcomer = day.registration(GENC_ISI, 1)
    assert only(await scenario.when(newcomer))["data"]["position"] == 3  # behind those who waited
    promoted = await scenario.when(day.cancellation(seated))
    assert sorted(rid(e) for e in promoted) == sorted([rid(first), rid(second)])
    assert waitlist(scenario, day.day_id) == [(rid(newcomer), 1)]
    again = await scenario.when(day.rescheduled(deadline=datetime.now(timezone.utc) + timedelta(hours=3)))
    assert "innovation_day.registration_waitlisted" not in [e["type"] for e in again]  # (nothing closed, nothing put back)


@pytest.mark.usefixtures("members")
async def test_a_larger_capacity_seats_the_waitlist_in_order(scenario: Scenario) -> None:
    """The organiser found a larger room: the move says so, and the waitlist is seated from its
    head while it fits, each confirmed in the organiser's name (strict order: the one behind a
    registration that does not fit waits too)."""
    day = Day.fresh()
    seated, first, second, blocked, behind = (day.registration(MERSIN, 3), day.registration(AMMAN, 2), day.registration(ESF, 1),
                                              day.registration(SITRA, 2), day.registration(GENC_ISI, 1))
    await scenario.given(day.scheduled(3), seated, first, second, blocked, behind)
    move = day.rescheduled(capacity=7)
    answers = await scenario.when(move)
    assert [(e["type"], rid(e), e["source"], e["causationid"]) for e in answers] == [
        ("innovation_day.registration_confirmed", rid(r), f"/institutions/{ORGANIZER}", move["id"]) for r in (first, second)]
    assert (view(scenario, day.day_id)["capacity"], view(scenario, day.day_id)["confirmed"]) == (7, 6)
    assert waitlist(scenario, day.day_id) == [(rid(blocked), 1), (rid(behind), 2)]
    assert await scenario.when(day.rescheduled(capacity=6)) == []  # smaller, not below the confirmed: taken
    assert (view(scenario, day.day_id)["capacity"], waitlist(scenario, day.day_id)) == (6, [(rid(blocked), 1), (rid(behind), 2)])


@pytest.mark.usefixtures("members")
async def test_a_smaller_capacity_refuses_the_waitlisted_registrations_it_could_never_seat(scenario: Scenario) -> None:
    """A registration waiting with more attendees than the smaller room holds could never be
    seated, and those behind it would be seated past it: it is told so, in the organiser's name,
    and the waitlist closes up behind it."""
    day = Day.fresh()
    seated, big, small = day.registration(MERSIN, 2), day.registration(AMMAN, 3), day.registration(ESF, 1)
    await scenario.given(day.scheduled(4), seated, big, small)
    assert waitlist(scenario, day.day_id) == [(rid(big), 1), (rid(small), 2)]
    move = day.rescheduled(capacity=2)
    refused = only(await scenario.when(move))
    assert (refused["type"], rid(refused), refused["source"], refused["causationid"]) == (
        "innovation_day.registration_rejected", rid(big), f"/institutions/{ORGANIZER}", move["id"])
    assert refused["data"]["reason"]["code"] == "capacity_reduced" and refused["data"]["attendees"] == 3
    assert refused["data"]["reason"]["message"]["en"].startswith("the gathering moved to a capacity of 2: the 3 attendees")
    assert registrations_of(scenario, day.day_id)[rid(big)] == "rejected"
    assert waitlist(scenario, day.day_id) == [(rid(small), 1)] and view(scenario, day.day_id)["capacity"] == 2
    assert only(await scenario.when(day.registration(GENC_ISI, 1)))["type"] == "innovation_day.registration_waitlisted"  # behind


@pytest.mark.usefixtures("members")
async def test_a_capacity_below_the_confirmed_attendees_is_refused_and_the_day_stays_as_it_was(scenario: Scenario) -> None:
    day = Day.fresh()
    await scenario.given(day.scheduled(5), day.registration(MERSIN, 3), day.registration(AMMAN, 1))
    before = view(scenario, day.day_id)
    move = day.rescheduled(capacity=3)
    refused = the_only(await scenario.when(move), "innovation_day.action_rejected")
    assert refused["source"] == f"/institutions/{ORGANIZER}" and refused["data"]["rejected_event_id"] == move["id"]
    assert refused["data"]["reason"]["code"] == "below_confirmed"
    assert refused["data"]["reason"]["message"]["en"].startswith("4 attendees are confirmed: the capacity cannot be 3")
    assert view(scenario, day.day_id) == before


@pytest.mark.usefixtures("members")
async def test_a_larger_capacity_seats_the_waitlist_once_registration_opens_again_but_not_while_it_is_closed(scenario: Scenario) -> None:
    """After the deadline nothing is taken: a larger room seats nobody (the waitlist was told no
    seat came free). A move that opens registration again puts that waitlist back, and a larger
    capacity with it seats it."""
    day = Day.fresh(deadline_in=timedelta(hours=1))
    seated, first, second = day.registration(MERSIN, 2), day.registration(AMMAN, 1), day.registration(ESF, 2)
    await scenario.given(day.scheduled(2), seated, first, second)
    await scenario.tick(day.deadline + timedelta(seconds=1))
    kept_closed = day.rescheduled(deadline=datetime.now(timezone.utc) - timedelta(seconds=1), capacity=4)
    assert [e["type"] for e in await scenario.when(kept_closed)] == ["innovation_day.meetings_proposed"]
    assert registrations_of(scenario, day.day_id) == {rid(seated): "confirmed", rid(first): "rejected", rid(second): "rejected"}
    reopened = await scenario.when(day.rescheduled(deadline=datetime.now(timezone.utc) + timedelta(hours=2), capacity=5))
    assert [(e["type"].removeprefix("innovation_day."), rid(e)) for e in reopened if e["type"] != "innovation_day.meetings_proposed"] == [
        ("registration_waitlisted", rid(first)), ("registration_waitlisted", rid(second)),
        ("registration_confirmed", rid(first)), ("registration_confirmed", rid(second))]
    assert registrations_of(scenario, day.day_id) == dict.fromkeys((rid(seated), rid(first), rid(second)), "confirmed")
    assert waitlist(scenario, day.day_id) == [] and view(scenario, day.day_id)["seats_left"] == 0


@pytest.mark.usefixtures("members")
async def test_a_move_that_keeps_registration_closed_leaves_the_waitlist_closed(scenario: Scenario) -> None:
    day = Day.fresh(deadline_in=timedelta(hours=1))
    seated, waiting = day.registration(MERSIN, 2), day.registration(AMMAN, 1)
    await scenario.given(day.scheduled(2), seated, waiting)
    await scenario.tick(day.deadline + timedelta(seconds=1))
    answers = await scenario.when(day.rescheduled(deadline=datetime.now(timezone.utc) - timedelta(seconds=1)))
    assert [e["type"] for e in answers] == ["innovation_day.meetings_proposed"]
    assert registrations_of(scenario, day.day_id)[rid(waiting)] == "rejected"


@pytest.mark.usefixtures("members")
async def test_the_meetings_timer_reads_only_the_days_whose_deadline_has_come(scenario: Scenario) -> None:
    """The timer runs every second: the days still open for registration, most of the scheduled
    ones on a living network, are not read, nor a day whose meetings were proposed."""
    from handlers.innovation_days import InnovationDay, propose_meetings
    from handlers.network import Context

    proposed, due = Day.fresh(deadline_in=timedelta(hours=1)), Day.fresh(deadline_in=timedelta(hours=2))
    still_open = [Day.fresh(deadline_in=timedelta(days=3)) for _ in range(3)]
    await scenario.given(
        proposed.scheduled(20, themes=("economy",)), due.scheduled(), *(day.scheduled() for day in still_open),
        proposed.registration(MERSIN, role="innovator", interests=("economy.disadvantaged_groups",)),
        proposed.registration(ESF, role="funder", interests=("economy",)),
    )
    assert only(await scenario.tick(proposed.deadline + timedelta(seconds=1)))["type"] == "innovation_day.meetings_proposed"
    ours = {proposed.day_id, due.day_id, *(day.day_id for day in still_open)}
    read: set[str] = set()
    with scenario.session() as session:
        def loaded(_session: Any, row: Any) -> None:
            if isinstance(row, InnovationDay):
                read.add(row.day_id)

        sa.event.listen(session, "loaded_as_persistent", loaded)
        propose_meetings(Context(session, None, now=due.deadline + timedelta(seconds=1), live=True))
        session.rollback()
    assert read & ours == {due.day_id}


@pytest.mark.usefixtures("members")
async def test_no_meetings_for_a_cancelled_day(scenario: Scenario) -> None:
    day = Day.fresh(deadline_in=timedelta(hours=1))
    await scenario.given(
        day.scheduled(),
        day.registration(MERSIN, role="innovator"),
        day.registration(ESF, role="funder"),
        day.cancelled(),
    )
    assert await scenario.tick(day.deadline + timedelta(seconds=1)) == []


@pytest.mark.usefixtures("members")
async def test_a_day_cancelled_after_matchmaking_withdraws_its_meetings(scenario: Scenario) -> None:
    day = await innovator_and_funder(scenario, deadline_in=timedelta(hours=1))
    assert len(only(await scenario.tick(day.deadline + timedelta(seconds=1)))["data"]["meetings"]) == 1
    cancellation = day.cancelled()
    withdrawn = only(await scenario.when(cancellation))
    assert withdrawn["type"] == "innovation_day.meetings_proposed" and withdrawn["data"]["meetings"] == []
    assert withdrawn["causationid"] == cancellation["id"] and withdrawn["source"] == f"/institutions/{ORGANIZER}"
    assert stored_meetings(scenario, day.day_id) == [] and view(scenario, day.day_id)["status"] == "cancelled"
    assert await scenario.tick(day.deadline + timedelta(minutes=5)) == []  # and none are proposed again


@pytest.mark.usefixtures("members")
async def test_a_funder_gets_at_most_n_meetings(scenario: Scenario, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(innovation_days.rules, "MEETINGS_PER_FUNDER", 2)
    day = Day.fresh(deadline_in=timedelta(hours=1))
    innovators = [day.registration(who, role="innovator") for who in (MERSIN, GENC_ISI, AMMAN)]
    await scenario.given(day.scheduled(), *innovators, day.registration(ESF, role="funder"))

    proposed = only(await scenario.tick(day.deadline + timedelta(seconds=1)))
    assert [m["innovator"] for m in proposed["data"]["meetings"]] == [MERSIN, GENC_ISI]


def stored_meetings(scenario: Scenario, day_id: str) -> list[tuple[str, str, datetime]]:
    with scenario.session() as session:
        return [(m["innovator"], m["funder"], datetime.fromisoformat(m["slot_start"])) for m in meetings(session, day_id)]


async def innovator_and_funder(scenario: Scenario, *, deadline_in: timedelta) -> Day:
    """A day with one innovator and one funder confirmed, who share the day's theme."""
    day = Day.fresh(deadline_in=deadline_in)
    await scenario.given(
        day.scheduled(themes=("health_care",)),
        day.registration(MERSIN, role="innovator"),
        day.registration(ESF, role="funder"),
    )
    return day


@pytest.mark.usefixtures("members")
async def test_a_day_moved_after_matchmaking_gets_its_meetings_at_the_new_times(scenario: Scenario) -> None:
    day = await innovator_and_funder(scenario, deadline_in=timedelta(seconds=3))
    await asyncio.sleep(max(0.0, (day.deadline - datetime.now(timezone.utc)).total_seconds()) + 0.1)
    first = only(await scenario.tick(datetime.now(timezone.utc)))
    old_slot = day.starts_at.astimezone(timezone.utc)
    assert [datetime.fromisoformat(m["slot_start"]) for m in first["data"]["meetings"]] == [old_slot]

    moved = day.rescheduled()  # a day later; the registration deadline stays passed
    again = only(await scenario.when(moved))
    assert again["type"] == "innovation_day.meetings_proposed" and again["causationid"] == moved["id"]
    assert again["source"] == f"/institutions/{ORGANIZER}" and again["id"] != first["id"]
    new_slot = datetime.fromisoformat(moved["data"]["starts_at"]).astimezone(timezone.utc)
    assert [(m["innovator"], m["funder"], datetime.fromisoformat(m["slot_start"])) for m in again["data"]["meetings"]] == [
        (MERSIN, ESF, new_slot)
    ]
    assert stored_meetings(scenario, day.day_id) == [(MERSIN, ESF, new_slot)]
    assert await scenario.tick(datetime.now(timezone.utc)) == []  # proposed once for the new times


@pytest.mark.usefixtures("members")
async def test_a_move_that_opens_registration_again_withdraws_the_meetings_until_the_new_deadline(scenario: Scenario) -> None:
    day = await innovator_and_funder(scenario, deadline_in=timedelta(hours=1))
    assert len(only(await scenario.tick(day.deadline + timedelta(seconds=1)))["data"]["meetings"]) == 1

    new_deadline = datetime.now(timezone.utc) + timedelta(hours=2)
    withdrawn = only(await scenario.when(day.rescheduled(deadline=new_deadline)))
    assert withdrawn["type"] == "innovation_day.meetings_proposed" and withdrawn["data"]["meetings"] == []
    assert stored_meetings(scenario, day.day_id) == []

    late = day.registration(AMMAN, role="innovator")  # registration is open again
    assert only(await scenario.when(late))["type"] == "innovation_day.registration_confirmed"
    assert await scenario.tick(new_deadline - timedelta(seconds=1)) == []
    proposed = only(await scenario.tick(new_deadline + timedelta(seconds=1)))
    new_start = (day.starts_at + timedelta(days=1)).astimezone(timezone.utc)
    # The late registrant is matched too; the funder meets the two innovators one after the other.
    got = sorted((datetime.fromisoformat(m["slot_start"]), m["innovator"], m["funder"]) for m in proposed["data"]["meetings"])
    assert [(i, f) for _, i, f in got] == [(MERSIN, ESF), (AMMAN, ESF)]
    assert got[0][0] == new_start and got[1][0] > new_start
    assert await scenario.tick(new_deadline + timedelta(minutes=5)) == []


@pytest.mark.usefixtures("members")
async def test_matchmaking_counts_the_projects_themes(scenario: Scenario) -> None:
    project = envelope(
        "project.registered",
        MERSIN,
        {"project_id": f"p-{uuid.uuid4().hex[:8]}", "title": {"tr": "Mahalle Mutfakları"}, "owner": MERSIN, "themes": ["education.literacy"], "status": "active"},
    )
    day = Day.fresh(deadline_in=timedelta(hours=1))
    await scenario.given(
        project,
        day.scheduled(themes=("health_care",)),
        day.registration(MERSIN, role="innovator", interests=("economy",), project_id=project["data"]["project_id"]),
        day.registration(ESF, role="funder", interests=("education",)),
    )
    proposed = only(await scenario.tick(day.deadline + timedelta(seconds=1)))
    [meeting] = proposed["data"]["meetings"]
    assert (meeting["project_id"], meeting["shared_themes"]) == (project["data"]["project_id"], ["education.literacy"])


# --- rebuild ----------------------------------------------------------------------------------


def test_a_rebuild_from_the_log_gives_the_same_state(engine: Engine) -> None:
    """Direct use of the network (a rebuild is not a scenario step): apply live, wipe the read
    model, replay the log — external events and the timer's — with live=False, compare."""
    net = network()
    day = Day.fresh(deadline_in=timedelta(hours=1))
    start = datetime.now(timezone.utc)
    seated = day.registration(MERSIN, 2, role="innovator", interests=("health_care",))
    offered = [
        day.scheduled(3),
        seated,
        day.registration(GENC_ISI, 2, role="funder", interests=("health_care",)),
        day.registration(AMMAN, 1, role="innovator"),
        day.registration(ESF, 1, role="funder"),
        day.cancellation(seated),
    ]
    log = [Event.from_envelope(e, seq=n, logged_at=start + timedelta(seconds=n)) for n, e in enumerate(offered, start=1)]

    def state() -> tuple[Any, ...]:
        with session_scope(engine) as session:
            return day_view(session, day.day_id), registrations(session, day.day_id), meetings(session, day.day_id)

    with session_scope(engine) as session:
        for event in log:
            net.apply(session, event, live=True)
    with session_scope(engine) as session:
        timed = net.tick(session, day.deadline + timedelta(seconds=1))  # the waitlist closed, the meetings proposed
    assert [e.envelope["type"] for e in timed][-1] == "innovation_day.meetings_proposed" and len(timed) == 2
    timed_from_log = [Event.from_envelope(dict(e.envelope), seq=len(log) + n, logged_at=day.deadline + timedelta(seconds=1 + n))
                      for n, e in enumerate(timed, start=1)]
    before = state()
    assert [r["reason"]["code"] for r in before[1] if r["status"] == "rejected"] == ["waitlist_closed"] and before[2]

    with session_scope(engine) as session:
        for table in (Registration, InnovationDay, ProposedMeetingRow):
            session.execute(sa.delete(table))
        session.execute(sa.text("DELETE FROM applied_events"))
    with session_scope(engine) as session:
        for event in [*log, *timed_from_log]:
            net.apply(session, event, live=False)
    assert state() == before


def test_a_log_applied_by_older_rules_is_rebuilt_as_it_was_applied(engine: Engine) -> None:
    """Rules before version 2 answered a refused cancellation with a registration_rejected of the
    registration it named, and took an institution's second registration for a day. A log they
    applied is rebuilt so — the rebuild derives the very events the log holds, under their ids —,
    and what today's rules applied after it as they do."""
    day = Day.fresh()
    seated, twice_then, twice_now = day.registration(MERSIN, 2), day.registration(MERSIN, 1), day.registration(MERSIN, 1)
    then, now = day.cancellation(seated, by=OUTSIDER), day.cancellation(seated, by=OUTSIDER)
    log = [day.scheduled(2), seated, twice_then, then, now, twice_now]
    answers = applied_by_rules(engine, log, older=1)
    with Session(engine) as session:
        statuses = {r["registration_id"]: r["status"] for r in registrations(session, day.day_id)}
    assert answers[then["id"]] == ["innovation_day.registration_rejected"]
    assert answers[now["id"]] == ["innovation_day.action_rejected"]
    assert answers[twice_then["id"]] == ["innovation_day.registration_waitlisted"]
    assert answers[twice_now["id"]] == ["innovation_day.registration_rejected"]
    assert statuses == {rid(seated): "confirmed", rid(twice_then): "waitlisted", rid(twice_now): "rejected"}


def test_a_log_applied_by_version_2_of_the_rules_is_rebuilt_as_it_was_applied(engine: Engine) -> None:
    """Rules before version 3 took a registration bringing a project nobody registered and the
    report that a day was held before it started, and refused a registration for the day then as
    after_deadline. A log they applied is rebuilt so: the day
    stays held and the registration's reason stays what its participant was told; what version 3
    applied after it is judged as it was (an early report refused, the day open)."""
    then, now = Day.fresh(), Day.fresh()
    early_then, late, early_now, seated = then.held(), then.registration(AMMAN), now.held(), now.registration(AMMAN)
    phantom_then, phantom_now = (day.registration(MERSIN, role="innovator", project_id=f"nowhere-{uuid.uuid4().hex[:8]}")
                                 for day in (then, now))
    log = [then.scheduled(2), phantom_then, early_then, late, now.scheduled(2), early_now, seated, phantom_now]
    answers = applied_by_rules(engine, log, older=2)
    with Session(engine) as session:
        days = {day.day_id: (day_view(session, day.day_id) or {})["status"] for day in (then, now)}
        reasons = {r["registration_id"]: (r["status"], (r["reason"] or {}).get("code"))
                   for day in (then, now) for r in registrations(session, day.day_id)}
    assert early_then["id"] not in answers and answers[early_now["id"]] == ["innovation_day.action_rejected"]
    assert days == {then.day_id: "held", now.day_id: "scheduled"}
    assert reasons == {rid(late): ("rejected", "after_deadline"), rid(seated): ("confirmed", None),
                       rid(phantom_then): ("confirmed", None), rid(phantom_now): ("rejected", "unknown_project")}


def test_a_leaving_applied_by_version_4_of_the_rules_left_the_members_registrations(engine: Engine) -> None:
    """Rules before version 5 left a former member its seats; a log they applied is rebuilt so, and
    a member leaving after them gives its registrations up."""
    day = Day.fresh()
    seated, waiting, later = day.registration(MERSIN, 2), day.registration(AMMAN, 1), day.registration(ESF, 1)
    then, now = left(MERSIN), left(AMMAN)
    answers = applied_by_rules(engine, [day.scheduled(2), seated, waiting, then, later, now], older=4)
    assert then["id"] not in answers and answers[now["id"]] == ["innovation_day.registration_rejected"]
    assert registrations_of_engine(engine, day.day_id) == {rid(seated): "confirmed", rid(waiting): "rejected", rid(later): "waitlisted"}
    with Session(engine) as session:
        assert [(w["registration_id"], w["position"]) for w in (day_view(session, day.day_id) or {})["waitlisted"]] == [(rid(later), 1)]


def test_a_leaving_applied_by_version_5_of_the_rules_left_the_organisers_gatherings_scheduled(engine: Engine) -> None:
    """Rules before version 6 left the gatherings of an organiser that left scheduled; a log they
    applied is rebuilt so, and an organiser leaving after them calls its gatherings off."""
    then, now = Day.fresh(), Day.fresh()
    gone_then, gone_now = left(SITRA), left(ESF)
    answers = applied_by_rules(engine, [then.scheduled(2, by=SITRA), then.registration(MERSIN, 1), gone_then, now.scheduled(2, by=ESF),
                               gone_now], older=5)
    assert gone_then["id"] not in answers and gone_now["id"] in answers
    with Session(engine) as session:
        assert {day.day_id: (day_view(session, day.day_id) or {})["status"] for day in (then, now)} == {
            then.day_id: "scheduled", now.day_id: "cancelled"}


def registrations_of_engine(engine: Engine, day_id: str) -> dict[str, str]:
    with Session(engine) as session:
        return {r["registration_id"]: r["status"] for r in registrations(session, day_id)}


def test_a_move_applied_by_version_3_of_the_rules_left_the_closed_waitlist_refused(engine: Engine) -> None:
    """Rules before version 4 left the registrations the deadline refused (waitlist_closed) refused
    when a move opened registration again; a log they applied is applied so, and version 4 puts
    them back on the waitlist."""
    from handlers.rules import RULES, judged_by

    def moved_after_the_deadline(version: int) -> tuple[list[str], str]:
        net = network()
        day = Day.fresh(deadline_in=timedelta(hours=1))
        waiting = day.registration(AMMAN, 1)
        start = datetime.now(timezone.utc)
        with judged_by(version), session_scope(engine) as session:
            for n, offered in enumerate([day.scheduled(2), day.registration(MERSIN, 2), waiting], start=1):
                net.apply(session, Event.from_envelope(offered, seq=None, logged_at=start + timedelta(seconds=n)), live=True)
            net.tick(session, day.deadline + timedelta(seconds=1))
            move = day.rescheduled(deadline=day.deadline + timedelta(hours=2))
            derived = net.apply(session, Event.from_envelope(move, seq=None, logged_at=day.deadline + timedelta(seconds=2)), live=True)
        with Session(engine) as session:
            [status] = [r["status"] for r in registrations(session, day.day_id) if r["registration_id"] == rid(waiting)]
        return [d.type for d in derived], status

    assert moved_after_the_deadline(3) == (["innovation_day.meetings_proposed"], "rejected")
    assert moved_after_the_deadline(RULES) == (
        ["innovation_day.meetings_proposed", "innovation_day.registration_waitlisted"], "waitlisted")


# --- properties over the real network ---------------------------------------------------------


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[int, list[tuple[str, int]]]:
    """A capacity and a sequence of ("register", attendees) / ("cancel", which earlier one)."""
    capacity = draw(st.integers(1, 8))
    steps = draw(
        st.lists(
            st.one_of(st.tuples(st.just("register"), st.integers(1, 4)), st.tuples(st.just("cancel"), st.integers(0, 30))),
            min_size=1,
            max_size=14,
        )
    )
    return capacity, steps


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=interleavings())
@pytest.mark.usefixtures("members")
async def test_capacity_holds_and_the_waitlist_keeps_log_order(scenario: Scenario, case: tuple[int, list[tuple[str, int]]]) -> None:
    """Random registrations (1–4 attendees) and cancellations against a day of random capacity."""
    capacity, steps = case
    day = Day.fresh()  # a fresh day per example: the database is shared by the examples
    await scenario.given(day.scheduled(capacity))
    requested: list[dict[str, Any]] = []
    participants = [MERSIN, GENC_ISI, AMMAN, ESF, SITRA, OUTSIDER]
    for action, value in steps:
        if action == "register" or not requested:
            participant = participants[len(requested) % len(participants)]
            with scenario.session() as session:
                registered = any(r["participant"] == participant and r["status"] in ("confirmed", "waitlisted")
                                 for r in registrations(session, day.day_id))
            request = day.registration(participant, value if action == "register" else 1)
            requested.append(request)
            answer = only(await scenario.when(request))
            if registered:  # one live registration per institution and day
                assert (answer["type"], answer["data"]["reason"]["code"]) == ("innovation_day.registration_rejected", "already_registered")
            if answer["type"] == "innovation_day.registration_waitlisted":
                assert (rid(request), answer["data"]["position"]) == waitlist(scenario, day.day_id)[-1]
        else:
            await scenario.when(day.cancellation(requested[value % len(requested)]))

        found = view(scenario, day.day_id)
        assert found["confirmed"] <= capacity
        queue = [w["registration_id"] for w in found["waitlisted"]]
        in_log_order = [rid(r) for r in requested if rid(r) in set(queue)]
        assert queue == in_log_order
        assert [w["position"] for w in found["waitlisted"]] == list(range(1, len(queue) + 1))
        fitting = [w for w in found["waitlisted"] if w["attendees"] <= capacity]
        assert not fitting or fitting[0]["attendees"] > capacity - found["confirmed"]  # strict FIFO: nobody is left waiting who fits


# --- the calendar feed --------------------------------------------------------------------------


def test_a_participants_calendar_reads_the_meetings_of_all_its_days_in_one_query(engine: Engine) -> None:
    """The calendar feed read a participant's meetings with one query per day it is registered
    for: the statements a feed takes do not grow with its days, and each day holds its own
    meetings (no other day's, no other institution's), as a day's meetings read alone give them."""
    from icalendar import Calendar

    from connectors.http.calendar import calendar_feed

    from handlers.institutions import Institution

    participant, now = f"p-{uuid.uuid4().hex[:8]}", datetime.now(timezone.utc).replace(microsecond=0)
    with session_scope(engine) as session:  # (a feed's participant is an institution: an id that is none is refused)
        session.add(Institution(id=participant, name={"en": participant}, kind="ngo", country="FI", joined_at=now))

    def days_with_meetings(count: int) -> list[str]:
        ids = [f"day-{uuid.uuid4().hex[:12]}" for _ in range(count)]
        with session_scope(engine) as session:
            for n, day_id in enumerate(ids):
                starts = now + timedelta(days=30 + n)
                session.add(InnovationDay(
                    day_id=day_id, organizer=ORGANIZER, title={"en": f"Day {n}"}, format="innovation_day", starts_at=starts,
                    ends_at=starts + timedelta(hours=2), attendance_mode="online", capacity=10, registration_deadline=now,
                    themes=["health_care"], languages=["en"], meetings_proposed_at=now))
                session.add(Registration(registration_id=f"{day_id}-r", day_id=day_id, participant=participant, role="innovator",
                                         attendees=1, interests=[], status="confirmed", requested_at=now))
                for slot, (innovator, funder) in enumerate(((participant, ESF), (MERSIN, SITRA), (participant, SITRA))):
                    session.add(ProposedMeetingRow(day_id=day_id, slot_start=starts + slot * timedelta(minutes=20), funder=funder,
                                                   innovator=innovator, shared_themes=["health_care"]))
        return ids

    def feed(day_ids: list[str]) -> tuple[int, dict[str, list[str]]]:
        statements: list[str] = []

        def counted(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
            statements.append(statement)

        with Session(engine) as session:
            session.connection()  # (the connection is taken before counting)
            sa.event.listen(engine, "before_cursor_execute", counted)
            try:
                answer = calendar_feed(participant, session, "en", participant, None)
            finally:
                sa.event.remove(engine, "before_cursor_execute", counted)
            expected = {day_id: [f"{day_id}.meeting.{datetime.fromisoformat(m['slot_start']).strftime('%Y%m%dT%H%M%SZ')}.{m['funder']}@collabbus"
                                 for m in meetings(session, day_id, participant=participant)] for day_id in day_ids}
        uids = [str(e["uid"]) for e in Calendar.from_ical(bytes(answer.body)).walk("VEVENT")]
        got = {day_id: [uid for uid in uids if uid.startswith(f"{day_id}.meeting.")] for day_id in day_ids}
        assert got == expected and all(len(found) == 2 for found in got.values())
        assert sorted(uid for uid in uids if ".meeting." not in uid) == sorted(f"{day_id}@collabbus" for day_id in day_ids)
        return len(statements), got

    one = days_with_meetings(1)
    alone, _ = feed(one)
    more = days_with_meetings(4)
    assert feed(one + more)[0] == alone
