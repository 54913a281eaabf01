"""Read-model rows (``handlers.rows.TableRow``): made from a dictionary, assigned as SQLAlchemy and
pydantic both expect, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import Engine, inspect
from sqlmodel import Session

from handlers.institutions import Institution
from tests.conftest import unique


def test_a_column_assigned_is_noted_for_the_flush_and_marked_set_for_pydantic(engine: Engine) -> None:
    row_id = unique("m")
    row = Institution(id=row_id, name={"en": "Diak"}, kind="university", country="FI", joined_at=datetime.now(timezone.utc))
    assert "region" not in row.model_fields_set
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add(row)
    row.region = "Uusimaa"  # a column: SQLAlchemy's history and pydantic's set fields
    row.themes = ["health_care"]
    assert inspect(row).attrs.region.history.added == ["Uusimaa"]
    assert {"region", "themes"} <= row.model_fields_set and row.model_dump()["region"] == "Uusimaa"
    with Session(engine, expire_on_commit=False) as session, session.begin():
        session.add(row)
    with Session(engine) as session:
        stored = session.get(Institution, row_id)
        assert stored is not None and (stored.region, stored.themes) == ("Uusimaa", ["health_care"])
        stored.country = "SE"  # a row read from the database is assigned the same way
        assert inspect(stored).attrs.country.history.added == ["SE"] and "country" in stored.model_fields_set
        session.commit()
    with Session(engine) as session:
        changed = session.get(Institution, row_id)
        assert changed is not None and changed.country == "SE"


def test_a_name_that_is_no_column_is_set_as_sqlmodel_sets_it() -> None:
    row = Institution(id=unique("m"), name={"en": "SOSTE"}, kind="ngo", country="FI", joined_at=datetime.now(timezone.utc))
    with pytest.raises(ValueError, match="has no field"):  # pydantic's refusal of an unknown field, as before
        row.nickname = "soste"  # type: ignore[attr-defined]
