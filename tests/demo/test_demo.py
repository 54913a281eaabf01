"""``collabbus up --demo`` and ``collabbus demo`` as an operator runs them, checked through the read API.

The module's bus is ``collabbus up --demo`` in its own process (embedded nats-server, SQLite, the
HTTP gateway, all on free ports): it loads the demo network once. The tests read what happened
from the HTTP read API, run ``collabbus demo`` again and restart the bus to see nothing change.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from bus.client import offer
from bus.connection import embedded_bus_creds
from bus.credentials import BUS_INBOX_PREFIX
from bus.server import free_port
from bus.streams import EVENTS_STREAM
from handlers import tokens
from handlers.db import make_engine, session_scope
from ops import demo_data as d
from ops.settings import Settings
from tests.commands import Command, acollabbus, spawn

CRITERIA = ("novelty", "effectiveness", "user_involvement", "transferability", "sustainability", "equity")


async def collabbus(*args: str, env: dict[str, str], timeout: float = 45) -> tuple[int, str, str]:
    """Run the command line in its own process."""
    done = await acollabbus(*args, env=env, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


@dataclass
class Up:
    """A running ``collabbus up --demo``: what it printed, and ways to read its state."""

    env: dict[str, str]
    proc: Command
    stdout: Path
    stderr: list[str] = field(default_factory=list)
    """What it said on stderr until it was up (:meth:`start`)."""
    said: list[str] = field(default_factory=list)
    """What it has said on stderr, read as it comes (a pipe nobody reads would stop the bus once full)."""
    reading: threading.Thread | None = None

    @classmethod
    async def start(cls, env: dict[str, str], stdout: Path, until: str, timeout: float = 45) -> "Up":
        with stdout.open("wb") as out:
            proc = spawn("up", "--demo", env=env, stdout=out)
        up = cls(env, proc, stdout)
        assert proc.stderr is not None
        up.reading = reading = threading.Thread(target=lambda: up.said.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
        reading.start()
        try:
            async with asyncio.timeout(timeout):
                while not any(until in line for line in up.said):
                    assert reading.is_alive() or any(until in line for line in up.said), "collabbus up --demo exited: " + "".join(up.said)
                    await asyncio.sleep(0.05)
        except BaseException:
            await up.stop()
            raise
        up.stderr = list(up.said)
        return up

    async def stop(self) -> str:
        """Ctrl-C; the rest of what it said on stderr."""
        if self.proc.poll() is not None:
            return ""
        self.proc.send_signal(signal.SIGINT)
        await asyncio.to_thread(self.proc.wait, 30)
        if self.reading is not None:
            await asyncio.to_thread(self.reading.join, 10)  # (to the pipe's end)
        return "".join(self.said[len(self.stderr):])

    @property
    def printed(self) -> str:
        return self.stdout.read_text(encoding="utf-8")


@dataclass
class DemoBus:
    up: Up
    client: httpx.AsyncClient
    engine: Any
    first: Up
    """The start that loaded the demo network (``up`` is the running one: a test may restart it)."""

    @property
    def env(self) -> dict[str, str]:
        return self.up.env

    @property
    def bus_creds(self) -> str:
        """The running bus's own NATS credentials (its embedded server authenticates everyone)."""
        return str(embedded_bus_creds(Settings(data_dir=Path(self.env["COLLABBUS_DATA_DIR"]))))

    def token(self, institution: str = "operator") -> str:
        """A token, as ``collabbus institutions token`` issues it."""
        with session_scope(self.engine) as session:
            return tokens.issue(session, institution)

    async def get(self, path: str, as_: str = "operator", **params: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.token(as_)}"}
        response = await self.client.get(path, params=params, headers=headers)
        assert response.status_code == 200, response.text
        return response.json()

    async def log_length(self) -> int:
        nc = await nats.connect(f"nats://{self.env['COLLABBUS_NATS_LISTEN']}", user_credentials=self.bus_creds,
                                inbox_prefix=BUS_INBOX_PREFIX)
        try:
            return (await nc.jetstream().stream_info(EVENTS_STREAM)).state.messages
        finally:
            await nc.close()


