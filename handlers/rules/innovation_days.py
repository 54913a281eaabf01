"""The innovation days' rules (CONTRACT.md §5) as pure functions of a state snapshot.

Finland's yearly Social Innovation Day, Genç İşi's trainings for municipalities and Mersin's study
visits are all gatherings with a capacity counted in attendees. The rules:

- confirmed attendees never exceed the capacity; beyond it a registration is waitlisted, in the
  order the log accepted the requests;
- a cancellation promotes the waitlist **in strict FIFO order**: the head is confirmed while it
  fits and promotion stops at the first registration that does not (no later, smaller
  registration overtakes it);
- an institution registers once per gathering: a registration counts all the attendees it brings,
  and a second one while the first is live (confirmed or waitlisted) — which would take it more
  seats, or a place in the queue besides its seat — is refused, naming the first. (A log from
  before this rule may hold two: both stand.)
- a registration that brings more attendees than the whole capacity is refused: it could never
  be seated (the capacity does not change), and a place on the waitlist would only tell its
  participant to wait. (A log from before this rule may hold one on the waitlist: it keeps its
  place there without holding up the queue.)
- a participant changes how many attendees its live registration brings while registration is
  open (version 5): fewer frees seats for the waitlist, in order; more takes seats left free only
  when nobody waits who could be seated (``no_room``); a waitlisted registration keeps its place;
- waitlist positions are 1, 2, 3… in log order among the waitlisted registrations; they close up
  when a registration leaves the waitlist (promoted or cancelled), so the position of a
  registration is derived from the order and needs no event of its own;
- a member that leaves the network gives up its registrations for the gatherings still taking them:
  each is released (a seat, or a place on the waitlist) and the waitlist promoted into the seats
  freed, in order (version 5 of the rules; before, a former member kept them);
- the organiser may change the capacity when it moves the day, not below the attendees confirmed;
  a larger capacity seats the waitlist in order while registration is open, and a waitlisted
  registration bigger than a smaller one is refused (version 5);
- nothing is accepted at or after the registration deadline (the log's acceptance time counts),
  nor once the day is cancelled (``day_cancelled``) or reported held (``day_held``; before version 3
  of the rules ``after_deadline``);
- matchmaking at the deadline pairs innovators and funders sharing a theme, at most
  ``MEETINGS_PER_FUNDER`` meetings per funder, no participant twice in one slot.

The glue in ``handlers/innovation_days.py`` loads a ``DayState``, calls these functions and emits
what they return.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from handlers.rules import Refusal, since
from schemas.innovation_days import RegistrationRefusalCode

__all__ = [
    "MEETINGS_PER_FUNDER",
    "DayFacts",
    "day_action_refusal",
    "SLOT_LENGTH",
    "Candidate",
    "Confirm",
    "DayState",
    "Ended",
    "ProposedMeeting",
    "Refuse",
    "Seat",
    "Waitlist",
    "decide_cancellation",
    "decide_change",
    "decide_registration",
    "promotions",
    "capacity_refusal",
    "release",
    "moved_to_capacity",
    "propose_meetings",
    "shared_themes",
    "slots",
]

MEETINGS_PER_FUNDER = 3
"""At most this many meetings are proposed to one funder (institution) per day."""

SLOT_LENGTH = timedelta(minutes=20)
"""Length of a matchmaking slot; slots run back to back from the day's start until its end."""

DayStatus = Literal["scheduled", "cancelled", "held"]
SeatStatus = Literal["confirmed", "waitlisted"]
RefusalCode = RegistrationRefusalCode | Literal["already_cancelled", "no_room"]


@dataclass(frozen=True)
class Seat:
    """A live registration: confirmed, or waiting at ``position`` (1 = next in line)."""

    registration_id: str
    participant: str
    attendees: int
    status: SeatStatus
    position: int | None = None


@dataclass(frozen=True)
class Ended:
    """A registration of the day that holds no seat or place any more: cancelled, or refused."""

    registration_id: str
    participant: str
    status: Literal["cancelled", "rejected"]


