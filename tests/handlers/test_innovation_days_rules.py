"""The innovation days' rules as pure functions: no database, no broker."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handlers.rules import judged_by
from handlers.rules.innovation_days import (
    Candidate,
    Confirm,
    DayFacts,
    DayState,
    Ended,
    Refuse,
    Seat,
    Waitlist,
    day_action_refusal,
    decide_cancellation,
    decide_change,
    decide_registration,
    promotions,
    propose_meetings,
    capacity_refusal,
    release,
    moved_to_capacity,
    shared_themes,
    slots,
)

pytestmark = pytest.mark.quick

NOON = datetime(2026, 9, 17, 12, 0, tzinfo=timezone.utc)
DEADLINE = datetime(2026, 9, 3, 21, 0, tzinfo=timezone.utc)
BEFORE = DEADLINE - timedelta(days=1)


def day(capacity: int = 10, *seats: Seat, status: str = "scheduled") -> DayState:
    return DayState("fi-si-day-2026", "fi-thl", status, capacity, DEADLINE, seats)  # type: ignore[arg-type]


def confirmed(rid: str, attendees: int, participant: str = "") -> Seat:
    return Seat(rid, participant or f"p-{rid}", attendees, "confirmed")


def waiting(rid: str, attendees: int, position: int, participant: str = "") -> Seat:
    return Seat(rid, participant or f"p-{rid}", attendees, "waitlisted", position)


def register(state: DayState | None, attendees: int = 1, *, at: datetime = BEFORE, already: bool = False) -> object:
    return decide_registration(
        state, registration_id="r-new", participant="p-new", attendees=attendees, already_registered=already, at=at
    )


# --- registration -----------------------------------------------------------------------------


def test_a_registration_that_fits_is_confirmed() -> None:
    assert register(day(10, confirmed("a", 6)), 4) == Confirm("r-new", "p-new", 4)


def test_beyond_capacity_a_registration_is_waitlisted_at_the_end() -> None:
    state = day(10, confirmed("a", 8), waiting("b", 3, 1), waiting("c", 1, 2))
    assert register(state, 3) == Waitlist("r-new", "p-new", 3)


def test_a_small_late_registration_does_not_overtake_the_waitlist() -> None:
    # 2 seats free and 1 asked, but "b" (3 attendees) waits ahead: strict FIFO
    assert register(day(10, confirmed("a", 8), waiting("b", 3, 1)), 1) == Waitlist("r-new", "p-new", 2)


def test_a_registration_bigger_than_the_whole_day_is_refused() -> None:
    refused = register(day(5), 6)
    assert isinstance(refused, Refuse) and refused.code == "exceeds_capacity" and "capacity of 5" in refused.message
    assert register(day(5), 5) == Confirm("r-new", "p-new", 5)  # exactly the capacity fits
    assert register(day(5, confirmed("a", 1)), 5) == Waitlist("r-new", "p-new", 1)  # fits once others leave


def test_one_bigger_than_the_day_from_an_older_log_does_not_hold_up_the_queue() -> None:
    assert register(day(5, confirmed("a", 3), waiting("huge", 9, 1)), 2) == Confirm("r-new", "p-new", 2)


def test_an_institution_registers_once_per_day_while_its_registration_is_live() -> None:
    for held in (confirmed("mine", 2, participant="p-new"), waiting("mine", 2, 1, participant="p-new")):
        assert register(day(2, held), 1) == Refuse("already_registered", "p-new is registered for this gathering already, as mine")
    assert register(day(10, confirmed("a", 2)), 1) == Confirm("r-new", "p-new", 1)  # (a cancelled or rejected one is no seat)
    with judged_by(1):  # a log from before the rule keeps both
        assert register(day(2, confirmed("mine", 2, participant="p-new")), 1) == Waitlist("r-new", "p-new", 1)


def test_a_registration_brings_a_registered_project_of_its_participants() -> None:
    def bringing(project: tuple[str, frozenset[str]] | None) -> object:
        return decide_registration(day(), registration_id="r-new", participant="p-new", attendees=1,
                                   already_registered=False, at=BEFORE, project_id="kitchens", project=project)

    assert isinstance(refused := bringing(None), Refuse) and refused.code == "unknown_project" and "kitchens" in refused.message
    assert isinstance(refused := bringing(("p-owner", frozenset({"p-other"}))), Refuse) and refused.code == "not_project_party"
    assert bringing(("p-new", frozenset())) == Confirm("r-new", "p-new", 1)
    assert bringing(("p-owner", frozenset({"p-new"}))) == Confirm("r-new", "p-new", 1)
    with judged_by(2):  # a log applied before version 3 took any project id
        assert bringing(None) == Confirm("r-new", "p-new", 1)


def test_refusals() -> None:
    assert isinstance(refused := register(day(), already=True), Refuse) and refused.code == "already_registered"
    assert "new registration_id" in refused.message
    assert isinstance(refused := register(None), Refuse) and refused.code == "unknown_day"
    assert isinstance(refused := register(day(status="cancelled")), Refuse) and refused.code == "day_cancelled"
    assert isinstance(refused := register(day(status="held")), Refuse) and refused.code == "day_held"
    with judged_by(2):  # a log applied before version 3 was refused as after the deadline
        assert isinstance(refused := register(day(status="held")), Refuse) and refused.code == "after_deadline"
    assert isinstance(refused := register(day(), at=DEADLINE), Refuse) and refused.code == "after_deadline"
    assert isinstance(register(day(), at=DEADLINE - timedelta(microseconds=1)), Confirm)


def test_a_day_is_reported_held_once_it_has_started() -> None:
    facts = DayFacts("fi-thl", "scheduled", NOON)
    refused = day_action_refusal(facts, "held", "fi-thl", NOON - timedelta(seconds=1))
    assert refused is not None and refused.code == "not_started" and NOON.isoformat() in refused.message
    assert day_action_refusal(facts, "held", "fi-thl", NOON) is None
    assert day_action_refusal(facts, "cancelled", "fi-thl", NOON - timedelta(days=1)) is None  # (called off before it starts)
    with judged_by(2):  # a log applied before version 3 took the report at any time
        assert day_action_refusal(facts, "held", "fi-thl", NOON - timedelta(days=1)) is None


# --- cancellation and promotion ---------------------------------------------------------------


def cancel(state: DayState | None, rid: str, by: str | None = None, *, at: datetime = BEFORE, ended: Ended | None = None) -> object:
    return decide_cancellation(state, registration_id=rid, by=by or f"p-{rid}", at=at, ended=ended)


def test_a_cancellation_promotes_the_head_of_the_waitlist() -> None:
    state = day(10, confirmed("a", 4), confirmed("b", 6), waiting("c", 3, 1), waiting("d", 2, 2))
    assert cancel(state, "a") == [Confirm("c", "p-c", 3)]


def test_promotion_takes_everyone_who_fits_in_order() -> None:
    state = day(10, confirmed("a", 10), waiting("c", 3, 1), waiting("d", 2, 2), waiting("e", 4, 3))
    assert cancel(state, "a") == [Confirm("c", "p-c", 3), Confirm("d", "p-d", 2), Confirm("e", "p-e", 4)]


def test_promotion_stops_at_the_first_that_does_not_fit() -> None:
    state = day(10, confirmed("a", 3), confirmed("b", 7), waiting("c", 4, 1), waiting("d", 1, 2))
    assert cancel(state, "a") == []  # 3 free: "c" needs 4, so "d" waits behind it


def test_cancelling_the_blocking_head_lets_the_next_in() -> None:
    state = day(10, confirmed("a", 8), waiting("c", 4, 1), waiting("d", 2, 2))
    assert cancel(state, "c") == [Confirm("d", "p-d", 2)]


def test_promotion_skips_a_registration_that_can_never_fit() -> None:
    assert promotions(day(5, confirmed("a", 2), waiting("huge", 6, 1), waiting("d", 3, 2))) == [Confirm("d", "p-d", 3)]


def test_a_member_leaving_releases_its_seat_and_place_and_promotes_in_order() -> None:
    """Its live registrations are given up (a seat, a place on the waitlist: both count); the
    seats freed go to the head of the waitlist while it fits, never past it."""
    state = day(4, confirmed("a", 2, "leaver"), confirmed("b", 2), waiting("c", 3, 1), waiting("d", 1, 2, "leaver"), waiting("e", 1, 3))
    released, promoted = release(state, "leaver", BEFORE)
    assert [s.registration_id for s in released] == ["a", "d"]
    assert promoted == []  # the head needs 3 of the 2 seats freed: nobody overtakes it
    state = day(4, confirmed("a", 3, "leaver"), confirmed("b", 1), waiting("c", 2, 1), waiting("d", 1, 2), waiting("e", 1, 3))
    assert release(state, "leaver", BEFORE)[1] == [Confirm("c", "p-c", 2), Confirm("d", "p-d", 1)]


def test_a_larger_capacity_seats_the_waitlist_in_order_while_registration_is_open() -> None:
    state = day(3, confirmed("a", 3), waiting("b", 2, 1), waiting("c", 3, 2), waiting("d", 1, 3))
    assert moved_to_capacity(state, 6, BEFORE) == ([], [Confirm("b", "p-b", 2)])  # c needs 3 of the 1 left: d waits behind it
    assert moved_to_capacity(state, 9, BEFORE) == ([], [Confirm("b", "p-b", 2), Confirm("c", "p-c", 3), Confirm("d", "p-d", 1)])
    assert moved_to_capacity(state, 3, BEFORE) == moved_to_capacity(state, 9, DEADLINE) == ([], [])
    assert moved_to_capacity(day(3, confirmed("a", 3), waiting("b", 1, 1), status="cancelled"), 9, BEFORE) == ([], [])


def test_a_smaller_capacity_refuses_the_waitlisted_registrations_it_could_never_seat() -> None:
    state = day(6, confirmed("a", 3), waiting("b", 4, 1), waiting("c", 1, 2), waiting("d", 5, 3))
    never, seated = moved_to_capacity(state, 3, BEFORE)
    assert [seat.registration_id for seat in never] == ["b", "d"] and seated == []
    assert moved_to_capacity(state, 3, DEADLINE) == ([], [])


def test_a_capacity_below_the_confirmed_attendees_is_refused() -> None:
    state = day(6, confirmed("a", 3), confirmed("b", 1), waiting("c", 2, 1))
    refusal = capacity_refusal(state, 3)
    assert refusal is not None and refusal.code == "below_confirmed"
    assert capacity_refusal(state, 4) is None and capacity_refusal(state, 1_000) is None


def change(state: DayState, rid: str, attendees: int, *, by: str = "", at: datetime = BEFORE) -> object:
    return decide_change(state, registration_id=rid, by=by or f"p-{rid}", attendees=attendees, at=at)


def test_a_change_to_fewer_seats_the_waitlist_and_to_more_never_passes_it() -> None:
    state = day(5, confirmed("a", 4), waiting("b", 2, 1), waiting("c", 2, 2), waiting("d", 1, 3))
    assert change(state, "a", 3) == [Confirm("b", "p-b", 2)]  # c needs 2 of the none left: d waits behind it
    assert change(state, "a", 1) == [Confirm("b", "p-b", 2), Confirm("c", "p-c", 2)]
    assert isinstance(refused := change(state, "a", 5), Refuse) and refused.code == "no_room"  # a seat free, and the waitlist
    assert change(day(5, confirmed("a", 3)), "a", 5) == []  # free seats, nobody waiting
    assert isinstance(refused := change(day(5, confirmed("a", 3), confirmed("b", 1)), "a", 5), Refuse) and refused.code == "no_room"
    assert change(day(5, confirmed("a", 3), waiting("x", 9, 1)), "a", 5) == []  # one that never fits holds nobody up
    assert change(state, "c", 1) == []  # waiting, it keeps its place behind b
    assert change(state, "b", 1) == [Confirm("b", "p-b", 1)]  # the head now fits


def test_a_change_is_refused_as_a_cancellation_is_and_above_the_capacity() -> None:
    state = day(5, confirmed("a", 2), waiting("b", 4, 1))
    for decision, code in ((change(state, "a", 6), "exceeds_capacity"), (change(state, "a", 1, by="p-b"), "not_participant"),
                           (change(state, "zz", 1), "unknown_registration"), (change(state, "a", 1, at=DEADLINE), "after_deadline"),
                           (change(day(5, confirmed("a", 2), status="cancelled"), "a", 1), "day_cancelled")):
        assert isinstance(decision, Refuse) and decision.code == code, decision


def test_a_member_leaving_once_registration_closed_releases_nothing() -> None:
    for state, at in ((day(2, confirmed("a", 2, "leaver"), waiting("b", 1, 1)), DEADLINE),
                      (day(2, confirmed("a", 2, "leaver"), status="cancelled"), BEFORE),
                      (day(2, confirmed("a", 2, "leaver"), status="held"), BEFORE)):
        assert release(state, "leaver", at) == ([], [])
    assert release(day(2, confirmed("a", 2)), "leaver", BEFORE) == ([], [])  # it holds nothing


def test_cancellation_refusals() -> None:
    state = day(10, confirmed("a", 4))
    assert isinstance(refused := cancel(state, "zzz"), Refuse) and refused.code == "unknown_registration"
    assert isinstance(refused := cancel(None, "a"), Refuse) and refused.code == "unknown_registration"
    assert isinstance(refused := cancel(state, "a", by="someone-else"), Refuse) and refused.code == "not_participant"
    gone = Ended("b", "p-b", "cancelled")
    assert isinstance(refused := cancel(state, "b", ended=gone), Refuse) and refused.code == "already_cancelled"
    assert isinstance(refused := cancel(state, "b", by="someone-else", ended=gone), Refuse) and refused.code == "unknown_registration"
    refused = cancel(state, "b", ended=Ended("b", "p-b", "rejected"))
    assert isinstance(refused, Refuse) and refused.code == "unknown_registration" and "was refused" in refused.message
    with judged_by(2):  # a log applied before version 3 was answered that there is no such registration
        assert isinstance(refused := cancel(state, "b", ended=gone), Refuse) and refused.code == "unknown_registration"
    held = day(10, confirmed("a", 4), status="held")
    assert isinstance(refused := cancel(held, "a"), Refuse) and refused.code == "day_held" and "held" in refused.message
    assert isinstance(refused := cancel(state, "a", at=DEADLINE), Refuse) and refused.code == "after_deadline"
    cancelled = day(10, confirmed("a", 4), status="cancelled")
    assert isinstance(refused := cancel(cancelled, "a"), Refuse) and refused.code == "day_cancelled"


@settings(max_examples=100, deadline=None)
@given(capacity=st.integers(1, 12), sizes=st.lists(st.integers(1, 5), max_size=25), data=st.data())
def test_registrations_and_cancellations_keep_the_invariants(capacity: int, sizes: list[int], data: st.DataObject) -> None:
    """Pure model of the log: capacity holds, the waitlist keeps log order, its head never fits."""
    state = day(capacity)
    log_order: list[str] = []
    for n, size in enumerate(sizes):
        cancelling: bool = bool(state.seats) and data.draw(st.booleans(), label="cancel")
        if cancelling:
            victim = data.draw(st.sampled_from([s.registration_id for s in state.seats]))
            decision = cancel(state, victim, by=next(s.participant for s in state.seats if s.registration_id == victim))
            assert isinstance(decision, list)
            promoted = {c.registration_id for c in decision}
            seats = [s for s in state.seats if s.registration_id != victim]
        else:
            rid = f"r{n}"
            log_order.append(rid)
            decision = decide_registration(state, registration_id=rid, participant=f"p-{rid}", attendees=size, already_registered=False, at=BEFORE)
            if size > capacity:  # could never be seated
                assert isinstance(decision, Refuse) and decision.code == "exceeds_capacity"
                log_order.pop()
                continue
            assert isinstance(decision, (Confirm, Waitlist))
            promoted = set()
            seats = [*state.seats, Seat(rid, f"p-{rid}", size, "confirmed" if isinstance(decision, Confirm) else "waitlisted", getattr(decision, "position", None))]
        # apply: promoted leave the waitlist, the rest close up in order
        seats = [Seat(s.registration_id, s.participant, s.attendees, "confirmed") if s.registration_id in promoted else s for s in seats]
        queue = sorted((s for s in seats if s.status == "waitlisted"), key=lambda s: s.position or 0)
        renumbered = {s.registration_id: i for i, s in enumerate(queue, start=1)}
        seats = [Seat(s.registration_id, s.participant, s.attendees, s.status, renumbered.get(s.registration_id)) for s in seats]
        state = day(capacity, *seats)

        assert state.confirmed_attendees <= capacity
        queue_ids = [s.registration_id for s in state.waitlist]
        assert queue_ids == [r for r in log_order if r in set(queue_ids)]
        head = next((s for s in state.waitlist if state.fits_ever(s)), None)
        assert head is None or head.attendees > capacity - state.confirmed_attendees


# --- matchmaking ------------------------------------------------------------------------------


def test_shared_themes_count_a_whole_domain() -> None:
    assert shared_themes({"economy"}, {"economy.disadvantaged_groups", "education"}) == ("economy.disadvantaged_groups",)
    assert shared_themes({"health_care"}, {"health_care"}) == ("health_care",)
    assert shared_themes({"economy.income_inequality"}, {"economy.disadvantaged_groups"}) == ()


def test_slots_fit_between_start_and_end() -> None:
    assert slots(NOON, NOON + timedelta(minutes=50)) == [NOON, NOON + timedelta(minutes=20)]


def candidate(rid: str, role: str, themes: set[str], order: int, participant: str = "", project: str | None = None) -> Candidate:
    return Candidate(rid, participant or rid, role, frozenset(themes), order, project)  # type: ignore[arg-type]


def test_meetings_pair_innovators_and_funders_sharing_a_theme() -> None:
    candidates = [
        candidate("mersin", "innovator", {"economy.disadvantaged_groups", "health_care"}, 0, project="kitchens"),
        candidate("genc-isi", "innovator", {"education.lifelong_learning"}, 1),
        candidate("esf", "funder", {"economy", "education.lifelong_learning"}, 2),
        candidate("observer", "innovator", {"environment_urbanisation"}, 3),
    ]
    meetings = propose_meetings(candidates, starts_at=NOON, ends_at=NOON + timedelta(hours=1))
    assert [(m.innovator, m.funder, m.project_id, m.slot_start, m.shared_themes) for m in meetings] == [
        ("mersin", "esf", "kitchens", NOON, ("economy.disadvantaged_groups",)),
        ("genc-isi", "esf", None, NOON + timedelta(minutes=20), ("education.lifelong_learning",)),
    ]


def test_a_funder_gets_at_most_n_meetings_and_more_shared_themes_go_first() -> None:
    innovators = [candidate(f"i{n}", "innovator", {"health_care"}, n) for n in range(4)]
    best = candidate("i9", "innovator", {"health_care", "economy"}, 9)
    funder = candidate("f", "funder", {"health_care", "economy"}, 10)
    meetings = propose_meetings([*innovators, best, funder], starts_at=NOON, ends_at=NOON + timedelta(hours=3), per_funder=2)
    assert [m.innovator for m in meetings] == ["i9", "i0"]


def test_pairs_whose_own_themes_meet_go_before_those_met_through_the_day_s_themes() -> None:
    """A funder and an innovator who named no interests both take the day's themes, and share all
    of them: they came before a pair whose own interests meet on one, and took the funder's only
    meeting. Now what both named goes first, then what one named, then the day's themes alone."""
    day = {"health_care", "education", "migration_population"}
    silent = Candidate("silent", "silent", "innovator", frozenset(day), 0, stated=False)
    named = candidate("named", "innovator", {"health_care"}, 1)
    funder = candidate("f", "funder", {"health_care"}, 2)
    open_funder = Candidate("open", "open", "funder", frozenset(day), 3, stated=False)
    meetings = propose_meetings([silent, named, funder, open_funder], starts_at=NOON, ends_at=NOON + timedelta(hours=1), per_funder=1)
    # Both named health care; then the innovator named it and the funder took the day's themes;
    # the pairs of the innovator who named nothing come last, and both funders have their meeting.
    assert [(m.innovator, m.funder, m.shared_themes) for m in meetings] == [
        ("named", "f", ("health_care",)),
        ("named", "open", ("health_care",)),
    ]
    # Alone with the silent funder, it is met through the day's themes.
    alone = propose_meetings([silent, open_funder], starts_at=NOON, ends_at=NOON + timedelta(hours=1), per_funder=1)
    assert [(m.innovator, m.funder, m.shared_themes) for m in alone] == [("silent", "open", tuple(sorted(day)))]


