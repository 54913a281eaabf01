"""A throw-away PostgreSQL cluster for the test session, from the machine's PostgreSQL binaries.

``COLLABBUS_TEST_POSTGRES_URL`` names an existing server instead.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
