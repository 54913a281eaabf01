"""The calls workflow (CONTRACT.md §5): who may amend or close a call, when an application is
received, when the bus closes a call. Times are the log's acceptance times."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Literal

from handlers.rules import Refusal, since
from schemas.common import minor_units

CallStatus = Literal["upcoming", "open", "closed"]
ApplicationStatus = Literal["received", "rejected", "invited", "proposal_sent", "awarded", "declined", "withdrawn", "lapsed"]
"""Where an application stands: the call's answer (``received``, ``rejected``), then the
publisher's decision on a received one (``awarded``, ``declined``) or the applicant taking it
back (``withdrawn``). In a two-stage call a received application is first ``invited`` to the
second stage, then ``proposal_sent`` once its full proposal came, and awarded only then; an
invited one without a full proposal when the deadline for them has passed is ``lapsed``."""

FINAL: frozenset[str] = frozenset({"awarded", "declined", "withdrawn", "lapsed"})
"""The statuses after which an application does not change any more."""

AWAITING: frozenset[str] = frozenset({"received", "invited", "proposal_sent"})
"""Where an application waits for its publisher's decision (its applicant may still withdraw it)."""

GONE: frozenset[str] = frozenset({"rejected", "withdrawn", "declined", "lapsed"})
"""The statuses of an application its call weighs no more: rejected by the call, taken back by its
applicant, declined by the publisher, or lapsed; the others stand (``received``, ``invited``,
``proposal_sent``, ``awarded``)."""


@dataclass(frozen=True)
class CallSnapshot:
    """What the rules need to know about a call. Empty eligibility sets mean everyone."""

    call_id: str
    owner: str
    opens_at: datetime
    deadline: datetime
    eligible_kinds: frozenset[str] = frozenset()
    eligible_countries: frozenset[str] = frozenset()
    closed_at: datetime | None = None
    currency: str | None = None
    """The currency of the call's budget (None: the call states no budget)."""
    budget: Decimal | None = None
    """The amount of the call's budget (None: the call states no budget)."""
    awarded: Decimal = Decimal(0)
    """What the call has awarded so far (in its budget's currency, or in that of its first award)."""
    awarded_currency: str | None = None
    """The currency of the call's first award with an amount (None: none yet): a call without a
    budget keeps its awards in it, so that what it awarded stays one sum of one currency."""
    received: bool = False
    """Whether the call has an application standing (one not :data:`GONE`: a withdrawn one is no
    longer the call's to weigh; by rules before 3, any application it received, whatever became of
    it since)."""
    closed_reason: str | None = None
    two_stage: bool = False
    full_proposal_deadline: datetime | None = None
    """A two-stage call's deadline for full proposals (None: no limit)."""
    requested_currency: str | None = None
    """For a call without a budget, the currency its first application standing (not :data:`GONE`)
    asks in, which the others ask in too (None: none asks for an amount, or it was not read)."""

    @property
    def money(self) -> str | None:
        """The currency the call's amounts are in: its budget's, else that of its first award."""
        return self.currency or self.awarded_currency


@dataclass(frozen=True)
class ApplicationSnapshot:
    """What the rules need to know about an application the call answered."""

    application_id: str
    applicant: str
    status: ApplicationStatus
    partners: frozenset[str] = frozenset()
    requested: tuple[Decimal, str] | None = None
    """What it asks for now, amount and currency (its full proposal's request, once it sent one
    that names an amount; None: it names none)."""


def may_see(application: ApplicationSnapshot, owner: str | None, viewer: str) -> bool:
    """Whether ``viewer`` may see an application to a call published by ``owner``: the call's
    publisher, the applicant and the partners the application names; to anyone else it does not
    exist."""
    return viewer in (owner, application.applicant) or viewer in application.partners


@dataclass(frozen=True)
class Applicant:
    """The applying institution as the membership read model knows it (None: not a member)."""

    institution: str
    kind: str | None
    country: str | None


def call_status(call: CallSnapshot, now: datetime) -> CallStatus:
    """``upcoming`` before ``opens_at``, ``open`` until the deadline (included), ``closed``
    afterwards or once closed. Derived, never stored, so it cannot go stale."""
    if call.closed_at is not None or now > call.deadline:
        return "closed"
    if now < call.opens_at:
        return "upcoming"
    return "open"


CallStage = Literal["first", "second", "ended"]


