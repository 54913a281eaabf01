"""The calls workflow (CONTRACT.md §5): given events → when an event → then state and emitted events."""

from __future__ import annotations

import asyncio

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from handlers.calls import Call, CallApplication, audience, status_is
from handlers.db import make_engine
from handlers.rules.calls import CallStatus
from tests.conftest import fresh_database
from tests.handlers.harness import Scenario, applied_by_rules, envelope

OWNER = "eu-esf-fund"
OTHER_FUNDER = "fi-stea"
COOPERATIVE = "tr-genc-isi-koop"
UNIVERSITY = "tr-mersin-uni"
SWEDISH_COOPERATIVE = "se-coop-vast"
PARTNER = "tr-mersin-bb"
NON_MEMBER = "fi-not-a-member"


def joined(institution: str, kind: str, country: str) -> dict[str, Any]:
    data = {"id": institution, "name": {"en": institution}, "kind": kind, "country": country}
    return envelope("institution.joined", "operator", data)


PROJECT = "genc-isi-belediye-isbirligi"
"""The project this module's applications name: the cooperative's, with the other applicants
among its partners (an application names a project its applicant owns or is a partner of)."""

MEMBERS = [
    joined(OWNER, "funder", "BE"),
    joined(OTHER_FUNDER, "funder", "FI"),
    joined(COOPERATIVE, "cooperative", "TR"),
    joined(UNIVERSITY, "university", "TR"),
    joined(SWEDISH_COOPERATIVE, "cooperative", "SE"),
    joined(PARTNER, "municipality", "TR"),
    envelope("project.registered", COOPERATIVE, {
        "project_id": PROJECT, "title": {"en": "Genç İşi municipal cooperation"}, "owner": COOPERATIVE, "status": "active",
        "partners": [{"institution": p, "role": "partner"} for p in (PARTNER, UNIVERSITY, SWEDISH_COOPERATIVE)]}),
]


def now() -> datetime:
    return datetime.now(timezone.utc)


def published(call_id: str, *, opens_in: timedelta = -timedelta(days=1), closes_in: timedelta = timedelta(days=30), by: str = OWNER) -> dict[str, Any]:
    """A funding call for municipalities and cooperatives in Türkiye and Finland."""
    data = {
        "call_id": call_id,
        "title": {"en": "ESF+ Social Inclusion Pilots", "tr": "ESF+ Sosyal İçerme Pilotları"},
        "summary": {"en": "Neighbourhood-based services with disadvantaged groups."},
        "kind": "funding",
        "themes": ["economy.disadvantaged_groups"],
        "eligible_kinds": ["municipality", "cooperative"],
        "eligible_countries": ["TR", "FI"],
        "budget": {"amount": "1500000.00", "currency": "EUR"},
        "opens_at": (now() + opens_in).isoformat(),
        "deadline": (now() + closes_in).isoformat(),
        "deadline_model": "single_stage",
        "url": "https://esf-fund.example.eu/calls/2026-social-inclusion",
    }
    return envelope("call.published", by, data)


def application(call_id: str, application_id: str, *, by: str = COOPERATIVE, currency: str = "EUR",
                amount: str = "240000.00") -> dict[str, Any]:
    data = {
        "call_id": call_id,
        "application_id": application_id,
        "project_id": PROJECT,
        "partners": [partner for partner in (PARTNER,) if partner != by],  # (not the applicant itself)
        "requested_amount": {"amount": amount, "currency": currency},
    }
    return envelope("call.application_submitted", by, data)


