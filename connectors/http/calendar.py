"""``/innovation-days.ics``: the gatherings as an RFC 5545 calendar feed, one VEVENT per day.

Calendar clients subscribe to a URL and cannot send headers, so the feed also takes ``?token=``.
Texts are given in the language asked for (``?lang=``), else English, else the first one there.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import Response
from icalendar import Calendar, Event, vCalAddress, vText
from sqlmodel import Session, col, select

from connectors.http.auth import CalendarMember, SessionDep
from connectors.http.problems import documented
from connectors.http.read import DayOrganizer, DayParticipant, known_institutions
from handlers.innovation_days import InnovationDay, days_of, meetings_of
from handlers.institutions import Institution

router = APIRouter(tags=["read"])

ICS = "text/calendar"
_STATUS = {"scheduled": "CONFIRMED", "held": "CONFIRMED", "cancelled": "CANCELLED"}


def _text(localized: dict[str, str] | None, lang: str) -> str | None:
    if not localized:
        return None
    return localized.get(lang) or localized.get("en") or next(iter(localized.values()))


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


def _location(day: InnovationDay, lang: str) -> str | None:
    venue: dict[str, Any] = day.venue or {}
    parts = [_text(venue.get("name"), lang), venue.get("address"), venue.get("municipality"), venue.get("country")]
    text = ", ".join(str(part) for part in parts if part)
    return text or day.online_url


def _organizer(day: InnovationDay, names: dict[str, dict[str, str]], lang: str) -> vCalAddress:
    """The organising institution, with its name (``CN``) for calendar clients to show in its stead."""
    address = vCalAddress(f"urn:collabbus:institution:{day.organizer}")
    name = _text(names.get(day.organizer), lang)
    if name:
        address.params["cn"] = vText(name)
    return address


def names_of(session: Session, days: list[InnovationDay]) -> dict[str, dict[str, str]]:
    """The names of the days' organisers, by id, in one query."""
    ids = sorted({day.organizer for day in days})
    if not ids:
        return {}
    rows = session.exec(select(col(Institution.id), col(Institution.name)).where(col(Institution.id).in_(ids)))
    return {institution_id: name for institution_id, name in rows}


def _vevent(day: InnovationDay, lang: str, stamp: datetime, names: dict[str, dict[str, str]] | None = None) -> Event:
    event = Event()
    event.add("uid", f"{day.day_id}@collabbus")
    event.add("dtstamp", stamp)
    event.add("sequence", day.revision)  # a moved or cancelled day replaces the one calendars keep (RFC 5545 §3.8.7.4)
    event.add("dtstart", _utc(day.starts_at))
    event.add("dtend", _utc(day.ends_at))
    event.add("summary", _text(day.title, lang) or day.day_id)
    description = _text(day.summary, lang)
    if description:
        event.add("description", description)
    location = _location(day, lang)
    if location:
        event.add("location", location)
    if day.online_url:
        event.add("url", day.online_url)
    if day.themes:
        event.add("categories", [vText(theme) for theme in day.themes])
    event.add("status", _STATUS.get(day.status, "TENTATIVE"))
    event.add("organizer", _organizer(day, names or {}, lang))
    return event


def _meeting_vevent(day: InnovationDay, meeting: dict[str, Any], lang: str, stamp: datetime) -> Event:
    """A meeting the matchmaking proposed, in the calendar of one of its two parties: named by its
    day, slot and funder (a day moved gets its meetings anew, under new names)."""
    start = datetime.fromisoformat(meeting["slot_start"])
    event = Event()
    event.add("uid", f"{day.day_id}.meeting.{start.strftime('%Y%m%dT%H%M%SZ')}.{meeting['funder']}@collabbus")
    event.add("dtstamp", stamp)
    event.add("dtstart", start)
    event.add("dtend", datetime.fromisoformat(meeting["slot_end"]))
    title = _text(day.title, lang) or day.day_id
    event.add("summary", f"{meeting['innovator']} – {meeting['funder']} ({title})")
    about = [f"project {meeting['project_id']}"] if meeting["project_id"] else []
    event.add("description", "; ".join([*about, "shared themes: " + ", ".join(meeting["shared_themes"])]))
    location = _location(day, lang)
    if location:
        event.add("location", location)
    event.add("related-to", f"{day.day_id}@collabbus")
    event.add("categories", [vText(theme) for theme in meeting["shared_themes"]])
    event.add("status", "CONFIRMED")
    return event


CONTROLS = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
"""The control characters RFC 5545 keeps out of a text (all but the tab; line breaks in a text are
escaped, ``\\n``): a title or a name sent with one is shown without it, where a strict calendar
client could refuse the whole feed. UTF-8 writes no other character with these bytes."""


def feed(days: list[InnovationDay], lang: str, meetings: dict[str, list[dict[str, Any]]] | None = None,
         names: dict[str, dict[str, str]] | None = None) -> bytes:
    """The calendar of ``days``, with ``meetings`` (by day id) of those in it; ``names``: the
    organisers' (``names_of``)."""
    calendar = Calendar()
    calendar.add("prodid", "-//collabbus//innovation days//EN")
    calendar.add("version", "2.0")
    calendar.add("calscale", "GREGORIAN")
    calendar.add("x-wr-calname", "collabbus innovation days")
    stamp = datetime.now(timezone.utc).replace(microsecond=0)
    for day in days:
        calendar.add_component(_vevent(day, lang, stamp, names))
        for meeting in (meetings or {}).get(day.day_id, []):
            calendar.add_component(_meeting_vevent(day, meeting, lang, stamp))
    return calendar.to_ical().translate(None, CONTROLS)


@router.get(
    "/innovation-days.ics",
    response_class=Response,
    responses={200: {"content": {ICS: {"schema": {"type": "string"}}}, "description": "RFC 5545 calendar"}, **documented(401, 403, 422)},
)
def calendar_feed(
    _viewer: CalendarMember,
    session: SessionDep,
    lang: Annotated[str, Query(max_length=35, description="preferred language (BCP 47)")] = "en",
    participant: DayParticipant = None,
    organizer: DayOrganizer = None,
) -> Response:
    """Every innovation day (and other gathering) as an iCalendar feed; ``participant``: only
    those an institution is registered for (a member's own calendar), with the meetings the
    matchmaking proposed to it in each not cancelled; ``organizer``: those it organises."""
    known_institutions(session, participant=participant, organizer=organizer)
    query = days_of(select(InnovationDay), participant=participant, organizer=organizer)
    days = list(session.exec(query.order_by(col(InnovationDay.starts_at), col(InnovationDay.day_id))).all())
    # The meetings of all its days in one query, of the days the feed holds (not one per day).
    matched = query.where(col(InnovationDay.status) != "cancelled", col(InnovationDay.meetings_proposed_at).is_not(None))
    proposed = {} if participant is None else meetings_of(
        session, matched.with_only_columns(col(InnovationDay.day_id)), participant=participant)
    return Response(feed(days, lang, proposed, names_of(session, days)), media_type=f"{ICS}; charset=utf-8")