def test_nobody_is_double_booked_when_slots_run_out() -> None:
    candidates = [candidate("i", "innovator", {"health_care"}, 0), candidate("f1", "funder", {"health_care"}, 1), candidate("f2", "funder", {"health_care"}, 2)]
    meetings = propose_meetings(candidates, starts_at=NOON, ends_at=NOON + timedelta(minutes=20))
    assert [(m.innovator, m.funder) for m in meetings] == [("i", "f1")]


def test_an_institution_does_not_meet_itself() -> None:
    candidates = [candidate("a", "innovator", {"health_care"}, 0, participant="x"), candidate("b", "funder", {"health_care"}, 1, participant="x")]
    assert propose_meetings(candidates, starts_at=NOON, ends_at=NOON + timedelta(hours=1)) == []


THEMES = ["health_care", "health_care.elderly_care", "economy", "economy.disadvantaged_groups", "education", "migration_population.ageing"]


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    institutions = [f"inst-{n}" for n in range(draw(st.integers(1, 8)))]
    count = draw(st.integers(0, 16))
    return [
        Candidate(
            registration_id=f"r{n}",
            participant=draw(st.sampled_from(institutions)),
            role=draw(st.sampled_from(["innovator", "funder"])),
            themes=frozenset(draw(st.sets(st.sampled_from(THEMES), max_size=3))),
            order=n,
            project_id=draw(st.none() | st.sampled_from(["p1", "p2"])),
            stated=draw(st.booleans()),
        )
        for n in range(count)
    ]


