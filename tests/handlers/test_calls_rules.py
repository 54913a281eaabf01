"""The calls workflow's rules, without a database: status, applications, amendments, closing."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handlers.rules import Refusal, judged_by
from handlers.rules.calls import (
    Applicant,
    CallSnapshot,
    amendment_refusal,
    application_refusal,
    call_status,
    closed_at,
    closing_refusal,
    publication_refusal,
)

pytestmark = pytest.mark.quick

OPENS = datetime(2026, 3, 1, 8, 0, tzinfo=timezone.utc)
DEADLINE = datetime(2026, 5, 31, 20, 59, 59, tzinfo=timezone.utc)
DURING = datetime(2026, 4, 15, 12, 0, tzinfo=timezone.utc)
OWNER = "eu-esf-fund"
CALL = CallSnapshot(
    call_id="esf-2026-social-inclusion",
    owner=OWNER,
    opens_at=OPENS,
    deadline=DEADLINE,
    eligible_kinds=frozenset({"municipality", "cooperative"}),
    eligible_countries=frozenset({"TR", "FI"}),
)
COOPERATIVE = Applicant("tr-genc-isi-koop", "cooperative", "TR")


def code(refusal: Refusal | None) -> str | None:
    return refusal.code if refusal else None


# --- status ------------------------------------------------------------------------------------


def test_status_follows_the_window() -> None:
    assert call_status(CALL, OPENS - timedelta(seconds=1)) == "upcoming"
    assert call_status(CALL, OPENS) == "open"
    assert call_status(CALL, DEADLINE) == "open"
    assert call_status(CALL, DEADLINE + timedelta(microseconds=1)) == "closed"


def test_a_two_stage_calls_stage_follows_its_deadlines_and_its_closing() -> None:
    from handlers.rules.calls import call_stage

    second_deadline = DEADLINE + timedelta(days=30)
    two_stage = replace(CALL, two_stage=True, full_proposal_deadline=second_deadline)
    assert call_stage(CALL, DEADLINE + timedelta(days=1)) is None  # a single stage
    assert [call_stage(two_stage, moment) for moment in (OPENS - timedelta(days=1), DURING, DEADLINE)] == ["first"] * 3
    closed_at_deadline = replace(two_stage, closed_at=DEADLINE, closed_reason="deadline_passed")
    for call in (two_stage, closed_at_deadline):  # (before and after the bus said it closed)
        assert call_stage(call, DEADLINE + timedelta(seconds=1)) == "second" == call_stage(call, second_deadline)
        assert call_stage(call, second_deadline + timedelta(seconds=1)) == "ended"
    assert call_stage(replace(two_stage, full_proposal_deadline=None), DEADLINE + timedelta(days=400)) == "second"  # no limit
    filled = replace(closed_at_deadline, closed_reason="filled")  # in its second stage
    cancelled = replace(two_stage, closed_at=DURING, closed_reason="cancelled")  # in its first
    assert call_stage(filled, DEADLINE + timedelta(days=1)) == "ended" == call_stage(cancelled, DURING + timedelta(days=1))


def test_a_closed_call_is_closed_whatever_the_time() -> None:
    cancelled = replace(CALL, closed_at=OPENS - timedelta(days=1))
    assert call_status(cancelled, OPENS - timedelta(hours=1)) == "closed"
    assert call_status(cancelled, DURING) == "closed"


# --- applications ------------------------------------------------------------------------------


def test_an_eligible_application_in_the_window_is_received() -> None:
    assert application_refusal(CALL, COOPERATIVE, DURING) is None
    assert application_refusal(CALL, COOPERATIVE, OPENS) is None
    assert application_refusal(CALL, COOPERATIVE, DEADLINE) is None


@pytest.mark.parametrize(
    ("call", "applicant", "logged_at", "expected"),
    [
        (None, COOPERATIVE, DURING, "unknown_call"),
        (CALL, COOPERATIVE, OPENS - timedelta(seconds=1), "before_opening"),
        (CALL, COOPERATIVE, DEADLINE + timedelta(seconds=1), "after_deadline"),
        (replace(CALL, closed_at=DURING - timedelta(days=1)), COOPERATIVE, DURING, "call_closed"),
        (CALL, Applicant("fi-thl", "competence_centre", "FI"), DURING, "ineligible_kind"),
        (CALL, Applicant("se-coop", "cooperative", "SE"), DURING, "ineligible_country"),
        (CALL, Applicant("nobody", None, None), DURING, "ineligible_kind"),
    ],
)
def test_application_refusals(
    call: CallSnapshot | None, applicant: Applicant, logged_at: datetime, expected: str
) -> None:
    refusal = application_refusal(call, applicant, logged_at)
    assert code(refusal) == expected
    assert refusal is not None and refusal.as_reason() == {"code": expected, "message": {"en": refusal.message}}


def test_an_amount_in_another_currency_than_the_budgets_is_refused() -> None:
    in_euros = replace(CALL, currency="EUR")
    assert code(application_refusal(in_euros, COOPERATIVE, DURING, currency="TRY")) == "currency_mismatch"
    assert application_refusal(in_euros, COOPERATIVE, DURING, currency="EUR") is None
    assert application_refusal(in_euros, COOPERATIVE, DURING) is None  # no amount requested
    assert application_refusal(CALL, COOPERATIVE, DURING, currency="TRY") is None  # the call states no budget


def test_an_application_logged_before_the_call_closed_stays_in_time_when_applied_later() -> None:
    """Closed at its deadline by the timer while the application, logged in time, waited to be
    applied (a backlog, a restart): it is received, as a replay of the log in order would."""
    closed_by_timer = replace(CALL, closed_at=DEADLINE)
    assert application_refusal(closed_by_timer, COOPERATIVE, DEADLINE - timedelta(seconds=1)) is None
    assert application_refusal(closed_by_timer, COOPERATIVE, DEADLINE) is None  # the deadline is included
    cancelled = replace(CALL, closed_at=DURING)
    assert application_refusal(cancelled, COOPERATIVE, DURING - timedelta(seconds=1)) is None
    assert code(application_refusal(cancelled, COOPERATIVE, DURING + timedelta(seconds=1))) == "call_closed"


def test_empty_eligibility_means_everyone() -> None:
    open_to_all = replace(CALL, eligible_kinds=frozenset(), eligible_countries=frozenset())
    assert application_refusal(open_to_all, Applicant("jo-amman-sic", "ngo", "JO"), DURING) is None
    assert application_refusal(open_to_all, Applicant("not-a-member", None, None), DURING) is None


def test_a_duplicate_is_refused_before_anything_else() -> None:
    assert code(application_refusal(CALL, COOPERATIVE, DURING, duplicate=True)) == "duplicate_application"
    assert code(application_refusal(CALL, COOPERATIVE, DEADLINE + timedelta(days=1), duplicate=True)) == "duplicate_application"


def test_a_publisher_does_not_apply_to_its_own_call() -> None:
    """It would decide on its own application, and award itself from the budget; by the rules
    before version 4 (a log applied then), it was received."""
    open_to_all = replace(CALL, eligible_kinds=frozenset(), eligible_countries=frozenset())
    itself = Applicant(OWNER, "funder", "BE")
    refusal = application_refusal(open_to_all, itself, DURING)
    assert refusal == Refusal("own_call", f"{OWNER} published the call: it decides on the applications to it, and does not "
                                          "apply to it itself.")
    # What the contract's rules answer (the window, the eligibility) comes first, as before version 4.
    assert code(application_refusal(CALL, itself, DEADLINE + timedelta(days=1))) == "after_deadline"
    assert code(application_refusal(CALL, itself, DURING)) == "ineligible_kind"
    assert code(application_refusal(open_to_all, itself, DURING, duplicate=True)) == "duplicate_application"
    with judged_by(3):
        assert application_refusal(open_to_all, itself, DURING) is None


def test_after_the_deadline_is_said_whether_or_not_the_closing_came_first() -> None:
    """The bus's closing is applied before it reaches the log: live it precedes a late
    application, in a rebuild it may follow it. Both must give the same answer."""
    late = DEADLINE + timedelta(minutes=5)
    closed_by_bus = replace(CALL, closed_at=DEADLINE)
    assert code(application_refusal(CALL, COOPERATIVE, late)) == "after_deadline"
    assert code(application_refusal(closed_by_bus, COOPERATIVE, late)) == "after_deadline"


KINDS = st.sampled_from(["municipality", "cooperative", "ngo", "university", "funder"])
COUNTRIES = st.sampled_from(["TR", "FI", "SE", "JO"])


@given(
    opens_in=st.integers(-1000, 1000),
    lasts=st.integers(1, 1000),
    logged_in=st.integers(-2000, 2000),
    closed_in=st.one_of(st.none(), st.integers(-2000, 2000)),
    eligible_kinds=st.frozensets(KINDS),
    eligible_countries=st.frozensets(COUNTRIES),
    kind=st.one_of(st.none(), KINDS),
    country=st.one_of(st.none(), COUNTRIES),
)
def test_received_iff_in_the_window_not_closed_and_eligible(
    opens_in: int,
    lasts: int,
    logged_in: int,
    closed_in: int | None,
    eligible_kinds: frozenset[str],
    eligible_countries: frozenset[str],
    kind: str | None,
    country: str | None,
) -> None:
    minute = timedelta(minutes=1)
    call = CallSnapshot(
        call_id="c",
        owner=OWNER,
        opens_at=DURING + opens_in * minute,
        deadline=DURING + (opens_in + lasts) * minute,
        eligible_kinds=eligible_kinds,
        eligible_countries=eligible_countries,
        closed_at=None if closed_in is None else DURING + closed_in * minute,
    )
    logged_at = DURING + logged_in * minute
    received = (
        call.opens_at <= logged_at <= call.deadline
        and (call.closed_at is None or logged_at <= call.closed_at)  # not closed when it was logged
        and (not eligible_kinds or kind in eligible_kinds)
        and (not eligible_countries or country in eligible_countries)
    )
    assert (application_refusal(call, Applicant("applicant", kind, country), logged_at) is None) == received


# --- publication, amendments, closing ----------------------------------------------------------


def test_a_call_id_is_published_once() -> None:
    assert publication_refusal(None) is None
    assert code(publication_refusal(CALL)) == "already_published"


def test_only_the_owner_amends_an_unclosed_call() -> None:
    assert amendment_refusal(CALL, OWNER, OPENS - timedelta(days=1)) is None  # upcoming
    assert amendment_refusal(CALL, OWNER, DURING) is None
    assert code(amendment_refusal(None, OWNER, DURING)) == "unknown_call"
    assert code(amendment_refusal(CALL, "fi-soste", DURING)) == "not_owner"
    assert code(amendment_refusal(CALL, OWNER, DEADLINE + timedelta(seconds=1))) == "call_closed"
    assert code(amendment_refusal(replace(CALL, closed_at=DURING), OWNER, DURING)) == "call_closed"


def test_an_amended_window_must_still_open_before_its_deadline() -> None:
    assert amendment_refusal(CALL, OWNER, DURING, deadline=DEADLINE + timedelta(days=15)) is None
    upcoming = OPENS - timedelta(days=1)
    assert code(amendment_refusal(CALL, OWNER, upcoming, deadline=OPENS)) == "invalid_window"
    assert code(amendment_refusal(CALL, OWNER, upcoming, opens_at=DEADLINE + timedelta(days=1))) == "invalid_window"
    both = amendment_refusal(CALL, OWNER, upcoming, opens_at=DEADLINE, deadline=DEADLINE + timedelta(days=1))
    assert both is None


def test_an_amendment_neither_moves_the_deadline_into_the_past_nor_an_opening_that_has_come_later() -> None:
    """Applications received would stand after the deadline, and those being prepared would be
    shut out at once (the call ends now by its closing); an open call would show as upcoming
    with applications in hand."""
    assert code(amendment_refusal(CALL, OWNER, DURING, deadline=DURING - timedelta(minutes=1))) == "deadline_in_past"
    assert amendment_refusal(CALL, OWNER, DURING, deadline=DURING + timedelta(minutes=1)) is None  # sooner, not past
    assert code(amendment_refusal(CALL, OWNER, DURING, opens_at=DURING + timedelta(minutes=30))) == "already_open"
    assert amendment_refusal(CALL, OWNER, DURING, opens_at=OPENS - timedelta(days=1)) is None  # earlier: fine
    assert amendment_refusal(CALL, OWNER, OPENS - timedelta(days=2), opens_at=OPENS + timedelta(days=1)) is None  # not open yet
    two_stage = replace(CALL, two_stage=True, full_proposal_deadline=DEADLINE + timedelta(days=30))
    past = amendment_refusal(two_stage, OWNER, DEADLINE + timedelta(days=1), full_proposal_deadline=DEADLINE + timedelta(hours=1),
                             changed=frozenset({"full_proposal_deadline"}))
    assert code(past) == "deadline_in_past" and "full proposals" in (past.message if past else "")


def test_only_the_owner_closes_an_open_call() -> None:
    assert closing_refusal(CALL, OWNER, DURING, "cancelled") is None
    assert code(closing_refusal(None, OWNER, DURING, "cancelled")) == "unknown_call"
    assert code(closing_refusal(CALL, "fi-soste", DURING, "filled")) == "not_owner"
    assert code(closing_refusal(replace(CALL, closed_at=DURING), OWNER, DURING, "filled")) == "call_closed"
    assert code(closing_refusal(CALL, OWNER, DEADLINE + timedelta(hours=1), "filled")) == "call_closed"


def test_the_deadline_closing_is_accepted_once_after_the_deadline() -> None:
    """The bus's own ``call.closed`` is logged after the deadline; replayed, it must still apply."""
    late = DEADLINE + timedelta(days=3)  # e.g. the bus was down
    assert closing_refusal(CALL, OWNER, late, "deadline_passed") is None
    assert code(closing_refusal(replace(CALL, closed_at=DEADLINE), OWNER, late, "deadline_passed")) == "call_closed"
    assert code(closing_refusal(CALL, "fi-soste", late, "deadline_passed")) == "not_owner"