@pytest.fixture(scope="module")
async def demo_bus(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[DemoBus]:
    data_dir = tmp_path_factory.mktemp("demo")
    http = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(data_dir), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": http, "COLUMNS": "200"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_DATABASE_URL", "COLLABBUS_OPERATOR"):
        env.pop(name, None)
    up = await Up.start(env, data_dir / "up.out", until="demo network")
    engine = make_engine(f"sqlite:///{data_dir / 'collabbus.db'}")
    bus: DemoBus | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://{http}", timeout=30) as client:
            bus = DemoBus(up, client, engine, first=up)
            yield bus
    finally:
        engine.dispose()
        running = bus.up if bus is not None else up  # a test may have restarted it
        rest = await running.stop()
        assert running.proc.returncode in (0, None), "".join(running.stderr) + rest


async def test_up_with_demo_loads_the_network_and_prints_what_happened(demo_bus: DemoBus) -> None:
    assert any("demo network loaded" in line for line in demo_bus.first.stderr), "".join(demo_bus.first.stderr)
    printed = demo_bus.first.printed
    plan = d.Plan("operator")
    offered = sum(isinstance(step, d.Offer) for step in plan.opening() + plan.timed(datetime.now(timezone.utc)))
    assert f"{offered} events offered" in printed and f"{offered} accepted (0 duplicates), 0 refused" in printed
    for shown in ("Open calls", "after_deadline", "promoted from the waitlist", "Mahalle Mutfakları", "illustrative",
                  "validated", "Proposed meetings", "/docs", "/innovation-days.ics"):
        assert shown in printed, shown


async def test_adoptions_spread_to_6_metropolitan_2_provincial_and_9_district_municipalities(demo_bus: DemoBus) -> None:
    stats = await demo_bus.get("/stats/adoptions", owner=d.MERSIN)
    by_level = {level["municipality_level"]: level for level in stats["by_municipality_level"]}
    spread = {level: by_level[level]["municipalities"] for level in by_level}
    assert spread == {"metropolitan": 6, "provincial": 2, "district": 9}
    assert sum(level["adoptions"] for level in by_level.values()) >= 30
    # With the support given, as the projects show it; and the levels are the members' own.
    mahalle = await demo_bus.get("/projects/mersin-mahalle-mutfaklari")
    assert mahalle["service_model"] == "neighbourhood_based" and mahalle["adoptions"]
    assert {"presentation", "technical_support", "study_visit"} <= {s for a in mahalle["adoptions"] for s in a["support"]}
    assert (await demo_bus.get("/projects/mersin-evde-yasli-destek"))["service_model"] == "home_based"


