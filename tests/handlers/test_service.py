"""The network service's port for the consumer: batches of logged events, on both databases."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from typing import Any

import pytest
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


def test_a_reviewer_taken_off_and_assigned_again_in_one_batch_stays_assigned(engine: Engine) -> None:
    """A row deleted and added again under the same key within one transaction: the second
    event must see the first's deletion, not the row waiting to be deleted."""
    from handlers.routes import network
    from handlers.validations import ValidationReviewer
    from tests.handlers.harness import envelope

    validation_id, reviewer, coordinator, requester = unique("val"), unique("uni"), unique("centre"), unique("town")
    members = [envelope("institution.joined", "operator", {"id": i, "name": {"en": i}, "kind": kind, "country": "FI"})
               for i, kind in ((coordinator, "competence_centre"), (requester, "municipality"), (reviewer, "university"))]
    about = {"validation_id": validation_id}
    events = [
        *members,
        envelope("validation.requested", requester, {**about, "external_ref": {"system": "innokyla", "id": "1"},
                                                     "coordinator": coordinator, "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2}}),
        envelope("validation.reviewer_assigned", coordinator, {**about, "reviewer": reviewer}),
        envelope("validation.reviewer_unassigned", coordinator, {**about, "reviewer": reviewer}),
        envelope("validation.reviewer_assigned", coordinator, {**about, "reviewer": reviewer}),
    ]
    service = NetworkService(engine, network())
    now = datetime.now(timezone.utc)
    try:
        applied, failure, derived = service.apply_batch([LoggedItem(seq, event, now) for seq, event in enumerate(events, 1)])
        assert (applied, failure, derived) == (len(events), None, 0), failure
        with engine.connect() as connection:
            rows = connection.execute(sa.select(ValidationReviewer.__table__.c.reviewer)  # type: ignore[attr-defined]
                                      .where(ValidationReviewer.__table__.c.validation_id == validation_id)).all()  # type: ignore[attr-defined]
        assert [row[0] for row in rows] == [reviewer]
    finally:
        service.close()


@pytest.mark.parametrize("first_batch", [0, 3], ids=["one-batch", "registered-in-an-earlier-batch"])
def test_a_partner_removed_and_joining_again_within_a_batch_is_a_partner(engine: Engine, first_batch: int) -> None:
    """Rows deleted within a transaction, whether added in it or before: the deletion does not
    fail the batch, and an event adding the same row again later in the batch (and one reading
    the project's partners after it) sees it as it then is."""
    from handlers.projects import ProjectPartner
    from handlers.routes import network
    from tests.handlers.harness import envelope

    owner, partner, centre = unique("town"), unique("coop"), unique("centre")
    members = [envelope("institution.joined", "operator", {"id": i, "name": {"en": i}, "kind": kind, "country": "FI"})
               for i, kind in ((owner, "municipality"), (partner, "cooperative"), (centre, "competence_centre"))]
    project_id = unique("p")
    registration = {**FIXTURE["event"]["data"], "project_id": project_id, "owner": owner,
                    "partners": [{"institution": partner, "role": "partner", "relation": "partnership"}]}
    events = [
        *members,  # (3 events: an earlier batch ends here when first_batch is 3)
        envelope("project.registered", owner, registration),
        envelope("project.updated", owner, {"project_id": project_id, "changes": {"partners": []}}),
        envelope("project.partner_joined", owner, {"project_id": project_id,
                                                   "partner": {"institution": partner, "role": "supporter", "relation": "coordination"}}),
        envelope("project.updated", owner, {"project_id": project_id, "changes": {"partners": []}}),
        envelope("project.partner_joined", owner, {"project_id": project_id,
                                                   "partner": {"institution": partner, "role": "funder", "relation": "donation"}}),
        # A partner may put the project forward for validation: read from the partners as they now are.
        envelope("validation.requested", partner, {
            "validation_id": unique("val"), "project_id": project_id, "coordinator": centre,
            "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2}}),
    ]
    items = [LoggedItem(seq, event, datetime.now(timezone.utc)) for seq, event in enumerate(events, 1)]
    service = NetworkService(engine, network())
    try:
        for batch in (items[:first_batch], items[first_batch:]):
            if batch:
                applied, failure, derived = service.apply_batch(batch)
                assert (applied, failure, derived) == (len(batch), None, 0), failure  # nothing refused
        with engine.connect() as connection:
            table = ProjectPartner.__table__  # type: ignore[attr-defined]
            rows = connection.execute(sa.select(table.c.institution, table.c.role).where(table.c.project_id == project_id)).all()
        assert [tuple(row) for row in rows] == [(partner, "funder")]
    finally:
        service.close()


def test_the_derived_events_committed_are_handed_to_the_relay_in_order(engine: Engine) -> None:
    """What a batch decided is handed over once it is committed (``fresh``), in the order decided,
    and stays in the outbox until the log confirms it; while the outbox may hold anything else
    (at start, after the timers decided something) nothing is handed over and it is to be read."""
    from handlers.network import Context

    def close_call(ctx: Context) -> None:
        event = ctx.event
        assert event is not None
        ctx.emit("call.closed", {"call_id": event.subject, "reason": "cancelled"}, source="closer")

    def timer(ctx: Context) -> None:
        if ctx.now.year == 2000:  # only when asked to
            ctx.emit("call.closed", {"call_id": "by-timer", "reason": "cancelled"}, source="closer", cause="timer")

    service = NetworkService(engine, Network(Routes().add(deciders={"project.registered": close_call}, timers=[timer])))
    now = datetime.now(timezone.utc)
    first, second, third = (registered(unique("p")) for _ in range(3))
    try:
        assert service.apply_batch([LoggedItem(1, first, now)])[2] == 1
        assert service.fresh() is None  # the outbox was never read: it may hold anything
        waiting = service.outbox()
        assert [json.loads(body)["subject"] for _, body in waiting] == [first["subject"]]
        assert service.fresh() == []
        assert service.apply_batch([LoggedItem(2, second, now), LoggedItem(3, third, now)])[2] == 2
        handed = service.fresh()
        assert handed is not None and [json.loads(body)["subject"] for _, body in handed] == [second["subject"], third["subject"]]
        assert [event_id for event_id, _ in handed] == [event_id for event_id, _ in service.outbox()][1:]  # still in the outbox
        assert service.fresh() == []  # handed over once
        service.outbox_done([event_id for event_id, _ in service.outbox()])
        assert service.fresh() == [] and service.outbox() == []
        assert service.tick(datetime(2000, 1, 1, tzinfo=timezone.utc)) and service.fresh() is None  # the timers' own
        assert [json.loads(body)["subject"] for _, body in service.outbox()] == ["by-timer"]
    finally:
        service.close()