def test_a_call_closes_when_logged_but_never_after_its_deadline() -> None:
    assert closed_at(CALL, DURING) == DURING
    assert closed_at(CALL, DEADLINE + timedelta(days=3)) == DEADLINE


def test_awards_may_not_exceed_the_budget_with_what_was_awarded_before() -> None:
    """A funder's award of more than is left of the call's budget (a digit too many, a second
    award the budget does not cover) is refused, saying how much is left; an award without an
    amount, or in a call that states no budget, is not weighed."""
    from decimal import Decimal

    from handlers.rules.calls import ApplicationSnapshot, decision_refusal

    budgeted = replace(CALL, currency="EUR", budget=Decimal("100000"))
    received = ApplicationSnapshot("app-1", COOPERATIVE.institution, "received")

    def award(call: CallSnapshot, amount: str | None, awarded: str = "0") -> Refusal | None:
        return decision_refusal(replace(call, awarded=Decimal(awarded)), received, OWNER, decision="awarded",
                                currency="EUR" if amount else None, logged_at=DURING, amount=Decimal(amount) if amount else None)

    assert award(budgeted, "100000.00") is None and award(budgeted, "40000", awarded="60000") is None
    too_much = award(budgeted, "1000000.00")
    assert code(too_much) == "over_budget" and too_much is not None
    assert too_much.message == ("The call's budget is 100,000 EUR and 0 EUR is awarded already: award at most 100,000 EUR, "
                                "or raise the budget first (call.amended).")
    assert code(award(budgeted, "40000.01", awarded="60000")) == "over_budget"
    assert "at most 0 EUR" in (award(budgeted, "1", awarded="120000") or Refusal("", "")).message  # (never a negative rest)
    assert code(award(budgeted, None, awarded="100000")) == "no_amount"  # the call gives money: how much?
    with judged_by(1):
        assert award(budgeted, None, awarded="100000") is None  # (a log applied before: as it was)
    assert award(replace(budgeted, budget=None, currency=None), "5000000") is None
    # Amounts the log holds from before their bound, past the 28 digits of decimal arithmetic: weighed exactly.
    huge = replace(CALL, currency="EUR", budget=Decimal("1" + "0" * 30))
    assert award(huge, "1", awarded="9" * 30) is None
    beyond = award(huge, "2", awarded="9" * 30)
    assert code(beyond) == "over_budget" and beyond is not None and "award at most 1 EUR" in beyond.message


