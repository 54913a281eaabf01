"""``collabbus portal sandbox``, ``portal sync --once --json`` and ``portal publish`` as an operator runs them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from sqlmodel import select

from bus.server import free_port
from connectors.portal.connector import portal_key
from connectors.portal.sandbox import PortalSandbox, sample_entries
from connectors.portal.store import PortalEntry
from handlers.db import session_scope
from ops.tracing import STORE_FILE, recent_traces
from tests.commands import acollabbus, spawn
from tests.connectors.conftest import Gateway
from tests.handlers.harness import envelope
from tests.portal.conftest import TOKEN, Network, RawPortal
from tests.portal.test_portal_answers import entry, malformed_page

COLLABBUS = [sys.executable, "-m", "ops"]


async def test_sandbox_and_sync_commands(gateway: Gateway, network: Network, tmp_path: Path) -> None:
    port = free_port()
    sandbox = await asyncio.create_subprocess_exec(
        *COLLABBUS, "portal", "sandbox", "--listen", f"127.0.0.1:{port}", "--token", "cli-token",
        "--data-dir", str(tmp_path / "sandbox"), stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer cli-token"}) as http:
            for _ in range(300):
                try:
                    if (await http.get("/api/v1/entries")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            [member_bid, _] = list(network.members)
            seeded = await http.post("/_sandbox/seed", json={"count": 12, "organisations": [
                {"name": "Jäsen ry", "business_id": member_bid}, network.unmapped]})
            assert seeded.json()["created"] == 12
            assert (await http.get("/api/v1/entries", headers={"Authorization": "Bearer wrong"})).status_code == 401

        env = {**os.environ, "COLLABBUS_NATS_URL": gateway.bus.settings.nats_url or "",
               "COLLABBUS_NATS_CREDS": str(gateway.bus.settings.nats_creds),
               "COLLABBUS_DATABASE_URL": gateway.database_url, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"),
               "COLLABBUS_PORTAL_URL": f"http://127.0.0.1:{port}", "COLLABBUS_PORTAL_TOKEN": "cli-token"}
        refused = await acollabbus("portal", "sync", "--once", env=env)
        assert refused.returncode == 1 and "COLLABBUS_WEBHOOK_ALLOW_NETWORKS" in refused.stderr  # loopback is not a portal by default

        env["COLLABBUS_WEBHOOK_ALLOW_NETWORKS"] = "127.0.0.0/8"
        env["COLLABBUS_PORTAL_TRACED_ENTRIES"] = "2"
        for name in ("OTEL_TRACES_EXPORTER", "OTEL_SDK_DISABLED", "OTEL_EXPORTER_OTLP_ENDPOINT"):  # spans in the data dir's store
            env.pop(name, None)
        sync = await acollabbus("portal", "sync", "--once", "--json", env=env)
        assert sync.returncode == 0, sync.stderr
        summary = json.loads(sync.stdout)
        assert (summary["complete"], summary["listed"], summary["registered"], summary["unmapped_entries"]) == (True, 12, 6, 6)
        assert summary["unmapped"] == {network.unmapped["business_id"]: {"name": network.unmapped["name"], "entries": 6}}
        # The setting reaches the connector: 2 of the 6 changed entries traced, the pass says so.
        found = recent_traces(tmp_path / "bus" / STORE_FILE, limit=20)
        [passing] = [t["roots"][0] for t in found if t["roots"][0]["operation"] == "portal sync"]
        assert (passing["attributes"]["collabbus.portal.entry_traces"], passing["attributes"]["collabbus.portal.entries_untraced"]) == (2, 4)
        assert sum(t["roots"][0]["operation"] == "portal entry" for t in found) == 2
    finally:
        sandbox.send_signal(signal.SIGINT)
        await asyncio.wait_for(sandbox.wait(), 20)


async def test_publish_command_marks_a_project_and_sync_creates_its_entry(
    gateway: Gateway, network: Network, sandbox: PortalSandbox, tmp_path: Path
) -> None:
    business_id, owner = next(iter(network.members.items()))
    project_id = f"p-{uuid.uuid4().hex[:12]}"
    registered = envelope("project.registered", owner, {"project_id": project_id, "title": {"fi": "Kotihoito"}, "owner": owner,
                                                          "status": "planned"})
    assert (await gateway.bus.gate.admit(owner, orjson.dumps(registered), {"content-type": "application/cloudevents+json"})).accepted
    await gateway.settle()
    env = {**os.environ, "COLLABBUS_NATS_URL": gateway.bus.settings.nats_url or "",
               "COLLABBUS_NATS_CREDS": str(gateway.bus.settings.nats_creds),
           "COLLABBUS_DATABASE_URL": gateway.database_url, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"),
           "COLLABBUS_PORTAL_URL": sandbox.url, "COLLABBUS_PORTAL_TOKEN": TOKEN,
           "COLLABBUS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8"}

    async def collabbus(*args: str) -> tuple[int, str, str]:
        done = await acollabbus(*args, env=env)
        return done.returncode, done.stdout, done.stderr

    code, _, stderr = await collabbus("portal", "publish", "no-such-project")
    assert code == 1 and "no project 'no-such-project'" in stderr
    code, stdout, stderr = await collabbus("portal", "publish", project_id, "--type", "practice", "--json")
    assert code == 0, stderr
    marked = json.loads(stdout)
    assert (marked["project_id"], marked["entry_type"], marked["entry_id"]) == (project_id, "practice", None)

    code, stdout, stderr = await collabbus("portal", "sync", "--once", "--json")
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert (summary["published"], summary["registered"], summary["publish_errors"]) == (1, 0, [])
    [entry] = [e for e in sandbox.store.all() if f"collabbus:{project_id}" in e["tags"]]
    assert (entry["type"], entry["title"], entry["status"], entry["organisation"]["business_id"]) == (
        "practice", {"fi": "Kotihoito"}, "draft", business_id)

    code, stdout, _ = await collabbus("portal", "publish", project_id)
    assert code == 0 and f"published as portal entry {entry['id']}" in " ".join(stdout.split())
    code, stdout, stderr = await collabbus("portal", "publications", "--json")
    assert code == 0, stderr
    [listed] = json.loads(stdout)
    assert (listed["project_id"], listed["entry_type"], listed["entry_id"], listed["error"]) == (project_id, "practice", entry["id"], None)
    assert listed["pushed_at"] is not None
    code, stdout, _ = await collabbus("portal", "publications")
    assert code == 0 and project_id in stdout and entry["id"] in stdout
    marked_at = datetime.fromisoformat(listed["marked_at"]).astimezone(timezone.utc)
    assert f"marked {marked_at:%Y-%m-%d %H:%M} UTC" in " ".join(stdout.split())  # in UTC, saying so


async def test_the_sandbox_seeds_only_when_it_is_empty(tmp_path: Path) -> None:
    async def start_and_stop() -> str:
        sandbox = await asyncio.create_subprocess_exec(
            *COLLABBUS, "portal", "sandbox", "--listen", "127.0.0.1:0", "--seed", "3",
            "--data-dir", str(tmp_path / "sandbox"), stderr=asyncio.subprocess.PIPE,
        )
        assert sandbox.stderr is not None
        said: list[str] = []
        try:
            while not said or "Ctrl-C to stop" not in said[-1]:
                line = (await asyncio.wait_for(sandbox.stderr.readline(), 30)).decode()
                assert line, "".join(said)
                said.append(line)
        finally:
            sandbox.send_signal(signal.SIGINT)
            await asyncio.wait_for(sandbox.wait(), 20)
        return "".join(said)

    first = await start_and_stop()
    assert "3 entries" in first and "not seeding" not in first
    again = await start_and_stop()  # a restart keeps what it had and adds nothing
    assert "not seeding" in again and "3 entries" in again


def _env(gateway: Gateway, tmp_path: Path, url: str, token: str = TOKEN) -> dict[str, str]:
    return {**os.environ, "COLLABBUS_NATS_URL": gateway.bus.settings.nats_url or "",
            "COLLABBUS_NATS_CREDS": str(gateway.bus.settings.nats_creds),
            "COLLABBUS_DATABASE_URL": gateway.database_url, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"),
            "COLLABBUS_PORTAL_URL": url, "COLLABBUS_PORTAL_TOKEN": token, "COLLABBUS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8"}


async def test_sync_reports_entries_it_cannot_use_and_exits_0_having_synced_the_rest(
    gateway: Gateway, network: Network, raw_portal: RawPortal, tmp_path: Path
) -> None:
    """Malformed entries and one the gate refuses are rejected, each said as `collabbus publish`
    says a rejection (loc: msg [type]); the pass completes (exit 0) and its first line counts them."""
    env = _env(gateway, tmp_path, raw_portal.url)
    refused_title = entry("plain-title", network.organisations[0], title='"Toimintamalli"', stamp="06")
    raw_portal.list(*malformed_page(network), refused_title)
    done = await acollabbus("portal", "sync", "--once", env=env)
    said = " ".join(done.stdout.split())
    assert done.returncode == 0 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert f"portal sync of {raw_portal.url}: complete; 7 entries rejected" in said, said
    assert "listed 9 entries in 1 page," in said
    assert "rejected entry org-text (malformed_entry) organisation: an organisation is an object {name, business_id}, " \
           "not a string [dict_type]" in said
    assert "rejected entry surrogate (malformed_entry) title.fi: not text: a lone surrogate (\\ud800) at character 0 " \
           "[string_unicode]" in said
    assert "rejected item 4 of page 1 (no id) (malformed_entry) -: an entry is a JSON object, not null [entry_type]" in said
    assert "rejected entry plain-title (invalid) data.title: " in said and "{'loc'" not in said

    done = await acollabbus("portal", "sync", "--once", "--json", "--full", env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["complete"], summary["listed"], len(summary["rejected"])) == (True, 9, 7)


async def test_sync_says_in_one_line_what_the_portal_answered_instead_of_a_page(
    gateway: Gateway, raw_portal: RawPortal, tmp_path: Path
) -> None:
    env = _env(gateway, tmp_path, raw_portal.url)
    raw_portal.page = (200, "text/html", b"<!doctype html><title>Kirjaudu</title>")
    done = await acollabbus("portal", "sync", "--once", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "answered text/html, not JSON, to GET /api/v1/entries" in " ".join(done.stdout.split())
    assert done.stderr.strip() == "", done.stderr
    done = await acollabbus("portal", "sync", "--once", "--json", env=env)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    summary = json.loads(done.stdout)
    assert summary["complete"] is False and "answered text/html, not JSON" in summary["error"]


async def test_a_wrong_token_is_said_once(gateway: Gateway, network: Network, sandbox: PortalSandbox, tmp_path: Path) -> None:
    done = await acollabbus("portal", "sync", "--once", env=_env(gateway, tmp_path, sandbox.url, token="wrong"))
    both = " ".join((done.stdout + done.stderr).split())
    assert done.returncode == 1
    assert both.count("refused the token") == 1 and "COLLABBUS_PORTAL_TOKEN" in both, both
    assert "no later sync" not in both


async def test_the_summary_counts_in_words_and_does_not_call_an_event_in_the_log_emitted(
    gateway: Gateway, network: Network, sandbox: PortalSandbox, tmp_path: Path
) -> None:
    sandbox.store.seed(sample_entries(1, network.organisations))
    env = _env(gateway, tmp_path, sandbox.url)
    done = await acollabbus("portal", "sync", "--once", env=env)
    said = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    assert "listed 1 entry in 1 page," in said and "emitted 1 project.registered, 0 project.updated; unchanged 0" in said

    # As if that pass had been cut short after the log took the event, before it was stored.
    portal = portal_key(sandbox.url)
    with session_scope(gateway.bus.engine) as session:
        for row in session.exec(select(PortalEntry).where(PortalEntry.portal == portal)):
            session.delete(row)
    done = await acollabbus("portal", "sync", "--once", "--full", env=env)
    said = " ".join(done.stdout.split())
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("emitted 0 events (1 project.registered, 0 project.updated, of which 1 was in the log already: "
            "not emitted again); unchanged 0") in said, said


async def test_a_bus_running_the_connector_serves_how_its_passes_go_and_status_shows_them(raw_portal: RawPortal, tmp_path: Path) -> None:
    """``collabbus up`` with a portal: ``/metrics`` says when the sync stops (an answer that is no
    page) and how many entries it rejected, which the alert rules follow, and ``collabbus status``
    says it in words, with why the last pass stopped (they were in the log only)."""
    http = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": http, "COLLABBUS_PORTAL_URL": raw_portal.url, "COLLABBUS_PORTAL_TOKEN": TOKEN,
           "COLLABBUS_PORTAL_INTERVAL": "0.3", "COLLABBUS_WEBHOOK_ALLOW_NETWORKS": "127.0.0.0/8", "COLLABBUS_GATE_PROCESSES": "0"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_NATS_CREDS", "COLLABBUS_DATABASE_URL"):
        env.pop(name, None)
    raw_portal.page = (200, "text/html", b"<html>Kirjaudu</html>")  # a login page: every pass stops
    up = spawn("up", env=env)
    said: list[str] = []  # (read as it comes: a pipe nobody reads would stop the bus once full)
    reading = threading.Thread(target=lambda: said.extend(iter(up.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reading.start()
    try:
        async with asyncio.timeout(60):
            while not any("is up" in line for line in said):
                assert reading.is_alive() or any("is up" in line for line in said), "collabbus up exited: " + "".join(said)
                await asyncio.sleep(0.05)

        async def scraped(client: httpx.AsyncClient, until: Any) -> dict[str, float]:
            for _ in range(200):
                text = (await client.get("/metrics")).text
                found = {(s.name + "".join(f"{{{v}}}" for v in s.labels.values())): s.value
                         for family in text_string_to_metric_families(text) for s in family.samples if "portal" in s.name}
                if until(found):
                    return found
                await asyncio.sleep(0.1)
            raise AssertionError(f"/metrics never said so: {found}")

        async with httpx.AsyncClient(base_url=f"http://{http}") as client:
            stopped = await scraped(client, lambda m: m.get("collabbus_portal_sync_passes_total{stopped}", 0) >= 1)
            assert stopped["collabbus_portal_sync_stopped"] == 1 and stopped["collabbus_portal_sync_passes_total{complete}"] == 0
            assert "collabbus_portal_sync_last_complete_timestamp_seconds" not in stopped
            where = raw_portal.url.removeprefix("http://")
            for _ in range(100):  # (the bus writes its state for other processes every second)
                if "the last pass, at" in (shown := await acollabbus("status", env=env)).stdout:
                    break
                await asyncio.sleep(0.2)
            said_now = " ".join(shown.stdout.split())
            assert shown.returncode == 0, shown.stdout + shown.stderr
            assert (f"portal sync ({where}): the last pass, at " in said_now and f", stopped: the portal at {where} answered "
                    "text/html, not JSON, to GET /api/v1/entries" in said_now and "the last complete pass: none yet" in said_now), said_now
            reported = orjson.loads((await acollabbus("status", "--json", env=env)).stdout)["portal"]
            assert reported["portal"] == where and reported["last_stopped"] is True and reported["complete"] == 0
            assert reported["stopped"] >= 1 and "answered text/html" in reported["last_error"] and reported["last_complete_at"] is None
            raw_portal.list(entry("no-org", "Esimerkki ry"), b"null")  # a page again, with two entries it cannot read
            complete = await scraped(client, lambda m: m.get("collabbus_portal_sync_passes_total{complete}", 0) >= 1)
            assert complete["collabbus_portal_sync_stopped"] == 0 and complete["collabbus_portal_entries_rejected_total"] >= 2
            assert complete["collabbus_portal_sync_last_complete_timestamp_seconds"] > 0
            for _ in range(100):  # (the bus writes its state for other processes every second)
                report = orjson.loads((await acollabbus("status", "--json", env=env)).stdout)
                if (reported := report["portal"])["complete"] >= 1:
                    break
                await asyncio.sleep(0.2)
            assert reported["complete"] >= 1 and reported["rejected"] >= 2 and reported["last_complete_at"] is not None
            if not reported["last_stopped"]:  # (a pass may have begun since; its own report is the state)
                assert reported["last_error"] is None and reported["last_rejected"] == 2
            [stored] = report["database"]["portals"]
            assert stored["portal"] == portal_key(raw_portal.url) and stored["reading"] is False and stored["entries"] == 0
            said_now = " ".join((await acollabbus("status", env=env)).stdout.split())
            assert f"portal {portal_key(raw_portal.url)}: 0 entries synced" in said_now and "entries rejected" in said_now, said_now
    finally:
        up.send_signal(signal.SIGINT)
        await asyncio.to_thread(up.wait, 30)
    assert up.returncode == 0
