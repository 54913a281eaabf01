"""The read models do not depend on how the log is cut into batches.

The live consumer applies whatever arrived together as one transaction, a rebuild thousands of
events at a time, a retry one event: the state must come out the same, or a rebuilt state would
differ from the live one. The demo network's stories (members, projects with partners, calls and
their deadline, a validation decided by its rule, an innovation day with its waitlist and a
cancellation) with edits among them that take rows away and give them back, are applied in one
batch, one event at a time and cut at random places; every table must be the same.
"""

from __future__ import annotations

import contextlib
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from handlers.db import make_engine, migrate, table_checksums
from handlers.routes import network
from handlers.service import LoggedItem, NetworkService
from ops import demo_data as d
from tests.conftest import fresh_database
from tests.handlers.harness import envelope

START = datetime(2026, 11, 2, 9, 0, tzinfo=timezone.utc)


def _edits() -> list[dict[str, Any]]:
    """Rows taken away and given back: a partner joining, the partners replaced, the partner
    joining again; a reviewer taken off and assigned again (before it reviews)."""
    project = d.PROJECTS[0]
    owner, project_id = project["owner"], project["project_id"]

    def joins(role: str, relation: str) -> dict[str, Any]:
        partner = {"institution": d.LUT, "role": role, "relation": relation}
        return envelope("project.partner_joined", owner, {"project_id": project_id, "partner": partner})

    validation = {"validation_id": d.VALIDATION, "reviewer": d.DIAK}
    return [
        joins("partner", "partnership"),
        envelope("project.updated", owner, {"project_id": project_id, "changes": {"partners": []}}),
        joins("supporter", "coordination"),
        envelope("validation.reviewer_unassigned", d.COMPETENCE_CENTRE, validation),
        envelope("validation.reviewer_assigned", d.COMPETENCE_CENTRE, validation),
    ]


def _log() -> list[LoggedItem]:
    """The demo's offers in order, each logged a second after the one before (a wait for a
    deadline moves the clock to it), with the edits after Diak's assignment as a reviewer."""
    plan = d.Plan(operator="operator")
    events: list[tuple[datetime, dict[str, Any]]] = []
    at = START
    for step in [*plan.opening(), *plan.timed(START)]:
        if isinstance(step, d.WaitUntil):
            at = max(at, step.moment)
        elif isinstance(step, d.Offer):
            offered = [step.event]
            if step.event["id"].endswith(f"assigned-{d.DIAK}"):
                offered += _edits()
            for event in offered:
                at += timedelta(seconds=1)
                events.append((at, event))
    return [LoggedItem(seq, event, logged_at) for seq, (logged_at, event) in enumerate(events, 1)]


def _apply(url: str, items: list[LoggedItem], cuts: list[int]) -> dict[str, str]:
    """Apply ``items`` in batches ending before each of ``cuts``; the tables' checksums."""
    engine = make_engine(url)
    migrate(engine)
    service = NetworkService(engine, network())
    try:
        start = 0
        for end in [*cuts, len(items)]:
            batch = items[start:end]
            applied, failure, _ = service.apply_batch(batch, live=False)
            assert (applied, failure) == (len(batch), None), (start, failure)
            start = end
        return table_checksums(engine)
    finally:
        service.close()
        engine.dispose()


def test_the_read_models_are_the_same_however_the_log_is_cut_into_batches(
    database_url: str, tmp_path: Path, pg_server_url: str | None
) -> None:
    items = _log()
    types = {item.envelope["type"] for item in items}
    assert {"project.updated", "validation.reviewer_unassigned", "innovation_day.registration_cancelled"} <= types
    whole = _apply(database_url, items, [])
    random_cuts = random.Random(20261203)
    cuts = {
        "one event at a time": list(range(1, len(items))),
        "12 random cuts": sorted(random_cuts.sample(range(1, len(items)), 12)),
        "40 random cuts": sorted(random_cuts.sample(range(1, len(items)), 40)),
    }
    kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
    for index, (name, at) in enumerate(cuts.items()):
        place = tmp_path / f"cut-{index}"
        place.mkdir()
        with contextlib.contextmanager(fresh_database)(kind, place, pg_server_url) as url:
            differing = {table for table, checksum in _apply(url, items, at).items() if whole.get(table) != checksum}
        assert not differing, f"{name}: {sorted(differing)} differ from the state applied in one batch"