def test_an_award_is_no_more_than_the_application_asks_for() -> None:
    """A zero too many in an award: the budget catches it only when it is too small. By the rules
    before version 4 (a log applied then), it was taken."""
    from decimal import Decimal

    from handlers.rules.calls import ApplicationSnapshot, decision_refusal

    budgeted = replace(CALL, currency="EUR", budget=Decimal("1500000"))
    asking = ApplicationSnapshot("app-1", COOPERATIVE.institution, "received", requested=(Decimal("24000.00"), "EUR"))

    def award(application: ApplicationSnapshot, amount: str, currency: str = "EUR", call: CallSnapshot = budgeted) -> Refusal | None:
        return decision_refusal(call, application, OWNER, decision="awarded", currency=currency, logged_at=DURING,
                                amount=Decimal(amount))

    typo = award(asking, "240000.00")
    assert typo == Refusal("above_request", "Application app-1 asks for 24,000.00 EUR: award at most that, not 240,000.00 EUR.")
    assert award(asking, "24000") is None and award(asking, "20000.00") is None  # what it asks, or less
    assert award(replace(asking, requested=None), "240000.00") is None  # it named no amount: the budget weighs it
    unbudgeted = replace(CALL)
    assert award(asking, "240000", "USD", call=unbudgeted) is None  # (another currency: not comparable)
    assert code(award(asking, "240000", call=unbudgeted)) == "above_request"
    # A two-stage call's application asks, once its full proposal came, what the proposal asks.
    two_stage = replace(budgeted, two_stage=True)
    proposed = replace(asking, status="proposal_sent", requested=(Decimal("30000.00"), "EUR"))
    assert award(proposed, "30000.00", call=two_stage) is None
    assert code(award(proposed, "30000.01", call=two_stage)) == "above_request"
    with judged_by(3):
        assert award(asking, "240000.00") is None


