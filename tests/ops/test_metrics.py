"""``/metrics``: Prometheus text whose counters move as events are offered, rejected and fail, and
whose consumer lag follows a stopped consumer."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bus.client import offer
from bus.runtime import Bus
from bus.server import EmbeddedNats, free_port
from connectors.http.app import create_app
from connectors.portal.connector import Passes
from connectors.webhooks import store
from handlers import tokens
from handlers.db import session_scope
from handlers.network import Network, Routes
from tests.bus.test_consumer import FIXTURE, Recorder, project_event, start_bus, wait_for
from ops.settings import Settings
from ops.tracing import Tracing
from tests.conftest import OPERATOR, join, load_fixtures, unique
from tests.ops.conftest import Poisoned

ALERT_RULES = Path(__file__).parents[2] / "ops" / "prometheus-alerts.yml"
DASHBOARD = Path(__file__).parents[2] / "ops" / "grafana-dashboard.json"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Scrape = Callable[[], Awaitable[Samples]]
MEMBER = FIXTURE["as"]


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def scrape(poisoned: Poisoned) -> AsyncIterator[Scrape]:
    transport = httpx.ASGITransport(app=create_app(poisoned.bus))
    async with httpx.AsyncClient(transport=transport, base_url="http://bus") as client:

        async def read() -> Samples:
            response = await client.get("/metrics")
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
            return {
                (s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(response.text) for s in family.samples
            }

        yield read


async def test_counters_move_with_offers_rejections_and_failures(poisoned: Poisoned, scrape: Scrape) -> None:
    bus, nc = poisoned.bus, poisoned.nc
    before = await scrape()
    for event in (project_event("m-1"), project_event("m-2"), project_event("poison-a")):
        assert (await offer(nc, MEMBER, event)).accepted
    invalid = project_event("m-3")
    del invalid["data"]["title"]
    assert not (await offer(nc, MEMBER, invalid)).accepted
    stranger = copy.deepcopy(project_event("m-4"))
    stranger["source"] = "/institutions/x-nobody"
    assert (await offer(nc, "x-nobody", stranger)).reason == "forbidden"
    await wait_for(lambda: "m-2" in poisoned.recorder.seen and bus.consumer is not None and bus.consumer.dead_lettered == 1)
    after = await scrape()

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    registered = {"type": "project.registered"}
    assert moved("collabbus_events_offered_total", institution=MEMBER, **registered) == 4
    assert moved("collabbus_events_accepted_total", institution=MEMBER, **registered) == 3
    assert moved("collabbus_events_rejected_total", institution=MEMBER, reason="invalid", **registered) == 1
    assert moved("collabbus_events_rejected_total", institution="other", reason="forbidden", **registered) == 1
    assert moved("collabbus_handler_duration_seconds_count", **registered) == 2  # the poison event never completed
    assert sample(after, "collabbus_dead_letters", consumer="network") == 1
    assert (sample(before, "collabbus_set_aside", consumer="network"), sample(after, "collabbus_set_aside", consumer="network")) == (0, 1)
    webhooks = ("collabbus_set_aside", frozenset({"consumer": "webhooks"}.items()))
    assert after.get(webhooks) == 0  # served, as zero, for each consumer that sets things aside
    assert sample(after, "collabbus_log_last_seq") == 5


async def test_offers_of_confidential_types_are_counted_without_their_member(poisoned: Poisoned, scrape: Scrape) -> None:
    """``/metrics`` answers without a token: which members applied to a call or reviewed is not in it."""
    application = copy.deepcopy(load_fixtures()["call.application_submitted"]["event"])
    application["id"] = unique("ev")
    application["source"] = f"/institutions/{MEMBER}"
    before = await scrape()
    await offer(poisoned.nc, MEMBER, application)  # judged whatever the verdict: a member's offer of the type
    await offer(poisoned.nc, MEMBER, project_event("counted-by-member"))
    after = await scrape()

    def moved(name: str, **labels: str) -> float:
        return sample(after, name, **labels) - sample(before, name, **labels)

    submitted = {"type": "call.application_submitted"}
    assert moved("collabbus_events_offered_total", institution="confidential", **submitted) == 1
    assert not any(name.startswith("collabbus_events_") and dict(labels).get("institution") == MEMBER
                   and dict(labels).get("type") == "call.application_submitted" for name, labels in after)
    assert moved("collabbus_events_offered_total", institution=MEMBER, type="project.registered") == 1


async def test_the_timers_are_timed_each_time_they_run(poisoned: Poisoned, scrape: Scrape) -> None:
    """The timers run every second holding the bus's events back: each run is in a histogram."""
    count = "collabbus_timers_duration_seconds_count"
    # They act once the bus knows how far it has applied the log: an event, then they run.
    assert (await offer(poisoned.nc, MEMBER, project_event("timed"))).accepted
    deadline = asyncio.get_running_loop().time() + 10
    while (before := sample(await scrape(), count)) < 1:
        assert asyncio.get_running_loop().time() < deadline, "the timers never ran"
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.2)
    samples = await scrape()
    assert sample(samples, count) >= before + 2
    assert sample(samples, "collabbus_timers_duration_seconds_sum") > 0
    assert sample(samples, "collabbus_timers_duration_seconds_bucket", le="+Inf") == sample(samples, count)


