"""``/readyz`` says why a bus is not ready; logs carry the event id, as JSON lines off a terminal."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bus.client import offer
from bus.streams import EVENTS_STREAM
from connectors.http.app import create_app
from ops.logs import JsonLines, Readable, Spell, configure_logging
from tests.bus.test_consumer import FIXTURE, project_event, wait_for
from tests.conftest import all_stopped
from tests.ops.conftest import Poisoned


@pytest.fixture
async def client(poisoned: Poisoned) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(poisoned.bus)), base_url="http://bus") as client:
        yield client


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    response = await client.get("/readyz")
    return response.status_code, response.json()["checks"]


async def ready(client: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    """``/readyz`` once it answers 200, or after 20 s: on a loaded machine a renewal of the bus's
    lease can come later than applying the log allows, and the bus holds its events (and says so,
    503) until the next one."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while (answer := await readiness(client))[0] != 200 and loop.time() < deadline:
        await asyncio.sleep(0.1)
    return answer


async def test_readiness_names_what_is_missing(poisoned: Poisoned, client: httpx.AsyncClient) -> None:
    bus = poisoned.bus
    assert await ready(client) == (200, {"nats": "ok", "database": "ok", "consumer": "ok"})

    assert bus.consumer is not None
    await bus.consumer.stop()
    assert await readiness(client) == (503, {"nats": "ok", "database": "ok", "consumer": "network is not running"})
    await bus.consumer.start()

    await bus.js.delete_consumer(EVENTS_STREAM, "webhooks")
    assert (await readiness(client))[1]["consumer"] == "webhooks is missing on the server"

    engine, bus.engine = bus.engine, None
    try:
        assert (await readiness(client))[1]["database"] == "read models not running"
    finally:
        bus.engine = engine


async def test_a_dead_letter_is_logged_with_its_event_id(poisoned: Poisoned, caplog: pytest.LogCaptureFixture) -> None:
    event = project_event("poison-a")
    assert (await offer(poisoned.nc, FIXTURE["as"], event)).accepted
    await wait_for(lambda: poisoned.bus.consumer is not None and poisoned.bus.consumer.dead_lettered == 1)
    about = [r for r in caplog.records if getattr(r, "event_id", None) == event["id"]]
    assert {r.name for r in about} >= {"collabbus.handlers", "collabbus.consumer"}


def record(**extra: object) -> logging.LogRecord:
    log = logging.getLogger("collabbus.test")
    try:
        raise ValueError("boom")
    except ValueError:
        return log.makeRecord(log.name, logging.ERROR, __file__, 1, "event %s failed", ("e-1",), sys.exc_info(), extra=extra)


def test_json_lines_carry_the_extras_and_the_exception() -> None:
    entry = json.loads(JsonLines().format(record(event_id="e-1", consumer="network")))
    assert entry["message"] == "event e-1 failed" and entry["level"] == "error" and entry["logger"] == "collabbus.test"
    assert entry["event_id"] == "e-1" and entry["consumer"] == "network" and "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("+00:00")

    first = Readable().format(record(event_id="e-1")).splitlines()[0]
    assert first.endswith("ERROR   collabbus.test: event e-1 failed  event_id=e-1")


def test_a_repeating_failure_is_said_when_it_starts_every_30_s_while_it_lasts_and_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    spell = Spell(logging.getLogger("collabbus.test"), first="{what} failed ({why})", still="still failing ({why}): {n} in {seconds:.0f} s",
                  ended="works again (failed {times} in {seconds:.0f} s)", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="collabbus.test"):
        spell.ended()  # nothing was failing: nothing to say
        for _ in range(10):  # twice a second for 5 s
            spell.failed(why="no answer", what="a request")
            now[0] += 0.5
        now[0] += 26.0  # 31 s after the first
        spell.failed(why="503", what="a request")
        spell.failed(why="503", what="a request")
        spell.ended()
        spell.ended()
        spell.failed(why="again", what="a request")  # a new spell
        spell.ended()
    assert [r.getMessage() for r in caplog.records] == [
        "a request failed (no answer)", "still failing (503): 11 in 31 s", "works again (failed 12 times in 31 s)",
        "a request failed (again)", "works again (failed once in 0 s)",
    ]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_json_unless_a_terminal() -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()  # not a terminal
    try:
        configure_logging(stream=stream)
        logging.getLogger("collabbus.test").warning("about %s", "e-2", extra={"event_id": "e-2"})
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    assert json.loads(stream.getvalue().splitlines()[-1])["event_id"] == "e-2"


def test_the_log_format_and_level_are_settings() -> None:
    """COLLABBUS_LOG_FORMAT=text writes readable lines where JSON would go (not a terminal), json
    JSON where readable lines would; COLLABBUS_LOG_LEVEL=warning leaves out the info lines."""
    from ops.settings import Settings

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    written: dict[str, list[str]] = {}
    try:
        for form in ("text", "json"):
            settings = Settings(log_format=form, log_level="warning")  # type: ignore[arg-type]
            stream = io.StringIO()
            configure_logging(settings.log_level, stream=stream, form=settings.log_format)
            logging.getLogger("collabbus.test").info("left out")
            logging.getLogger("collabbus.test").warning("kept %s", form, extra={"event_id": "e-3"})
            written[form] = stream.getvalue().splitlines()
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    [text] = written["text"]
    assert " WARNING collabbus.test: kept text  event_id=e-3" in text and not text.startswith("{")
    [line] = written["json"]
    assert json.loads(line)["message"] == "kept json" and json.loads(line)["level"] == "warning"