def decided(call_id: str, application_id: str, decision: str = "awarded", *, by: str = OWNER,
            amount: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {"call_id": call_id, "application_id": application_id, "decision": decision,
                            "comment": {"en": "Thank you", "tr": "Teşekkürler"}}
    if amount is not None:
        data["awarded_amount"] = amount
    return envelope("call.application_decided", by, data)


def withdrawn(call_id: str, application_id: str, *, by: str = COOPERATIVE) -> dict[str, Any]:
    return envelope("call.application_withdrawn", by,
                    {"call_id": call_id, "application_id": application_id, "reason": {"en": "No co-funding this year"}})


def amended(call_id: str, changes: dict[str, Any], *, by: str = OWNER) -> dict[str, Any]:
    return envelope("call.amended", by, {"call_id": call_id, "changes": changes, "reason": {"en": "Information days"}})


def closed(call_id: str, reason: str = "cancelled", *, by: str = OWNER) -> dict[str, Any]:
    return envelope("call.closed", by, {"call_id": call_id, "reason": reason})


def the_only(emitted: list[dict[str, Any]], type_: str) -> dict[str, Any]:
    assert [e["type"] for e in emitted] == [type_], emitted
    return emitted[0]


@pytest.fixture
def call_id() -> str:
    return f"call-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def members(scenario: Scenario) -> None:
    await scenario.given(*MEMBERS)


pytestmark = pytest.mark.usefixtures("members")


# --- publication ---------------------------------------------------------------------------------


async def test_a_published_call_belongs_to_its_publisher_and_its_status_follows_the_clock(
    scenario: Scenario, call_id: str
) -> None:
    publication = published(call_id, opens_in=timedelta(days=1), closes_in=timedelta(days=10))
    assert await scenario.when(publication) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None
        assert call.owner == OWNER and call.title["tr"] == "ESF+ Sosyal İçerme Pilotları"
        assert call.eligible_kinds == ["municipality", "cooperative"]
        assert call.budget == {"amount": "1500000.00", "currency": "EUR"}
        assert call.deadline == datetime.fromisoformat(publication["data"]["deadline"])
        assert call.closed_at is None
        moments: dict[CallStatus, datetime] = {"upcoming": now(), "open": now() + timedelta(days=2), "closed": now() + timedelta(days=11)}
        for status, moment in moments.items():
            assert call.status(moment) == status
            listed = session.exec(select(Call.call_id).where(col(Call.call_id) == call_id, status_is(status, moment))).all()
            assert listed == [call_id], status


async def test_a_call_id_is_published_once(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    again = published(call_id, by=OTHER_FUNDER, closes_in=timedelta(days=3))
    rejection = the_only(await scenario.when(again), "call.action_rejected")
    assert rejection["source"] == f"/institutions/{OWNER}" and rejection["causationid"] == again["id"]
    assert rejection["data"]["reason"]["code"] == "already_published"
    assert rejection["data"]["actor"] == OTHER_FUNDER and rejection["data"]["rejected_type"] == "call.published"
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.owner == OWNER and call.deadline > now() + timedelta(days=20)


# --- applications --------------------------------------------------------------------------------


async def test_an_eligible_application_in_the_window_is_received(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    submission = application(call_id, "app-1")
    received = the_only(await scenario.when(submission), "call.application_received")
    assert received["source"] == f"/institutions/{OWNER}"  # in the name of the call's owner
    assert received["causationid"] == submission["id"]
    assert received["data"] == {"call_id": call_id, "application_id": "app-1", "applicant": COOPERATIVE}
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "received" and stored.reason is None
        assert stored.applicant == COOPERATIVE and stored.partners == ["tr-mersin-bb"]
        assert stored.requested_amount == {"amount": "240000.00", "currency": "EUR"}


@pytest.mark.parametrize(
    ("window", "applicant", "reason"),
    [
        ((timedelta(days=1), timedelta(days=30)), COOPERATIVE, "before_opening"),
        ((-timedelta(days=30), -timedelta(days=1)), COOPERATIVE, "after_deadline"),
        ((-timedelta(days=1), timedelta(days=30)), UNIVERSITY, "ineligible_kind"),
        ((-timedelta(days=1), timedelta(days=30)), SWEDISH_COOPERATIVE, "ineligible_country"),
    ],
)
async def test_an_application_outside_the_window_or_from_an_ineligible_member_is_rejected(
    scenario: Scenario, call_id: str, window: tuple[timedelta, timedelta], applicant: str, reason: str
) -> None:
    opens_in, closes_in = window
    await scenario.given(published(call_id, opens_in=opens_in, closes_in=closes_in))
    submission = application(call_id, "app-1", by=applicant)
    rejection = the_only(await scenario.when(submission), "call.application_rejected")
    assert rejection["source"] == f"/institutions/{OWNER}" and rejection["causationid"] == submission["id"]
    assert rejection["data"]["reason"]["code"] == reason and rejection["data"]["applicant"] == applicant
    asked = {key: submission["data"][key] for key in ("project_id", "partners", "requested_amount")}
    assert {key: rejection["data"][key] for key in asked} == asked  # what was asked, for the publisher and the partners
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "rejected"
        assert stored.reason is not None and stored.reason["code"] == reason
        assert (stored.project_id, stored.partners, stored.requested_amount) == tuple(asked.values())


async def test_a_publisher_applying_to_its_own_call_is_rejected(scenario: Scenario, call_id: str) -> None:
    """Received, it could be awarded by its own applicant from the call's budget."""
    open_to_all = published(call_id)
    open_to_all["data"].update(eligible_kinds=[], eligible_countries=[])
    await scenario.given(open_to_all)
    own = envelope("call.application_submitted", OWNER, {"call_id": call_id, "application_id": "app-own",
                                                         "requested_amount": {"amount": "100000.00", "currency": "EUR"}})
    rejection = the_only(await scenario.when(own), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "own_call" and rejection["data"]["applicant"] == OWNER
    award = envelope("call.application_decided", OWNER, {"call_id": call_id, "application_id": "app-own", "decision": "awarded",
                                                         "awarded_amount": {"amount": "100000.00", "currency": "EUR"}})
    assert the_only(await scenario.when(award), "call.action_rejected")["data"]["reason"]["code"] == "not_received"
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-own"))
        assert stored is not None and stored.status == "rejected"
        call = session.get(Call, call_id)
        assert call is not None and call.awarded is None


async def test_a_rejection_repeats_only_what_the_application_named(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id, opens_in=timedelta(days=1)))
    bare = envelope("call.application_submitted", COOPERATIVE, {"call_id": call_id, "application_id": "app-1"})
    rejection = the_only(await scenario.when(bare), "call.application_rejected")
    assert set(rejection["data"]) == {"call_id", "application_id", "applicant", "reason"}
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and (stored.project_id, stored.partners, stored.requested_amount) == (None, [], None)


async def test_an_amount_requested_in_another_currency_than_the_budgets_is_rejected(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))  # a budget in EUR
    rejection = the_only(await scenario.when(application(call_id, "app-1", currency="TRY")), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "currency_mismatch"
    assert "EUR" in rejection["data"]["reason"]["message"]["en"]
    received = the_only(await scenario.when(application(call_id, "app-2")), "call.application_received")
    assert received["data"]["application_id"] == "app-2"


async def test_an_amount_with_more_decimals_than_its_currency_has_is_refused(scenario: Scenario, call_id: str) -> None:
    """A request or an award of a fraction of a cent is no sum of money (and most often a typo):
    rejected, or refused, saying how many decimals the currency has."""
    await scenario.given(published(call_id))  # a budget in EUR
    rejection = the_only(await scenario.when(application(call_id, "app-1", amount="240000.005")), "call.application_rejected")
    assert rejection["data"]["reason"] == {"code": "too_many_decimals", "message": {
        "en": "240000.005 EUR has 3 decimals, and EUR has 2 (ISO 4217): request an amount of at most 2 decimals."}}
    the_only(await scenario.when(application(call_id, "app-2", amount="240000.50")), "call.application_received")
    refusal = refused(await scenario.when(decided(call_id, "app-2", amount={"amount": "200000.125", "currency": "EUR"})),
                      "too_many_decimals")
    assert refusal["data"]["application_id"] == "app-2"
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-2"))
        call = session.get(Call, call_id)
        assert stored is not None and stored.status == "received" and call is not None and call.awarded is None


async def test_a_budget_with_more_decimals_than_its_currency_has_is_refused(scenario: Scenario, call_id: str) -> None:
    """The budget the requests and awards are weighed against is a sum of money too: a call
    published or amended with a fraction of a yen or of a cent is refused, saying why."""
    precise = published(call_id)
    precise["data"]["budget"] = {"amount": "1500000.5", "currency": "JPY"}
    refusal = refused(await scenario.when(precise), "too_many_decimals")
    assert refusal["data"]["reason"]["message"]["en"] == ("1500000.5 JPY has decimals, and JPY has none (ISO 4217): "
                                                          "give the budget as a whole amount.")
    with scenario.session() as session:
        assert session.get(Call, call_id) is None
    await scenario.given(published(call_id))
    refusal = refused(await scenario.when(amended(call_id, {"budget": {"amount": "2000000.125", "currency": "EUR"}})), "too_many_decimals")
    assert refusal["data"]["reason"]["message"]["en"].endswith("EUR has 2 (ISO 4217): give the budget as an amount of at most 2 decimals.")
    assert await scenario.when(amended(call_id, {"budget": {"amount": "2000000.10", "currency": "EUR"}})) == []


async def test_a_request_above_the_calls_whole_budget_is_rejected(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))  # a budget of 1,500,000 EUR
    rejection = the_only(await scenario.when(application(call_id, "app-1", amount="15000000.00")), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "over_budget"
    assert "whole budget is 1,500,000.00 EUR" in rejection["data"]["reason"]["message"]["en"]
    the_only(await scenario.when(application(call_id, "app-2", amount="1500000.00")), "call.application_received")


async def test_a_call_without_a_budget_takes_requests_in_the_currency_of_those_standing(scenario: Scenario, call_id: str) -> None:
    """Its publisher weighs the requests against each other: the first standing names their
    currency, until it is withdrawn; a budget given later is in it."""
    await scenario.given(published(call_id), amended(call_id, {"budget": None}))
    the_only(await scenario.when(application(call_id, "app-1", currency="TRY")), "call.application_received")
    dollars = the_only(await scenario.when(application(call_id, "app-2", currency="USD")), "call.application_rejected")
    assert dollars["data"]["reason"]["code"] == "currency_mismatch"
    assert "ask in TRY: request the amount in TRY too, not USD" in dollars["data"]["reason"]["message"]["en"]
    refused(await scenario.when(amended(call_id, {"budget": {"amount": "1000000.00", "currency": "USD"}})), "currency_mismatch")
    await scenario.given(withdrawn(call_id, "app-1"))
    the_only(await scenario.when(application(call_id, "app-3", currency="USD")), "call.application_received")
    assert await scenario.when(amended(call_id, {"budget": {"amount": "1000000.00", "currency": "USD"}})) == []


async def test_an_application_to_a_call_closed_by_its_owner_is_rejected(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), closed(call_id, "filled"))
    rejection = the_only(await scenario.when(application(call_id, "app-1")), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "call_closed"


async def test_eligibility_follows_the_membership_read_model(scenario: Scenario, call_id: str) -> None:
    moved = envelope("institution.updated", "operator", {"id": COOPERATIVE, "country": "SE"})
    await scenario.given(published(call_id), moved)
    rejection = the_only(await scenario.when(application(call_id, "app-1")), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "ineligible_country"


async def test_an_application_to_an_unknown_call_is_rejected_in_the_applicants_name(scenario: Scenario, call_id: str) -> None:
    rejection = the_only(await scenario.when(application(call_id, "app-1")), "call.application_rejected")
    assert rejection["source"] == f"/institutions/{COOPERATIVE}"
    assert rejection["data"]["reason"]["code"] == "unknown_call"
    with scenario.session() as session:
        assert session.exec(select(CallApplication).where(col(CallApplication.call_id) == call_id)).all() == []


async def test_a_second_application_with_the_same_id_is_a_duplicate(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    second = application(call_id, "app-1", by=SWEDISH_COOPERATIVE)
    rejection = the_only(await scenario.when(second), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "duplicate_application"
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "received" and stored.applicant == COOPERATIVE


async def test_a_rejected_application_may_be_submitted_again_under_its_id(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id, opens_in=timedelta(days=1)), application(call_id, "app-1"))
    await scenario.given(amended(call_id, {"opens_at": (now() - timedelta(hours=1)).isoformat()}))
    the_only(await scenario.when(application(call_id, "app-1")), "call.application_received")
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "received" and stored.reason is None


# --- decisions and withdrawals ------------------------------------------------------------------


async def test_a_rejected_applications_id_stays_its_applicants(scenario: Scenario, call_id: str) -> None:
    """A rejected application may be sent again under its id by its applicant, not by another:
    that one would take the rejection's record over, and its parties would be shown the first
    applicant's request (and the other way round)."""
    from handlers.calls import audience

    first = application(call_id, "app-1", currency="SEK")
    await scenario.given(published(call_id), first)
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "rejected" and stored.applicant == COOPERATIVE
    other = application(call_id, "app-1", by=SWEDISH_COOPERATIVE)
    taken = the_only(await scenario.when(other), "call.application_rejected")
    assert taken["data"]["reason"]["code"] == "duplicate_application"
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "rejected" and stored.applicant == COOPERATIVE  # its record kept
        # Each sees its own: neither the other applicant nor its partners see the other's request.
        assert SWEDISH_COOPERATIVE not in (audience(session, first) or ())
        # (PARTNER: both name it, as this module's applications do.)
        assert COOPERATIVE not in (audience(session, other) or ()) and COOPERATIVE not in (audience(session, taken) or ())
    again = application(call_id, "app-1")  # its applicant, mended
    assert the_only(await scenario.when(again), "call.application_received")["data"]["applicant"] == COOPERATIVE


async def test_the_publisher_awards_a_received_application_with_the_amount_granted(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    before = now()
    decision = decided(call_id, "app-1", amount={"amount": "200000.00", "currency": "EUR"})
    assert await scenario.when(decision) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "awarded"
        assert stored.decided_at is not None and before <= stored.decided_at <= now()  # when the log took the decision
        decided_at = stored.decided_at
        assert stored.awarded_amount == {"amount": "200000.00", "currency": "EUR"}
        assert stored.comment == {"en": "Thank you", "tr": "Teşekkürler"}
        assert stored.requested_amount == {"amount": "240000.00", "currency": "EUR"}  # the request stays as it was
    # Decided once: neither a second decision nor a withdrawal changes it.
    again = the_only(await scenario.when(decided(call_id, "app-1", "declined")), "call.action_rejected")
    assert again["data"]["reason"]["code"] == "already_decided" and "awarded" in again["data"]["reason"]["message"]["en"]
    late = the_only(await scenario.when(withdrawn(call_id, "app-1")), "call.action_rejected")
    assert late["data"]["reason"]["code"] == "already_decided" and late["data"]["actor"] == COOPERATIVE
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "awarded" and stored.decided_at == decided_at
    # Its id stays taken.
    duplicate = the_only(await scenario.when(application(call_id, "app-1")), "call.application_rejected")
    assert duplicate["data"]["reason"]["code"] == "duplicate_application"


async def test_awards_beyond_the_calls_budget_are_refused_until_the_budget_is_raised(scenario: Scenario, call_id: str) -> None:
    """The call's budget is 1.5 million: a first award of 1.2 million leaves 300,000; a second of
    400,000 is refused (`over_budget`, saying what is left) and changes nothing; the budget is
    not lowered below what was awarded; raised, the second award is taken."""
    await scenario.given(published(call_id), application(call_id, "app-1", amount="1200000.00"),
                         application(call_id, "app-2", amount="400000.00"))
    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "1200000.00", "currency": "EUR"})) == []
    over = the_only(await scenario.when(decided(call_id, "app-2", amount={"amount": "400000", "currency": "EUR"})), "call.action_rejected")
    assert over["data"]["reason"]["code"] == "over_budget"
    assert "1,200,000.00 EUR is awarded already: award at most 300,000.00 EUR" in over["data"]["reason"]["message"]["en"]
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-2"))
        assert stored is not None and stored.status == "received" and stored.awarded_amount is None
    lowered = the_only(await scenario.when(amended(call_id, {"budget": {"amount": "1000000", "currency": "EUR"}})), "call.action_rejected")
    assert lowered["data"]["reason"]["code"] == "over_budget"
    assert await scenario.when(amended(call_id, {"budget": {"amount": "1600000", "currency": "EUR"}})) == []
    assert await scenario.when(decided(call_id, "app-2", amount={"amount": "400000", "currency": "EUR"})) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-2"))
        assert stored is not None and stored.status == "awarded"


async def test_the_publisher_declines_an_application_without_an_amount(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    assert await scenario.when(decided(call_id, "app-1", "declined")) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "declined" and stored.awarded_amount is None
        assert stored.decided_at is not None and stored.comment == {"en": "Thank you", "tr": "Teşekkürler"}


@pytest.mark.parametrize(
    ("setup", "decision", "code"),
    [
        ("received", {"by": OTHER_FUNDER}, "not_owner"),
        ("received", {"application_id": "app-none"}, "unknown_application"),
        ("rejected", {}, "not_received"),
        ("received", {"amount": {"amount": "1000.00", "currency": "SEK"}}, "currency_mismatch"),
        ("no call", {}, "unknown_call"),
    ],
)
async def test_decisions_the_workflow_cannot_take_are_refused_and_change_nothing(
    scenario: Scenario, call_id: str, setup: str, decision: dict[str, Any], code: str
) -> None:
    if setup != "no call":
        await scenario.given(published(call_id), application(call_id, "app-1", by=COOPERATIVE if setup == "received" else UNIVERSITY))
    options = dict(decision)
    event = decided(call_id, options.pop("application_id", "app-1"), **options)
    refusal = the_only(await scenario.when(event), "call.action_rejected")
    assert refusal["causationid"] == event["id"] and refusal["data"]["rejected_type"] == "call.application_decided"
    assert refusal["data"]["application_id"] == event["data"]["application_id"]
    assert refusal["data"]["reason"]["code"] == code and refusal["data"]["actor"] == event["source"].removeprefix("/institutions/")
    assert refusal["source"] == (f"/institutions/{OWNER}" if setup != "no call" else event["source"])
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is None if setup == "no call" else (stored is not None and stored.decided_at is None)
        assert stored is None or stored.status == setup


async def test_the_applicant_withdraws_an_application_before_the_decision(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    assert await scenario.when(withdrawn(call_id, "app-1")) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "withdrawn" and stored.decided_at is not None
        assert stored.withdrawal_reason == {"en": "No co-funding this year"} == stored.comment  # (comment: as before)
    refused = the_only(await scenario.when(decided(call_id, "app-1")), "call.action_rejected")
    assert refused["data"]["reason"]["code"] == "already_withdrawn"
    again = the_only(await scenario.when(withdrawn(call_id, "app-1")), "call.action_rejected")
    assert again["data"]["reason"]["code"] == "already_withdrawn"
    resubmitted = the_only(await scenario.when(application(call_id, "app-1")), "call.application_rejected")
    assert resubmitted["data"]["reason"]["code"] == "duplicate_application"


@pytest.mark.parametrize(
    ("by", "code"),
    [
        (PARTNER, "not_applicant"),  # a partner the application names
        (OWNER, "not_applicant"),  # the publisher declines instead
        (UNIVERSITY, "unknown_application"),  # to anyone else the application does not exist
    ],
)
async def test_only_the_applicant_withdraws(scenario: Scenario, call_id: str, by: str, code: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    refusal = the_only(await scenario.when(withdrawn(call_id, "app-1", by=by)), "call.action_rejected")
    assert refusal["data"]["reason"]["code"] == code and refusal["data"]["actor"] == by
    assert COOPERATIVE not in refusal["data"]["reason"]["message"]["en"] or code == "not_applicant"
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "received"


# --- amendments and closing by the owner --------------------------------------------------------


async def test_the_owner_amends_the_call(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    new_deadline = now() + timedelta(days=45)
    changes = {
        "deadline": new_deadline.isoformat(),
        "budget": {"amount": "1800000.00", "currency": "EUR"},
        "eligible_countries": ["TR", "FI", "SE"],
        "summary": None,
    }
    assert await scenario.when(amended(call_id, changes)) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None
        assert call.deadline == new_deadline and call.budget == {"amount": "1800000.00", "currency": "EUR"}
        assert call.eligible_countries == ["TR", "FI", "SE"] and call.summary is None
        assert call.title["en"] == "ESF+ Social Inclusion Pilots"  # untouched
    the_only(await scenario.when(application(call_id, "app-se", by=SWEDISH_COOPERATIVE)), "call.application_received")


async def test_an_amendment_from_another_institution_is_refused_and_changes_nothing(
    scenario: Scenario, call_id: str
) -> None:
    await scenario.given(published(call_id))
    with scenario.session() as session:
        before = session.get(Call, call_id)
        assert before is not None
    amendment = amended(call_id, {"deadline": (now() + timedelta(days=90)).isoformat()}, by=OTHER_FUNDER)
    rejection = the_only(await scenario.when(amendment), "call.action_rejected")
    assert rejection["source"] == f"/institutions/{OWNER}" and rejection["causationid"] == amendment["id"]
    assert rejection["data"] == {
        "call_id": call_id,
        "rejected_type": "call.amended",
        "rejected_event_id": amendment["id"],
        "actor": OTHER_FUNDER,
        "reason": rejection["data"]["reason"],
    }
    assert rejection["data"]["reason"]["code"] == "not_owner"
    with scenario.session() as session:
        after = session.get(Call, call_id)
        assert after is not None and after.model_dump() == before.model_dump()


@pytest.mark.parametrize(
    ("given", "changes", "reason"),
    [
        ("open", {"deadline": "opens_before"}, "deadline_in_past"),  # (past, and before the opening: the past named)
        ("open", {"opens_at": "after_deadline"}, "already_open"),  # (later, and after the deadline: the opening named)
        ("upcoming", {"deadline": "opens_before"}, "invalid_window"),
        ("closed", {"budget": None}, "call_closed"),
        ("unknown", {"budget": None}, "unknown_call"),
    ],
)
async def test_amendments_the_call_cannot_take_are_refused(
    scenario: Scenario, call_id: str, given: str, changes: dict[str, Any], reason: str
) -> None:
    if given != "unknown":
        await scenario.given(published(call_id, opens_in=timedelta(days=3) if given == "upcoming" else -timedelta(days=1)))
    if given == "closed":
        await scenario.given(closed(call_id))
    if changes.get("deadline") == "opens_before":  # before the stored opens_at
        changes = {"deadline": (now() + (timedelta(days=2) if given == "upcoming" else -timedelta(days=2))).isoformat()}
    if changes.get("opens_at") == "after_deadline":
        changes = {"opens_at": (now() + timedelta(days=40)).isoformat()}
    rejection = the_only(await scenario.when(amended(call_id, changes)), "call.action_rejected")
    assert rejection["data"]["reason"]["code"] == reason
    assert rejection["source"] == f"/institutions/{OWNER}"  # the owner's call, or the owner's own event
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is None if given == "unknown" else call is not None and call.budget is not None


async def test_the_owner_closes_the_call(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    assert await scenario.when(closed(call_id, "filled")) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.closed_reason == "filled" and call.status(now()) == "closed"
        assert call.closed_at is not None and call.closed_at <= now()
    again = the_only(await scenario.when(closed(call_id, "cancelled")), "call.action_rejected")
    assert again["data"]["reason"]["code"] == "call_closed"


async def test_closing_by_another_institution_or_of_an_unknown_call_is_refused(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    rejection = the_only(await scenario.when(closed(call_id, by=OTHER_FUNDER)), "call.action_rejected")
    assert rejection["data"]["reason"]["code"] == "not_owner" and rejection["source"] == f"/institutions/{OWNER}"
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.closed_at is None
    unknown = the_only(await scenario.when(closed("no-such-call", by=OTHER_FUNDER)), "call.action_rejected")
    assert unknown["data"]["reason"]["code"] == "unknown_call"
    assert unknown["source"] == f"/institutions/{OTHER_FUNDER}"  # in the name of the event's own source


# --- the deadline --------------------------------------------------------------------------------


async def test_the_bus_closes_an_overdue_call_exactly_once(scenario: Scenario, call_id: str) -> None:
    """The deadline passed while the bus was down: the first tick after the restart closes it."""
    overdue = published(call_id, opens_in=-timedelta(days=30), closes_in=-timedelta(days=2))
    future = f"{call_id}-later"
    await scenario.given(overdue, published(future))
    closing = the_only(await scenario.tick(now()), "call.closed")
    assert closing["source"] == f"/institutions/{OWNER}"  # in the name of the call's owner
    assert closing["data"] == {"call_id": call_id, "reason": "deadline_passed"}
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.closed_reason == "deadline_passed"
        assert call.closed_at == datetime.fromisoformat(overdue["data"]["deadline"])  # closed at its deadline
        later = session.get(Call, future)
        assert later is not None and later.closed_at is None
    assert await scenario.tick(now()) == []


async def test_the_bus_closes_a_call_at_its_deadline_not_before(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id, closes_in=timedelta(hours=2)))
    assert await scenario.tick(now() + timedelta(hours=1)) == []
    the_only(await scenario.tick(now() + timedelta(hours=3)), "call.closed")


async def test_an_application_logged_in_time_is_received_though_the_timer_closed_the_call_meanwhile(
    scenario: Scenario, call_id: str
) -> None:
    """The deadline's timer ran before an application logged in time was applied (the bus behind
    the log): it is received, as a replay of the log in order receives it."""
    await scenario.given(published(call_id, closes_in=timedelta(hours=2)))
    the_only(await scenario.tick(now() + timedelta(hours=3)), "call.closed")
    the_only(await scenario.when(application(call_id, "app-in-time")), "call.application_received")


async def test_an_application_after_its_owner_closed_the_call_is_rejected(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id, closes_in=timedelta(hours=2)), closed(call_id, "cancelled"))
    rejection = the_only(await scenario.when(application(call_id, "app-late")), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "call_closed"


async def test_a_call_closed_by_its_owner_is_not_closed_again_by_the_bus(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id, closes_in=timedelta(hours=2)), closed(call_id, "cancelled"))
    assert await scenario.tick(now() + timedelta(days=1)) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.closed_reason == "cancelled"


async def test_a_publisher_that_leaves_the_network_has_its_open_calls_closed(scenario: Scenario, call_id: str) -> None:
    """Nobody is left to decide on what a former member's call receives: its calls still open are
    closed, in its name, as cancelled, and take no application after; one closed already, one
    whose deadline has come (the timer's to close) and other publishers' calls stay as they were
    (the applications received are declined: the next test)."""
    later, ended, others, overdue = f"{call_id}-later", f"{call_id}-ended", f"{call_id}-others", f"{call_id}-overdue"
    await scenario.given(published(call_id), published(later, opens_in=timedelta(days=3)), published(ended), closed(ended, "filled"),
                         published(others, by=OTHER_FUNDER), published(overdue, opens_in=-timedelta(days=9), closes_in=-timedelta(days=1)),
                         application(call_id, "app-before"))
    leaving = envelope("institution.left", "operator", {"id": OWNER})
    derived = await scenario.when(leaving)
    closings = [e for e in derived if e["type"] == "call.closed"]
    assert sorted((e["type"], e["subject"], e["source"], e["data"]["reason"], e["causationid"]) for e in closings) == sorted(
        ("call.closed", call, f"/institutions/{OWNER}", "cancelled", leaving["id"]) for call in (call_id, later))
    assert [(e["type"], e["data"]["application_id"]) for e in derived if e not in closings] == [("call.application_decided", "app-before")]
    with scenario.session() as session:
        reasons = {call: (found.closed_reason if (found := session.get(Call, call)) else "?") for call in (call_id, later, ended, others, overdue)}
    assert reasons == {call_id: "cancelled", later: "cancelled", ended: "filled", others: None, overdue: None}
    rejection = the_only(await scenario.when(application(call_id, "app-after")), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == "call_closed"
    the_only(await scenario.when(application(others, "app-elsewhere")), "call.application_received")


# --- two-stage calls -----------------------------------------------------------------------------


def two_stage(call_id: str, *, full_proposals_in: timedelta | None = timedelta(days=60),
              closes_in: timedelta = timedelta(days=30)) -> dict[str, Any]:
    """The ESF+ call with a second stage: full proposals by ``full_proposals_in`` from now (None: no limit)."""
    event = published(call_id, closes_in=closes_in)
    event["data"]["deadline_model"] = "two_stage"
    if full_proposals_in is not None:
        event["data"]["full_proposal_deadline"] = (now() + full_proposals_in).isoformat()
    return event


def full_proposal(call_id: str, application_id: str, *, by: str = COOPERATIVE, currency: str = "EUR") -> dict[str, Any]:
    return envelope("call.full_proposal_submitted", by, {
        "call_id": call_id, "application_id": application_id,
        "summary": {"en": "Procurement from women's cooperatives in three districts", "tr": "Üç ilçede kadın kooperatiflerinden alım"},
        "requested_amount": {"amount": "235000.00", "currency": currency},
        "url": "https://genc-isi.example.org/esf-2026/full-proposal.pdf",
    })


async def first_stage_over(scenario: Scenario, call_id: str, *, until: datetime | None = None, **changes: Any) -> None:
    """End a call's first stage: its deadline amended to a moment ahead (a deadline is not moved
    into the past), with ``changes``, and that moment (or ``until``) let pass."""
    deadline = now() + timedelta(seconds=1)
    await scenario.given(amended(call_id, {"deadline": deadline.isoformat(), **changes}))
    await asyncio.sleep(max(0.0, ((until or deadline) - now()).total_seconds()) + 0.05)


def refused(emitted: list[dict[str, Any]], code: str) -> dict[str, Any]:
    refusal = the_only(emitted, "call.action_rejected")
    assert refusal["data"]["reason"]["code"] == code, refusal["data"]["reason"]
    return refusal


async def test_a_two_stage_call_invites_takes_full_proposals_and_awards_only_those_that_sent_one(
    scenario: Scenario, call_id: str
) -> None:
    await scenario.given(two_stage(call_id), application(call_id, "app-1"), application(call_id, "app-2", by=PARTNER))
    refused(await scenario.when(decided(call_id, "app-1", amount={"amount": "200000.00", "currency": "EUR"})), "no_full_proposal")
    early = refused(await scenario.when(full_proposal(call_id, "app-1")), "not_invited")
    assert early["data"]["application_id"] == "app-1" and early["data"]["rejected_type"] == "call.full_proposal_submitted"
    assert "not invited it to the second stage" in early["data"]["reason"]["message"]["en"]

    before = now()
    assert await scenario.when(decided(call_id, "app-1", "invited")) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "invited" and stored.decided_at is None
        assert stored.invited_at is not None and before <= stored.invited_at <= now()
        assert stored.invitation_comment == {"en": "Thank you", "tr": "Teşekkürler"}
    refused(await scenario.when(decided(call_id, "app-1", "invited")), "already_decided")

    refused(await scenario.when(full_proposal(call_id, "app-1", by=PARTNER)), "not_applicant")  # a partner sees it
    refused(await scenario.when(full_proposal(call_id, "app-1", by=OTHER_FUNDER)), "unknown_application")
    refused(await scenario.when(full_proposal(call_id, "app-1", currency="TRY")), "currency_mismatch")
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "invited" and stored.full_proposal is None

    assert await scenario.when(full_proposal(call_id, "app-1")) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "proposal_sent" and stored.full_proposal_at is not None
        assert stored.full_proposal == {
            "summary": {"en": "Procurement from women's cooperatives in three districts", "tr": "Üç ilçede kadın kooperatiflerinden alım"},
            "requested_amount": {"amount": "235000.00", "currency": "EUR"},
            "url": "https://genc-isi.example.org/esf-2026/full-proposal.pdf",
        }
        assert stored.requested_amount == {"amount": "240000.00", "currency": "EUR"}  # the first stage's request, as it was
    refused(await scenario.when(full_proposal(call_id, "app-1")), "already_submitted")

    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "200000.00", "currency": "EUR"})) == []
    assert await scenario.when(decided(call_id, "app-2", "declined")) == []  # declined at the first stage
    refused(await scenario.when(full_proposal(call_id, "app-2", by=PARTNER)), "already_decided")
    with scenario.session() as session:
        first = session.get(CallApplication, (call_id, "app-1"))
        second = session.get(CallApplication, (call_id, "app-2"))
        assert first is not None and first.status == "awarded" and first.decided_at is not None
        assert first.awarded_amount == {"amount": "200000.00", "currency": "EUR"} and first.full_proposal is not None
        assert second is not None and second.status == "declined" and second.invited_at is None


async def test_a_single_stage_call_neither_invites_nor_takes_full_proposals(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    refused(await scenario.when(decided(call_id, "app-1", "invited")), "single_stage")
    single = refused(await scenario.when(full_proposal(call_id, "app-1")), "not_invited")
    assert "single stage" in single["data"]["reason"]["message"]["en"]
    later = (now() + timedelta(days=90)).isoformat()
    refused(await scenario.when(amended(call_id, {"full_proposal_deadline": later})), "single_stage")
    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "200000.00", "currency": "EUR"})) == []  # awarded at once


async def test_full_proposals_come_by_their_deadline_which_may_move_after_the_first_stage(scenario: Scenario, call_id: str) -> None:
    await scenario.given(two_stage(call_id), application(call_id, "app-1"), decided(call_id, "app-1", "invited"))
    # The first stage ends; the second stage's deadline may still move, only after the first's.
    await first_stage_over(scenario, call_id)
    refused(await scenario.when(amended(call_id, {"deadline": (now() + timedelta(days=1)).isoformat()})), "call_closed")
    refused(await scenario.when(amended(call_id, {"full_proposal_deadline": (now() - timedelta(hours=3)).isoformat()})), "invalid_window")
    assert await scenario.when(amended(call_id, {"full_proposal_deadline": (now() + timedelta(days=7)).isoformat()})) == []
    assert await scenario.when(full_proposal(call_id, "app-1")) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert call is not None and call.full_proposal_deadline is not None and call.full_proposal_deadline > now()
        assert stored is not None and stored.status == "proposal_sent"


async def test_an_invited_application_without_a_full_proposal_lapses_once_their_deadline_has_passed(
    scenario: Scenario, call_id: str
) -> None:
    await scenario.given(two_stage(call_id), application(call_id, "app-1"), application(call_id, "app-2", by=PARTNER),
                         application(call_id, "app-3"), decided(call_id, "app-1", "invited"), decided(call_id, "app-2", "invited"))
    assert await scenario.when(full_proposal(call_id, "app-1")) == []
    # Both deadlines are brought near and pass: app-2 sent nothing in time, app-3 was never invited.
    due = now() + timedelta(seconds=1.5)
    await first_stage_over(scenario, call_id, until=due, full_proposal_deadline=due.isoformat())
    late = refused(await scenario.when(full_proposal(call_id, "app-2", by=PARTNER)), "after_full_proposal_deadline")
    assert "deadline for full proposals was" in late["data"]["reason"]["message"]["en"]
    moved = refused(await scenario.when(amended(call_id, {"full_proposal_deadline": (now() + timedelta(days=7)).isoformat()})),
                    "after_full_proposal_deadline")
    assert "the second stage is over" in moved["data"]["reason"]["message"]["en"]
    refused(await scenario.when(decided(call_id, "app-3", "invited")), "after_full_proposal_deadline")  # too late to invite

    ticked = await scenario.tick(now())
    assert sorted(e["type"] for e in ticked) == ["call.application_lapsed", "call.closed"]  # the first stage's end too
    lapsed = the_only([e for e in ticked if e["type"] != "call.closed"], "call.application_lapsed")
    assert lapsed["source"] == f"/institutions/{OWNER}"  # in the publisher's name, like the call's closing
    assert lapsed["data"] == {"call_id": call_id, "application_id": "app-2", "applicant": PARTNER}
    assert await scenario.tick(now()) == []  # once
    with scenario.session() as session:
        statuses = {a.application_id: a for a in session.exec(select(CallApplication).where(CallApplication.call_id == call_id))}
        assert {k: a.status for k, a in statuses.items()} == {"app-1": "proposal_sent", "app-2": "lapsed", "app-3": "received"}
        assert statuses["app-2"].decided_at == due  # at the deadline, not when the timer said so

    # Nothing more can be done with it.
    for tried in (decided(call_id, "app-2", "declined"), withdrawn(call_id, "app-2", by=PARTNER),
                  full_proposal(call_id, "app-2", by=PARTNER)):
        assert "lapsed: it sent no full proposal" in refused(await scenario.when(tried), "lapsed")["data"]["reason"]["message"]["en"]
    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "200000.00", "currency": "EUR"})) == []


