"""Membership read model: given events → when an event → then the institutions' state."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine
from sqlmodel import SQLModel

from handlers.institutions import Institution, member, member_by_identifier
from tests.handlers.harness import BusScenario, Scenario, envelope

NETWORK_TABLES = {
    "institutions",
    "calls",
    "call_applications",
    "projects",
    "project_partners",
    "project_adoptions",
    "project_impact_reports",
}


def joined(institution: str, **extra: Any) -> dict[str, Any]:
    data = {
        "id": institution,
        "name": {"ar": "مركز عمّان للابتكار الاجتماعي", "en": "Amman Social Innovation Centre"},
        "kind": "ngo",
        "country": "JO",
        "region": "عمّان",
        "themes": ["migration_population.migrants"],
        "identifiers": [{"scheme": "jo-registry", "value": f"{institution}-42"}],
        "website": "https://amman-sic.example.org",
        **extra,
    }
    return envelope("institution.joined", "operator", data)


def updated(institution: str, **changes: Any) -> dict[str, Any]:
    return envelope("institution.updated", "operator", {"id": institution, **changes})


def left(institution: str) -> dict[str, Any]:
    return envelope("institution.left", "operator", {"id": institution, "reason": {"en": "Wound up."}})


@pytest.fixture
def institution() -> str:
    return f"jo-sic-{uuid.uuid4().hex[:12]}"


async def test_a_joined_institution_is_a_member_with_every_fact(scenario: Scenario, institution: str) -> None:
    before = datetime.now(timezone.utc)
    assert await scenario.when(joined(institution)) == []
    with scenario.session() as session:
        found = member(session, institution)
        assert found is not None and found.active
        assert found.name["ar"] == "مركز عمّان للابتكار الاجتماعي" and found.region == "عمّان"
        assert (found.kind, found.country, found.municipality_level) == ("ngo", "JO", None)
        assert found.themes == ["migration_population.migrants"]
        assert found.identifiers == [{"scheme": "jo-registry", "value": f"{institution}-42"}]
        assert found.website == "https://amman-sic.example.org" and found.contact_email is None
        assert found.joined_at >= before and found.left_at is None
        assert member(session, "jo-never-joined") is None


async def test_an_update_changes_only_the_fields_it_carries_and_null_clears(scenario: Scenario, institution: str) -> None:
    await scenario.given(joined(institution))
    change = updated(institution, region=None, themes=["education.literacy"], contact_email="info@amman-sic.example.org")
    assert await scenario.when(change) == []
    with scenario.session() as session:
        found = member(session, institution)
        assert found is not None
        assert found.region is None  # cleared
        assert found.themes == ["education.literacy"] and found.contact_email == "info@amman-sic.example.org"
        assert found.name["en"] == "Amman Social Innovation Centre" and found.kind == "ngo"  # untouched
        assert found.website == "https://amman-sic.example.org"


async def test_a_member_that_left_is_no_member_until_it_joins_again(scenario: Scenario, institution: str) -> None:
    await scenario.given(joined(institution))
    await scenario.when(left(institution))
    with scenario.session() as session:
        assert member(session, institution) is None
        former = session.get(Institution, institution)
        assert former is not None and former.left_at is not None and not former.active
    await scenario.when(joined(institution, kind="cooperative", region=None, website=None))
    with scenario.session() as session:
        rejoined = member(session, institution)
        assert rejoined is not None and rejoined.kind == "cooperative"
        assert rejoined.region is None and rejoined.website is None  # every fact restated


async def test_an_update_of_an_unknown_institution_is_refused_and_one_logged_changes_nothing(
    scenario: BusScenario, institution: str
) -> None:
    event = updated(institution, region="Tampere")
    operator = scenario.bus.settings.operator
    event["source"] = f"/institutions/{operator}"
    refused = await scenario.bus.gate.admit(operator, orjson.dumps(event))
    assert [(p.loc, p.type) for p in refused.errors] == [(("data", "id"), "not_member")]
    logged = await scenario.bus.gate.publish_internal(event)  # as one logged before the gate checked it
    assert logged.accepted
    await scenario.settle(logged.seq)
    with scenario.session() as session:
        assert session.get(Institution, institution) is None


async def test_a_member_is_found_by_how_another_register_names_it(scenario: Scenario, institution: str) -> None:
    await scenario.given(joined(institution))
    with scenario.session() as session:
        found = member_by_identifier(session, "jo-registry", f"{institution}-42")
        assert found is not None and found.id == institution
        assert member_by_identifier(session, "fi-business-id", f"{institution}-42") is None


def _of_this_database(connection: Any) -> Any:
    """Alembic's filter leaving out what the models create on another database only (an index
    with ``ddl_if(dialect=…)``: the searches' trigram indexes are PostgreSQL's), which Alembic's
    comparison does not ask."""
    def include(obj: Any, name: Any, type_: str, reflected: bool, compare_to: Any) -> bool:
        only_on = getattr(getattr(obj, "_ddl_if", None), "dialect", None)
        return only_on is None or only_on == connection.dialect.name
    return include


def test_the_migration_creates_exactly_the_network_tables(engine: Engine) -> None:
    """The hand-written migration and the table models agree: names, columns, types, indexes."""
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "include_object": _of_this_database(connection)})
        differences = compare_metadata(context, SQLModel.metadata)

    def table_of(difference: Any) -> str:
        """Alembic's diffs name the table as a Table, through an Index or constraint, or as text
        after the schema (columns); changes of a column come as a list."""
        operation = difference[0] if isinstance(difference, list) else difference
        for part in operation[1:]:
            if isinstance(part, sa.Table):
                return part.name
            if isinstance(getattr(part, "table", None), sa.Table):
                return str(part.table.name)
        return str(operation[2])

    assert [d for d in differences if table_of(d) in NETWORK_TABLES] == []


@pytest.mark.parametrize("kept", ["tokens", "webhooks"])
def test_the_migrations_create_exactly_the_tables_kept_apart_from_the_read_models(engine: Engine, kept: str) -> None:
    """The HTTP tokens' and the webhooks' tables (their own metadata, which a rebuild leaves alone)
    agree with their migrations too: names, columns, types, indexes."""
    from connectors.webhooks.store import WEBHOOKS
    from handlers.tokens import CREDENTIALS

    metadata = {"tokens": CREDENTIALS, "webhooks": WEBHOOKS}[kept]
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences = compare_metadata(context, metadata)

    def about_these(difference: Any) -> bool:
        operation = difference[0] if isinstance(difference, list) else difference
        if operation[0] == "remove_table":  # the database's other tables: another metadata's
            return False
        return any(name in str(operation) for name in metadata.tables)

    assert [d for d in differences if about_these(d)] == []