@dataclass(frozen=True)
class DayState:
    """What the registration rules need to know about one gathering."""

    day_id: str
    organizer: str
    status: DayStatus
    capacity: int
    registration_deadline: datetime
    seats: tuple[Seat, ...] = ()
    """Confirmed and waitlisted registrations (cancelled and rejected ones are gone)."""

    @property
    def confirmed_attendees(self) -> int:
        return sum(s.attendees for s in self.seats if s.status == "confirmed")

    @property
    def waitlist(self) -> tuple[Seat, ...]:
        """The waitlisted registrations in order (by position)."""
        waiting = [s for s in self.seats if s.status == "waitlisted"]
        return tuple(sorted(waiting, key=lambda s: s.position or 0))

    def fits_ever(self, seat: Seat) -> bool:
        """Whether the registration could be confirmed at all (it is not bigger than the day)."""
        return seat.attendees <= self.capacity


@dataclass(frozen=True)
class Confirm:
    """Confirm the registration (a seat within the capacity)."""

    registration_id: str
    participant: str
    attendees: int


@dataclass(frozen=True)
class Waitlist:
    """Put the registration on the waitlist at ``position``."""

    registration_id: str
    participant: str
    position: int


@dataclass(frozen=True)
class Refuse:
    """Refuse the registration request or cancellation, with a reason code and a message."""

    code: RefusalCode
    message: str


@dataclass(frozen=True)
class DayFacts:
    """What the organiser's rules need to know about a day."""

    organizer: str
    status: DayStatus
    starts_at: datetime | None = None
    """When it starts (None: not known, the report that it was held is not judged by it)."""


def day_action_refusal(day: DayFacts | None, action: str, actor: str, at: datetime | None = None) -> Refusal | None:
    """Why ``action`` (``scheduled``, ``rescheduled``, ``cancelled``, ``held``) by ``actor``,
    accepted into the log at ``at``, is refused, or None when it stands.

    A day id is announced once; only its organiser moves, cancels or reports it, while it is
    scheduled; it is reported held once it has started (a report before closes its registration
    and its matchmaking for good, and cannot be taken back). (Whether its meetings were proposed is no rule's business: the matchmaking is a
    timer's, logged after the events before it were applied, so a replay in log order could see
    the day otherwise.)"""
    if action == "scheduled":
        if day is not None:
            return Refusal("already_scheduled", f"the day was announced already by {day.organizer}")
    elif day is None:
        return Refusal("unknown_day", "no such day has been announced")
    elif actor != day.organizer:
        return Refusal("not_organizer", f"only its organiser, {day.organizer}, may do this")
    elif day.status == "cancelled":
        return Refusal("day_cancelled", "the gathering is cancelled")
    elif day.status == "held":
        return Refusal("day_held", "the gathering has already taken place")
    elif action == "held" and day.starts_at is not None and at is not None and at < day.starts_at and since(3):
        return Refusal("not_started", f"the gathering starts at {day.starts_at.isoformat()}: it can be reported held once "
                       "it has started (to move it, send innovation_day.rescheduled)")
    return None


def _closed(day: DayState, at: datetime) -> Refuse | None:
    """Why the day accepts no registration changes at ``at``, if it does not."""
    if day.status == "cancelled":
        return Refuse("day_cancelled", "the gathering is cancelled")
    if day.status == "held":
        if since(3):
            return Refuse("day_held", "the gathering has already taken place (its organiser reported it held): registrations "
                          "and cancellations closed with it")
        return Refuse("after_deadline", "the gathering has already taken place")
    if at >= day.registration_deadline:
        return Refuse("after_deadline", f"registration closed at {day.registration_deadline.isoformat()}")
    return None