async def test_no_application_lapses_before_the_deadline_for_full_proposals_or_without_one(scenario: Scenario, call_id: str) -> None:
    unlimited = f"{call_id}-unlimited"
    soon = timedelta(minutes=30)
    await scenario.given(two_stage(call_id, full_proposals_in=timedelta(hours=2), closes_in=soon), application(call_id, "app-1"),
                         decided(call_id, "app-1", "invited"), two_stage(unlimited, full_proposals_in=None, closes_in=soon),
                         application(unlimited, "app-1"), decided(unlimited, "app-1", "invited"))
    closings = await scenario.tick(now() + timedelta(hours=1))  # the first stages end; nothing lapses yet
    assert [e["type"] for e in closings] == ["call.closed", "call.closed"]
    lapsed = the_only(await scenario.tick(now() + timedelta(hours=3)), "call.application_lapsed")
    assert lapsed["data"]["call_id"] == call_id  # the call without a deadline for full proposals has none to pass


async def test_a_call_its_publisher_cancelled_takes_no_full_proposals(scenario: Scenario, call_id: str) -> None:
    await scenario.given(two_stage(call_id, full_proposals_in=None), application(call_id, "app-1"),
                         decided(call_id, "app-1", "invited"), closed(call_id, "cancelled"))
    refused(await scenario.when(full_proposal(call_id, "app-1")), "call_closed")
    refused(await scenario.when(amended(call_id, {"full_proposal_deadline": (now() + timedelta(days=90)).isoformat()})), "call_closed")


