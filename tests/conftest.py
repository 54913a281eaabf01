"""Shared fixtures: a real nats-server per test session, a running bus, members of every kind."""

from __future__ import annotations

import argparse
import asyncio
import atexit
import itertools
import json
import os
import random
import re
import resource
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from typing import Any

import nats
import pluggy
import pytest
import sqlalchemy as sa
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from bus.client import offer
from bus.runtime import Bus, keep_startup_objects
from bus.server import EmbeddedNats
from handlers.db import make_engine, migrate
from ops.settings import Settings
from tests.postgres import DatabasePool, postgres_url

FIXTURES = Path(__file__).parent / "fixtures" / "events"
OPERATOR = "operator"


def _module_share(item: pytest.Item) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The module of a test and the values of its parameters wider than a test (a module's
    ``gateway`` on SQLite or PostgreSQL): the tests that share one set-up of the module's fixtures."""
    if not isinstance(item, pytest.Function) or not hasattr(item, "callspec"):
        return str(item.path), ()
    fixtures = item._fixtureinfo.name2fixturedefs
    return str(item.path), tuple(sorted((name, str(value)) for name, value in item.callspec.params.items()
                                        if name in fixtures and fixtures[name][-1].scope != "function"))


def _reorder(items: list[pytest.Item], order: str) -> None:
    """``--order``: the tests that share a set-up of their module's fixtures, reversed or shuffled
    among themselves; the modules, and those set-ups, stay where they are."""
    if order == "collected":
        return
    shuffle = random.Random(int(order.removeprefix("shuffle:"))).shuffle if order.startswith("shuffle:") else None
    reordered: list[pytest.Item] = []
    for _, shared in itertools.groupby(items, key=_module_share):
        together = list(shared)
        if shuffle is not None:
            shuffle(together)
        else:
            together.reverse()
        reordered += together
    items[:] = reordered


def _order(value: str) -> str:
    if value in ("collected", "reverse") or re.fullmatch(r"shuffle:\d+", value):
        return value
    raise argparse.ArgumentTypeError(f"{value!r}: collected, reverse or shuffle:SEED (a whole number)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``early`` each at the head of another worker's share, tests marked ``quick``
    last, the rest in collection order between.

    A long test that works one core (the 10,000-entry portal sync, the type check), collected
    last, kept the suite waiting on it with the other core idle; put first together, both went to
    the first worker, one after the other. pytest-xdist's work-stealing scheduler (``--dist
    worksteal``, as ``make test`` runs it) gives each worker a quarter of the order, in one piece,
    and a worker that has run out takes half of what another still has, from its end: there,
    hundreds of tests of milliseconds are shared out evenly, where tests that wait on servers and
    timeouts left cores idle (its default scheduler, ``load``, hands out the order in batches it
    never takes back: one worker ran the webhooks' tests for a minute after the others had
    finished). The order is made in each worker alike, from the worker count it is told."""
    _reorder(items, config.getoption("order"))
    early = [item for item in items if item.get_closest_marker("early") is not None]
    quick = [item for item in items if item.get_closest_marker("quick") is not None and item.get_closest_marker("early") is None]
    chosen = {id(item) for item in early + quick}
    rest = [item for item in items if id(item) not in chosen] + quick
    workerinput = getattr(config, "workerinput", {})
    workers = int(workerinput.get("workercount", 1))
    if workers == 1:
        items[:] = early + rest
    elif workerinput.get("dist", config.getoption("dist", "no")) == "worksteal":
        # Each worker's share as the scheduler cuts it, its early tests first.
        ordered: list[pytest.Item] = []
        for worker in range(workers):
            head = early[worker::workers]
            size = max((len(items) - len(ordered)) // (workers - worker) - len(head), 0)
            ordered += head + rest[:size]
            rest = rest[size:]
        items[:] = ordered + rest
    else:  # the default scheduler's first batches are a quarter of each worker's share
        batch = max(len(items) // workers // 4, 2)
        for index, item in enumerate(early):
            rest.insert(min(index * batch, len(rest)), item)
        items[:] = rest


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist's, on the controller: tell each worker the scheduler, which a worker's own
    options do not carry (``--dist`` reads ``no`` there)."""
    node.workerinput["dist"] = node.config.getoption("dist")


