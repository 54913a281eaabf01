"""The suite's PostgreSQL databases are used again: emptied after a test, renamed so nothing of
that test can reach them, and dropped instead when the test changed their schema or filled them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from tests import postgres
from tests.conftest import _template, require_postgres
from tests.postgres import DatabasePool


@pytest.fixture
def pool(pg_server_url: str | None) -> Iterator[DatabasePool]:
    url = require_postgres(pg_server_url)
    pool = DatabasePool(url, _template("postgresql", url))
    yield pool
    pool.close()


def databases(pool: DatabasePool) -> set[str]:
    """The cluster's databases for tests (``t_…``)."""
    with pool.admin.connect() as connection:
        return set(connection.execute(sa.text("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'")).scalars())


def add_to_outbox(url: str, rows: int = 1) -> list[int]:
    """Rows added to the outbox; returns the positions its sequence gave them."""
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        return list(connection.execute(sa.text(
            "INSERT INTO outbox (event, created_at, event_id) SELECT 'x'::bytea, now(), 'e' || n FROM generate_series(1, :rows) AS n "
            "RETURNING position"), {"rows": rows}).scalars())


def test_a_database_given_back_is_emptied_renamed_and_handed_to_the_next_test(pool: DatabasePool) -> None:
    before = databases(pool)
    first = pool.take()
    assert add_to_outbox(pool.url(first), 3) == [1, 2, 3]
    held = sa.create_engine(pool.url(first), poolclass=sa.pool.NullPool).connect()  # as a test that did not close its connection
    pool.give_back(first)

    assert databases(pool) - before == set(pool.idle) and first not in pool.idle  # renamed: nothing of the test reaches it by its name
    with pytest.raises(sa.exc.DBAPIError):
        held.execute(sa.text("SELECT 1"))  # its connection was ended
    second = pool.take()
    assert second != first and pool.idle == [] and databases(pool) - before == {second}
    engine = sa.create_engine(pool.url(second), poolclass=sa.pool.NullPool)
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM outbox")).scalar() == 0
        versions = set(connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())
    with sa.create_engine(pool.url(pool.template), poolclass=sa.pool.NullPool).connect() as template:
        assert versions == set(template.execute(sa.text("SELECT version_num FROM alembic_version")).scalars())  # kept
    assert add_to_outbox(pool.url(second)) == [1]  # its sequences start again
    pool.give_back(second)
    assert len(pool.idle) == 1


@pytest.mark.parametrize("change", ["CREATE TABLE extra (id int)", "ALTER TABLE outbox ADD COLUMN extra int",
                                    "CREATE INDEX extra ON outbox (created_at)", "DELETE FROM alembic_version"])
def test_a_database_whose_schema_the_test_changed_is_dropped(pool: DatabasePool, change: str) -> None:
    before = databases(pool)
    name = pool.take()
    engine = sa.create_engine(pool.url(name), poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.execute(sa.text(change))
    pool.give_back(name)
    assert pool.idle == [] and databases(pool) == before  # dropped


def test_a_database_filled_by_its_test_is_dropped(pool: DatabasePool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "_LARGE", 5)
    before = databases(pool)
    name = pool.take()
    add_to_outbox(pool.url(name), 6)
    pool.give_back(name)
    assert pool.idle == [] and databases(pool) == before
    kept = pool.take()
    add_to_outbox(pool.url(kept), 5)
    pool.give_back(kept)
    assert len(pool.idle) == 1
