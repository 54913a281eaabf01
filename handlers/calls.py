"""Calls and applications to them: the read model, the workflow's glue, and the deadline timer.

The decisions are in :mod:`handlers.rules.calls`; this module loads their snapshots, turns their
answers into events, and projects the events. A call belongs to its publisher: the workflow's
events about it are emitted in the publisher's name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy import JSON, Column
from sqlmodel import Field, Session, col, select

from handlers import confidential
from handlers.institutions import Institution, Leaving, UtcDateTime, column_values, leaving, member, member_ids, upsert
from handlers.network import Context, Decider, Event, Projection, Reads, Timer, named, named_in, sender
from handlers.projects import parties as project_parties, project_ids_of
from handlers.session import children
from handlers.words import SEARCHED, trigram_index, words
from handlers.rows import TableRow
from handlers.rules import Refusal, since
from handlers.rules import calls as rules
from handlers.rules.calls import Applicant, ApplicationSnapshot, CallSnapshot, CallStatus
from schemas.calls import (
    ApplicationDecided,
    ApplicationLapsed,
    ApplicationRejected,
    ApplicationSubmitted,
    ApplicationWithdrawn,
    CallAmended,
    CallClosed,
    CallPublished,
    FullProposalSubmitted,
)
from schemas.common import nearest, unknown_name


class Call(TableRow, table=True):
    """A call as published and amended; its status is derived from the time (:meth:`status`)."""

    __tablename__ = "calls"
    __table_args__ = (
        # The calls the closing timer looks at every second: open ones (closed calls keep their
        # past deadlines, so the index on the deadline alone grows with the network's history).
        sa.Index("ix_calls_open_deadline", "deadline",
                 sqlite_where=sa.text("closed_at IS NULL"), postgresql_where=sa.text("closed_at IS NULL")),
        trigram_index("calls"),
    )

    call_id: str = Field(primary_key=True, max_length=128)
    owner: str = Field(index=True, max_length=63)
    """The publisher (source of ``call.published``)."""
    title: dict[str, str] = Field(sa_column=Column(JSON, nullable=False))
    summary: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    kind: str = Field(max_length=16)
    themes: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    eligible_kinds: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    eligible_countries: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    budget: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """``{amount, currency}``"""
    opens_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    deadline: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False, index=True))
    deadline_model: str = Field(max_length=16)
    full_proposal_deadline: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    """A two-stage call's deadline for full proposals."""
    url: str | None = Field(default=None, max_length=2048)
    published_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    closed_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    closed_reason: str | None = Field(default=None, max_length=16)
    awarded: str | None = Field(default=None, max_length=64)
    """What the call has awarded so far, in its budget's currency (decimal text; None: no award
    with an amount): an award is weighed against what is left of the budget."""
    words: str = Field(default="", exclude=True, sa_column=Column(sa.Text, nullable=False, server_default=""))
    """The title and summary as a search (``?q=``) reads them (:mod:`handlers.words`); no resource shows them."""

    def snapshot(self) -> CallSnapshot:
        """What the workflow rules see of this call."""
        return CallSnapshot(
            call_id=self.call_id,
            owner=self.owner,
            opens_at=self.opens_at,
            deadline=self.deadline,
            eligible_kinds=frozenset(self.eligible_kinds),
            eligible_countries=frozenset(self.eligible_countries),
            closed_at=self.closed_at,
            closed_reason=self.closed_reason,
            currency=self.budget.get("currency") if self.budget else None,
            budget=Decimal(self.budget["amount"]) if self.budget and self.budget.get("amount") is not None else None,
            awarded=Decimal(self.awarded or 0),
            two_stage=self.deadline_model == "two_stage",
            full_proposal_deadline=self.full_proposal_deadline,
        )

    def status(self, now: datetime) -> CallStatus:
        """``upcoming``, ``open`` or ``closed`` at ``now``."""
        return rules.call_status(self.snapshot(), now)

    def stage(self, now: datetime) -> rules.CallStage | None:
        """A two-stage call's stage at ``now`` (:func:`rules.call_stage`; None: a single-stage call)."""
        return rules.call_stage(self.snapshot(), now)


def status_is(status: CallStatus, now: datetime) -> sa.ColumnElement[bool]:
    """A WHERE clause selecting the calls whose :meth:`Call.status` at ``now`` is ``status``
    (for listing and paging in SQL); the same definition as :func:`rules.call_status`."""
    closed = sa.or_(col(Call.closed_at).is_not(None), col(Call.deadline) < now)
    if status == "closed":
        return closed
    if status == "upcoming":
        return sa.and_(sa.not_(closed), col(Call.opens_at) > now)
    return sa.and_(sa.not_(closed), col(Call.opens_at) <= now)