def call_stage(call: CallSnapshot, now: datetime) -> CallStage | None:
    """Where a two-stage call stands at ``now`` (None for a single-stage call): its ``first``
    stage until its deadline (applications), its ``second`` after it while it takes full
    proposals from those invited (until the deadline for them, if it has one), ``ended`` once
    that deadline has passed or its publisher closed the call before its deadline or in its
    second stage (cancelled, filled). Its :func:`call_status` is ``closed`` from its deadline on,
    in the second stage too: this says that the invited may still send their full proposals."""
    if not call.two_stage:
        return None
    if call_status(call, now) != "closed":
        return "first"
    if _closed_early(call) or (call.full_proposal_deadline is not None and now > call.full_proposal_deadline):
        return "ended"
    return "second"


def publication_refusal(existing: CallSnapshot | None, budget: tuple[Decimal, str] | None = None) -> Refusal | None:
    """A call id names one call: publishing it again is refused (amend it instead). Its budget
    (``budget``: amount and currency, if any) is in no more decimals than its currency has, by
    rules 3 (``too_many_decimals``, as the requests and awards weighed against it)."""
    if existing is not None:
        return Refusal("already_published", f"Call {existing.call_id} was already published by {existing.owner}.")
    return _precision_refusal(budget[0], budget[1], "give the budget as") if budget is not None else None


def application_refusal(
    call: CallSnapshot | None,
    applicant: Applicant,
    logged_at: datetime,
    *,
    duplicate: bool = False,
    currency: str | None = None,
    amount: Decimal | None = None,
    partners: Sequence[Applicant] = (),
    project_id: str | None = None,
    project: tuple[str, frozenset[str]] | None = None,
) -> Refusal | None:
    """Why an application logged at ``logged_at`` is rejected, or None when it is received.
    ``duplicate``: the id is taken (by an application received, or one of another applicant's
    that was rejected: a rejected one may be submitted again by its applicant); ``currency``: that of the amount it requests (None: it names none). A
    request in another currency than the call's budget is refused: the publisher could not
    weigh the requests against the budget or against each other; so is one (``amount``) in more
    decimals than its currency has, or above the call's whole budget, and, in a call without a
    budget, one in another currency than the requests standing (:func:`request_refusal`). ``partners``: the partners it
    names, as the membership read model knows them; ``project_id``: the project it names, and
    ``project`` that project's owner and partners (None: not registered). The partners are other
    members, each named once (a partner sees the application: a name that is no member's, most
    often a typo, would hide it from the partner meant, and show it to an institution admitted
    later under that name), and the project one the applicant owns or is a partner of.

    The call's publisher does not apply to its own call, by rules 4 (``own_call``): it would
    decide on its own application, and award itself from the budget. (Judged after the window and
    the eligibility, whose answers an application gets as before.)

    The deadline is checked before the closing, so an application after the deadline gets the
    same answer whether or not the bus's closing came first (live and in a rebuild).
    """
    if call is None:
        return Refusal("unknown_call", "There is no such call.")
    if duplicate:
        return Refusal("duplicate_application", "An application with this id was already submitted: choose another id.")
    if logged_at < call.opens_at:
        return Refusal("before_opening", f"The call opens at {call.opens_at.isoformat()}.")
    if logged_at > call.deadline:
        return Refusal("after_deadline", f"The call's deadline was {call.deadline.isoformat()}.")
    if call.closed_at is not None and logged_at > call.closed_at:  # (applied late, an application in time stays in time)
        return Refusal("call_closed", "The call was closed by its publisher.")
    if not _eligible(applicant.kind, call.eligible_kinds):
        return Refusal("ineligible_kind", f"The call is open to {_listed(call.eligible_kinds)} only.")
    if not _eligible(applicant.country, call.eligible_countries):
        return Refusal("ineligible_country", f"The call is open to institutions in {_listed(call.eligible_countries)} only.")
    if applicant.institution == call.owner and since(4):  # (it would decide on, and award, its own application)
        return Refusal("own_call", f"{call.owner} published the call: it decides on the applications to it, and does not "
                                   "apply to it itself.")
    if since(2) and (refusal := _parties_refusal(applicant, partners, project_id, project)):
        return refusal
    return _currency_refusal(call, currency, "request") or request_refusal(call, amount, currency)


