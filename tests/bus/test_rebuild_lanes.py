"""A rebuild replays the domains side by side (``collabbus rebuild``'s processes): the same log
gives the same read models, bookkeeping, position and report as a rebuild in one process, on
SQLite and on PostgreSQL; the lanes hold every table their handlers read; an event the lanes
cannot tell apart fails the rebuild with what to do."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType

import pytest
import sqlalchemy as sa
from sqlmodel import SQLModel

from bus.gate import canonical_bytes, log_subject
from bus.rebuild import LaneError, Lanes, rebuild
from bus.runtime import Bus
from bus.server import EmbeddedNats
from bus.streams import EVENTS_STREAM
from handlers.db import make_engine, migrate, table_checksums
from handlers.projects import PARTIES_DECIDED_BY, THEMES_DECIDED_BY
from handlers.routes import DOMAINS, REBUILD_LANES, domain_tables, network, rebuild_lanes
from handlers.service import LoggedItem, NetworkService
from ops import bench
from ops.bench import child_processes
from ops.settings import Settings
from ops.tracing import Tracing
from tests.conftest import load_fixtures
from tests.handlers.harness import envelope

WORKLOAD_EVENTS = 1_500


def _tables_used_by(module: ModuleType) -> set[str]:
    """The read-model tables a domain module's code names: its own, the classes it imports, those
    the functions it imports from another module name (``handlers.projects.parties``), and tables
    its SQL text reads."""
    import handlers.tables  # noqa: F401

    tables = {table.name for table in SQLModel.metadata.sorted_tables}

    def table_of(value: object) -> str | None:
        name = getattr(value, "__tablename__", None) if isinstance(value, type) else None
        return name if name in tables else None

    named = {name for value in vars(module).values() if (name := table_of(value)) is not None}
    for value in vars(module).values():
        if inspect.isfunction(value) and value.__module__ != module.__name__:
            named |= {name for used in value.__code__.co_names if (name := table_of(value.__globals__.get(used))) is not None}
    source = inspect.getsource(module)
    return named | {name for name in tables if re.search(rf"\b(FROM|JOIN)\s+\"?{name}\b", source, re.IGNORECASE)}


def _domain_of_table(name: str) -> str | None:
    for domain in DOMAINS:
        if name in {table.name for table in domain_tables(domain)}:
            return domain
    return None


def test_each_lane_holds_every_domain_its_handlers_read() -> None:
    # what keeps domains together: validations read projects (conflicts of interest), innovation
    # days read projects' themes in SQL of their own (matchmaking when a day moves) and the parties
    # of a registration's project, calls the parties of an application's project
    assert "projects" in _tables_used_by(DOMAINS["validation"])
    assert {"projects", "project_partners"} <= _tables_used_by(DOMAINS["innovation_day"])
    assert {"projects", "project_partners"} <= _tables_used_by(DOMAINS["call"])
    # what a lane applies of projects, by what its domains read of them
    applied = {"innovation_day": (set(PARTIES_DECIDED_BY), {"projects", "project_partners"}),
               "call": (set(PARTIES_DECIDED_BY), {"projects", "project_partners"})}
    for processes in range(1, len(REBUILD_LANES) + 1):
        lanes = Lanes(rebuild_lanes(processes), Path("unused"), held_rows=1_000)
        assert {entry for lane in lanes.domains for entry in lane if "." not in entry} == set(DOMAINS)  # every domain is replayed
        for lane in lanes.domains:
            whole = {entry for entry in lane if "." not in entry}
            alone = {entry for entry in lane if "." in entry}
            for domain in whole:
                read = {_domain_of_table(name) for name in _tables_used_by(DOMAINS[domain])} - {None}
                for other in read - whole:  # what is not whole in the lane: what decides it is there
                    types, tables = applied[domain]
                    assert other == "project" and types <= alone, (domain, lane, other)
                    assert _tables_used_by(DOMAINS[domain]) & {t.name for t in domain_tables(other)} == tables
        kept = [domain for index in range(len(lanes.domains)) for domain in lanes.kept(index)]
        assert sorted(kept) == sorted(DOMAINS)  # each domain's rows are kept by one lane
        # a later lane's rows are copied with their keys: no table there has keys the database makes up
        for index in range(1, len(lanes.domains)):
            for domain in lanes.kept(index):
                for table in domain_tables(domain):
                    key = list(table.primary_key.columns)
                    assert not (len(key) == 1 and isinstance(key[0].type, sa.Integer)), table.name


def test_each_domain_declares_what_its_workflows_read_of_other_domains() -> None:
    """An event waits behind a thing set aside that its workflow reads (``READS``): a domain
    whose code reads another domain — its tables, or a member's facts through ``member`` —
    declares it, or its events would be judged while that thing waits in the dead-letter queue."""
    from handlers.network import Reads

    for domain, module in DOMAINS.items():
        read = {other for name in _tables_used_by(module) if (other := _domain_of_table(name)) not in (None, domain)}
        if domain != "institution" and re.search(r"\bmember\(", inspect.getsource(module)):
            read.add("institution")
        declared = {reads.domain for entry in getattr(module, "READS", {}).values()
                    for reads in ([entry] if isinstance(entry, Reads) else entry)}
        assert read <= declared, (domain, sorted(read - declared))
    assert {reads.domain for reads in DOMAINS["validation"].READS["validation.reviewer_assigned"]} == {"project", "institution"}


def test_fewer_processes_replay_the_last_lanes_together() -> None:
    assert rebuild_lanes(1) == (tuple(DOMAINS),)
    assert rebuild_lanes(2) == (REBUILD_LANES[0], ("institution", "call", "innovation_day", *sorted(PARTIES_DECIDED_BY)))
    assert rebuild_lanes(len(REBUILD_LANES)) == rebuild_lanes(99)
    assert [set(lane) for lane in rebuild_lanes(99)] == [set(lane) for lane in REBUILD_LANES]
    lanes = Lanes(rebuild_lanes(2), Path("unused"), held_rows=1_000)
    assert lanes.kept(0) == REBUILD_LANES[0]
    assert lanes.kept(1) == ("call", "innovation_day")  # the projects' theme events are applied, not kept
    assert lanes.routing()["project"] == [0] and lanes.routing()["project.updated"] == [1]
    assert lanes.routing()["institution"] == [0, 1]


def test_the_events_projects_themes_are_decided_by_give_the_themes_all_of_the_domain_gives(tmp_path: Path) -> None:
    """What the lane of innovation days applies of projects (``THEMES_DECIDED_BY``) gives every
    project's owner, themes and dates as the whole domain does, refusals included: an update by
    another member, an update that would end the project before it starts once its completion
    moved its end, a registration of a taken id."""
    fixtures = load_fixtures()
    owner, other = "tr-mersin-bb", "tr-other"
    when = datetime(2026, 5, 1, tzinfo=timezone.utc)

    def event(event_type: str, source: str, data: dict[str, object], index: int) -> LoggedItem:
        envelope = copy.deepcopy(fixtures[event_type]["event"])
        envelope.update(id=f"themes-{index}", source=f"/institutions/{source}", time="2026-05-01T00:00:00Z")
        envelope["data"] = {**envelope["data"], **data}
        envelope["subject"] = str(envelope["data"]["project_id"])
        return LoggedItem(index, envelope, when + timedelta(minutes=index))

    registered = fixtures["project.registered"]["event"]["data"]
    adopter = copy.deepcopy(fixtures["institution.joined"]["event"])  # (an adoption names a member)
    adopter.update(id="themes-0", subject=fixtures["project.adopted"]["event"]["data"]["adopter"])
    adopter["data"] = {**adopter["data"], "id": adopter["subject"]}
    log = [
        LoggedItem(1, adopter, when),
        event("project.registered", owner, {"themes": ["environment_urbanisation.climate"], "ends_on": "2027-12-31", "partners": []}, 2),
        event("project.adopted", owner, {}, 3),
        event("project.updated", owner, {"changes": {"themes": ["education.lifelong_learning"]}}, 4),
        event("project.updated", other, {"changes": {"themes": ["health_care.elderly_care"]}}, 5),  # not the owner
        event("project.completed", owner, {"project_id": registered["project_id"], "ended_on": "2026-04-30"}, 6),
        event("project.updated", owner, {"changes": {"started_on": "2026-07-01", "themes": ["economy.disadvantaged_groups"]}}, 7),
        event("project.registered", other, {"owner": other, "themes": ["health_care.elderly_care"]}, 8),  # taken
        event("project.registered", other, {"project_id": "another", "owner": other, "themes": ["health_care.elderly_care"],
                                            "partners": []}, 9),
    ]
    states = []
    for name, selectors in (("whole", ["institution", "project"]), ("alone", ["institution", *THEMES_DECIDED_BY])):
        engine = make_engine(f"sqlite:///{tmp_path / name}.db")
        migrate(engine)
        service = NetworkService(engine, network(selectors))
        applied, failure, derived = service.apply_batch(log, live=False)
        assert (applied, failure) == (len(log), None)
        with engine.connect() as connection:
            states.append(connection.execute(sa.text(
                "SELECT project_id, owner, themes, started_on, ends_on FROM projects ORDER BY project_id")).all())
        assert derived == 3  # the refusals of events 5, 7 and 8
        service.close()
        engine.dispose()
    assert states[0] == states[1]
    assert [(row[0], row[1], row[4]) for row in states[0]] == [
        ("another", other, None), (registered["project_id"], owner, "2026-04-30")]
    assert "education.lifelong_learning" in str(states[0][1][2])  # the owner's update stands, the refused ones do not


async def _log(tmp_path: Path, server: EmbeddedNats, database_url: str) -> Bus:
    """A log of every workflow's events as the gate writes them, and something that is no event
    under a later lane's subject."""
    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=database_url),
              tracing=Tracing.off())
    await bus.start(ingress=False, state=False)
    chunks = [bench.workload("lanes", WORKLOAD_EVENTS)]
    published, _, _ = await bench.fill_log(server, chunks, WORKLOAD_EVENTS, bench.BenchOptions(fill_budget=120.0),
                                           lambda *_: None)
    assert published == WORKLOAD_EVENTS
    await bus.js.publish("collab.events.lanes-m000.call.published.junk", b"not an event", headers={"Nats-Msg-Id": "junk-1"})
    # A project event the workflow refuses: its refusal is derived in both lanes that apply
    # projects, and only its cause is in the log (no live bus logged the refusal).
    refused = copy.deepcopy(load_fixtures()["project.completed"]["event"])
    refused.update(id="refused-1", source="/institutions/lanes-m001", time="2026-01-01T00:00:00Z")
    refused["data"]["project_id"] = refused["subject"] = "no-such-project"
    await bus.js.publish(log_subject(refused), canonical_bytes(refused), headers={"Nats-Msg-Id": "refused-1"})
    # A member leaving while it holds the one seat of a gathering still taking registrations: an
    # event every lane applies, from which the lane keeping innovation days derives the seat's
    # release and the waitlist's promotion (events of another domain than their cause's), and the
    # lane keeping calls the withdrawal of its applications waiting for a decision.
    for offered in _a_member_leaving_its_seat():
        await bus.js.publish(log_subject(offered), canonical_bytes(offered), headers={"Nats-Msg-Id": offered["id"]})
    return bus


