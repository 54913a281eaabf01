"""Innovation days — gatherings, their registrations, waitlist and matchmaking — as read model and
workflow.

The deciders load a :class:`~handlers.rules.innovation_days.DayState`, let the pure rules decide
and emit the answers in the organiser's name; the projections apply the facts. Every derived
event carries what its projection needs (a waitlist position, a promotion), so a rebuild from the
log gives the same state. Waitlist positions close up in the projections whenever a registration
leaves the waitlist: they follow from the order of the events, so no renumbering event is needed.

The organiser's own events (`scheduled`, `rescheduled`, `cancelled`, `held`) and a participant's
cancellation are refused by an `innovation_day.action_rejected` when they cannot stand (another's
day or registration, a day no longer scheduled, registration closed); the projections apply only
what stands. `innovation_day.registration_rejected` answers a registration request alone.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, cast

import sqlalchemy as sa
from sqlalchemy import JSON, Column
from sqlmodel import Field, Session, col, select

from handlers.institutions import leaving
from handlers.network import Context, Decider, Event, Projection, Reads, Timer, named, named_in
from handlers.projects import parties as project_parties
from handlers.rows import TableRow
from handlers.rules import Refusal, since
from handlers.rules import innovation_days as rules
from handlers.session import children
from handlers.words import trigram_index, words
from schemas.innovation_days import (
    InnovationDayCancelled,
    InnovationDayHeld,
    InnovationDayRescheduled,
    InnovationDayScheduled,
    MeetingsProposed,
    RegistrationCancelled,
    RegistrationChanged,
    RegistrationConfirmed,
    RegistrationRejected,
    RegistrationRequested,
    RegistrationWaitlisted,
)

__all__ = [
    "DECIDERS",
    "PROJECTIONS",
    "TIMERS",
    "InnovationDay",
    "ProposedMeetingRow",
    "Registration",
    "day_view",
    "days_of",
    "meetings",
    "meetings_of",
    "propose_meetings",
    "registrations",
]

LIVE = ("confirmed", "waitlisted")


def _utc(moment: datetime) -> datetime:
    """Aware UTC; SQLite hands timestamps back naive (they are stored in UTC)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _utc_or_none(moment: datetime | None) -> datetime | None:
    return None if moment is None else _utc(moment)


def _timestamp(nullable: bool = False) -> Any:
    return Field(default=None, sa_column=Column(sa.DateTime(timezone=True), nullable=nullable))


def _json(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSON, nullable=nullable))


# --- tables -----------------------------------------------------------------------------------


class InnovationDay(TableRow, table=True):
    """A gathering as the catalog describes it, with its status and matchmaking mark."""

    __tablename__ = "innovation_days"
    __table_args__ = (trigram_index("innovation_days"),)

    day_id: str = Field(primary_key=True, max_length=128)
    organizer: str = Field(index=True, max_length=63)
    """The source of `innovation_day.scheduled`: the only one who may change the day."""
    title: dict[str, str] = _json(nullable=False)
    summary: dict[str, str] | None = _json()
    format: str = Field(max_length=32)
    starts_at: datetime = _timestamp()
    ends_at: datetime = _timestamp()
    attendance_mode: str = Field(max_length=16)
    venue: dict[str, Any] | None = _json()
    online_url: str | None = Field(default=None, max_length=2048)
    capacity: int
    registration_deadline: datetime = _timestamp()
    themes: list[str] = _json(nullable=False)
    languages: list[str] = _json(nullable=False)
    status: str = Field(default="scheduled", index=True, max_length=16)
    cancelled_reason: dict[str, str] | None = _json()
    held_attendees: int | None = None
    held_summary: dict[str, str] | None = _json()
    meetings_proposed_at: datetime | None = _timestamp(nullable=True)
    revision: int = Field(default=0, sa_column_kwargs={"server_default": "0"})
    """How often the organiser changed the day (moved, cancelled, held): the calendar's SEQUENCE."""
    words: str = Field(default="", exclude=True, sa_column=Column(sa.Text, nullable=False, server_default=""))
    """The title and summary as a search (``?q=``) reads them (:mod:`handlers.words`); no resource shows them."""


class Registration(TableRow, table=True):
    """A registration to a gathering. A request refused outright is kept with its reason, and
    with the role, attendees and project it asked for as its rejection repeats them (unknown,
    null, for a rejection logged before they did)."""

    __tablename__ = "innovation_day_registrations"

    registration_id: str = Field(primary_key=True, max_length=128)
    day_id: str = Field(index=True, max_length=128)
    participant: str = Field(max_length=63)
    role: str | None = Field(default=None, max_length=16)
    attendees: int | None = None
    project_id: str | None = Field(default=None, max_length=128)
    interests: list[str] = _json(nullable=False)
    status: str = Field(max_length=16)
    """`requested` (until the workflow's answer is applied), `confirmed`, `waitlisted`,
    `rejected` or `cancelled`."""
    waitlist_position: int | None = None
    reason: dict[str, Any] | None = _json()
    requested_seq: int | None = Field(default=None, index=True)
    """The request's position in the log: the order of the waitlist and of matchmaking."""
    requested_at: datetime = _timestamp()
    decided_at: datetime | None = _timestamp(nullable=True)