def request_refusal(call: CallSnapshot, amount: Decimal | None, currency: str | None) -> Refusal | None:
    """Why an amount an application or a full proposal asks for (``amount`` in ``currency``; None:
    none) does not stand, by rules 3: more decimals than its currency has (``too_many_decimals``:
    no sum of money is that precise, and a typo there hides one of a larger amount), more than the
    call's whole budget (``over_budget``: the publisher could never grant it), or, in a call
    without a budget, another currency than the requests standing (``currency_mismatch``: the
    publisher could not weigh them against each other)."""
    if amount is None or currency is None or not since(3):
        return None
    if refusal := _precision_refusal(amount, currency, "request"):
        return refusal
    if call.budget is not None and call.currency == currency and amount > call.budget:
        return Refusal("over_budget", f"The call's whole budget is {_money(call.budget, call.currency)}: a request of "
                                      f"{_money(amount, currency)} exceeds it; ask for at most that.")
    asked = call.requested_currency
    if call.currency is None and asked is not None and currency != asked:
        return Refusal("currency_mismatch", f"The call has no budget and the applications to it ask in {asked}: request "
                                            f"the amount in {asked} too, not {currency}.")
    return None


def _precision_refusal(amount: Decimal, currency: str, verb: str) -> Refusal | None:
    """``too_many_decimals`` for an amount written more precisely than its currency counts (ISO
    4217's minor units: a cent of a euro, a whole yen), by rules 3 (``verb``: what the amount is
    for, in the message)."""
    places = max(0, -int(amount.normalize().as_tuple().exponent))
    minor = minor_units(currency)
    if places <= minor or not since(3):
        return None
    if minor == 0:
        return Refusal("too_many_decimals", f"{amount:f} {currency} has decimals, and {currency} has none (ISO 4217): "
                                            f"{verb} a whole amount.")
    return Refusal("too_many_decimals", f"{amount:f} {currency} has {places} decimals, and {currency} has {minor} "
                                        f"(ISO 4217): {verb} an amount of at most {minor} decimals.")


def _parties_refusal(
    applicant: Applicant, partners: Sequence[Applicant], project_id: str | None, project: tuple[str, frozenset[str]] | None
) -> Refusal | None:
    """Why the partners or the project an application names do not stand (see
    :func:`application_refusal`)."""
    seen: set[str] = set()
    for partner in partners:
        name = partner.institution
        if name == applicant.institution:
            return Refusal("invalid_partner", f"{name} is the applicant: the partners are the other members taking part.")
        if name in seen:
            return Refusal("invalid_partner", f"{name} is named twice among the partners.")
        seen.add(name)
        if partner.kind is None:
            return Refusal("unknown_partner", f"{name} is not a member of the network: a partner must be one, as it sees "
                                              "the application.")
        if partner.kind == "operator":
            return Refusal("invalid_partner", f"{name} runs the network: it takes part in no application.")
    if project_id is not None and project is None:
        return Refusal("unknown_project", f"No project {project_id} is registered.")
    if project is not None and applicant.institution != project[0] and applicant.institution not in project[1]:
        return Refusal("not_project_party", f"Only {project[0]}, the project's owner, and its partners apply with "
                                            f"project {project_id}.")
    return None