def _a_member_leaving_its_seat() -> list[dict[str, object]]:
    starts = datetime.now(timezone.utc) + timedelta(days=30)
    day = {"day_id": "lanes-leaving-day", "title": {"en": "Study visit"}, "format": "study_visit",
           "starts_at": starts.isoformat(), "ends_at": (starts + timedelta(hours=3)).isoformat(), "attendance_mode": "online",
           "online_url": "https://events.example.org/visit", "capacity": 1,
           "registration_deadline": (starts - timedelta(days=7)).isoformat()}
    registrations = [{"day_id": "lanes-leaving-day", "registration_id": f"lanes-leaving-{member}", "participant": member,
                      "role": "observer", "attendees": 1} for member in ("lanes-m002", "lanes-m003")]
    return [envelope("innovation_day.scheduled", "lanes-m001", day, id="leaving-1"),
            *(envelope("innovation_day.registration_requested", str(data["participant"]), data, id=f"leaving-{n}")
              for n, data in enumerate(registrations, start=2)),
            envelope("institution.left", "operator", {"id": "lanes-m002"}, id="leaving-left")]


def _position(engine: sa.Engine, consumer: str = "network") -> int:
    with engine.connect() as connection:
        return connection.execute(sa.text("SELECT seq FROM consumer_positions WHERE consumer = :c"), {"c": consumer}).scalar() or 0