async def test_a_two_stage_call_may_be_cancelled_in_its_second_stage(scenario: Scenario, call_id: str) -> None:
    await scenario.given(two_stage(call_id), application(call_id, "app-1"), decided(call_id, "app-1", "invited"))
    await first_stage_over(scenario, call_id)
    assert await scenario.when(closed(call_id, "cancelled")) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.closed_reason == "cancelled" and call.closed_at == call.deadline
    refused(await scenario.when(full_proposal(call_id, "app-1")), "call_closed")
    refused(await scenario.when(closed(call_id, "filled")), "call_closed")  # once
    # Its invitation does not lapse when the deadline for full proposals passes: the call took
    # the second stage away, the applicant did not miss it.
    assert await scenario.tick(now() + timedelta(days=61)) == []
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "invited"
    assert await scenario.when(decided(call_id, "app-1", "declined")) == []  # its publisher still answers it


async def test_no_invitation_lapses_in_a_call_closed_early_and_in_one_closed_at_its_deadline_they_do(
    scenario: Scenario, call_id: str
) -> None:
    filled, early, on_time = f"{call_id}-filled", f"{call_id}-early", f"{call_id}-on-time"
    soon = timedelta(minutes=30)
    for each in (filled, early, on_time):
        await scenario.given(two_stage(each, full_proposals_in=timedelta(hours=2), closes_in=soon), application(each, "app-1"),
                             decided(each, "app-1", "invited"))
    # One filled by its publisher before its deadline; one its publisher tries to close before
    # its deadline saying "deadline_passed" (refused: it would close early under a reason saying
    # it did not), which the bus closes at its deadline as the third.
    await scenario.given(closed(filled, "filled"))
    refused(await scenario.when(closed(early, "deadline_passed")), "before_deadline")
    closings = await scenario.tick(now() + timedelta(hours=1))
    assert [e["data"]["call_id"] for e in closings] == [early, on_time]
    lapses = await scenario.tick(now() + timedelta(hours=3))
    assert sorted(e["data"]["call_id"] for e in lapses) == sorted([early, on_time])
    with scenario.session() as session:
        statuses = {c: session.get(CallApplication, (c, "app-1")) for c in (filled, early, on_time)}
        assert {c: a.status for c, a in statuses.items() if a is not None} == {filled: "invited", early: "lapsed", on_time: "lapsed"}


