"""Any event the published JSON Schemas take, with texts of any Unicode, offered through the gate
of a real bus: the gate takes it or refuses it for a rule JSON Schema cannot state, and what it
takes is applied on SQLite and on PostgreSQL alike — decided or refused by the workflows, never
dead-lettered — the read API's pages about it answer (never 5xx) with its texts as sent, a search
finds what it made, and a rebuild of the log equals the state applied event by event.

The references in the drawn data are pointed at the network's members and at the things the
events before created, so that workflows get past "unknown project" to the texts, amounts and
times they keep."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from icalendar import Calendar

from bus.consumer import ConsumerSettings
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from connectors.http.calendar import CONTROLS
from connectors.http.paging import MAX_LIMIT
from handlers import tokens
from handlers.db import session_scope, table_checksums
from ops.settings import Settings
from schemas import registry
from schemas.common import InstitutionKind
from tests.handlers.harness import BusScenario, envelope, rebuilt
from tests.schemas.strategies import UNSTATABLE, catalog_data

MEMBERS = {kind.value: f"any-{kind.value.replace('_', '-')}" for kind in InstitutionKind if kind is not InstitutionKind.OPERATOR}

OFFERED = [type_ for type_ in registry.event_types() if registry.spec_for(type_).emitters]
"""What members may offer (the bus's own events — refusals, receipts — are the workflows')."""

MADE_BY = {"project.registered": "project_id", "call.published": "call_id", "innovation_day.scheduled": "day_id",
           "validation.requested": "validation_id", "call.application_submitted": "application_id",
           "innovation_day.registration_requested": "registration_id"}
"""What makes the things the other events are about, and the id of what it makes (kept new):
drawn as often as all the rest together."""

IN_ORDER = [("opens_at", "deadline", "full_proposal_deadline"), ("registration_deadline", "starts_at", "ends_at"),
            ("started_on", "ends_on"), ("start", "end")]
"""Times and dates whose order the gate checks (JSON Schema cannot state it): put in order, so
that an event gets past the gate to the workflows more often than half the time."""

INSTITUTION_FIELDS = {"owner", "adopter", "coordinator", "reviewer", "participant", "applicant", "institution", "partner"}
THINGS = {
    "project_id": "SELECT project_id FROM projects",
    "adapted_project_id": "SELECT project_id FROM projects",
    "call_id": "SELECT call_id FROM calls",
    "application_id": "SELECT application_id FROM call_applications",
    "day_id": "SELECT day_id FROM innovation_days",
    "registration_id": "SELECT registration_id FROM innovation_day_registrations",
    "validation_id": "SELECT validation_id FROM validations",
}


def _pointed(value: Any, draw: Any, members: list[str], things: dict[str, list[str]], source: str) -> Any:
    """``value`` with its other institutions among ``members`` (its owner or participant the source,
    its coordinator the competence centre) and, mostly, its things' ids among those the network has."""
    if isinstance(value, list):
        return [_pointed(item, draw, members, things, source) for item in value]
    if not isinstance(value, dict):
        return value
    pointed = {}
    for key, item in value.items():
        if key in ("owner", "participant") and isinstance(item, str):
            item = source
        elif key == "coordinator" and isinstance(item, str):
            item = MEMBERS["competence_centre"]
        elif key in INSTITUTION_FIELDS and isinstance(item, str):
            item = draw(st.sampled_from(members))
        elif key == "partners" and isinstance(item, list) and all(isinstance(i, str) for i in item):
            item = [draw(st.sampled_from(members)) for _ in item]
        elif key in THINGS and isinstance(item, str):
            # Drawn as a number whatever the network holds, so that drawing does not depend on
            # what the events before made.
            pick = draw(st.integers(0, 3 * 10**6))
            if things[key] and pick % 4:
                item = things[key][pick % len(things[key])]
        else:
            item = _pointed(item, draw, members, things, source)
        pointed[key] = item
    return pointed


def _in_order(value: Any) -> Any:
    """``value`` with the times of each :data:`IN_ORDER` group it holds sorted (moments by their
    instant, dates by their day)."""
    if isinstance(value, list):
        return [_in_order(item) for item in value]
    if not isinstance(value, dict):
        return value
    ordered = {key: _in_order(item) for key, item in value.items()}
    for group in IN_ORDER:
        present = [key for key in group if isinstance(ordered.get(key), str)]
        times = sorted((ordered[key] for key in present), key=lambda text: datetime.fromisoformat(text.replace("Z", "+00:00")))
        ordered.update(zip(present, times))
    return ordered


