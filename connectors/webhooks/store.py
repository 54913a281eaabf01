"""Webhook endpoints, the deliveries owed to them and every attempt made, in the bus's database.

Like the HTTP tokens, these tables are not a read model: nothing in the log can restore an
endpoint's secret or what was already delivered. They live on metadata of their own
(:data:`WEBHOOKS`, created by migration ``0006``) so ``collabbus rebuild``, which empties every
table of ``SQLModel.metadata``, leaves them alone — the webhooks consumer's position included, so
a rebuild does not replay the log into deliveries.

A delivery is owed while it has a ``next_attempt_at``; the body is not stored: it is the event's
canonical bytes, read back from the log by sequence.

What an endpoint is owed depends on where an event is in the log, not on when the recorder gets
to it (:func:`owes`): the events logged after it was registered (``after_seq``), except those
logged while it was disabled — after where the log was when it was disabled
(``disabled_after_seq``), up to where it was when it was enabled again (``enabled_after_seq``).
Those are what ``/recover`` is for. A disabled endpoint is owed what was logged before it was
disabled, sent once it is enabled again.

Deliveries about one thing (an event's domain and subject: a project, a call, a validation, a
day, a member) go to an endpoint in log order: one is not sent while an earlier one about the
same thing is still owed to that endpoint (in flight, or waiting for its retry). Deliveries
about different things go in parallel, and so does everything for an endpoint its owner made
unordered (``ordered``: a receiver that orders by itself need not wait behind a failing event).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy import JSON, Column, Connection
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Field, Session, SQLModel, col, select

from connectors.webhooks.signing import new_secret
from handlers.bookkeeping import advance_position, claim_position, parked, read_position, take_position
from handlers.institutions import UtcDateTime

#: The webhook tables, kept out of the read models' metadata (see the module docstring).
WEBHOOKS = sa.MetaData()

PENDING, DELIVERED, FAILED, CANCELLED = "pending", "delivered", "failed", "cancelled"
DeliveryStatus = Literal["pending", "delivered", "failed", "cancelled"]
"""``failed``: the bus gave it up (its retry schedule ended, the endpoint answered 410, the bus
stopped during its last attempt); ``cancelled``: its endpoint's owner did (by hand, or by no
longer asking for its type), so it is no part of what the endpoint missed."""

OWNER, FILTER = "owner", "filter"
CancelledBy = Literal["owner", "filter"]
"""How its owner cancelled a delivery (``cancelled_by``): ``owner``, by hand (``…/cancel``);
``filter``, by changing the endpoint's ``event_types`` so that they no longer ask for its type."""


class _Webhooks(SQLModel):
    metadata = WEBHOOKS


def _when(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(UtcDateTime(), nullable=nullable))


class Endpoint(_Webhooks, table=True):
    """A URL of an institution that receives the events it asked for."""

    __tablename__ = "webhook_endpoints"

    id: str = Field(primary_key=True, max_length=32)
    institution: str = Field(index=True, max_length=63)
    url: str = Field(max_length=2048)
    event_types: list[str] = Field(sa_column=Column(JSON, nullable=False))
    """Types and domain wildcards (``project.*``); empty: every event."""
    description: str = Field(default="", max_length=1000)
    secret: str = Field(max_length=128)
    previous_secret: str | None = Field(default=None, max_length=128)
    previous_secret_until: datetime | None = _when()
    """Until then the secret replaced by a rotation still signs too."""
    enabled: bool = True
    ordered: bool = Field(default=True, sa_column=Column(sa.Boolean(), nullable=False, server_default=sa.true()))
    """Deliveries about one thing go in log order (see the module); false: all in any order."""
    disabled_reason: str | None = Field(default=None, max_length=200)
    disabled_at: datetime | None = _when()
    """When it was last disabled; kept once it is enabled again, so that ``/recover`` from then
    fetches what it missed."""
    after_seq: int = 0
    """Events logged after this sequence are delivered: an endpoint starts with the log as it is."""
    disabled_after_seq: int | None = None
    """Where the log was when it was last disabled: the events up to there are owed to it (sent
    once it is enabled again), the later ones not while it is disabled."""
    enabled_after_seq: int | None = None
    """Where the log was when it was last enabled again (None while it is disabled): the events
    after it are owed again; those between the two are the gap ``/recover`` fetches."""
    earlier_gaps: list[list[int]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False, server_default="[]"))
    """The (``disabled_after_seq``, ``enabled_after_seq``) of its earlier disablings: an event the
    recorder gets to late (one behind, a dead letter replayed) is not owed for one of those either.
    Only those it may still get to an event of are kept (:func:`disabled_where`)."""
    created_at: datetime = _when(nullable=False)
    updated_at: datetime = _when(nullable=False)
    last_success_at: datetime | None = _when()
    failing_since: datetime | None = _when()
    """The first failed attempt of its current run of failures (None while healthy): since the last
    success, a new URL, or a pause longer than the retry schedule allows between two attempts."""
    last_failure_at: datetime | None = _when()
    """Its last failed attempt: a failure long after it starts a new run (``failing_since``)."""

    def signing_secrets(self, now: datetime) -> tuple[str, ...]:
        """The secrets that sign a delivery now: the current one, and the previous one for a day
        after a rotation."""
        return signing_secrets(self.secret, self.previous_secret, self.previous_secret_until, now)

    def owes(self, seq: int) -> bool:
        """Whether the endpoint is owed the event at ``seq`` of the log (:func:`owes`)."""
        return owes(self.after_seq, self.disabled_after_seq, self.enabled_after_seq, self.earlier_gaps, seq)