# --- what an award, an amendment and an application must hold to -------------------------------------


async def test_an_award_above_what_the_application_asks_for_is_refused(scenario: Scenario, call_id: str) -> None:
    """A zero too many: 2.4 million awarded on a request of 240,000 was taken while the budget
    covered it, and the rest of the budget was gone; an award of nothing was shown to the
    applicant as an award."""
    await scenario.given(published(call_id), amended(call_id, {"budget": {"amount": "5000000.00", "currency": "EUR"}}),
                         application(call_id, "app-1"))
    typo = refused(await scenario.when(decided(call_id, "app-1", amount={"amount": "2400000.00", "currency": "EUR"})), "above_request")
    assert typo["data"]["reason"]["message"]["en"] == ("Application app-1 asks for 240,000.00 EUR: award at most that, "
                                                       "not 2,400,000.00 EUR.")
    assert typo["data"]["application_id"] == "app-1"
    with scenario.session() as session:
        stored, call = session.get(CallApplication, (call_id, "app-1")), session.get(Call, call_id)
        assert stored is not None and stored.status == "received" and call is not None and call.awarded is None
    nothing = refused(await scenario.when(decided(call_id, "app-1", amount={"amount": "0.00", "currency": "EUR"})), "no_amount")
    assert "grants nothing" in nothing["data"]["reason"]["message"]["en"]
    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "240000.00", "currency": "EUR"})) == []