def rule(reviews: list[dict[str, Any]]) -> tuple[str, int, dict[str, float]]:
    """CONTRACT §5, restated: validated when every median is ≥ 3 and most recommend validate;
    not_validated when a median is < 2 or most recommend reject; otherwise needs_revision."""
    medians = {c: float(statistics.median(r["scores"][c] for r in reviews)) for c in CRITERIA}

    def most(recommendation: str) -> bool:
        return 2 * sum(r["recommendation"] == recommendation for r in reviews) > len(reviews)

    if all(m >= 3 for m in medians.values()) and most("validate"):
        outcome = "validated"
    elif any(m < 2 for m in medians.values()) or most("reject"):
        outcome = "not_validated"
    else:
        outcome = "needs_revision"
    return outcome, int(statistics.median(r["evidence_level"] for r in reviews) // 1), medians


async def test_the_validation_is_decided_by_the_rule_applied_to_its_reviews(demo_bus: DemoBus) -> None:
    validation = await demo_bus.get(f"/validations/{d.VALIDATION}", as_=d.SILTA)
    assert validation["status"] == "decided" and validation["decided_by"] == "rule"
    assert validation["coordinator"] == d.COMPETENCE_CENTRE
    assert {r["reviewer"] for r in validation["reviewers"]} == {d.LUT, d.DIAK}
    assert len(validation["reviews"]) == validation["quorum"] == 2
    outcome, evidence, medians = rule(validation["reviews"])
    assert (validation["outcome"], validation["evidence_level"], validation["median_scores"]) == (outcome, evidence, medians)
    # A reviewer asked for more information and the requester answered, before the reviews.
    [info] = validation["info_requests"]
    assert info["asked_by"] == d.LUT and info["answers"]
    course = [item["event"]["type"] for item in (await demo_bus.get("/events", as_=d.SILTA, subject=d.VALIDATION, limit=500))["items"]]
    assert course == ["validation.requested", "validation.reviewer_assigned", "validation.reviewer_assigned",
                      "validation.info_requested", "validation.info_provided", "validation.review_submitted",
                      "validation.review_submitted", "validation.decided"]


async def test_the_social_innovation_day_is_full_with_a_waitlist_a_promotion_and_meetings(demo_bus: DemoBus) -> None:
    day = await demo_bus.get(f"/innovation-days/{d.SI_DAY}")
    assert day["starts_at"][5:7] == "11"  # November
    assert day["confirmed"] == day["capacity"]  # a full house, never more
    assert day["waitlisted"] == [] and day["seats_left"] == 0  # the deadline passed: the waitlist is closed
    listed = (await demo_bus.get(f"/innovation-days/{d.SI_DAY}/registrations", limit=500))["items"]
    registrations = {r["participant"]: r for r in listed}
    for waited in (d.SOSYOKENT, d.SOSTE):  # still waiting at the deadline: told that no seat came free
        assert (registrations[waited]["status"], registrations[waited]["reason"]["code"]) == ("rejected", "waitlist_closed")
    assert registrations[d.DIAK]["status"] == "cancelled"
    assert registrations[d.KUNTOUTUSSAATIO]["status"] == "confirmed"
    # The promotion, as the log tells it: waitlisted first, confirmed because Diak cancelled.
    log = [item["event"] for item in (await demo_bus.get("/events", type="innovation_day", subject=d.SI_DAY, limit=500))["items"]]
    promoted = f"reg-{d.SI_DAY}-{d.KUNTOUTUSSAATIO}"
    answers = [(e["type"], e.get("causationid")) for e in log if e["data"].get("registration_id") == promoted]
    requested = f"demo-innovation_day.registration_requested-{promoted}"
    assert answers[1:] == [("innovation_day.registration_waitlisted", requested),
                           ("innovation_day.registration_confirmed", d.COMPLETION.event["id"])]
    meetings = (await demo_bus.get(f"/innovation-days/{d.SI_DAY}/meetings", limit=500))["items"]
    assert meetings and all(m["funder"] in (d.STEA, d.ESF_FUND) and m["shared_themes"] for m in meetings)
    training = await demo_bus.get(f"/innovation-days/{d.TRAINING}")
    assert training["format"] == "training" and training["organizer"] == d.GENC_ISI and training["confirmed"] > 0


async def test_the_late_application_is_refused_after_the_deadline(demo_bus: DemoBus) -> None:
    log = [item["event"] for item in (await demo_bus.get("/events", as_=d.ESF_FUND, type="call", subject=d.ESF_CALL, limit=500))["items"]]
    rejected = {e["data"]["application_id"]: e["data"]["reason"]["code"]
                for e in log if e["type"] == "call.application_rejected"}
    received = {e["data"]["application_id"] for e in log if e["type"] == "call.application_received"}
    assert rejected == {d.LATE_APPLICATION: "after_deadline"}
    assert received == {"app-esf-genc-isi", "app-esf-mersin-bb", "app-esf-diak"}
    call = await demo_bus.get(f"/calls/{d.ESF_CALL}")
    assert call["status"] == "closed" and call["closed_reason"] == "deadline_passed"
    assert {c["call_id"] for c in (await demo_bus.get("/calls", status="open", limit=500))["items"]} == {
        "sosyokent-lab-partnership", "fi-si-validation-pilot"}


def _texts(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, sort_keys=True).encode("utf-8")


async def test_every_text_survives_byte_for_byte(demo_bus: DemoBus) -> None:
    plan = d.Plan("operator")
    offers = [s for s in plan.opening() + plan.timed(datetime.now(timezone.utc)) if isinstance(s, d.Offer)]
    sent = [o.event for o in offers]
    everything = _texts([e["data"] for e in sent]).decode()
    assert "İ" in everything and "ı" in everything and "ğ" in everything and "ä" in everything
    members = {m["id"]: m for m in (await demo_bus.get("/institutions", limit=500))["items"]}
    checked = 0
    for event in sent:
        data = event["data"]
        if event["type"] == "institution.joined":
            got = members[data["id"]]
            assert _texts([got["name"], got.get("region")]) == _texts([data["name"], data.get("region")])
        elif event["type"] == "project.registered":
            got = await demo_bus.get(f"/projects/{data['project_id']}")
            assert _texts([got["title"], got["summary"]]) == _texts([data["title"], data["summary"]])
        elif event["type"] == "call.published":
            got = await demo_bus.get(f"/calls/{data['call_id']}")
            assert _texts([got["title"], got["summary"]]) == _texts([data["title"], data["summary"]])
        elif event["type"] == "innovation_day.scheduled":
            got = await demo_bus.get(f"/innovation-days/{data['day_id']}")
            expected = [data["title"], data["summary"], data.get("venue")]
            assert _texts([got["title"], got["summary"], got["venue"]]) == _texts(expected)
        else:
            continue
        checked += 1
    assert checked == len(d.MEMBERS) + len(d.PROJECTS) + 1 + 3 + 3  # + the practice, the calls, the gatherings
    arabic = (await demo_bus.get(f"/projects/{d.AMMAN_PROGRAMME['project_id']}"))["summary"]["ar"]
    assert arabic.encode("utf-8") == d.AMMAN_PROGRAMME["summary"]["ar"].encode("utf-8") and "الابتكار" in arabic
    validation = await demo_bus.get(f"/validations/{d.VALIDATION}", as_=d.SILTA)
    requested = next(e for e in sent if e["type"] == "validation.requested")["data"]
    assert _texts(validation["self_assessment"]["statement"]) == _texts(requested["self_assessment"]["statement"])


async def test_running_the_demo_again_changes_nothing_and_prints_the_same(demo_bus: DemoBus) -> None:
    before = await demo_bus.log_length()
    code, stdout, stderr = await collabbus("demo", "--json", env=demo_bus.env)
    assert code == 0, stderr
    again = json.loads(stdout)
    assert again["status"] == "already_loaded" and again["published"] is None
    assert await demo_bus.log_length() == before
    # The summary is read back from the read API: the same answers the tests above got.
    spread = [(lvl["municipality_level"], lvl["municipalities"], len(lvl["names"]))
              for lvl in again["adoptions"]["by_municipality_level"]]
    assert spread == [("metropolitan", 6, 6), ("provincial", 2, 2), ("district", 9, 9)]
    assert again["adoptions"]["total"] >= 30 and "illustrative" in again["adoptions"]["illustrative"]
    assert again["validation"]["outcome"] == rule(again["validation"]["reviews"])[0]
    day = again["innovation_day"]
    assert day["confirmed"] <= day["capacity"] and day["meetings"]
    assert [r["participant"] for r in day["registrations"] if r["promoted"]] == [d.KUNTOUTUSSAATIO]
    [late] = [a for a in again["calls"]["esf"]["applications"] if a["outcome"] == "rejected"]
    assert (late["application_id"], late["reason"]) == (d.LATE_APPLICATION, "after_deadline")
    outcomes = {a["application_id"]: (a["outcome"], a["awarded_amount"]) for a in again["calls"]["esf"]["applications"]}
    assert outcomes["app-esf-genc-isi"] == ("awarded", {"amount": "200000.00", "currency": "EUR"})
    assert outcomes["app-esf-diak"] == ("declined", None) and outcomes["app-esf-mersin-bb"] == ("received", None)
    funded = await demo_bus.get(f"/calls/{d.ESF_CALL}/applications/app-esf-genc-isi", as_=d.GENC_ISI)  # a two-stage call
    assert funded["invited_at"] is not None and funded["full_proposal"]["requested_amount"]["amount"] == "220000.00"
    # The ids are deterministic: offered once more, an event is a duplicate of what the log holds.
    nc = await nats.connect(f"nats://{demo_bus.env['COLLABBUS_NATS_LISTEN']}", user_credentials=demo_bus.bus_creds,
                             inbox_prefix=BUS_INBOX_PREFIX)
    try:
        first = d.Plan("operator").opening()[0]
        assert isinstance(first, d.Offer)
        verdict = await offer(nc, first.institution, first.event)
    finally:
        await nc.close()
    assert verdict.accepted and verdict.duplicate
    assert await demo_bus.log_length() == before


async def test_up_with_demo_loads_the_network_once_per_data_dir(demo_bus: DemoBus) -> None:
    before = await demo_bus.log_length()
    rest = await demo_bus.up.stop()
    assert demo_bus.up.proc.returncode == 0, rest
    again = await Up.start(demo_bus.env, demo_bus.up.stdout.with_name("up-again.out"), until="demo network")
    demo_bus.up = again  # the fixture stops it
    assert any("already loaded" in line for line in again.stderr), "".join(again.stderr)
    assert await demo_bus.log_length() == before