def owes(after_seq: int, disabled_after_seq: int | None, enabled_after_seq: int | None, earlier_gaps: Sequence[Sequence[int]],
         seq: int) -> bool:
    """Whether an endpoint (its positions in the log: see :class:`Endpoint`) is owed the event at
    ``seq``: one logged after it was registered, and neither while it is disabled nor in a gap of
    an earlier disabling. Where the event is in the log decides, not when the recorder gets to it."""
    if seq <= after_seq:
        return False
    if disabled_after_seq is not None and disabled_after_seq < seq and (enabled_after_seq is None or seq <= enabled_after_seq):
        return False
    return not any(disabled < seq <= enabled for disabled, enabled in earlier_gaps)


def disabled_where(disabled_after_seq: int | None, enabled_after_seq: int | None, earlier_gaps: Sequence[Sequence[int]],
                   at: int, settled: int = 0) -> tuple[int, list[list[int]]]:
    """The ``disabled_after_seq`` and ``earlier_gaps`` of an endpoint disabled where the log is at
    ``at``: the gap of a disabling before (enabled again since) joins the earlier ones; one
    disabled already stays so from the earlier of the two places (its institution leaving, say).
    A gap is kept only while the recorder may still get to an event in it: the gaps that end at or
    before ``settled`` (:func:`settled_up_to`) are dropped — one is added each time the endpoint
    is enabled again and disabled, and they would grow for ever."""
    gaps = [list(gap) for gap in earlier_gaps]
    if disabled_after_seq is not None and enabled_after_seq is not None:
        gaps.append([disabled_after_seq, enabled_after_seq])
    elif disabled_after_seq is not None:
        at = min(at, disabled_after_seq)
    return at, [gap for gap in gaps if gap[1] > settled]


def settled_up_to(connection: Connection, consumer: str, recorded: int | None = None) -> int:
    """The place in the log up to which the webhooks' recorder ``consumer`` will record nothing
    more: what it recorded (its position), but for the events it set aside behind a dead letter
    (recorded when the operator replays them), from the first of them on. What an endpoint is
    owed of the events up to there is settled, so the gaps of its disablings there are no longer
    needed (:func:`disabled_where`). ``recorded``: the recorder's position, when read already."""
    if recorded is None:
        recorded = read_position(connection, ConsumerPosition.__table__, consumer)  # type: ignore[attr-defined]
    aside = [first for _, _, _, first, _ in parked(connection, consumer)]
    return min([recorded, *(first - 1 for first in aside)])


def signing_secrets(secret: str, previous: str | None, previous_until: datetime | None, now: datetime) -> tuple[str, ...]:
    """:meth:`Endpoint.signing_secrets` of an endpoint's columns."""
    if previous and previous_until and now < previous_until:
        return (secret, previous)
    return (secret,)


