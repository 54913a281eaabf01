"""``pytest --cpu-report N``: the tests that took the most CPU, for keeping the suite in its time."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_cpu_report_lists_the_costliest_tests_with_their_seconds() -> None:
    run = subprocess.run(
        # One xdist worker: the figures travel from a worker to the report, as in the suite. (The
        # plugins these tests do not use cost each of the two processes seconds to load.)
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:schemathesis", "-p", "no:hypothesispytest",
         "-p", "no:anyio", "-n", "1", "tests/bus/test_watch.py", "--cpu-report", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    summary = run.stdout[run.stdout.index("CPU: "):]
    assert re.search(r"CPU: \d+ s in 3 tests; the 2 that took most", summary), summary
    listed = re.findall(r"^\s+(\d+\.\d) s  (tests/bus/test_watch\.py::test_\w+)$", summary, re.MULTILINE)
    assert len(listed) == 2, summary
    assert [float(seconds) for seconds, _ in listed] == sorted((float(seconds) for seconds, _ in listed), reverse=True)
