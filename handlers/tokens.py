"""HTTP tokens of the institutions (CONTRACT §6): who a ``Bearer`` token speaks for.

A token is ``cb_`` + 32 random bytes (URL-safe base64); only its SHA-256 is stored, so a copy of
the database gives nobody a working token.

Tokens are credentials, not a read model: nothing in the log can restore them. Their table
therefore lives on metadata of its own (:data:`CREDENTIALS`) so that a rebuild, which empties
every table of ``SQLModel.metadata``, leaves them alone, and table checksums of a rebuilt
database still compare equal. Migration ``0005`` creates it.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy import Column
from sqlmodel import Field, Session, SQLModel, col, select

from handlers.institutions import UtcDateTime

PREFIX = "cb_"
CALENDAR_PREFIX = "cbcal_"
"""A calendar token's: it reads the calendar feed only (``/innovation-days.ics?token=``), whose URL
a member hands to calendar services and may be seen by others; it publishes and reads nothing
else. (Not ``cb_``'s start: a member's token never passes for one.)"""

#: Tables of credentials, kept out of the read models' metadata (see the module docstring).
CREDENTIALS = sa.MetaData()


class _Credentials(SQLModel):
    metadata = CREDENTIALS


class InstitutionToken(_Credentials, table=True):
    """One token of an institution; revoked ones are kept for the record."""

    __tablename__ = "institution_tokens"

    token_hash: str = Field(primary_key=True, min_length=64, max_length=64)
    """SHA-256 of the token, hex."""
    institution: str = Field(index=True, max_length=63)
    created_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    expires_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    """None: valid until revoked."""
    label: str | None = Field(default=None, max_length=100)
    """Whose or what for, as the operator said when issuing it (``--label``)."""


def token_hash(token: str) -> str:
    """What is stored of a token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def issue(session: Session, institution: str, *, valid_for: timedelta | None = None, label: str | None = None,
          calendar: bool = False) -> str:
    """A new token for ``institution`` (valid for ``valid_for`` when given, else until revoked;
    ``label``: whose or what for; ``calendar``: one that reads the calendar feed only); the only
    moment the token itself exists in clear."""
    token = (CALENDAR_PREFIX if calendar else PREFIX) + secrets.token_urlsafe(32)
    now = datetime.now(timezone.utc)
    session.add(InstitutionToken(token_hash=token_hash(token), institution=institution, created_at=now,
                                 expires_at=now + valid_for if valid_for is not None else None, label=label))
    return token


_VALID = sa.and_(  # (at the time bound as ``now``)
    col(InstitutionToken.revoked_at).is_(None),
    sa.or_(col(InstitutionToken.expires_at).is_(None), col(InstitutionToken.expires_at) > sa.bindparam("now")),
)
_HOLDER = sa.select(InstitutionToken.institution, InstitutionToken.expires_at).where(  # type: ignore[call-overload]
    InstitutionToken.token_hash == sa.bindparam("token_hash"), _VALID,
)
_VALID_EXPIRIES = sa.select(InstitutionToken.institution, InstitutionToken.expires_at).where(_VALID)  # type: ignore[call-overload]
_ENDED = sa.select(InstitutionToken.revoked_at, InstitutionToken.expires_at).where(  # type: ignore[call-overload]
    InstitutionToken.token_hash == sa.bindparam("token_hash")
)


def _well_formed(token: str) -> bool:
    return token.startswith((PREFIX, CALENDAR_PREFIX)) and len(token) <= 128


def calendar_only(token: str) -> bool:
    """Whether ``token`` reads the calendar feed only (:data:`CALENDAR_PREFIX`)."""
    return token.startswith(CALENDAR_PREFIX)


def institution_of(connection: sa.Connection, token: str) -> str | None:
    """The institution a valid token speaks for; None for an unknown, revoked or expired token."""
    held = holder_of(connection, token)
    return held[0] if held is not None else None


def holder_of(connection: sa.Connection, token: str) -> tuple[str, datetime | None] | None:
    """The institution a valid token speaks for and when the token expires (None: valid until
    revoked); None for an unknown, revoked or expired token. One indexed read on a plain
    connection: the HTTP gateway checks every request."""
    if not _well_formed(token):
        return None
    row = connection.execute(_HOLDER, {"token_hash": token_hash(token), "now": datetime.now(timezone.utc)}).first()
    return (str(row[0]), row[1]) if row is not None else None


def valid_expiries(connection: sa.Connection) -> list[tuple[str, datetime | None]]:
    """``(institution, expires_at)`` of every token valid now (``expires_at`` None: until revoked)."""
    return [(institution, expires) for institution, expires in connection.execute(_VALID_EXPIRIES, {"now": datetime.now(timezone.utc)})]


def is_valid(row: InstitutionToken, now: datetime) -> bool:
    """Whether ``row``'s token is valid at ``now`` (the same rule as :func:`institution_of`'s)."""
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


def why_refused(connection: sa.Connection, token: str) -> str:
    """Why :func:`institution_of` found no institution for ``token``, for the caller to read."""
    found = connection.execute(_ENDED, {"token_hash": token_hash(token)}).first() if _well_formed(token) else None
    if found is None:
        return "the token is unknown"
    if found.revoked_at is not None:
        return f"the token was revoked at {found.revoked_at.isoformat(timespec='seconds')}"
    return f"the token expired at {found.expires_at.isoformat(timespec='seconds')}; `collabbus institutions token ID` issues a new one"


def tokens_of(session: Session, institution: str) -> list[InstitutionToken]:
    """Every token issued to ``institution``, revoked ones included, oldest first."""
    return list(session.exec(
        select(InstitutionToken).where(InstitutionToken.institution == institution)
        .order_by(col(InstitutionToken.created_at), col(InstitutionToken.token_hash))
    ).all())


def revoke(session: Session, token: str) -> bool:
    """Revoke a token; False when it was unknown or already revoked."""
    return revoke_hash(session, token_hash(token))


def revoke_hash(session: Session, hashed: str) -> bool:
    """Revoke the token whose SHA-256 is ``hashed``; False when it was unknown or already revoked."""
    row = session.get(InstitutionToken, hashed)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = datetime.now(timezone.utc)
    session.add(row)
    return True


def revoke_all(session: Session, institution: str) -> int:
    """Revoke every token of an institution (e.g. when it leaves); returns how many."""
    rows = session.exec(
        select(InstitutionToken).where(InstitutionToken.institution == institution, col(InstitutionToken.revoked_at).is_(None))
    ).all()
    now = datetime.now(timezone.utc)
    for row in rows:
        row.revoked_at = now
        session.add(row)
    return len(rows)