@contextlib.asynccontextmanager
async def _migrated_log(tmp_path: Path, server: EmbeddedNats) -> AsyncIterator[tuple[Bus, sa.Engine]]:
    """The workload log (:func:`_log`) and empty read models on SQLite; both closed after."""
    database_url = f"sqlite:///{tmp_path / 'network.db'}"
    bus = await _log(tmp_path, server, database_url)
    engine = make_engine(database_url)
    migrate(engine)
    try:
        yield bus, engine
    finally:
        engine.dispose()
        await bus.stop()


async def test_a_rebuild_in_lanes_equals_a_rebuild_in_one_process(tmp_path: Path, server: EmbeddedNats, database_url: str) -> None:
    bus = await _log(tmp_path, server, database_url)
    connect = {"servers": [server.url], **server.connect_options()}
    engine = make_engine(database_url)
    try:
        info = await bus.js.stream_info(EVENTS_STREAM)
        one = await rebuild(bus.js, NetworkService(engine, network()), connect=connect)
        serial, serial_position = table_checksums(engine), _position(engine)

        scratch = tmp_path / "scratch"
        scratch.mkdir()
        (scratch / "lane-1-0badc0de.db").write_bytes(b"\0" * 4096)  # what a rebuild killed outright (SIGKILL) leaves
        (scratch / "lane-1-0badc0de.db-wal").write_bytes(b"\0" * 4096)
        lanes = Lanes(rebuild_lanes(2), scratch, held_rows=50_000)
        service = NetworkService(engine, network(lanes.domains[0]))
        seen: list[tuple[int, int]] = []
        two = await rebuild(bus.js, service, connect=connect, lanes=lanes, progress=lambda done, total: seen.append((done, total)))
        assert table_checksums(engine) == serial  # every table, the applied events and the positions among them (the lane's gone)
        assert _position(engine) == serial_position == info.state.last_seq
        with engine.connect() as connection:  # the workflows decided in both lanes
            for table in ("validations", "call_applications", "innovation_day_registrations"):
                assert connection.execute(sa.text(f"SELECT COUNT(*) FROM {table}")).scalar()
            refusals = connection.execute(sa.text("SELECT COUNT(*) FROM applied_events WHERE caused_by = 'refused-1'")).scalar()
            assert refusals == 1  # kept once, by the lane that keeps projects
            released = connection.execute(sa.text("SELECT event_id FROM applied_events WHERE caused_by = 'leaving-left'")).scalars().all()
            assert {event_id.rpartition(".")[0] for event_id in released} == {  # (the workload's days and calls too)
                "innovation_day.registration_confirmed", "innovation_day.registration_rejected", "call.application_withdrawn"}
            assert connection.execute(sa.text("SELECT participant, status FROM innovation_day_registrations "
                                              "WHERE day_id = 'lanes-leaving-day' ORDER BY participant")).all() == [
                ("lanes-m002", "rejected"), ("lanes-m003", "confirmed")]
            applied = connection.execute(sa.text("SELECT COUNT(*) FROM applied_events")).scalar()
        assert applied and applied > WORKLOAD_EVENTS

        assert two.events == one.events == info.state.messages
        assert two.failures == one.failures and [f["id"] for f in two.failures] == ["junk-1"]  # noted by the lane it went to
        assert one.lanes is None
        assert two.lanes is not None and [lane["domains"] for lane in two.lanes] == [list(lane) for lane in lanes.domains]
        assert sum(lane["events"] for lane in two.lanes) >= two.events - 1  # (the junk is no event of a lane)
        assert all(lane["events"] > 0 and lane["cpu_seconds"] > 0 for lane in two.lanes)
        assert seen[0] == (0, info.state.messages) and seen[-1] == (two.events, info.state.messages)
        assert not scratch.exists()  # the lanes' scratch databases are gone, and what an earlier rebuild left
        assert child_processes(os.getpid(), "lane_main") == [] and child_processes(os.getpid(), "reader_main") == []

        # The first lane's service knew nothing of the copied rows: it is told to read them afresh.
        with engine.connect() as connection:
            call_id = connection.execute(sa.text("SELECT call_id FROM calls LIMIT 1")).scalar()
        from handlers.calls import Call

        with service._transaction() as session:
            assert session.get(Call, call_id) is not None
    finally:
        engine.dispose()
        await bus.stop()