def application_counts(session: Session, calls: list[Call]) -> dict[str, dict[str, Any]]:
    """For each of ``calls``, how many applications it has in each status (and in all,
    ``total``), and what it has awarded so far (``awarded_amount``: in its budget's currency, or in
    that of its awards for a call without a budget; None: nothing awarded with an amount). For the
    call's publisher alone: how crowded a call is, is not its applicants' competitors' business."""
    ids = [call.call_id for call in calls]
    counts: dict[str, dict[str, Any]] = {call_id: {"total": 0} for call_id in ids}
    if not ids:
        return counts
    grouped = session.exec(
        select(CallApplication.call_id, CallApplication.status, sa.func.count())
        .where(col(CallApplication.call_id).in_(ids))
        .group_by(col(CallApplication.call_id), col(CallApplication.status))
    ).all()
    for call_id, status, count in grouped:
        counts[call_id][status] = count
        counts[call_id]["total"] += count
    # A call without a budget awards in the currency of its first award: its awards are read, in one query for the page.
    budgetless = [call.call_id for call in calls if call.awarded is not None and not call.budget]
    awards: dict[str, list[tuple[datetime | None, str, Mapping[str, str] | None]]] = {call_id: [] for call_id in budgetless}
    if budgetless:
        for call_id, decided_at, application_id, amount in session.exec(
            select(CallApplication.call_id, CallApplication.decided_at, CallApplication.application_id,
                   CallApplication.awarded_amount)
            .where(col(CallApplication.call_id).in_(budgetless), CallApplication.status == "awarded")
        ):
            awards[call_id].append((decided_at, application_id, amount))
    for call in calls:
        currency = None
        if call.awarded is not None:
            currency = call.budget["currency"] if call.budget else _first_award_currency(awards[call.call_id])
        counts[call.call_id]["awarded_amount"] = {"amount": call.awarded, "currency": currency} if currency is not None else None
    return counts


def _first_award_currency(awards: Iterable[tuple[datetime | None, str, Mapping[str, str] | None]]) -> str | None:
    """The currency of the first of a call's awards (``(decided_at, application_id,
    awarded_amount)``: logged first, then by id; one logged without its moment before any), that
    of a call without a budget's awards; None before an award names an amount."""
    firsts = sorted((at is not None, at, application_id, amount["currency"])
                    for at, application_id, amount in awards if amount is not None)
    return firsts[0][3] if firsts else None


class CallApplication(TableRow, table=True):
    """An application to a known call as it stands: the call's answer, then the publisher's
    decision or the applicant's withdrawal. A rejected one keeps why, and what it asked for as its
    rejection repeats it (rejections logged before they did keep only who applied), and may be
    submitted again under its id; any other keeps its id."""

    __tablename__ = "call_applications"

    call_id: str = Field(primary_key=True, max_length=128)
    application_id: str = Field(primary_key=True, max_length=128)
    applicant: str = Field(index=True, max_length=63)
    project_id: str | None = Field(default=None, max_length=128)
    partners: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    requested_amount: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    status: str = Field(index=True, max_length=16)
    """:data:`handlers.rules.calls.ApplicationStatus`"""
    reason: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """``{code, message}`` of a rejection."""
    submitted_at: datetime = Field(sa_column=Column(UtcDateTime(), nullable=False))
    decided_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    """When the publisher's decision, or the withdrawal, was logged."""
    awarded_amount: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """``{amount, currency}`` granted with an ``awarded`` decision, when it names one."""
    comment: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The decision's comment, or the reason given for the withdrawal (kept there too, as before
    :attr:`withdrawal_reason`)."""
    withdrawal_reason: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The reason the applicant gave for withdrawing the application."""
    invited_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    """When the invitation to a two-stage call's second stage was logged."""
    invitation_comment: dict[str, str] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The publisher's comment with its invitation."""
    full_proposal: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """``{summary, requested_amount, url}`` as the full proposal gave them."""
    full_proposal_at: datetime | None = Field(default=None, sa_column=Column(UtcDateTime(), nullable=True))
    """When the full proposal was logged."""

    def snapshot(self) -> ApplicationSnapshot:
        """What the workflow rules see of this application."""
        proposed = (self.full_proposal or {}).get("requested_amount")
        asked = proposed or self.requested_amount
        return ApplicationSnapshot(
            application_id=self.application_id,
            applicant=self.applicant,
            status=self.status,  # type: ignore[arg-type]
            partners=frozenset(self.partners),
            requested=(Decimal(asked["amount"]), asked["currency"]) if asked else None,
        )