async def test_consumer_lag_follows_a_stopped_consumer(poisoned: Poisoned, scrape: Scrape) -> None:
    bus = poisoned.bus
    assert bus.consumer is not None
    await bus.consumer.stop()
    for i in range(3):
        assert (await offer(poisoned.nc, MEMBER, project_event(f"lag-{i}"))).accepted
    stopped = await scrape()
    assert sample(stopped, "collabbus_consumer_lag", consumer="network") == 3
    assert sample(stopped, "collabbus_consumer_pending", consumer="network") == 3

    await bus.consumer.start()
    deadline = asyncio.get_running_loop().time() + 20
    while sample(await scrape(), "collabbus_consumer_lag", consumer="network") != 0:
        assert asyncio.get_running_loop().time() < deadline, "the consumer did not catch up"
        await asyncio.sleep(0.05)
    assert poisoned.recorder.seen[-3:] == ["lag-0", "lag-1", "lag-2"]


async def test_a_consumer_retrying_an_event_is_a_series_until_it_gives_up(tmp_path: Path, server: EmbeddedNats) -> None:
    """While the read models' consumer waits to try a failing event again (the events after it
    waiting), ``collabbus_consumer_retrying`` is 1 for it; 0 once the event is dead-lettered."""
    recorder = Recorder()
    recorder.poison.add("poison-slow")
    bus = await start_bus(tmp_path, server, lambda: Network(Routes().add(projections={"project.registered": recorder})),
                          max_deliver=2, backoff=(2.0,))
    nc = await nats.connect(server.url, **server.connect_options())
    transport = httpx.ASGITransport(app=create_app(bus))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bus") as client:
            async def retrying() -> dict[str, float]:
                text = (await client.get("/metrics")).text
                return {s.labels["consumer"]: s.value for family in text_string_to_metric_families(text)
                        for s in family.samples if s.name == "collabbus_consumer_retrying"}

            await join(nc, FIXTURE["as"], FIXTURE["kind"])
            await wait_for(lambda: bus.consumer is not None and bus.consumer.applied >= 1)
            assert await retrying() == {"network": 0, "webhooks": 0}
            assert (await offer(nc, MEMBER, project_event("poison-slow"))).accepted
            await wait_for(lambda: bus.consumer is not None and bus.consumer.retrying is not None)
            assert await retrying() == {"network": 1, "webhooks": 0}
            await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
            assert await retrying() == {"network": 0, "webhooks": 0}
    finally:
        await nc.close()
        await bus.stop()