@pytest.mark.parametrize("lane", [0, 1])
async def test_an_event_under_another_domains_subject_fails_a_rebuild_in_lanes_with_what_to_do(
    tmp_path: Path, server: EmbeddedNats, lane: int
) -> None:
    """Only a holder of the bus's own credentials can write past the gate; one lane would apply
    such an event without its handlers, so the rebuild stops and says to replay in one process,
    whether the lane is the rebuilding process's or another's."""
    database_url = f"sqlite:///{tmp_path / 'network.db'}"
    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=database_url),
              tracing=Tracing.off())
    await bus.start(ingress=False, state=False)
    engine = make_engine(database_url)
    migrate(engine)
    try:
        event_type, subject = [("call.published", "project.registered"), ("validation.requested", "call.published")][lane]
        fixture = load_fixtures()[event_type]
        event = copy.deepcopy(fixture["event"])
        event["id"] = "misfiled-1"
        event["time"] = "2026-01-01T00:00:00Z"
        await bus.js.publish(f"collab.events.{fixture['as']}.{subject}.x", canonical_bytes(event),
                             headers={"Nats-Msg-Id": "misfiled-1"})
        lanes = Lanes(rebuild_lanes(2), tmp_path / "scratch", held_rows=1_000)
        with pytest.raises(LaneError, match=rf"{event_type}".replace(".", r"\.") + " event under a subject of another domain.*--processes 1"):
            await rebuild(bus.js, NetworkService(engine, network(lanes.domains[0])),
                          connect={"servers": [server.url], **server.connect_options()}, lanes=lanes, batch=1)
        assert child_processes(os.getpid(), "lane_main") == []
        # The first lane applied what came before it, and says it has applied nothing of the log:
        # a bus started now replays the log from its beginning, as the lanes' rows are not together.
        with engine.connect() as connection:
            assert connection.execute(sa.text("SELECT COUNT(*) FROM applied_events")).scalar() == 1
        assert _position(engine) == 0
        report = await rebuild(bus.js, NetworkService(engine, network()), connect={"servers": [server.url], **server.connect_options()})
        info = await bus.js.stream_info(EVENTS_STREAM)
        assert report.events == info.state.messages and report.failures == []  # in one process: as the live consumer applied it
    finally:
        engine.dispose()
        await bus.stop()


