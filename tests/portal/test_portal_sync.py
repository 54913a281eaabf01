"""The portal connector against the sandbox portal over real HTTP (CONTRACT §8, sync rules).

The first sync reads the issue's 10,000 entries on SQLite and 1,000 on PostgreSQL (the same
code path, a shorter run); ``COLLABBUS_PORTAL_TEST_ENTRIES`` sets both. It reports its rate
(printed with ``-s`` and recorded as the test's ``entries_per_second`` property): with the
sandbox, the connector and the read models sharing one process it is about 290 entries/s on
two cores (less while other work shares them)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlmodel import select

from bus.streams import EVENTS_STREAM
from bus.verdict import Problem, Verdict
from connectors.portal.connector import (
    PortalClient,
    PortalSync,
    SyncReport,
    content_hash,
    project_facts,
    project_id_of,
)
from connectors.portal.sandbox import Faults, PortalSandbox, sample_entries
from handlers.db import session_scope
from handlers.projects import Project
from tests.connectors.conftest import Gateway
from tests.portal.conftest import TOKEN, Network, join, portal_sync, project_events

def first_sync_size(gateway: Gateway) -> int:
    """Entries in the first sync: 10,000 on SQLite, 1,000 on PostgreSQL, unless set."""
    default = "10000" if gateway.bus.settings.db_url.startswith("sqlite") else "1000"
    return int(os.environ.get("COLLABBUS_PORTAL_TEST_ENTRIES", default))


def seed(sandbox: PortalSandbox, network: Network, n: int, *, unmapped_every: int = 0) -> list[dict[str, Any]]:
    """``n`` entries over the members' organisations (every ``unmapped_every``-th of an unknown one)."""
    entries = sample_entries(n, network.organisations)
    if unmapped_every:
        for i in range(0, n, unmapped_every):
            entries[i]["organisation"] = dict(network.unmapped)
    return sandbox.store.seed(entries)


def expected_projects(sandbox: PortalSandbox, network: Network) -> dict[str, dict[str, Any]]:
    """project id → the facts every mapped entry on the portal stands for now."""
    expected = {}
    for entry in sandbox.store.all():
        owner = network.members.get(entry["organisation"]["business_id"])
        if owner is not None:
            expected[project_id_of(entry["id"])] = project_facts(entry, owner)
    return expected