def _snapshot(
    session: Session, call_id: str, *, received: bool = False, awarded_currency: bool = False, requested_currency: bool = False
) -> CallSnapshot | None:
    """What the workflow rules see of a call; with ``received``, whether it has an application
    standing (an amendment's currency depends on it), and with ``awarded_currency`` the
    currency of its first award (that of a call without a budget's awards; a decision's), with
    ``requested_currency`` (for a call without a budget, by rules 3) the currency its first
    application standing asks in (a request's, a full proposal's, a budget's given later). Each
    is a read of the call's applications, asked only by the events they judge: every application
    and answer reads the call."""
    call = session.get(Call, call_id)
    if call is None:
        return None
    snapshot = call.snapshot()
    # The call's applications as the batch has them, without a flush (a query would write every
    # row the batch holds first): read once, by the few events that weigh them.
    applications = children(session, CallApplication, "call_id", call_id) if received or awarded_currency or requested_currency else []
    if received:
        # Since rules 3, an application withdrawn, declined or lapsed is weighed no more (before,
        # every application the call received counted, whatever became of it).
        gone = rules.GONE if since(3) else frozenset({"rejected"})
        snapshot = replace(snapshot, received=any(a.status not in gone for a in applications))
    if awarded_currency and call.awarded is not None and snapshot.currency is None:
        snapshot = replace(snapshot, awarded_currency=_first_award_currency(
            (a.decided_at, a.application_id, a.awarded_amount) for a in applications if a.status == "awarded"))
    if requested_currency and snapshot.currency is None and since(3):
        asking = sorted((a.submitted_at, a.application_id, a.requested_amount["currency"])
                        for a in applications if a.status not in rules.GONE and a.requested_amount is not None)
        snapshot = replace(snapshot, requested_currency=asking[0][2] if asking else None)
    return snapshot


# --- workflow ------------------------------------------------------------------------------------


def _refuse_action(ctx: Context, call: CallSnapshot | None, refusal: Refusal, **extra: Any) -> None:
    """Refuse the current event about a call, in the owner's name (unknown call: the source's);
    ``extra``: more fields of ``call.action_rejected`` (the ``application_id`` a refused decision
    or withdrawal was about: its parties see the refusal when they saw what it refuses,
    :func:`audience`)."""
    assert ctx.event is not None
    if refusal.code == "unknown_call":
        refusal = _call_meant(ctx.session, refusal, ctx.event.data.call_id)
    ctx.refuse_action(refusal, source=call.owner if call is not None else ctx.event.source, **extra)


def decide_publication(ctx: Context) -> None:
    """A call id is published once."""
    assert ctx.event is not None
    data: CallPublished = ctx.event.data
    existing = _snapshot(ctx.session, data.call_id)
    refusal = rules.publication_refusal(existing, (Decimal(data.budget.amount), data.budget.currency) if data.budget else None)
    if refusal is not None:
        _refuse_action(ctx, existing, refusal)


def decide_application(ctx: Context) -> None:
    """Receive or reject an application, judged by the call and the applicant's membership."""
    event = ctx.event
    assert event is not None
    data: ApplicationSubmitted = event.data
    call = _snapshot(ctx.session, data.call_id, requested_currency=data.requested_amount is not None)
    applicant = _applicant(ctx.session, event.source)
    previous = ctx.session.get(CallApplication, (data.call_id, data.application_id))
    # A rejected application may be submitted again under its id, by its applicant: the id stays
    # its (another applicant taking it would take its rejection's record, and be shown its request).
    duplicate = previous is not None and (previous.status != "rejected" or (previous.applicant != event.source and since(1)))
    currency = data.requested_amount.currency if data.requested_amount is not None else None
    amount = Decimal(data.requested_amount.amount) if data.requested_amount is not None else None
    project = project_parties(ctx.session, data.project_id) if data.project_id is not None else None
    refusal = rules.application_refusal(
        call, applicant, event.logged_at, duplicate=duplicate, currency=currency, amount=amount,
        partners=[_applicant(ctx.session, partner) for partner in data.partners], project_id=data.project_id, project=project)
    refusal = _meant(ctx.session, refusal, data, event.source)
    answer = {"call_id": data.call_id, "application_id": data.application_id, "applicant": event.source}
    owner = call.owner if call is not None else event.source
    if refusal is None:
        ctx.emit("call.application_received", answer, source=owner)
    else:
        asked = column_values(data, data.model_fields_set & {"project_id", "partners", "requested_amount"})
        ctx.refuse("call.application_rejected", {**answer, "reason": refusal.as_reason(), **asked}, source=owner)


