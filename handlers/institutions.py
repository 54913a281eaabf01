"""Who is in the network: the members' read model, from ``institution.*`` (offered by the operator).

Other domains ask it about an institution (kind and country for call eligibility, municipality
level for adoption counts) through :func:`member`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import date, datetime, timezone
from typing import Any, NamedTuple, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel
from sqlalchemy import JSON, Column
from sqlmodel import Field, Session, SQLModel, col, select

from handlers.network import Context, Decider, Event, Projection, Timer
from handlers.rows import TableRow
from handlers.rules import since
from handlers.words import trigram_index, words
from schemas.institutions import InstitutionJoined, InstitutionLeft, InstitutionUpdated

# --- storage helpers shared by this package's read models --------------------------------------


class UtcDateTime(sa.TypeDecorator[datetime]):
    """A moment, stored in UTC and read back timezone-aware on every database. (SQLite keeps no
    offset: an aware datetime would otherwise be stored as its local wall time and come back
    naive, and times with different offsets would compare wrongly.)"""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: store moments with their offset")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)

    def bind_processor(self, dialect: sa.Dialect) -> Any:
        """On SQLite, :meth:`process_bind_param` and SQLite's own text form (``DATETIME``'s
        storage format, UTC wall time) in one step: a rebuild binds a million of them."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)
        utc = timezone.utc

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError(f"naive datetime {value!r}: store moments with their offset")
            value = value.astimezone(utc)
            return _SQLITE_DATETIME % (value.year, value.month, value.day, value.hour, value.minute, value.second, value.microsecond)

        return process


_SQLITE_DATETIME = "%04d-%02d-%02d %02d:%02d:%02d.%06d"
"""SQLite's ``DATETIME`` storage format (``sqlalchemy.dialects.sqlite.DATETIME``), by position."""


def column_values(data: BaseModel, fields: Iterable[str]) -> dict[str, Any]:
    """Event data fields as the columns take them: dates and moments as they are, everything else
    in its JSON form (lists for tuples, values for enumerations, dicts for value objects). In the
    order of ``fields`` when it has one (the dict may be stored as JSON, byte for byte the same in
    every process)."""
    names = list(dict.fromkeys(fields))
    as_json = data.model_dump(mode="json", include=set(names))
    values = {}
    for name in names:
        value = getattr(data, name)
        values[name] = value if isinstance(value, (date, datetime)) else as_json[name]
    return values


Row = TypeVar("Row", bound=SQLModel)


def upsert(session: Session, table: type[Row], key: Any, values: dict[str, Any]) -> Row:
    """The row of ``table`` with primary key ``key`` set to ``values`` (which include the key's
    columns), inserted if it does not exist yet."""
    row = session.get(table, key)
    if row is None:
        row = table(**values)
    else:
        row.sqlmodel_update(values)
    session.add(row)
    return row


# --- the read model ----------------------------------------------------------------------------


class Institution(TableRow, table=True):
    """A member of the network (or a former one: ``left_at`` is set)."""

    __tablename__ = "institutions"
    __table_args__ = (trigram_index("institutions"),)

    id: str = Field(primary_key=True, max_length=63)
    name: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    kind: str = Field(max_length=32)
    country: str = Field(max_length=2)
    region: str | None = Field(default=None, max_length=300)
    municipality_level: str | None = Field(default=None, max_length=16)
    themes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    identifiers: list[dict[str, str]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    """``[{scheme, value}]``: how other registers name it."""
    website: str | None = Field(default=None, max_length=2048)
    contact_email: str | None = Field(default=None, max_length=320)
    joined_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    left_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    words: str = Field(default="", exclude=True, sa_column=Column(sa.Text, nullable=False, server_default=""))
    """The name as a search (``?q=``) reads it (:mod:`handlers.words`); no resource shows it."""

    @property
    def active(self) -> bool:
        """Still a member."""
        return self.left_at is None


def member(session: Session, institution: str) -> Institution | None:
    """The institution while it is a member; None when it never joined or has left."""
    found = session.get(Institution, institution)
    return found if found is not None and found.active else None


def member_ids(session: Session, kind: str | None = None) -> Iterable[str]:
    """The ids of the members (of ``kind``, if given), the operator's institution aside, in id
    order: what a "did you mean" of an institution named for a part in an event is chosen among."""
    query = select(Institution.id).where(col(Institution.left_at).is_(None), Institution.kind != "operator")
    return session.exec((query if kind is None else query.where(Institution.kind == kind)).order_by(Institution.id))


def member_by_identifier(session: Session, scheme: str, value: str) -> Institution | None:
    """The member another register names ``value`` in ``scheme`` (e.g. a business id)."""
    for candidate in session.exec(select(Institution).where(col(Institution.left_at).is_(None))):
        if {"scheme": scheme, "value": value} in candidate.identifiers:
            return candidate
    return None


# --- projections -------------------------------------------------------------------------------


def joined(session: Session, event: Event[InstitutionJoined]) -> None:
    """A (re)joining member: every fact is restated, so earlier values do not linger."""
    facts = column_values(event.data, InstitutionJoined.model_fields.keys())
    upsert(session, Institution, event.data.id,
           {**facts, "joined_at": event.logged_at, "left_at": None, "words": words(event.data.name)})


def updated(session: Session, event: Event[InstitutionUpdated]) -> None:
    """Only the fields present change; a present null clears. A member that stops being a
    municipality loses its municipality level (the adoption statistics count municipalities by it)."""
    institution = session.get(Institution, event.data.id)
    if institution is None:  # the gate admits updates of members only (one logged before it did: nothing to change)
        return
    institution.sqlmodel_update(column_values(event.data, event.data.model_fields_set - {"id"}))
    if "name" in event.data.model_fields_set:
        institution.words = words(institution.name)
    if institution.kind != "municipality":
        institution.municipality_level = None
    session.add(institution)


def left(session: Session, event: Event[InstitutionLeft]) -> None:
    """The member leaves; its row stays, since past events still name it."""
    institution = session.get(Institution, event.data.id)
    if institution is not None and institution.left_at is None:
        institution.left_at = event.logged_at
        session.add(institution)


class Leaving(NamedTuple):
    """A member leaving the network, as the workflows of the other domains read it."""

    member: str
    at: datetime
    """When its leaving was logged (aware, UTC)."""
    envelope: Mapping[str, Any]


def leaving(ctx: Context, version: int) -> Leaving | None:
    """Who leaves the network (``institution.left``) and when, if its leaving is applied and
    judged by rules of ``version`` or later: what a decider of another domain that gives up what
    the member held asks first."""
    event = ctx.event
    assert event is not None
    if ctx.refused or not since(version):
        return None
    at = event.logged_at
    return Leaving(event.data.id, at.replace(tzinfo=timezone.utc) if at.tzinfo is None else at.astimezone(timezone.utc), event.envelope)


PROJECTIONS: dict[str, Projection] = {"institution.joined": joined, "institution.updated": updated, "institution.left": left}
DECIDERS: dict[str, Decider] = {}
TIMERS: tuple[Timer, ...] = ()
