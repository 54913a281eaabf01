"""``collabbus status`` (and ``/ops/status``, the same function) for a known history."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import orjson
import pytest

from bus.client import offer
from connectors.http.operations import bus_status
from connectors.webhooks import store
from handlers.db import session_scope
from ops.status import STATE_FILE, STATE_FRESH, read_consumer_state
from tests.bus.test_consumer import FIXTURE, project_event, wait_for
from tests.ops.conftest import Poisoned, cli_env, collabbus


async def test_status_reports_streams_consumers_dead_letters_and_positions(poisoned: Poisoned) -> None:
    bus = poisoned.bus
    with session_scope(bus.engine) as session:
        endpoint = store.create_endpoint(session, FIXTURE["as"], "https://example.org/hook", ["project.*"], "",
                                         after_seq=10**6, now=datetime.now(timezone.utc))
        endpoint.failing_since = datetime(2026, 12, 2, 3, 0, 1, 250000, tzinfo=timezone.utc)
        session.flush()
        failed = store.Delivery(endpoint_id=endpoint.id, event_id="e-1", event_type="project.registered", seq=1,
                                next_attempt_at=datetime(2099, 1, 1, tzinfo=timezone.utc),  # (not due: nothing tried meanwhile)
                                created_at=endpoint.failing_since)
        session.add(failed)
        session.flush()
        assert failed.id is not None
        session.add(store.Attempt(delivery_id=failed.id, attempted_at=endpoint.failing_since, status_code=500,
                                  error="HTTP 500", response="internal\noops from the receiver"))
        gone = store.create_endpoint(session, FIXTURE["as"], "https://example.org/gone", [], "", after_seq=10**6,
                                     now=datetime.now(timezone.utc))
        store.disable(gone, store.GONE_REASON, datetime(2026, 12, 6, 9, 15, 24, 500000, tzinfo=timezone.utc), after_seq=10**6)
    # Given: the operator and one member joined (#1, #2), three projects and one poison event (#3–#6).
    events = [project_event("p-1"), project_event("poison-a"), project_event("p-2"), project_event("p-3")]
    for event in events:
        assert (await offer(poisoned.nc, FIXTURE["as"], event)).accepted

    async def caught_up() -> dict:
        while True:
            status = await bus_status(bus)
            if all(c["pending"] == 0 and c["ack_pending"] == 0 and c["last_delivered"] == 6 for c in status["consumers"].values()):
                return status
            await asyncio.sleep(0.05)

    await wait_for(lambda: "p-3" in poisoned.recorder.seen)
    in_process = await asyncio.wait_for(caught_up(), 20)
    assert in_process["consumers"]["network"]["dead_lettered"] == 1  # the running process's own counters

    code, out, err = await collabbus("status", "--json", env=cli_env(bus))
    assert code == 0, err
    status = json.loads(out)
    events_stream = status["streams"]["COLLAB_EVENTS"]
    assert (events_stream["messages"], events_stream["first_seq"], events_stream["last_seq"], events_stream["replicas"]) == (6, 1, 6, 1)
    assert (events_stream["replicas_current"], events_stream["replicas_behind"]) == (1, [])  # one server: its one copy
    assert status["streams"]["COLLAB_DLQ"]["messages"] == 1
    assert set(status["consumers"]) == {"network", "webhooks"}
    assert status["bus_running"] is True  # its consumers are pulling (a script tells a stopped bus by it)
    network = status["consumers"]["network"]
    assert (network["pending"], network["ack_pending"], network["last_delivered"], network["acked"]) == (0, 0, 6, 6)
    assert status["dead_letters"] == {"network": 1}
    assert status["database"]["positions"] == {"network": {"seq": 6, "behind": 0}, "webhooks": {"seq": 6, "behind": 0}}
    hooks = {w["id"]: w for w in status["webhooks"]}
    assert [(w["enabled"], w["failing_since"], w["last_success_at"], w["disabled_at"]) for w in (hooks[endpoint.id], hooks[gone.id])] == [
        (True, "2026-12-02T03:00:01.250000Z", None, None),  # in UTC with its Z, as everywhere else
        (False, None, None, "2026-12-06T09:15:24.500000Z"),
    ]
    assert hooks[gone.id]["disabled_reason"] == "the endpoint answered 410 Gone"
    # What its last attempt met, for an operator who may not read the member's deliveries.
    assert hooks[endpoint.id]["last_error"] == "HTTP 500: internal oops from the receiver"
    # What the dead letter is about is set aside behind it (#4): its later events would wait there.
    assert status["database"]["set_aside"] == [{"consumer": "network", "domain": "project", "subject": "poison-a", "behind": 4, "last": 4}]

    code, out, err = await collabbus("status", env=cli_env(bus))
    assert code == 0, err
    assert "COLLAB_EVENTS" in out and "network" in out and "webhook endpoints" in out and "(0 behind)" in out
    assert f"{endpoint.id} failing: HTTP 500: internal oops from the receiver" in out
    assert "failing since 2026-12-02 03:00 UTC (" in out
    assert "disabled 2026-12-06 09:15 UTC: the endpoint answered 410 Gone" in out
    assert "set aside: project poison-a behind #4" in out


async def test_status_exits_1_when_the_database_cannot_be_read(poisoned: Poisoned) -> None:
    env = {**cli_env(poisoned.bus), "COLLABBUS_DATABASE_URL": "postgresql+psycopg://nobody:x@127.0.0.1:1/nodb"}
    code, out, err = await collabbus("status", "--json", env=env)
    assert code == 1, err
    assert "error" in json.loads(out)["database"]  # the report is still printed, streams and all
    assert "COLLAB_EVENTS" in json.loads(out)["streams"]


def test_the_consumer_state_of_a_stopped_bus_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / STATE_FILE
    waiting = {"network": {"retrying": "#7 failed 1 of 5 times (RuntimeError)", "holding": None}}
    assert read_consumer_state(tmp_path) is None  # no bus has written one
    path.write_bytes(orjson.dumps({"pid": os.getpid(), "consumers": waiting}))
    assert read_consumer_state(tmp_path) == waiting
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    path.write_bytes(orjson.dumps({"pid": int(gone), "consumers": waiting}))
    assert read_consumer_state(tmp_path) is None  # its process ended without removing it (killed)
    path.write_bytes(orjson.dumps({"pid": os.getpid(), "consumers": waiting}))
    old = path.stat().st_mtime - STATE_FRESH - 1
    os.utime(path, (old, old))
    assert read_consumer_state(tmp_path) is None  # not written lately: a pid taken by another process since
    path.write_bytes(b"{half")
    assert read_consumer_state(tmp_path) is None


async def test_a_bus_whose_consumers_are_between_two_pull_requests_is_still_running(poisoned: Poisoned) -> None:
    """A consumer's pull request expires and the next one follows; in between none is open. The
    bus's fresh consumer state says it runs all the same (before, `bus_running` was false then,
    and what its consumers wait on went unreported)."""
    bus = poisoned.bus
    assert bus.consumer is not None and bus.webhooks is not None
    await bus.consumer.stop()  # no pull request of theirs any more, as between two
    await bus.webhooks.consumer.stop()

    async def none_waiting() -> None:
        while any(c["waiting"] for c in (await bus_status(bus))["consumers"].values()):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(none_waiting(), 15)  # (the server forgets a request when it expires)
    code, out, err = await collabbus("status", "--json", env=cli_env(bus))
    assert code == 0, err
    status = json.loads(out)
    assert all(c["waiting"] == 0 for c in status["consumers"].values())
    assert status["bus_running"] is True


def test_the_status_table_warns_of_derived_events_waiting_in_the_outbox(capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import _render_status

    database = {"url": "sqlite:///collabbus.db", "positions": {"network": {"seq": 5, "behind": 0}}}
    report = {"streams": {}, "consumers": {}, "dead_letters": {},
              "database": {**database, "outbox": {"waiting": 3, "oldest": "2026-12-03T11:00:00.250000Z"}}}
    _render_status(report)
    shown = " ".join(capsys.readouterr().out.split())
    assert "outbox: 3 derived event(s) not logged yet, the oldest since 2026-12-03T11:00:00" in shown
    _render_status({**report, "database": {**database, "outbox": {"waiting": 0, "oldest": None}}})
    assert "outbox" not in capsys.readouterr().out  # nothing to say when nothing waits


def test_the_status_table_names_the_oldest_things_set_aside_and_counts_the_rest(capsys: pytest.CaptureFixture[str]) -> None:
    """A bug that sets a thousand things aside does not print a thousand lines: the oldest ten,
    then how many more (the JSON lists them all)."""
    from ops.cli import SET_ASIDE_SHOWN, _render_status

    things = [{"consumer": "network", "domain": "project", "subject": f"p-{i}", "behind": 10 + i, "last": 10 + i} for i in range(12)]
    database = {"url": "sqlite:///collabbus.db", "positions": {"network": {"seq": 30, "behind": 0}}, "set_aside": things}
    _render_status({"streams": {}, "consumers": {}, "dead_letters": {}, "database": database})
    shown = capsys.readouterr().out
    assert [line.split()[3] for line in shown.splitlines() if line.startswith("set aside:")] == [f"p-{i}" for i in range(SET_ASIDE_SHOWN)]
    assert "… and 2 more things set aside (status --json lists them all; collabbus dlq list)" in " ".join(shown.split())


def test_the_status_table_says_when_the_network_was_last_backed_up(capsys: pytest.CaptureFixture[str]) -> None:
    from ops.cli import _render_status

    report: dict[str, Any] = {"streams": {}, "consumers": {}, "dead_letters": {}, "backup": None}
    _render_status(report)
    assert "backup: none made from this data dir" in capsys.readouterr().out
    _render_status({**report, "backup": {"at": "2026-12-03T14:00:05+00:00", "into": "/srv/backups/b1", "last_seq": {}}})
    assert "backup: the last at 2026-12-03 14:00:05 UTC into /srv/backups/b1" in capsys.readouterr().out
    _render_status({k: v for k, v in report.items() if k != "backup"})  # a report without it (an older bus's)
    assert "backup" not in capsys.readouterr().out


def test_the_status_table_says_when_an_endpoint_was_disabled_and_why_and_how_long_one_has_failed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint's state reads as a sentence with its times in UTC: since when one fails, and
    for how long; when another was disabled, and why."""
    from ops import cli

    monkeypatch.setattr(cli.out, "width", 200)
    failing_since = (datetime.now(timezone.utc) - timedelta(hours=2, minutes=5)).replace(microsecond=250000)
    hook = {"institution": "fi-diak", "url": "https://example.org/hook", "enabled": True, "disabled_reason": None,
            "disabled_at": None, "failing_since": None, "last_success_at": "2026-12-06T08:00:00.500000Z", "owed": 0,
            "last_error": None}
    hooks = [
        {**hook, "id": "ep_fine"},
        {**hook, "id": "ep_failing", "failing_since": failing_since.isoformat().replace("+00:00", "Z"), "owed": 3,
         "last_error": "HTTP 500: internal error"},
        {**hook, "id": "ep_gone", "enabled": False, "disabled_reason": "the endpoint answered 410 Gone",
         "disabled_at": "2026-12-06T09:15:24.123456Z", "failing_since": "2026-12-06T09:15:24.100000Z", "last_success_at": None,
         "last_error": "HTTP 410: gone"},
    ]
    cli._render_status({"streams": {}, "consumers": {}, "dead_letters": {}, "webhooks": hooks})
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.startswith("│ ep_")}
    assert rows["ep_fine"][2:] == ["enabled", "2026-12-06 08:00 UTC", "0"]
    assert rows["ep_failing"][2:] == [f"failing since {failing_since:%Y-%m-%d %H:%M} UTC (2 h)", "2026-12-06 08:00 UTC", "3"]
    assert rows["ep_gone"][2:] == ["disabled 2026-12-06 09:15 UTC: the endpoint answered 410 Gone", "never", "0"]


@pytest.mark.parametrize(("lasted", "shown"), [
    (timedelta(seconds=30), "under a minute"), (timedelta(minutes=40, seconds=59), "40 min"), (timedelta(hours=47), "47 h"),
    (timedelta(days=4, hours=23), "4 d"),
])
def test_how_long_an_endpoint_has_failed_is_said_in_one_unit(lasted: timedelta, shown: str) -> None:
    from ops.cli import _how_long

    assert _how_long(lasted) == shown
