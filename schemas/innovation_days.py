"""Gatherings — innovation days, trainings, study visits — their registrations and matchmaking.

The organiser is the source of `innovation_day.scheduled`, so it is not repeated in the data.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import ConfigDict, Field, Strict, model_validator

from schemas.common import (
    AggregateId,
    CountryCode,
    EventData,
    EventId,
    InstitutionId,
    Label,
    LanguageTag,
    LocalizedText,
    Reason,
    Theme,
    Timestamp,
    ValueObject,
    WebUrl,
    Whole,
    at_most,
)

__all__ = [
    "DayActionRefusal",
    "InnovationDayActionRejected",
    "InnovationDayCancelled",
    "InnovationDayHeld",
    "InnovationDayRescheduled",
    "InnovationDayScheduled",
    "Meeting",
    "MeetingsProposed",
    "RegistrationCancelled",
    "RegistrationChanged",
    "RegistrationConfirmed",
    "RegistrationRefusal",
    "RegistrationRejected",
    "RegistrationRequested",
    "RegistrationWaitlisted",
    "Venue",
]

MAX_ATTENDEES = 100_000
"""The most people a gathering (or one registration) counts; larger numbers are typos, and past
64 bits they could not be stored at all."""

Attendees = Annotated[int, Strict(), Field(ge=1), *at_most(MAX_ATTENDEES), Whole]


class Venue(ValueObject):
    """Where an offline or mixed gathering takes place."""

    name: LocalizedText
    address: Label | None = None
    municipality: Label | None = None
    country: CountryCode | None = None


def _check_times(
    starts_at: datetime, ends_at: datetime, registration_deadline: datetime | None
) -> None:
    if ends_at <= starts_at:
        raise ValueError("ends_at must be after starts_at")
    if registration_deadline is not None and registration_deadline > starts_at:
        raise ValueError("registration_deadline must not be after starts_at")


class InnovationDayScheduled(EventData):
    """A gathering is announced. Offline needs a venue, online an `online_url`, mixed both.
    `capacity` counts attendees (a registration may bring several). It starts before it ends,
    and registration closes no later than it starts."""

    # What the JSON Schema can say of the rule below (the order of the times it cannot).
    model_config = ConfigDict(json_schema_extra={"allOf": [
        {"if": {"properties": {"attendance_mode": {"enum": ["offline", "mixed"]}}},
         "then": {"required": ["venue"], "properties": {"venue": {"type": "object"}}}},
        {"if": {"properties": {"attendance_mode": {"enum": ["online", "mixed"]}}},
         "then": {"required": ["online_url"], "properties": {"online_url": {"type": "string"}}}},
    ]})

    day_id: AggregateId
    title: LocalizedText
    summary: LocalizedText | None = None
    format: Literal["innovation_day", "training", "study_visit", "webinar", "workshop"]
    starts_at: Timestamp
    ends_at: Timestamp
    attendance_mode: Literal["offline", "online", "mixed"]
    venue: Venue | None = None
    online_url: WebUrl | None = None
    capacity: Attendees
    registration_deadline: Timestamp
    themes: tuple[Theme, ...] = ()
    languages: tuple[LanguageTag, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_times(self.starts_at, self.ends_at, self.registration_deadline)
        if self.attendance_mode != "online" and self.venue is None:
            raise ValueError(f"an {self.attendance_mode} gathering needs a venue")
        if self.attendance_mode != "offline" and self.online_url is None:
            raise ValueError(f"an {self.attendance_mode} gathering needs an online_url")
        return self


class InnovationDayRescheduled(EventData):
    """The organiser moved the gathering, or changed its terms; a registration deadline left out
    stays as it was. A `capacity` given replaces the day's (a larger room, a smaller one): not
    below the attendees confirmed (`below_confirmed`); a larger one seats the waitlist in order
    while registration is open, and a smaller one refuses a waitlisted registration bringing more
    (`capacity_reduced`) (version 5 of the rules). Left out, the capacity stays."""

    day_id: AggregateId
    starts_at: Timestamp
    ends_at: Timestamp
    registration_deadline: Timestamp | None = None
    capacity: Attendees | None = None
    reason: LocalizedText | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_times(self.starts_at, self.ends_at, self.registration_deadline)
        return self


class InnovationDayCancelled(EventData):
    """The organiser called the gathering off."""

    day_id: AggregateId
    reason: LocalizedText


class InnovationDayHeld(EventData):
    """The gathering took place."""

    day_id: AggregateId
    attendees: Annotated[int, Strict(), Field(ge=0), *at_most(MAX_ATTENDEES), Whole] | None = None
    summary: LocalizedText | None = None


Role = Literal["innovator", "funder", "observer", "speaker"]


class RegistrationRequested(EventData):
    """An institution asks to attend; the workflow answers with confirmed, waitlisted or
    rejected. `interests` (themes) and `project_id` feed the matchmaking."""

    day_id: AggregateId
    registration_id: AggregateId
    participant: InstitutionId
    role: Role
    attendees: Attendees
    project_id: AggregateId | None = None
    interests: tuple[Theme, ...] = ()


class RegistrationConfirmed(EventData):
    """A seat for the registration, within capacity (also when promoted from the waitlist)."""

    day_id: AggregateId
    registration_id: AggregateId
    participant: InstitutionId | None = None
    attendees: Attendees | None = None


class RegistrationWaitlisted(EventData):
    """No seat yet: the registration waits at `position` (1 = next to be promoted). Also the answer
    to a move of the day that opens registration again, for a registration refused at the old
    deadline as `waitlist_closed`: it waits again, in its order (version 4 of the rules)."""

    day_id: AggregateId
    registration_id: AggregateId
    position: Annotated[int, Strict(), Field(ge=1, le=2**31 - 1), Whole]
    participant: InstitutionId | None = None


RegistrationRefusalCode = Literal[
    "unknown_day",
    "after_deadline",
    "day_cancelled",
    "day_held",
    "already_registered",
    "unknown_registration",
    "not_participant",
    "exceeds_capacity",
    "unknown_project",
    "not_project_party",
    "waitlist_closed",
    "member_left",
    "capacity_reduced",
]
"""The registration workflow's refusal codes (the rules decide them; the catalog carries them).
`day_held`: the organiser reported the gathering held (version 3 of the rules; before,
`after_deadline`).
`already_registered`: the registration id is taken, or the participant holds a confirmed or
waitlisted registration for the day already (the message names it).
`unknown_project`, `not_project_party`: the `project_id` names no registered project, or one its
participant neither owns nor is a partner of (version 3 of the rules).
`waitlist_closed`: the registration deadline came while the registration waited on the waitlist;
no seat will come free for it (the workflow tells each registration still waiting, then).
`member_left`: its participant left the network while registration was open; its seat or place on
the waitlist is released, and the waitlist promoted into the seats freed (version 5 of the rules).
`capacity_reduced`: the organiser moved the gathering to a capacity smaller than the attendees of
this waitlisted registration, which could never be seated (version 5 of the rules).
`unknown_registration` and `not_participant` refuse a cancellation: a log from before version 2
of the rules answers one in `innovation_day.registration_rejected`, later ones in
`innovation_day.action_rejected`."""


class RegistrationRefusal(Reason):
    """Why a registration request was refused (or, in a log from before version 2 of the rules, a
    cancellation)."""

    code: RegistrationRefusalCode


class RegistrationRejected(EventData):
    """The workflow refused a registration request; `causationid` names it. The request is
    repeated: as what (`role`), how many `attendees`, with which project. Only a request is
    answered so (a log from before version 2 of the rules answers a refused cancellation so too,
    naming the registration it left as it was)."""

    day_id: AggregateId
    registration_id: AggregateId
    reason: RegistrationRefusal
    participant: InstitutionId | None = None
    role: Role | None = None
    attendees: Attendees | None = None
    project_id: AggregateId | None = None


class RegistrationChanged(EventData):
    """The participant changes how many `attendees` its live registration brings, while
    registration is open (version 5 of the rules). Fewer frees seats: the waitlist is seated from
    its head while it fits. More takes seats left free, when nobody waits who could be seated
    (`no_room` otherwise: to wait for more, cancel and register again); a waitlisted registration
    keeps its place. Refused as a cancellation is (`unknown_registration`, `not_participant`,
    `after_deadline`, `day_cancelled`, `day_held`) and above the day's whole capacity
    (`exceeds_capacity`), by an `innovation_day.action_rejected`; the registration stands as it was."""

    day_id: AggregateId
    registration_id: AggregateId
    attendees: Attendees


class RegistrationCancelled(EventData):
    """The participant gives up its registration; the waitlist moves up."""

    day_id: AggregateId
    registration_id: AggregateId


class Meeting(ValueObject):
    """One proposed innovator–funder meeting; they share at least one theme."""

    innovator: InstitutionId
    funder: InstitutionId
    project_id: AggregateId | None = None
    slot_start: Timestamp
    shared_themes: Annotated[tuple[Theme, ...], Field(min_length=1)]

    @model_validator(mode="after")
    def _two_parties(self) -> Self:
        if self.innovator == self.funder:
            raise ValueError("innovator and funder must be different institutions")
        return self


class MeetingsProposed(EventData):
    """Matchmaking at the registration deadline, and again for the new times when the day is
    moved after it; replaces the day's earlier proposal. Empty when nobody matches, when a move
    opened registration again (the meetings are withdrawn until the new deadline), or when the
    day was cancelled after its meetings were proposed."""

    day_id: AggregateId
    meetings: tuple[Meeting, ...]


class DayActionRefusal(Reason):
    """Why the innovation days' workflow refused an announcement, a move, a cancellation or the
    report that a day was held (`not_started`: before it started), or the cancellation of a
    registration: no live registration of that
    id for the day (`unknown_registration`), one its participant cancelled already
    (`already_cancelled`, version 3 of the rules), another's (`not_participant`), or registration closed
    (`after_deadline`, `day_cancelled`, `day_held`); a move to a capacity below the attendees
    confirmed (`below_confirmed`, version 5 of the rules); a change of a registration's attendees
    refused as a cancellation is, above the whole capacity (`exceeds_capacity`) or more than the
    seats free while others wait (`no_room`)."""

    code: Literal[
        "unknown_day",
        "already_scheduled",
        "not_organizer",
        "day_cancelled",
        "day_held",
        "not_started",
        "unknown_registration",
        "already_cancelled",
        "not_participant",
        "after_deadline",
        "below_confirmed",
        "exceeds_capacity",
        "no_room",
    ]


class InnovationDayActionRejected(EventData):
    """The workflow refused an event about a day that passed the gate (a state rule): an
    organiser's, or a registration's cancellation (the registration stands as it was). Emitted in
    the organiser's name (for an unknown day: the refused event's source), with `causationid`
    naming the refused event, repeated here with its type and source."""

    day_id: AggregateId
    rejected_type: Annotated[
        str, Field(pattern=r"^innovation_day\.(scheduled|rescheduled|cancelled|held|registration_cancelled|registration_changed)$")
    ]
    rejected_event_id: EventId
    actor: InstitutionId
    reason: DayActionRefusal
    registration_id: AggregateId | None = Field(None, description=(
        "the registration a refused cancellation or change named: it stands as it was (a refusal "
        "of the cancellation or change, not of the registration)"))