async def test_a_budget_with_awards_is_not_removed_and_awards_without_one_stay_in_one_currency(scenario: Scenario, call_id: str) -> None:
    """Removing the budget after an award would switch the money checks off: the next award, in
    any currency, would be added to the first into one sum. It is refused; and a call without a
    budget awards in the currency of its first award."""
    await scenario.given(published(call_id), amended(call_id, {"budget": {"amount": "120000.00", "currency": "USD"}}),
                         application(call_id, "app-1", currency="USD", amount="100000.00"),
                         application(call_id, "app-2", currency="USD", amount="100000.00"))  # (within the whole budget)
    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "40000", "currency": "USD"})) == []
    removed = refused(await scenario.when(amended(call_id, {"budget": None})), "already_awarded")
    assert "40,000 USD" in removed["data"]["reason"]["message"]["en"]
    euros = refused(await scenario.when(amended(call_id, {"budget": {"amount": "120000.00", "currency": "EUR"}})), "currency_mismatch")
    assert "stays in USD" in euros["data"]["reason"]["message"]["en"]
    refused(await scenario.when(decided(call_id, "app-2", amount={"amount": "99999999", "currency": "EUR"})), "currency_mismatch")
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.budget == {"amount": "120000.00", "currency": "USD"} and call.awarded == "40000"

    unbudgeted = f"{call_id}-no-budget"
    await scenario.given(published(unbudgeted), amended(unbudgeted, {"budget": None}),
                         application(unbudgeted, "app-1"), application(unbudgeted, "app-2"))
    assert await scenario.when(decided(unbudgeted, "app-1", amount={"amount": "40000", "currency": "USD"})) == []
    other = refused(await scenario.when(decided(unbudgeted, "app-2", amount={"amount": "99999999", "currency": "EUR"})), "currency_mismatch")
    assert "in USD too, not EUR" in other["data"]["reason"]["message"]["en"]
    assert await scenario.when(decided(unbudgeted, "app-2", amount={"amount": "10000", "currency": "USD"})) == []
    with scenario.session() as session:
        call = session.get(Call, unbudgeted)
        assert call is not None and call.awarded == "50000"