def _things(engine: sa.Engine) -> dict[str, list[str]]:
    with engine.connect() as connection:
        return {key: sorted(connection.execute(sa.text(query)).scalars()) for key, query in THINGS.items()}


GATE_CHECKS = {"not_member", "municipalities_only"}
"""What the gate checks of the network beyond an event's data: that the member an
`institution.*` event is about is one, and that a level is given to a municipality (the rest is
the workflows')."""


def _expected(problem: dict[str, Any]) -> bool:
    return problem.get("type") in GATE_CHECKS or any(rule in str(problem.get("msg", "")) for rule in UNSTATABLE)


@pytest.fixture
async def scenario(database_url: str, tmp_path: Path) -> AsyncIterator[BusScenario]:
    """A bus of its own, as the handler tests' (own nats-server, own log), serving its HTTP API."""
    server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await server.astart()
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=database_url,
                        http=f"127.0.0.1:{free_port()}")
    bus = Bus(settings, consumer_settings=ConsumerSettings("network", backoff=(0.05, 0.1)))
    await bus.start(ingress=False)
    await bus.start_http()
    assert bus.relay is not None
    bus.relay.clock = lambda: None  # the timers act only when told (as in the handler tests)
    try:
        yield BusScenario(bus)
    finally:
        await bus.stop()
        await server.astop()


async def _read_back(client: httpx.AsyncClient, type_: str, data: dict[str, Any], source: str) -> str | None:
    """What the read API shows of a thing ``data`` made is its texts as sent, byte for byte, and a
    search of a word of its title finds it; returns the word found by, if any."""
    if type_ == "project.registered":
        path, thing, own = "/projects", data["project_id"], "owner"
    elif type_ == "call.published":
        path, thing, own = "/calls", data["call_id"], "owner"
    elif type_ == "innovation_day.scheduled":
        path, thing, own = "/innovation-days", data["day_id"], "organizer"
    else:
        return None
    shown = await client.get(f"{path}/{thing}")
    if shown.status_code == 404:  # the workflow refused it (a deadline passed, say)
        return None
    assert shown.status_code == 200, shown.text
    body = shown.json()
    assert body["title"] == data["title"] and body.get("summary") == data.get("summary"), (body, data)
    word = next((word for text in data["title"].values() for word in text.split() if len(word) <= 200), None)
    if word is None:
        return None
    cursor: str | None = None
    for _ in range(50):  # pages of what else has the word, the owner's own
        params = {"q": word, own: source, "limit": MAX_LIMIT, **({"cursor": cursor} if cursor else {})}
        page = await client.get(path, params=params)
        assert page.status_code == 200, (word, page.text)
        if any(thing in (item.get("project_id"), item.get("call_id"), item.get("day_id")) for item in page.json()["items"]):
            return word
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    raise AssertionError(f"a search of {word!r}, a word of its title, does not find {thing}: {data['title']}")


def _pages(type_: str, data: dict[str, Any], source: str) -> list[str]:
    """The read API's pages about what an event of ``type_`` with ``data`` is about, or by whom."""
    pages = ["/me", f"/institutions/{source}"]
    if type_.startswith("project."):
        pages += [f"/projects/{data['project_id']}", f"/projects?owner={source}", "/stats/adoptions"]
    elif type_.startswith("call."):
        call = data["call_id"]
        pages += [f"/calls/{call}", f"/calls?owner={source}", f"/calls/{call}/applications", "/applications"]
        if "application_id" in data:
            pages.append(f"/calls/{call}/applications/{data['application_id']}")
    elif type_.startswith("validation."):
        pages += [f"/validations/{data['validation_id']}", "/validations"]
    elif type_.startswith("innovation_day."):
        day = data["day_id"]
        pages += [f"/innovation-days/{day}", f"/innovation-days/{day}/registrations", f"/innovation-days/{day}/meetings",
                  "/innovation-days", "/innovation-days.ics"]
    elif type_.startswith("institution."):
        pages += [f"/institutions/{data['id']}", "/institutions"]
    return pages


async def _read_all(client: httpx.AsyncClient, type_: str, data: dict[str, Any], source: str) -> None:
    """Every page about what the event is about answers — shown, or not the caller's to see, or
    not there (refused) — and never fails; a calendar is one a calendar parser reads."""
    for page in _pages(type_, data, source):
        answer = await client.get(page)
        assert answer.status_code in (200, 403, 404), (page, answer.status_code, answer.text[:2000])
        if answer.status_code == 200 and page.endswith(".ics"):
            assert not set(answer.content) & set(CONTROLS), answer.content  # (RFC 5545: no controls in a text)
            Calendar.from_ical(answer.content)
        elif answer.status_code == 200:
            answer.json()