class Delivery(_Webhooks, table=True):
    """One event owed (or delivered) to one endpoint; at most one per (endpoint, event)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        sa.UniqueConstraint("endpoint_id", "event_id", name="uq_webhook_deliveries_endpoint_event"),
        sa.Index("ix_webhook_deliveries_due", "endpoint_id", "next_attempt_at"),
        sa.Index("ix_webhook_deliveries_order", "endpoint_id", "ordering_key", "seq"),
        # What is still owed, by key: what an ordered endpoint's claim asks of each delivery due
        # (without walking the key's delivered history).
        sa.Index("ix_webhook_deliveries_owed", "endpoint_id", "ordering_key", "seq",
                 sqlite_where=sa.text("next_attempt_at IS NOT NULL"), postgresql_where=sa.text("next_attempt_at IS NOT NULL")),
    )

    id: int | None = Field(default=None, primary_key=True)
    endpoint_id: str = Field(foreign_key="webhook_endpoints.id", max_length=32)
    event_id: str = Field(max_length=128)
    event_type: str = Field(max_length=64)
    seq: int
    """Where the event is in the log."""
    ordering_key: str | None = Field(default=None, max_length=200)
    """What the event is about (:func:`ordering_key`): deliveries with the same key go in log
    order. None for deliveries recorded before there was one (they go in any order)."""
    status: str = Field(default=PENDING, max_length=16)
    cancelled_by: str | None = Field(default=None, max_length=16)
    """A cancelled delivery's :data:`CancelledBy`; None for any other (and for one cancelled
    before it was kept)."""
    attempts: int = 0
    """Attempts made in this round of the retry schedule (a resend starts a new round)."""
    next_attempt_at: datetime | None = _when()
    created_at: datetime = _when(nullable=False)
    delivered_at: datetime | None = _when()


class Attempt(_Webhooks, table=True):
    """One HTTP attempt of a delivery, whatever came of it."""

    __tablename__ = "webhook_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: int = Field(foreign_key="webhook_deliveries.id", index=True)
    attempted_at: datetime = _when(nullable=False)
    status_code: int | None = None
    latency_ms: int = 0
    error: str | None = Field(default=None, max_length=500)
    response: str | None = Field(default=None, max_length=1024)
    """The first KiB of the response body."""


class ConsumerPosition(_Webhooks, table=True):
    """The last log sequence the webhooks consumer has recorded deliveries for (the shape of
    ``handlers.bookkeeping.ConsumerPosition``, kept here so a rebuild does not reset it)."""

    __tablename__ = "webhook_consumer_positions"

    consumer: str = Field(primary_key=True, max_length=64)
    seq: int = 0
    epoch: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


# --- endpoints ------------------------------------------------------------------------------------


def create_endpoint(
    session: Session, institution: str, url: str, event_types: list[str], description: str, *, after_seq: int, now: datetime,
    ordered: bool = True,
) -> Endpoint:
    """A new, enabled endpoint with a fresh secret."""
    endpoint = Endpoint(
        id="ep_" + secrets.token_hex(10), institution=institution, url=url, event_types=event_types,
        description=description, secret=new_secret(), after_seq=after_seq, created_at=now, updated_at=now, ordered=ordered,
    )
    session.add(endpoint)
    return endpoint


def endpoint_of(session: Session, institution: str, endpoint_id: str) -> Endpoint | None:
    """The endpoint, when it belongs to ``institution``."""
    endpoint = session.get(Endpoint, endpoint_id)
    return endpoint if endpoint is not None and endpoint.institution == institution else None


def disable(endpoint: Endpoint, reason: str, now: datetime, *, after_seq: int, settled: int = 0) -> None:
    """Disable the endpoint where the log is at ``after_seq``: the events up to there stay owed to
    it (``settled``: see :func:`disabled_where`)."""
    endpoint.disabled_after_seq, endpoint.earlier_gaps = disabled_where(
        endpoint.disabled_after_seq, endpoint.enabled_after_seq, endpoint.earlier_gaps, after_seq, settled)
    endpoint.enabled, endpoint.enabled_after_seq = False, None
    endpoint.disabled_reason, endpoint.disabled_at, endpoint.updated_at = reason[:200], now, now


def enable(endpoint: Endpoint, now: datetime, *, after_seq: int) -> None:
    """Enable the endpoint again where the log is at ``after_seq``: the events after it are owed
    again (those since it was disabled are not: ``/recover`` fetches them). Its failures are
    forgotten: it is not failing since before it was disabled."""
    endpoint.enabled, endpoint.disabled_reason, endpoint.failing_since, endpoint.updated_at = True, None, None, now
    endpoint.enabled_after_seq = max(after_seq, endpoint.disabled_after_seq or 0)


def hold_recorded(session: Session, consumer: str) -> int:
    """The position of the webhooks' recorder ``consumer``, held until the transaction ends (the
    row locked on PostgreSQL, as the recorder locks it for each batch; a SQLite writer holds the
    database): an endpoint disabled or enabled in this transaction is so for the recorder from one
    place of the log on, neither in the middle of a batch nor behind what it recorded already."""
    table: sa.Table = ConsumerPosition.__table__  # type: ignore[attr-defined]
    found = session.execute(sa.select(table.c.seq).where(table.c.consumer == consumer).with_for_update()).first()
    return int(found[0] or 0) if found is not None else 0


GONE_REASON = "the endpoint answered 410 Gone"
OWNER_REASON = "disabled by its owner"
LEFT_REASON = "the institution left the network"
FAILING_REASON = "no successful delivery for {days:g} days"
"""Why an endpoint was disabled, as ``disabled_reason`` says (``days``: the failing limit)."""

DisabledCause = Literal["gone", "failing", "owner", "left", "other"]


def disabled_cause(reason: str | None) -> DisabledCause:
    """A disabling reason as one of a few words (``/metrics`` labels by it): ``gone`` (410),
    ``failing`` (no success for the failing limit), ``owner``, ``left`` (the institution left the
    network), ``other`` (a reason recorded otherwise)."""
    if reason == GONE_REASON:
        return "gone"
    if reason == OWNER_REASON:
        return "owner"
    if reason == LEFT_REASON:
        return "left"
    if reason is not None and reason.startswith(FAILING_REASON.partition("{")[0]):
        return "failing"
    return "other"


def delete_endpoint(session: Session, endpoint: Endpoint) -> None:
    """Forget the endpoint with its deliveries and their attempts."""
    deliveries = select(Delivery.id).where(Delivery.endpoint_id == endpoint.id)
    session.execute(sa.delete(Attempt).where(col(Attempt.delivery_id).in_(deliveries)))
    session.execute(sa.delete(Delivery).where(col(Delivery.endpoint_id) == endpoint.id))
    session.delete(endpoint)


def matches(event_types: Sequence[str], event_type: str) -> bool:
    """Whether an endpoint asking for ``event_types`` wants events of ``event_type``."""
    return not event_types or any(
        wanted == event_type or (wanted.endswith(".*") and event_type.startswith(wanted[:-1])) for wanted in event_types
    )


# --- deliveries -----------------------------------------------------------------------------------


def insert_ignore(session: Session, table: type[SQLModel], rows: list[dict[str, Any]], keys: list[str]) -> int:
    """Insert ``rows``, leaving out those whose ``keys`` are already there; returns how many went in."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect in ("sqlite", "postgresql"):
        module: Any = sqlite if dialect == "sqlite" else postgresql
        # One cached statement, executed for every row at once (a multi-row VALUES would be
        # compiled anew for each number of rows).
        statement = module.insert(table.__table__).on_conflict_do_nothing(index_elements=keys)  # type: ignore[attr-defined]
        # A count the driver does not know (-1: psycopg's for a single row) is taken as all of them:
        # what is owed wakes the dispatcher, and waking it for nothing costs a look.
        count = session.execute(statement, rows[0] if len(rows) == 1 else rows).rowcount  # type: ignore[attr-defined]
        return int(count) if count is not None and count >= 0 else len(rows)
    inserted = 0
    for row in rows:  # other databases: portable, slower
        if session.exec(select(table).filter_by(**{key: row[key] for key in keys})).first() is None:
            session.add(table(**row))
            inserted += 1
    return inserted