def decide_registration(
    day: DayState | None,
    *,
    registration_id: str,
    participant: str,
    attendees: int,
    already_registered: bool,
    at: datetime,
    project_id: str | None = None,
    project: tuple[str, frozenset[str]] | None = None,
) -> Confirm | Waitlist | Refuse:
    """Answer a registration request accepted into the log at ``at``; ``project``: the owner and
    partners of the project it names (``project_id``), None when none is registered under it.

    It is confirmed when it fits and nobody who could fit is waiting ahead of it; otherwise it
    joins the end of the waitlist (strict FIFO: a small late request does not overtake). The
    project it brings to the matchmaking is one registered, of its participant's (its owner's or
    a partner's): funders are proposed meetings about it.
    """
    if already_registered:
        return Refuse("already_registered", f"the registration id {registration_id} is taken already (by a registration "
                      "made, cancelled or refused before): send the request under a new registration_id")
    if day is None:
        return Refuse("unknown_day", "no such gathering")
    if (closed := _closed(day, at)) is not None:
        return closed
    held = next((s for s in day.seats if s.participant == participant), None)
    if held is not None and since(2):
        return Refuse("already_registered", f"{participant} is registered for this gathering already, as {held.registration_id}")
    if attendees > day.capacity:
        return Refuse("exceeds_capacity", f"{attendees} attendees is more than the gathering's whole capacity of {day.capacity}")
    if project_id is not None and since(3):
        if project is None:
            return Refuse("unknown_project", f"no project {project_id} is registered: register it (project.registered) "
                          "or leave project_id out")
        if participant != project[0] and participant not in project[1]:
            return Refuse("not_project_party", f"only {project[0]}, the project's owner, and its partners bring project "
                          f"{project_id} to a gathering")
    waitlist = day.waitlist
    queue_ahead = any(day.fits_ever(s) for s in waitlist)
    if not queue_ahead and day.confirmed_attendees + attendees <= day.capacity:
        return Confirm(registration_id, participant, attendees)
    return Waitlist(registration_id, participant, len(waitlist) + 1)


def decide_cancellation(
    day: DayState | None,
    *,
    registration_id: str,
    by: str,
    at: datetime,
    ended: Ended | None = None,
) -> list[Confirm] | Refuse:
    """Answer a cancellation by ``by`` at ``at``: refuse it, or list the waitlisted registrations
    it promotes (strict FIFO, see the module docstring). ``ended``: the day's registration of that
    id when it is no longer live, so that its participant learns what became of it (cancelled
    already, or refused) rather than that there is no such registration."""
    seat = _own_live_seat(day, registration_id=registration_id, by=by, at=at, ended=ended, doing="cancel")
    if isinstance(seat, Refuse):
        return seat
    assert day is not None
    remaining = DayState(
        day.day_id,
        day.organizer,
        day.status,
        day.capacity,
        day.registration_deadline,
        tuple(s for s in day.seats if s.registration_id != registration_id),
    )
    return promotions(remaining)


def _own_live_seat(
    day: DayState | None, *, registration_id: str, by: str, at: datetime, ended: Ended | None, doing: str
) -> Seat | Refuse:
    """``by``'s live registration of that id, which it may ``doing`` (cancel, change) at ``at``,
    or why it may not."""
    seat = next((s for s in day.seats if s.registration_id == registration_id), None) if day else None
    if day is None or seat is None:
        if ended is not None and ended.participant == by:
            if ended.status == "cancelled" and since(3):
                return Refuse("already_cancelled", f"registration {registration_id} was cancelled already: it holds no seat "
                              "and no place on the waitlist")
            if ended.status == "rejected":
                return Refuse("unknown_registration", f"registration {registration_id} was refused, never seated or "
                              f"waitlisted: there is nothing to {doing}")
        return Refuse("unknown_registration", f"no live registration {registration_id} for this gathering")
    if seat.participant != by:
        return Refuse("not_participant", f"only the registered participant may {doing}")
    if (closed := _closed(day, at)) is not None:
        return closed
    return seat


