"""Scenario tests read like the contract: given events → when an event → then state and emitted events.

``envelope`` builds an event as a partner would offer it; a ``Scenario`` applies events and answers
with the derived events the workflows emitted.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from datetime import datetime, timezone
from typing import Any, Protocol

from sqlalchemy import Engine
from sqlmodel import Session

from handlers.db import make_engine, session_scope
from handlers.network import Event, Network, derived_type
from schemas import registry


def envelope(event_type: str, source: str, data: dict[str, Any], *, id: str | None = None, **attributes: Any) -> dict[str, Any]:
    """A CloudEvent of ``event_type`` offered by ``source`` (an institution id)."""
    spec = registry.spec_for(event_type)
    return {
        "specversion": "1.0",
        "id": id or f"ev-{uuid.uuid4().hex}",
        "source": f"/institutions/{source}",
        "type": event_type,
        "subject": str(data[spec.subject_field]),
        "time": datetime.now(timezone.utc).isoformat(),
        "datacontenttype": "application/json",
        **attributes,
        "data": data,
    }


class Scenario(Protocol):
    """Given/when/then over the network's handlers."""

    async def given(self, *events: dict[str, Any]) -> None: ...

    async def when(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Apply one event; returns the envelopes of the events the workflows derived from it."""

    async def tick(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Let the timers (deadlines) run; returns what they emitted."""

    def session(self) -> Any:
        """A context manager giving a session to read the state."""


class DirectScenario:
    """Applies events straight through :class:`Network` (no NATS): for unit-level scenarios."""

    def __init__(self, engine: Engine, network: Network) -> None:
        self.engine = engine
        self.network = network
        self.seq = 0

    async def given(self, *events: dict[str, Any]) -> None:
        for event in events:
            await self.when(event)

    async def when(self, event: dict[str, Any], *, logged_at: datetime | None = None) -> list[dict[str, Any]]:
        self.seq += 1
        typed = Event.from_envelope(event, seq=self.seq, logged_at=logged_at or datetime.now(timezone.utc))
        with session_scope(self.engine) as session:
            derived = self.network.apply(session, typed, live=True)
        return [dict(d.envelope) for d in derived]

    async def tick(self, now: datetime | None = None) -> list[dict[str, Any]]:
        with session_scope(self.engine) as session:
            derived = self.network.tick(session, now)
        return [dict(d.envelope) for d in derived]

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine) as session:
            yield session