def ordering_key(envelope: dict[str, Any]) -> str:
    """What an event is about: its type's domain and its subject (``project/p-123``)."""
    return f"{str(envelope.get('type')).split('.', 1)[0]}/{envelope.get('subject')}"


def owe(session: Session, endpoint_ids: Iterable[str], envelope: dict[str, Any], seq: int, at: datetime) -> int:
    """Record the event as owed to each endpoint (once: a replay adds nothing)."""
    key = ordering_key(envelope)
    rows = [
        {
            "endpoint_id": endpoint_id, "event_id": str(envelope.get("id")), "event_type": str(envelope.get("type")),
            "seq": seq, "ordering_key": key, "status": PENDING, "attempts": 0, "next_attempt_at": at, "created_at": at,
        }
        for endpoint_id in endpoint_ids
    ]
    return insert_ignore(session, Delivery, rows, ["endpoint_id", "event_id"])


def owe_again(session: Session, endpoint_id: str, events: Sequence[tuple[int, dict[str, Any]]], at: datetime) -> int:
    """Owe (seq, envelope) events to the endpoint from a new round of the schedule, whether or
    not they were delivered before; returns how many."""
    ids = [str(envelope.get("id")) for _, envelope in events]
    known = set(
        session.exec(select(Delivery.event_id).where(Delivery.endpoint_id == endpoint_id, col(Delivery.event_id).in_(ids))).all()
    )
    if known:
        session.execute(
            sa.update(Delivery)
            .where(col(Delivery.endpoint_id) == endpoint_id, col(Delivery.event_id).in_(known))
            .values(status=PENDING, cancelled_by=None, attempts=0, next_attempt_at=at)
        )
    for seq, envelope in events:
        if envelope.get("id") not in known:
            owe(session, [endpoint_id], envelope, seq, at)
    return len(events)


