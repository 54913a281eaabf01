"""The test suite's throw-away PostgreSQL clusters do not outlive a run that was killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests import postgres

ROOT = Path(__file__).resolve().parent.parent

START_AND_WAIT = """
import sys, time
from tests.postgres import postgres_url
with postgres_url() as url:
    print(url, flush=True)
    time.sleep(120)
"""


@pytest.mark.skipif(postgres._bindir() is None or bool(os.environ.get("COLLABBUS_TEST_POSTGRES_URL")),
                    reason="no PostgreSQL binaries here to start a cluster with")
def test_a_cluster_left_by_a_killed_run_is_stopped_by_the_next() -> None:
    run = subprocess.Popen([sys.executable, "-c", START_AND_WAIT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert run.stdout is not None
    url = run.stdout.readline().strip()
    assert url.startswith("postgresql"), url
    port = url.rsplit(":", 1)[1].split("/")[0]
    owned = [d for d in Path(tempfile.gettempdir()).glob("collabbus-pg-*")
             if (d / postgres.OWNER_FILE).exists() and (d / postgres.OWNER_FILE).read_text() == str(run.pid)]
    assert len(owned) == 1
    run.send_signal(signal.SIGKILL)  # as a timeout kills a run: no clean-up of its own
    run.wait()
    assert (owned[0] / "postmaster.pid").exists()  # its cluster still runs

    bindir = postgres._bindir()
    assert bindir is not None
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    postgres._stop_abandoned(bindir, as_user)
    assert not owned[0].exists()
    listening = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p", port], capture_output=True)
    assert listening.returncode != 0  # nothing answers on its port any more
