"""``collabbus institutions token`` and ``collabbus up`` serving the gateway, as an operator uses them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from bus.server import free_port
from ops.bench import child_processes
from tests.commands import Command, collabbus, spawn
from tests.connectors.conftest import Gateway, institution_id

COLLABBUS = [sys.executable, "-m", "ops"]


def token_command(institution: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return collabbus("institutions", "token", institution, env=env)


async def test_the_cli_prints_a_token_that_works(gateway: Gateway, tmp_path: Path) -> None:
    member = await gateway.join("university")
    await gateway.settle()
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_DATABASE_URL": gateway.database_url}

    issued = token_command(member, env)
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.removesuffix("\n")
    assert token.startswith("cb_") and "\n" not in token and issued.stdout.endswith("\n")
    response = await gateway.client.get("/institutions", params={"limit": 500}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200 and member in {item["id"] for item in response.json()["items"]}

    refused = token_command(institution_id("stranger"), env)
    assert refused.returncode == 1 and refused.stdout == "" and "not a member" in refused.stderr


async def test_the_cli_revokes_one_token_or_all_of_a_member(gateway: Gateway, tmp_path: Path) -> None:
    import json

    member, other = await gateway.join("university"), await gateway.join("university")
    await gateway.settle()
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_DATABASE_URL": gateway.database_url}
    first, second = (token_command(member, env).stdout.strip() for _ in range(2))
    stranger = token_command(other, env).stdout.strip()

    async def status(token: str) -> int:
        return (await gateway.client.get("/institutions", headers={"Authorization": f"Bearer {token}"})).status_code

    def revoke(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return collabbus("institutions", "revoke", *args, env=env, stdin=stdin)

    assert [await status(t) for t in (first, second, stranger)] == [200, 200, 200]
    refused = revoke(member, "--token", stranger)  # not the member's: left alone
    assert refused.returncode == 1 and "not" in refused.stderr and await status(stranger) == 200
    one = revoke(member, "--token", "-", "--json", stdin=first + "\n")
    assert one.returncode == 0 and json.loads(one.stdout) == {"institution": member, "revoked": 1}, one.stderr
    assert [await status(t) for t in (first, second)] == [401, 200]
    typo = revoke(member, "--token", first + "x")  # nothing revoked: a script must not take it for success
    assert typo.returncode == 1 and "unknown or revoked already" in typo.stdout
    every = revoke(member)
    assert every.returncode == 0 and "revoked 1 token of" in every.stdout, every.stderr
    assert [await status(t) for t in (first, second, stranger)] == [401, 401, 200]


async def test_the_cli_lists_a_members_tokens_and_revokes_one_by_its_listed_hash(gateway: Gateway, tmp_path: Path) -> None:
    """`institutions access ID` lists the tokens by the start of their SHA-256, when issued and
    revoked; `revoke ID --token PREFIX` revokes the one listed (an operator has no copy of it)."""
    import json

    from handlers.tokens import token_hash

    member, other = await gateway.join("university"), await gateway.join("university")
    await gateway.settle()
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_DATABASE_URL": gateway.database_url}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return collabbus("institutions", *args, env=env)

    empty = cli("access", member, "--json")
    assert empty.returncode == 0 and json.loads(empty.stdout)["tokens"] == [], empty.stderr
    first, second = (token_command(member, env).stdout.strip() for _ in range(2))
    stranger = token_command(other, env).stdout.strip()
    listed = json.loads(cli("access", member, "--json").stdout)
    assert [row["sha256"] for row in listed["tokens"]] == [token_hash(first)[:12], token_hash(second)[:12]]
    assert [row["revoked_at"] for row in listed["tokens"]] == [None, None]
    assert first not in cli("access", member).stdout and "2 valid" in cli("access", member).stdout

    not_theirs = cli("revoke", member, "--token", token_hash(stranger)[:12])  # another member's: not found among these
    assert not_theirs.returncode == 1 and "unknown or revoked already" in not_theirs.stdout
    one = cli("revoke", member, "--token", listed["tokens"][1]["sha256"], "--json")
    assert one.returncode == 0 and json.loads(one.stdout) == {"institution": member, "revoked": 1}, one.stderr
    statuses = [(await gateway.client.get("/me", headers={"Authorization": f"Bearer {t}"})).status_code for t in (first, second, stranger)]
    assert statuses == [200, 401, 200]
    after = json.loads(cli("access", member, "--json").stdout)["tokens"]
    assert after[0]["revoked_at"] is None and after[1]["revoked_at"] is not None
    assert [row["valid"] for row in after] == [True, False] and "1 valid" in cli("access", member).stdout
    again = cli("revoke", member, "--token", listed["tokens"][1]["sha256"])
    assert again.returncode == 1 and "unknown or revoked already" in again.stdout

    from datetime import datetime, timedelta, timezone

    lasting = collabbus("institutions", "token", member, "--expires", "12h", "--label", "CI pipeline (Ana)", env=env)
    assert lasting.returncode == 0 and lasting.stdout.startswith("cb_"), lasting.stderr
    expiring = json.loads(cli("access", member, "--json").stdout)["tokens"][-1]
    assert expiring["sha256"] == token_hash(lasting.stdout.strip())[:12] and expiring["label"] == "CI pipeline (Ana)"
    table = collabbus("institutions", "access", member, env={**env, "COLUMNS": "200"}).stdout  # (wide enough for the label on one line)
    assert listed["tokens"][0]["label"] is None and "CI pipeline (Ana)" in table
    expires_in = datetime.fromisoformat(expiring["expires_at"]) - datetime.now(timezone.utc)
    assert timedelta(hours=11, minutes=59) < expires_in <= timedelta(hours=12)
    assert all(row["expires_at"] is None for row in listed["tokens"])  # the others: until revoked
    assert "12h" not in cli("access", member).stdout and "never" in cli("access", member).stdout
    wrong = collabbus("institutions", "token", member, "--expires", "soon", env=env)
    assert wrong.returncode == 2 and "not a duration" in wrong.stderr and wrong.stdout == ""
    unlabelled = collabbus("institutions", "token", member, "--label", " ", env=env)
    assert unlabelled.returncode == 2 and "1 to 100 characters" in unlabelled.stderr and unlabelled.stdout == ""


def test_collabbus_up_serves_the_gateway(tmp_path: Path) -> None:
    http = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}", "COLLABBUS_HTTP": http,
           "COLLABBUS_GATE_PROCESSES": "1"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_DATABASE_URL"):
        env.pop(name, None)
    proc = spawn("up", env=env)
    assert proc.stderr is not None
    gatekeepers: list[int] = []
    try:
        lines: list[str] = []
        while not any("Ctrl-C" in line for line in lines):
            lines.append(proc.stderr.readline())
            if proc.poll() is not None:
                pytest.fail("collabbus up exited: " + "".join(lines))
        assert any(f"http://{http}" in line for line in lines)
        assert any("judged by 1 gatekeeper process" in line for line in lines)
        readiness = httpx.get(f"http://{http}/readyz").json()
        assert readiness["status"] == "ready" and readiness["checks"]["gatekeepers"] == "ok"
        gatekeepers = child_processes(proc.pid, "ops gate")
        assert len(gatekeepers) == 1
        deadline = time.monotonic() + 20
        while (issued := token_command("operator", env)).returncode != 0:  # the operator's join is being applied
            assert time.monotonic() < deadline, issued.stderr
            time.sleep(0.2)
        response = httpx.get(f"http://{http}/institutions", headers={"Authorization": f"Bearer {issued.stdout.strip()}"})
        assert response.status_code == 200 and [i["id"] for i in response.json()["items"]] == ["operator"]
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest
    assert not [pid for pid in gatekeepers if Path(f"/proc/{pid}").exists()]  # stopped with the bus
    assert "starting it again" not in rest  # stopped on purpose, not restarted



def test_a_gatekeeper_restarting_leaves_the_bus_ready(tmp_path: Path) -> None:
    """A gatekeeper process that dies is started again; meanwhile the bus's own process judges
    NATS offers, so /readyz stays 200 (its gatekeepers check says so), and the bus says when the
    gatekeeper is back."""
    import signal as signals
    import threading

    http = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}", "COLLABBUS_HTTP": http,
           "COLLABBUS_GATE_PROCESSES": "1", "COLLABBUS_LOG_FORMAT": "text"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_DATABASE_URL"):
        env.pop(name, None)
    proc = spawn("up", env=env)
    assert proc.stderr is not None
    lines: list[str] = []
    reading = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reading.start()
    try:
        deadline = time.monotonic() + 60
        while not any("Ctrl-C" in line for line in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        [gatekeeper] = child_processes(proc.pid, "ops gate")
        os.kill(gatekeeper, signals.SIGKILL)
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 30
        while not any("ready again" in line for line in lines):
            assert time.monotonic() < deadline, "".join(lines)
            response = httpx.get(f"http://{http}/readyz")
            answers.append((response.status_code, response.json()["checks"].get("gatekeepers", "")))
            time.sleep(0.05)
        assert {status for status, _ in answers} == {200}, answers
        assert any("judges NATS offers meanwhile" in said for _, said in answers), answers
        assert httpx.get(f"http://{http}/readyz").json()["checks"]["gatekeepers"] == "ok"
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, "".join(lines)
        reading.join(timeout=10)


@pytest.mark.parametrize("problem", ["database unreachable", "database unreachable, gatekeepers started",
                                     "database URL", "data dir is a file"])
def test_up_says_in_one_line_what_is_wrong(tmp_path: Path, problem: str) -> None:
    """Also with gatekeeper processes started beside the read models: they are stopped with the
    bus (before its nats-server), quietly."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "data"), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "0"}
    env.pop("COLLABBUS_NATS_URL", None)
    if problem.startswith("database unreachable"):
        env["COLLABBUS_GATE_PROCESSES"] = "1" if "gatekeepers" in problem else "0"
        env["COLLABBUS_DATABASE_URL"] = "postgresql+psycopg://nobody:secret@127.0.0.1:1/nodb"
        expected = "the read models' database cannot be used"
    elif problem == "database URL":
        env["COLLABBUS_DATABASE_URL"] = "notaurl"
        expected = "the read models' database cannot be used"
    else:
        (tmp_path / "data").write_text("")
        expected = "cannot be used"
    result = collabbus("up", env=env)
    assert result.returncode == 1
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "secret" not in result.stderr
    assert not _processes_with(f"COLLABBUS_DATA_DIR={tmp_path / 'data'}")  # no gatekeeper left behind


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("COLLABBUS_HTTP", "bogus", "not an address host:port"),
    ("COLLABBUS_NATS_LISTEN", "127.0.0.1:99999", "with a port from 0 to 65535"),
    ("COLLABBUS_DATABASE_URL", "mysql://reader:secret@127.0.0.1/db", "mysql is not a database the read models use"),
    ("COLLABBUS_STREAM_REPLICAS", "abc", "valid integer"),
])
def test_a_setting_that_cannot_be_used_is_a_usage_error_naming_it(tmp_path: Path, setting: str, value: str, says: str) -> None:
    """Refused before anything starts (exit 2), naming the variable and its option, without a
    traceback; a URL's value is not repeated (it may hold a password)."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "data"), setting: value}
    for command in (["status"], ["up"]):
        result = collabbus(*command, env=env)
        assert result.returncode == 2, result.stderr
        assert f"invalid setting: {setting} (--{setting.removeprefix('COLLABBUS_').lower().replace('_', '-')})" in result.stderr
        assert says in result.stderr and "Traceback" not in result.stderr and "secret" not in result.stderr
    assert not (tmp_path / "data").exists()  # nothing started, nothing written


def _processes_with(setting: str) -> list[int]:
    """The processes whose environment holds ``setting`` (``NAME=value``)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if setting.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours to read
            continue
    return found