class ProposedMeetingRow(TableRow, table=True):
    """One meeting proposed by the matchmaking. A funder is never double-booked, so the day, the
    slot and the funder name it (no surrogate id, so a rebuild gives identical rows)."""

    __tablename__ = "innovation_day_meetings"

    day_id: str = Field(primary_key=True, max_length=128)
    slot_start: datetime = Field(sa_column=Column(sa.DateTime(timezone=True), primary_key=True))
    funder: str = Field(primary_key=True, max_length=63)
    innovator: str = Field(max_length=63)
    project_id: str | None = Field(default=None, max_length=128)
    shared_themes: list[str] = _json(nullable=False)


# --- state snapshots --------------------------------------------------------------------------


def _registrations(session: Session, day_id: str, statuses: Sequence[str]) -> list[Registration]:
    """The day's registrations in one of ``statuses``, in the order they were requested."""
    rows = [r for r in children(session, Registration, "day_id", day_id) if r.status in statuses]
    return sorted(rows, key=_request_order)


def _request_order(r: Registration) -> tuple[Any, ...]:
    """Log order; a registration not requested through the log (a refusal kept with its reason)
    has no sequence and goes last, by time."""
    if r.requested_seq is not None:
        return (False, r.requested_seq)
    return (True, 0, _utc(r.requested_at), r.registration_id)


def _day_state(session: Session, day_id: str) -> rules.DayState | None:
    day = session.get(InnovationDay, day_id)
    if day is None:
        return None
    rows = _registrations(session, day_id, LIVE)
    seats = tuple(
        rules.Seat(r.registration_id, r.participant, r.attendees or 1, r.status, r.waitlist_position)  # type: ignore[arg-type]
        for r in rows
    )
    return rules.DayState(
        day.day_id,
        day.organizer,
        day.status,  # type: ignore[arg-type]
        day.capacity,
        _utc(day.registration_deadline),
        seats,
    )


def _answerer(session: Session, day_id: str, fallback: str) -> str:
    """In whose name the workflow answers: the organiser, or — for an unknown day, which has
    none — the institution that asked."""
    day = session.get(InnovationDay, day_id)
    return day.organizer if day is not None else fallback


# --- deciders ---------------------------------------------------------------------------------


def _refuse(
    ctx: Context, refusal: rules.Refuse, *, day_id: str, registration_id: str, participant: str | None, **asked: Any
) -> None:
    """Refuse the current registration request (or, judged by rules before version 2, a
    cancellation); ``asked``: what a refused request asked for (its role, attendees, project),
    repeated in the rejection."""
    assert ctx.event is not None
    ctx.refuse(
        "innovation_day.registration_rejected",
        RegistrationRejected.model_validate(
            {
                "day_id": day_id,
                "registration_id": registration_id,
                **({"participant": participant} if participant else {}),
                "reason": {"code": refusal.code, "message": {"en": refusal.message}},
                **{key: value for key, value in asked.items() if value is not None},
            }
        ),
        source=_answerer(ctx.session, day_id, ctx.event.source),
    )


def decide_day_action(ctx: Context) -> None:
    """An organiser's event about a day (announced, moved, cancelled, held): refused, in the
    organiser's name, when the rules say so (it used to pass silently, changing nothing while
    the log and webhooks carried it as if it had)."""
    event = ctx.event
    assert event is not None
    data = event.data
    day = ctx.session.get(InnovationDay, data.day_id)
    facts = None if day is None else rules.DayFacts(day.organizer, cast(rules.DayStatus, day.status), _utc(day.starts_at))
    refusal = rules.day_action_refusal(facts, event.type.removeprefix("innovation_day."), event.source, _utc(event.logged_at))
    if refusal is None and day is not None and event.type == "innovation_day.rescheduled" and data.capacity is not None and since(5):
        state = _day_state(ctx.session, day.day_id)
        assert state is not None
        refusal = rules.capacity_refusal(state, data.capacity)
    if refusal is None:
        return
    ctx.refuse_action(refusal, source=day.organizer if day is not None else event.source)


def _confirm(ctx: Context, day_id: str, organizer: str, confirm: rules.Confirm) -> None:
    ctx.emit(
        "innovation_day.registration_confirmed",
        RegistrationConfirmed(
            day_id=day_id,
            registration_id=confirm.registration_id,
            participant=confirm.participant,
            attendees=confirm.attendees,
        ),
        source=organizer,
        key=confirm.registration_id,
    )


def decide_registration(ctx: Context) -> None:
    """Confirm, waitlist or reject a registration request."""
    assert ctx.event is not None
    data: RegistrationRequested = ctx.event.data
    day = _day_state(ctx.session, data.day_id)
    decision = rules.decide_registration(
        day,
        registration_id=data.registration_id,
        participant=data.participant,
        attendees=data.attendees,
        already_registered=ctx.session.get(Registration, data.registration_id) is not None,
        at=_utc(ctx.event.logged_at),
        project_id=data.project_id,
        project=None if data.project_id is None else project_parties(ctx.session, data.project_id),
    )
    if isinstance(decision, rules.Refuse):
        _refuse(ctx, decision, day_id=data.day_id, registration_id=data.registration_id, participant=data.participant,
                role=data.role, attendees=data.attendees, project_id=data.project_id)
    elif isinstance(decision, rules.Confirm):
        assert day is not None
        _confirm(ctx, data.day_id, day.organizer, decision)
    else:
        assert day is not None
        ctx.emit(
            "innovation_day.registration_waitlisted",
            RegistrationWaitlisted(
                day_id=data.day_id,
                registration_id=decision.registration_id,
                position=decision.position,
                participant=decision.participant,
            ),
            source=day.organizer,
            key=decision.registration_id,
        )