def replay(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The projects the events describe; fails on a duplicate or an event that changes nothing."""
    ids = [event["id"] for event in events]
    assert len(ids) == len(set(ids)), "an event id was emitted twice"
    projects: dict[str, dict[str, Any]] = {}
    for event in events:
        data = event["data"]
        if event["type"] == "project.registered":
            assert data["project_id"] not in projects, f"{data['project_id']} registered twice"
            projects[data["project_id"]] = dict(data)
        else:
            assert event["type"] == "project.updated", event
            before = projects[data["project_id"]]
            after = {**before, **data["changes"]}
            after = {k: v for k, v in after.items() if v is not None}
            assert content_hash(after) != content_hash(before), f"an update that changes nothing: {event}"
            projects[data["project_id"]] = after
    return projects


async def assert_exact(gateway: Gateway, sandbox: PortalSandbox, network: Network, *, check_read_model: bool = True) -> list[dict[str, Any]]:
    """The log holds exactly the portal's mapped entries as they are now; returns the events."""
    events = await project_events(gateway, list(network.members.values()))
    expected = expected_projects(sandbox, network)
    projects = replay(events)
    deleted = set(projects) - set(expected)
    assert deleted <= {project_id_of(e) for e in sandbox.fault_log.deleted}
    assert {pid: projects[pid] for pid in expected} == expected
    if check_read_model:
        await gateway.settle()
        with session_scope(gateway.bus.engine) as session:
            rows = {p.project_id: p for p in session.exec(select(Project).where(Project.project_id.in_(list(expected))))}  # type: ignore[attr-defined]
        assert set(rows) == set(expected)
        for pid, facts in expected.items():
            row = rows[pid]
            assert (row.title, row.summary, row.status, row.owner) == (facts["title"], facts.get("summary"), facts["status"], facts["owner"])
            assert row.external_refs == facts["external_refs"]
    return events


@pytest.mark.early
@pytest.mark.timeout(1800)
async def test_first_sync_then_nothing_then_exactly_the_edits(
    gateway: Gateway, sandbox: PortalSandbox, network: Network, record_property: Callable[[str, object], None]
) -> None:
    size = first_sync_size(gateway)
    entries = seed(sandbox, network, size, unmapped_every=50)
    unmapped = len(range(0, size, 50))
    mapped = size - unmapped

    first = await portal_sync(gateway, sandbox).sync()
    print(f"\nfirst sync of {size} entries: {first.seconds:.1f} s, {first.rate:,.0f} entries/s, "
          f"{first.emitted / first.seconds:,.0f} events/s")
    record_property("entries_per_second", round(first.rate, 1))
    assert first.complete and first.error is None
    assert (first.listed, first.registered, first.updated, first.rejected) == (size, mapped, 0, [])
    assert first.unmapped == {network.unmapped["business_id"]: {"name": network.unmapped["name"], "entries": unmapped}}
    events = await assert_exact(gateway, sandbox, network)
    assert len(events) == mapped and {e["type"] for e in events} == {"project.registered"}
    sample = next(e for e in entries if "ar" in e["title"] and e["organisation"]["business_id"] in network.members)
    registered = next(e for e in events if e["subject"] == project_id_of(sample["id"]))
    assert registered["data"]["title"] == sample["title"]  # LocalizedText intact, Arabic included
    assert registered["data"]["external_refs"] == [{"system": "innokyla", "id": sample["id"], "url": sample["url"]}]
    assert registered["source"] == f"/institutions/{network.members[sample['organisation']['business_id']]}"

    again = await portal_sync(gateway, sandbox).sync()
    assert again.complete and again.emitted == 0
    full = await portal_sync(gateway, sandbox).sync(full=True)
    assert full.complete and full.emitted == 0 and full.unchanged == mapped
    assert len(await project_events(gateway, list(network.members.values()))) == mapped

    mapped_ids = [e["id"] for e in entries if e["organisation"]["business_id"] in network.members]
    archived = 0
    async with httpx.AsyncClient(base_url=sandbox.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for n, entry_id in enumerate(mapped_ids[:100]):
            current = await http.get(f"/api/v1/entries/{entry_id}")
            changes: dict[str, Any] = {"title": {**current.json()["title"], "en": f"Edited {n}"}}
            if n % 4 == 0 and current.json()["status"] != "archived":
                changes["status"] = "archived"
                archived += 1
            response = await http.put(f"/api/v1/entries/{entry_id}", json=changes, headers={"If-Match": current.headers["etag"]})
            assert response.status_code == 200
        stale = await http.put(f"/api/v1/entries/{mapped_ids[0]}", json={"region": "Lappi"}, headers={"If-Match": current.headers["etag"]})
        assert stale.status_code == 412
    edits = await portal_sync(gateway, sandbox).sync()
    assert edits.complete and (edits.registered, edits.updated) == (0, 100)
    events = await assert_exact(gateway, sandbox, network)
    updates = [e for e in events if e["type"] == "project.updated"]
    assert len(updates) == 100
    assert {tuple(sorted(e["data"]["changes"])) for e in updates} == {("title",), ("status", "title")}
    assert sum(e["data"]["changes"].get("status") == "completed" for e in updates) == archived > 0


FAULTS = {
    "rate_limited": Faults(rate_limit_every=15, retry_after=1),
    "server_errors": Faults(error_every=4),
    "slow": Faults(slow_every=9, slow_seconds=1.0),
    "changing_pages": Faults(change_every=2, change_count=5),
    "deleted_before_get": Faults(delete_every=2),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fault", list(FAULTS))
async def test_sync_survives_portal_faults(gateway: Gateway, sandbox: PortalSandbox, network: Network, fault: str) -> None:
    n = 60 if fault == "rate_limited" else 200
    seed(sandbox, network, n)
    sandbox.faults = FAULTS[fault]
    report = await portal_sync(gateway, sandbox, timeout=0.5, page_size=20).sync()
    assert report.complete, report.error
    log = sandbox.fault_log
    happened = {"rate_limited": log.rate_limited, "server_errors": log.errors, "slow": log.slowed,
                "changing_pages": len(log.changed), "deleted_before_get": len(log.deleted)}[fault]
    assert happened > 0
    if fault in ("rate_limited", "server_errors", "slow"):
        assert report.retries >= happened
    if fault == "rate_limited":
        assert report.seconds >= log.rate_limited * 1.0  # Retry-After honoured
    assert sorted(report.deleted) == sorted(log.deleted)
    events = await assert_exact(gateway, sandbox, network, check_read_model=False)
    assert report.registered + len(log.deleted) == n
    assert len(events) == report.emitted

    sandbox.faults = Faults()
    assert (await portal_sync(gateway, sandbox).sync(full=True)).emitted == 0


async def test_a_page_that_keeps_failing_resumes_from_the_cursor(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    seed(sandbox, network, 200)

    def break_after_two_pages(report: SyncReport) -> None:
        if report.pages == 2:
            sandbox.faults = Faults(error_every=1)

    stopped = await portal_sync(gateway, sandbox, attempts=3, page_size=25).sync(progress=break_after_two_pages)
    assert not stopped.complete and "503" in (stopped.error or "")
    assert stopped.registered == 50
    sandbox.faults = Faults()
    resumed = await portal_sync(gateway, sandbox, page_size=25).sync()  # a new process: the cursor is in the database
    assert resumed.complete and resumed.registered == 150 and resumed.pages == 6
    assert len(await assert_exact(gateway, sandbox, network, check_read_model=False)) == 200


async def test_entries_whose_events_the_log_could_not_take_are_read_again_by_the_next_sync(
    gateway: Gateway, sandbox: PortalSandbox, network: Network,
) -> None:
    """The gate answers `unavailable` while the log cannot take events (its cluster electing a
    leader, NATS away). Such an entry was reported refused and its page stored with the cursor
    past it: the next incremental sync never listed it again, and the portal's change was lost.
    The sync stops at that page instead, and the next one reads it again."""
    seed(sandbox, network, 60)
    gate = gateway.bus.gate
    admit = gate.admit
    refusing = False

    async def log_away(institution: str, body: bytes, headers: Any) -> Verdict:
        if not refusing:
            return await admit(institution, body, headers)
        event_id = orjson.loads(body)["id"]
        return Verdict("rejected", event_id, reason="unavailable", errors=(
            Problem((), "the event log did not confirm the event (TimeoutError); retry with the same id", "log_unavailable"),))

    def away_after_the_first_page(report: SyncReport) -> None:
        nonlocal refusing
        refusing = report.pages == 1

    gate.admit = log_away  # type: ignore[method-assign,assignment]
    try:
        stopped = await portal_sync(gateway, sandbox, page_size=20).sync(progress=away_after_the_first_page)
    finally:
        gate.admit = admit  # type: ignore[method-assign]
    assert not stopped.complete and stopped.registered == 20 and stopped.rejected == []
    assert stopped.error is not None and "the event log did not take entry" in stopped.error, stopped.error
    resumed = await portal_sync(gateway, sandbox, page_size=20).sync()
    assert resumed.complete and resumed.registered == 40, resumed.as_dict()
    assert len(await assert_exact(gateway, sandbox, network, check_read_model=False)) == 60


async def test_a_wrong_token_is_said_plainly(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    seed(sandbox, network, 5)
    connector = portal_sync(gateway, sandbox)
    connector.client = PortalClient(sandbox.url, "wrong", timeout=5.0, backoff=0.02, attempts=2)
    stopped = await connector.sync()
    assert not stopped.complete and stopped.registered == 0
    assert stopped.error is not None and stopped.error.startswith("the portal refused the token (401 from 127.0.0.1)")
    assert "COLLABBUS_PORTAL_TOKEN" in stopped.error and "developer.mozilla.org" not in stopped.error  # (httpx's advice)


class _CrashAfterLogging(PortalSync):
    def _save(self, rows: Any, position: Any) -> None:
        raise RuntimeError("the process died before storing what it emitted")


async def test_a_crash_after_emitting_emits_each_change_once(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    seed(sandbox, network, 30)
    crashing = portal_sync(gateway, sandbox)
    with pytest.raises(RuntimeError):
        await _CrashAfterLogging(crashing.gate, crashing.engine, crashing.client).sync()
    rerun = await portal_sync(gateway, sandbox).sync()
    assert rerun.registered == 30 and rerun.duplicates == 30
    assert len(await assert_exact(gateway, sandbox, network, check_read_model=False)) == 30


async def test_a_validation_decision_is_pushed_and_not_echoed(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    [entry] = seed(sandbox, network, 1)
    sync = portal_sync(gateway, sandbox)
    assert (await sync.sync()).registered == 1
    decided = {"validation_id": "val-1", "outcome": "validated", "evidence_level": 3, "decided_at": "2026-11-23T09:00:00Z"}
    assert await sync.push_validation(decided, project_id_of(entry["id"]), url="https://example.org/v/val-1") is True
    assert await sync.push_validation(decided, "not-from-the-portal") is None
    stored = sandbox.store.get(entry["id"])
    assert stored is not None and stored[0]["validation"]["outcome"] == "validated"
    after = await sync.sync()
    assert after.listed == 1 and after.emitted == 0  # the connector's own change is not echoed back


async def test_entries_of_an_organisation_that_becomes_a_member_are_synced(
    gateway: Gateway, sandbox: PortalSandbox, network: Network
) -> None:
    seed(sandbox, network, 20, unmapped_every=2)
    first = await portal_sync(gateway, sandbox).sync()
    assert (first.registered, first.unmapped[network.unmapped["business_id"]]["entries"]) == (10, 10)
    assert (await portal_sync(gateway, sandbox).sync()).unmapped == {}  # incremental: nothing new listed
    newcomer = await join(gateway, "cooperative", network.unmapped["business_id"])
    await gateway.settle()
    network.members[network.unmapped["business_id"]] = newcomer
    after = await portal_sync(gateway, sandbox).sync()
    assert (after.listed, after.registered, after.unchanged, after.unmapped) == (20, 10, 10, {})
    assert len(await assert_exact(gateway, sandbox, network, check_read_model=False)) == 20


async def test_logged_decisions_about_portal_projects_are_pushed_those_refused_not(
        gateway: Gateway, sandbox: PortalSandbox, network: Network, caplog: pytest.LogCaptureFixture) -> None:
    """The decisions the workflow took are pushed; one it refused (here: from another than the
    coordinator, on a decided validation) is in the log too, and was pushed as if it were one:
    the portal showed an outcome the validation never had."""
    import asyncio
    import uuid
    from datetime import UTC, datetime

    from connectors.portal.connector import push_decisions
    from handlers.validations import Validation

    [entry] = seed(sandbox, network, 1)
    sync = portal_sync(gateway, sandbox)
    assert (await sync.sync()).registered == 1
    owner = network.members[entry["organisation"]["business_id"]]
    validation_id = f"val-{uuid.uuid4().hex[:12]}"
    with session_scope(gateway.bus.engine) as session:  # as validation.requested leaves it in the read model
        session.add(Validation(validation_id=validation_id, requester=owner, coordinator=owner, project_id=project_id_of(entry["id"]),
                               self_assessment={}, quorum=2, status="requested", requested_at=datetime.now(UTC)))
    gateway.bus.service.forget()  # written beside the network service, which keeps what it read
    verdict = await gateway.bus.gate.publish_internal({
        "specversion": "1.0", "id": f"decided-{validation_id}", "source": f"/institutions/{owner}",
        "type": "validation.decided", "subject": validation_id,
        "data": {"validation_id": validation_id, "outcome": "validated", "evidence_level": 2, "decided_by": "coordinator"},
    })
    assert verdict.accepted, verdict.as_dict()
    stop = asyncio.Event()
    durable = f"portal-push-{uuid.uuid4().hex[:8]}"
    caplog.set_level(logging.INFO, logger="collabbus.portal")
    pushing = asyncio.create_task(push_decisions(gateway.bus.js, sync, stop, durable=durable))
    try:
        for _ in range(200):
            stored = sandbox.store.get(entry["id"])
            if stored is not None and stored[0]["validation"]:
                break
            await asyncio.sleep(0.05)
        assert stored is not None and stored[0]["validation"]["validation_id"] == validation_id
        assert stored[0]["validation"]["outcome"] == "validated" and stored[0]["validation"]["evidence_level"] == 2
        intruder = next(member for member in network.members.values() if member != owner)
        refused = await gateway.bus.gate.publish_internal({
            "specversion": "1.0", "id": f"overruled-{validation_id}", "source": f"/institutions/{intruder}",
            "type": "validation.decided", "subject": validation_id,
            "data": {"validation_id": validation_id, "outcome": "not_validated", "evidence_level": 5, "decided_by": "coordinator"},
        })
        assert refused.accepted, refused.as_dict()  # (logged: the workflow refuses it, not_coordinator)
        said = f"the validation decision overruled-{validation_id} was refused by the workflow: not pushed to the portal"
        for _ in range(200):  # until the push consumer has come to it (the log it reads is other tests' too)
            if any(record.getMessage() == said for record in caplog.records):
                break
            await asyncio.sleep(0.05)
        assert any(record.getMessage() == said for record in caplog.records)
        after = sandbox.store.get(entry["id"])
        assert after is not None
        assert (after[0]["validation"]["outcome"], after[0]["validation"]["evidence_level"]) == ("validated", 2), after[0]["validation"]
    finally:
        stop.set()
        await pushing
        await gateway.bus.js.delete_consumer(EVENTS_STREAM, durable)
    assert (await sync.sync()).emitted == 0  # not echoed back



async def test_a_sync_pass_is_a_trace_and_each_changed_entry_one_of_its_own_linked_to_it(
    gateway: Gateway, sandbox: PortalSandbox, network: Network, tmp_path: Path,
) -> None:
    """The pass's trace holds its list calls; each entry that changed is a trace of its own (its
    GET and the event offered from it), linked to the pass's span, so that a first sync of
    thousands of entries is as many small traces; a pass over unchanged entries makes none."""
    from bus.log import read
    from ops.tracing import Tracing, recent_traces

    seeded = seed(sandbox, network, 3)
    (tmp_path / "connector").mkdir()
    tracing = Tracing.configure(tmp_path / "connector", environ={})
    plain = portal_sync(gateway, sandbox)  # (its client reports to the gateway's bus: a client of its own here)
    client = PortalClient(sandbox.url, TOKEN, timeout=5.0, backoff=0.02)
    connector = PortalSync(plain.gate, plain.engine, client, portal=plain.portal, tracing=tracing)
    report = await connector.sync()
    assert report.registered == 3
    assert tracing.flush() and tracing.store is not None
    found = recent_traces(tracing.store, limit=10)
    [passing] = [t for t in found if t["roots"][0]["operation"] == "portal sync"]
    [root] = passing["roots"]
    assert root["status"] != "error"
    assert [span["operation"] for span in root["children"]] == ["GET"]  # the list: one page
    entries = [t for t in found if t["roots"][0]["operation"] == "portal entry"]
    assert len(entries) == 3 and len(found) == 4
    for entry in entries:
        [head] = entry["roots"]
        assert head["links"] == [{"trace_id": passing["trace_id"], "span_id": root["span_id"]}]
        assert [span["operation"] for span in head["children"]] == ["GET"]  # the entry itself
    assert {entry["roots"][0]["attributes"]["collabbus.portal.entry"] for entry in entries} == {e["id"] for e in seeded}
    # Each event offered was logged in its entry's trace (the gate's producer span is its child).
    logged = []
    for member in network.members.values():
        async for item in read(gateway.bus.js, f"collab.events.{member}.project.>", since="all", idle_timeout=0.5):
            logged.append(item.seq)
    assert len(logged) == 3
    traced = set()
    for seq in logged:
        message = await gateway.bus.js.get_msg(EVENTS_STREAM, seq)
        assert message.headers
        traced.add(message.headers["traceparent"].split("-")[1])
    assert traced == {entry["trace_id"] for entry in entries}

    again = await connector.sync(full=True)
    assert again.complete and again.unchanged == 3
    assert tracing.flush()
    after = recent_traces(tracing.store, limit=10)
    assert sorted(t["roots"][0]["operation"] for t in after) == ["portal entry"] * 3 + ["portal sync"] * 2
    await client.http.aclose()
    tracing.shutdown()


async def test_a_pass_traces_its_first_changed_entries_and_leaves_the_others_untraced_end_to_end(
    gateway: Gateway, sandbox: PortalSandbox, network: Network, tmp_path: Path,
) -> None:
    """Past ``traced_entries`` a pass records nothing of an entry — no span of its own, its GET's or
    the bus's for its event — and counts it on the pass's span; its event's ``traceparent`` says
    "not sampled", so a first sync of thousands of entries leaves the span store to the rest."""
    from bus.log import read
    from ops.tracing import Tracing, load_trace, recent_traces

    seed(sandbox, network, 3)
    (tmp_path / "connector").mkdir()
    tracing = Tracing.configure(tmp_path / "connector", environ={})
    plain = portal_sync(gateway, sandbox)
    client = PortalClient(sandbox.url, TOKEN, timeout=5.0, backoff=0.02)
    connector = PortalSync(plain.gate, plain.engine, client, portal=plain.portal, tracing=tracing, traced_entries=1)
    report = await connector.sync()
    assert report.registered == 3 and (report.traced, report.untraced) == (1, 2)
    await gateway.settle()
    assert tracing.flush() and tracing.store is not None
    found = recent_traces(tracing.store, limit=10)
    assert sorted(t["roots"][0]["operation"] for t in found) == ["portal entry", "portal sync"]
    [passing] = [t for t in found if t["roots"][0]["operation"] == "portal sync"]
    attributes = passing["roots"][0]["attributes"]
    assert (attributes["collabbus.portal.entry_traces"], attributes["collabbus.portal.entries_untraced"]) == (1, 2)
    [entry] = [t for t in found if t["roots"][0]["operation"] == "portal entry"]

    flags: dict[str, str] = {}
    for member in network.members.values():
        async for item in read(gateway.bus.js, f"collab.events.{member}.project.>", since="all", idle_timeout=0.5):
            message = await gateway.bus.js.get_msg(EVENTS_STREAM, item.seq)
            assert message.headers
            _, trace_id, _, sampled = message.headers["traceparent"].split("-")
            flags[trace_id] = sampled
    assert len(flags) == 3 and flags.pop(entry["trace_id"]) == "01"
    assert list(flags.values()) == ["00", "00"]  # two traces of their own, neither sampled
    assert gateway.bus.tracing is not None
    bus_store = gateway.bus.tracing.store
    assert gateway.bus.tracing.flush() and bus_store is not None
    assert load_trace(bus_store, entry["trace_id"]) is not None  # the bus recorded the traced event's way ...
    for trace_id in flags:  # ... and nothing of the others, nor did the connector
        assert load_trace(bus_store, trace_id) is None and load_trace(tracing.store, trace_id) is None
    await client.http.aclose()
    tracing.shutdown()


def test_a_pass_is_logged_in_one_line_and_what_needs_an_operator_in_one_each(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from connectors.portal.connector import SyncReport, _log_pass

    report = SyncReport(portal="p", listed=3, registered=1, complete=True,
                        unmapped={"1234567-8": {"name": "Silta-Valmennus", "entries": 2}},
                        rejected=[{"entry": "e-1", "event_id": "x", "reason": "invalid", "errors": []}])
    with caplog.at_level(logging.INFO, logger="collabbus.portal"):
        _log_pass(report)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("portal sync complete: 3 listed, 1 registered")
    assert any("Silta-Valmennus" in line and "1234567-8" in line and "institutions update ID --identifier" in line
               and "reads the whole portal again by itself" in line for line in lines)
    assert any("entry e-1 rejected (invalid)" in line for line in lines)