def test_an_award_of_nothing_is_refused() -> None:
    """Awarded, with an amount of zero: a decline shown to the applicant as an award."""
    from decimal import Decimal

    from handlers.rules.calls import ApplicationSnapshot, decision_refusal

    received = ApplicationSnapshot("app-1", COOPERATIVE.institution, "received", requested=(Decimal("24000.00"), "EUR"))
    for call in (replace(CALL, currency="EUR", budget=Decimal("1500000")), CALL):
        for zero in ("0", "0.00"):
            refusal = decision_refusal(call, received, OWNER, decision="awarded", currency="EUR", logged_at=DURING,
                                       amount=Decimal(zero))
            assert refusal == Refusal("no_amount", f"An award of {zero} EUR grants nothing: name the awarded_amount granted, "
                                                   "or decline the application.")
            with judged_by(3):
                assert decision_refusal(call, received, OWNER, decision="awarded", currency="EUR", logged_at=DURING,
                                        amount=Decimal(zero)) is None


def test_a_call_without_a_budget_awards_in_the_currency_of_its_first_award() -> None:
    """What a call awarded is one sum: a call without a budget (or whose budget was removed by a
    log applied before that was refused) takes its awards in the currency of the first one."""
    from decimal import Decimal

    from handlers.rules.calls import ApplicationSnapshot, decision_refusal

    unbudgeted = replace(CALL, awarded=Decimal("40000"), awarded_currency="USD")
    received = ApplicationSnapshot("app-2", COOPERATIVE.institution, "received")

    def award(currency: str) -> Refusal | None:
        return decision_refusal(unbudgeted, received, OWNER, decision="awarded", currency=currency, logged_at=DURING,
                                amount=Decimal("99999999"))

    assert award("USD") is None
    eur = award("EUR")
    assert code(eur) == "currency_mismatch" and eur is not None and "in USD too, not EUR" in eur.message
    with judged_by(1):
        assert award("EUR") is None
    # A budget given to it later is in that currency, and covers what was awarded.
    assert code(amendment_refusal(unbudgeted, OWNER, DURING, changed=frozenset({"budget"}),
                                  budget=(Decimal("50000"), "EUR"))) == "currency_mismatch"
    assert amendment_refusal(unbudgeted, OWNER, DURING, changed=frozenset({"budget"}), budget=(Decimal("50000"), "USD")) is None


