"""Workflow decisions as pure functions over small frozen snapshots of the state: no database, no
clock, no I/O, so they are unit-tested directly and give the same answer live and in a rebuild.

The rules have a version (:data:`RULES`). A rule added to the workflows gets the next number and
asks :func:`since` before it refuses, so that an event is judged, in a rebuild too, by the rules it
was judged by when it was applied (``handlers.bookkeeping.RulesEpoch``): a log applied by an
older version rebuilds as it was applied, not with refusals nobody was told of.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

RULES = 8
"""The version of the workflow rules this code judges by. 1: an owner's adoption of its own
project (``own_project``), an adopter that is not a member (``unknown_adopter``), a call's deadline
amended into the past (``deadline_in_past``) or its opening moved later once open
(``already_open``), an award beyond the budget (``over_budget``, and a budget amended below what
was awarded or into another currency), a rejected application's id taken by another applicant
(``duplicate_application``). 2: a second open validation of a project by the same coordinator
(the validations' ``already_open``); a refused cancellation of a registration is answered by an
``innovation_day.action_rejected`` (before, by an ``innovation_day.registration_rejected`` of the
registration it named, whose id a rebuild of such a log derives again); an institution's second
live registration for a gathering (``already_registered``); a call's budget removed once it
awarded (``already_awarded``) or moved into another currency once it received an application, an
award in another currency than a call without a budget awarded before (``currency_mismatch``), an
award without an amount on a call with a budget (``no_amount``), a call closed as
``deadline_passed`` before its deadline (``before_deadline``), an amendment's refusal naming the
field it changed before the window (``deadline_in_past``, ``already_open``, then
``invalid_window``); an application's partners that are not other members, each named once
(``unknown_partner``, ``invalid_partner``), and its project one registered that its applicant
owns or takes part in (``unknown_project``, ``not_project_party``). 3: a call's budget keeps its
currency while the call has an application standing, not one withdrawn, declined or lapsed (before,
any application it had received kept it; ``currency_mismatch``); an amount requested or awarded,
or a call's budget, with more decimals than its currency has (``too_many_decimals``), a request above the call's
whole budget (``over_budget``), a request to a call without a budget in another currency than
the requests standing, or a budget given to it later in another one (``currency_mismatch``); a
reviewer due after the validation it reviews (``due_after_validation``); a registration or a
cancellation of a registration for a gathering its organiser reported held is refused as
``day_held`` (before, as ``after_deadline``, as if its deadline had merely passed); the report
that a gathering was held before it started (``not_started``); its participant's cancellation of
a registration it cancelled already (``already_cancelled``, before ``unknown_registration``); a
registration for a gathering bringing a project not registered (``unknown_project``) or not its
participant's own or partnered (``not_project_party``).

4: a move of a gathering that opens registration again puts the registrations its deadline
refused as ``waitlist_closed`` back on the waitlist, in their order
(``innovation_day.registration_waitlisted``; before, they stayed refused); a practice's second
adoption by the same adopter, under another adoption id (``already_adopted``); an impact report of
a period that ended before the project started (``period_before_start``) or that starts after the
day it is reported (``period_ahead``); an application of a call's publisher to its own call
(``own_call``); an award above what the application asks for, its full proposal's request once it
sent one (``above_request``), or of nothing (``no_amount``).

5: a member that leaves the network gives up its registrations for the gatherings still taking
them, each refused in the organiser's name as ``member_left``, and each day's waitlist is promoted
into the seats freed (before, a former member kept its seats and places on the waitlist); an open
validation it was assigned to review and had not reviewed takes it off, in the coordinator's name
(``validation.reviewer_unassigned``; before, the validation waited for it); its calls still open
before their deadline are closed, in its name, as ``cancelled`` (before, they took applications
nobody would decide on); a move of a gathering to a capacity below the attendees confirmed
(``below_confirmed``; the capacity is new in version 5: a larger one seats the waitlist in order
while registration is open, a smaller one refuses a waitlisted registration bigger than it,
``capacity_reduced``); a change of a registration's attendees
(``innovation_day.registration_changed``, new in version 5) refused as a cancellation is, above
the day's capacity (``exceeds_capacity``) or taking seats past the waitlist (``no_room``).

6: a member that leaves the network calls off the gatherings it organises that have not begun, in
its name (``innovation_day.cancelled``; before, they stayed scheduled, taking registrations and
matched, with nobody left to move, cancel or report them).

7: a member that leaves the network withdraws, in its name, the applications it made that wait for
a decision (received, invited to a second stage, or with their full proposal sent;
``call.application_withdrawn``, saying why; before, they waited for their publishers to decide on
an applicant that could no longer be told).

8: a member that leaves the network declines, in its name, the applications that wait for its
decision in the calls it published (``call.application_decided``, ``declined``, its comment
saying why; before, they waited for good, an invited one in a call closed early never lapsing)."""

_JUDGED_BY: ContextVar[int] = ContextVar("collabbus_rules", default=RULES)


def since(version: int) -> bool:
    """Whether the event being judged is judged by rules of ``version`` or later (outside the
    application of a logged event — a test, a rule called directly — the current ones)."""
    return _JUDGED_BY.get() >= version


@contextmanager
def judged_by(version: int) -> Iterator[None]:
    """Judge the events applied within by the rules of ``version``."""
    token = _JUDGED_BY.set(version)
    try:
        yield
    finally:
        _JUDGED_BY.reset(token)


@dataclass(frozen=True)
class Refusal:
    """Why a workflow refuses an event: a code from the refusal event's vocabulary, and a sentence
    for people."""

    code: str
    message: str

    def as_reason(self) -> dict[str, Any]:
        """The ``reason`` of a ``…_rejected`` event."""
        return {"code": self.code, "message": {"en": self.message}}
