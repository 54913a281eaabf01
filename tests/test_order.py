"""``pytest --order``: the tests of each module run in another order, to find a test that passes
only after, or before, another of its module (pytest-xdist's work stealing runs them so too)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _order

ROOT = Path(__file__).resolve().parents[1]
MODULE = "tests/connectors/test_log_over_nats.py"
"""A module whose tests share a set-up per database (its ``gateway`` on SQLite, then on PostgreSQL)."""


def collected(*options: str) -> list[str]:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:schemathesis",
         "-p", "no:hypothesispytest", "-p", "no:anyio", *options, MODULE],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in run.stdout.splitlines() if "::" in line]


def test_reverse_and_shuffle_reorder_the_tests_of_each_set_up_and_keep_the_set_ups_in_place() -> None:
    as_collected = collected()
    sqlite = [test for test in as_collected if test.endswith("[sqlite]")]
    postgresql = [test for test in as_collected if test.endswith("[postgresql]")]
    assert len(sqlite) >= 3 and as_collected == sqlite + postgresql

    assert collected("--order", "reverse") == sqlite[::-1] + postgresql[::-1]

    shuffled = collected("--order", "shuffle:5")
    assert sorted(shuffled[:len(sqlite)]) == sorted(sqlite) and sorted(shuffled[len(sqlite):]) == sorted(postgresql)
    assert shuffled != as_collected
    assert collected("--order", "shuffle:5") == shuffled  # the seed makes the order again


def test_an_order_that_is_none_is_refused_saying_which_there_are() -> None:
    assert [_order(value) for value in ("collected", "reverse", "shuffle:12")] == ["collected", "reverse", "shuffle:12"]
    for wrong in ("shuffle:", "shuffle:x", "random", "shuffle:-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="collected, reverse or shuffle:SEED"):
            _order(wrong)