def decide_change(
    day: DayState | None,
    *,
    registration_id: str,
    by: str,
    attendees: int,
    at: datetime,
    ended: Ended | None = None,
) -> list[Confirm] | Refuse:
    """Answer ``by``'s change of its registration to bring ``attendees`` at ``at``: refuse it, or
    list the waitlisted registrations it lets in (version 5 of the rules).

    Refused as a cancellation is (whose, live, registration open), and above the day's whole
    capacity (``exceeds_capacity``). A confirmed registration bringing fewer frees seats: the
    waitlist is seated from its head while it fits. One bringing more takes seats left free, when
    nobody waits who could be seated (the newcomers do not pass the waitlist: ``no_room``; the
    participant may cancel and register again, to wait). A waitlisted one keeps its place, and is
    seated once it fits at the head."""
    seat = _own_live_seat(day, registration_id=registration_id, by=by, at=at, ended=ended, doing="change")
    if isinstance(seat, Refuse):
        return seat
    assert day is not None
    if attendees > day.capacity:
        return Refuse("exceeds_capacity", f"{attendees} attendees is more than the gathering's whole capacity of {day.capacity}")
    if seat.status == "confirmed" and attendees > seat.attendees:
        free = day.capacity - day.confirmed_attendees
        waiting = sum(1 for s in day.waitlist if day.fits_ever(s))
        if waiting or attendees - seat.attendees > free:
            queue = f" and {waiting} registration{'s' if waiting != 1 else ''} waiting for them" if waiting else ""
            return Refuse("no_room", f"{free} seat{'s are' if free != 1 else ' is'} free{queue}: the registration keeps its "
                          f"{seat.attendees} (to wait for more, cancel it and register again)")
        return []
    changed = Seat(seat.registration_id, seat.participant, attendees, seat.status, seat.position)
    return promotions(DayState(day.day_id, day.organizer, day.status, day.capacity, day.registration_deadline,
                               tuple(changed if s.registration_id == registration_id else s for s in day.seats)))


def promotions(day: DayState) -> list[Confirm]:
    """The waitlisted registrations that fit now, taken from the head until one does not fit."""
    free = day.capacity - day.confirmed_attendees
    promoted: list[Confirm] = []
    for seat in day.waitlist:
        if not day.fits_ever(seat):
            continue  # can never fit: it must not block the others
        if seat.attendees > free:
            break
        promoted.append(Confirm(seat.registration_id, seat.participant, seat.attendees))
        free -= seat.attendees
    return promoted


def capacity_refusal(day: DayState, capacity: int) -> Refusal | None:
    """Why a move of ``day`` to ``capacity`` is refused: below the attendees confirmed (their
    seats stand; a confirmed participant that will not come cancels first)."""
    confirmed = day.confirmed_attendees
    if capacity < confirmed:
        return Refusal("below_confirmed", f"{confirmed} attendees are confirmed: the capacity cannot be {capacity}, fewer "
                       "than the seats taken (a participant that will not come cancels its registration first)")
    return None


def moved_to_capacity(day: DayState, capacity: int, at: datetime) -> tuple[list[Seat], list[Confirm]]:
    """What a move of ``day`` to ``capacity`` at ``at`` does to its waitlist while registration is
    open: the waitlisted registrations bringing more attendees than the new capacity, which could
    never be seated (refused, as a request for more than the whole day is: a place on the waitlist
    would only tell them to wait, and those behind would pass them), and those a larger capacity
    seats from the head while they fit (strict FIFO, as after a cancellation). Nothing once
    registration closed."""
    if capacity == day.capacity or _closed(day, at) is not None:
        return [], []
    resized = DayState(day.day_id, day.organizer, day.status, capacity, day.registration_deadline, day.seats)
    never = [seat for seat in resized.waitlist if not resized.fits_ever(seat)]
    return never, promotions(resized) if capacity > day.capacity else []


def release(day: DayState, member: str, at: datetime) -> tuple[list[Seat], list[Confirm]]:
    """What ``member``, leaving the network at ``at``, gives up of ``day``: its live registrations
    (seats and places on the waitlist), and the waitlisted registrations promoted into the seats
    freed (strict FIFO, as after a cancellation). Nothing once registration closed (the deadline,
    the day cancelled or held): nobody could take a seat freed then."""
    released = [seat for seat in day.seats if seat.participant == member]
    if not released or _closed(day, at) is not None:
        return [], []
    remaining = DayState(day.day_id, day.organizer, day.status, day.capacity, day.registration_deadline,
                         tuple(seat for seat in day.seats if seat.participant != member))
    return released, promotions(remaining)


