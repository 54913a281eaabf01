"""The network service's port for the consumer: batches of logged events, on both databases."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from collections.abc import Callable
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
        peeked = service.outbox(peek=True)  # someone else looking (how much waits) takes nothing from the relay
        assert [json.loads(body)["subject"] for _, body in peeked] == [first["subject"], second["subject"], third["subject"]]
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


def _two_processes(database_url: str) -> tuple[list[list[str]], list[NetworkService], list[Engine]]:
    """Two services on one database, each with an engine of its own (two bus processes), each
    noting what it projected."""
    from handlers.db import make_engine

    def noting(mine: list[str]) -> Callable[[Any, Event[Any]], None]:
        return lambda _session, event: mine.append(event.subject)

    projected: list[list[str]] = [[], []]
    engines = [make_engine(database_url) for _ in range(2)]
    services = [NetworkService(engine, Network(Routes().add(projections={"project.registered": noting(mine)})))
                for engine, mine in zip(engines, projected)]
    return projected, services, engines


def test_a_batch_another_process_applied_meanwhile_is_not_applied_again(database_url: str) -> None:
    """A bus that stalled with a batch in hand while another took over the log: when it goes on,
    the events the other applied are not applied a second time — its transaction finds the
    position moved, writes nothing and says so (``PositionTaken``); the other's next batch flows.
    Likewise the other way round: the bus that took over finds what the stalled one committed."""
    from handlers.positions import PositionTaken

    projected, (stalled, taker), engines = _two_processes(database_url)
    now = datetime.now(timezone.utc)
    events = [registered(unique("p")) for _ in range(6)]
    items = [LoggedItem(seq, event, now) for seq, event in enumerate(events, 1)]
    try:
        assert stalled.apply_batch(items[:1])[:2] == (1, None)
        assert taker.apply_batch(items[1:3])[:2] == (2, None)  # the taker applies #2–#3
        with pytest.raises(PositionTaken, match="up to #3 .* a batch from #2"):
            stalled.apply_batch(items[1:4])  # the stalled one's batch #2–#4 (#4 is not applied either)
        with pytest.raises(PositionTaken):
            stalled.skip(2)
        assert projected == [[events[0]["subject"]], [events[1]["subject"], events[2]["subject"]]]
        assert taker.position() == 3
        assert stalled.apply_batch(items[3:4])[:2] == (1, None)  # from the position on it may (the lease decides)
        with pytest.raises(PositionTaken, match="up to #4"):
            taker.apply_batch(items[3:6])  # the taker finds what the other committed
        assert taker.apply_batch(items[4:6])[:2] == (2, None)
        assert projected[1] == [event["subject"] for event in (events[1], events[2], events[4], events[5])]
        with engines[0].connect() as connection:
            rows = connection.execute(sa.text("SELECT seq FROM applied_events ORDER BY seq")).scalars().all()
        assert rows == [1, 2, 3, 4, 5, 6]  # each applied once
    finally:
        for service in (stalled, taker):
            service.close()
        for engine in engines:
            engine.dispose()


def test_a_process_replaced_writes_nothing_once_another_took_the_position_over(database_url: str) -> None:
    """The bus that takes the log over takes the position over (its epoch moves on): from then on
    the one it replaced writes nothing — not a batch from the position on (which the new one has
    not applied yet: by the position alone it would go), not its timers, not a dead letter's skip
    — while the new one applies from there."""
    from handlers.positions import PositionTaken

    projected, (replaced, taker), engines = _two_processes(database_url)
    now = datetime.now(timezone.utc)
    events = [registered(unique("p")) for _ in range(3)]
    items = [LoggedItem(seq, event, now) for seq, event in enumerate(events, 1)]
    try:
        replaced.take_position()
        assert replaced.apply_batch(items[:1])[:2] == (1, None)
        assert replaced.tick(now) == []
        taker.take_position()
        with pytest.raises(PositionTaken, match=r"another process took over applying the log \(consumer network, applied up to #1\)"):
            replaced.apply_batch(items[1:2])
        with pytest.raises(PositionTaken):
            replaced.tick(now)
        with pytest.raises(PositionTaken):
            replaced.skip(2)
        assert taker.apply_batch(items[1:3])[:2] == (2, None)
        assert taker.tick(now) == []
        assert projected == [[events[0]["subject"]], [events[1]["subject"], events[2]["subject"]]]
        assert taker.position() == 3
    finally:
        for service in (replaced, taker):
            service.close()
        for engine in engines:
            engine.dispose()


def test_a_bus_taking_the_position_over_forgets_the_position_a_rebuild_cut_short_left(database_url: str) -> None:
    """A rebuild in lanes notes its first lane's progress as `network:rebuild` and drops it when
    it ends; cut short, the row stayed, and status showed it as a consumer falling behind for good."""
    _, services, engines = _two_processes(database_url)
    service = services[0]
    try:
        with engines[0].begin() as connection:
            connection.execute(sa.text("INSERT INTO consumer_positions (consumer, seq, epoch) VALUES ('network:rebuild', 920, 0)"))
        service.take_position()
        with engines[0].connect() as connection:
            left = connection.execute(sa.text("SELECT consumer FROM consumer_positions ORDER BY consumer")).scalars().all()
        assert left == ["network"]
    finally:
        for each in services:
            each.close()
        for engine in engines:
            engine.dispose()


def test_two_processes_applying_one_batch_at_once_apply_it_once(database_url: str) -> None:
    """The same batch applied by two processes at the same moment: the second waits for the
    first's transaction (the position is held from the start of it), then finds the position
    moved and applies nothing — its handlers never run."""
    import threading

    from handlers.positions import PositionTaken

    projected, (first, second), engines = _two_processes(database_url)
    inside, release = threading.Event(), threading.Event()
    slow_network = first.network

    def held(_session: Any, event: Event[Any]) -> None:
        inside.set()
        assert release.wait(10)
        projected[0].append(event.subject)

    slow_network.routes = Routes().add(projections={"project.registered": held})
    now = datetime.now(timezone.utc)
    items = [LoggedItem(seq, registered(unique("p")), now) for seq in (1, 2)]
    outcomes: dict[str, Any] = {}

    def apply(name: str, service: NetworkService) -> None:
        try:
            outcomes[name] = service.apply_batch(items)[:2]
        except Exception as exc:
            outcomes[name] = exc

    try:
        one = threading.Thread(target=apply, args=("first", first))
        one.start()
        assert inside.wait(10)  # the first is inside its transaction
        two = threading.Thread(target=apply, args=("second", second))
        two.start()
        two.join(0.5)
        assert two.is_alive(), outcomes  # waiting for the first's transaction
        release.set()
        one.join(10)
        two.join(10)
        assert outcomes["first"] == (2, None)
        assert isinstance(outcomes["second"], PositionTaken), outcomes
        assert projected == [[item.envelope["subject"] for item in items], []]
    finally:
        release.set()
        for service in (first, second):
            service.close()
        for engine in engines:
            engine.dispose()


def test_the_later_events_about_a_dead_lettered_thing_are_set_aside_until_it_is_let_go(engine: Engine) -> None:
    """Once an event is dead-lettered (skipped with its envelope), the later ones about the same
    thing fail as set aside behind it, whichever process takes the log over; other things flow.
    Letting it go (from another process: ``collabbus dlq``) is refused when an event was set
    aside since the caller looked; once let go, its events are applied again. A rebuild's
    replay and a dead letter's replay are never set aside."""
    from handlers.service import PARKED

    projected: list[str] = []

    def project(_session: Any, event: Event[Any]) -> None:
        projected.append(event.id)

    def network() -> Network:
        return Network(Routes().add(projections={"project.registered": project}))

    service, elsewhere = NetworkService(engine, network()), NetworkService(engine, network())
    now = datetime.now(timezone.utc)
    held, other = unique("p"), unique("p")
    dead, later, unrelated, last, replayed = (registered(held), registered(held), registered(other), registered(held), registered(held))
    try:
        service.take_position()
        service.skip(1, dead)  # dead-lettered: what it is about is set aside
        applied, failure, _ = service.apply_batch([LoggedItem(2, later, now), LoggedItem(3, unrelated, now)])
        assert applied == 0 and failure is not None
        assert (failure.error, failure.behind, failure.permanent) == (PARKED, 1, True)
        assert f"set aside behind #1: an earlier event about project {held}" in failure.detail
        service.skip(2, later)
        assert service.apply_batch([LoggedItem(3, unrelated, now)])[:2] == (1, None)
        assert projected == [unrelated["id"]] and service.position() == 3

        # Another process taking the log over sets it aside too; a dead letter's replay is applied.
        elsewhere.take_position()
        failure = elsewhere.apply_batch([LoggedItem(4, last, now)])[1]
        assert failure is not None and failure.behind == 1
        assert elsewhere.apply_batch([LoggedItem(1, replayed, now)], replay=True)[:2] == (1, None)

        # Let go by another process: not while an event was set aside since it looked.
        assert elsewhere.parked() == [("project", held, 1, 2)]
        elsewhere.skip(4, last)
        assert service.release(("project", held), 2) is False
        assert service.release(("project", held), 4) is True
        assert elsewhere.parked() == []
        assert elsewhere.apply_batch([LoggedItem(5, last, now)])[:2] == (1, None)  # (it still remembered it set aside)

        # A rebuild's replay (not live) is not set aside; nor is anything after a rebuild's reset.
        elsewhere.skip(6, later)
        assert elsewhere.apply_batch([LoggedItem(7, registered(held), now)], live=False)[:2] == (1, None)
        elsewhere.reset()
        assert elsewhere.parked() == []
    finally:
        service.close()
        elsewhere.close()