def test_a_budget_is_not_removed_once_awarded_nor_its_currency_changed_once_applied_to() -> None:
    from decimal import Decimal

    budgeted = replace(CALL, currency="USD", budget=Decimal("120000"))

    def amended(call: CallSnapshot, budget: tuple[Decimal, str] | None) -> Refusal | None:
        return amendment_refusal(call, OWNER, DURING, changed=frozenset({"budget"}), budget=budget)

    assert amended(budgeted, None) is None  # nothing awarded yet
    awarded = replace(budgeted, awarded=Decimal("40000"))
    removed = amended(awarded, None)
    assert code(removed) == "already_awarded" and removed is not None and "40,000 USD" in removed.message
    with judged_by(1):
        assert amended(awarded, None) is None
    into_eur = (Decimal("120000"), "EUR")
    assert amended(budgeted, into_eur) is None  # nobody applied yet
    applied = replace(budgeted, received=True)
    moved = amended(applied, into_eur)
    assert code(moved) == "currency_mismatch" and moved is not None and "stays in USD" in moved.message
    assert amended(applied, (Decimal("150000"), "USD")) is None
    with judged_by(1):
        assert amended(applied, into_eur) is None


def test_an_amendment_refusal_names_the_field_changed() -> None:
    """An opening moved later than the deadline on an open call is named as the opening moved
    (already_open), a deadline moved into the past as such, not as the window they also break."""
    assert code(amendment_refusal(CALL, OWNER, DURING, opens_at=DEADLINE + timedelta(days=1))) == "already_open"
    assert code(amendment_refusal(CALL, OWNER, DURING, deadline=OPENS - timedelta(days=1))) == "deadline_in_past"
    with judged_by(1):
        assert code(amendment_refusal(CALL, OWNER, DURING, opens_at=DEADLINE + timedelta(days=1))) == "invalid_window"