def amendment_refusal(
    call: CallSnapshot | None,
    actor: str,
    logged_at: datetime,
    *,
    opens_at: datetime | None = None,
    deadline: datetime | None = None,
    full_proposal_deadline: datetime | None = None,
    changed: frozenset[str] = frozenset(),
    budget: tuple[Decimal, str] | None = None,
) -> Refusal | None:
    """Only the owner amends, only while the call is not closed, and the amended window must
    still open before its deadline, which may not be moved into the past, nor an opening that
    has come moved later; and a two-stage call's full proposals come after it
    (``opens_at``/``deadline``/``full_proposal_deadline``: the new values, if changed;
    ``changed``: the fields the amendment sets or clears; ``budget``: the new budget's amount and
    currency, if set, which may not be less than what the call has awarded, nor in another
    currency once it has awarded any or has an application standing, nor removed once it has awarded
    any). A refusal names the field changed: a deadline moved into the past, or an opening that
    has come moved later, is named so before the window it would also break. Once a two-stage
    call's first stage is over, its deadline for full proposals may still be moved (unless the
    publisher closed the call before its deadline), until it has passed: the invited applications
    without a full proposal lapse then."""
    full_proposal_deadline_given = "full_proposal_deadline" in changed
    if full_proposal_deadline_given and call is not None and actor == call.owner and (over := _second_stage_over(call, logged_at)):
        return over
    refusal = _owner_action_refusal(call, actor, logged_at)
    if (refusal is not None and refusal.code == "call_closed" and call is not None and call.two_stage
            and changed == {"full_proposal_deadline"} and not _closed_early(call)):
        refusal = None  # the second stage's deadline, after the first stage
    if refusal is not None or call is None:
        return refusal
    window = None
    if (deadline or call.deadline) <= (opens_at or call.opens_at):
        window = Refusal("invalid_window", "The amended deadline would not be after the call's opening.")
    if window is not None and not since(2):  # (before, the window was named first, whatever was changed)
        return window
    # Applications received stay in time, and those still being prepared are not shut out at once:
    # a call ends now by its closing (cancelled, filled), not by a deadline moved into the past.
    if deadline is not None and deadline < logged_at and since(1):
        return Refusal("deadline_in_past", "The amended deadline is already past: to end the call now, close it "
                                           "(call.closed, cancelled or filled).")
    if opens_at is not None and call.opens_at <= logged_at < opens_at and since(1):
        return Refusal("already_open", f"The call opened at {call.opens_at.isoformat()}: its opening cannot be moved later.")
    if window is not None:
        return window
    if full_proposal_deadline_given and full_proposal_deadline is not None and not call.two_stage:
        return Refusal("single_stage", "The call has a single stage: it takes no full proposals, and has no deadline for them.")
    second = full_proposal_deadline if full_proposal_deadline_given else call.full_proposal_deadline
    if second is not None and second <= (deadline or call.deadline):
        return Refusal("invalid_window", "The deadline for full proposals would not be after the call's deadline.")
    if full_proposal_deadline_given and full_proposal_deadline is not None and full_proposal_deadline < logged_at and since(1):
        return Refusal("deadline_in_past", "The amended deadline for full proposals is already past: the invited "
                                           "applications would lapse at once; to end the second stage now, close the call.")
    if budget is not None and (refusal := _precision_refusal(budget[0], budget[1], "give the budget as")):
        return refusal
    awarded, money = call.awarded, call.money
    # What was awarded stays within a budget of its currency: without one, nothing would weigh the
    # next awards against it, and awards in any currency would be added into one sum.
    if "budget" in changed and budget is None and awarded > 0 and since(2):
        return Refusal("already_awarded", f"The call has awarded {_money(awarded, money)}: its budget cannot be removed "
                                          f"(it may be raised, or lowered to what was awarded).")
    if budget is not None and awarded > 0 and money is not None and budget[1] != money and since(1 if call.currency else 2):
        return Refusal("currency_mismatch", f"The call has awarded {_money(awarded, money)}: its budget stays in {money}.")
    # The applications standing asked in the budget's currency: the publisher could not weigh them
    # against a budget in another one (one withdrawn, declined or lapsed it weighs no more).
    if budget is not None and call.received and call.currency is not None and budget[1] != call.currency and since(2):
        return Refusal("currency_mismatch", f"The call has received applications asking in {call.currency}: "
                                            f"its budget stays in {call.currency}.")
    asked = call.requested_currency
    if budget is not None and call.currency is None and asked is not None and budget[1] != asked and since(3):
        return Refusal("currency_mismatch", f"The applications to the call ask in {asked}: give it a budget in {asked}, "
                                            f"not {budget[1]}.")
    if budget is not None and budget[0] < awarded and since(1):
        return Refusal("over_budget", f"The call has awarded {_money(awarded, money)} already: its budget cannot be "
                                      f"less than that ({_money(budget[0], budget[1])}).")
    return None


def closing_refusal(call: CallSnapshot | None, actor: str, logged_at: datetime, reason: str) -> Refusal | None:
    """Only the owner closes, and only a call still open. A ``deadline_passed`` closing after the
    deadline is the bus's own (or the owner saying the same): it is the one closing that is
    accepted once the deadline is over, except that a two-stage call in its second stage may
    still be cancelled or declared filled by its owner (no more full proposals). Before the
    deadline, a call is not closed as ``deadline_passed`` (``before_deadline``): it would close
    early under a reason saying it did not, and its second stage, if any, would go on as after
    its deadline."""
    if call is not None and reason == "deadline_passed" and call.closed_at is None and actor == call.owner:
        if logged_at < call.deadline and since(2):
            return Refusal("before_deadline", f"The call's deadline is {call.deadline.isoformat()}: to close it before, "
                                              "close it as cancelled or filled.")
        return None
    if (call is not None and call.two_stage and actor == call.owner and reason != "deadline_passed"
            and logged_at > call.deadline and not _closed_early(call)):
        return None
    return _owner_action_refusal(call, actor, logged_at)