def test_a_line_written_inside_a_span_names_its_trace() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    stream = io.StringIO()
    tracer = TracerProvider().get_tracer("collabbus.test")
    try:
        configure_logging(stream=stream)
        logging.getLogger("collabbus.test").warning("outside")
        with tracer.start_as_current_span("work") as span:
            logging.getLogger("collabbus.test").warning("inside")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    outside, inside = (json.loads(line) for line in stream.getvalue().splitlines()[-2:])
    assert "trace_id" not in outside
    context = span.get_span_context()
    assert inside["trace_id"] == format(context.trace_id, "032x") and inside["span_id"] == format(context.span_id, "016x")


async def test_the_embedded_nats_server_is_started_again_when_it_dies(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Killed under a running bus, the embedded nats-server is started again (and said so); meanwhile
    /readyz says NATS is away and /metrics still answers, without the series it cannot read."""
    from bus.runtime import Bus
    from bus.server import free_port
    from ops.settings import Settings
    from ops.tracing import Tracing
    from tests.conftest import join

    bus = Bus(Settings(data_dir=tmp_path, nats_listen=f"127.0.0.1:{free_port()}"), tracing=Tracing.off())
    await bus.start()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(bus)), base_url="http://bus") as client:
            assert bus.server is not None and bus.server.process is not None and bus._watching is not None
            first = bus.server.process.pid
            bus._watching.cancel()  # the outage held open while it is looked at; the watch resumes below
            bus.server.process.kill()
            await wait_for(lambda: not bus.nc.is_connected, timeout=10)
            status, checks = await readiness(client)
            assert status == 503 and checks["nats"] != "ok"
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert "collabbus_nats_connected 0.0" in metrics.text and "collabbus_status_readable 0.0" in metrics.text
            assert "collabbus_http_requests_total" in metrics.text  # the rest is served

            bus._watching = asyncio.create_task(bus._watch_server())

            # (the client may reconnect to the new server a moment before the watch says it runs)
            await wait_for(lambda: bus.nc.is_connected and "runs again" in caplog.text, timeout=30)
            assert bus.server.process is not None and bus.server.process.pid != first
            assert "the embedded nats-server exited" in caplog.text
            await join(bus.nc, FIXTURE["as"], FIXTURE["kind"])
            assert (await offer(bus.nc, FIXTURE["as"], project_event("after-restart"))).accepted
            metrics_after = await client.get("/metrics")
            assert "collabbus_status_readable 1.0" in metrics_after.text and 'collabbus_dead_letters{consumer="network"} 0.0' in metrics_after.text
    finally:
        await bus.stop()


async def test_a_nats_server_that_stops_answering_is_not_called_ok(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server stopped (SIGSTOP) or stuck keeps the bus's connection open: /readyz said NATS was
    `ok`, /metrics that it was connected, and /ops/status failed with a 500. Now /readyz says it
    does not answer, /metrics counts it away, /ops/status is a 503 saying why; all well again once
    it answers."""
    import os
    import signal

    from sqlmodel import Session

    from bus.runtime import Bus
    from bus.server import free_port
    from connectors.http import operations
    from handlers.tokens import issue
    from ops.settings import Settings
    from ops.tracing import Tracing

    monkeypatch.setattr(operations, "STATUS_TIMEOUT", 2.0)
    bus = Bus(Settings(data_dir=tmp_path, nats_listen=f"127.0.0.1:{free_port()}"), tracing=Tracing.off())
    await bus.start()
    try:
        assert bus.engine is not None and bus.server is not None and bus.server.process is not None
        with Session(bus.engine) as session:
            token = issue(session, bus.settings.operator)
            session.commit()
        auth = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(bus)), base_url="http://bus") as client:
            for _ in range(100):  # (the operator's joining is applied a moment after the start)
                if (await client.get("/ops/status", headers=auth)).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert (await readiness(client)) == (200, {"nats": "ok", "database": "ok", "consumer": "ok"})
            os.kill(bus.server.process.pid, signal.SIGSTOP)
            try:
                await all_stopped(bus.server.process.pid)
                status, checks = await readiness(client)
                assert status == 503 and checks["nats"].startswith("not answering: no reply within 1 s"), checks
                stuck = await client.get("/ops/status", headers=auth)
                assert stuck.status_code == 503 and stuck.json()["type"] == "urn:collabbus:problem:unavailable", stuck.text
                assert "NATS does not answer the bus" in stuck.json()["detail"] and stuck.headers["retry-after"] == "5"
                metrics = await client.get("/metrics")
                assert metrics.status_code == 200 and "collabbus_nats_connected 0.0" in metrics.text
            finally:
                os.kill(bus.server.process.pid, signal.SIGCONT)
            # Answering again: ready at once, the status read, /metrics says so — the checks made
            # during the stall left the connection reading (a flush timed out there stopped it).
            for _ in range(50):
                if (await readiness(client))[0] == 200:
                    break
                await asyncio.sleep(0.2)
            assert (await readiness(client)) == (200, {"nats": "ok", "database": "ok", "consumer": "ok"})
            assert (await client.get("/ops/status", headers=auth)).status_code == 200
            assert "collabbus_nats_connected 1.0" in (await client.get("/metrics")).text
            from tests.conftest import join

            await join(bus.nc, FIXTURE["as"], FIXTURE["kind"])  # (the gate answers and the log takes it)
    finally:
        await bus.stop()
