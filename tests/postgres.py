"""A throw-away PostgreSQL cluster for the test session, from the machine's PostgreSQL binaries.

``COLLABBUS_TEST_POSTGRES_URL`` names an existing server instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from bus.server import free_port


def _bindir() -> Path | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


OWNER_FILE = "collabbus-owner.pid"
"""In a cluster's directory: the test process it belongs to."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop_abandoned(bindir: Path, as_user: list[str]) -> None:
    """Stop and remove the clusters of test runs that ended without stopping theirs (killed by a
    timeout or by hand): their owner process is gone."""
    for pgdata in Path(tempfile.gettempdir()).glob("collabbus-pg-*"):
        try:
            owner = int((pgdata / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not started yet, or not one of ours
        if _alive(owner):
            continue
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(pgdata, ignore_errors=True)


@contextmanager
def postgres_url() -> Iterator[str | None]:
    """Yield a SQLAlchemy URL of a running PostgreSQL, or None when none can be had here."""
    if os.environ.get("COLLABBUS_TEST_POSTGRES_URL"):
        yield os.environ["COLLABBUS_TEST_POSTGRES_URL"]
        return
    bindir = _bindir()
    if bindir is None:
        yield None
        return
    pgdata = Path(tempfile.mkdtemp(prefix="collabbus-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        if subprocess.run(["id", "postgres"], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--system", "--no-create-home", "postgres"], check=True)
        shutil.chown(pgdata, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    _stop_abandoned(bindir, as_user)
    port = free_port()
    subprocess.run([*as_user, str(bindir / "initdb"), "-D", str(pgdata), "-U", "postgres", "-A", "trust"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {pgdata} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    (pgdata / OWNER_FILE).write_text(str(os.getpid()))
    subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pgdata), "-o", options, "-l", str(pgdata / "log"),
                    "-w", "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(pgdata, ignore_errors=True)


# --- databases for one test each, used again ------------------------------------------------------
#
# A database copied from the migrated template costs the cluster a third of a second of CPU or
# more (CREATE DATABASE copies the template's catalogs through the write-ahead log, and the first
# connection to a new database builds its relation cache), which several hundred tests paid. A
# test's database is instead emptied after it and handed to a later test: the connections still
# to it are ended and it is renamed first (so nothing left of the test can reach it by the name it
# had), and it is emptied only if its schema is still the template's; else it is dropped.

_SHAPE = """
SELECT md5(string_agg(part, ';' ORDER BY part)) FROM (
    SELECT n.nspname || '.' || c.relname || ':' || c.relkind::text || ':' || coalesce(a.attname, '') || ':'
           || coalesce(format_type(a.atttypid, a.atttypmod), '') || ':' || coalesce(a.attnotnull::text, '')
           || ':' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') AS part
    FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
    LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
    WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
    UNION ALL
    SELECT 'constraint ' || conrelid::regclass::text || '.' || conname || ': ' || pg_get_constraintdef(oid)
    FROM pg_constraint WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
    UNION ALL
    SELECT 'index ' || indexdef FROM pg_indexes WHERE schemaname NOT IN ('pg_catalog', 'information_schema')
    UNION ALL
    SELECT 'trigger ' || tgrelid::regclass::text || '.' || tgname FROM pg_trigger WHERE NOT tgisinternal
    UNION ALL
    SELECT 'function ' || p.oid::regprocedure::text || ': ' || md5(p.prosrc) FROM pg_proc p
    WHERE p.pronamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace)
) AS shape
"""
"""A fingerprint of a database's schema: its relations and their columns, constraints, indexes,
triggers and functions."""

_LARGE = 10_000
"""Rows past which a database is dropped rather than emptied (its tables would keep the space)."""


def _shape(connection: sa.Connection) -> str:
    version = ""
    if connection.execute(sa.text("SELECT to_regclass('alembic_version') IS NOT NULL")).scalar():
        version = ",".join(sorted(str(v) for v in connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalars()))
    return f"{connection.execute(sa.text(_SHAPE)).scalar()} {version}"


class DatabasePool:
    """The databases of one test process's cluster, each a copy of ``template``: :meth:`take` one
    for a test, :meth:`give_back` it after."""

    def __init__(self, server_url: str, template: str) -> None:
        self.server_url = server_url
        self.template = template
        self.admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
        self.idle: list[str] = []
        self.shape: str | None = None

    def url(self, name: str) -> str:
        return self.server_url.rsplit("/", 1)[0] + f"/{name}"

    def take(self) -> str:
        """A database name: an emptied one, or a new copy of the template."""
        if self.idle:
            return self.idle.pop()
        name = f"t_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as connection:
            connection.execute(sa.text(f"CREATE DATABASE {name} TEMPLATE {self.template}"))
        return name

    def give_back(self, name: str) -> None:
        """End the connections to ``name``, rename it, and empty it for the next test when its
        schema is the template's and it holds no more than ``_LARGE`` rows; else drop it."""
        renamed = f"t_{uuid.uuid4().hex[:12]}"
        try:
            with self.admin.connect() as connection:
                connection.execute(sa.text(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false"))
                deadline = time.monotonic() + 10
                while connection.execute(sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = :name AND pid <> pg_backend_pid()"),
                        {"name": name}).scalar():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"connections to {name} did not end")
                    time.sleep(0.01)
                connection.execute(sa.text(f"ALTER DATABASE {name} RENAME TO {renamed}"))
                connection.execute(sa.text(f"ALTER DATABASE {renamed} ALLOW_CONNECTIONS true"))
            if self._empty(renamed):
                self.idle.append(renamed)
                return
        except (sa.exc.DBAPIError, TimeoutError):
            pass
        with self.admin.connect() as connection:
            for database in (name, renamed):
                connection.execute(sa.text(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)"))

    def close(self, *, template: bool = False) -> None:
        """Drop the databases waiting for a test, and the template if asked (a server the suite
        did not start keeps none of them)."""
        with self.admin.connect() as connection:
            for name in [*self.idle, *([self.template] if template else [])]:
                connection.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        self.idle.clear()
        self.admin.dispose()

    def _empty(self, name: str) -> bool:
        engine = sa.create_engine(self.url(name), poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                shape = _shape(connection)
                if self.shape is None:
                    with sa.create_engine(self.url(self.template), poolclass=sa.pool.NullPool).connect() as template:
                        self.shape = _shape(template)
                if shape != self.shape:
                    return False
                tables = connection.execute(sa.text(
                    "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
                    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') AND tablename <> 'alembic_version'")).scalars().all()
                connection.execute(sa.text("SET LOCAL session_replication_role = replica"))  # (no foreign keys' order to follow)
                removed = sum(connection.execute(sa.text(f"DELETE FROM {table}")).rowcount for table in tables)
                if removed > _LARGE:
                    connection.rollback()
                    return False
                connection.execute(sa.text(
                    "SELECT setval(format('%I.%I', schemaname, sequencename), start_value, false) FROM pg_sequences "
                    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"))
                connection.commit()
            return True
        finally:
            engine.dispose()