def _ended(session: Session, day_id: str, registration_id: str) -> rules.Ended | None:
    """The day's registration of that id if it is cancelled or refused (among the day's
    registrations the state was read from: no query, no flush of the batch)."""
    found = next((r for r in children(session, Registration, "day_id", day_id) if r.registration_id == registration_id), None)
    if found is None or found.status not in ("cancelled", "rejected"):
        return None
    return rules.Ended(found.registration_id, found.participant, cast(Any, found.status))


def decide_cancellation(ctx: Context) -> None:
    """Refuse a cancellation, or promote the waitlisted registrations it makes room for.

    A refused cancellation is answered as the refusal of the cancellation, naming who tried and
    the registration (``innovation_day.action_rejected``): a ``registration_rejected`` of the
    registration it named told every member, its participant too, that a registration which
    stands was rejected. A log judged by rules before version 2 answered so, and is rebuilt so."""
    assert ctx.event is not None
    data: RegistrationCancelled = ctx.event.data
    day = _day_state(ctx.session, data.day_id)
    decision = rules.decide_cancellation(
        day, registration_id=data.registration_id, by=ctx.event.source, at=_utc(ctx.event.logged_at),
        ended=None if day is None or any(s.registration_id == data.registration_id for s in day.seats)
        else _ended(ctx.session, data.day_id, data.registration_id),
    )
    if isinstance(decision, rules.Refuse):
        if since(2):
            answerer = _answerer(ctx.session, data.day_id, ctx.event.source)
            ctx.refuse_action(Refusal(decision.code, decision.message), source=answerer, registration_id=data.registration_id)
            return
        registration = ctx.session.get(Registration, data.registration_id)
        participant = registration.participant if registration is not None else None
        _refuse(ctx, decision, day_id=data.day_id, registration_id=data.registration_id, participant=participant)
        return
    assert day is not None
    for promoted in decision:
        _confirm(ctx, data.day_id, day.organizer, promoted)


def release_departed_member(ctx: Context) -> None:
    """A member leaves the network (``institution.left``): its registrations for the gatherings
    still taking them are released, each told so in the organiser's name
    (``registration_rejected``, ``member_left``), and each day's waitlist is promoted into the
    seats freed, in order, as after a cancellation. (A former member cannot cancel: the gate takes
    nothing from it, and its seats stayed taken with the waitlist waiting behind them.) A day
    whose registration closed keeps its registrations, as its meetings stand: nobody could take a
    seat freed then. A rule of version 5: a log applied before left them."""
    gone = leaving(ctx, 5)
    if gone is None:
        return
    member, at = gone.member, gone.at
    for day_id in _days_registered_for(ctx.session, gone.envelope):
        day = _day_state(ctx.session, day_id)
        if day is None:
            continue
        released, promoted = rules.release(day, member, at)
        for seat in released:
            registration = ctx.session.get(Registration, seat.registration_id)
            assert registration is not None
            held_as = (f"its {seat.attendees} seat{'s go' if seat.attendees != 1 else ' goes'} to the waitlist"
                       if seat.status == "confirmed" else f"it leaves the waitlist, where it was number {seat.position}")
            _release(ctx, day.organizer, registration, "member_left",
                     f"{member} left the network on {at:%Y-%m-%d}: its registration is released and {held_as}",
                     key=f"{seat.registration_id} member_left")
        for confirm in promoted:
            _confirm(ctx, day_id, day.organizer, confirm)


def cancel_days_of_departed_organiser(ctx: Context) -> None:
    """A member leaves the network (``institution.left``): the gatherings it organises that have
    not begun are called off, in its name (``innovation_day.cancelled``, the reason saying it
    left), and their meetings withdrawn as for any cancellation. Nobody is left to move, cancel
    or report them (the gate takes nothing from a former member): they went on taking
    registrations, and matchmaking ran, for a gathering nobody would hold. One that has begun
    stands as it is. A rule of version 6: a log applied before left them scheduled."""
    gone = leaving(ctx, 6)
    if gone is None:
        return
    member, at = gone.member, gone.at
    for day_id in _days_organised_by(ctx.session, gone.envelope):
        day = ctx.session.get(InnovationDay, day_id)
        if day is None or _utc(day.starts_at) <= at:
            continue  # (begun: it stands as it is)
        reason = {"en": f"{member}, its organiser, left the network on {at:%Y-%m-%d}: the gathering is called off"}
        ctx.emit("innovation_day.cancelled", {"day_id": day_id, "reason": reason}, source=member, key=f"{day_id} member_left")
        _withdraw_meetings(ctx, day)  # (an event derived is applied, not decided on: withdrawn here, as its decider would)


def decide_change(ctx: Context) -> None:
    """Refuse a change of a registration's attendees (an ``innovation_day.action_rejected``
    naming who tried and the registration, which stands as it was), or seat the waitlisted
    registrations the seats it frees let in (:func:`handlers.rules.innovation_days.decide_change`)."""
    assert ctx.event is not None
    data: RegistrationChanged = ctx.event.data
    day = _day_state(ctx.session, data.day_id)
    decision = rules.decide_change(
        day, registration_id=data.registration_id, by=ctx.event.source, attendees=data.attendees, at=_utc(ctx.event.logged_at),
        ended=None if day is None or any(s.registration_id == data.registration_id for s in day.seats)
        else _ended(ctx.session, data.day_id, data.registration_id),
    )
    if isinstance(decision, rules.Refuse):
        answerer = _answerer(ctx.session, data.day_id, ctx.event.source)
        ctx.refuse_action(Refusal(decision.code, decision.message), source=answerer, registration_id=data.registration_id)
        return
    assert day is not None
    for promoted in decision:
        _confirm(ctx, data.day_id, day.organizer, promoted)


