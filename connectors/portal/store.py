"""The portal connector's own state: where the last sync stopped and what each entry became.

Not a read model: nothing in the log says which portal entries were seen, how far a paged read
got or which projects an operator marked for publication, so these tables live on metadata of
their own (like ``handlers.tokens``) and a rebuild, which empties the tables of
``SQLModel.metadata``, leaves them alone. Migrations ``0007_portal`` and
``0008_portal_publications`` create them.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, Column, Text
from sqlmodel import Field, Session, SQLModel, col, select

from handlers.institutions import UtcDateTime

PORTAL = sa.MetaData()


class _PortalState(SQLModel):
    metadata = PORTAL


class PortalCursor(_PortalState, table=True):
    """How far the sync of one portal got: ``cursor`` while a paged read is under way,
    ``high_water`` the newest ``updated_at`` fully applied (the next sync's ``updated_since``)."""

    __tablename__ = "portal_cursors"

    portal: str = Field(primary_key=True, max_length=2048)
    updated_since: str | None = Field(default=None, max_length=64)
    """The ``updated_since`` of the paged read under way."""
    cursor: str | None = Field(default=None, max_length=2048)
    high_water: str | None = Field(default=None, max_length=64)
    mapping: str | None = Field(default=None, max_length=64)
    """A hash of the business id → member map the last sync used: when members gain or lose a
    business id, entries skipped as unmapped may map now, so the next sync reads everything."""
    saved_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


class PortalEntry(_PortalState, table=True):
    """A portal entry the connector turned into a project, as it last emitted it."""

    __tablename__ = "portal_entries"

    portal: str = Field(primary_key=True, max_length=2048)
    entry_id: str = Field(primary_key=True, max_length=256)
    project_id: str = Field(index=True, max_length=128)
    owner: str = Field(max_length=63)
    content_hash: str = Field(max_length=64)
    revision: int
    """How many events the entry has produced (registered + updates)."""
    data: dict[str, Any] = Field(sa_column=Column(JSON, nullable=False))
    """The project's facts as last emitted (what the next change is computed against)."""
    etag: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    """The version the portal gave the entry (its ETag, opaque: of any length)."""
    synced_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))


class PortalPublication(_PortalState, table=True):
    """A project of the network marked for publication on a portal, and how far that got.

    ``entry_id`` is None until the entry exists on the portal. ``pushed`` holds the entry's
    writable fields as the connector last wrote (or agreed with) them and ``etag`` the version
    they were written as: the base of the three-way merge when the project changes."""

    __tablename__ = "portal_publications"

    portal: str = Field(primary_key=True, max_length=2048)
    project_id: str = Field(primary_key=True, max_length=128)
    entry_type: str = Field(max_length=16)
    entry_id: str | None = Field(default=None, index=True, max_length=256)
    etag: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    pushed: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    announced: bool = False
    """The ``innokyla`` external reference was accepted into the log."""
    waiting_for: str | None = Field(default=None, max_length=128)
    """An event the connector emitted about the project: pushes wait until the read model has it,
    so a project read before it is applied never undoes it on the portal."""
    marked_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    attempted_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    """When the entry was last being created (a claim: another process leaves it alone a while)."""
    pushed_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    error: str | None = Field(default=None, max_length=2048)
    """Why the last push did not happen (e.g. the owner has no business id)."""


def load_cursor(session: Session, portal: str) -> PortalCursor:
    """The portal's cursor row (a fresh one when it was never synced)."""
    return session.get(PortalCursor, portal) or PortalCursor(portal=portal, saved_at=datetime.now(UTC))


def save_cursor(session: Session, cursor: PortalCursor) -> None:
    cursor.saved_at = datetime.now(UTC)
    session.merge(cursor)


def known_entries(session: Session, portal: str, entry_ids: Iterable[str]) -> dict[str, PortalEntry]:
    """The stored state of those entries that were synced before."""
    ids = list(entry_ids)
    if not ids:
        return {}
    rows = session.exec(select(PortalEntry).where(PortalEntry.portal == portal, col(PortalEntry.entry_id).in_(ids)))
    return {row.entry_id: row for row in rows}


def entry_of_project(session: Session, project_id: str) -> PortalEntry | None:
    """The portal entry a project came from, if it came from one."""
    return session.exec(select(PortalEntry).where(PortalEntry.project_id == project_id)).first()


def publications(session: Session, portal: str) -> list[PortalPublication]:
    """The portal's publications, oldest mark first."""
    query = select(PortalPublication).where(PortalPublication.portal == portal).order_by(col(PortalPublication.marked_at))
    return list(session.exec(query))
