"""The code type-checks: ``mypy .`` (with the pydantic plugin, configured in pyproject.toml), the
application and the tests alike, as ``make typecheck`` runs it. Its cache is the project's own, so a
run after an earlier one checks only what changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.early
def test_mypy_finds_no_type_errors() -> None:
    result = subprocess.run([sys.executable, "-m", "mypy", "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert "Success: no issues found" in result.stdout, result.stdout[-2000:]