def wait_until_loading(proc: subprocess.Popen[str], timeout: float = 30) -> None:
    """Wait until the command's own imports are under way: the first compiled module collabbus loads
    (orjson) is mapped into the process. Before that, Python itself is still starting, and a Ctrl-C
    there is the interpreter's traceback, not the command's."""
    maps = Path(f"/proc/{proc.pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if "orjson" in maps.read_text():
                return
        except OSError:
            return
        time.sleep(0.005)


@pytest.mark.parametrize("after", [0.0, 0.05, 0.1, 0.3])
def test_ctrl_c_while_the_command_loads_ends_it_without_a_traceback(tmp_path: Path, after: float) -> None:
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}"}
    proc = subprocess.Popen([*COLLABBUS, "status"], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    wait_until_loading(proc)
    time.sleep(after)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    # Interrupted (130), or by the signal itself when it came as the process ended; never a crash.
    assert proc.returncode >= 0 or proc.returncode == -signal.SIGINT, f"ended by signal {-proc.returncode}"


@pytest.mark.timeout(120)
def test_tail_follows_the_log_across_a_restart_of_the_embedded_nats_server(tmp_path: Path) -> None:
    """The bus starts its nats-server again when it dies; `collabbus tail` reconnects and goes on
    (it ended with a traceback: its connection did not reconnect)."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "0"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_DATABASE_URL"):
        env.pop(name, None)
    bus = spawn("up", env=env)
    tail: Command | None = None
    try:
        assert bus.stderr is not None
        while "Ctrl-C" not in (line := bus.stderr.readline()):
            assert line or bus.poll() is None, "collabbus up exited"
        tail = spawn("tail", "--since", "all", "--json", env=env, stdout=subprocess.PIPE)
        assert tail.stdout is not None
        assert orjson.loads(tail.stdout.readline())["event"]["type"] == "institution.joined"  # the operator's, #1
        [server] = child_processes(bus.pid, "nats-server")
        os.kill(server, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (added := collabbus("institutions", "add", "tr-after-the-restart", "--name", "After", "--kind", "ngo",
                                   "--country", "TR", env=env)).returncode != 0:
            assert time.monotonic() < deadline, added.stderr  # (until the bus has its server again)
            time.sleep(0.5)
        followed = orjson.loads(tail.stdout.readline())["event"]
        assert followed["type"] == "institution.joined" and followed["subject"] == "tr-after-the-restart"
        assert tail.poll() is None  # still following
    finally:
        for proc in (tail, bus):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:  # (how fast a loaded machine ends them is not what this test is about)
                    proc.kill()
                    proc.wait(timeout=30)


@pytest.mark.timeout(120)
def test_status_of_a_bus_whose_nats_does_not_answer_says_so_also_as_json(tmp_path: Path) -> None:
    """A running bus whose nats-server is stopped (SIGSTOP): `status` named no bus and asked
    whether one was running, and `--json` printed nothing for a script. Now it says the bus holds
    its data dir but NATS does not answer, in JSON too, and exits 1."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "0"}
    for name in ("COLLABBUS_NATS_URL", "COLLABBUS_DATABASE_URL"):
        env.pop(name, None)
    bus = spawn("up", env=env)
    server = None
    try:
        assert bus.stderr is not None
        while "Ctrl-C" not in (line := bus.stderr.readline()):
            assert line or bus.poll() is None, "collabbus up exited"
        [server] = child_processes(bus.pid, "nats-server")
        os.kill(server, signal.SIGSTOP)
        result = collabbus("status", "--json", env=env)
        assert result.returncode == 1 and "Traceback" not in result.stderr
        report = orjson.loads(result.stdout)
        assert report["bus_running"] is True
        assert f"the bus holds its data dir (pid {bus.pid}: collabbus up) but its NATS does not answer" in report["error"]
        assert report["error"] in " ".join(result.stderr.split())
    finally:
        if server is not None:
            os.kill(server, signal.SIGCONT)
        bus.send_signal(signal.SIGINT)
        bus.wait(timeout=30)