# --- matchmaking (timer) ----------------------------------------------------------------------


def _project_themes(session: Session, project_ids: set[str]) -> dict[str, list[str]]:
    """Themes of the given projects, read from the projects read model when it is there."""
    if not project_ids or not sa.inspect(session.connection()).has_table("projects"):
        return {}
    rows = session.connection().execute(
        sa.text("SELECT project_id, themes FROM projects WHERE project_id IN :ids").bindparams(
            sa.bindparam("ids", expanding=True)
        ),
        {"ids": sorted(project_ids)},
    )
    themes: dict[str, list[str]] = {}
    for project_id, value in rows:
        if isinstance(value, str):  # SQLite hands raw JSON text to a textual query
            value = json.loads(value)
        themes[project_id] = list(value or [])
    return themes


def _candidates(session: Session, day: InnovationDay) -> list[rules.Candidate]:
    """The confirmed innovators and funders with the themes they bring: their interests, an
    innovator's project's themes, or — when that leaves nothing — the day's themes."""
    rows = session.exec(
        select(Registration).where(
            Registration.day_id == day.day_id,
            Registration.status == "confirmed",
            col(Registration.role).in_(("innovator", "funder")),
        )
    ).all()
    rows = sorted(rows, key=lambda r: (r.requested_seq is None, r.requested_seq or 0, _utc(r.requested_at), r.registration_id))
    projects = _project_themes(session, {r.project_id for r in rows if r.project_id and r.role == "innovator"})
    candidates = []
    for order, row in enumerate(rows):
        themes = set(row.interests or [])
        if row.role == "innovator" and row.project_id:
            themes |= set(projects.get(row.project_id, []))
        candidates.append(
            rules.Candidate(
                registration_id=row.registration_id,
                participant=row.participant,
                role=row.role,  # type: ignore[arg-type]
                themes=frozenset(themes or day.themes),
                order=order,
                project_id=row.project_id if row.role == "innovator" else None,
                stated=bool(themes),
            )
        )
    return candidates


def propose_meetings(ctx: Context) -> None:
    """Timer: once per day whose registration deadline has come (and which is neither cancelled
    nor held), propose the meetings; ``meetings_proposed_at`` marks it done. A proposal made
    before the deadline (a move after matchmaking that opened registration again withdrew the
    meetings) does not count: the day gets its meetings when its new deadline comes."""
    now = _utc(ctx.now)
    proposed_at = col(InnovationDay.meetings_proposed_at)
    deadline_at = col(InnovationDay.registration_deadline)
    # Only the days whose deadline has come are read: the timer runs every second, and the days
    # still open for registration are most of the scheduled ones.
    days = ctx.session.exec(
        select(InnovationDay)
        .where(
            InnovationDay.status == "scheduled",
            deadline_at <= now,
            sa.or_(proposed_at.is_(None), proposed_at < deadline_at),
        )
        .order_by(col(InnovationDay.day_id))
    ).all()
    for day in days:
        deadline = _utc(day.registration_deadline)
        # A timer's events are told apart by their key: the day's first proposal has the day's id
        # (as it always had), one after registration was opened again also names its deadline.
        key = day.day_id if day.meetings_proposed_at is None else f"{day.day_id} {deadline.isoformat()}"
        _close_waitlist(ctx, day, deadline)
        _propose(ctx, day, starts_at=_utc(day.starts_at), ends_at=_utc(day.ends_at), key=key)


def _close_waitlist(ctx: Context, day: InnovationDay, deadline: datetime) -> None:
    """At the registration deadline nothing is taken any more, cancellations neither: a
    registration still waiting will not be seated. Each is told so, in the organiser's name
    (``registration_rejected``, ``waitlist_closed``), so that its participant does not wait for a
    seat until the day (it stayed ``waitlisted`` for good)."""
    waiting = sorted(_registrations(ctx.session, day.day_id, ("waitlisted",)), key=lambda r: r.waitlist_position or 0)
    for registration in waiting:
        message = (f"registration closed at {deadline.isoformat()} with the gathering full: no seat came free for this "
                   f"registration, number {registration.waitlist_position} of the waitlist")
        _release(ctx, day.organizer, registration, "waitlist_closed", message,
                 key=f"{registration.registration_id} waitlist_closed {deadline.isoformat()}")


def _release(ctx: Context, organizer: str, registration: Registration, code: str, message: str, *, key: str) -> None:
    """Refuse a registration that stood (confirmed or waiting) for ``code``'s reason, one of
    :data:`_RELEASES`, in the organiser's name (``registration_rejected``), repeating what it
    asked for."""
    ctx.emit(
        "innovation_day.registration_rejected",
        RegistrationRejected.model_validate({
            "day_id": registration.day_id, "registration_id": registration.registration_id, "participant": registration.participant,
            "reason": {"code": code, "message": {"en": message}}, "role": registration.role, "attendees": registration.attendees,
            **({"project_id": registration.project_id} if registration.project_id else {}),
        }),
        source=organizer,
        key=key,
    )


