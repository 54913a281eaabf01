"""The service's session (``handlers.session``): lookups by known keys, on SQLite and PostgreSQL."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, event
from sqlmodel import SQLModel

from handlers.calls import Call
from handlers.institutions import Institution
from handlers.session import KnownKeysSession, tracked_tables
from tests.conftest import unique

INSTITUTIONS = SQLModel.metadata.tables["institutions"]  # Institution's table, typed (SQLModel does not declare ``__table__``)


def member(institution_id: str) -> Institution:
    now = datetime.now(timezone.utc)
    return Institution(id=institution_id, name={"en": institution_id}, kind="ngo", country="FI", joined_at=now)


def test_a_known_row_let_go_is_read_again_without_flushing_what_is_pending(engine: Engine) -> None:
    session = KnownKeysSession(engine, expire_on_commit=False, tracked=tracked_tables(SQLModel.metadata))
    first, second = unique("m"), unique("m")
    with session.begin():
        assert session.get(Institution, first) is None  # the keys are read once, here
        session.add(member(first))
    gc.collect()  # nothing holds the row: it leaves the identity map
    flushes: list[int] = []
    event.listen(session, "before_flush", lambda *_: flushes.append(1))
    with session.begin():
        session.add(member(second))  # pending
        found = session.get(Institution, first)
        assert found is not None and found.id == first  # read from the database…
        assert flushes == []  # …without flushing the pending row first
        assert session.get(Institution, second) is not None  # the pending one answers from the session
        assert session.get(Institution, unique("m")) is None and session.get(Call, unique("c")) is None
        changed = session.get(Institution, first)
        assert changed is found
        changed.name = {"en": "renamed"}
    with session.begin():
        assert session.get(Institution, first).name == {"en": "renamed"}
    with engine.connect() as connection:
        assert {row.id for row in connection.execute(INSTITUTIONS.select())} >= {first, second}
    session.close()


def test_adding_a_row_walks_no_cascade_and_is_what_the_orm_s_add_is(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The read models' tables have no relationships, so adding one of their rows skips the
    ORM's walk for cascades; it is pending, followed by the known keys, and written at the
    commit as before. A class with relationships would still be walked."""
    from sqlalchemy import inspect
    from sqlalchemy.orm import InstanceState, Mapper

    tracked = tracked_tables(SQLModel.metadata)
    session = KnownKeysSession(engine, expire_on_commit=False, tracked=tracked)
    assert session._no_cascade == {cls for cls in tracked if not inspect(cls).relationships} and Institution in session._no_cascade
    walked: list[object] = []
    real_walk = Mapper.cascade_iterator

    def walking(self: Mapper[Any], *args: Any, **kw: Any) -> Iterator[tuple[object, Mapper[Any], InstanceState[Any], dict[str, Any]]]:
        walked.append(self)
        return real_walk(self, *args, **kw)

    monkeypatch.setattr(Mapper, "cascade_iterator", walking)
    added = member(unique("m"))
    with session.begin():
        assert session.get(Institution, added.id) is None
        session.add(added)
        assert added in session.new and session.get(Institution, added.id) is added
        session.add(added)  # again: nothing changes
        assert list(session.new).count(added) == 1
    assert walked == []
    with engine.connect() as connection:
        assert connection.execute(INSTITUTIONS.select().where(INSTITUTIONS.c.id == added.id)).one().name == {"en": added.id}
    with session.begin():  # a row already written and changed: added again, it is written again
        added.country = "SE"
        session.add(added)
    with engine.connect() as connection:
        assert connection.execute(INSTITUTIONS.select().where(INSTITUTIONS.c.id == added.id)).one().country == "SE"
    session.close()