def test_a_call_is_not_closed_as_past_its_deadline_before_it() -> None:
    early = closing_refusal(CALL, OWNER, DURING, "deadline_passed")
    assert code(early) == "before_deadline" and early is not None and "cancelled or filled" in early.message
    assert closing_refusal(CALL, OWNER, DEADLINE, "deadline_passed") is None  # at the deadline, as the bus does
    assert closing_refusal(CALL, OWNER, DURING, "cancelled") is None
    with judged_by(1):
        assert closing_refusal(CALL, OWNER, DURING, "deadline_passed") is None


def test_an_applications_partners_are_other_members_named_once_and_its_project_one_of_the_applicants() -> None:
    municipality = Applicant("tr-mersin-bb", "municipality", "TR")
    call = replace(CALL, eligible_kinds=frozenset())

    def refused(partners: tuple[Applicant, ...] = (), project_id: str | None = None,
                project: tuple[str, frozenset[str]] | None = None) -> str | None:
        return code(application_refusal(call, COOPERATIVE, DURING, partners=partners, project_id=project_id, project=project))

    assert refused((municipality,), "p-1", (COOPERATIVE.institution, frozenset())) is None
    assert refused((municipality,), "p-1", ("tr-mersin-bb", frozenset({COOPERATIVE.institution}))) is None  # a partner of it
    assert refused((Applicant("tr-mersin-b", None, None),)) == "unknown_partner"
    assert refused((COOPERATIVE,)) == "invalid_partner"
    assert refused((municipality, municipality)) == "invalid_partner"
    assert refused((Applicant("operator", "operator", None),)) == "invalid_partner"
    assert refused(project_id="p-none") == "unknown_project"
    assert refused(project_id="p-2", project=("tr-mersin-bb", frozenset({"fi-other"}))) == "not_project_party"
    with judged_by(1):
        assert refused((Applicant("tr-mersin-b", None, None),), "p-none") is None


def test_an_amended_budget_is_not_less_than_the_call_awarded_nor_in_another_currency() -> None:
    from decimal import Decimal

    def amend(budget: tuple[str, str], awarded: str) -> Refusal | None:
        return amendment_refusal(replace(CALL, currency="EUR", budget=Decimal("100000"), awarded=Decimal(awarded)), OWNER, DURING,
                                 budget=(Decimal(budget[0]), budget[1]), changed=frozenset({"budget"}))

    assert amend(("50000", "EUR"), "50000") is None and amend(("80000", "TRY"), "0") is None
    lowered = amend(("49999.99", "EUR"), "50000")
    assert code(lowered) == "over_budget" and lowered is not None and "awarded 50,000 EUR already" in lowered.message
    assert code(amend(("5000000", "TRY"), "50000")) == "currency_mismatch"


# --- rules 3: what an amount asked for or awarded holds to ------------------------------------------