def _applicant(session: Session, institution: str) -> Applicant:
    """An institution as the rules see an applicant or a partner (its kind None: not a member)."""
    found = member(session, institution)
    return Applicant(institution=institution, kind=found.kind if found else None, country=found.country if found else None)


def _meant(session: Session, refusal: Refusal | None, data: ApplicationSubmitted, applicant: str) -> Refusal | None:
    """``refusal`` of a name that names nothing (a call, a partner, a project), with the nearest
    one that does, which is most often what was meant (a typo in an id): among the calls, the
    members, the projects the applicant owns or is a partner of."""
    if refusal is None:
        return None
    if refusal.code == "unknown_call":
        return _call_meant(session, refusal, data.call_id)
    if refusal.code == "unknown_partner":
        partner = next(p for p in data.partners if member(session, p) is None)
        return Refusal(refusal.code, unknown_name(partner, "a member of the network", member_ids(session),
                                                  " (a partner must be one: it sees the application)."))
    if refusal.code == "unknown_project" and data.project_id is not None:
        return Refusal(refusal.code, unknown_name(data.project_id, "a registered project", project_ids_of(session, applicant)))
    return refusal


def _call_meant(session: Session, refusal: Refusal, call_id: str) -> Refusal:
    """An ``unknown_call`` naming the call most likely meant."""
    near = nearest(call_id, session.exec(select(Call.call_id).order_by(Call.call_id)))
    return Refusal(refusal.code, f"There is no call {call_id!r}; did you mean {near!r}?") if near else refusal


def _application(session: Session, call_id: str, application_id: str) -> ApplicationSnapshot | None:
    row = session.get(CallApplication, (call_id, application_id))
    return row.snapshot() if row is not None else None


def decide_decision(ctx: Context) -> None:
    """Only the publisher decides, once, on a received application (a two-stage call's: invites
    it first, and awards it once it sent its full proposal)."""
    assert ctx.event is not None
    data: ApplicationDecided = ctx.event.data
    currency = data.awarded_amount.currency if data.awarded_amount is not None else None
    amount = Decimal(data.awarded_amount.amount) if data.awarded_amount is not None else None
    logged_at = ctx.event.logged_at
    _judge_application_action(ctx, lambda call, application, actor: rules.decision_refusal(
        call, application, actor, decision=data.decision, currency=currency, logged_at=logged_at, amount=amount))


def decide_full_proposal(ctx: Context) -> None:
    """Only the applicant of an invited application sends its full proposal, once, in time."""
    event = ctx.event
    assert event is not None
    data: FullProposalSubmitted = event.data
    currency = data.requested_amount.currency if data.requested_amount is not None else None
    amount = Decimal(data.requested_amount.amount) if data.requested_amount is not None else None
    _judge_application_action(ctx, lambda call, application, actor: rules.full_proposal_refusal(
        call, application, actor, event.logged_at, currency=currency, amount=amount), asks=amount is not None)


def decide_withdrawal(ctx: Context) -> None:
    """Only the applicant withdraws, before the publisher decided."""
    _judge_application_action(ctx, rules.withdrawal_refusal)


def _judge_application_action(
    ctx: Context, refusal_of: Callable[[CallSnapshot | None, ApplicationSnapshot | None, str], Refusal | None], *,
    asks: bool = False,
) -> None:
    """Refuse the current decision or withdrawal when ``refusal_of`` (the call, the application,
    the actor) says why (``asks``: the event asks for an amount, weighed against the call's
    requests)."""
    event = ctx.event
    assert event is not None
    call = _snapshot(ctx.session, event.data.call_id, awarded_currency=isinstance(event.data, ApplicationDecided),
                     requested_currency=asks)
    refusal = refusal_of(call, _application(ctx.session, event.data.call_id, event.data.application_id), event.source)
    if refusal is not None:
        _refuse_action(ctx, call, refusal, application_id=event.data.application_id)