def rematch_moved_day(ctx: Context) -> None:
    """A day moved after its meetings were proposed: the meetings were at the old times. They
    are proposed again for the new times, among the same confirmed participants, when the
    registration deadline stays passed; when the move opens registration again (a later
    deadline), they are withdrawn (an empty proposal) and proposed at the new deadline."""
    event = ctx.event
    assert event is not None
    if ctx.refused:
        return
    data: InnovationDayRescheduled = event.data
    day = ctx.session.get(InnovationDay, data.day_id)
    if day is None or day.status != "scheduled" or day.meetings_proposed_at is None:
        return
    reopened = _moved_deadline(day, data) > _utc(ctx.now)
    _propose(ctx, day, starts_at=_utc(data.starts_at), ends_at=_utc(data.ends_at), key=day.day_id,
             candidates=[] if reopened else None)


def reopen_waitlist(ctx: Context) -> None:
    """A day moved so that registration opens again after its waitlist closed at the old deadline
    (:func:`_close_waitlist`): the registrations told then that no seat came free are back on the
    waitlist, in the order they waited, each told so in the organiser's name
    (``registration_waitlisted``), as they would have stayed had the day been moved before its
    deadline: a seat freed is theirs before a newcomer's, and a participant that no longer comes
    cancels. (One whose participant holds another live registration for the day stays refused.)
    Nothing is promoted: no seat came free since the deadline (cancellations were closed). A rule
    of version 4: a log applied before left them refused."""
    event = ctx.event
    assert event is not None
    if ctx.refused or not since(4):
        return
    data: InnovationDayRescheduled = event.data
    day = ctx.session.get(InnovationDay, data.day_id)
    if day is None or day.status != "scheduled" or _moved_deadline(day, data) <= _utc(ctx.now):
        return
    closed = [r for r in _registrations(ctx.session, day.day_id, ("rejected",)) if (r.reason or {}).get("code") == "waitlist_closed"]
    live = _registrations(ctx.session, day.day_id, LIVE)
    holding = {r.participant for r in live}
    position = sum(1 for r in live if r.status == "waitlisted")
    for registration in closed:
        if registration.participant in holding:
            continue
        holding.add(registration.participant)
        position += 1
        ctx.emit(
            "innovation_day.registration_waitlisted",
            RegistrationWaitlisted(day_id=day.day_id, registration_id=registration.registration_id, position=position,
                                   participant=registration.participant),
            source=day.organizer,
            key=registration.registration_id,
        )


def resize_day(ctx: Context) -> None:
    """A move to another capacity, while registration is open (by the day's deadline as moved),
    the registrations the move put back on the waitlist (:func:`reopen_waitlist`) included: a
    waitlisted registration bringing more attendees than a smaller capacity is refused, in the
    organiser's name (``registration_rejected``, ``capacity_reduced``: it could never be seated,
    and those behind it would pass it); a larger capacity seats the waitlist from its head while it
    fits, each confirmed in the organiser's name, as after a cancellation. (A capacity below the
    attendees confirmed is refused: :func:`decide_day_action`.) A rule of version 5."""
    event = ctx.event
    assert event is not None
    data: InnovationDayRescheduled = event.data
    if ctx.refused or not since(5) or data.capacity is None:
        return
    day = ctx.session.get(InnovationDay, data.day_id)
    state = _day_state(ctx.session, data.day_id)
    if day is None or state is None or day.status != "scheduled":
        return
    back = []
    for derived in ctx.derived:  # (put back on the waitlist by this move)
        if derived.type == "innovation_day.registration_waitlisted" and derived.data.day_id == day.day_id:
            registration = ctx.session.get(Registration, derived.data.registration_id)
            assert registration is not None
            back.append(rules.Seat(registration.registration_id, registration.participant, registration.attendees or 1,
                                   "waitlisted", derived.data.position))
    moved = rules.DayState(state.day_id, state.organizer, state.status, state.capacity, _moved_deadline(day, data),
                           (*state.seats, *back))
    never, seated = rules.moved_to_capacity(moved, data.capacity, _utc(event.logged_at))
    for seat in never:
        registration = ctx.session.get(Registration, seat.registration_id)
        assert registration is not None
        message = (f"the gathering moved to a capacity of {data.capacity}: the {seat.attendees} attendees of this registration, "
                   f"number {seat.position} of the waitlist, can never be seated")
        _release(ctx, day.organizer, registration, "capacity_reduced", message, key=f"{seat.registration_id} capacity_reduced")
    for confirm in seated:
        _confirm(ctx, day.day_id, day.organizer, confirm)


def withdraw_meetings_of_cancelled_day(ctx: Context) -> None:
    """A day cancelled after its meetings were proposed: they are withdrawn by an empty proposal,
    as when a move opens registration again, so that whoever follows the meetings hears of it."""
    event = ctx.event
    assert event is not None
    if ctx.refused:
        return
    day = ctx.session.get(InnovationDay, event.data.day_id)
    if day is not None and day.status == "scheduled":
        _withdraw_meetings(ctx, day)


def _withdraw_meetings(ctx: Context, day: InnovationDay) -> None:
    """The day's proposed meetings, if any, withdrawn by an empty proposal in its organiser's name."""
    if day.meetings_proposed_at is not None:
        _propose(ctx, day, starts_at=_utc(day.starts_at), ends_at=_utc(day.ends_at), key=day.day_id, candidates=[])