async def test_a_lane_killed_during_a_rebuild_fails_it_with_why_and_the_bus_would_start_from_the_beginning(
    tmp_path: Path, server: EmbeddedNats
) -> None:
    async with _migrated_log(tmp_path, server) as (bus, engine):
        lanes = Lanes(rebuild_lanes(2), tmp_path / "scratch", held_rows=1_000)
        service = NetworkService(engine, network(lanes.domains[0]))
        killed: list[int] = []
        seen: list[tuple[int, int]] = []

        def kill_the_lane(done: int, total: int) -> None:
            seen.append((_position(engine), _position(engine, "network:rebuild")))  # as `collabbus status` reads them
            if done > 200 and not killed:  # well under way (one event a batch)
                for pid in child_processes(os.getpid(), "lane_main"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)

        with pytest.raises(LaneError, match=r"replaying institution, call, innovation_day.* ended unexpectedly \(killed by signal 9\)"):
            await rebuild(bus.js, service, connect={"servers": [server.url], **server.connect_options()}, lanes=lanes,
                          batch=1, progress=kill_the_lane)
        assert killed
        assert child_processes(os.getpid(), "lane_main") == [] and child_processes(os.getpid(), "reader_main") == []
        assert not (tmp_path / "scratch").exists()
        with engine.connect() as connection:  # the first lane had applied events: still, nothing says so to a bus
            assert (connection.execute(sa.text("SELECT COUNT(*) FROM applied_events")).scalar() or 0) > 0
        assert _position(engine) == 0
        # while it ran, the first lane's progress was its own position, and that is gone with it
        assert {network for network, _ in seen} == {0} and max(lane for _, lane in seen) > 200
        assert _position(engine, "network:rebuild") == 0