async def test_a_budget_keeps_its_currency_once_applied_to_and_its_awards_name_an_amount(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id), application(call_id, "app-1"))
    refused(await scenario.when(amended(call_id, {"budget": {"amount": "1500000.00", "currency": "USD"}})), "currency_mismatch")
    refused(await scenario.when(decided(call_id, "app-1")), "no_amount")  # an award of a call with a budget: how much?
    assert await scenario.when(decided(call_id, "app-1", amount={"amount": "240000.00", "currency": "EUR"})) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.budget == {"amount": "1500000.00", "currency": "EUR"} and call.awarded == "240000.00"


async def test_a_budget_moves_into_another_currency_once_the_applications_asking_in_its_own_are_withdrawn(
    scenario: Scenario, call_id: str
) -> None:
    """An application withdrawn (or declined) is weighed against the budget no more: it does not
    keep the budget in its currency, as those still standing do."""
    await scenario.given(published(call_id), application(call_id, "app-1"), application(call_id, "app-2"))
    await scenario.given(withdrawn(call_id, "app-1"))
    refused(await scenario.when(amended(call_id, {"budget": {"amount": "1500000.00", "currency": "USD"}})), "currency_mismatch")
    await scenario.given(decided(call_id, "app-2", "declined"))
    assert await scenario.when(amended(call_id, {"budget": {"amount": "1500000.00", "currency": "USD"}})) == []
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.budget == {"amount": "1500000.00", "currency": "USD"}