def attempts_to_endpoint(engine: Any, url: str, event_id: str, status_codes: tuple[int | None, ...]) -> tuple[str, int]:
    """An endpoint with one delivery that had attempts answered with ``status_codes``: (its id, the delivery's)."""
    now = datetime.now(timezone.utc)
    with session_scope(engine) as session:
        endpoint = store.create_endpoint(session, MEMBER, url, [], "", after_seq=0, now=now)
        session.flush()
        delivery = store.Delivery(endpoint_id=endpoint.id, event_id=event_id, event_type="project.registered", seq=1, created_at=now)
        session.add(delivery)
        session.flush()
        assert delivery.id is not None
        for status_code in status_codes:
            session.add(store.Attempt(delivery_id=delivery.id, attempted_at=now, status_code=status_code))
        return endpoint.id, delivery.id


async def test_webhook_attempts_by_outcome(poisoned: Poisoned, scrape: Scrape) -> None:
    engine = poisoned.bus.engine
    endpoint_id, delivery_id = attempts_to_endpoint(engine, "https://example.org/hook", "e-1", (200, 204, 500, None))

    async def counts() -> dict[str, float]:
        samples = await scrape()
        return {o: sample(samples, "collabbus_webhook_attempts_total", outcome=o) for o in ("delivered", "failed", "error")}

    assert await counts() == {"delivered": 2, "failed": 1, "error": 1}

    # Later scrapes add what was recorded since; an endpoint deleted with its attempts leaves the
    # counter as it was (a counter never goes down), and attempts recorded after it still count.
    with session_scope(engine) as session:
        session.add(store.Attempt(delivery_id=delivery_id, attempted_at=datetime.now(timezone.utc), status_code=503))
    assert await counts() == {"delivered": 2, "failed": 2, "error": 1}
    with session_scope(engine) as session:
        gone = session.get(store.Endpoint, endpoint_id)
        assert gone is not None
        store.delete_endpoint(session, gone)
    assert await counts() == {"delivered": 2, "failed": 2, "error": 1}
    attempts_to_endpoint(engine, "https://example.org/other", "e-2", (200,))
    assert await counts() == {"delivered": 3, "failed": 2, "error": 1}