class BusScenario:
    """Offers events through the gatekeeper of a real bus on a real nats-server and waits until the
    network consumer has applied them and the relay has logged what the workflows derived."""

    def __init__(self, bus: Any) -> None:
        self.bus = bus

    async def given(self, *events: dict[str, Any]) -> None:
        for event in events:
            await self.when(event)

    async def when(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        import orjson

        institution = str(event["source"]).removeprefix("/institutions/")
        if event["type"].startswith("institution.") and institution != self.bus.settings.operator:
            event = {**event, "source": f"/institutions/{self.bus.settings.operator}"}
            institution = self.bus.settings.operator
        verdict = await self.bus.gate.admit(institution, orjson.dumps(event))
        assert verdict.accepted, f"the gate refused a scenario event: {verdict.as_dict()}"
        await self.settle(verdict.seq)
        return await self._derived_from(event["id"], after=verdict.seq)

    async def tick(self, now: datetime | None = None) -> list[dict[str, Any]]:
        import asyncio

        relay = self.bus.relay
        async with relay.db_lock:
            def run() -> list[dict[str, Any]]:
                return [dict(d.envelope) for d in self.bus.service.tick(now)]

            # The log's end before the tick: once the lock is let go, the relay's own round may
            # publish what the tick decided before this reads the log again.
            last = (await self.bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
            derived = await asyncio.to_thread(run)
        await relay.drain()
        await self.settle(last + len(derived))
        return derived

    def _relay_state(self) -> str:
        """How the relay stands, for a failed wait: whether its loop still runs, and what it published."""
        relay = self.bus.relay
        task = relay._task
        running = "has no loop" if task is None else "runs" if not task.done() else (
            f"loop ended: {task.exception()!r}" if not task.cancelled() and task.exception() else "loop ended")
        return f"{running}, published {relay.published}"

    async def settle(self, seq: int | None) -> None:
        """Wait until the consumer applied ``seq`` and the outbox is empty and applied too."""
        import asyncio

        service = self.bus.service
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            position = await asyncio.to_thread(service.position)
            pending = await asyncio.to_thread(service.outbox, peek=True)
            last = (await self.bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
            if position >= (seq or 0) and not pending and position >= last:
                return
            assert loop.time() < deadline, (
                f"the network consumer did not catch up (at {position}, log at {last}, waiting for {seq}; "
                f"{len(pending)} derived events unpublished; the relay {self._relay_state()})")
            self.bus.relay.wake.set()
            # Woken as soon as the consumer applies more of the log; looked at again after a
            # while in any case (the relay's marking an outbox row published wakes nobody).
            await self.bus.applied.wait_beyond(position, 0.05)

    async def _derived_from(self, cause: str, *, after: int | None) -> list[dict[str, Any]]:
        import orjson

        last = (await self.bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
        derived = []
        for seq in range((after or 0) + 1, last + 1):
            logged = orjson.loads((await self.bus.js.get_msg("COLLAB_EVENTS", seq)).data)
            if logged.get("causationid") == cause:
                derived.append(logged)
        return derived

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.bus.engine) as session:
            yield session


@asynccontextmanager
async def rebuilt(bus: Any, database_url: str, directory: Path, pg_server_url: str | None) -> AsyncIterator[Engine]:
    """A database of the kind of ``database_url`` (a new one, dropped after) holding ``bus``'s log
    replayed by a rebuild, which met no failure."""
    from bus.rebuild import rebuild
    from bus.server import BUS_INBOX_PREFIX
    from handlers.routes import network
    from handlers.service import NetworkService
    from tests.conftest import fresh_database

    kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    directory.mkdir()
    with contextmanager(fresh_database)(kind, directory, pg_server_url) as url:
        engine = make_engine(url)
        try:
            connect = {"servers": [bus.settings.nats_url], "user_credentials": str(bus.settings.nats_creds),
                       "inbox_prefix": BUS_INBOX_PREFIX}
            report = await rebuild(bus.js, NetworkService(engine, network()), connect=connect)
            assert report.failures == [], report.failures
            yield engine
        finally:
            engine.dispose()


def applied_by_rules(engine: Engine, log: list[dict[str, Any]], *, older: int, newer_from: int = 5) -> dict[str, list[str]]:
    """Apply ``log`` in one batch as a rebuild does, its events before #``newer_from`` (the first
    four) as rules of version ``older`` applied them and the rest as today's; what was derived
    from each (cause → the types of the events derived from it, sorted)."""
    import sqlalchemy as sa

    from handlers.rules import RULES
    from handlers.routes import network
    from handlers.service import LoggedItem, NetworkService

    service = NetworkService(engine, network())
    try:
        service.use_rules_epochs([(1, older), (newer_from, RULES)])  # (a rebuild's record: version ``older`` applied the first)
        at = datetime.now(timezone.utc)
        assert service.apply_batch([LoggedItem(seq, event, at) for seq, event in enumerate(log, 1)], live=False)[:2] == (len(log), None)
        with engine.connect() as connection:
            derived = connection.execute(sa.text("SELECT caused_by, event_id FROM applied_events WHERE caused_by IS NOT NULL")).all()
        answers: dict[str, list[str]] = {}
        for cause, event_id in derived:
            answers.setdefault(cause, []).append(derived_type(event_id) or event_id)
        return {cause: sorted(types) for cause, types in answers.items()}
    finally:
        service.close()