def _propose(
    ctx: Context,
    day: InnovationDay,
    *,
    starts_at: datetime,
    ends_at: datetime,
    key: str,
    candidates: list[rules.Candidate] | None = None,
) -> None:
    """Emit the day's ``meetings_proposed``: the matchmaking over its confirmed innovators and
    funders (or over ``candidates``) in the window ``starts_at``–``ends_at``."""
    proposed = rules.propose_meetings(
        _candidates(ctx.session, day) if candidates is None else candidates, starts_at=starts_at, ends_at=ends_at
    )
    ctx.emit(
        "innovation_day.meetings_proposed",
        MeetingsProposed.model_validate(
            {
                "day_id": day.day_id,
                "meetings": [
                    {
                        "innovator": m.innovator,
                        "funder": m.funder,
                        **({"project_id": m.project_id} if m.project_id else {}),
                        "slot_start": m.slot_start,
                        "shared_themes": list(m.shared_themes),
                    }
                    for m in proposed
                ],
            }
        ),
        source=day.organizer,
        key=key,
    )


# --- projections ------------------------------------------------------------------------------


def _organised_day(session: Session, event: Event[Any], *, statuses: Sequence[str] = ("scheduled",)) -> InnovationDay | None:
    """The day an organiser-only event is about, if its source is the organiser and the day is
    in one of ``statuses``; otherwise None (the event has no effect)."""
    day = session.get(InnovationDay, event.data.day_id)
    if day is None or day.organizer != event.source or day.status not in statuses:
        return None
    return day


def on_scheduled(session: Session, event: Event[InnovationDayScheduled]) -> None:
    data = event.data
    if session.get(InnovationDay, data.day_id) is not None:
        return  # a day id is announced once; the first announcement stands
    session.add(
        InnovationDay(
            day_id=data.day_id,
            organizer=event.source,
            title=dict(data.title),
            summary=dict(data.summary) if data.summary else None,
            format=data.format,
            starts_at=_utc(data.starts_at),
            ends_at=_utc(data.ends_at),
            attendance_mode=data.attendance_mode,
            venue=data.venue.model_dump(mode="json", exclude_none=True) if data.venue else None,
            online_url=data.online_url,
            capacity=data.capacity,
            registration_deadline=_utc(data.registration_deadline),
            themes=list(data.themes),
            languages=list(data.languages),
            status="scheduled",
            words=words(data.title, data.summary),
        )
    )


def _moved_deadline(day: InnovationDay, moved: InnovationDayRescheduled) -> datetime:
    """A moved day's registration deadline: the one given, else the one it had, but never after
    the new start."""
    return min(_utc(moved.registration_deadline or day.registration_deadline), _utc(moved.starts_at))


def on_rescheduled(session: Session, event: Event[InnovationDayRescheduled]) -> None:
    """Move the day (:func:`_moved_deadline`), to its new capacity if it has one."""
    day = _organised_day(session, event)
    if day is None:
        return
    data = event.data
    day.registration_deadline = _moved_deadline(day, data)
    day.starts_at = _utc(data.starts_at)
    day.ends_at = _utc(data.ends_at)
    if data.capacity is not None:
        day.capacity = data.capacity
    day.revision += 1
    session.add(day)


def on_cancelled(session: Session, event: Event[InnovationDayCancelled]) -> None:
    day = _organised_day(session, event)
    if day is None:
        return
    day.status = "cancelled"
    day.cancelled_reason = dict(event.data.reason)
    day.revision += 1
    session.add(day)


def on_held(session: Session, event: Event[InnovationDayHeld]) -> None:
    day = _organised_day(session, event)
    if day is None:
        return
    day.status = "held"
    day.held_attendees = event.data.attendees
    day.held_summary = dict(event.data.summary) if event.data.summary else None
    day.revision += 1
    session.add(day)


def on_registration_requested(session: Session, event: Event[RegistrationRequested]) -> None:
    """Record the request; the workflow's answer (applied right after) sets its status."""
    data = event.data
    if session.get(Registration, data.registration_id) is not None:
        return
    seq = event.seq
    if seq is None:  # not from the log (a test applying events by hand): after everything else
        seq = (session.exec(select(sa.func.max(Registration.requested_seq))).one() or 0) + 1
    session.add(
        Registration(
            registration_id=data.registration_id,
            day_id=data.day_id,
            participant=data.participant,
            role=data.role,
            attendees=data.attendees,
            project_id=data.project_id,
            interests=list(data.interests),
            status="requested",
            requested_seq=seq,
            requested_at=_utc(event.logged_at),
        )
    )


def _close_up_waitlist(session: Session, day_id: str) -> None:
    """Renumber the waitlist 1, 2, 3… keeping its order, after a registration left it."""
    waiting = sorted(_registrations(session, day_id, ("waitlisted",)), key=lambda r: r.waitlist_position or 0)
    for position, registration in enumerate(waiting, start=1):
        if registration.waitlist_position != position:
            registration.waitlist_position = position
            session.add(registration)


def _leave_waitlist_or_seat(session: Session, registration_id: str, status: str, at: datetime) -> None:
    """Set a registration's new status; if it was waiting, the waitlist behind it moves up."""
    registration = session.get(Registration, registration_id)
    if registration is None:
        return
    was_waiting = registration.status == "waitlisted"
    registration.status = status
    registration.waitlist_position = None
    registration.decided_at = _utc(at)
    session.add(registration)
    if was_waiting:
        _close_up_waitlist(session, registration.day_id)


# A derived event's ``time`` is its cause's acceptance time, the same live and in a rebuild.


def on_registration_confirmed(session: Session, event: Event[RegistrationConfirmed]) -> None:
    _leave_waitlist_or_seat(session, event.data.registration_id, "confirmed", event.time)