def series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of ``name``, by its labels."""
    return {labels: value for (sample_name, labels), value in samples.items() if sample_name == name}


def failing_and_disabled_endpoints(engine: Any, now: datetime) -> dict[str, str]:
    """Four endpoints of ``MEMBER`` — delivering, failing for two hours, disabled on a 410 and by
    its owner half an hour ago — with deliveries owed to two of them: their ids by what they are."""
    later = datetime(2099, 1, 1, tzinfo=timezone.utc)  # (owed, not due: nothing is attempted meanwhile)
    with session_scope(engine) as session:
        made = {name: store.create_endpoint(session, MEMBER, f"https://example.org/{name}?token=s3cret", [], "",
                                            after_seq=10**6, now=now) for name in ("fine", "failing", "gone", "mine")}
        made["failing"].failing_since = now - timedelta(hours=2)
        made["gone"].failing_since = now - timedelta(minutes=31)
        store.disable(made["gone"], store.GONE_REASON, now - timedelta(minutes=30), after_seq=10**6)
        store.disable(made["mine"], store.OWNER_REASON, now - timedelta(minutes=30), after_seq=10**6)
        session.flush()
        for name, event_id, next_at in (("failing", "e-1", later), ("failing", "e-2", later), ("gone", "e-1", later),
                                        ("fine", "e-1", None)):
            session.add(store.Delivery(endpoint_id=made[name].id, event_id=event_id, event_type="project.registered", seq=1,
                                       next_attempt_at=next_at, created_at=now))
        return {name: endpoint.id for name, endpoint in made.items()}


async def test_webhook_endpoints_by_state_with_the_failing_and_disabled_ones_named(poisoned: Poisoned, scrape: Scrape) -> None:
    """A dead endpoint makes hardly any attempts once its retries are hours apart: what an alert
    needs is its state, served per endpoint (by id, never by URL) while it fails or is disabled."""
    now = datetime.now(timezone.utc)
    ids = failing_and_disabled_endpoints(poisoned.bus.engine, now)
    samples = await scrape()

    def labels(name: str, **more: str) -> frozenset[tuple[str, str]]:
        return frozenset({"endpoint": ids[name], "institution": MEMBER, **more}.items())

    states = {state: sample(samples, "collabbus_webhook_endpoints", state=state) for state in ("enabled", "failing", "disabled")}
    assert states == {"enabled": 1, "failing": 1, "disabled": 2}
    failing = series(samples, "collabbus_webhook_endpoint_failing_since_timestamp_seconds")
    assert failing == {labels("failing"): pytest.approx((now - timedelta(hours=2)).timestamp(), abs=0.01)}
    disabled = series(samples, "collabbus_webhook_endpoint_disabled_timestamp_seconds")
    at = pytest.approx((now - timedelta(minutes=30)).timestamp(), abs=0.01)
    assert disabled == {labels("gone", reason="gone"): at, labels("mine", reason="owner"): at}
    owed = series(samples, "collabbus_webhook_owed")
    assert owed == {labels("fine"): 0, labels("failing"): 2, labels("gone"): 1, labels("mine"): 0}
    assert not any("example.org" in value for _, found in samples for _, value in found)


async def test_the_background_checkpoints_of_the_sqlite_files_are_counted_with_their_logs_size(poisoned: Poisoned, scrape: Scrape) -> None:
    checkpointers = {c.path.name: c for c in poisoned.bus.checkpointers}
    assert set(checkpointers) == {"collabbus.db", "traces.db"}
    verdict = await offer(poisoned.nc, MEMBER, project_event("checkpointed"))
    assert verdict.accepted
    await wait_for(lambda: all(c.checkpoints > 0 for c in checkpointers.values()))
    samples = await scrape()
    for name, checkpointer in checkpointers.items():
        assert sample(samples, "collabbus_sqlite_checkpoints_total", database=name) >= 1, name
        logged = int(sample(samples, "collabbus_sqlite_wal_bytes", database=name))
        assert logged > 32 and (logged - 32) % (24 + 4096) == 0, (name, logged)  # a write-ahead log: a header, then frames


def dashboard_queries() -> list[str]:
    """The PromQL of every query of ``ops/grafana-dashboard.json``."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]