@settings(max_examples=100, deadline=None)
@given(candidates=candidate_lists(), per_funder=st.integers(0, 4), minutes=st.integers(0, 200), seed=st.integers(0, 1000))
def test_matchmaking_properties(candidates: list[Candidate], per_funder: int, minutes: int, seed: int) -> None:
    ends_at = NOON + timedelta(minutes=minutes)
    meetings = propose_meetings(candidates, starts_at=NOON, ends_at=ends_at, per_funder=per_funder)
    themes_of: dict[tuple[str, str], set[str]] = {}
    for c in candidates:
        themes_of.setdefault((c.participant, c.role), set()).update(c.themes)
    funders_count: dict[str, int] = {}
    booked: set[tuple[str, datetime]] = set()
    for m in meetings:
        funders_count[m.funder] = funders_count.get(m.funder, 0) + 1
        assert m.innovator != m.funder
        assert m.shared_themes and set(m.shared_themes) <= themes_of[(m.innovator, "innovator")] | themes_of[(m.funder, "funder")]
        assert shared_themes(themes_of[(m.innovator, "innovator")], themes_of[(m.funder, "funder")])
        assert NOON <= m.slot_start and m.slot_start + timedelta(minutes=20) <= ends_at
        for who in (m.innovator, m.funder):
            assert (who, m.slot_start) not in booked
            booked.add((who, m.slot_start))
    assert all(n <= per_funder for n in funders_count.values())
    # deterministic, whatever order the candidates come in
    shuffled = list(candidates)
    random.Random(seed).shuffle(shuffled)
    assert propose_meetings(shuffled, starts_at=NOON, ends_at=ends_at, per_funder=per_funder) == meetings