def decision_refusal(
    call: CallSnapshot | None,
    application: ApplicationSnapshot | None,
    actor: str,
    *,
    decision: str,
    currency: str | None,
    logged_at: datetime,
    amount: Decimal | None = None,
) -> Refusal | None:
    """Only the call's publisher decides, on a received application, once. ``currency``: that of
    the amount awarded (None: none named); it must be the call's budget's, and with what the call
    awarded before the ``amount`` may not exceed its budget; a call without a budget awards in
    the currency of its first award; a call with a budget awards with an amount. In a two-stage call it
    first invites applications to the second stage (``invited``, once, while the deadline for full
    proposals has not passed at ``logged_at``) and awards only those that sent their full
    proposal; it may decline at either stage. By rules 4, an award is no more than the application
    asks for (``above_request``: its full proposal's request, once it sent one; an award above it is
    most often a typo, a zero too many, which the budget catches only when it is too small), and
    one of nothing is refused (``no_amount``: a decline shown as an award)."""
    if call is None:
        return Refusal("unknown_call", "There is no such call.")
    if actor != call.owner:
        return Refusal("not_owner", f"Only {call.owner}, who published the call, decides on its applications.")
    refusal = _open_application_refusal(application)
    if refusal is not None or application is None:
        return refusal
    if decision == "invited":
        if not call.two_stage:
            return Refusal("single_stage", "The call has a single stage: award or decline the application.")
        if application.status != "received":
            return Refusal("already_decided", f"Application {application.application_id} was already invited to the second stage.")
        if over := _second_stage_over(call, logged_at):
            return over
    elif decision == "awarded" and call.two_stage and application.status != "proposal_sent":
        return Refusal("no_full_proposal", f"Application {application.application_id} has no full proposal: a two-stage call "
                                           "awards an application once it sent one (invite it first).")
    if refusal := _currency_refusal(call, currency, "award"):
        return refusal
    if (decision == "awarded" and currency is not None and call.currency is None and call.awarded_currency is not None
            and currency != call.awarded_currency and since(2)):
        return Refusal("currency_mismatch", f"The call has awarded {_money(call.awarded, call.awarded_currency)}: award "
                                            f"the amount in {call.awarded_currency} too, not {currency} (or give the "
                                            f"call a budget in {call.awarded_currency} first).")
    if decision == "awarded" and amount is not None and currency is not None and (
            refusal := _precision_refusal(amount, currency, "award")):
        return refusal
    if decision == "awarded" and amount is None and call.budget is not None and since(2):
        return Refusal("no_amount", f"The call gives money (its budget is {_money(call.budget, call.currency)}): "
                                    "name the awarded_amount granted.")
    if decision == "awarded" and amount is not None and amount == 0 and since(4):  # (an award of nothing is a decline)
        return Refusal("no_amount", f"An award of {_money(amount, currency)} grants nothing: name the awarded_amount granted, "
                                    "or decline the application.")
    asked = application.requested
    if (decision == "awarded" and amount is not None and asked is not None and currency == asked[1] and amount > asked[0]
            and since(4)):
        return Refusal("above_request", f"Application {application.application_id} asks for {_money(*asked)}: award at most "
                                        f"that, not {_money(amount, currency)}.")
    awarded = call.awarded
    if decision == "awarded" and amount is not None and call.budget is not None and EXACT.add(awarded, amount) > call.budget and since(1):
        left = max(EXACT.subtract(call.budget, awarded), Decimal(0))
        return Refusal("over_budget", f"The call's budget is {_money(call.budget, call.currency)} and "
                                      f"{_money(awarded, call.currency)} is awarded already: award at most "
                                      f"{_money(left, call.currency)}, or raise the budget first (call.amended).")
    return None


EXACT = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)
"""Sums and differences of amounts, never rounded (the default context keeps 28 digits: an amount
the log holds may have more)."""


def _money(amount: Decimal, currency: str | None) -> str:
    """An amount as a message shows it: ``100,000 EUR``, ``2,500.50 EUR``."""
    return f"{amount:,f} {currency or ''}".strip()


