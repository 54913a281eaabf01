"""The event catalog as one table: type and major version → data model, who may offer it, and
which data field names the aggregate (CONTRACT.md §5). The gatekeeper, the workflows and the
schema export all read this table, so adding an event type is one line here."""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from pydantic import TypeAdapter

from schemas.calls import (
    ApplicationDecided,
    ApplicationLapsed,
    ApplicationReceived,
    ApplicationRejected,
    ApplicationSubmitted,
    ApplicationWithdrawn,
    CallActionRejected,
    CallAmended,
    CallClosed,
    CallPublished,
    FullProposalSubmitted,
)
from schemas.common import EventData, InstitutionKind
from schemas.innovation_days import (
    InnovationDayActionRejected,
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
from schemas.institutions import InstitutionJoined, InstitutionLeft, InstitutionUpdated
from schemas.projects import (
    ImpactReported,
    PartnerJoined,
    ProjectActionRejected,
    ProjectAdopted,
    ProjectCompleted,
    ProjectRegistered,
    ProjectUpdated,
)
from schemas.validations import (
    InfoProvided,
    InfoRequested,
    ReviewerAssigned,
    ReviewerUnassigned,
    ReviewOverdue,
    ReviewSubmitted,
    ValidationActionRejected,
    ValidationDecided,
    ValidationRequested,
    ValidationWithdrawn,
)

__all__ = [
    "REGISTRY",
    "EventSpec",
    "UnknownEventType",
    "UnknownMajorVersion",
    "did_you_mean",
    "event_types",
    "export_json_schemas",
    "json_schema",
    "may_emit",
    "parse_dataschema",
    "spec_for",
]

DATASCHEMA_PREFIX = "urn:collabbus:schema:"
_DATASCHEMA = re.compile(
    r"urn:collabbus:schema:(?P<type>[a-z_]+\.[a-z_]+):(?P<major>[1-9][0-9]{0,5})"
)


EventModel = type[EventData]


@dataclass(frozen=True)
class EventSpec:
    """One event type at one major version, and the rules the gate applies to it."""

    type: str
    major: int
    model: EventModel
    emitters: frozenset[str]
    """Institution kinds that may offer this type from outside; empty: the bus alone emits it."""
    workflow: bool
    """Emitted by the bus's workflows (in the aggregate owner's name)."""
    subject_field: str
    """The data field whose value must equal the envelope `subject`."""
    adapter: TypeAdapter[EventData] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.subject_field not in self.model.model_fields:
            raise ValueError(f"{self.model.__name__} has no field {self.subject_field!r}")
        object.__setattr__(self, "adapter", TypeAdapter(self.model))

    @property
    def domain(self) -> str:
        """`project` for `project.registered`."""
        return self.type.partition(".")[0]

    @property
    def event(self) -> str:
        """`registered` for `project.registered`."""
        return self.type.partition(".")[2]

    @property
    def dataschema(self) -> str:
        """The URN an envelope's `dataschema` names this schema by."""
        return f"{DATASCHEMA_PREFIX}{self.type}:{self.major}"


class UnknownEventType(LookupError):
    """The type is not in the catalog."""


class UnknownMajorVersion(LookupError):
    """The type exists, but not at that major version."""


_ALL: frozenset[str] = frozenset(InstitutionKind)
_OPERATOR: frozenset[str] = frozenset({InstitutionKind.OPERATOR})
_MEMBERS: frozenset[str] = _ALL - _OPERATOR
_CENTRE: frozenset[str] = frozenset({InstitutionKind.COMPETENCE_CENTRE})
_BUS: frozenset[str] = frozenset()

# (type, model, emitters, workflow, subject_field); every type is at major 1 for now.
_CATALOG: tuple[tuple[str, EventModel, frozenset[str], bool, str], ...] = (
    ("institution.joined", InstitutionJoined, _OPERATOR, False, "id"),
    ("institution.updated", InstitutionUpdated, _OPERATOR, False, "id"),
    ("institution.left", InstitutionLeft, _OPERATOR, False, "id"),
    ("call.published", CallPublished, _MEMBERS, False, "call_id"),
    ("call.amended", CallAmended, _MEMBERS, False, "call_id"),
    ("call.closed", CallClosed, _MEMBERS, True, "call_id"),
    ("call.application_submitted", ApplicationSubmitted, _MEMBERS, False, "call_id"),
    ("call.application_received", ApplicationReceived, _BUS, True, "call_id"),
    ("call.application_rejected", ApplicationRejected, _BUS, True, "call_id"),
    ("call.application_decided", ApplicationDecided, _MEMBERS, False, "call_id"),
    ("call.application_withdrawn", ApplicationWithdrawn, _MEMBERS, False, "call_id"),
    ("call.full_proposal_submitted", FullProposalSubmitted, _MEMBERS, False, "call_id"),
    ("call.application_lapsed", ApplicationLapsed, _BUS, True, "call_id"),
    ("call.action_rejected", CallActionRejected, _BUS, True, "call_id"),
    ("project.registered", ProjectRegistered, _ALL, False, "project_id"),
    ("project.updated", ProjectUpdated, _ALL, False, "project_id"),
    ("project.partner_joined", PartnerJoined, _ALL, False, "project_id"),
    ("project.adopted", ProjectAdopted, _ALL, False, "project_id"),
    ("project.impact_reported", ImpactReported, _ALL, False, "project_id"),
    ("project.completed", ProjectCompleted, _ALL, False, "project_id"),
    ("project.action_rejected", ProjectActionRejected, _BUS, True, "project_id"),
    ("validation.requested", ValidationRequested, _ALL, False, "validation_id"),
    ("validation.reviewer_assigned", ReviewerAssigned, _CENTRE, False, "validation_id"),
    ("validation.reviewer_unassigned", ReviewerUnassigned, _CENTRE, False, "validation_id"),
    ("validation.info_requested", InfoRequested, _ALL, False, "validation_id"),
    ("validation.info_provided", InfoProvided, _ALL, False, "validation_id"),
    ("validation.review_submitted", ReviewSubmitted, _ALL, False, "validation_id"),
    ("validation.review_overdue", ReviewOverdue, _BUS, True, "validation_id"),
    ("validation.decided", ValidationDecided, _CENTRE, True, "validation_id"),
    ("validation.withdrawn", ValidationWithdrawn, _ALL, False, "validation_id"),
    ("validation.action_rejected", ValidationActionRejected, _BUS, True, "validation_id"),
    ("innovation_day.scheduled", InnovationDayScheduled, _ALL, False, "day_id"),
    ("innovation_day.rescheduled", InnovationDayRescheduled, _ALL, False, "day_id"),
    ("innovation_day.cancelled", InnovationDayCancelled, _ALL, False, "day_id"),
    ("innovation_day.held", InnovationDayHeld, _ALL, False, "day_id"),
    ("innovation_day.registration_requested", RegistrationRequested, _ALL, False, "day_id"),
    ("innovation_day.registration_confirmed", RegistrationConfirmed, _BUS, True, "day_id"),
    ("innovation_day.registration_waitlisted", RegistrationWaitlisted, _BUS, True, "day_id"),
    ("innovation_day.registration_rejected", RegistrationRejected, _BUS, True, "day_id"),
    ("innovation_day.registration_changed", RegistrationChanged, _ALL, False, "day_id"),
    ("innovation_day.registration_cancelled", RegistrationCancelled, _ALL, False, "day_id"),
    ("innovation_day.meetings_proposed", MeetingsProposed, _BUS, True, "day_id"),
    ("innovation_day.action_rejected", InnovationDayActionRejected, _BUS, True, "day_id"),
)

REGISTRY: Mapping[tuple[str, int], EventSpec] = MappingProxyType(
    {
        (type_, 1): EventSpec(type_, 1, model, emitters, workflow, subject_field)
        for type_, model, emitters, workflow, subject_field in _CATALOG
    }
)


def spec_for(type: str, major: int = 1) -> EventSpec:
    """The spec of `type` at `major`; the two lookup errors say which part is unknown."""
    try:
        return REGISTRY[(type, major)]
    except KeyError:
        majors = sorted(m for t, m in REGISTRY if t == type)
        if not majors:
            raise UnknownEventType(f"unknown event type {type!r}{did_you_mean(type)}") from None
        raise UnknownMajorVersion(
            f"{type!r} has no major version {major} (known: {', '.join(map(str, majors))})"
        ) from None


def did_you_mean(name: str, among: Iterable[str] | None = None) -> str:
    """A hint naming what is nearest to a misspelt name ``among`` the catalog's types (or the names
    given): ``"; did you mean 'project.registered'?"``, or ``""`` when nothing is near."""
    if len(name) > 128:  # no type is this long; comparing it with each would only cost
        return ""
    candidates = sorted({t for t, _ in REGISTRY} if among is None else set(among))
    near = difflib.get_close_matches(name, candidates, n=2, cutoff=0.85)
    return f"; did you mean {' or '.join(map(repr, near))}?" if near else ""


def parse_dataschema(urn: str | None, type: str) -> int:
    """The major version an envelope's `dataschema` asks for; absent means 1. Whether that
    major exists is `spec_for`'s question."""
    if urn is None:
        return 1
    match = _DATASCHEMA.fullmatch(urn)
    if match is None:
        raise ValueError(
            f"dataschema {urn!r} is not of the form {DATASCHEMA_PREFIX}{{type}}:{{major}}"
        )
    if match["type"] != type:
        raise ValueError(f"dataschema {urn!r} names type {match['type']!r}, not {type!r}")
    return int(match["major"])


def event_types() -> list[str]:
    """Every type of the catalog, sorted, each once whatever its majors."""
    return sorted({t for t, _ in REGISTRY})


def domains() -> list[str]:
    """Every domain of the catalog (`project` for `project.registered`), sorted."""
    return sorted({spec.domain for spec in REGISTRY.values()})


def unknown_filters(names: Sequence[str]) -> list[tuple[int, str]]:
    """The place of each name that is neither an event type nor a domain of the catalog
    (``project``, or ``project.*``), with what is wrong with it and what was likely meant: what a
    follower's or an endpoint's filter is checked with, so a misspelt one is refused rather
    than matching nothing for ever."""
    known, domain_names = _TYPES, _DOMAINS
    unknown = [(place, name) for place, name in enumerate(names)
               if name not in known and name.removesuffix(".*") not in domain_names]
    if not unknown:  # (the usual case: no lists of names built for the guesses)
        return []
    bare = [*known, *domain_names]
    starred = [*known, *(f"{domain}.*" for domain in domain_names)]
    return [
        (place, f"{name!r} is neither an event type nor a domain such as 'project' or 'project.*'"
                f"{did_you_mean(name, starred if name.endswith('.*') else bare)}")
        for place, name in unknown
    ]


_TYPES = frozenset(event_types())
_DOMAINS = frozenset(domains())


def may_emit(kind: str, type: str, major: int = 1) -> bool:
    """Whether an institution of `kind` may offer `type` from outside. Kind-level only: who owns
    a call or coordinates a validation is for the workflows. Unknown types: nobody may."""
    spec = REGISTRY.get((type, major))
    return spec is not None and kind in spec.emitters


def json_schema(type: str, major: int = 1) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the data of `type`, for partners in any language."""
    spec = spec_for(type, major)
    schema = spec.adapter.json_schema(mode="validation")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": spec.dataschema,
        **schema,
        "title": f"{spec.type} v{spec.major}",
    }


def export_json_schemas(directory: Path) -> list[Path]:
    """Write one `{type}.v{major}.json` per catalog entry into `directory`; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for type_, major in sorted(REGISTRY):
        path = directory / f"{type_}.v{major}.json"
        path.write_text(
            json.dumps(json_schema(type_, major), indent=2, ensure_ascii=False) + "\n",
            encoding="utf-8",
        )
        written.append(path)
    return written