def test_an_amount_has_no_more_decimals_than_its_currency() -> None:
    """ISO 4217's minor units: two decimals for EUR and TRY, none for JPY and ISK, three for KWD;
    trailing zeros are not decimals more."""
    from decimal import Decimal

    from handlers.rules.calls import ApplicationSnapshot, decision_refusal

    call = replace(CALL, eligible_kinds=frozenset())

    def asked(amount: str, currency: str) -> Refusal | None:
        return application_refusal(call, COOPERATIVE, DURING, currency=currency, amount=Decimal(amount))

    for amount, currency in (("240000.50", "EUR"), ("240000.500", "TRY"), ("1500000", "JPY"), ("1500000.00", "ISK"),
                             ("1.125", "KWD")):
        assert asked(amount, currency) is None, (amount, currency)
    cents = asked("240000.005", "EUR")
    assert code(cents) == "too_many_decimals" and cents is not None
    assert cents.message == "240000.005 EUR has 3 decimals, and EUR has 2 (ISO 4217): request an amount of at most 2 decimals."
    yen = asked("1500000.5", "JPY")
    assert code(yen) == "too_many_decimals" and yen is not None and "JPY has none (ISO 4217): request a whole amount" in yen.message
    assert code(asked("1.1255", "KWD")) == "too_many_decimals"
    received = ApplicationSnapshot("app-1", COOPERATIVE.institution, "received")
    award = decision_refusal(call, received, OWNER, decision="awarded", currency="EUR", logged_at=DURING, amount=Decimal("10.001"))
    assert code(award) == "too_many_decimals" and award is not None and award.message.endswith("award an amount of at most 2 decimals.")
    with judged_by(2):  # (a log applied before: taken, as it was)
        assert asked("240000.005", "EUR") is None and asked("1500000.5", "JPY") is None
        assert decision_refusal(call, received, OWNER, decision="awarded", currency="EUR", logged_at=DURING,
                                amount=Decimal("10.001")) is None


def test_a_request_is_not_more_than_the_calls_whole_budget() -> None:
    from decimal import Decimal

    from handlers.rules.calls import ApplicationSnapshot, full_proposal_refusal

    budgeted = replace(CALL, eligible_kinds=frozenset(), currency="EUR", budget=Decimal("100000"), awarded=Decimal("90000"))

    def asked(amount: str) -> Refusal | None:
        return application_refusal(budgeted, COOPERATIVE, DURING, currency="EUR", amount=Decimal(amount))

    assert asked("100000.00") is None  # (what is left is the publisher's to weigh: a request is no award)
    over = asked("100000.01")
    assert code(over) == "over_budget" and over is not None
    assert over.message == "The call's whole budget is 100,000 EUR: a request of 100,000.01 EUR exceeds it; ask for at most that."
    invited = ApplicationSnapshot("app-1", COOPERATIVE.institution, "invited")
    two_stage = replace(budgeted, two_stage=True)
    assert code(full_proposal_refusal(two_stage, invited, COOPERATIVE.institution, DURING, currency="EUR",
                                      amount=Decimal("250000"))) == "over_budget"
    with judged_by(2):
        assert asked("100000.01") is None


def test_a_call_without_a_budget_takes_requests_in_the_currency_of_those_standing() -> None:
    """Its first application standing that asks for an amount names the currency the others ask
    in, and a budget given later is in it."""
    from decimal import Decimal

    unbudgeted = replace(CALL, eligible_kinds=frozenset())
    asking_eur = replace(unbudgeted, requested_currency="EUR")

    def asked(call: CallSnapshot, currency: str) -> Refusal | None:
        return application_refusal(call, COOPERATIVE, DURING, currency=currency, amount=Decimal("1000"))

    assert asked(unbudgeted, "USD") is None and asked(asking_eur, "EUR") is None
    dollars = asked(asking_eur, "USD")
    assert code(dollars) == "currency_mismatch" and dollars is not None
    assert dollars.message == ("The call has no budget and the applications to it ask in EUR: request the amount in EUR too, "
                               "not USD.")
    budget = amendment_refusal(asking_eur, OWNER, DURING, changed=frozenset({"budget"}), budget=(Decimal("50000"), "USD"))
    assert code(budget) == "currency_mismatch" and budget is not None and "give it a budget in EUR, not USD" in budget.message
    assert amendment_refusal(asking_eur, OWNER, DURING, changed=frozenset({"budget"}), budget=(Decimal("50000"), "EUR")) is None
    with judged_by(2):
        assert asked(asking_eur, "USD") is None
        assert amendment_refusal(asking_eur, OWNER, DURING, changed=frozenset({"budget"}), budget=(Decimal("50000"), "USD")) is None
