"""The read API over the read models (members only): lists paged by keyset, resources by id.

Endpoints are plain ``def`` functions: FastAPI runs them in its thread pool, so the synchronous
database work never blocks the bus's event loop. Resources come from the domains' own view
functions where they have one (``validation_view``, ``day_view``, ``registrations``,
``meetings``), so who may see what is decided in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import AfterValidator, AwareDatetime, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError
from sqlmodel import Session, col, select

from bus.credentials import member_inbox_prefix, member_ingress
from bus.logpages import member_log_requests
from bus.verdict import Problem
from connectors.http import resources
from connectors.http.auth import Member, SessionDep, bearer_token, bus_of, engine_of
from connectors.http.paging import DEFAULT_LIMIT, Cursor, Limit, Page, keyset_page, list_page
from connectors.http.problems import ApiProblem, documented
from handlers import innovation_days as days
from handlers import tokens
from handlers.confidential import public_live_subjects
from handlers.calls import Call, CallApplication, application_counts, may_see_application, status_is
from handlers.db import reading
from handlers.institutions import Institution
from handlers.projects import (
    Project,
    ProjectAdoption,
    ProjectImpactReport,
    ProjectPartner,
    adoptions_by_municipality_level,
    adoptions_without_level,
)
from handlers.rules.calls import ApplicationStatus
from handlers.rules.innovation_days import DayStatus
from handlers.rules.validations import Outcome as ValidationOutcome
from handlers.rules.validations import Status as ValidationStatus
from handlers.validations import (
    Validation,
    ValidationReviewer,
    assignments_of,
    late_reviewers_of,
    overdue_reviewers,
    validation_view,
)
from handlers.words import folded, matching
from schemas.calls import CallKind
from schemas.common import (
    AWARE_TIME,
    COUNTRY_CODES,
    OUT_OF_RANGE,
    InstitutionKind,
    check_theme,
    nearest,
    representable,
    unknown_name,
)
from schemas.envelope import INSTITUTION_PATTERN
from schemas.institutions import MunicipalityLevel
from schemas.projects import ProjectStatus
from schemas.registry import event_types, may_emit


def _offset_as_meant(value: object) -> object:
    """``2026-12-05T10:00:00 03:00``: a ``+`` sent bare in a query string arrives as a space."""
    if isinstance(value, str) and len(value) > 6 and value[-6] == " " and value[-3] == ":":
        return f"{value[:-6]}+{value[-5:]}"
    return value


def _a_moment(value: object, read: ValidatorFunctionWrapHandler) -> datetime:
    """A time with its offset; anything else is told what that is, a date alone (which moment of
    it is meant depends on the zone) as text that is no time at all, of which pydantic would say
    "a valid datetime or date" and then refuse the date."""
    try:
        moment: datetime = read(_offset_as_meant(value))
    except ValidationError as exc:
        raise PydanticCustomError(exc.errors()[0]["type"], AWARE_TIME) from None
    if not representable(moment):  # (compared in UTC, where it would be no date: the query failed)
        raise PydanticCustomError("datetime_parsing", f"{AWARE_TIME}: {OUT_OF_RANGE}")
    return moment


QueryTime = Annotated[AwareDatetime, WrapValidator(_a_moment)]
"""A time in a query string, with its offset."""

router = APIRouter(tags=["read"])

LIST_ERRORS = documented(400, 401, 403, 422)
ITEM_ERRORS = documented(401, 403, 404, 422)

CallId = Annotated[str, Path(min_length=1, max_length=128, description="the call's `call_id`")]
ApplicationId = Annotated[str, Path(min_length=1, max_length=128, description="the application's `application_id`")]
ProjectId = Annotated[str, Path(min_length=1, max_length=128, description="the project's `project_id`")]
ValidationId = Annotated[str, Path(min_length=1, max_length=128, description="the validation's `validation_id`")]
DayId = Annotated[str, Path(min_length=1, max_length=128, description="the day's `day_id`")]
DayParticipant = Annotated[str | None, Query(pattern=INSTITUTION_PATTERN, description=(
    "an institution's id (a member's own: `participant={its id}`): the gatherings it is registered for (confirmed or "
    "waitlisted), in the calendar with the meetings proposed to it; of a day's meetings, those it has (innovator or funder)"))]
"""The institution whose gatherings, or whose meetings of a day, are read: one parameter, checked
and described alike wherever it is taken (the list of days, the calendar, a day's meetings)."""
DayOrganizer = Annotated[str | None, Query(max_length=63, description="gatherings this institution organises")]
COUNTRY = r"^[A-Za-z]{2}$"


def _known_country(value: str | None) -> str | None:
    """An assigned country code, in either case: a typo (``XX``) would answer an empty page, as if
    nothing were there, where an event is refused for it."""
    if value is None:
        return None
    if value.upper() not in COUNTRY_CODES:
        raise ValueError(f"{value!r} is not an assigned ISO 3166-1 alpha-2 country code, such as FI or TR")
    return value.upper()


def _known_theme(value: str | None) -> str | None:
    """A theme code of the catalog (a typo is answered with the one meant, as in an event)."""
    return None if value is None else check_theme(value)


Country = Annotated[str | None, Query(pattern=COUNTRY, description="an ISO 3166-1 alpha-2 code (either case)"),
                    AfterValidator(_known_country)]
Theme = Annotated[str | None, Query(max_length=64, description="a theme code; an area (`health_care`) matches its sub-themes"),
                  AfterValidator(_known_theme)]


def _some_word(value: str | None) -> str | None:
    if value is not None and not value.split():
        raise ValueError("Input should have a word to look for, not only spaces")
    return value


Search = Annotated[str | None, Query(max_length=200, description=(
    "those whose title or summary, in any of its languages, contains every word of this (case and accents "
    "aside: `yasli` finds Yaşlı, `tyoelama` työelämä; a word's beginning or middle will do)")),
                   AfterValidator(_some_word)]
NameSearch = Annotated[str | None, Query(max_length=200, description=(
    "members whose name, in any of its languages, contains every word of this (case and accents aside: "
    "`buyuksehir` finds Büyükşehir; a word's beginning or middle will do)")), AfterValidator(_some_word)]


def _has_theme(themes: list[str], wanted: str) -> bool:
    return any(theme == wanted or theme.startswith(wanted + ".") for theme in themes)


def _theme_filter(wanted: str | None, themes_of: Callable[[Any], list[str]]) -> Callable[[Any], bool] | None:
    return None if wanted is None else (lambda row: _has_theme(themes_of(row), wanted))


def _page(items: list[Any], next_cursor: str | None) -> dict[str, Any]:
    return {"items": items, "next_cursor": next_cursor}


def _not_found(what: str, id: str, known: Iterable[str] = ()) -> ApiProblem:
    """404 for an id that names no ``what``, with the nearest of the ``known`` ones (those every
    member may see), which is most often the one meant (a typo in an id)."""
    meant = nearest(id, known)
    return ApiProblem(404, f"no {what} {id!r}" + (f"; did you mean {meant!r}?" if meant else ""), kind="not_found")


def known_institutions(session: Session, **given: str | None) -> None:
    """:func:`_known_institution` of each query parameter naming an institution (None: not given)."""
    for parameter, value in given.items():
        _known_institution(session, parameter, value)


def _known_institution(session: Session, parameter: str, value: str | None) -> None:
    """Refuse (422) a query's ``parameter`` naming an institution that is none, member or former
    member, with the one most likely meant: a typo would be answered with an empty page, or with
    counts of nothing, as if the institution had nothing."""
    if value is None or session.get(Institution, value) is not None:
        return
    message = unknown_name(value, "an institution of the network", session.exec(select(Institution.id).order_by(Institution.id)))
    raise ApiProblem(422, f"query.{parameter}: {message}", kind="invalid",
                     errors=[Problem(("query", parameter), message, "unknown_institution")])


# --- institutions ------------------------------------------------------------------------------


@router.get("/institutions", response_model=Page[resources.Institution], responses=LIST_ERRORS)
def list_institutions(
    _viewer: Member,
    session: SessionDep,
    kind: Annotated[InstitutionKind | None, Query(description="members of this kind")] = None,
    country: Country = None,
    municipality_level: Annotated[MunicipalityLevel | None, Query(
        description="municipalities of this level (those the adoption statistics count under it)")] = None,
    theme: Theme = None,
    q: NameSearch = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """The current members, by id."""
    country = country.upper() if country else None
    query = select(Institution).where(col(Institution.left_at).is_(None))
    if kind is not None:
        query = query.where(Institution.kind == kind)
    if country is not None:
        query = query.where(Institution.country == country)
    if municipality_level is not None:
        query = query.where(Institution.municipality_level == municipality_level, Institution.kind == "municipality")
    if q is not None:
        query = query.where(*matching(Institution.words, q))
    rows, next_cursor = keyset_page(session, query, [col(Institution.id)], limit=limit, cursor=cursor,
                                    keep=_theme_filter(theme, lambda institution: institution.themes))
    return _page([row.model_dump() for row in rows], next_cursor)


@router.get("/me", response_model=resources.Me, responses=documented(401, 403, 422))
async def whoami(request: Request, viewer: Member) -> dict[str, Any]:
    """The member the token speaks for, and the event types its kind may offer: what to check
    first when the gate refuses an event as ``forbidden``; and what its NATS credentials let its
    client do (offer on ``collab.ingress.{id}.>``, read its verdicts under its inbox prefix,
    follow the public events live on ``collab.live``)."""
    kind = await bus_of(request).membership.kind_of(viewer)
    bearer = bearer_token(request)

    def read() -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        with Session(reading(engine_of(request))) as session:
            row = session.get(Institution, viewer)
            held = session.get(tokens.InstitutionToken, tokens.token_hash(bearer)) if bearer is not None else None
            token = None if held is None else {
                "sha256": held.token_hash[:12], "label": held.label, "created_at": held.created_at, "expires_at": held.expires_at}
            return (row.model_dump() if row is not None else None), token

    institution, token = await run_in_threadpool(read)
    return {
        "id": viewer,
        "kind": kind,
        "institution": institution,
        "token": token,
        "may_emit": [event_type for event_type in event_types() if kind is not None and may_emit(kind, event_type)],
        "nats": {"url": bus_of(request).settings.nats_public, "ingress": member_ingress(viewer),
                 "inbox_prefix": member_inbox_prefix(viewer),
                 "live_subjects": public_live_subjects(), "log_requests": member_log_requests(viewer)},
    }


@router.get("/institutions/{institution_id}", response_model=resources.Institution, responses=ITEM_ERRORS)
def get_institution(
    institution_id: Annotated[str, Path(pattern=INSTITUTION_PATTERN, description="the institution's id")],
    _viewer: Member,
    session: SessionDep,
) -> dict[str, Any]:
    """A member, or a former one (``left_at`` set): the log still names those as sources."""
    institution = session.get(Institution, institution_id)
    if institution is None:
        raise _not_found("institution", institution_id, session.exec(select(Institution.id).order_by(Institution.id)))
    return institution.model_dump()


# --- calls -------------------------------------------------------------------------------------


def _call(row: Call, now: datetime, counts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """A call as members see it; ``counts``: its applications' counts, for its publisher
    (:func:`handlers.calls.application_counts`; None to anyone else)."""
    return {**row.model_dump(), "status": row.status(now), "stage": row.stage(now),
            "applications": (counts or {}).get(row.call_id)}


def _publishers_counts(session: Any, rows: list[Call], viewer: str) -> dict[str, dict[str, Any]]:
    """The application counts of those of ``rows`` that ``viewer`` published."""
    return application_counts(session, [row for row in rows if row.owner == viewer])


@router.get("/calls", response_model=Page[resources.Call], responses=LIST_ERRORS)
def list_calls(
    viewer: Member,
    session: SessionDep,
    status: Annotated[Literal["upcoming", "open", "closed"] | None, Query(
        description="upcoming: not open yet (`opens_at` ahead); open: taking applications; closed: past its deadline or closed early")] = None,
    theme: Theme = None,
    kind: Annotated[CallKind | None, Query(description="calls of this kind: funding, partnership, tender, challenge or training")] = None,
    eligible_kind: Annotated[InstitutionKind | None, Query(description="calls open to this kind of institution")] = None,
    country: Annotated[str | None, Query(pattern=COUNTRY, description="calls open to institutions of this country"),
                       AfterValidator(_known_country)] = None,
    owner: Annotated[str | None, Query(max_length=63, description="calls this institution published")] = None,
    q: Search = None,
    deadline_before: Annotated[QueryTime | None, Query(
        description="calls whose deadline is before this time (RFC 3339, with its offset: `Z`, `+03:00` — a `+` "
                    "left bare in a query string, which reads as a space, is taken as meant; a date alone is not "
                    "taken, as which moment it means depends on the zone: `2026-12-31T00:00:00+02:00`)")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Calls by deadline. An empty eligibility list means open to all. The caller's own calls come
    with how many applications they have (``applications``), which no other member sees."""
    known_institutions(session, owner=owner)
    now = datetime.now(timezone.utc)
    country = country.upper() if country else None
    query = select(Call)
    if status is not None:
        query = query.where(status_is(status, now))
    if deadline_before is not None:
        query = query.where(col(Call.deadline) < deadline_before)
    if owner is not None:
        query = query.where(Call.owner == owner)
    if kind is not None:
        query = query.where(Call.kind == kind)
    if q is not None:
        query = query.where(*matching(Call.words, q))

    def keep(call: Call) -> bool:
        return (
            (theme is None or _has_theme(call.themes, theme))
            and (eligible_kind is None or not call.eligible_kinds or eligible_kind in call.eligible_kinds)
            and (country is None or not call.eligible_countries or country in call.eligible_countries)
        )

    filtered = theme is not None or eligible_kind is not None or country is not None
    rows, next_cursor = keyset_page(
        session, query, [col(Call.deadline), col(Call.call_id)], limit=limit, cursor=cursor, keep=keep if filtered else None
    )
    counts = _publishers_counts(session, rows, viewer)
    return _page([_call(row, now, counts) for row in rows], next_cursor)


def _known_call(session: Any, call_id: str) -> Call:
    call = session.get(Call, call_id)
    if call is None:
        raise _not_found("call", call_id, session.exec(select(Call.call_id).order_by(Call.call_id)))
    return call


@router.get("/calls/{call_id}", response_model=resources.Call, responses=ITEM_ERRORS)
def get_call(call_id: CallId, viewer: Member, session: SessionDep) -> dict[str, Any]:
    """A funding call: its terms, stages and status now; for its publisher, how many
    applications it has (``applications``), which no other member sees."""
    call = _known_call(session, call_id)
    return _call(call, datetime.now(timezone.utc), _publishers_counts(session, [call], viewer))


@router.get("/applications", response_model=Page[resources.Application], responses=LIST_ERRORS)
def list_my_applications(
    viewer: Member,
    session: SessionDep,
    status: Annotated[ApplicationStatus | None, Query(description="applications in this state")] = None,
    call_id: Annotated[str | None, Query(max_length=128, description="applications to this call")] = None,
    applicant: Annotated[str | None, Query(max_length=63, description="applications this institution made")] = None,
    project_id: Annotated[str | None, Query(max_length=128, description="applications for this project")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """The applications the caller is a party to, across calls, in the order they were
    answered: those it made, those naming it a partner, and every application to a call it
    published."""
    known_institutions(session, applicant=applicant)
    owned = set(session.exec(select(Call.call_id).where(Call.owner == viewer)).all())
    query = select(CallApplication).where(sa.or_(
        col(CallApplication.call_id).in_(owned),
        col(CallApplication.applicant) == viewer,
        # (a superset, narrowed below: JSON lists are not portably searched in SQL)
        sa.cast(CallApplication.partners, sa.Text).contains(f'"{viewer}"', autoescape=True),
    ))
    for column, value in ((CallApplication.status, status), (CallApplication.call_id, call_id),
                          (CallApplication.applicant, applicant), (CallApplication.project_id, project_id)):
        if value is not None:
            query = query.where(column == value)
    rows, next_cursor = keyset_page(
        session, query,
        [col(CallApplication.submitted_at), col(CallApplication.call_id), col(CallApplication.application_id)],
        limit=limit, cursor=cursor,
        keep=lambda row: may_see_application(row, viewer if row.call_id in owned else None, viewer),
    )
    return _page([row.model_dump() for row in rows], next_cursor)


@router.get(
    "/calls/{call_id}/applications",
    response_model=Page[resources.Application],
    responses=documented(400, 401, 403, 404, 422),
)
def list_applications(
    call_id: CallId,
    viewer: Member,
    session: SessionDep,
    status: Annotated[ApplicationStatus | None, Query(description="applications in this state")] = None,
    applicant: Annotated[str | None, Query(max_length=63, description="applications this institution made")] = None,
    project_id: Annotated[str | None, Query(max_length=128, description="applications for this project")] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Applications to a call in the order they were answered. The call's publisher sees every
    one; any other member only those it made or is named a partner in (applications are not the
    competitors' business)."""
    call = _known_call(session, call_id)
    known_institutions(session, applicant=applicant)
    query = select(CallApplication).where(CallApplication.call_id == call_id)
    if status is not None:
        query = query.where(CallApplication.status == status)
    if applicant is not None:
        query = query.where(CallApplication.applicant == applicant)
    if project_id is not None:
        query = query.where(CallApplication.project_id == project_id)
    keep = None if viewer == call.owner else (lambda row: may_see_application(row, call.owner, viewer))
    rows, next_cursor = keyset_page(
        session, query, [col(CallApplication.submitted_at), col(CallApplication.application_id)],
        limit=limit, cursor=cursor, keep=keep,
    )
    return _page([row.model_dump() for row in rows], next_cursor)


@router.get("/calls/{call_id}/applications/{application_id}", response_model=resources.Application, responses=ITEM_ERRORS)
def get_application(call_id: CallId, application_id: ApplicationId, viewer: Member, session: SessionDep) -> dict[str, Any]:
    """One application to a call, for the call's publisher, the applicant and its partners; to
    anyone else it does not exist."""
    call = _known_call(session, call_id)
    row = session.get(CallApplication, (call_id, application_id))
    if row is None or not may_see_application(row, call.owner, viewer):
        raise ApiProblem(404, f"no application {application_id!r} to call {call_id!r}", kind="not_found")
    return row.model_dump()


# --- projects ----------------------------------------------------------------------------------


def _project(row: Project) -> dict[str, Any]:
    values = row.model_dump(exclude={"country", "region", "municipality"})
    location = {"country": row.country, "region": row.region, "municipality": row.municipality}
    values["location"] = location if any(location.values()) else None
    return values


def _spellings(session: Session, column: Any, place: str) -> list[str]:
    """How the projects' locations write ``place`` in ``column`` (``Yenişehir``, ``YENİŞEHİR``…),
    case and accents aside (:func:`handlers.words.folded`): the projects are then chosen in SQL,
    and paged there, from the few names of places the projects have rather than by reading every
    project."""
    wanted = folded(place)
    return [name for name in session.exec(select(column).where(col(column).is_not(None)).distinct()) if folded(name) == wanted]


@router.get("/projects", response_model=Page[resources.Project], responses=LIST_ERRORS)
def list_projects(
    _viewer: Member,
    session: SessionDep,
    theme: Theme = None,
    country: Country = None,
    region: Annotated[str | None, Query(max_length=300, description=(
        "projects in this region (as their location names it; case and accents aside)"))] = None,
    municipality: Annotated[str | None, Query(max_length=300, description=(
        "projects in this municipality (as their location names it; case and accents aside)"))] = None,
    status: Annotated[ProjectStatus | None, Query(description="projects in this state")] = None,
    owner: Annotated[str | None, Query(max_length=63, description="projects this institution owns")] = None,
    partner: Annotated[str | None, Query(max_length=63, description="projects this institution is a partner of")] = None,
    adopter: Annotated[str | None, Query(max_length=63, description="practices this institution adopted")] = None,
    q: Search = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Projects and good practices, by id."""
    known_institutions(session, owner=owner, partner=partner, adopter=adopter)
    country = country.upper() if country else None
    query = select(Project)
    for column, value in ((Project.country, country), (Project.status, status), (Project.owner, owner)):
        if value is not None:
            query = query.where(column == value)
    if partner is not None:
        query = query.where(col(Project.project_id).in_(select(ProjectPartner.project_id).where(ProjectPartner.institution == partner)))
    if adopter is not None:
        query = query.where(col(Project.project_id).in_(select(ProjectAdoption.project_id).where(ProjectAdoption.adopter == adopter)))
    for column, place in ((Project.region, region), (Project.municipality, municipality)):
        if place is not None:
            query = query.where(col(column).in_(_spellings(session, column, place)))
    if q is not None:
        query = query.where(*matching(Project.words, q))
    rows, next_cursor = keyset_page(
        session, query, [col(Project.project_id)], limit=limit, cursor=cursor,
        keep=_theme_filter(theme, lambda project: project.themes),
    )
    return _page([_project(row) for row in rows], next_cursor)


@router.get("/projects/{project_id}", response_model=resources.ProjectDetail, responses=ITEM_ERRORS)
def get_project(project_id: ProjectId, _viewer: Member, session: SessionDep) -> dict[str, Any]:
    """A project with its partners, the adoptions of it as a good practice, and its impact reports;
    when its owner, a partner or an adopter left the network (``owner_left_at``, ``left_at``,
    ``adopter_left_at``)."""
    project = session.get(Project, project_id)
    if project is None:
        raise _not_found("project", project_id, session.exec(select(Project.project_id).order_by(Project.project_id)))
    partners = session.exec(
        select(ProjectPartner).where(ProjectPartner.project_id == project_id).order_by(col(ProjectPartner.institution))
    ).all()
    adoptions = session.exec(
        select(ProjectAdoption)
        .where(ProjectAdoption.project_id == project_id)
        .order_by(col(ProjectAdoption.adopted_at), col(ProjectAdoption.adoption_id))
    ).all()
    reports = session.exec(
        select(ProjectImpactReport)
        .where(ProjectImpactReport.project_id == project_id)
        .order_by(col(ProjectImpactReport.period_start), col(ProjectImpactReport.id))
    ).all()
    # Who of them left the network: they stay listed (they took part, took the practice up), and
    # the reader sees they are members no more without asking for each; and which partners never
    # joined it (a project names its partners, members or not).
    named = {project.owner, *(p.institution for p in partners), *(a.adopter for a in adoptions)}
    left = dict(session.exec(select(Institution.id, Institution.left_at).where(col(Institution.id).in_(named))).all())
    return {
        **_project(project),
        "owner_left_at": left.get(project.owner),
        "partners": [{**p.model_dump(exclude={"project_id"}), "joined": p.institution in left, "left_at": left.get(p.institution)}
                     for p in partners],
        "adoptions": [{**a.model_dump(exclude={"project_id"}), "adopter_left_at": left.get(a.adopter)} for a in adoptions],
        "impact": [
            {"period": {"start": r.period_start, "end": r.period_end}, "indicators": r.indicators, "reported_at": r.reported_at}
            for r in reports
        ],
    }


@router.get("/stats/adoptions", response_model=resources.AdoptionStats, responses=documented(401, 403, 422))
def adoption_stats(
    _viewer: Member,
    session: SessionDep,
    owner: Annotated[str | None, Query(max_length=63, description="only the practices of this institution")] = None,
) -> dict[str, Any]:
    """How far good practices spread: adopting municipalities and adoptions per municipality level,
    and those of municipalities whose level is not known (``without_level``)."""
    known_institutions(session, owner=owner)
    spread = adoptions_by_municipality_level(session, owner=owner)
    return {"by_municipality_level": [vars(level) for level in spread],
            "without_level": vars(adoptions_without_level(session, owner=owner))}


# --- validations -------------------------------------------------------------------------------

_VALIDATION_SUMMARY = set(resources.Validation.model_fields) - {"assignment"}


@router.get("/validations", response_model=Page[resources.Validation], responses=LIST_ERRORS)
def list_validations(
    viewer: Member,
    session: SessionDep,
    status: Annotated[ValidationStatus | None, Query(description="validations in this state")] = None,
    outcome: Annotated[ValidationOutcome | None, Query(description="decided validations with this outcome")] = None,
    project_id: Annotated[str | None, Query(max_length=128, description="validations of this project or practice")] = None,
    coordinator: Annotated[str | None, Query(max_length=63, description="validations this institution coordinates")] = None,
    requester: Annotated[str | None, Query(max_length=63, description="validations this institution requested")] = None,
    reviewer: Annotated[str | None, Query(description="validations this institution is assigned to review")] = None,
    overdue: Annotated[bool | None, Query(description=(
        "true: open validations where a reviewer (the one `reviewer` names, else any) has not reviewed by its due "
        "date; false: the others. Who is late is the parties' business: name yourself as `reviewer`, "
        "`coordinator` or `requester`"))] = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Validations by request time; reviews are only on ``/validations/{id}``, for those who may see them."""
    known_institutions(session, coordinator=coordinator, requester=requester, reviewer=reviewer)
    query = select(Validation)
    if reviewer is not None:
        assigned = select(ValidationReviewer.validation_id).where(ValidationReviewer.reviewer == reviewer)
        query = query.where(col(Validation.validation_id).in_(assigned))
    if overdue is not None:
        if viewer not in (reviewer, coordinator, requester):
            raise ApiProblem(422, "overdue is for a validation's parties: give reviewer, coordinator or requester as yourself",
                             kind="invalid", errors=[Problem(("overdue",), "needs reviewer, coordinator or requester naming you",
                                                             "party_required")])
        late = overdue_reviewers(datetime.now(timezone.utc), reviewer)
        query = query.where(late if overdue else ~late)
    filters = ((Validation.status, status), (Validation.outcome, outcome), (Validation.project_id, project_id),
               (Validation.coordinator, coordinator), (Validation.requester, requester))
    for column, value in filters:
        if value is not None:
            query = query.where(column == value)
    rows, next_cursor = keyset_page(
        session, query, [col(Validation.requested_at), col(Validation.validation_id)], limit=limit, cursor=cursor
    )
    # An undecided validation has no medians yet (None in its row; ``{}`` in the resource).
    items = [{**row.model_dump(include=_VALIDATION_SUMMARY), "median_scores": row.median_scores or {}} for row in rows]
    if reviewer is not None and reviewer == viewer:  # a reviewer's work list: its own due dates and progress
        mine = assignments_of(session, viewer, rows)
        for item in items:
            item["assignment"] = mine.get(item["validation_id"])
    if overdue and viewer in (coordinator, requester):  # whom to chase, of the caller's own validations
        late = late_reviewers_of(session, rows, datetime.now(timezone.utc))
        for item in items:
            item["late_reviewers"] = late.get(item["validation_id"], [])
    return _page(items, next_cursor)


@router.get(
    "/validations/{validation_id}",
    response_model=resources.ValidationDetail,
    response_model_exclude_unset=True,
    responses=ITEM_ERRORS,
)
def get_validation(validation_id: ValidationId, viewer: Member, session: SessionDep) -> dict[str, Any]:
    """A validation as the caller may see it: ``reviews`` for the coordinator, the requester, a
    reviewer (their own) and, after the decision, everyone."""
    view = validation_view(session, validation_id, viewer)
    if view is None:
        raise _not_found("validation", validation_id, session.exec(select(Validation.validation_id).order_by(Validation.validation_id)))  # (every member sees them all)
    return view


# --- innovation days ---------------------------------------------------------------------------


def _day(session: Any, day_id: str) -> dict[str, Any]:
    view = days.day_view(session, day_id)
    if view is None:
        raise _not_found("innovation day", day_id, session.exec(select(days.InnovationDay.day_id).order_by(days.InnovationDay.day_id)))
    return view


@router.get("/innovation-days", response_model=Page[resources.InnovationDay], responses=LIST_ERRORS)
def list_innovation_days(
    _viewer: Member,
    session: SessionDep,
    status: Annotated[DayStatus | None, Query(description="scheduled (ahead, or not marked held yet), cancelled or held")] = None,
    theme: Theme = None,
    participant: DayParticipant = None,
    organizer: DayOrganizer = None,
    q: Search = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """Innovation days and other gatherings, by start."""
    known_institutions(session, participant=participant, organizer=organizer)
    query = days.days_of(select(days.InnovationDay), participant=participant, organizer=organizer)
    if status is not None:
        query = query.where(days.InnovationDay.status == status)
    if q is not None:
        query = query.where(*matching(days.InnovationDay.words, q))
    rows, next_cursor = keyset_page(
        session, query, [col(days.InnovationDay.starts_at), col(days.InnovationDay.day_id)], limit=limit, cursor=cursor,
        keep=_theme_filter(theme, lambda day: day.themes),
    )
    return _page([_day(session, row.day_id) for row in rows], next_cursor)


@router.get("/innovation-days/{day_id}", response_model=resources.InnovationDay, responses=ITEM_ERRORS)
def get_innovation_day(day_id: DayId, _viewer: Member, session: SessionDep) -> dict[str, Any]:
    """A day with its ``capacity``, ``confirmed`` attendees and the ``waitlisted`` in order."""
    return _day(session, day_id)


@router.get(
    "/innovation-days/{day_id}/registrations",
    response_model=Page[resources.Registration],
    responses=documented(400, 401, 403, 404, 422),
)
def list_registrations(day_id: DayId, _viewer: Member, session: SessionDep, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> dict[str, Any]:
    """A day's registrations in the order they were requested, refused ones included."""
    _day(session, day_id)
    rows, next_cursor = list_page(days.registrations(session, day_id), lambda r: r["registration_id"], limit=limit, cursor=cursor)
    return _page(rows, next_cursor)


@router.get(
    "/innovation-days/{day_id}/meetings",
    response_model=Page[resources.Meeting],
    responses=documented(400, 401, 403, 404, 422),
)
def list_meetings(
    day_id: DayId,
    _viewer: Member,
    session: SessionDep,
    participant: DayParticipant = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> dict[str, Any]:
    """The meetings the matchmaking proposed for a day, by slot, each with its end."""
    _day(session, day_id)
    known_institutions(session, participant=participant)
    rows, next_cursor = list_page(
        days.meetings(session, day_id, participant=participant), lambda m: f"{m['slot_start']}|{m['funder']}", limit=limit, cursor=cursor
    )
    return _page(rows, next_cursor)