async def test_a_call_is_closed_as_past_its_deadline_only_once_it_has_passed(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    early = refused(await scenario.when(closed(call_id, "deadline_passed")), "before_deadline")
    assert "cancelled or filled" in early["data"]["reason"]["message"]["en"]
    with scenario.session() as session:
        call = session.get(Call, call_id)
        assert call is not None and call.closed_at is None
    the_only(await scenario.when(application(call_id, "app-1")), "call.application_received")


@pytest.mark.parametrize(
    ("data", "code", "said"),
    [
        ({"partners": ["tr-mersin-b"]}, "unknown_partner", "did you mean 'tr-mersin-bb'?"),
        ({"partners": [COOPERATIVE]}, "invalid_partner", "is the applicant"),
        ({"partners": [PARTNER, PARTNER]}, "invalid_partner", "named twice"),
        ({"partners": ["operator"]}, "invalid_partner", "runs the network"),
        ({"project_id": "genc-isi-belediye-isbirligii"}, "unknown_project", f"did you mean {PROJECT!r}?"),
        ({"project_id": "esf-project"}, "not_project_party", "Only eu-esf-fund"),
    ],
)
async def test_an_application_names_member_partners_and_a_project_of_its_applicants(
    scenario: Scenario, call_id: str, data: dict[str, Any], code: str, said: str
) -> None:
    """A partner sees the application: a typo in its id would hide it from the partner meant, and
    show it to an institution admitted later under that id. The project is one the applicant owns
    or takes part in."""
    others = envelope("project.registered", OWNER, {"project_id": "esf-project", "title": {"en": "ESF"}, "owner": OWNER, "status": "active"})
    await scenario.given(published(call_id), others)
    submission = application(call_id, "app-1")
    submission["data"].update(data)
    rejection = the_only(await scenario.when(submission), "call.application_rejected")
    assert rejection["data"]["reason"]["code"] == code and said in rejection["data"]["reason"]["message"]["en"], rejection["data"]["reason"]
    with scenario.session() as session:
        stored = session.get(CallApplication, (call_id, "app-1"))
        assert stored is not None and stored.status == "rejected"


async def test_an_unknown_call_is_named_with_the_call_most_likely_meant(scenario: Scenario, call_id: str) -> None:
    await scenario.given(published(call_id))
    rejection = the_only(await scenario.when(application(call_id[:-1], "app-1")), "call.application_rejected")
    assert rejection["data"]["reason"]["message"]["en"] == f"There is no call {call_id[:-1]!r}; did you mean {call_id!r}?"
    refusal = refused(await scenario.when(closed(call_id + "x")), "unknown_call")
    assert f"did you mean {call_id!r}?" in refusal["data"]["reason"]["message"]["en"]


# --- an applicant leaving ------------------------------------------------------------------------


def statuses(session: Session, *keys: tuple[str, str]) -> dict[tuple[str, str], str | None]:
    return {key: (found.status if (found := session.get(CallApplication, key)) else None) for key in keys}


async def test_an_applicant_that_leaves_the_network_has_its_applications_waiting_for_a_decision_withdrawn(
    scenario: Scenario, call_id: str
) -> None:
    """A former member can no longer be told of a decision nor act on one: each application it
    made that waits for one — received, invited to the second stage, its full proposal sent — is
    withdrawn in its name, saying why; one decided stands, and so do other applicants'."""
    staged, proposed, done = f"{call_id}-staged", f"{call_id}-proposed", f"{call_id}-done"
    await scenario.given(
        published(call_id), application(call_id, "app-received"), application(call_id, "app-other", by=PARTNER),
        two_stage(staged), application(staged, "app-invited"), decided(staged, "app-invited", "invited"),
        two_stage(proposed), application(proposed, "app-proposed"), decided(proposed, "app-proposed", "invited"),
        full_proposal(proposed, "app-proposed"),
        published(done), application(done, "app-awarded"), decided(done, "app-awarded", amount={"amount": "200000.00", "currency": "EUR"}),
    )
    leaving = envelope("institution.left", "operator", {"id": COOPERATIVE})
    withdrawals = await scenario.when(leaving)
    assert sorted((e["type"], e["data"]["call_id"], e["data"]["application_id"], e["source"], e["causationid"]) for e in withdrawals) == sorted(
        ("call.application_withdrawn", call, app, f"/institutions/{COOPERATIVE}", leaving["id"])
        for call, app in ((call_id, "app-received"), (staged, "app-invited"), (proposed, "app-proposed")))
    assert all(f"{COOPERATIVE} left the network on " in e["data"]["reason"]["en"] for e in withdrawals), withdrawals
    with scenario.session() as session:
        assert statuses(session, (call_id, "app-received"), (staged, "app-invited"), (proposed, "app-proposed"), (done, "app-awarded"),
                        (call_id, "app-other")) == {
            (call_id, "app-received"): "withdrawn", (staged, "app-invited"): "withdrawn", (proposed, "app-proposed"): "withdrawn",
            (done, "app-awarded"): "awarded", (call_id, "app-other"): "received"}
    assert await scenario.when(envelope("institution.left", "operator", {"id": UNIVERSITY})) == []  # (it applied to nothing)


async def test_a_publisher_that_leaves_the_network_has_the_applications_waiting_for_its_decision_declined(
    scenario: Scenario, call_id: str
) -> None:
    """Nobody is left to decide on them, and their applicants are still members: each application
    waiting for the leaving publisher's decision — received, invited to the second stage, its full
    proposal sent; its call open, closed early or past its deadline — is declined in its name, the
    comment saying why. One decided stands; other publishers' applications are untouched."""
    filled, proposed, past, others = f"{call_id}-filled", f"{call_id}-proposed", f"{call_id}-past", f"{call_id}-others"
    await scenario.given(
        published(call_id), application(call_id, "app-received"), application(call_id, "app-awarded", by=PARTNER),
        decided(call_id, "app-awarded", amount={"amount": "200000.00", "currency": "EUR"}),
        two_stage(filled), application(filled, "app-invited"), decided(filled, "app-invited", "invited"), closed(filled, "filled"),
        two_stage(proposed), application(proposed, "app-proposed"), decided(proposed, "app-proposed", "invited"),
        full_proposal(proposed, "app-proposed"),
        published(others, by=OTHER_FUNDER), application(others, "app-elsewhere"),
    )
    leaving = envelope("institution.left", "operator", {"id": OWNER})
    derived = await scenario.when(leaving)
    declines = [e for e in derived if e["type"] == "call.application_decided"]
    assert sorted((e["data"]["call_id"], e["data"]["application_id"], e["data"]["decision"], e["source"], e["causationid"])
                  for e in declines) == sorted(
        (call, app, "declined", f"/institutions/{OWNER}", leaving["id"])
        for call, app in ((call_id, "app-received"), (filled, "app-invited"), (proposed, "app-proposed")))
    assert all(e["data"]["comment"]["en"].startswith(f"{OWNER}, who published the call, left the network on ")
               for e in declines), declines
    assert {e["type"] for e in derived} == {"call.closed", "call.application_decided"}
    with scenario.session() as session:
        assert statuses(session, (call_id, "app-received"), (filled, "app-invited"), (proposed, "app-proposed"),
                        (call_id, "app-awarded"), (others, "app-elsewhere")) == {
            (call_id, "app-received"): "declined", (filled, "app-invited"): "declined", (proposed, "app-proposed"): "declined",
            (call_id, "app-awarded"): "awarded", (others, "app-elsewhere"): "received"}
        # Told: each decline reaches its applicant and the partner it named, as the publisher's own would.
        assert all({COOPERATIVE, PARTNER} <= (audience(session, e) or set()) for e in declines), declines
    assert await scenario.when(envelope("institution.left", "operator", {"id": UNIVERSITY})) == []  # (it published nothing)


@contextmanager
def database_of_its_own(database_url: str, tmp_path: Path, pg_server_url: str | None) -> Iterator[Engine]:
    """A migrated database of ``database_url``'s kind for a log of its own (from #1: the calls'
    module joins its members through a bus), disposed of after."""
    kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    (tmp_path / "older").mkdir()
    with contextmanager(fresh_database)(kind, tmp_path / "older", pg_server_url) as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def test_a_leaving_applied_by_version_7_of_the_rules_left_the_applications_waiting_for_the_publisher(
    call_id: str, database_url: str, tmp_path: Path, pg_server_url: str | None
) -> None:
    """Rules before version 8 left the applications waiting for a former publisher's decision; a
    log they applied is rebuilt so, and a publisher leaving after them has them declined."""
    others = f"{call_id}-others"
    then, now_ = envelope("institution.left", "operator", {"id": OWNER}), envelope("institution.left", "operator", {"id": OTHER_FUNDER})
    log = [*MEMBERS, published(call_id), published(others, by=OTHER_FUNDER), application(call_id, "app-1"),
           application(others, "app-2"), then, now_]
    with database_of_its_own(database_url, tmp_path, pg_server_url) as engine:
        answers = applied_by_rules(engine, log, older=7, newer_from=len(log))
        # Each leaving closes its publisher's open call (version 5); only the later declines too.
        assert {cause: answers.get(cause) for cause in (then["id"], now_["id"])} == {
            then["id"]: ["call.closed"], now_["id"]: ["call.application_decided", "call.closed"]}
        with Session(engine) as session:
            assert statuses(session, (call_id, "app-1"), (others, "app-2")) == {
                (call_id, "app-1"): "received", (others, "app-2"): "declined"}


def test_a_leaving_applied_by_version_6_of_the_rules_left_the_applicants_applications_waiting(
    call_id: str, database_url: str, tmp_path: Path, pg_server_url: str | None
) -> None:
    """Rules before version 7 left a former member's applications waiting for a decision; a log
    they applied is rebuilt so, and an applicant leaving after them has its applications withdrawn."""
    then, now_ = envelope("institution.left", "operator", {"id": COOPERATIVE}), envelope("institution.left", "operator", {"id": PARTNER})
    log = [*MEMBERS, published(call_id), application(call_id, "app-1"), application(call_id, "app-2", by=PARTNER), then, now_]
    with database_of_its_own(database_url, tmp_path, pg_server_url) as engine:
        answers = applied_by_rules(engine, log, older=6, newer_from=len(log))
        assert then["id"] not in answers and now_["id"] in answers
        with Session(engine) as session:
            assert statuses(session, (call_id, "app-1"), (call_id, "app-2")) == {
                (call_id, "app-1"): "received", (call_id, "app-2"): "withdrawn"}
