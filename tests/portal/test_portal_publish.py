"""Projects of the network published on the portal (the push direction of CONTRACT §8), against
the sandbox over real HTTP: created once, referenced on the bus, changes written with ``If-Match``,
a concurrent portal edit merged, and nothing coming back as a new project."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest
from sqlmodel import select

from connectors.portal.connector import (
    PortalClient,
    PortalUnavailable,
    PublicationRefused,
    mark_for_publication,
    publication_tag,
)
from connectors.portal.sandbox import Faults, PortalSandbox, sample_entries
from handlers.db import session_scope
from handlers.projects import Project
from tests.connectors.conftest import Gateway
from tests.handlers.harness import envelope
from tests.portal.conftest import TOKEN, Network, portal_sync, project_events

TITLE = {"tr": "Evde bakım hizmeti", "en": "Care at home", "ar": "الرعاية في المنزل"}
LOCATION = {"country": "TR", "region": "Mersin", "municipality": "Yenişehir"}


async def offer(gateway: Gateway, member: str, event_type: str, data: dict[str, Any]) -> None:
    verdict = await gateway.bus.gate.admit(member, orjson.dumps(envelope(event_type, member, data)),
                                           {"content-type": "application/cloudevents+json"})
    assert verdict.accepted, verdict.as_dict()


async def bus_project(gateway: Gateway, network: Network) -> tuple[str, str, str]:
    """A project registered on the bus by a member with a business id: (project id, owner, business id)."""
    business_id, owner = next(iter(network.members.items()))
    project_id = f"p-{uuid.uuid4().hex[:12]}"
    await offer(gateway, owner, "project.registered", {
        "project_id": project_id, "title": TITLE, "summary": {"en": "Support for living at home"}, "owner": owner,
        "status": "active", "location": LOCATION, "external_refs": [{"system": "sosyokent", "id": "42"}],
    })
    await gateway.settle()
    return project_id, owner, business_id


def tagged(sandbox: PortalSandbox, project_id: str) -> list[dict[str, Any]]:
    """The portal's entries that carry the project's publication tag."""
    return [entry for entry in sandbox.store.all() if publication_tag(project_id) in (entry.get("tags") or [])]


def project(gateway: Gateway, project_id: str) -> Project:
    with session_scope(gateway.bus.engine) as session:
        row = session.get(Project, project_id)
    assert row is not None
    return row


async def updates_of(gateway: Gateway, owner: str, project_id: str) -> list[dict[str, Any]]:
    return [e["data"]["changes"] for e in await project_events(gateway, [owner])
            if e["type"] == "project.updated" and e["subject"] == project_id]


async def test_a_marked_project_is_published_once_and_does_not_come_back(
    gateway: Gateway, sandbox: PortalSandbox, network: Network
) -> None:
    project_id, owner, business_id = await bus_project(gateway, network)
    sync = portal_sync(gateway, sandbox)
    mark_for_publication(gateway.bus.engine, sync.portal, project_id)

    first = await sync.sync()
    assert first.complete and first.publish_errors == []
    assert (first.published, first.registered, first.updated) == (1, 0, 0)
    [entry] = tagged(sandbox, project_id)
    assert (entry["type"], entry["title"], entry["summary"], entry["status"]) == ("whole", TITLE, {"en": "Support for living at home"}, "published")
    assert entry["organisation"]["business_id"] == business_id
    assert (entry["region"], entry["municipality"]) == ("Mersin", "Yenişehir")

    await gateway.settle()
    innokyla = {"system": "innokyla", "id": entry["id"], "url": entry["url"]}
    assert project(gateway, project_id).external_refs == [{"system": "sosyokent", "id": "42", "url": None}, innokyla]
    assert await updates_of(gateway, owner, project_id) == [{"external_refs": [{"system": "sosyokent", "id": "42"}, innokyla]}]

    # No loop: the entry is listed by the next syncs and maps to the project it came from.
    again = await sync.sync()
    assert again.complete and again.listed >= 1
    assert (again.registered, again.updated, again.published, again.pushed) == (0, 0, 0, 0)
    full = await portal_sync(gateway, sandbox).sync(full=True)
    assert (full.registered, full.updated, full.unchanged) == (0, 0, 1)
    events = await project_events(gateway, [owner])
    assert [e["type"] for e in events if e["subject"] == project_id] == ["project.registered", "project.updated"]
    assert not any(e["subject"].startswith("innokyla-") for e in events)
    assert mark_for_publication(gateway.bus.engine, sync.portal, project_id).entry_id == entry["id"]  # marked once

    # A change the portal makes to a carried fact reaches the project, once, and is not pushed back.
    async with httpx.AsyncClient(base_url=sandbox.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        current = await http.get(f"/api/v1/entries/{entry['id']}")
        edited = {**TITLE, "fi": "Kotihoito"}
        assert (await http.put(f"/api/v1/entries/{entry['id']}", json={"title": edited},
                               headers={"If-Match": current.headers["etag"]})).status_code == 200
    pulled = await sync.sync()
    assert (pulled.registered, pulled.updated, pulled.pushed) == (0, 1, 0)  # not undone by a push of the older title
    await gateway.settle()
    assert project(gateway, project_id).title == edited
    settled = await sync.sync()
    assert (settled.emitted, settled.pushed, settled.waiting) == (0, 0, [])
    assert (await updates_of(gateway, owner, project_id))[1:] == [{"title": edited}]


async def test_a_published_project_names_its_funders_on_the_portal(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    """The entry's ``funder`` is the names of the partners the project names as its funders: set
    when the entry is created, written again when a funder joins, never pulled back as a change;
    a project without one leaves a funder the portal wrote alone."""
    from tests.portal.conftest import business_id, join

    first, second = [await join(gateway, "funder", business_id()) for _ in range(2)]
    project_id, owner, _ = await bus_project(gateway, network)
    await offer(gateway, owner, "project.partner_joined",
                {"project_id": project_id, "partner": {"institution": second, "role": "funder", "relation": "donation"}})
    await offer(gateway, owner, "project.partner_joined",
                {"project_id": project_id, "partner": {"institution": list(network.members.values())[1], "role": "partner"}})
    await gateway.settle()
    sync = portal_sync(gateway, sandbox)
    mark_for_publication(gateway.bus.engine, sync.portal, project_id)
    assert (await sync.sync()).published == 1
    [entry] = tagged(sandbox, project_id)
    assert entry["funder"] == second  # (the members' names are their ids here)
    await gateway.settle()

    await offer(gateway, owner, "project.partner_joined",
                {"project_id": project_id, "partner": {"institution": first, "role": "funder", "relation": "donation"}})
    await gateway.settle()
    pushed = await sync.sync()
    assert (pushed.pushed, pushed.emitted) == (1, 0)
    stored = sandbox.store.get(entry["id"])
    assert stored is not None and stored[0]["funder"] == ", ".join(sorted((first, second)))
    assert (await sync.sync()).emitted == 0  # the connector's own write is not pulled back


async def test_a_change_is_written_with_if_match_and_a_concurrent_portal_edit_is_kept(
    gateway: Gateway, sandbox: PortalSandbox, network: Network
) -> None:
    project_id, owner, _ = await bus_project(gateway, network)
    sync = portal_sync(gateway, sandbox)
    mark_for_publication(gateway.bus.engine, sync.portal, project_id, "practice")
    assert (await sync.sync()).published == 1
    [entry] = tagged(sandbox, project_id)
    await gateway.settle()

    # The owner changes the summary on the bus; on the portal, someone edits the region and the
    # funder between each of the connector's reads and its write (twice).
    summary = {"en": "Support for living at home, now with night visits", "tr": "Gece ziyaretleri"}
    await offer(gateway, owner, "project.updated", {"project_id": project_id, "changes": {"summary": summary}})
    await gateway.settle()
    sandbox.faults = Faults(edits_before_put=2, edit_before_put={"region": "Mersin ili", "funder": "Mersin BB"})
    pushed = await sync.sync()
    assert pushed.complete and pushed.publish_errors == []
    assert (pushed.pushed, pushed.conflicts, pushed.emitted) == (1, 2, 0)
    assert sandbox.fault_log.edited_before_put == [entry["id"], entry["id"]]
    stored = sandbox.store.get(entry["id"])
    assert stored is not None
    after = stored[0]
    assert (after["summary"], after["region"], after["funder"]) == (summary, "Mersin ili", "Mersin BB")
    assert (after["title"], after["type"], after["tags"]) == (TITLE, "practice", [publication_tag(project_id)])

    # The portal's edit of a carried fact reaches the bus; the connector's own write does not come back.
    sandbox.faults = Faults()
    pulled = await sync.sync()
    assert (pulled.updated, pulled.pushed, pulled.conflicts) == (1, 0, 0)
    await gateway.settle()
    row = project(gateway, project_id)
    assert (row.summary, row.region, row.municipality, row.country) == (summary, "Mersin ili", "Yenişehir", "TR")
    quiet = await sync.sync()
    assert (quiet.emitted, quiet.pushed, quiet.conflicts) == (0, 0, 0)
    assert (await updates_of(gateway, owner, project_id))[1:] == [
        {"summary": summary}, {"location": {**LOCATION, "region": "Mersin ili"}},
    ]


async def test_publishing_honours_retry_after(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    project_id, _, _ = await bus_project(gateway, network)
    sync = portal_sync(gateway, sandbox)
    mark_for_publication(gateway.bus.engine, sync.portal, project_id)
    sandbox.faults = Faults(rate_limit_every=2, retry_after=1)
    report = await sync.sync()
    assert report.complete and report.published == 1 and report.publish_errors == []
    assert sandbox.fault_log.rate_limited >= 2 and report.retries >= sandbox.fault_log.rate_limited
    assert report.seconds >= sandbox.fault_log.rate_limited * 1.0  # each Retry-After waited out
    assert len(tagged(sandbox, project_id)) == 1


class _AnswerLost(PortalClient):
    """The portal creates the entry, but its answer never arrives."""

    async def create_entry(self, body: Any) -> str:
        await super().create_entry(body)
        raise PortalUnavailable("POST /api/v1/entries: ReadTimeout; the portal may have acted on it")


async def test_an_entry_whose_creation_was_cut_short_is_adopted_not_registered(
    gateway: Gateway, sandbox: PortalSandbox, network: Network
) -> None:
    project_id, owner, _ = await bus_project(gateway, network)
    plain = portal_sync(gateway, sandbox)
    mark_for_publication(gateway.bus.engine, plain.portal, project_id)
    lost = type(plain)(plain.gate, plain.engine, _AnswerLost(sandbox.url, TOKEN, backoff=0.02), portal=plain.portal)
    cut = await lost.sync()
    assert cut.published == 0 and [e["project"] for e in cut.publish_errors] == [project_id]
    assert len(tagged(sandbox, project_id)) == 1

    resumed = await portal_sync(gateway, sandbox).sync()
    assert (resumed.published, resumed.registered, resumed.publish_errors) == (1, 0, [])
    [entry] = tagged(sandbox, project_id)  # not created twice
    await gateway.settle()
    assert {"system": "innokyla", "id": entry["id"], "url": entry["url"]} in project(gateway, project_id).external_refs
    with session_scope(gateway.bus.engine) as session:
        assert session.exec(select(Project).where(Project.project_id == f"innokyla-{entry['id']}")).first() is None
    assert [e["type"] for e in await project_events(gateway, [owner]) if e["subject"] == project_id] == [
        "project.registered", "project.updated",
    ]


async def test_what_cannot_be_marked_is_refused(gateway: Gateway, sandbox: PortalSandbox, network: Network) -> None:
    sync = portal_sync(gateway, sandbox)
    with pytest.raises(PublicationRefused, match="no project 'nowhere'"):
        mark_for_publication(gateway.bus.engine, sync.portal, "nowhere")
    project_id, _, _ = await bus_project(gateway, network)
    with pytest.raises(PublicationRefused, match="entry type"):
        mark_for_publication(gateway.bus.engine, sync.portal, project_id, "programme")
    outsider = await gateway.join("ngo")
    await offer(gateway, outsider, "project.registered", {
        "project_id": f"p-{uuid.uuid4().hex[:12]}", "title": {"en": "x"}, "owner": outsider, "status": "planned"})
    await gateway.settle()
    with session_scope(gateway.bus.engine) as session:
        theirs = session.exec(select(Project).where(Project.owner == outsider)).one()
    with pytest.raises(PublicationRefused, match="no fi-business-id identifier"):
        mark_for_publication(gateway.bus.engine, sync.portal, theirs.project_id)
    [pulled] = sandbox.store.seed(sample_entries(1, network.organisations))
    assert (await sync.sync()).registered == 1
    with pytest.raises(PublicationRefused, match="on the portal already"):
        mark_for_publication(gateway.bus.engine, sync.portal, f"innokyla-{pulled['id']}")
    first = mark_for_publication(gateway.bus.engine, sync.portal, project_id)
    assert mark_for_publication(gateway.bus.engine, sync.portal, project_id).marked_at == first.marked_at


async def test_a_validation_decided_before_publication_reaches_the_new_entry(
    gateway: Gateway, sandbox: PortalSandbox, network: Network
) -> None:
    import uuid
    from datetime import UTC, datetime

    from handlers.validations import Validation

    project_id, owner, _ = await bus_project(gateway, network)
    validation_id = f"val-{uuid.uuid4().hex[:12]}"
    decided_at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    with session_scope(gateway.bus.engine) as session:  # as the workflow leaves a decided validation
        session.add(Validation(validation_id=validation_id, requester=owner, coordinator=owner, project_id=project_id,
                               self_assessment={}, quorum=2, status="decided", outcome="validated", evidence_level=2,
                               requested_at=decided_at, decided_at=decided_at))
    gateway.bus.service.forget()  # written beside the network service, which keeps what it read
    sync = portal_sync(gateway, sandbox)
    mark_for_publication(gateway.bus.engine, sync.portal, project_id)
    assert (await sync.sync()).published == 1
    [entry] = tagged(sandbox, project_id)
    assert entry["validation"] is not None and entry["validation"]["validation_id"] == validation_id
    assert (entry["validation"]["outcome"], entry["validation"]["evidence_level"]) == ("validated", 2)


async def test_a_fault_the_sandbox_does_not_know_is_a_422_naming_the_known_ones(sandbox: PortalSandbox) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        response = await http.post("/_sandbox/faults", json={"rate_limit": 3})
        assert response.status_code == 422 and "rate_limit_every" in response.json()["error"]
        quoted = await http.post("/_sandbox/faults", json={"rate_limit_every": "3"})  # (every request then answered 500)
        assert quoted.status_code == 422 and "rate_limit_every" in quoted.json()["error"]
        assert (await http.get("/_sandbox/faults")).json()["faults"]["rate_limit_every"] == 0  # left as it was
        assert (await http.post("/_sandbox/faults", json={"rate_limit_every": 3, "slow_seconds": 1})).json()["rate_limit_every"] == 3


async def test_posting_faults_changes_those_it_names_and_leaves_the_others_on(sandbox: PortalSandbox) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        assert (await http.post("/_sandbox/faults", json={"error_every": 5})).status_code == 200
        both = (await http.post("/_sandbox/faults", json={"slow_every": 7, "slow_seconds": 0.5})).json()
        assert (both["error_every"], both["slow_every"], both["slow_seconds"]) == (5, 7, 0.5)
        off = (await http.post("/_sandbox/faults", json={"error_every": 0})).json()  # 0 turns one off
        assert (off["error_every"], off["slow_every"]) == (0, 7)
        assert (await http.get("/_sandbox/faults")).json()["faults"]["slow_every"] == 7