def requeue(delivery: Delivery, at: datetime) -> None:
    """Send the delivery again, from a new round of the schedule."""
    delivery.status, delivery.cancelled_by, delivery.attempts, delivery.next_attempt_at = PENDING, None, 0, at


def cancel_unwanted(session: Session, endpoint_id: str, event_types: Sequence[str]) -> int:
    """Cancel the endpoint's deliveries still owed (due, waiting for a retry or behind another,
    owed from before it was disabled) of the types ``event_types`` no longer asks for; returns
    how many. One under way ends as a cancelled one does (:class:`Delivery`)."""
    owed = sa.and_(col(Delivery.endpoint_id) == endpoint_id, col(Delivery.next_attempt_at).is_not(None))
    types = session.exec(select(Delivery.event_type).where(owed).distinct()).all()
    unwanted = [event_type for event_type in types if not matches(event_types, event_type)]
    if not unwanted:
        return 0
    done = session.execute(sa.update(Delivery).where(owed, col(Delivery.event_type).in_(unwanted))
                           .values(status=CANCELLED, cancelled_by=FILTER, next_attempt_at=None))
    return int(done.rowcount)  # type: ignore[attr-defined]


def cancel(delivery: Delivery) -> None:
    """Attempt the delivery no more, as its endpoint's owner asks (``cancelled``, not ``failed``:
    the bus did not give it up): deliveries held back behind it go."""
    delivery.status, delivery.cancelled_by, delivery.next_attempt_at = CANCELLED, OWNER, None


# --- what the dispatcher runs: Core statements, compiled once and cached ---------------------------

_ENDPOINTS: sa.Table = Endpoint.__table__  # type: ignore[attr-defined]
_DELIVERIES: sa.Table = Delivery.__table__  # type: ignore[attr-defined]
_ATTEMPTS: sa.Table = Attempt.__table__  # type: ignore[attr-defined]
_E, _D = _ENDPOINTS.c, _DELIVERIES.c