def test_what_a_call_s_checks_read_of_its_applications_is_read_without_flushing_the_batch(engine: Engine) -> None:
    """A decision, an amendment or a request to a call without a budget weighs the call's
    applications: read by a query, that wrote every row the batch held first (an amendment of a
    big batch's call flushed all of it). They are the batch's rows as they stand, pending ones too."""
    from handlers.calls import CallApplication, _snapshot

    session = KnownKeysSession(engine, expire_on_commit=False, tracked=tracked_tables(SQLModel.metadata))
    now = datetime.now(timezone.utc)
    call_id = unique("c")
    with session.begin():
        assert session.get(Call, call_id) is None
        session.add(Call(call_id=call_id, owner="fi-funder", title={"en": "A call"}, kind="grant", opens_at=now, deadline=now,
                         deadline_model="single", published_at=now, awarded="100.00"))
        for application_id, status, requested, awarded in (("a-1", "awarded", "USD", "USD"), ("a-2", "withdrawn", "EUR", None)):
            session.add(CallApplication(call_id=call_id, application_id=application_id, applicant="fi-diak", status=status, submitted_at=now,
                                        decided_at=now if awarded else None, requested_amount={"amount": "100.00", "currency": requested},
                                        awarded_amount={"amount": "100.00", "currency": awarded} if awarded else None))
        session.children(CallApplication, "call_id", call_id)  # (which calls have applications: read once a session)
    flushes: list[int] = []
    event.listen(session, "before_flush", lambda *_: flushes.append(1))
    with session.begin():
        session.add(CallApplication(call_id=call_id, application_id="a-3", applicant="fi-soste", status="received",
                                    submitted_at=now, requested_amount={"amount": "5.00", "currency": "TRY"}))  # pending
        snapshot = _snapshot(session, call_id, received=True, awarded_currency=True, requested_currency=True)
        assert flushes == []
        assert snapshot is not None and snapshot.received and snapshot.awarded_currency == "USD"
        assert snapshot.requested_currency == "USD"  # the first standing (a-2 withdrawn, a-3 after a-1)
    session.close()


def test_rows_added_before_a_parent_s_rows_are_first_asked_for_are_among_them(engine: Engine) -> None:
    """The rows a batch added are followed per parent once the session has asked for a parent's
    rows of that kind; one added before the first such question, and read without flushing, was
    left out (a partner joining a project, then a reviewer assigned in the same batch: the
    conflict of interest was not seen)."""
    from handlers.projects import ProjectPartner

    session = KnownKeysSession(engine, expire_on_commit=False, tracked=tracked_tables(SQLModel.metadata))
    project_id = unique("p")
    with session.begin():
        session.add(ProjectPartner(project_id=project_id, institution="fi-diak", role="partner"))
    with session.begin():
        session.add(ProjectPartner(project_id=project_id, institution="fi-soste", role="supporter"))  # pending
        with session.no_autoflush:
            rows = session.children(ProjectPartner, "project_id", project_id)
        assert sorted(row.institution for row in rows) == ["fi-diak", "fi-soste"]
        other = unique("p")
        session.add(ProjectPartner(project_id=other, institution="fi-diak", role="partner"))  # after: followed as before
        with session.no_autoflush:
            assert [row.institution for row in session.children(ProjectPartner, "project_id", other)] == ["fi-diak"]
    session.close()


def test_a_partner_joining_and_a_reviewer_assigned_in_one_batch_are_judged_as_one_by_one(engine: Engine) -> None:
    """The same log applied one event a batch and in one batch gives the same state: the partner
    that joined a project is a conflict of interest for its validation in both."""
    from handlers.network import derived_type
    from handlers.routes import network
    from handlers.service import LoggedItem, NetworkService
    from tests.handlers.harness import envelope

    kinds = {"sm-centre": "competence_centre", "sm-ngo": "ngo", "sm-coop": "cooperative"}
    before = [envelope("institution.joined", "operator", {"id": member_id, "name": {"en": member_id}, "kind": kind, "country": "FI"})
              for member_id, kind in kinds.items()]
    before += [envelope("project.registered", "sm-ngo", {"project_id": "p-1", "title": {"en": "p-1"}, "owner": "sm-ngo", "status": "active"}),
               envelope("validation.requested", "sm-ngo", {"validation_id": "v-1", "project_id": "p-1", "coordinator": "sm-centre",
                                                            "self_assessment": {"statement": {"en": "ours"}}})]
    joined = envelope("project.partner_joined", "sm-ngo", {"project_id": "p-1", "partner": {"institution": "sm-coop", "role": "supporter"}})
    assigned = envelope("validation.reviewer_assigned", "sm-centre", {"validation_id": "v-1", "reviewer": "sm-coop"})
    at = datetime.now(timezone.utc)
    items = [LoggedItem(seq, offered, at) for seq, offered in enumerate([*before, joined, assigned], 1)]
    service = NetworkService(engine, network())
    for item in items[:-2]:
        assert service.apply_batch([item], live=False)[1] is None
    service.close()
    service = NetworkService(engine, network())  # a new process's session: it has read nothing yet
    assert service.apply_batch(items[-2:], live=False)[:2] == (2, None)
    service.close()
    with engine.connect() as connection:
        answers: dict[str, str] = dict(connection.execute(sa.text("SELECT caused_by, event_id FROM applied_events WHERE caused_by IS NOT NULL")).all())
        reviewers = connection.execute(sa.text("SELECT reviewer FROM validation_reviewers")).scalars().all()
    assert derived_type(answers[assigned["id"]]) == "validation.action_rejected" and reviewers == []