class ValidationOfAProject:
    """A project of a member municipality and a request to validate it, coordinated by a member
    competence centre, who assigns a member university to review it: fresh ids each time."""

    def __init__(self) -> None:
        from tests.handlers.harness import envelope

        self.owner, self.centre, self.reviewer = unique("town"), unique("centre"), unique("uni")
        self.project_id, self.validation_id = unique("p"), unique("val")
        self.members = [envelope("institution.joined", "operator", {"id": i, "name": {"en": i}, "kind": kind, "country": "FI"})
                        for i, kind in ((self.owner, "municipality"), (self.centre, "competence_centre"), (self.reviewer, "university"))]
        self.registration = envelope("project.registered", self.owner, {
            **FIXTURE["event"]["data"], "project_id": self.project_id, "owner": self.owner, "partners": []})
        self.request = envelope("validation.requested", self.owner, {
            "validation_id": self.validation_id, "project_id": self.project_id, "coordinator": self.centre,
            "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2}})
        self.assigned = envelope("validation.reviewer_assigned", self.centre, {"validation_id": self.validation_id, "reviewer": self.reviewer})


def test_a_validation_request_waits_behind_its_project_set_aside(engine: Engine) -> None:
    """A request to validate a project is judged on the project (unknown: refused; its sender
    must be the owner or a partner). While the project's registration is in the dead-letter
    queue the request is set aside behind it, and its validation with it, instead of being
    refused as ``unknown_project``; replayed in the log's order, the request is accepted."""
    from handlers.projects import Project
    from handlers.routes import network_routes
    from handlers.service import PARKED
    from handlers.validations import Validation

    v = ValidationOfAProject()
    owner, project_id, validation_id = v.owner, v.project_id, v.validation_id
    members, registration, request, assigned = v.members, v.registration, v.request, v.assigned
    poison = {registration["id"]}

    def failing(_session: Any, event: Event[Any]) -> None:
        if event.id in poison:
            raise RuntimeError("cannot apply it")

    service = NetworkService(engine, Network(network_routes().add(projections={"project.registered": failing})))
    now = datetime.now(timezone.utc)
    try:
        service.take_position()
        assert service.apply_batch([LoggedItem(seq, event, now) for seq, event in enumerate(members, 1)])[:2] == (3, None)
        failure = service.apply_batch([LoggedItem(4, registration, now)])[1]
        assert failure is not None and failure.error == "RuntimeError"
        service.skip(4, registration)

        applied, failure, derived = service.apply_batch([LoggedItem(5, request, now)])
        assert (applied, derived) == (0, 0) and failure is not None
        assert (failure.error, failure.behind) == (PARKED, 4)
        assert f"an earlier event about project {project_id} is in the dead-letter queue" in failure.detail
        service.skip(5, request)
        failure = service.apply_batch([LoggedItem(6, assigned, now)])[1]  # the validation waits with it
        assert failure is not None and (failure.error, failure.behind) == (PARKED, 5)
        service.skip(6, assigned)
        assert [(domain, subject) for domain, subject, _, _ in service.parked()] == [("project", project_id), ("validation", validation_id)]

        poison.clear()  # fixed: the dead letters are replayed in the log's order
        for seq, event in ((4, registration), (5, request), (6, assigned)):
            assert service.apply_batch([LoggedItem(seq, event, now)], replay=True) == (1, None, 0)
        with engine.connect() as connection:
            assert connection.execute(sa.select(Project.__table__.c.owner).where(  # type: ignore[attr-defined]
                Project.__table__.c.project_id == project_id)).scalar_one() == owner  # type: ignore[attr-defined]
            assert connection.execute(sa.select(Validation.__table__.c.status).where(  # type: ignore[attr-defined]
                Validation.__table__.c.validation_id == validation_id)).scalar_one() == "in_review"  # type: ignore[attr-defined]
    finally:
        service.close()


def test_a_validations_events_wait_behind_its_project_set_aside(engine: Engine) -> None:
    """Every event of a validation is judged with its project's parties (a reviewer may be
    neither owner nor partner): while an event about the project (a partner joining) is in the
    dead-letter queue, the validation's next event waits behind it — the reviewer it assigns,
    the partner who joined, is refused once both are replayed in the log's order."""
    from handlers.routes import network
    from handlers.service import PARKED
    from handlers.validations import ValidationReviewer
    from tests.handlers.harness import envelope

    v = ValidationOfAProject()
    owner, project_id, validation_id = v.owner, v.project_id, v.validation_id
    members, registration, request, assigned = v.members, v.registration, v.request, v.assigned
    joined = envelope("project.partner_joined", owner, {"project_id": project_id,
                                                        "partner": {"institution": v.reviewer, "role": "partner", "relation": "partnership"}})
    service = NetworkService(engine, network())
    now = datetime.now(timezone.utc)
    try:
        service.take_position()
        items = [LoggedItem(seq, event, now) for seq, event in enumerate([*members, registration, request], 1)]
        assert service.apply_batch(items)[:2] == (5, None)
        service.skip(6, joined)  # (as if its projection had failed)
        applied, failure, _ = service.apply_batch([LoggedItem(7, assigned, now)])
        assert applied == 0 and failure is not None
        assert (failure.error, failure.behind, failure.about) == (PARKED, 6, ("project", project_id))
        service.skip(7, assigned)
        for seq, event in ((6, joined), (7, assigned)):
            assert service.apply_batch([LoggedItem(seq, event, now)], replay=True)[:2] == (1, None)
        with engine.connect() as connection:
            reviewers = connection.execute(sa.select(ValidationReviewer.__table__.c.reviewer).where(  # type: ignore[attr-defined]
                ValidationReviewer.__table__.c.validation_id == validation_id)).all()  # type: ignore[attr-defined]
        assert reviewers == []  # a partner of the project by then: refused, as a rebuild would
    finally:
        service.close()


def test_what_the_workflows_read_of_other_domains_is_declared_with_them(engine: Engine) -> None:
    """The things of other domains each workflow judges an event on — what it waits behind when
    one of them is set aside: an application its applicant (membership, kind, country), the
    partners it names and its project (their membership; the project's owner and partners), an
    adoption its adopter, a validation request its project and coordinator, an assignment its
    reviewer (and the validation's project, once the validation is known)."""
    from sqlmodel import Session

    from handlers.routes import network
    from tests.handlers.harness import envelope

    fixtures = load_fixtures()
    application = fixtures["call.application_submitted"]["event"]
    adoption = envelope("project.adopted", "tr-tarsus-bld", {"adoption_id": "a-1", "project_id": "p-1", "adopter": "tr-tarsus-bld",
                                                             "support": ["study_visit"]})
    request = envelope("validation.requested", "tr-mersin-bb", {"validation_id": "v-1", "project_id": "p-1", "coordinator": "fi-thl",
                                                                "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2}})
    assigned = envelope("validation.reviewer_assigned", "fi-thl", {"validation_id": "v-1", "reviewer": "fi-lut"})
    registered = envelope("project.registered", "tr-mersin-bb", {**FIXTURE["event"]["data"], "project_id": "p-1", "owner": "tr-mersin-bb"})
    routes = network()
    with Session(engine) as session:
        assert routes.reads_of(session, application) == [("institution", "tr-genc-isi-koop"), ("institution", "tr-mersin-bb"),
                                                         ("institution", "tr-tarsus-bld"), ("project", "genc-isi-belediye-isbirligi")]
        assert routes.reads_of(session, adoption) == [("institution", "tr-tarsus-bld")]
        assert routes.reads_of(session, request) == [("project", "p-1"), ("institution", "fi-thl")]
        assert routes.reads_of(session, assigned) == [("institution", "fi-lut")]  # (no such validation yet)
        assert routes.reads_of(session, registered) == []


def test_a_days_meetings_wait_for_an_innovators_project_set_aside(engine: Engine) -> None:
    """Meetings are matched on the innovators' projects' themes: at the registration deadline,
    while an update of an innovator's project is in the dead-letter queue, the day's meetings
    wait (decided again at each tick); once the project is let go, they are proposed."""
    from datetime import timedelta

    from handlers.routes import network
    from tests.handlers.harness import envelope
    from tests.handlers.test_innovation_days_scenarios import ESF, MEMBERS, MERSIN, Day

    members = [envelope("institution.joined", "operator", {"id": member, "name": {"en": member}, "kind": kind, "country": country})
               for member, (kind, country) in MEMBERS.items()]
    project_id = unique("p")
    registered = envelope("project.registered", MERSIN, {**FIXTURE["event"]["data"], "project_id": project_id, "owner": MERSIN,
                                                         "partners": [], "themes": ["economy.disadvantaged_groups"]})
    day = Day.fresh(deadline_in=timedelta(hours=1))
    events = [*members, registered, day.scheduled(20, themes=("health_care",)),
              day.registration(MERSIN, role="innovator", interests=("economy",), project_id=project_id),
              day.registration(ESF, role="funder", interests=("economy",))]
    update = envelope("project.updated", MERSIN, {"project_id": project_id, "changes": {"themes": ["education.lifelong_learning"]}})
    after = day.deadline + timedelta(seconds=1)
    service = NetworkService(engine, network())
    now = datetime.now(timezone.utc)
    try:
        service.take_position()
        assert service.apply_batch([LoggedItem(seq, event, now) for seq, event in enumerate(events, 1)])[:2] == (len(events), None)
        service.skip(len(events) + 1, update)  # the project set aside
        assert service.tick(after) == []
        assert service.tick(after) == []  # decided again, still waiting
        assert service.release(("project", project_id), len(events) + 1) is True
        [proposed] = service.tick(after)
        assert proposed.type == "innovation_day.meetings_proposed" and proposed.subject == day.day_id
        assert [m["project_id"] for m in proposed.envelope["data"]["meetings"]] == [project_id]
    finally:
        service.close()


def test_the_timers_leave_a_thing_set_aside_alone_until_it_is_let_go(engine: Engine) -> None:
    """A call whose amendment (its deadline moved on) is in the dead-letter queue is not closed at
    the deadline it had before: the timers' closing waits, decided again at each tick, while
    another overdue call closes; at the first tick after the call is let go, it closes."""
    from datetime import timedelta

    from handlers.routes import network
    from tests.handlers.test_calls_scenarios import MEMBERS, amended, published

    held, other = unique("call"), unique("call")
    now = datetime.now(timezone.utc)
    events = [*MEMBERS, published(held, closes_in=timedelta(hours=1)), published(other, closes_in=timedelta(hours=1))]
    moved = amended(held, {"deadline": (now + timedelta(days=10)).isoformat()})
    later = now + timedelta(hours=2)

    def closed() -> set[str]:
        with engine.connect() as connection:
            return set(connection.execute(sa.text("SELECT call_id FROM calls WHERE closed_at IS NOT NULL")).scalars())

    service = NetworkService(engine, network())
    try:
        service.take_position()
        assert service.apply_batch([LoggedItem(seq, event, now) for seq, event in enumerate(events, 1)])[:2] == (len(events), None)
        service.skip(len(events) + 1, moved)  # the amendment dead-lettered: the call is set aside
        decided = service.tick(later)
        assert [(e.type, e.subject) for e in decided] == [("call.closed", other)]
        assert closed() == {other}
        assert service.tick(later) == []  # decided again, still waiting
        assert service.release(("call", held), len(events) + 1) is True
        assert [(e.type, e.subject) for e in service.tick(later)] == [("call.closed", held)]
        assert closed() == {held, other}
    finally:
        service.close()


def test_a_bus_notes_from_where_its_rules_apply_the_log_and_older_events_are_judged_by_theirs(engine: Engine) -> None:
    """A new database: the bus's rules apply the whole log. One an older version applied (the
    migration notes version 0 from the start): the bus notes where its own rules begin, an event
    from there is judged by them (an owner adopting its own project: refused), and a dead letter
    from before — replayed now — by the rules it would have been applied by (accepted, as then)."""
    from handlers.routes import network
    from handlers.rules import RULES
    from tests.handlers.harness import envelope

    fixtures = load_fixtures()
    owner = fixtures["project.registered"]["as"]
    project = {**fixtures["project.registered"]["event"]["data"], "project_id": unique("p")}
    events = [envelope("institution.joined", "operator", {"id": owner, "name": {"en": owner}, "kind": "municipality", "country": "TR"}),
              envelope("project.registered", owner, project)]

    def own_adoption() -> dict[str, Any]:
        return envelope("project.adopted", owner, {**fixtures["project.adopted"]["event"]["data"], "adoption_id": unique("a"),
                                                   "project_id": project["project_id"], "adopter": owner})

    def epochs() -> list[tuple[int, int]]:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(sa.text("SELECT from_seq, version FROM rules_epochs ORDER BY from_seq"))]  # type: ignore[misc]

    now = datetime.now(timezone.utc)
    first = NetworkService(engine, network())
    try:
        first.take_position()
        assert epochs() == [(1, RULES)]
        assert first.apply_batch([LoggedItem(seq, event, now) for seq, event in enumerate(events, 1)])[:2] == (2, None)
    finally:
        first.close()
    with engine.begin() as connection:  # as if an older version had applied #1–#2 (what the migration records)
        connection.execute(sa.text("DELETE FROM rules_epochs"))
        connection.execute(sa.text("INSERT INTO rules_epochs (from_seq, version) VALUES (1, 0)"))

    service = NetworkService(engine, network())
    try:
        service.take_position()
        assert epochs() == [(1, 0), (3, RULES)]
        refused = own_adoption()
        assert service.apply_batch([LoggedItem(3, refused, now)])[:3] == (1, None, 1)  # its refusal derived
        late = own_adoption()
        assert service.apply_batch([LoggedItem(2, late, now)], replay=True)[:3] == (1, None, 0)  # judged as #2 was
        with engine.connect() as connection:
            adopted = connection.execute(sa.text("SELECT adoption_id FROM project_adoptions")).scalars().all()
        assert adopted == [late["data"]["adoption_id"]]
        service.take_position()  # (again, with the same rules: nothing new to note)
        assert epochs() == [(1, 0), (3, RULES)]
    finally:
        service.close()


def applied_in_parts(engine: Engine, log: list[dict[str, Any]], older: int, first: int, at: datetime) -> dict[str, str]:
    """``log`` applied as a rebuild applies it whose record says rules of version ``older``
    applied its first ``first`` events and today's the rest, each logged ``at``: what each event
    caused (its id → the id of the event derived from it)."""
    from handlers.routes import network
    from handlers.rules import RULES

    service = NetworkService(engine, network())
    try:
        service.use_rules_epochs([(1, older), (first + 1, RULES)])
        assert service.apply_batch([LoggedItem(seq, event, at) for seq, event in enumerate(log, 1)], live=False)[:2] == (len(log), None)
    finally:
        service.close()
    with engine.connect() as connection:
        return dict(connection.execute(sa.text("SELECT caused_by, event_id FROM applied_events WHERE caused_by IS NOT NULL")).all())


def test_a_log_applied_by_rules_of_version_2_is_rebuilt_as_it_was_applied(engine: Engine) -> None:
    """Rules before version 3 took amounts in more decimals than their currency has, requests in
    several currencies to a call without a budget and a reviewer due after its validation, and kept
    a budget in its currency once an application had asked in it, withdrawn since or not. A log
    they applied is rebuilt so — in one batch, the applications received before in it read as they
    are —, and what today's rules applied after it as they do."""
    from datetime import timedelta

    from sqlmodel import Session, col, select

    from handlers.calls import Call, CallApplication
    from handlers.network import derived_type
    from handlers.validations import ValidationReviewer
    from tests.handlers.harness import envelope

    now = datetime.now(timezone.utc)
    funder, applicant, centre, reviewer = unique("fund"), unique("coop"), unique("centre"), unique("uni")
    budgeted, unbudgeted, validation_id = unique("c"), unique("c"), unique("v")
    due = now + timedelta(days=60)

    def joined(institution: str, kind: str) -> dict[str, Any]:
        return envelope("institution.joined", "operator", {"id": institution, "name": {"en": institution}, "kind": kind, "country": "TR"})

    def call(call_id: str, budget: dict[str, str] | None) -> dict[str, Any]:
        return envelope("call.published", funder, {
            "call_id": call_id, "title": {"en": call_id}, "kind": "funding", "budget": budget, "deadline_model": "single_stage",
            "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat()})

    def applied(call_id: str, application_id: str, amount: str, currency: str) -> dict[str, Any]:
        return envelope("call.application_submitted", applicant, {
            "call_id": call_id, "application_id": application_id, "requested_amount": {"amount": amount, "currency": currency}})

    def assigned(due_by: datetime) -> dict[str, Any]:
        return envelope("validation.reviewer_assigned", centre,
                        {"validation_id": validation_id, "reviewer": reviewer, "due_by": due_by.isoformat()})

    requested = envelope("validation.requested", applicant, {
        "validation_id": validation_id, "external_ref": {"system": "innokyla", "id": "1234"}, "coordinator": centre,
        "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2, "statement": {"en": "It works"}}, "due_by": due.isoformat()})
    cents_then, cents_now = applied(budgeted, "a-1", "240000.005", "EUR"), applied(budgeted, "a-2", "100.005", "EUR")
    lira, dollars_then, dollars_now = (applied(unbudgeted, "y-1", "1000", "TRY"), applied(unbudgeted, "y-2", "1000", "USD"),
                                       applied(unbudgeted, "y-3", "1000", "USD"))
    moved = envelope("call.amended", funder, {"call_id": budgeted, "changes": {"budget": {"amount": "100000", "currency": "USD"}},
                                              "reason": {"en": "Dollars"}})
    late_then, late_now = assigned(due + timedelta(days=30)), assigned(due + timedelta(days=31))
    then = [joined(funder, "funder"), joined(applicant, "cooperative"), joined(centre, "competence_centre"), joined(reviewer, "university"),
            call(budgeted, {"amount": "100000", "currency": "EUR"}), call(unbudgeted, None), cents_then, lira, dollars_then,
            envelope("call.application_withdrawn", applicant, {"call_id": budgeted, "application_id": "a-1"}), moved,
            requested, late_then]
    log = [*then, cents_now, dollars_now, late_now]
    answers = applied_in_parts(engine, log, 2, len(then), now)
    with Session(engine) as session:
        statuses = {(a.call_id, a.application_id): a.status for a in session.exec(
            select(CallApplication).where(col(CallApplication.call_id).in_([budgeted, unbudgeted])))}
        stored = session.get(Call, budgeted)
        budget = stored.budget if stored is not None else None
        reviewers = [(r.reviewer, r.due_by) for r in session.exec(
            select(ValidationReviewer).where(ValidationReviewer.validation_id == validation_id))]
    kinds = [derived_type(answers[cause["id"]]) if cause["id"] in answers else None
             for cause in (cents_then, dollars_then, moved, late_then, cents_now, dollars_now, late_now)]
    assert kinds == [
        "call.application_received", "call.application_received", "call.action_rejected", None,  # as version 2 judged them
        "call.application_rejected", "call.application_rejected", "validation.action_rejected"]  # as version 3 does
    assert statuses == {(budgeted, "a-1"): "withdrawn", (budgeted, "a-2"): "rejected", (unbudgeted, "y-1"): "received",
                        (unbudgeted, "y-2"): "received", (unbudgeted, "y-3"): "rejected"}
    assert budget == {"amount": "100000", "currency": "EUR"}
    assert reviewers == [(reviewer, due + timedelta(days=30))]


def test_a_log_applied_by_version_3_of_the_rules_is_rebuilt_as_it_was_applied(engine: Engine) -> None:
    """Rules before version 4 took a practice's second adoption by the same adopter and impact
    reports of a period before the project started. A log they applied is rebuilt so — both
    adoptions counted, the report kept —, and what version 4 applied after it as version 4 judges
    it."""
    from sqlmodel import Session, col, select

    from handlers.network import derived_type
    from handlers.projects import ProjectAdoption, ProjectImpactReport
    from tests.handlers.test_projects_scenarios import adopted, impact_reported, joined, registered

    tag = unique("t")[-8:]
    owner, adopter, practice = f"tr-owner-{tag}", f"tr-adopter-{tag}", f"practice-{tag}"
    partnered = registered(practice, by=owner, owner=owner)
    first, second_then, second_now = (adopted(practice, adopter, adoption_id=f"{practice}-{n}") for n in range(3))
    early_then, early_now = (impact_reported(practice, by=owner, start="2019-01-01", end="2019-12-31") for _ in range(2))
    log = [joined(owner, "municipality", level="metropolitan"), joined(adopter, "municipality", level="district"),
           partnered, first, early_then, second_then, second_now, early_now]
    answers = applied_in_parts(engine, log, 3, 6, datetime.now(timezone.utc))
    with Session(engine) as session:
        adoptions = sorted(a.adoption_id for a in session.exec(select(ProjectAdoption).where(col(ProjectAdoption.project_id) == practice)))
        reports = session.exec(select(ProjectImpactReport).where(col(ProjectImpactReport.project_id) == practice)).all()
    causes = (partnered, early_then, second_then, second_now, early_now)
    assert [derived_type(answers[e["id"]]) if e["id"] in answers else None for e in causes] == [
        None, None, None, "project.action_rejected", "project.action_rejected"]
    assert len(reports) == 1
    assert adoptions == [f"{practice}-0", f"{practice}-1"]


def test_a_log_applied_by_rules_of_version_3_is_rebuilt_as_it_was_applied(engine: Engine) -> None:
    """Rules before version 4 took an application of a call's publisher to its own call, and an
    award above what the application asks for or of nothing. A log they applied is rebuilt so,
    and what today's rules applied after it as they do."""
    from datetime import timedelta

    from handlers.network import derived_type
    from tests.handlers.harness import envelope

    now = datetime.now(timezone.utc)
    funder, applicant, open_call = unique("fund"), unique("ngo"), unique("c")

    def joined(institution: str, kind: str) -> dict[str, Any]:
        return envelope("institution.joined", "operator", {"id": institution, "name": {"en": institution}, "kind": kind, "country": "FI"})

    def own(application_id: str) -> dict[str, Any]:
        return envelope("call.application_submitted", funder, {"call_id": open_call, "application_id": application_id})

    def asking(application_id: str) -> dict[str, Any]:
        return envelope("call.application_submitted", applicant, {
            "call_id": open_call, "application_id": application_id, "requested_amount": {"amount": "1000", "currency": "EUR"}})

    def awarding(application_id: str, amount: str = "10000") -> dict[str, Any]:
        return envelope("call.application_decided", funder, {
            "call_id": open_call, "application_id": application_id, "decision": "awarded",
            "awarded_amount": {"amount": amount, "currency": "EUR"}})

    published = envelope("call.published", funder, {
        "call_id": open_call, "title": {"en": open_call}, "kind": "funding", "deadline_model": "single_stage",
        "opens_at": (now - timedelta(days=30)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat()})
    own_then, own_now = own("a-1"), own("a-2")
    above_then, above_now = awarding("b-1"), awarding("b-2")
    nothing_then, nothing_now = awarding("d-1", "0"), awarding("d-2", "0")
    then = [joined(funder, "funder"), joined(applicant, "ngo"), published, own_then, asking("b-1"), above_then,
            asking("d-1"), nothing_then]
    log = [*then, own_now, asking("b-2"), above_now, asking("d-2"), nothing_now]
    answers = applied_in_parts(engine, log, 3, len(then), now)
    kinds = [derived_type(answers[cause["id"]]) if cause["id"] in answers else None
             for cause in (own_then, above_then, nothing_then, own_now, above_now, nothing_now)]
    assert kinds == ["call.application_received", None, None,  # as version 3 took them
                     "call.application_rejected", "call.action_rejected", "call.action_rejected"]  # refused as version 4 does