def full_proposal_refusal(
    call: CallSnapshot | None,
    application: ApplicationSnapshot | None,
    actor: str,
    logged_at: datetime,
    *,
    currency: str | None = None,
    amount: Decimal | None = None,
) -> Refusal | None:
    """Only the applicant sends the full proposal of an application invited to the second stage,
    once, by the call's deadline for full proposals, while the call was not cancelled or filled
    by its publisher; an amount in the budget's currency (``currency``: that asked for, if any),
    which stands as an application's does (``amount``, :func:`request_refusal`)."""
    refusal = _applicant_action_refusal(call, application, actor, "sends its full proposal")
    if refusal is not None or call is None or application is None:
        return refusal
    if application.status == "proposal_sent":
        return Refusal("already_submitted", f"Application {application.application_id} has its full proposal already.")
    if application.status != "invited":
        second = "its publisher has not invited it to the second stage" if call.two_stage else "the call has a single stage"
        return Refusal("not_invited", f"Application {application.application_id} takes no full proposal: {second}.")
    if over := _second_stage_over(call, logged_at):
        return over
    if _closed_early(call):
        return Refusal("call_closed", "The call was closed by its publisher.")
    return _currency_refusal(call, currency, "request") or request_refusal(call, amount, currency)


def withdrawal_refusal(call: CallSnapshot | None, application: ApplicationSnapshot | None, actor: str) -> Refusal | None:
    """Only the applicant withdraws, a received application its call's publisher has not decided
    on. To an institution that may not see the application (neither the publisher, the applicant
    nor a partner), it does not exist."""
    return _applicant_action_refusal(call, application, actor, "may withdraw it")


def _applicant_action_refusal(
    call: CallSnapshot | None, application: ApplicationSnapshot | None, actor: str, what: str
) -> Refusal | None:
    """What only the applicant of an application still open may do (``what``, for the message)."""
    if call is None:
        return Refusal("unknown_call", "There is no such call.")
    if application is None or not may_see(application, call.owner, actor):
        return Refusal("unknown_application", "The call has no such application.")
    if actor != application.applicant:
        return Refusal("not_applicant", f"Only {application.applicant}, who made the application, {what}.")
    return _open_application_refusal(application)


def _open_application_refusal(application: ApplicationSnapshot | None) -> Refusal | None:
    if application is None:
        return Refusal("unknown_application", "The call has no such application.")
    if application.status == "rejected":
        return Refusal("not_received", f"Application {application.application_id} was rejected by the call: there is nothing to decide or withdraw.")
    if application.status == "withdrawn":
        return Refusal("already_withdrawn", f"Application {application.application_id} was withdrawn by {application.applicant}.")
    if application.status == "lapsed":
        return Refusal("lapsed", f"Application {application.application_id} lapsed: it sent no full proposal by the call's "
                                 "deadline for full proposals.")
    if application.status in FINAL:
        return Refusal("already_decided", f"Application {application.application_id} was already decided: {application.status}.")
    return None


def closed_at(call: CallSnapshot, logged_at: datetime) -> datetime:
    """When an accepted closing takes effect: when it was logged, but never after the deadline (a
    call closes at its deadline even when the bus says so later, e.g. after downtime)."""
    return min(call.deadline, logged_at)


def _second_stage_over(call: CallSnapshot, logged_at: datetime) -> Refusal | None:
    """``after_full_proposal_deadline`` once the call's deadline for full proposals has passed:
    nothing more is invited, proposed, or moved in its second stage."""
    if call.full_proposal_deadline is None or logged_at <= call.full_proposal_deadline:
        return None
    return Refusal("after_full_proposal_deadline",
                   f"The call's deadline for full proposals was {call.full_proposal_deadline.isoformat()}: the second stage is over.")


def _currency_refusal(call: CallSnapshot, currency: str | None, verb: str) -> Refusal | None:
    """``currency_mismatch`` for an amount (``currency``: its currency, None: no amount) not in the
    call's budget's currency (``verb``: what the amount is for, in the message)."""
    if currency is None or call.currency is None or currency == call.currency:
        return None
    return Refusal("currency_mismatch", f"The call's budget is in {call.currency}: {verb} the amount in {call.currency}, not {currency}.")


def _closed_early(call: CallSnapshot) -> bool:
    """Closed by its publisher (cancelled, or filled), not by its deadline: before it, or in a
    two-stage call's second stage."""
    return call.closed_at is not None and (call.closed_at < call.deadline or call.closed_reason not in (None, "deadline_passed"))


def _owner_action_refusal(call: CallSnapshot | None, actor: str, logged_at: datetime) -> Refusal | None:
    if call is None:
        return Refusal("unknown_call", "There is no such call.")
    if actor != call.owner:
        return Refusal("not_owner", f"Only {call.owner}, who published the call, may amend or close it.")
    if call_status(call, logged_at) == "closed":
        return Refusal("call_closed", "The call is closed.")
    return None


def _eligible(value: str | None, allowed: Collection[str]) -> bool:
    return not allowed or value in allowed


def _listed(values: Collection[str]) -> str:
    return ", ".join(sorted(values))