async def test_a_ctrl_c_an_awaited_request_lost_still_stops_a_rebuild_before_it_empties_anything(
    tmp_path: Path, server: EmbeddedNats
) -> None:
    connect = {"servers": [server.url], **server.connect_options()}
    async with _migrated_log(tmp_path, server) as (bus, engine):
        await rebuild(bus.js, NetworkService(engine, network()), connect=connect)
        applied, position = table_checksums(engine), _position(engine)
        assert position > 0

        # A request's answer and a Ctrl-C (asyncio.run cancels the command's task) in one turn of
        # the loop, as when `collabbus rebuild` asks whether a bus is running: Python 3.11's
        # wait_for, which nats-py's requests await, returns the answer and the cancellation is lost.
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None
        answer = loop.create_future()
        loop.call_soon(answer.set_result, "answer")
        loop.call_soon(task.cancel)
        assert await asyncio.wait_for(answer, 5) == "answer"
        assert task.cancelling() == 1  # still counted by the task

        lanes = Lanes(rebuild_lanes(2), tmp_path / "scratch", held_rows=1_000)
        try:
            with pytest.raises(asyncio.CancelledError):
                await rebuild(bus.js, NetworkService(engine, network(lanes.domains[0])), connect=connect, lanes=lanes)
        finally:
            task.uncancel()
        assert table_checksums(engine) == applied and _position(engine) == position  # nothing emptied
        assert child_processes(os.getpid(), "lane_main") == [] and child_processes(os.getpid(), "reader_main") == []


def _command_env(tmp_path: Path, server: EmbeddedNats, database_url: str) -> dict[str, str]:
    """The environment of a ``collabbus`` command on the test's log and read models."""
    return {**os.environ, "COLLABBUS_NATS_URL": server.url, "COLLABBUS_NATS_CREDS": str(server.bus_creds),
            "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_DATABASE_URL": database_url}


def _interruptible() -> None:
    """In a child before it runs the command: SIGINT as a terminal's Ctrl-C finds it. A suite run
    as a background job of a shell script inherits SIGINT ignored, and Python keeps an ignored
    SIGINT ignored, so a command started from it would never see the test's Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.parametrize(("stop", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
async def test_ctrl_c_on_a_rebuild_in_lanes_ends_every_process_and_says_what_is_left(
    tmp_path: Path, server: EmbeddedNats, stop: signal.Signals, code: int
) -> None:
    database_url = f"sqlite:///{tmp_path / 'network.db'}"
    bus = await _log(tmp_path, server, database_url)
    await bus.stop()
    engine = make_engine(database_url)
    migrate(engine)  # (a Ctrl-C that comes while the command looks for a running bus finds the read models as they were)
    try:
        env = {**_command_env(tmp_path, server, database_url),
               "PYTHONFAULTHANDLER": "1"}  # (SIGABRT then prints where each of its threads is)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops", "rebuild", "--processes", "2", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=_interruptible,
        )
        lane: list[int] = []
        for _ in range(1500):  # the other lane's process is up (started before the log is read)
            lane = child_processes(process.pid, "lane_main")
            if lane:
                break
            await asyncio.sleep(0.01)
        assert lane, "no lane process"
        process.send_signal(stop)
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
        except TimeoutError:
            left = [pid for pid in (process.pid, lane[0]) if Path(f"/proc/{pid}").exists()]
            os.kill(process.pid, signal.SIGABRT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(lane[0], signal.SIGKILL)
            _, stderr = await asyncio.wait_for(process.communicate(), 30)
            pytest.fail(f"not ended 60 s after the Ctrl-C (still there: {left}): {stderr.decode()[-6000:]}")
        message = " ".join(stderr.decode().split())
        assert process.returncode == code, f"{message} | {stdout.decode()}"
        assert "rebuild interrupted" in message and "Run `collabbus rebuild` again" in message
        assert not Path(f"/proc/{lane[0]}").exists()  # ended with the command, not left behind
        assert not (tmp_path / "bus" / ".rebuild").exists()
        assert _position(engine) == 0  # a bus started now replays the log from its beginning
    finally:
        engine.dispose()


def _one_core() -> None:
    """In a child before it runs the command: allowed one core only, as a container's CPU set allows."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


