"""Schemathesis against the gateway's own /openapi.json: no server error, no response that
violates the documented schema, for a member with a valid token."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.connectors.conftest import Gateway


# One database is enough here: the responses' shapes do not depend on it, and the connector
# tests run every endpoint on both.
@pytest.mark.parametrize("gateway", ["sqlite"], indirect=True)
async def test_schemathesis_finds_no_server_error_and_no_schema_violation(gateway: Gateway, tmp_path: Path) -> None:
    member = await gateway.join("municipality", "TR")
    token = gateway.token(member)
    binary = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or "schemathesis"
    command = [
        binary, "run", f"{gateway.url}/openapi.json",
        "--checks", "not_a_server_error,response_schema_conformance",
        "--header", f"Authorization: Bearer {token}",
        "--max-examples", "6", "--phases", "examples,fuzzing", "--workers", "1",
        "--seed", "20261123", "--request-timeout", "20", "--no-color",
    ]
    result = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=420, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "Tested: " in result.stdout and int(result.stdout.split("Tested: ")[1].split()[0]) >= 25
