"""The read models' engine for the database URLs a setting may give."""

from __future__ import annotations

import json
from pathlib import Path
from types import FunctionType
from typing import Any, cast

import pytest
import sqlalchemy as sa
from sqlalchemy import text
from sqlalchemy.pool import QueuePool

from handlers.db import make_engine, migrate
from tests.conftest import require_postgres


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_a_database_in_memory_is_made_and_migrated(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    engine = make_engine(url)
    migrate(engine)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM institutions")).scalar() == 0
    assert list(tmp_path.iterdir()) == []  # no file, no directory named after the URL


def test_a_file_database_gets_its_directory_also_with_query_options(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "read-models.db"
    engine = make_engine(f"sqlite:///{path}?timeout=5")
    with engine.connect() as connection:
        assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
    assert path.exists() and not (tmp_path / "nested" / "read-models.db?timeout=5").exists()
    assert cast(QueuePool, engine.pool).size() == 20  # the gateway's readers share a pool


def test_a_current_schema_is_known_without_alembic_and_an_older_one_is_migrated(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The heads read from the migrations' lines are what Alembic writes into ``alembic_version``
    (a migrated database is checked without loading it); a schema one migration behind is still
    brought up to date by Alembic."""
    from alembic import command
    from alembic.config import Config

    from handlers.db import migration_heads

    engine = make_engine(database_url)  # a migrated copy (tests/conftest.py)
    try:
        with engine.connect() as connection:
            written = frozenset(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
        assert written == migration_heads() and "0038_day_search_index" in written

        upgrades: list[str] = []
        real_upgrade = command.upgrade

        def recording_upgrade(config: Config, target: str) -> None:
            upgrades.append(target)
            real_upgrade(config, target)

        monkeypatch.setattr(command, "upgrade", recording_upgrade)
        migrate(engine)
        assert upgrades == []  # current: Alembic not asked
        with engine.begin() as connection:  # as if the newest migration had not run yet
            connection.execute(text("UPDATE alembic_version SET version_num = '0004' WHERE version_num = '0038_day_search_index'"))
            connection.execute(text("ALTER TABLE innovation_days DROP COLUMN revision"))
            connection.execute(text("ALTER TABLE innovation_days DROP COLUMN words"))
        migrate(engine)
        assert upgrades == ["heads"]
        with engine.connect() as connection:
            assert frozenset(connection.execute(text("SELECT version_num FROM alembic_version")).scalars()) == migration_heads()
            assert connection.execute(text("SELECT count(revision) FROM innovation_days")).scalar() == 0
    finally:
        engine.dispose()


def test_postgresql_sessions_keep_time_in_utc_whatever_the_client_s_zone(pg_server_url: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A column without a zone (the outbox's ``created_at``) is written and read in the session's
    zone: the bus's sessions are in UTC even where the client's PGTZ or the server say otherwise."""
    pg_server_url = require_postgres(pg_server_url)
    monkeypatch.setenv("PGTZ", "Asia/Tokyo")
    engine = make_engine(pg_server_url)
    try:
        for _ in range(2):  # a new connection and one from the pool
            with engine.connect() as connection:
                assert connection.exec_driver_sql("SHOW TimeZone").scalar() == "UTC"
                connection.rollback()
    finally:
        engine.dispose()
    plain = sa.create_engine(pg_server_url)
    try:
        with plain.connect() as connection:  # what a session without it would have
            assert connection.exec_driver_sql("SHOW TimeZone").scalar() == "Asia/Tokyo"
    finally:
        plain.dispose()


def test_what_a_reading_transaction_reads_is_one_moment_of_the_database(database_url: str) -> None:
    """A request reads a row and then the rows that belong to it in two statements (a delivery
    and its attempts, a validation and its reviews): a commit landing between them must not be
    half seen. PostgreSQL's default gives each statement its own moment; SQLite's read
    transactions keep one."""
    from sqlmodel import Session

    from handlers.db import reading

    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            for table in ("moment_parent", "moment_child"):
                connection.execute(text(f"CREATE TABLE {table} (n INTEGER NOT NULL)"))
                connection.execute(text(f"INSERT INTO {table} (n) VALUES (1)"))
        with Session(reading(engine)) as session:
            parent = session.execute(text("SELECT n FROM moment_parent")).scalar()
            with engine.begin() as writer:  # the writer commits between the two reads
                writer.execute(text("UPDATE moment_parent SET n = 2"))
                writer.execute(text("UPDATE moment_child SET n = 2"))
            child = session.execute(text("SELECT n FROM moment_child")).scalar()
        assert (parent, child) == (1, 1)
        with Session(reading(engine)) as session:  # the next transaction reads the new moment
            assert session.execute(text("SELECT n FROM moment_parent")).scalar() == 2
            assert session.execute(text("SELECT n FROM moment_child")).scalar() == 2
        with engine.connect() as connection:  # the pool's connections keep their own default for writers
            level = connection.get_isolation_level()
        assert level in ("READ COMMITTED", "SERIALIZABLE")  # PostgreSQL's default; SQLite's only one
    finally:
        with engine.begin() as connection:
            for table in ("moment_parent", "moment_child"):
                connection.execute(text(f"DROP TABLE IF EXISTS {table}"))
        engine.dispose()


def test_a_moment_is_bound_on_sqlite_as_sqlalchemy_s_own_datetime_text_in_utc(tmp_path: Path) -> None:
    """``UtcDateTime`` binds a moment on SQLite in one step; the text is what the ORM wrote
    before (the offset applied, then SQLite's ``DATETIME`` format), byte for byte, so read models
    written before and after compare and sort alike. A naive datetime is refused as before."""
    from datetime import datetime, timedelta, timezone

    from sqlalchemy.types import TypeDecorator

    from handlers.institutions import UtcDateTime

    dialect = make_engine(f"sqlite:///{tmp_path / 'moments.db'}").dialect
    fast = UtcDateTime()._cached_bind_processor(dialect)  # as statements get it
    usual = TypeDecorator.bind_processor(cast(UtcDateTime, UtcDateTime().dialect_impl(dialect)), dialect)  # process_bind_param, then DATETIME's own
    helsinki = timezone(timedelta(hours=2))
    moments = [
        datetime(2026, 12, 4, 21, 5, 7, 123456, tzinfo=timezone.utc),
        datetime(2026, 3, 29, 3, 59, 59, tzinfo=helsinki),  # across midnight and a date in UTC
        datetime(1999, 1, 1, 0, 0, tzinfo=timezone(timedelta(hours=-5, minutes=-30))),
        datetime(2026, 1, 1, 0, 30, tzinfo=timezone(timedelta(hours=3))),
    ]
    assert fast is not None and usual is not None
    assert cast(FunctionType, fast).__qualname__ == "UtcDateTime.bind_processor.<locals>.process"  # one function, not the two composed
    assert [fast(moment) for moment in moments] == [usual(moment) for moment in moments]
    assert fast(moments[1]) == "2026-03-29 01:59:59.000000" and fast(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        fast(datetime(2026, 12, 4, 12, 0))


def test_statements_on_the_driver_s_cursor_fail_as_sqlalchemy_s_own_would(database_url: str) -> None:
    """The bookkeeping's statements run on the driver's cursor (``driver_cursor``): a failing one
    raises what SQLAlchemy's own execution of it raises, so a clash is told from a database that
    fails (``database_unavailable``), which holds the events rather than dead-lettering them."""
    from handlers.bookkeeping import ConsumerPosition, advance_position, read_position
    from handlers.db import database_unavailable, driver_cursor

    engine = make_engine(database_url)
    migrate(engine)
    positions = cast(sa.Table, ConsumerPosition.__table__)  # type: ignore[attr-defined]
    with engine.begin() as connection:
        advance_position(connection, positions, "driver", 5)
        advance_position(connection, positions, "driver", 3)  # never backwards
        assert read_position(connection, positions, "driver") == 5
        advance_position(connection, positions, "driver", 9)
    with engine.connect() as connection:
        assert read_position(connection, positions, "driver") == 9

    statements = [
        ("INSERT INTO consumer_positions (consumer, seq) VALUES ({mark}, {mark})", ("driver", 1)),  # a clash
        ("SELECT seq FROM no_such_table WHERE consumer = {mark}", ("driver",)),  # what a missing schema does
    ]
    for statement, parameters in statements:
        with pytest.raises(sa.exc.DBAPIError) as own:
            with engine.begin() as connection:
                mark = "?" if connection.dialect.paramstyle == "qmark" else "%s"
                connection.exec_driver_sql(statement.format(mark=mark), parameters)
        with pytest.raises(sa.exc.DBAPIError) as ours:
            with engine.begin() as connection, driver_cursor(connection) as (cursor, mark):
                cursor.execute(statement.format(mark=mark), parameters)
        assert type(ours.value) is type(own.value), statement
        assert type(ours.value.orig) is type(own.value.orig)
        assert database_unavailable(ours.value) == database_unavailable(own.value)
        if statement.startswith("INSERT"):
            assert isinstance(ours.value, sa.exc.IntegrityError) and not database_unavailable(ours.value)
    engine.dispose()


def test_what_a_call_awarded_before_its_running_total_is_filled_in_from_its_applications(database_url: str) -> None:
    """A database from before ``calls.awarded`` (an award is weighed against what is left of the
    budget): the migration adds up each call's awards in decimal, never rounding, and leaves a
    call without awards at none."""
    engine = make_engine(database_url)  # a migrated copy (tests/conftest.py)
    now = "2026-03-01 08:00:00"
    call = ("INSERT INTO calls (call_id, owner, title, kind, themes, eligible_kinds, eligible_countries, budget, opens_at, "
            "deadline, deadline_model, published_at) VALUES (:id, 'eu-esf-fund', '{\"en\": \"C\"}', 'funding', '[]', '[]', '[]', "
            "'{\"amount\": \"100000\", \"currency\": \"EUR\"}', :now, :now, 'single_stage', :now)")
    application = ("INSERT INTO call_applications (call_id, application_id, applicant, partners, status, submitted_at, awarded_amount) "
                   "VALUES (:call, :id, 'fi-diak', '[]', :status, :now, :amount)")
    try:
        with engine.begin() as connection:
            for call_id in ("c-awarded", "c-none"):
                connection.execute(text(call), {"id": call_id, "now": now})
            for application_id, status, amount in (("a-1", "awarded", "0.10"), ("a-2", "awarded", "0.20"), ("a-3", "declined", None),
                                                   ("a-4", "awarded", None)):
                money = '{"amount": "%s", "currency": "EUR"}' % amount if amount else None
                connection.execute(text(application), {"call": "c-awarded", "id": application_id, "status": status, "now": now, "amount": money})
            connection.execute(text("UPDATE alembic_version SET version_num = '0018_open_calls_deadline' "
                                    "WHERE version_num = '0037_search_index'"))
            connection.execute(text("ALTER TABLE calls DROP COLUMN awarded"))
            connection.execute(text("ALTER TABLE call_applications DROP COLUMN withdrawal_reason"))  # (0029, after 0024)
            for table in ("projects", "calls", "institutions"):  # (0035, after 0029)
                connection.execute(text(f"ALTER TABLE {table} DROP COLUMN words"))
        migrate(engine)
        with engine.connect() as connection:
            totals = {str(call_id): awarded for call_id, awarded in connection.execute(text("SELECT call_id, awarded FROM calls ORDER BY call_id"))}
        assert totals == {"c-awarded": "0.30", "c-none": None}
    finally:
        engine.dispose()


def test_the_words_a_search_reads_are_filled_in_for_the_projects_calls_members_and_days_already_there(database_url: str) -> None:
    """A database from before ``projects.words``, ``calls.words``, ``institutions.words`` and
    ``innovation_days.words`` (``?q=``): the migrations fold each row's title and summary, or name,
    in every language, so that a search finds what was there before them as what comes after."""
    engine = make_engine(database_url)  # a migrated copy (tests/conftest.py)
    now = "2026-03-01 08:00:00"
    try:
        with engine.begin() as connection:
            connection.execute(text(
                "INSERT INTO projects (project_id, owner, title, summary, themes, status, external_refs, sdgs, registered_at, updated_at) "
                "VALUES (:id, 'tr-mersin-bb', :title, :summary, '[]', 'active', '[]', '[]', :now, :now)"),
                [{"id": "p-elderly", "title": '{"tr": "Evde Ya\\u015fl\\u0131 Destek", "en": "Home care"}',
                  "summary": '{"fi": "Ty\\u00f6el\\u00e4m\\u00e4"}', "now": now},
                 {"id": "p-bare", "title": '{"en": "KITCHENS"}', "summary": None, "now": now}])
            connection.execute(text(
                "INSERT INTO calls (call_id, owner, title, kind, themes, eligible_kinds, eligible_countries, opens_at, deadline, "
                "deadline_model, published_at) VALUES ('c-1', 'eu-esf-fund', '{\"ar\": \"\u062f\u064e\u0639\u0652\u0645\"}', "
                "'funding', '[]', '[]', '[]', :now, :now, 'single_stage', :now)"), {"now": now})
            connection.execute(text("INSERT INTO institutions (id, name, kind, country, themes, identifiers, joined_at) "
                                    "VALUES ('tr-mersin-bb', '{\"tr\": \"MERS\u0130N B\u00fcy\u00fck\u015fehir\"}', "
                                    "'municipality', 'TR', '[]', '[]', :now)"), {"now": now})
            connection.execute(text(
                "INSERT INTO innovation_days (day_id, organizer, title, summary, format, starts_at, ends_at, attendance_mode, "
                "capacity, registration_deadline, themes, languages, status) VALUES ('d-1', 'fi-thl', "
                "'{\"fi\": \"Sosiaalisten innovaatioiden p\u00e4iv\u00e4\"}', '{\"en\": \"Meet FUNDERS\"}', 'innovation_day', "
                ":now, :now, 'online', 10, :now, '[]', '[]', 'scheduled')"), {"now": now})
            connection.execute(text("UPDATE alembic_version SET version_num = '0029_withdrawal_reason' "
                                    "WHERE version_num = '0037_search_index'"))
            connection.execute(text("UPDATE alembic_version SET version_num = '0012_day_revision' "
                                    "WHERE version_num = '0038_day_search_index'"))
            for table in ("projects", "calls", "institutions", "innovation_days"):
                connection.execute(text(f"ALTER TABLE {table} DROP COLUMN words"))
        migrate(engine)
        with engine.connect() as connection:
            found = {str(key): words for key, words in connection.execute(text(
                "SELECT project_id, words FROM projects UNION ALL SELECT call_id, words FROM calls "
                "UNION ALL SELECT id, words FROM institutions UNION ALL SELECT day_id, words FROM innovation_days"))}
        assert found == {"p-elderly": "evde yasli destek\nhome care\ntyoelama", "p-bare": "kitchens", "c-1": "\u062f\u0639\u0645",
                         "tr-mersin-bb": "mersin buyuksehir", "d-1": "sosiaalisten innovaatioiden paiva\nmeet funders"}
    finally:
        engine.dispose()


def test_a_webhook_endpoint_disabled_before_its_positions_were_kept_counts_as_disabled_where_the_recorder_got_to(
    database_url: str,
) -> None:
    """A database from before ``webhook_endpoints.disabled_after_seq``: an endpoint disabled then was
    owed what the webhooks' recorder had recorded and nothing after, and stays so; an enabled one
    was never disabled, and has no gap."""
    engine = make_engine(database_url)  # a migrated copy (tests/conftest.py)
    endpoint = ("INSERT INTO webhook_endpoints (id, institution, url, event_types, description, secret, enabled, ordered, after_seq, "
                "created_at, updated_at) VALUES (:id, 'fi-diak', 'https://diak.example/hook', '[]', '', 'whsec_x', :enabled, :enabled, 3, "
                ":now, :now)")
    try:
        with engine.begin() as connection:
            for endpoint_id, enabled in (("ep_disabled", False), ("ep_enabled", True)):
                connection.execute(text(endpoint), {"id": endpoint_id, "enabled": enabled, "now": "2026-03-01 08:00:00"})
            connection.execute(text("INSERT INTO webhook_consumer_positions (consumer, seq, epoch) VALUES ('webhooks', 42, 1)"))
            connection.execute(text("UPDATE alembic_version SET version_num = '0026_webhook_owed_order' "
                                    "WHERE version_num = '0034_webhook_cancelled_by'"))
            for column in ("disabled_after_seq", "enabled_after_seq", "earlier_gaps", "last_failure_at"):
                connection.execute(text(f"ALTER TABLE webhook_endpoints DROP COLUMN {column}"))
            connection.execute(text("ALTER TABLE webhook_deliveries DROP COLUMN cancelled_by"))
        migrate(engine)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT id, disabled_after_seq, enabled_after_seq, earlier_gaps FROM webhook_endpoints ORDER BY id"))
            found = {str(row[0]): (row[1], row[2], row[3] if isinstance(row[3], list) else json.loads(row[3])) for row in rows}
        assert found == {"ep_disabled": (42, None, []), "ep_enabled": (None, None, [])}
    finally:
        engine.dispose()


def test_a_failing_webhook_endpoint_is_given_its_latest_attempt_as_its_last_failure(database_url: str) -> None:
    """A database from before ``webhook_endpoints.last_failure_at``: an endpoint failing then has
    failed last at its latest attempt (its failing run goes on from there); a healthy one has not."""
    engine = make_engine(database_url)  # a migrated copy (tests/conftest.py)
    endpoint = ("INSERT INTO webhook_endpoints (id, institution, url, event_types, description, secret, enabled, ordered, after_seq, "
                "created_at, updated_at, failing_since, earlier_gaps) VALUES (:id, 'fi-diak', 'https://diak.example/hook', '[]', '', "
                "'whsec_x', true, true, 3, :now, :now, :failing, '[]')")
    try:
        with engine.begin() as connection:
            for endpoint_id, failing in (("ep_failing", "2026-03-01 09:00:00+00:00"), ("ep_healthy", None)):
                connection.execute(text(endpoint), {"id": endpoint_id, "now": "2026-03-01 08:00:00+00:00", "failing": failing})
                connection.execute(text("INSERT INTO webhook_deliveries (id, endpoint_id, event_id, event_type, seq, status, attempts, "
                                        "created_at) VALUES (:delivery, :id, 'ev-1', 'project.registered', 4, 'pending', 2, "
                                        "'2026-03-01 08:30:00+00:00')"), {"delivery": 1 if failing else 2, "id": endpoint_id})
                for attempted_at in ("2026-03-01 09:00:00+00:00", "2026-03-02 10:30:00+00:00"):
                    connection.execute(text("INSERT INTO webhook_attempts (delivery_id, attempted_at, status_code, latency_ms) "
                                            "VALUES (:delivery, :at, 500, 3)"), {"delivery": 1 if failing else 2, "at": attempted_at})
            connection.execute(text("UPDATE alembic_version SET version_num = '0027_webhook_disabled_positions' "
                                    "WHERE version_num = '0034_webhook_cancelled_by'"))
            connection.execute(text("ALTER TABLE webhook_endpoints DROP COLUMN last_failure_at"))
            connection.execute(text("ALTER TABLE webhook_deliveries DROP COLUMN cancelled_by"))
        migrate(engine)
        with engine.connect() as connection:
            found: dict[str, Any] = {str(row[0]): row[1] for row in connection.execute(text("SELECT id, last_failure_at FROM webhook_endpoints"))}
        assert found["ep_healthy"] is None
        assert str(found["ep_failing"]).startswith("2026-03-02 10:30:00"), found
    finally:
        engine.dispose()


def test_a_withdrawal_s_reason_kept_as_the_application_s_comment_becomes_its_withdrawal_reason(database_url: str) -> None:
    """A database from before ``call_applications.withdrawal_reason``: a withdrawn application's
    reason was kept as its ``comment``, and is its ``withdrawal_reason`` now; a decision's comment
    is not one."""
    engine = make_engine(database_url)  # a migrated copy (tests/conftest.py)
    application = ("INSERT INTO call_applications (call_id, application_id, applicant, partners, status, submitted_at, comment) "
                   "VALUES ('c-1', :id, 'fi-diak', '[]', :status, '2026-03-01 08:00:00', :comment)")
    try:
        with engine.begin() as connection:
            for application_id, status, comment in (("a-withdrawn", "withdrawn", '{"en": "No co-funding"}'), ("a-silent", "withdrawn", None),
                                                    ("a-declined", "declined", '{"en": "Thank you"}')):
                connection.execute(text(application), {"id": application_id, "status": status, "comment": comment})
            connection.execute(text("UPDATE alembic_version SET version_num = '0024_call_awarded' "
                                    "WHERE version_num = '0037_search_index'"))
            connection.execute(text("ALTER TABLE call_applications DROP COLUMN withdrawal_reason"))
            for table in ("projects", "calls", "institutions"):  # (0035, after 0029)
                connection.execute(text(f"ALTER TABLE {table} DROP COLUMN words"))
        migrate(engine)
        with engine.connect() as connection:
            rows = connection.execute(text("SELECT application_id, withdrawal_reason FROM call_applications ORDER BY application_id"))
            found = {str(row[0]): row[1] if row[1] is None or isinstance(row[1], dict) else json.loads(row[1]) for row in rows}
        assert found == {"a-declined": None, "a-silent": None, "a-withdrawn": {"en": "No co-funding"}}
    finally:
        engine.dispose()


def test_a_search_is_served_by_an_index_on_postgresql(tmp_path: Path, pg_server_url: str | None) -> None:
    """`?q=` is a `LIKE '%word%'` of each word over the rows' `words`: on a portal's hundred
    thousand projects, PostgreSQL answers it from pg_trgm's GIN index of them (migrations 0037,
    0038), as the read API asks it — its escapes included — where it read every row."""
    from sqlmodel import select

    from handlers.calls import Call
    from handlers.innovation_days import InnovationDay
    from handlers.institutions import Institution
    from handlers.projects import Project
    from handlers.words import matching
    from tests.conftest import fresh_database

    databases = fresh_database("postgresql", tmp_path, pg_server_url)
    engine = make_engine(next(databases))
    try:
        with engine.connect() as connection:
            connection.execute(text("SET enable_seqscan = off"))  # (an empty table's cheapest read is the rows)
            for model, table in ((Project, "projects"), (Call, "calls"), (Institution, "institutions"),
                                 (InnovationDay, "innovation_days")):
                query = select(model).where(*matching(model.words, "mutfakları 50%_off"))  # type: ignore[attr-defined]
                compiled = query.compile(connection)  # (its words sent as parameters, as the read API's are)
                plan = "\n".join(connection.exec_driver_sql(f"EXPLAIN {compiled}", compiled.params).scalars())
                assert f"Index Scan on ix_{table}_words" in plan, plan
    finally:
        engine.dispose()
        next(databases, None)


def test_where_pg_trgm_cannot_be_had_the_migrations_say_how_to_index_the_search_and_status_says_it_is_not(
    tmp_path: Path, pg_server_url: str | None, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """A role that may create tables but not extensions (the database is not its own: a
    PostgreSQL its operator was given a schema in) migrates the read models all the same: the
    search's indexes are left out, and the migrations' warning gives the statements that add them.
    `collabbus status` names the tables searched without an index, and the same statements, until
    a superuser has run them."""
    import uuid

    from handlers.db import migration_heads
    from handlers.words import SEARCHED_TABLES, unindexed
    from ops.cli import _render_status
    from ops.status import _database

    pg_server_url = require_postgres(pg_server_url)
    name, role = f"t_{uuid.uuid4().hex[:12]}", f"r_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(pg_server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE ROLE {role} LOGIN"))
        connection.execute(text(f"CREATE DATABASE {name} TEMPLATE template0"))  # (owned by the superuser, without pg_trgm)
    superuser_url = pg_server_url.rsplit("/", 1)[0] + f"/{name}"
    superuser = sa.create_engine(superuser_url, isolation_level="AUTOCOMMIT")
    with superuser.connect() as connection:
        connection.execute(text(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}"))
    engine = make_engine(sa.make_url(superuser_url).set(username=role).render_as_string(hide_password=False))
    try:
        with caplog.at_level("WARNING", logger="alembic"):
            migrate(engine)
        with engine.connect() as connection:
            assert set(connection.execute(text("SELECT version_num FROM alembic_version")).scalars()) == migration_heads()
            assert unindexed(connection) == list(SEARCHED_TABLES)
        warnings = [record.getMessage() for record in caplog.records if "pg_trgm cannot be had" in record.getMessage()]
        assert len(warnings) == 2 and all("permission denied" in warning for warning in warnings), warnings
        told = " ".join(warnings)
        for table in SEARCHED_TABLES:
            assert f"CREATE INDEX ix_{table}_words ON {table} USING gin (words gin_trgm_ops)" in told, told

        database, _ = _database(engine, 0)
        assert database["search_unindexed"] == list(SEARCHED_TABLES)
        _render_status({"streams": {}, "consumers": {}, "dead_letters": {}, "database": database})
        shown = " ".join(capsys.readouterr().out.split())
        assert "search: no index of projects, calls, institutions, innovation_days" in shown, shown
        statements = shown.split("A superuser indexes them with: ")[1].split("; ")
        assert statements[0] == "CREATE EXTENSION IF NOT EXISTS pg_trgm" and len(statements) == 1 + len(SEARCHED_TABLES), statements

        with superuser.connect() as connection:  # what status says to do, as a superuser
            for statement in statements:
                connection.execute(text(statement))
        database, _ = _database(engine, 0)
        assert database["search_unindexed"] == []
        _render_status({"streams": {}, "consumers": {}, "dead_letters": {}, "database": database})
        assert "search:" not in capsys.readouterr().out
    finally:
        engine.dispose()
        superuser.dispose()
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            connection.execute(text(f"DROP ROLE IF EXISTS {role}"))
        admin.dispose()


def test_status_checks_the_index_of_every_table_searched() -> None:
    """``collabbus status`` names the searches without their index from
    :data:`~handlers.words.SEARCHED_TABLES`: a table made searchable (its model's
    ``trigram_index``) is among them."""
    from sqlmodel import SQLModel

    import handlers.tables  # noqa: F401  (every table on the metadata)
    from handlers.words import SEARCHED_TABLES

    indexed = {table.name for table in SQLModel.metadata.tables.values()
               if any(index.name == f"ix_{table.name}_words" for index in table.indexes)}
    assert indexed and set(SEARCHED_TABLES) == indexed