async def test_by_default_a_rebuild_takes_one_lane_per_core_it_may_run_on(tmp_path: Path, server: EmbeddedNats) -> None:
    """Not one per core the machine has: a container's CPU set is common, and every lane is a
    process of its own with its own rows in memory (~250 MB over the benchmark's log)."""
    from bus.gates import default_count, usable_cores

    assert usable_cores() == len(os.sched_getaffinity(0)) >= 2  # this machine: more than the one the command gets
    async with _migrated_log(tmp_path, server) as (bus, engine):
        await bus.stop()
        env = _command_env(tmp_path, server, str(engine.url))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ops", "rebuild", "--json", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, preexec_fn=_one_core,
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
        report = json.loads(stdout)
        assert report["lanes"] is None, stderr.decode()[-2000:]  # one process: the one core
        assert report["events"] == report["last_seq"] and _position(engine) == report["last_seq"]
    assert default_count() == 1  # and a gatekeeper process beside the bus, where there is a second core


async def test_a_rebuild_judges_each_event_by_the_rules_it_was_applied_by(tmp_path: Path, server: EmbeddedNats) -> None:
    """A log applied by a version of the rules before awards were weighed against the budget
    holds an award beyond it, applied then. Rebuilt — in lanes: the calls are another process's —
    with the database's record of which rules applied the log, the award stands as it did; in a
    database without that record (a new one), the whole log is judged by today's rules, which
    refuse it, and that is recorded for the next rebuild."""
    from handlers.calls import CallApplication
    from handlers.rules import RULES
    from tests.handlers.test_calls_scenarios import COOPERATIVE, MEMBERS, OWNER, application, decided, published

    database_url = f"sqlite:///{tmp_path / 'network.db'}"
    bus = Bus(Settings(data_dir=tmp_path / "bus", nats_url=server.url, nats_creds=server.bus_creds, database_url=database_url),
              tracing=Tracing.off())
    await bus.start(ingress=False, state=False)
    call_id = "esf-2026-rules"
    events = [*MEMBERS, published(call_id), application(call_id, "app-1"),
              decided(call_id, "app-1", amount={"amount": "9000000.00", "currency": "EUR"})]  # the budget is 1.5 million
    for event in events:
        await bus.js.publish(log_subject(event), canonical_bytes(event), headers={"Nats-Msg-Id": event["id"]})
    connect = {"servers": [server.url], **server.connect_options()}
    engine = make_engine(database_url)
    migrate(engine)

    async def rebuilt() -> str:
        lanes = Lanes(rebuild_lanes(2), tmp_path / "scratch", held_rows=50_000)
        assert "call" in lanes.domains[1]  # (judged in the other lane's process)
        report = await rebuild(bus.js, NetworkService(engine, network(lanes.domains[0])), connect=connect, lanes=lanes)
        assert report.failures == []
        with engine.connect() as connection:
            return str(connection.execute(sa.select(CallApplication.status).where(  # type: ignore[call-overload]
                CallApplication.application_id == "app-1")).scalar())

    def epochs() -> list[tuple[int, int]]:
        with engine.connect() as connection:
            return [(int(s), int(v)) for s, v in connection.execute(sa.text("SELECT from_seq, version FROM rules_epochs ORDER BY from_seq"))]

    try:
        with engine.begin() as connection:  # applied by the rules before their first version, as the migration records it
            connection.execute(sa.text("INSERT INTO rules_epochs (from_seq, version) VALUES (1, 0)"))
        assert await rebuilt() == "awarded"
        assert epochs() == [(1, 0)]  # (kept by the rebuild)
        with engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM rules_epochs"))
        assert await rebuilt() == "received"  # refused: over budget
        assert epochs() == [(1, RULES)]
    finally:
        engine.dispose()
        await bus.stop()