# --- matchmaking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """A confirmed innovator or funder taking part in matchmaking.

    ``themes``: the registration's interests, for an innovator together with its project's
    themes; the glue falls back to the day's themes when these are empty (``stated`` false).
    """

    registration_id: str
    participant: str
    role: Literal["innovator", "funder"]
    themes: frozenset[str]
    order: int
    """Registration order (log order of the requests): earlier registrations are served first."""
    project_id: str | None = None
    stated: bool = True
    """Whether ``themes`` are the participant's own (interests, a project's themes), not the
    day's themes taken for a participant that named none."""


@dataclass(frozen=True)
class ProposedMeeting:
    """One innovator–funder meeting in one slot."""

    innovator: str
    funder: str
    project_id: str | None
    slot_start: datetime
    shared_themes: tuple[str, ...] = field(default=())


def shared_themes(a: Iterable[str], b: Iterable[str]) -> tuple[str, ...]:
    """The themes two parties share, sorted: a theme of one side counts when the other side names
    it or its whole domain (`economy` covers `economy.disadvantaged_groups`)."""
    left, right = frozenset(a), frozenset(b)

    def covered(theme: str, other: frozenset[str]) -> bool:
        return theme in other or theme.partition(".")[0] in other

    return tuple(sorted({t for t in left if covered(t, right)} | {t for t in right if covered(t, left)}))


def slots(starts_at: datetime, ends_at: datetime, length: timedelta | None = None) -> list[datetime]:
    """Back-to-back slots of ``length`` that fit entirely between the start and the end."""
    length = length or SLOT_LENGTH
    found: list[datetime] = []
    start = starts_at
    while start + length <= ends_at:
        found.append(start)
        start += length
    return found


def propose_meetings(
    candidates: Sequence[Candidate],
    *,
    starts_at: datetime,
    ends_at: datetime,
    per_funder: int | None = None,
    slot_length: timedelta | None = None,
) -> list[ProposedMeeting]:
    """Pair innovators and funders who share at least one theme, greedily and deterministically.

    Pairs are served first by how many of the two named their themes themselves (a pair that met
    only through the day's themes, taken for participants who named none, shares all of them and
    would otherwise come before those whose own interests meet), then by most shared themes,
    then by the innovator's and the funder's registration order; each gets the earliest slot in which neither institution is busy, as long as the funder
    has fewer than ``per_funder`` meetings. The result does not depend on the order of
    ``candidates``, so a rebuild or a second run reproduces exactly the same meetings.
    """
    limit = MEETINGS_PER_FUNDER if per_funder is None else per_funder
    day_slots = slots(starts_at, ends_at, slot_length)
    ordered = sorted(candidates, key=lambda c: (c.order, c.registration_id))
    innovators = [c for c in ordered if c.role == "innovator"]
    funders = [c for c in ordered if c.role == "funder"]
    pairs = [
        (shared, innovator, funder)
        for innovator in innovators
        for funder in funders
        if innovator.participant != funder.participant
        and (shared := shared_themes(innovator.themes, funder.themes))
    ]
    pairs.sort(key=lambda p: (-(p[1].stated + p[2].stated), -len(p[0]), p[1].order, p[1].registration_id, p[2].order, p[2].registration_id))

    busy: dict[str, set[int]] = {}
    per_funder_count: Counter[str] = Counter()
    seen: set[tuple[str, str, str | None]] = set()
    meetings: list[ProposedMeeting] = []
    for shared, innovator, funder in pairs:
        pair = (innovator.participant, funder.participant, innovator.project_id)
        if pair in seen or per_funder_count[funder.participant] >= limit:
            continue
        taken = busy.setdefault(innovator.participant, set()) | busy.setdefault(funder.participant, set())
        slot = next((i for i in range(len(day_slots)) if i not in taken), None)
        if slot is None:
            continue
        seen.add(pair)
        busy[innovator.participant].add(slot)
        busy[funder.participant].add(slot)
        per_funder_count[funder.participant] += 1
        meetings.append(ProposedMeeting(innovator.participant, funder.participant, innovator.project_id, day_slots[slot], shared))
    meetings.sort(key=lambda m: (m.slot_start, m.funder, m.innovator, m.project_id or ""))
    return meetings