def on_registration_changed(session: Session, event: Event[RegistrationChanged]) -> None:
    """The registration brings the attendees it says (the decider refused any change it could not
    take); a waitlisted one keeps its place."""
    registration = session.get(Registration, event.data.registration_id)
    if registration is not None:
        registration.attendees = event.data.attendees
        session.add(registration)


def on_registration_cancelled(session: Session, event: Event[RegistrationCancelled]) -> None:
    _leave_waitlist_or_seat(session, event.data.registration_id, "cancelled", event.logged_at)


def on_registration_waitlisted(session: Session, event: Event[RegistrationWaitlisted]) -> None:
    registration = session.get(Registration, event.data.registration_id)
    if registration is None:
        return
    registration.status = "waitlisted"
    registration.waitlist_position = event.data.position
    registration.reason = None  # (one the deadline closed the waitlist on, back on it: registration opened again)
    registration.decided_at = _utc(event.time)
    session.add(registration)


_RELEASES: dict[str, tuple[str, ...]] = {"waitlist_closed": ("waitlisted",), "member_left": LIVE, "capacity_reduced": ("waitlisted",)}
"""The refusals of a registration that stood (the workflow's, in the organiser's name), and what
the registration was."""


def on_registration_rejected(session: Session, event: Event[RegistrationRejected]) -> None:
    """Keep a refused request with its reason. A duplicate id (or a refused cancellation, in a
    log judged by rules before version 2) leaves the registration it names as it was."""
    data = event.data
    # A registration the deadline left waiting (it will not be seated), one of a member that left
    # the network (its seat or place on the waitlist released), or one waiting that a smaller
    # capacity can never seat: refused, with the reason.
    if data.reason.code in _RELEASES:
        live = session.get(Registration, data.registration_id)
        if live is not None and live.status in _RELEASES[data.reason.code]:
            live.reason = data.reason.model_dump(mode="json", exclude_none=True)
            _leave_waitlist_or_seat(session, data.registration_id, "rejected", event.time)
        return
    if data.reason.code == "unknown_registration" or session.get(Registration, data.registration_id) is not None:
        return
    session.add(
        Registration(
            registration_id=data.registration_id,
            day_id=data.day_id,
            participant=data.participant or event.source,
            role=data.role,
            attendees=data.attendees,
            project_id=data.project_id,
            interests=[],
            status="rejected",
            reason=data.reason.model_dump(mode="json", exclude_none=True),
            requested_at=_utc(event.time),
            decided_at=_utc(event.time),
        )
    )


def on_meetings_proposed(session: Session, event: Event[MeetingsProposed]) -> None:
    day = session.get(InnovationDay, event.data.day_id)
    if day is None:
        return
    session.execute(sa.delete(ProposedMeetingRow).where(col(ProposedMeetingRow.day_id) == day.day_id))
    for meeting in event.data.meetings:
        session.add(
            ProposedMeetingRow(
                day_id=day.day_id,
                funder=meeting.funder,
                innovator=meeting.innovator,
                project_id=meeting.project_id,
                slot_start=_utc(meeting.slot_start),
                shared_themes=list(meeting.shared_themes),
            )
        )
    day.meetings_proposed_at = _utc(event.time)
    session.add(day)


PROJECTIONS: dict[str, Projection] = {
    "innovation_day.scheduled": on_scheduled,
    "innovation_day.rescheduled": on_rescheduled,
    "innovation_day.cancelled": on_cancelled,
    "innovation_day.held": on_held,
    "innovation_day.registration_requested": on_registration_requested,
    "innovation_day.registration_confirmed": on_registration_confirmed,
    "innovation_day.registration_waitlisted": on_registration_waitlisted,
    "innovation_day.registration_rejected": on_registration_rejected,
    "innovation_day.registration_changed": on_registration_changed,
    "innovation_day.registration_cancelled": on_registration_cancelled,
    "innovation_day.meetings_proposed": on_meetings_proposed,
}
DECIDERS: dict[str, Decider | list[Decider]] = {
    "innovation_day.scheduled": decide_day_action,
    "innovation_day.rescheduled": [decide_day_action, rematch_moved_day, reopen_waitlist, resize_day],
    "innovation_day.cancelled": [decide_day_action, withdraw_meetings_of_cancelled_day],
    "innovation_day.held": decide_day_action,
    "innovation_day.registration_requested": decide_registration,
    "innovation_day.registration_changed": decide_change,
    "innovation_day.registration_cancelled": decide_cancellation,
    "institution.left": [release_departed_member, cancel_days_of_departed_organiser],
}
TIMERS: list[Timer] = [propose_meetings]