def decide_amendment(ctx: Context) -> None:
    """Only the owner amends an open (or upcoming) call, keeping its window valid."""
    event = ctx.event
    assert event is not None
    data: CallAmended = event.data
    touches_budget = "budget" in data.changes.model_fields_set  # (given, or removed)
    budget = data.changes.budget
    call = _snapshot(ctx.session, data.call_id, received=touches_budget, awarded_currency=touches_budget,
                     requested_currency=budget is not None)
    refusal = rules.amendment_refusal(
        call, event.source, event.logged_at, opens_at=data.changes.opens_at, deadline=data.changes.deadline,
        full_proposal_deadline=data.changes.full_proposal_deadline, changed=frozenset(data.changes.model_fields_set),
        budget=(Decimal(budget.amount), budget.currency) if budget is not None else None,
    )
    if refusal is not None:
        _refuse_action(ctx, call, refusal)


def decide_closing(ctx: Context) -> None:
    """Only the owner closes a call, once."""
    event = ctx.event
    assert event is not None
    data: CallClosed = event.data
    call = _snapshot(ctx.session, data.call_id)
    refusal = rules.closing_refusal(call, event.source, event.logged_at, data.reason)
    if refusal is not None:
        _refuse_action(ctx, call, refusal)


def close_overdue_calls(ctx: Context) -> None:
    """Timer: close every call whose deadline has come, in its owner's name — also those whose
    deadline passed while the bus was down. A closed call is not selected again, so a second
    tick emits nothing."""
    overdue = select(Call).where(col(Call.closed_at).is_(None), col(Call.deadline) <= ctx.now)
    for call in ctx.session.exec(overdue.order_by(col(Call.deadline), col(Call.call_id))).all():
        ctx.emit(
            "call.closed",
            {"call_id": call.call_id, "reason": "deadline_passed"},
            source=call.owner,
            key=call.call_id,
        )