ENDPOINTS_OWING = sa.select(
    _E.id, _E.institution, _E.event_types, _E.after_seq, _E.enabled, _E.disabled_after_seq, _E.enabled_after_seq, _E.earlier_gaps,
).where(sa.or_(_E.enabled == True, _E.disabled_after_seq >= sa.bindparam("first")))  # noqa: E712
"""What the recorder needs of the endpoints that may be owed events from ``first`` on: the
enabled ones, and those disabled after it (owed what was logged before)."""
ENDPOINTS_TO_SEND = sa.select(_E.id, _E.url, _E.secret, _E.previous_secret, _E.previous_secret_until, _E.enabled, _E.ordered).where(
    _E.id.in_(sa.bindparam("ids", expanding=True))
)
"""Where and how to send, for the endpoints ``ids``."""
_EARLIER = _DELIVERIES.alias("earlier")
DUE_ANY_ORDER = (
    sa.select(_D.id, _D.event_id, _D.seq, _D.attempts, _D.next_attempt_at)
    .where(_D.endpoint_id == sa.bindparam("endpoint_id"), _D.next_attempt_at.is_not(None))
    .order_by(_D.next_attempt_at, _D.id)
    .limit(sa.bindparam("limit"))
    .with_for_update()
)
"""An endpoint's owed deliveries, the next due first (``limit`` of them)."""
DUE = DUE_ANY_ORDER.where(
    ~sa.exists().where(
        _EARLIER.c.endpoint_id == _D.endpoint_id,
        _EARLIER.c.ordering_key == _D.ordering_key,
        _EARLIER.c.seq < _D.seq,
        _EARLIER.c.next_attempt_at.is_not(None),
    )
)
"""The same, leaving out those waiting for an earlier delivery about the same thing (an
ordered endpoint's: see the module)."""
CLAIM = sa.update(_DELIVERIES).where(_D.id == sa.bindparam("b_id")).values(
    attempts=sa.bindparam("b_attempts"), next_attempt_at=sa.bindparam("b_next")
)
"""A delivery's attempts and next attempt (``b_id``, ``b_attempts``, ``b_next``): claimed, or given back."""
GIVE_UP = sa.update(_DELIVERIES).where(_D.id == sa.bindparam("b_id")).values(status=FAILED, next_attempt_at=None)
DELIVERED_NOW = sa.update(_DELIVERIES).where(_D.id == sa.bindparam("b_id")).values(
    status=DELIVERED, cancelled_by=None, delivered_at=sa.bindparam("b_at"), next_attempt_at=None
)
NOT_DELIVERED = sa.update(_DELIVERIES).where(_D.id == sa.bindparam("b_id")).values(
    status=sa.bindparam("b_status"), next_attempt_at=sa.bindparam("b_next")
)
ADD_ATTEMPT = sa.insert(_ATTEMPTS)
"""One attempt (``delivery_id``, ``attempted_at``, ``status_code``, ``latency_ms``, ``error``, ``response``)."""
RELEASE = CLAIM.where(_D.next_attempt_at == sa.bindparam("b_lease"))
"""A claim given back unattempted (``b_lease``: the next attempt the claim wrote), unless the
delivery was changed meanwhile."""
DELIVERIES_LEASED = (
    sa.select(_D.id, _D.next_attempt_at).where(_D.id.in_(sa.bindparam("ids", expanding=True))).with_for_update()
)
"""The next attempt of the deliveries ``ids`` that still exist: what a claim wrote, unless they
were changed meanwhile."""
ENDPOINTS_TO_SETTLE = (
    sa.select(_E.id, _E.institution, _E.enabled, _E.disabled_reason, _E.updated_at, _E.last_success_at, _E.failing_since,
              _E.last_failure_at, _E.disabled_after_seq, _E.enabled_after_seq, _E.earlier_gaps)
    .where(_E.id.in_(sa.bindparam("ids", expanding=True)))
    .with_for_update()
)
ENDPOINT_HEALTH = sa.update(_ENDPOINTS).where(_E.id == sa.bindparam("b_id")).values(
    last_success_at=sa.bindparam("b_last_success_at"), failing_since=sa.bindparam("b_failing_since"),
    last_failure_at=sa.bindparam("b_last_failure_at"),
)
ENDPOINT_DISABLED = sa.update(_ENDPOINTS).where(_E.id == sa.bindparam("b_id")).values(
    enabled=False,
    disabled_reason=sa.bindparam("b_disabled_reason"),
    disabled_at=sa.bindparam("b_updated_at"),
    updated_at=sa.bindparam("b_updated_at"),
    disabled_after_seq=sa.bindparam("b_disabled_after_seq"),
    enabled_after_seq=None,
    earlier_gaps=sa.bindparam("b_earlier_gaps", type_=JSON),
)
"""An endpoint disabled (see :func:`disabled_where` for ``b_disabled_after_seq`` and ``b_earlier_gaps``)."""


def disabled_row(endpoint_id: str, reason: str, now: datetime, positions: Mapping[str, Any], at: int,
                 settled: int = 0) -> dict[str, Any]:
    """The parameters of :data:`ENDPOINT_DISABLED` for an endpoint (``positions``: its
    ``disabled_after_seq``, ``enabled_after_seq`` and ``earlier_gaps``) disabled where the log is at
    ``at`` (``settled``: see :func:`disabled_where`)."""
    disabled_after_seq, gaps = disabled_where(positions["disabled_after_seq"], positions["enabled_after_seq"],
                                              positions["earlier_gaps"] or [], at, settled)
    return {"b_id": endpoint_id, "b_disabled_reason": reason, "b_updated_at": now, "b_disabled_after_seq": disabled_after_seq,
            "b_earlier_gaps": gaps}


PRUNE_BATCH = 1_000
"""Deliveries looked at (and the settled ones among them removed, with their attempts) in one transaction."""