def test_the_shipped_dashboard_is_whole() -> None:
    """``ops/grafana-dashboard.json``: every panel queries the dashboard's Prometheus data source,
    panels do not overlap, and a legend names only labels its query keeps."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        box = panel["gridPos"]
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}" and panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and "collabbus_" in target["expr"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            kept = {label.strip() for group in re.findall(r"\bby \(([^)]*)\)", target["expr"]) for label in group.split(",")}
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in kept, (panel["title"], label, target["expr"])


def test_a_members_access_expiry_is_when_the_last_of_its_valid_ones_expires(tmp_path: Path) -> None:
    """``collabbus_access_expires_timestamp_seconds``: per member and kind, the latest expiry of its
    valid tokens or NATS credentials; none for a member holding one valid until revoked."""
    import time

    from bus.credentials import Authority
    from handlers.db import make_engine, migrate
    from ops.metrics import access_expiries, exposition

    engine = make_engine(f"sqlite:///{tmp_path / 'read.db'}")
    migrate(engine)
    authority = Authority.load_or_create(tmp_path / "auth")
    with session_scope(engine) as session:
        soon, later = timedelta(days=2), timedelta(days=5)
        tokens.issue(session, "fi-diak", valid_for=soon)
        tokens.issue(session, "fi-diak", valid_for=later)
        tokens.issue(session, "fi-thl", valid_for=soon)
        tokens.issue(session, "fi-thl")  # valid until revoked: no expiry for fi-thl
        revoked = tokens.issue(session, "fi-lut")
        tokens.issue(session, "fi-lut", valid_for=soon)
    with session_scope(engine) as session:
        assert tokens.revoke(session, revoked)  # (its never-expiring one is revoked: fi-lut's access ends in 2 days)
    now = time.time()
    authority.member_creds("fi-diak", expires=int(now) + 3600)
    authority.member_creds("fi-thl", expires=int(now) + 3600)
    authority.member_creds("fi-thl")
    try:
        found = access_expiries(engine, authority)
    finally:
        engine.dispose()
    assert set(found) == {("fi-diak", "token"), ("fi-lut", "token"), ("fi-diak", "nats")}
    assert abs(found[("fi-diak", "token")] - (now + later.total_seconds())) < 60
    assert abs(found[("fi-lut", "token")] - (now + soon.total_seconds())) < 60
    assert found[("fi-diak", "nats")] == int(now) + 3600
    text = exposition(None, None, expiries=found).decode()
    assert 'collabbus_access_expires_timestamp_seconds{institution="fi-diak",kind="nats"}' in text


async def test_every_metric_the_shipped_alert_rules_and_dashboard_use_is_served(server: EmbeddedNats, tmp_path: Path) -> None:
    """``ops/prometheus-alerts.yml`` and ``ops/grafana-dashboard.json`` name only series a bus
    serves: a full bus (read models, gateway, a gatekeeper process) scraped over its HTTP socket."""
    rules = yaml.safe_load(ALERT_RULES.read_text(encoding="utf-8"))
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert alerts and all(rule["alert"].startswith("Collabbus") and rule["annotations"]["summary"] for rule in alerts)
    used = {name for rule in alerts for name in re.findall(r"\bcollabbus_[a-z_]+", rule["expr"])}
    charted = {name for query in dashboard_queries() for name in re.findall(r"\bcollabbus_[a-z_]+", query)}
    settings = Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, operator=OPERATOR,
                        http=f"127.0.0.1:{free_port()}", gate_processes=1)
    bus = Bus(settings, tracing=Tracing.off())
    await bus.start()
    try:
        await bus.start_gatekeepers()
        await bus.start_http()
        with session_scope(bus.engine) as session:  # (a member's access expiring is a series of its own)
            tokens.issue(session, OPERATOR, valid_for=timedelta(days=3))
        failing_and_disabled_endpoints(bus.engine, datetime.now(timezone.utc))  # (so are endpoints failing or disabled)
        bus.portal_passes = Passes()  # (and the portal connector's passes, when it runs: COLLABBUS_PORTAL_URL)
        assert bus.http is not None
        async with httpx.AsyncClient(base_url=bus.http.url) as client:
            text = (await client.get("/metrics")).text
    finally:
        await bus.stop()
    families = list(text_string_to_metric_families(text))
    served = {sample.name for family in families for sample in family.samples}
    assert used <= served, sorted(used - served)
    lease_age = next(s.value for f in families for s in f.samples if s.name == "collabbus_log_lease_renewed_age_seconds")
    assert 0 <= lease_age < 2  # this bus holds the lease and renews it every second
    # A counter's or histogram's labelled series appear once something is counted: the dashboard's
    # names are checked against the families served, whose samples are the name with these endings.
    endings = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    offered = {family.name + ending for family in families for ending in endings.get(family.type, ("",))}
    assert charted <= offered | served, sorted(charted - offered - served)


def test_scrapes_at_once_count_each_webhook_attempt_once(tmp_path: Path) -> None:
    """Two scrapes reading the attempt log at the same moment (two Prometheus servers, a person
    with curl) add what was recorded since the last one once, not twice."""
    import threading

    from handlers.db import make_engine, migrate
    from ops.metrics import WebhookAttempts

    engine = make_engine(f"sqlite:///{tmp_path / 'attempts.db'}")
    migrate(engine)
    attempts_to_endpoint(engine, "https://example.org/hook", "e-1", (200,) * 50)
    counter = WebhookAttempts()
    start = threading.Barrier(8)
    read: list[dict[str, int] | None] = []

    def scrape() -> None:
        start.wait()
        read.append(counter.read(engine))

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    engine.dispose()
    assert read == [{"delivered": 50}] * 8