def _open_calls_of(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    """The calls still open (not closed) that the institution leaving published."""
    member = named_in(envelope, "id")
    if member is None:
        return []
    return list(session.exec(select(Call.call_id).where(Call.owner == member, col(Call.closed_at).is_(None))
                             .order_by(col(Call.call_id))).all())


def close_calls_of_departed_publisher(ctx: Context) -> None:
    """A member leaves the network (``institution.left``): its calls still open are closed, in
    its name, as ``cancelled``. Nobody is left to decide on what they receive (the gate takes
    nothing from a former member): a call left open went on taking applications that would wait
    for good. What the calls received stays as it was; a call whose deadline has come is left to
    the timer, which closes it as ``deadline_passed``. A rule of version 5: a log applied before
    left them open."""
    gone = leaving(ctx, 5)
    if gone is None:
        return
    for call_id in _open_calls_of(ctx.session, gone.envelope):
        call = ctx.session.get(Call, call_id)
        if call is None or call.deadline <= gone.at:
            continue  # (its deadline has come: the timer closes it as deadline_passed)
        ctx.emit("call.closed", {"call_id": call_id, "reason": "cancelled"}, source=gone.member, key=f"{call_id} member_left")


def _applications_of_leaver(session: Session, envelope: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(call, application) of each application the institution leaving made that waits for its
    publisher's decision, in the calls' order."""
    member = named_in(envelope, "id")
    if member is None:
        return []
    waiting = (select(CallApplication.call_id, CallApplication.application_id)
               .where(CallApplication.applicant == member, col(CallApplication.status).in_(sorted(rules.AWAITING)))
               .order_by(col(CallApplication.call_id), col(CallApplication.application_id)))
    return [(call_id, application_id) for call_id, application_id in session.exec(waiting).all()]


def _undecided_in_calls_of_leaver(session: Session, envelope: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(call, application) of each application that waits for a decision in a call the
    institution leaving published, in the calls' order (one it made itself is withdrawn instead)."""
    member = named_in(envelope, "id")
    if member is None:
        return []
    waiting = (select(CallApplication.call_id, CallApplication.application_id)
               .join(Call, col(Call.call_id) == col(CallApplication.call_id))
               .where(Call.owner == member, CallApplication.applicant != member,
                      col(CallApplication.status).in_(sorted(rules.AWAITING)))
               .order_by(col(CallApplication.call_id), col(CallApplication.application_id)))
    return [(call_id, application_id) for call_id, application_id in session.exec(waiting).all()]


def _calls_of_leaving_member(session: Session, envelope: Mapping[str, Any]) -> list[str]:
    return sorted({*_open_calls_of(session, envelope),
                   *(call_id for call_id, _ in _applications_of_leaver(session, envelope)),
                   *(call_id for call_id, _ in _undecided_in_calls_of_leaver(session, envelope))})


def withdraw_applications_of_departed_applicant(ctx: Context) -> None:
    """A member leaves the network (``institution.left``): each application it made that waits
    for a decision (received, or invited to a two-stage call's second stage, its full proposal
    sent or not) is withdrawn, in its name, saying why. It could no longer be told of a decision
    nor act on one (the gate takes nothing from a former member), yet its publisher was left to
    decide on it, its request weighed against the call's budget. An application decided stands.
    A rule of version 7: a log applied before left the applications waiting."""
    gone = leaving(ctx, 7)
    if gone is None:
        return
    _answer_for_the_leaver(ctx, gone, _applications_of_leaver(ctx.session, gone.envelope), "call.application_withdrawn",
                           reason={"en": f"{gone.member} left the network on {gone.at:%Y-%m-%d}: it can no longer take part in the call"})


def decline_applications_left_undecided(ctx: Context) -> None:
    """A member leaves the network (``institution.left``): each application that waits for its
    decision in a call it published (received, or invited to a two-stage call's second stage, its
    full proposal sent or not; the call open or closed) is declined, in its name, the comment
    saying why. Nobody was left to decide on it, and its applicant, still a member, was left
    waiting for good (an invited one does not lapse in a call closed early). What was decided
    stands. A rule of version 8: a log applied before left the applications waiting."""
    gone = leaving(ctx, 8)
    if gone is None:
        return
    _answer_for_the_leaver(ctx, gone, _undecided_in_calls_of_leaver(ctx.session, gone.envelope), "call.application_decided",
                           decision="declined", comment={"en": f"{gone.member}, who published the call, left the network on "
                                                               f"{gone.at:%Y-%m-%d}: nobody is left to decide on the application"})


def _answer_for_the_leaver(ctx: Context, gone: Leaving, applications: list[tuple[str, str]], event_type: str,
                           **fields: Any) -> None:
    """Emit ``event_type`` with ``fields`` about each (call, application), in the leaving member's name."""
    for call_id, application_id in applications:
        ctx.emit(event_type, {"call_id": call_id, "application_id": application_id, **fields}, source=gone.member,
                 key=f"{call_id}/{application_id} member_left")


def lapse_invitations(ctx: Context) -> None:
    """Timer: an application invited to a two-stage call's second stage that sent no full
    proposal lapses once the call's deadline for full proposals has passed (a proposal logged at
    that moment was still in time), in the publisher's name. A lapsed application is not
    selected again, so a second tick emits nothing. Nothing lapses in a call its publisher
    cancelled or declared filled (:func:`rules._closed_early`): the closing took the second stage
    away, so its invited applications are not to blame for sending nothing; they stay invited
    for the publisher to decline."""
    by_deadline = sa.and_(col(Call.closed_reason) == "deadline_passed", col(Call.closed_at) >= col(Call.deadline))
    lapsing = (
        select(CallApplication.call_id, CallApplication.application_id, CallApplication.applicant, Call.owner)
        .join(Call, col(Call.call_id) == col(CallApplication.call_id))
        .where(col(CallApplication.status) == "invited", col(Call.deadline_model) == "two_stage",
               col(Call.full_proposal_deadline).is_not(None), col(Call.full_proposal_deadline) < ctx.now,
               sa.or_(col(Call.closed_at).is_(None), by_deadline))
        .order_by(col(Call.full_proposal_deadline), col(CallApplication.call_id), col(CallApplication.application_id))
    )
    for call_id, application_id, applicant, owner in ctx.session.exec(lapsing).all():
        ctx.emit(
            "call.application_lapsed",
            {"call_id": call_id, "application_id": application_id, "applicant": applicant},
            source=owner,
            key=f"{call_id}/{application_id}",
        )


# --- projections -------------------------------------------------------------------------------


def published(session: Session, event: Event[CallPublished]) -> None:
    session.add(
        Call(
            **column_values(event.data, CallPublished.model_fields.keys()),
            owner=event.source,
            published_at=event.logged_at,
            words=words(event.data.title, event.data.summary),
        )
    )


def amended(session: Session, event: Event[CallAmended]) -> None:
    """The changed terms replace the stored ones; a present null clears."""
    call = session.get(Call, event.data.call_id)
    assert call is not None  # the decider refused amendments of unknown calls
    changes = event.data.changes
    call.sqlmodel_update(column_values(changes, changes.model_fields_set))
    if changes.model_fields_set & set(SEARCHED):
        call.words = words(call.title, call.summary)
    session.add(call)


def closed(session: Session, event: Event[CallClosed]) -> None:
    call = session.get(Call, event.data.call_id)
    assert call is not None
    call.closed_at = rules.closed_at(call.snapshot(), event.logged_at)
    call.closed_reason = event.data.reason
    session.add(call)


def _record(session: Session, call_id: str, application_id: str, **values: Any) -> None:
    upsert(session, CallApplication, (call_id, application_id), {"call_id": call_id, "application_id": application_id, **values})


def application_submitted(session: Session, event: Event[ApplicationSubmitted]) -> None:
    """Projected only when the workflow received the application (a rejection skips it)."""
    data = event.data
    _record(
        session,
        data.call_id,
        data.application_id,
        **column_values(data, {"project_id", "partners", "requested_amount"}),
        applicant=event.source,
        status="received",
        reason=None,
        submitted_at=event.logged_at,
    )


def application_rejected(session: Session, event: Event[ApplicationRejected]) -> None:
    """Record a rejection, except for an unknown call (nothing to attach it to) or a duplicate
    (the received application stays as it was)."""
    data = event.data
    if data.reason.code in ("unknown_call", "duplicate_application"):
        return
    _record(
        session,
        data.call_id,
        data.application_id,
        applicant=data.applicant,
        **column_values(data, {"project_id", "partners", "requested_amount"}),
        status="rejected",
        reason=data.reason.model_dump(mode="json", exclude_none=True),
        submitted_at=event.logged_at,
    )


def application_decided(session: Session, event: Event[ApplicationDecided]) -> None:
    """Projected only when the workflow accepted the decision. An invitation to the second stage
    is not the decision yet: it keeps its own time and comment."""
    if event.data.decision == "invited":
        comment = column_values(event.data, {"comment"}).get("comment")
        _update(session, event, {"status": "invited", "invited_at": event.logged_at, "invitation_comment": comment})
        return
    _answered(session, event, event.data.decision, column_values(event.data, {"awarded_amount", "comment"}))
    if event.data.awarded_amount is not None:  # (the workflow took it in the budget's currency)
        call = session.get(Call, event.data.call_id)
        assert call is not None
        call.awarded = str(rules.EXACT.add(Decimal(call.awarded or 0), Decimal(event.data.awarded_amount.amount)))
        session.add(call)


def full_proposal_submitted(session: Session, event: Event[FullProposalSubmitted]) -> None:
    """Projected only when the workflow took the full proposal."""
    proposal = column_values(event.data, ("summary", "requested_amount", "url"))  # (stored as JSON: in this order)
    _update(session, event, {"status": "proposal_sent", "full_proposal_at": event.logged_at, "full_proposal": proposal})


def application_withdrawn(session: Session, event: Event[ApplicationWithdrawn]) -> None:
    """Projected only when the workflow accepted the withdrawal."""
    reason = dict(event.data.reason) if event.data.reason else None
    _answered(session, event, "withdrawn", {"comment": reason, "withdrawal_reason": reason})


def application_lapsed(session: Session, event: Event[ApplicationLapsed]) -> None:
    """The application lapsed at the call's deadline for full proposals (also when the bus says
    so later, after downtime)."""
    call = session.get(Call, event.data.call_id)
    assert call is not None and call.full_proposal_deadline is not None  # the timer's selection
    _update(session, event, {"status": "lapsed", "decided_at": min(call.full_proposal_deadline, event.logged_at)})


def _answered(session: Session, event: Event[Any], status: str, values: Mapping[str, Any]) -> None:
    """The application the decision or withdrawal ``event`` is about takes ``status`` and ``values``."""
    _update(session, event, {**values, "status": status, "decided_at": event.logged_at})


def _update(session: Session, event: Event[Any], values: Mapping[str, Any]) -> None:
    """The application ``event`` is about (a decision, withdrawal or full proposal the workflow
    accepted, or its lapse) takes ``values``."""
    row = session.get(CallApplication, (event.data.call_id, event.data.application_id))
    assert row is not None  # the deciders refuse the first three for unknown applications; the timer lapses known ones
    row.sqlmodel_update(dict(values))
    session.add(row)


PROJECTIONS: dict[str, Projection] = {
    "call.published": published,
    "call.amended": amended,
    "call.closed": closed,
    "call.application_submitted": application_submitted,
    "call.application_rejected": application_rejected,
    "call.application_decided": application_decided,
    "call.application_withdrawn": application_withdrawn,
    "call.full_proposal_submitted": full_proposal_submitted,
    "call.application_lapsed": application_lapsed,
}
DECIDERS: dict[str, Decider | list[Decider]] = {
    "call.published": decide_publication,
    "call.application_submitted": decide_application,
    "call.application_decided": decide_decision,
    "call.application_withdrawn": decide_withdrawal,
    "call.full_proposal_submitted": decide_full_proposal,
    "call.amended": decide_amendment,
    "call.closed": decide_closing,
    "institution.left": [close_calls_of_departed_publisher, withdraw_applications_of_departed_applicant,
                         decline_applications_left_undecided],
}
TIMERS: tuple[Timer, ...] = (close_overdue_calls, lapse_invitations)
def _partners(_session: Session, envelope: Mapping[str, Any]) -> list[str]:
    data = envelope.get("data")
    partners = data.get("partners") if isinstance(data, dict) else None
    return [partner for partner in partners if isinstance(partner, str)] if isinstance(partners, list) else []


READS: dict[str, list[Reads]] = {
    # An application is judged on its applicant's membership, kind and country, its partners'
    # membership, and the owner and partners of the project it names.
    "call.application_submitted": [sender, Reads("institution", _partners), named("project", "project_id")],
    # A member's leaving closes the calls it has open, withdraws its applications waiting for a
    # decision and declines those waiting for its own.
    "institution.left": [Reads("call", _calls_of_leaving_member)],
}


# --- who may see the workflow's events -------------------------------------------------------------

APPLICATION_EVENTS = confidential.CALL_APPLICATION_EVENTS
CONFIDENTIAL = confidential.CALL_EVENTS
"""The calls' event types not every member may see (:mod:`handlers.confidential`)."""

TRIED = frozenset({"call.application_decided", "call.application_withdrawn", "call.full_proposal_submitted", "call.action_rejected"})
"""What any member may try on an application and be refused: its parties hear of it only when a
party (or the publisher) tried."""


def may_see_application(application: CallApplication, owner: str | None, viewer: str) -> bool:
    """Whether ``viewer`` may see an application to a call published by ``owner`` (None: a call
    not the viewer's): :func:`handlers.rules.calls.may_see`, as for its events (:func:`audience`)."""
    return rules.may_see(application.snapshot(), owner, viewer)


def audience(session: Session, envelope: Mapping[str, Any]) -> frozenset[str] | None:
    """Who may see an application event, as ``GET /events`` shows it and webhooks deliver it:
    whoever said it, the call's publisher, the applicant and the partners the application names
    (as the read model has it; a submission's own partners too). A decision or withdrawal, and the
    refusal of one, reach the application's parties only when one of them or the publisher did
    it; otherwise the publisher and whoever tried. None: every member (a refusal of anything
    else than an application's decision or withdrawal)."""
    data = envelope.get("data")
    data = data if isinstance(data, Mapping) else {}
    source = str(envelope.get("source")).removeprefix("/institutions/")
    allowed = {source}
    event_type = envelope.get("type")
    if event_type == "call.action_rejected" and data.get("rejected_type") not in APPLICATION_EVENTS:
        return None
    call_id, application_id = str(data.get("call_id")), str(data.get("application_id"))
    if event_type == "call.application_submitted":
        allowed.update(str(partner) for partner in data.get("partners") or ())
    elif data.get("applicant") is not None:
        allowed.add(str(data.get("applicant")))
    owner = session.exec(select(Call.owner).where(Call.call_id == call_id)).first()
    if owner is not None:
        allowed.add(owner)
    application = session.exec(
        select(CallApplication.applicant, CallApplication.partners)
        .where(CallApplication.call_id == call_id, CallApplication.application_id == application_id)
    ).first()
    # The application under this id now may be another institution's than the one this event is
    # about (an id a rejected application had, taken again before that was refused): its parties
    # see only what is about theirs.
    about = source if event_type == "call.application_submitted" else data.get("applicant")
    if application is not None and (about is None or str(about) == application[0]):
        applicant, partners = application
        parties = {applicant, *(partners or ())}
        # A decision, a withdrawal and the refusal of one reach the application's parties when a
        # party did it (the applicant sees the publisher's second decision refused, say), not
        # when someone else tried: that stays between it and the publisher.
        actor = str(data.get("actor")) if event_type == "call.action_rejected" else source
        if event_type not in TRIED or actor in parties or actor == owner:
            allowed.update(parties)
    if event_type == "call.action_rejected":
        allowed.add(str(data.get("actor")))
    return frozenset(allowed)
