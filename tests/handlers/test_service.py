"""The network service's port for the consumer: batches of logged events, on both databases."""

from __future__ import annotations

import copy
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import Engine

from handlers.network import Event, Network, Routes
from handlers.service import LoggedItem, NetworkService
from tests.conftest import load_fixtures, unique

FIXTURE = load_fixtures()["project.registered"]


def registered(project_id: str) -> dict[str, Any]:
    event = copy.deepcopy(FIXTURE["event"])
    event["id"] = unique("ev")
    event["subject"] = event["data"]["project_id"] = project_id
    return event


def test_a_copy_of_an_applied_event_is_not_read_again_only_its_place_in_the_log_is_noted(engine: Engine) -> None:
    """A derived event's copy arriving from the log, or a redelivered event, changes nothing: it
    is not validated again (so not even data the schema no longer reads stops the consumer), and
    the position moves past it."""
    projected: list[str] = []

    def project(_session: Any, event: Event[Any]) -> None:
        projected.append(event.subject)

    service = NetworkService(engine, Network(Routes().add(projections={"project.registered": project})))
    now = datetime.now(timezone.utc)
    first, second = registered(unique("p")), registered(unique("p"))
    try:
        assert service.apply_batch([LoggedItem(1, first, now)])[:2] == (1, None)
        copy_of_first = {**first, "data": {**first["data"], "title": 5}}  # not what the schema reads
        assert service.apply_batch([LoggedItem(2, copy_of_first, now), LoggedItem(3, second, now)])[:2] == (2, None)
        assert projected == [first["subject"], second["subject"]]
        assert service.position() == 3
        with engine.connect() as connection:
            rows = connection.execute(sa.text("SELECT event_id, seq FROM applied_events")).all()
        assert sorted(rows, key=lambda row: row[1]) == [(first["id"], 1), (second["id"], 3)]
    finally:
        service.close()