# --- the garbage collector in a test process ------------------------------------------------------


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """What collection built (the tests' modules and all they import: FastAPI, SQLAlchemy,
    hypothesis, the schemas …) lives as long as the test process: the garbage collector stops
    walking it, as a bus's does once it has started (``keep_startup_objects``). In a whole run the
    four workers spent 57 s of their 500 s of CPU collecting garbage, 43 s of it in full
    collections walking all that; with this and the next, 24 s of 453 s."""
    keep_startup_objects()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    """Once a module's tests are done and its fixtures gone, what is still alive is mostly what
    lives as long as the process (modules, caches, the session's fixtures): it is kept out of the
    collector's walks too. (An object of it that a cycle holds and that dies later is not
    collected: memory, not behaviour.)"""
    if nextitem is None or nextitem.path != item.path:
        keep_startup_objects()


# --- where the suite's CPU goes: ``--cpu-report N`` ------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-report", type=int, default=0, metavar="N",
        help="after the run, list the N tests that took the most CPU: the test process's own and that of the processes "
             "it started (nats-servers, collabbus commands), counted when they are reaped",
    )
    parser.addoption(
        "--order", type=_order, default="collected", metavar="ORDER",
        help="the order of the tests within each module (and each value of its module-wide parameters): collected, "
             "reverse or shuffle:SEED — a test that passes only after, or before, another shows (xdist's work "
             "stealing runs a module's tests in other orders too)",
    )


def _cpu_seconds() -> float:
    from tests import commands

    own, reaped = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime + commands.cpu_seconds


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.config.getoption("cpu_report"):
        item.stash[_CPU_AT_START] = _cpu_seconds()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    outcome = yield
    started = item.stash.get(_CPU_AT_START, None)
    if call.when == "teardown" and started is not None:  # (the report travels from an xdist worker with its properties)
        outcome.get_result().user_properties.append(("cpu_seconds", round(_cpu_seconds() - started, 2)))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    shown = config.getoption("cpu_report")
    if not shown:
        return
    spent = [(dict(report.user_properties)["cpu_seconds"], report.nodeid)
             for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "teardown" and "cpu_seconds" in dict(getattr(report, "user_properties", ()))]
    spent.sort(reverse=True)
    terminalreporter.write_sep("=", f"CPU: {sum(s for s, _ in spent):,.0f} s in {len(spent)} tests; the {min(shown, len(spent))} that took most")
    for seconds, nodeid in spent[:shown]:
        terminalreporter.write_line(f"{seconds:8.1f} s  {nodeid}")


_CPU_AT_START = pytest.StashKey[float]()


def load_fixtures() -> dict[str, dict[str, Any]]:
    """type → {"as", "kind", "event"} for every catalog fixture."""
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(FIXTURES.glob("*.json"))}


def samples(text: str, name: str) -> dict[str, float]:
    """The samples of metric ``name`` in a Prometheus text, by their one label's value ("" for none)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                found[next(iter(sample.labels.values()), "")] = sample.value
    return found


def unique(prefix: str = "t") -> str:
    """A fresh id usable as event id and aggregate id."""
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    # Tests do not survive power cuts; JetStream's default sync interval keeps them fast.
    server = EmbeddedNats(tmp_path_factory.mktemp("nats"), port=0, sync_always=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A nats-server of the test's own (for a test that restarts it, or needs its log to itself)."""
    nats_server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    await nats_server.astart()
    yield nats_server
    await nats_server.astop()