@pytest.mark.early
async def test_any_event_the_schemas_take_is_applied_or_refused_never_dead_lettered_and_rebuilds_alike(
    scenario: BusScenario, database_url: str, tmp_path: Path, pg_server_url: str | None
) -> None:
    bus = scenario.bus
    assert bus.http is not None
    operator = bus.settings.operator
    for kind, member in MEMBERS.items():
        level = {"municipality_level": "district"} if kind == "municipality" else {}
        await scenario.given(envelope("institution.joined", operator, {
            "id": member, "name": {"en": f"Any {kind}"}, "kind": kind, "country": "FI", **level}))
    loop = asyncio.get_running_loop()
    kept: dict[str, int] = {}
    refused_at_gate: list[str] = []
    made = 0
    searched: list[str] = []

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)

    # Each example changes the network the next meets, so a failing one is reported as it was met,
    # not shrunk (smaller examples would meet another network).
    @settings(max_examples=120, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def offer_any(data: st.DataObject) -> None:
        nonlocal made
        type_ = data.draw(st.sampled_from(sorted(MADE_BY)) | st.sampled_from(OFFERED), label="type")
        spec = registry.spec_for(type_)
        kinds = sorted(kind for kind in MEMBERS if kind in spec.emitters)
        source = MEMBERS[data.draw(st.sampled_from(kinds))] if kinds else operator
        things = run(asyncio.to_thread(_things, bus.engine))
        others = sorted(member for member in MEMBERS.values() if member != source)  # (a project's partners are others)
        drawn = _pointed(_in_order(data.draw(catalog_data(type_), label="data")), data.draw, others, things, source)
        if type_ == "institution.updated":  # of a member, whose kind stays what the sources are drawn by
            drawn = {"id": data.draw(st.sampled_from(sorted(MEMBERS.values()))), "region": "?",
                     **{name: value for name, value in drawn.items() if name not in ("id", "kind")}}
        if type_ in MADE_BY:  # a new thing (the draws repeat their simplest ids)
            made += 1
            drawn[MADE_BY[type_]] = f"{drawn[MADE_BY[type_]]:.118}-{made}"
        event = envelope(type_, source, drawn)
        verdict = run(bus.gate.admit(source, orjson.dumps(event)))
        if not verdict.accepted:
            problems = verdict.as_dict().get("errors", [])
            assert problems and all(_expected(problem) for problem in problems), (
                f"the gate refused schema-valid data for another reason: {problems}")
            refused_at_gate.append(type_)
            return
        run(scenario.settle(verdict.seq))
        consumer = bus.consumer
        assert consumer is not None and consumer.dead_lettered == 0 and consumer.retrying is None, (
            f"the network could not apply {orjson.dumps(event).decode()[:2000]} "
            f"(dead-lettered: {consumer and consumer.dead_lettered}; retrying: {consumer and consumer.retrying})")
        kept[type_] = kept.get(type_, 0) + 1
        run(_read_all(clients[source], type_, drawn, source))
        found_by = run(_read_back(clients[source], type_, drawn, source))
        if found_by is not None:
            searched.append(found_by)

    async with contextlib.AsyncExitStack() as stack:
        with session_scope(bus.engine) as session:
            tokens_of = {member: tokens.issue(session, member) for member in [*MEMBERS.values(), operator]}
        clients = {member: await stack.enter_async_context(httpx.AsyncClient(
            base_url=bus.http.url, timeout=30, headers={"Authorization": f"Bearer {token}"})) for member, token in tokens_of.items()}
        await asyncio.to_thread(offer_any)

    # The gate took most, and the workflows got past the unknown ids to the data.
    assert sum(kept.values()) >= 60, (kept, refused_at_gate)
    network_holds = _things(bus.engine)
    assert sum(1 for ids in network_holds.values() if ids) >= 3, network_holds
    # And what it made was shown as sent, and found by its words: each one read back is asserted
    # where it is read; this says some were (30–56 of a run's as a rule, 4 once).
    assert searched, searched

    async with rebuilt(bus, database_url, tmp_path / "rebuilt", pg_server_url) as again:
        live, replayed = table_checksums(bus.engine), table_checksums(again)
        assert sorted(name for name in live if replayed.get(name) != live[name]) == []