def prune(connection: Connection, before: datetime, after: int = 0, limit: int = PRUNE_BATCH) -> tuple[int, int | None]:
    """Of the ``limit`` deliveries after id ``after`` (in the order they were owed), remove the
    settled ones (nothing more owed) owed before ``before``, with their attempts. Returns how many
    were removed and the id the next window starts after — None once this one reached a delivery
    owed since ``before`` (the rest are younger) or the end. Deliveries still owed stay, however
    old (an ordered endpoint's later deliveries wait for them)."""
    window = connection.execute(
        sa.select(_D.id, _D.created_at, _D.next_attempt_at).where(_D.id > after).order_by(_D.id).limit(limit)
    ).all()
    if not window:
        return 0, None
    since = before.replace(tzinfo=None) if window[0].created_at.tzinfo is None else before  # (SQLite hands back naive UTC)
    ids = [row.id for row in window if row.next_attempt_at is None and row.created_at < since]
    if ids:
        connection.execute(sa.delete(_ATTEMPTS).where(_ATTEMPTS.c.delivery_id.in_(ids)))
        connection.execute(sa.delete(_DELIVERIES).where(_D.id.in_(ids)))
    reached = window[-1].created_at >= since or len(window) < limit
    return len(ids), None if reached else window[-1].id


def waiting_for(session: Session, deliveries: Sequence[Delivery]) -> dict[int, tuple[int, datetime]]:
    """Of ``deliveries`` (one ordered endpoint's), those held back by an earlier delivery about the
    same thing still owed: the id of the oldest such, which goes first, and when it is next tried."""
    owed = [d for d in deliveries if d.next_attempt_at is not None and d.ordering_key is not None and d.id is not None]
    if not owed:
        return {}
    head_seq = (
        sa.select(sa.func.min(_EARLIER.c.seq))
        .where(_EARLIER.c.endpoint_id == _D.endpoint_id, _EARLIER.c.ordering_key == _D.ordering_key,
               _EARLIER.c.next_attempt_at.is_not(None))
        .scalar_subquery()
    )
    heads = {  # ordering key -> (seq, id, next attempt) of its oldest owed delivery
        key: (seq, delivery_id, due) for key, seq, delivery_id, due in session.execute(
            sa.select(_D.ordering_key, _D.seq, _D.id, _D.next_attempt_at).where(
                _D.endpoint_id == owed[0].endpoint_id, _D.ordering_key.in_({d.ordering_key for d in owed}),
                _D.next_attempt_at.is_not(None), _D.seq == head_seq)  # (a head is owed: only those are looked at)
        )
    }
    return {d.id: (heads[d.ordering_key][1], heads[d.ordering_key][2]) for d in owed  # type: ignore[index, misc]
            if d.ordering_key in heads and heads[d.ordering_key][0] < d.seq}


def attempts_of(session: Session, delivery_ids: Sequence[int]) -> dict[int, list[Attempt]]:
    """Every attempt of the deliveries, in order."""
    found: dict[int, list[Attempt]] = {delivery_id: [] for delivery_id in delivery_ids}
    rows = session.exec(select(Attempt).where(col(Attempt.delivery_id).in_(delivery_ids)).order_by(col(Attempt.id))).all()
    for row in rows:
        found[row.delivery_id].append(row)
    return found


def position(session: Session, consumer: str) -> int:
    return read_position(session.connection(), ConsumerPosition.__table__, consumer)  # type: ignore[attr-defined]


def take(session: Session, consumer: str) -> int:
    """Take ``consumer``'s position over for this process (:func:`~handlers.bookkeeping.take_position`)."""
    return take_position(session.connection(), ConsumerPosition.__table__, consumer)  # type: ignore[attr-defined]


def claim(session: Session, consumer: str, first: int | None, epoch: int | None) -> None:
    """Hold ``consumer``'s position for this transaction, which records the log from ``first`` on
    (:func:`~handlers.bookkeeping.claim_position`: another process that took it over or recorded
    it meanwhile is found, and nothing is recorded twice)."""
    claim_position(session.connection(), ConsumerPosition.__table__, consumer, first, epoch)  # type: ignore[attr-defined]


def advance(session: Session, consumer: str, seq: int) -> None:
    advance_position(session.connection(), ConsumerPosition.__table__, consumer, seq)  # type: ignore[attr-defined]