def _innovators_projects(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    """Meetings are matched on the confirmed innovators' projects' themes."""
    data = envelope.get("data")
    day_id = data.get("day_id") if isinstance(data, dict) else None
    if not isinstance(day_id, str):
        return []
    projects = session.exec(select(Registration.project_id).where(
        Registration.day_id == day_id, Registration.status == "confirmed", Registration.role == "innovator",
        col(Registration.project_id).is_not(None))).all()
    return sorted({project_id for project_id in projects if project_id is not None})


def _days_registered_for(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    """The days the institution leaving holds a live registration for."""
    member = named_in(envelope, "id")
    if member is None:
        return []
    return sorted(set(session.exec(select(Registration.day_id).where(
        Registration.participant == member, col(Registration.status).in_(LIVE))).all()))


def _days_of_leaving_member(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    return sorted({*_days_registered_for(session, envelope), *_days_organised_by(session, envelope)})


def _days_organised_by(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    """The days the institution leaving organises that are still scheduled."""
    member = named_in(envelope, "id")
    if member is None:
        return []
    return sorted(session.exec(select(InnovationDay.day_id).where(
        InnovationDay.organizer == member, InnovationDay.status == "scheduled")).all())


READS: dict[str, Reads] = {
    "innovation_day.meetings_proposed": Reads("project", _innovators_projects),
    # A registration is judged on the owner and partners of the project it brings.
    "innovation_day.registration_requested": named("project", "project_id"),
    # A member's leaving releases its registrations for the days it holds one for, and calls off
    # the days it organises.
    "institution.left": Reads("innovation_day", _days_of_leaving_member),
}


# --- queries (the read API) -------------------------------------------------------------------


def days_of(query: Any, *, participant: str | None = None, organizer: str | None = None) -> Any:
    """``query`` (of days) narrowed to those ``organizer`` organises and ``participant`` holds a
    confirmed or waitlisted registration for."""
    if organizer is not None:
        query = query.where(InnovationDay.organizer == organizer)
    if participant is not None:
        registered = select(Registration.day_id).where(
            Registration.participant == participant, col(Registration.status).in_(LIVE))
        query = query.where(col(InnovationDay.day_id).in_(registered))
    return query


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else _utc(moment).isoformat()


def _registration_view(r: Registration) -> dict[str, Any]:
    return {
        "registration_id": r.registration_id,
        "day_id": r.day_id,
        "participant": r.participant,
        "role": r.role,
        "attendees": r.attendees,
        "project_id": r.project_id,
        "interests": list(r.interests or []),
        "status": r.status,
        "position": r.waitlist_position,
        "reason": r.reason,
        "requested_at": _iso(r.requested_at),
        "decided_at": _iso(r.decided_at),
    }


def _in_log_order(rows: Sequence[Registration]) -> list[Registration]:
    return sorted(rows, key=lambda r: (_utc(r.requested_at), r.requested_seq is None, r.requested_seq or 0, r.registration_id))


def registrations(session: Session, day_id: str) -> list[dict[str, Any]]:
    """Every registration of a day (refused ones included), in the order they were requested."""
    rows = session.exec(select(Registration).where(Registration.day_id == day_id)).all()
    return [_registration_view(r) for r in _in_log_order(rows)]


def meetings(session: Session, day_id: str, *, participant: str | None = None) -> list[dict[str, Any]]:
    """The proposed meetings of a day, by slot (``participant``: those it has, as innovator or
    funder), each with the end of its slot."""
    return meetings_of(session, [day_id], participant=participant).get(day_id, [])


def meetings_of(session: Session, day_ids: Sequence[str] | Any, *, participant: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The proposed meetings of the days ``day_ids`` — ids, or a query of them — (a day without
    any is left out), each day's as :func:`meetings` gives them, read in one query."""
    if isinstance(day_ids, Sequence) and not day_ids:
        return {}
    chosen = sorted(set(day_ids)) if isinstance(day_ids, Sequence) else day_ids
    query = select(ProposedMeetingRow).where(col(ProposedMeetingRow.day_id).in_(chosen))
    if participant is not None:
        query = query.where(sa.or_(col(ProposedMeetingRow.innovator) == participant, col(ProposedMeetingRow.funder) == participant))
    rows = sorted(session.exec(query).all(), key=lambda m: (_utc(m.slot_start), m.funder, m.innovator, m.project_id or ""))
    found: dict[str, list[dict[str, Any]]] = {}
    for m in rows:
        found.setdefault(m.day_id, []).append({
            "innovator": m.innovator,
            "funder": m.funder,
            "project_id": m.project_id,
            "slot_start": _iso(m.slot_start),
            "slot_end": _iso(_utc(m.slot_start) + rules.SLOT_LENGTH),
            "shared_themes": list(m.shared_themes),
        })
    return found


def day_view(session: Session, day_id: str) -> dict[str, Any] | None:
    """A day with the catalog's field names plus ``capacity``, ``confirmed`` (attendees),
    ``seats_left`` and ``waitlisted`` (in order, with positions); None when there is no such day.
    JSON-ready."""
    day = session.get(InnovationDay, day_id)
    if day is None:
        return None
    live = session.exec(
        select(Registration).where(Registration.day_id == day_id, col(Registration.status).in_(LIVE))
    ).all()
    waiting = sorted((r for r in live if r.status == "waitlisted"), key=lambda r: r.waitlist_position or 0)
    return {
        "day_id": day.day_id,
        "organizer": day.organizer,
        "title": day.title,
        "summary": day.summary,
        "format": day.format,
        "starts_at": _iso(day.starts_at),
        "ends_at": _iso(day.ends_at),
        "attendance_mode": day.attendance_mode,
        "venue": day.venue,
        "online_url": day.online_url,
        "capacity": day.capacity,
        "registration_deadline": _iso(day.registration_deadline),
        "themes": list(day.themes),
        "languages": list(day.languages),
        "status": day.status,
        "cancelled_reason": day.cancelled_reason,
        "held_attendees": day.held_attendees,
        "held_summary": day.held_summary,
        "meetings_proposed_at": _iso(day.meetings_proposed_at),
        "confirmed": (confirmed := sum(r.attendees or 0 for r in live if r.status == "confirmed")),
        "seats_left": max(day.capacity - confirmed, 0),
        "waitlisted": [
            {
                "registration_id": r.registration_id,
                "participant": r.participant,
                "attendees": r.attendees,
                "position": r.waitlist_position,
            }
            for r in waiting
        ],
    }