@pytest.fixture(scope="session")
def settings(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return Settings(data_dir=tmp_path_factory.mktemp("data"), nats_url=nats_server.url, nats_creds=nats_server.bus_creds,
                    operator=OPERATOR)


@pytest.fixture(scope="session")
async def bus(settings: Settings) -> AsyncIterator[Bus]:
    running = Bus(settings)
    await running.start(state=False)  # the gate alone; scenario tests run their own network consumers
    yield running
    await running.stop()


@pytest.fixture(scope="session")
async def partner(nats_server: EmbeddedNats, bus: Bus) -> AsyncIterator[Client]:
    """A NATS connection of another process that offers events as any member (the operator, the
    fixtures' institutions), so it holds the bus's credentials; what a member's own credentials
    allow is tested in tests/bus/test_creds.py."""
    nc = await nats.connect(nats_server.url, name="partner", **nats_server.connect_options())
    yield nc
    await nc.close()


async def join(nc: Client, institution: str, kind: str, country: str = "FI", **extra: Any) -> None:
    """The operator admits a member."""
    event = {
        "specversion": "1.0",
        "id": unique("join"),
        "source": f"/institutions/{OPERATOR}",
        "type": "institution.joined",
        "subject": institution,
        "data": {"id": institution, "name": {"en": institution}, "kind": kind, "country": country, **extra},
    }
    verdict = await offer(nc, OPERATOR, event)
    assert verdict.accepted, verdict.as_dict()


@pytest.fixture(scope="session")
async def members(partner: Client) -> dict[str, str]:
    """The institutions the fixtures publish as, joined once per session: id → kind."""
    wanted: dict[str, str] = {}
    for fixture in load_fixtures().values():
        if fixture["kind"] != "operator":
            wanted[fixture["as"]] = fixture["kind"]
    for institution, kind in wanted.items():
        await join(partner, institution, kind)
    return wanted


# --------------------------------------------------------------------------- databases
# Every read-model test body runs on SQLite and on PostgreSQL (one throw-away cluster per test process).


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str | None]:
    with postgres_url() as url:
        try:
            yield url
        finally:
            for template, pool in list(_pools.items()):
                pool.close(template=True)
                del _pools[template]
                _templates.pop(f"postgresql:{url}", None)


_templates: dict[str, str] = {}


def _template(kind: str, pg_server_url: str | None) -> str:
    """A database migrated once per test process; each test gets a copy (migrating is slow)."""
    key = f"{kind}:{pg_server_url}"
    if key not in _templates:
        if kind == "sqlite":
            directory = tempfile.mkdtemp(prefix="collabbus-template-")
            atexit.register(shutil.rmtree, directory, True)  # removed when the test process ends
            path = Path(directory) / "network.db"
            url = f"sqlite:///{path}"
            _templates[key] = str(path)
        else:
            assert pg_server_url is not None
            name = f"template_{os.getpid()}_{uuid.uuid4().hex[:6]}"
            admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as connection:
                connection.execute(sa.text(f"CREATE DATABASE {name}"))
            admin.dispose()
            url = pg_server_url.rsplit("/", 1)[0] + f"/{name}"
            _templates[key] = name
        engine = make_engine(url)
        migrate(engine)
        engine.dispose()  # also checkpoints SQLite's write-ahead log into the file
    return _templates[key]


def require_postgres(pg_server_url: str | None) -> str:
    """The session's PostgreSQL; a test without one fails in CI and is skipped elsewhere."""
    if pg_server_url is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is required in CI: no PostgreSQL binaries or COLLABBUS_TEST_POSTGRES_URL")
        pytest.skip("no PostgreSQL on this machine (set COLLABBUS_TEST_POSTGRES_URL)")
    return pg_server_url


def fresh_database(kind: str, tmp_path: object, pg_server_url: str | None) -> Iterator[str]:
    """A migrated database of ``kind`` for one test, its own while it runs: a copy of the
    template (SQLite), or one emptied after an earlier test or copied (PostgreSQL)."""
    if kind == "sqlite":
        target = Path(str(tmp_path)) / "network.db"
        shutil.copyfile(_template("sqlite", None), target)
        yield f"sqlite:///{target}"
        return
    pg_server_url = require_postgres(pg_server_url)
    template = _template("postgresql", pg_server_url)
    pool = _pools.get(template)
    if pool is None:
        pool = _pools[template] = DatabasePool(pg_server_url, template)
    name = pool.take()
    try:
        yield pool.url(name)
    finally:
        pool.give_back(name)


_pools: dict[str, DatabasePool] = {}
"""template → the databases copied from it (``tests.postgres.DatabasePool``)."""


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: object, pg_server_url: str | None) -> Iterator[str]:
    yield from fresh_database(request.param, tmp_path, pg_server_url)


async def all_stopped(pid: int, timeout: float = 5.0) -> None:
    """Until every thread of the process ``pid`` is stopped (SIGSTOP reaches them one by one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in Path(f"/proc/{pid}/task").iterdir()]
        if all(state in "Tt" for state in states):
            return
        assert loop.time() < deadline, f"the process {pid} is not stopped: {states}"
        await asyncio.sleep(0.01)
