"""The ``collabbus`` command line as a person or a script uses it, against a real running bus."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest

from bus.credentials import decode_jwt_claims
from bus.server import EmbeddedNats, free_port
from handlers.confidential import CONFIDENTIAL, public_live_subjects
from schemas import registry
from tests.commands import collabbus, spawn
from tests.conftest import join, load_fixtures, unique
from tests.ops.conftest import Poisoned, cli_env
from tests.ops.conftest import collabbus as acli

COLLABBUS = [sys.executable, "-m", "ops"]


def cli(*args: str, env: dict[str, str], timeout: float = 60, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return collabbus(*args, env=env, timeout=timeout, stdin=stdin)


def flat(text: str) -> str:
    """A message as one line: without the frame Typer draws around errors, and unwrapped."""
    return " ".join(text.translate(str.maketrans("", "", "│╭╮╰╯─")).split())


@contextmanager
def collabbus_up(env: dict[str, str]) -> Iterator[None]:
    """``collabbus up`` in its own process with ``env`` until the block ends; it stops on Ctrl-C."""
    proc = spawn("up", env=env)
    assert proc.stderr is not None
    lines = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        lines.append(line)
        if "is up" in line:
            break
        if proc.poll() is not None:
            pytest.fail("collabbus up exited: " + "".join(lines))
    else:
        proc.kill()
        pytest.fail("collabbus up did not come up: " + "".join(lines))
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest
        assert "stopped" in rest


@pytest.fixture(scope="module")
def running_bus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``collabbus up`` in its own process on a fresh data dir, as ``make run`` starts it."""
    data_dir = tmp_path_factory.mktemp("cli-data")
    port = free_port()
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(data_dir), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{port}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    env.pop("COLLABBUS_NATS_URL", None)
    with collabbus_up(env):
        yield env


def test_a_rebuild_is_refused_while_a_bus_applies_the_log(running_bus: dict[str, str]) -> None:
    """`collabbus rebuild` empties the read models: not under a running bus (it looks for the
    consumer as a starting bus does), unless --force."""
    refused = cli("rebuild", env=running_bus, timeout=60)
    assert refused.returncode == 1 and "a running bus is consuming the log" in refused.stderr, refused.stderr
    assert "--force" in refused.stderr


def test_a_forced_rebuild_takes_the_log_over_and_the_bus_applies_it_again_after(tmp_path: Path) -> None:
    """`rebuild --force` under a running bus takes the log over from it (its lease): the bus stops
    applying the log meanwhile, rather than applying it beside the rebuild, and applies it again
    — timers included — once the rebuild has finished, on what it rebuilt."""
    import threading

    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "data"), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    env.pop("COLLABBUS_NATS_URL", None)
    bus = spawn("up", env=env)
    said: list[str] = []
    assert bus.stderr is not None
    reading = threading.Thread(target=lambda: said.extend(iter(bus.stderr.readline, "")), daemon=True)  # type: ignore[union-attr]
    reading.start()

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60
        while not any(text in line for line in said):
            assert bus.poll() is None and time.monotonic() < deadline, "".join(said)
            time.sleep(0.1)

    try:
        wait_for("is up")
        owner = unique("fi-forced")
        assert cli("institutions", "add", owner, "--name", "Forced", "--kind", "municipality", "--country", "FI",
                   env=env).returncode == 0

        def register() -> subprocess.CompletedProcess[str]:
            return cli("publish", "project.registered", "--as", owner, "--data", json.dumps({
                "project_id": unique("p"), "title": {"fi": "Kotihoito"}, "owner": owner, "status": "active"}), env=env)

        assert "applied #" in register().stdout
        rebuilt = cli("rebuild", "--force", "--processes", "1", env=env, timeout=120)
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert "took the log over from the bus at" in rebuilt.stderr, rebuilt.stderr
        wait_for("the rebuild has finished: this bus applies the log again")
        assert any("took the log over (--force)" in line or "taken over from this bus and let go again" in line
                   for line in said), "".join(said)
        again = register()
        assert again.returncode == 0 and "applied #" in again.stdout, again.stdout + again.stderr  # the bus applies the log again
        resumed = next(at for at, line in enumerate(said) if "this bus applies the log again" in line)
        time.sleep(1.5)  # the timers run every second
        assert not any("timers not run" in line for line in said[resumed:]), "".join(said)  # they run again
        listed = cli("institutions", "list", "--json", env=env)
        assert owner in [row["id"] for row in json.loads(listed.stdout)["items"]]  # what the rebuild rebuilt
    finally:
        bus.send_signal(signal.SIGINT)
        assert bus.wait(timeout=60) == 0, "".join(said)
        reading.join(timeout=10)
    assert "stopped" in "".join(said)


def test_commands_on_a_running_buss_data_dir_find_where_it_listens(running_bus: dict[str, str]) -> None:
    """The bus runs with NATS and HTTP addresses of its own (COLLABBUS_NATS_LISTEN, COLLABBUS_HTTP):
    a command given only its data dir reaches it there — it looked for NATS at the default
    address and said the bus's nats-server was "down or starting". An address the command is
    given still counts, and the error then says where the bus listens."""
    env = {name: value for name, value in running_bus.items() if name not in ("COLLABBUS_NATS_LISTEN", "COLLABBUS_HTTP")}
    status = cli("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["bus_running"] is True and report["streams"]["COLLAB_EVENTS"]["messages"] >= 1, report
    listed = cli("institutions", "list", "--json", env=env)
    assert listed.returncode == 0 and "operator" in [row["id"] for row in json.loads(listed.stdout)["items"]], listed.stderr
    listen = running_bus["COLLABBUS_NATS_LISTEN"]
    elsewhere = cli("status", "--json", env={**env, "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}"})
    assert elsewhere.returncode == 1, elsewhere.stdout
    assert f"that bus listens at nats://{listen}" in json.loads(elsewhere.stdout)["error"], elsewhere.stdout
    refused = cli("dlq", "list", env={**env, "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}"})
    assert refused.returncode == 1 and f"that bus listens at nats://{listen}" in flat(refused.stderr), refused.stderr


def test_commands_not_given_the_external_nats_of_the_bus_on_their_data_dir_are_told_so(tmp_path: Path) -> None:
    """A bus on an external NATS (the production set-up): a command on its data dir without the
    bus's COLLABBUS_NATS_URL looked for an embedded server and said no bus had run there, or that
    NATS could not be reached at 127.0.0.1:4222. It says what to give it."""
    nats_server = EmbeddedNats(tmp_path / "nats", port=0, sync_always=False)
    nats_server.start()
    try:
        env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path / "bus"), "COLLABBUS_NATS_URL": nats_server.url,
               "COLLABBUS_NATS_CREDS": str(nats_server.bus_creds), "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}",
               "COLLABBUS_GATE_PROCESSES": "0"}
        with collabbus_up(env):
            told = {name: value for name, value in env.items() if name not in ("COLLABBUS_NATS_URL", "COLLABBUS_NATS_CREDS")}
            for command in (["status", "--json"], ["dlq", "list"], ["institutions", "list"]):
                refused = cli(*command, env=told)
                assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
                assert "uses an external NATS: give this command its COLLABBUS_NATS_URL and COLLABBUS_NATS_CREDS" in flat(
                    refused.stderr), (command, refused.stderr)
            assert cli("status", "--json", env=env).returncode == 0  # told, it reads the bus's log
    finally:
        nats_server.stop()


def test_publish_and_tail_through_a_running_bus(running_bus: dict[str, str], tmp_path: Path) -> None:
    env = running_bus
    fixture = load_fixtures()["project.registered"]
    # The fixture's members (again, with the same facts, when another test made them on this bus).
    added = cli(
        "institutions", "add", fixture["as"], "--replace", "--name", "Mersin Büyükşehir Belediyesi", "--lang", "tr",
        "--kind", "municipality", "--country", "TR", "--municipality-level", "metropolitan", env=env,
    )
    assert added.returncode == 0, added.stderr + added.stdout
    assert "accepted" in added.stdout
    partner = fixture["event"]["data"]["partners"][0]["institution"]  # (a partner is a member)
    assert cli("institutions", "add", partner, "--replace", "--name", "Genç İşi Kooperatifi", "--lang", "tr",
               "--kind", "cooperative", "--country", "TR", env=env).returncode == 0

    data_file = tmp_path / "project.json"
    data_file.write_text(json.dumps(fixture["event"]["data"], ensure_ascii=False), encoding="utf-8")
    event_id = unique("cli")
    published = cli("publish", "project.registered", "--as", fixture["as"], "--data", f"@{data_file}", "--id", event_id, env=env)
    assert published.returncode == 0, published.stderr + published.stdout
    assert f"accepted {event_id}" in published.stdout
    assert "applied #" in published.stdout  # it waited for the network to apply it

    again = cli("publish", "project.registered", "--as", fixture["as"], "--data", f"@{data_file}", "--id", event_id, "--json", env=env)
    assert again.returncode == 0 and json.loads(again.stdout)["duplicate"] is True
    seq = json.loads(again.stdout)["seq"]  # where the log has it (other tests publish on this bus too)

    tailed = cli("tail", "--type", "project.registered", "--since", str(seq), "--count", "1", "--json", env=env)
    assert tailed.returncode == 0, tailed.stderr
    event = json.loads(tailed.stdout.splitlines()[0])["event"]
    assert event["id"] == event_id and event["data"] == fixture["event"]["data"]

    readable = cli("tail", "--since", "all", "--count", "3", env=env)
    assert readable.returncode == 0 and "institution.joined" in readable.stdout
    for ended in (tailed, readable):  # stopping after --count leaves nothing behind to complain
        assert "Traceback" not in ended.stderr and "exception was never retrieved" not in ended.stderr, ended.stderr

    listed = cli("institutions", "list", "--json", env=env)
    ids = {item["id"] for item in json.loads(listed.stdout)["items"]}
    assert {"operator", fixture["as"]} <= ids


def test_tail_json_lines_carry_the_log_sequence_a_script_resumes_from(running_bus: dict[str, str]) -> None:
    """Each line of `tail --json` is the canonical event with its place in the log, `seq` (the
    readable lines' `#N`), as `GET /events` gives them: a script resumes after the last one it
    read with `--since` seq + 1."""
    members = [unique("fi-tailed"), unique("fi-tailed")]
    for member in members:
        added = cli("institutions", "add", member, "--name", "Tailed", "--kind", "ngo", "--country", "FI", env=running_bus)
        assert added.returncode == 0, added.stderr
    logged = cli("tail", "--type", "institution", "--since", "all", "--no-follow", "--json", env=running_bus)
    assert logged.returncode == 0, logged.stderr
    lines = [json.loads(line) for line in logged.stdout.splitlines()]
    seqs = [line["seq"] for line in lines]
    assert all(isinstance(seq, int) for seq in seqs) and seqs == sorted(set(seqs)), seqs
    first = next(line for line in lines if line["event"]["subject"] == members[0])
    assert first["event"]["type"] == "institution.joined" and set(first) == {"seq", "event"}  # the event as it was, and its seq
    readable = cli("tail", "--since", str(first["seq"]), "--count", "1", "--no-follow", env=running_bus)
    assert readable.stdout.startswith(f"#{first['seq']} ") and members[0] in readable.stdout, readable.stdout
    resumed = cli("tail", "--type", "institution", "--since", str(first["seq"] + 1), "--count", "1", "--no-follow", "--json",
                  env=running_bus)
    assert json.loads(resumed.stdout)["event"]["subject"] == members[1], resumed.stdout


def test_tail_and_the_members_list_print_a_networks_texts_as_they_are(running_bus: dict[str, str]) -> None:
    """A name or title is a member's text: Rich read its brackets as markup (`[/fi]` failed the
    whole `tail` or listing with a MarkupError) and a terminal acts on its escapes (`\\x1b[2J`
    clears the screen). Both print as written, a control character as `\\x1b`."""
    member = unique("fi-brackets")
    name = "Kaupunki [/fi] [bold]ja\x1b[2J kylä"
    added = cli("institutions", "add", member, "--name", name, "--kind", "ngo", "--country", "FI", env=running_bus)
    assert added.returncode == 0, added.stderr
    shown = "Kaupunki [/fi] [bold]ja\\x1b[2J kylä"
    tailed = cli("tail", "--type", "institution.joined", "--since", "all", "--no-follow", env=running_bus)
    assert tailed.returncode == 0, tailed.stderr
    line = next(line for line in tailed.stdout.splitlines() if member in line)
    assert shown in line and "\x1b" not in tailed.stdout, line
    listed = cli("institutions", "list", env={**running_bus, "COLUMNS": "300"})
    assert listed.returncode == 0, listed.stderr
    assert shown in listed.stdout and "\x1b" not in listed.stdout


def test_publish_reports_a_rejection_with_its_reasons(running_bus: dict[str, str]) -> None:
    fixture = load_fixtures()["project.registered"]
    # A member (again, with the same facts, when the test before it ran on this bus): the gate
    # judges the sender before the data.
    joined = cli("institutions", "add", fixture["as"], "--replace", "--name", "Mersin Büyükşehir Belediyesi", "--lang", "tr",
                 "--kind", "municipality", "--country", "TR", "--municipality-level", "metropolitan", env=running_bus)
    assert joined.returncode == 0, joined.stderr + joined.stdout
    data = dict(fixture["event"]["data"])
    data.pop("title")
    result = cli("publish", "project.registered", "--as", fixture["as"], "--data", json.dumps(data), env=running_bus)
    assert result.returncode == 1
    assert "rejected" in result.stdout and "data.title" in result.stdout

    result = cli("publish", "project.registered", "--as", fixture["as"], "--data", "@/no/such/file.json", env=running_bus)
    assert result.returncode == 2 and "no such file" in result.stderr

    # An --as that is no member: the gate's refusal, and the member meant.
    misspelt = fixture["as"][:-1] + ("x" if fixture["as"][-1] != "x" else "y")
    result = cli("publish", "project.registered", "--as", misspelt, "--data", json.dumps(fixture["event"]["data"]), env=running_bus)
    assert result.returncode == 1 and "rejected" in result.stdout and "not_member" in result.stdout, result.stdout
    assert f"did you mean {fixture['as']}?" in result.stderr and "collabbus institutions list" in result.stderr, result.stderr


def test_publish_reports_a_refusal_by_the_workflow(running_bus: dict[str, str]) -> None:
    env = running_bus
    owner, outsider = unique("owner"), unique("ngo")
    for institution, kind in ((owner, "municipality"), (outsider, "ngo")):
        added = cli("institutions", "add", institution, "--name", institution, "--kind", kind, "--country", "FI", env=env)
        assert added.returncode == 0, added.stderr + added.stdout
    again = cli("institutions", "add", owner, "--name", "Typo", "--kind", "ngo", "--country", "SE", env=env)
    assert again.returncode == 1 and "already a member" in again.stderr and "--replace" in again.stderr
    assert f"{owner}, municipality, FI" in again.stderr  # what it would have replaced
    replaced = cli("institutions", "add", owner, "--name", owner, "--kind", "municipality", "--country", "FI",
                   "--replace", env=env)
    assert replaced.returncode == 0 and "accepted" in replaced.stdout, replaced.stderr
    updated = cli("institutions", "update", owner, "--contact-email", "info@example.org", "--theme", "education.quality",
                  "--clear", "region", env=env)
    assert updated.returncode == 0 and "applied #" in updated.stdout, updated.stdout + updated.stderr
    listed = {item["id"]: item for item in json.loads(cli("institutions", "list", "--json", env=env).stdout)["items"]}
    assert listed[owner]["contact_email"] == "info@example.org" and listed[owner]["themes"] == ["education.quality"]
    assert listed[owner]["name"] == {"en": owner} and listed[owner]["kind"] == "municipality"  # the rest as it was
    nothing = cli("institutions", "update", owner, env=env)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr
    uncleared = cli("institutions", "update", owner, "--clear", "name", env=env)
    assert uncleared.returncode == 2 and "not cleared" in uncleared.stderr
    ghost = cli("institutions", "update", unique("ghost"), "--website", "https://example.org", env=env)
    assert ghost.returncode == 1 and "rejected" in ghost.stdout and "is not a member of the network" in ghost.stdout, ghost.stdout
    project_id = unique("p")
    registered = cli("publish", "project.registered", "--as", owner, "--data", json.dumps({
        "project_id": project_id, "title": {"fi": "Kotihoito"}, "owner": owner, "status": "active"}), env=env)
    assert registered.returncode == 0 and "applied #" in registered.stdout, registered.stdout + registered.stderr

    change = json.dumps({"project_id": project_id, "changes": {"title": {"fi": "Meidän nyt"}}})
    refused = cli("publish", "project.updated", "--as", outsider, "--data", change, env=env)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "accepted" in refused.stdout and "refused by the workflow: not_owner" in refused.stdout
    assert "project.action_rejected #" in refused.stdout and f"in {owner}'s name" in refused.stdout

    scripted = cli("publish", "project.updated", "--as", outsider, "--data", change, "--json", env=env)
    body = json.loads(scripted.stdout)
    assert scripted.returncode == 1 and body["status"] == "accepted"
    assert body["outcome"]["outcome"] == "refused" and body["outcome"]["refusal"]["event"]["data"]["actor"] == outsider

    unwaited = cli("publish", "project.updated", "--as", outsider, "--data", change, "--no-wait", env=env)
    assert unwaited.returncode == 0 and "accepted" in unwaited.stdout and "refused" not in unwaited.stdout


def test_publish_without_a_bus_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "COLLABBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    result = cli("publish", "project.registered", "--as", "x1", "--data", "{}", env=env)
    assert result.returncode == 1 and "cannot reach NATS" in result.stderr


def test_publish_of_an_unknown_type_suggests_the_near_ones_before_offering(tmp_path: Path) -> None:
    """A typo in the type is caught by the command (the bus need not run) with what was meant;
    before, the gate's answer added a second, baffling error about the subject."""
    env = {**os.environ, "COLLABBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    result = cli("publish", "project.registred", "--as", "x1", "--data", "{}", env=env)
    assert result.returncode == 2
    message = flat(result.stderr)
    assert "unknown event type 'project.registred'" in message and "did you mean project.registered" in message
    assert "schemas list" in message and "subject" not in message and "cannot reach NATS" not in message


def test_data_naming_a_file_without_the_at_sign_says_how(tmp_path: Path) -> None:
    (tmp_path / "project.json").write_text("{}")
    result = collabbus("publish", "project.registered", "--as", "x1", "--data", "project.json", env=dict(os.environ), cwd=tmp_path)
    assert result.returncode == 2
    assert "write @project.json" in flat(result.stderr)


def test_tail_of_an_unknown_type_is_refused_rather_than_following_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "COLLABBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    result = cli("tail", "--type", "call.aplication_rejected", "--since", "all", env=env, timeout=30)
    assert result.returncode == 2
    assert "did you mean call.application_rejected" in flat(result.stderr)
    domain = cli("tail", "--type", "calls", env=env, timeout=30)
    assert domain.returncode == 2 and "did you mean call" in flat(domain.stderr)


def test_tail_shows_a_refusal_s_reason_code() -> None:
    from ops.cli import _summary

    refusal = {"data": {"rejected_type": "call.application_submitted",
                        "reason": {"code": "after_deadline", "message": {"en": "the call closed"}}}}
    assert _summary(refusal) == "reason=after_deadline"
    assert _summary({"data": {"reason": "deadline_passed"}}) == "reason=deadline_passed"


def test_schemas_list_is_the_catalog() -> None:
    result = cli("schemas", "list", "--json", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    rows = {row["type"]: row for row in json.loads(result.stdout)}
    assert sorted(rows) == registry.event_types()
    assert "municipality" in rows["project.registered"]["offered_by"]
    assert rows["call.application_received"]["offered_by"] == [] and rows["call.application_received"]["by_workflows"]
    assert rows["innovation_day.registration_requested"]["subject_field"] == "day_id"
    table = cli("schemas", "list", env=dict(os.environ))
    assert "project.registered" in table.stdout and "every member" in table.stdout and "the workflows" in table.stdout


def test_a_command_run_in_another_directory_says_that_it_found_no_network_there(
    running_bus: dict[str, str], tmp_path: Path
) -> None:
    """Run elsewhere, the default data dir is another one: no bus credentials (NATS refuses the
    command) and no read models. Both say so and what to do, instead of "is the bus running?"
    (it is) or "not a member" (it is); and no stray database is left behind."""
    elsewhere = {**running_bus, "COLLABBUS_DATA_DIR": str(tmp_path / "not-the-bus")}
    published = cli("publish", "project.registered", "--as", "x1", "--data", "{}", env=elsewhere)
    text = flat(published.stderr)
    assert published.returncode == 1 and "refused this command (no bus credentials at" in text
    assert "COLLABBUS_DATA_DIR" in text and "cannot reach NATS" not in text
    token = cli("institutions", "token", "x1", env=elsewhere)
    text = flat(token.stderr)
    assert token.returncode == 1 and "no read models at" in text and "COLLABBUS_DATA_DIR" in text
    assert not (tmp_path / "not-the-bus" / "collabbus.db").exists()
    # The bus's own data dir, with its embedded server named as an existing one: its credentials are where it says.
    by_url = {**running_bus, "COLLABBUS_NATS_URL": f"nats://{running_bus['COLLABBUS_NATS_LISTEN']}"}
    status = cli("status", env=by_url)
    creds = Path(running_bus["COLLABBUS_DATA_DIR"]) / "nats" / "auth" / "bus.creds"
    assert status.returncode == 1 and f"credentials for its embedded server at {creds}" in flat(status.stderr), status.stderr
    assert "set COLLABBUS_NATS_CREDS" in flat(status.stderr)
    assert cli("status", env={**by_url, "COLLABBUS_NATS_CREDS": str(creds)}).returncode == 0


def test_up_on_a_taken_port_fails_clearly(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{port}"}
        env.pop("COLLABBUS_NATS_URL", None)
        result = cli("up", env=env, timeout=30)
    assert result.returncode == 1 and "already in use" in result.stderr


def test_settings_are_options_too(tmp_path: Path) -> None:
    result = cli("publish", "project.registered", "--as", "x1", "--data", "{}", "--stream-replicas", "nine", env=dict(os.environ))
    assert result.returncode == 2 and "COLLABBUS_STREAM_REPLICAS (--stream-replicas)" in result.stderr
    result = cli("status", "--portal-interval", "0", env=dict(os.environ))  # a sync loop without a pause
    assert result.returncode == 2 and "COLLABBUS_PORTAL_INTERVAL (--portal-interval)" in result.stderr


def test_the_nats_address_partners_are_told() -> None:
    from ops.settings import Settings

    assert Settings(nats_listen="0.0.0.0:4222").nats_public == "nats://0.0.0.0:4222"  # the bus's own, by default
    assert Settings(nats_url="nats://bus:secret@10.0.0.5:4222,nats://10.0.0.6:4222").nats_address == "10.0.0.5:4222"
    told = Settings(nats_url="nats://10.0.0.5:4222", nats_public_url="tls://nats.collab.example.org:4222/")
    assert (told.nats_address, told.nats_public) == ("nats.collab.example.org:4222", "tls://nats.collab.example.org:4222")
    assert Settings(nats_public_url="nats.collab.example.org:4222").nats_public == "nats://nats.collab.example.org:4222"


def test_every_setting_says_what_it_is() -> None:
    from ops.settings import Settings

    for name, field in Settings.model_fields.items():
        assert field.description and "COLLABBUS_" not in field.description, name


def test_exported_json_schemas_validate_every_fixture(tmp_path: Path) -> None:
    result = cli("schemas", "export", str(tmp_path), env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    for type_, fixture in load_fixtures().items():
        schema = json.loads((tmp_path / f"{type_}.v1.json").read_text())
        jsonschema.Draft202012Validator(schema).validate(fixture["event"]["data"])


def test_schemas_are_not_exported_into_a_python_package(tmp_path: Path) -> None:
    (tmp_path / "__init__.py").write_text("")
    result = cli("schemas", "export", str(tmp_path), env=dict(os.environ))
    assert result.returncode == 2 and "choose a directory of its own" in flat(result.stderr)
    assert list(tmp_path.iterdir()) == [tmp_path / "__init__.py"]


def test_schemas_exported_where_no_directory_can_be_is_an_error_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for target in (tmp_path / "a-file", tmp_path / "a-file" / "under"):
        result = cli("schemas", "export", str(target), env=dict(os.environ))
        assert result.returncode == 1 and f"cannot write into {target}" in flat(result.stderr), result.stderr
        assert "Traceback" not in result.stderr


def test_asyncapi_lists_every_event_type() -> None:
    result = cli("asyncapi", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["asyncapi"].startswith("3.")
    addresses = {channel["address"]: channel for channel in document["channels"].values()}
    for type_ in registry.event_types():
        spec = registry.spec_for(type_)
        log_channel = addresses[f"collab.events.{{institution}}.{type_}.{{subject}}"]
        # whether members may subscribe to it: every member may see it, or it is confidential
        said = "Confidential" if type_ in CONFIDENTIAL else "members follow them on `collab.live.{institution}"
        assert said in log_channel["description"], (type_, log_channel["description"])
        assert "members' credentials do not reach" in log_channel["description"]
        # the subject members do follow, for a client generator: a channel of its own, or none for confidential types
        live = addresses.get(f"collab.live.{{institution}}.{type_}.{{subject}}")
        assert (live is None) == (type_ in CONFIDENTIAL), type_
        assert f"`data.{spec.subject_field}`" in log_channel["description"]
        if spec.emitters:
            assert f"collab.ingress.{{institution}}.{type_}" in addresses
    listening = cli("asyncapi", env={**os.environ, "COLLABBUS_NATS_LISTEN": "127.0.0.1:14502"})
    assert [server["host"] for server in json.loads(listening.stdout)["servers"].values()] == ["127.0.0.1:14502"]
    # Partners on other machines are told the address given for them, not the bus's own connection's.
    public = cli("asyncapi", env={**os.environ, "COLLABBUS_NATS_LISTEN": "127.0.0.1:14502",
                                  "COLLABBUS_NATS_PUBLIC_URL": "tls://nats.collab.example.org:4222"})
    assert [server["host"] for server in json.loads(public.stdout)["servers"].values()] == ["nats.collab.example.org:4222"]
    yaml_result = cli("asyncapi", "--yaml", env=dict(os.environ))
    assert yaml_result.returncode == 0 and yaml_result.stdout.startswith("asyncapi:")


def project_offer(member: str, prefix: str) -> dict[str, Any]:
    """A new project of ``member``'s, as the member offers it."""
    fixture = load_fixtures()["project.registered"]
    event = dict(fixture["event"], id=unique(prefix), source=f"/institutions/{member}")
    event["data"] = dict(event["data"], owner=member, project_id=unique("p"))
    event["subject"] = event["data"]["project_id"]
    return event


async def closed_by_the_server(nc: Any, what: str) -> None:
    """Wait (up to 10 s) for the server to close a connection whose credentials were revoked."""
    deadline = time.monotonic() + 10
    while nc.is_connected:
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def member_with_token(env: dict[str, str], prefix: str, name: str) -> tuple[str, str]:
    """A new member of the running bus (added with the CLI) and an HTTP token of its."""
    member = unique(prefix)
    added = cli("institutions", "add", member, "--name", name, "--kind", load_fixtures()["project.registered"]["kind"],
                "--country", "FI", env=env)
    assert added.returncode == 0, added.stderr + added.stdout
    return member, cli("institutions", "token", member, env=env).stdout.strip()


def member_with_creds(env: dict[str, str], tmp_path: Path, prefix: str, name: str, country: str = "FI") -> tuple[str, Path]:
    """A new municipality of the running bus (added with the CLI) and the path of NATS credentials of its."""
    member = unique(prefix)
    added = cli("institutions", "add", member, "--name", name, "--kind", "municipality", "--country", country, env=env)
    assert added.returncode == 0, added.stderr + added.stdout
    creds = tmp_path / "member.creds"
    assert cli("institutions", "creds", member, "--output", str(creds), env=env).returncode == 0
    return member, creds


def test_revoke_and_access_refuse_an_id_that_never_was_a_member(running_bus: dict[str, str]) -> None:
    """During a leak a typo in the id looked like success: `revoke` said "revoked 0 tokens" and
    exited 0, `access` listed nothing. An id that never was a member is refused (exit 1), naming
    the nearest; a member that left stays revocable and inspectable (it may hold tokens still),
    and its past events can be tailed."""
    env = running_bus
    member, _token = member_with_token(env, "fi-gone", "Gone")
    left = cli("publish", "institution.left", "--as", "operator", "--data", json.dumps({"id": member}), env=env)
    assert left.returncode == 0 and "applied #" in left.stdout, left.stdout + left.stderr
    access = cli("institutions", "access", member, "--json", env=env)
    assert access.returncode == 0 and len(json.loads(access.stdout)["tokens"]) == 1, access.stderr
    revoked = cli("institutions", "revoke", member, env=env)
    assert revoked.returncode == 0 and f"revoked 1 token of {member}" in revoked.stdout, revoked.stderr
    assert cli("tail", "--institution", member, "--since", "all", "--no-follow", env=env).returncode == 0
    for command in ("revoke", "access"):
        typo = cli("institutions", command, f"{member}x", env=env)
        said = flat(typo.stderr)
        assert typo.returncode == 1 and typo.stdout == "", typo.stdout
        assert f"'{member}x' is not a member of the network and never was" in said and f"did you mean {member}?" in said, said
    nobody = cli("institutions", "revoke", "nobody-here", "--json", env=env)
    assert nobody.returncode == 1 and nobody.stdout == "" and "Nothing was revoked" in flat(nobody.stderr), nobody.stderr


def test_a_consumer_or_an_institution_that_names_nothing_is_a_usage_error(running_bus: dict[str, str]) -> None:
    """`dlq list --consumer nosuch` said "no dead letters" and `tail --institution nobody` followed
    nothing, silently, as `rebuild --projection nosuch` and `tail --type nosuch` do not: each is a
    usage error (exit 2) naming what there is."""
    from bus.runtime import NETWORK_CONSUMER
    from connectors.webhooks.dispatcher import WEBHOOKS_CONSUMER
    from ops.dlq import CONSUMERS

    assert CONSUMERS == (NETWORK_CONSUMER, WEBHOOKS_CONSUMER)
    env = running_bus
    for command in (["dlq", "list"], ["dlq", "replay"], ["dlq", "purge", "--yes"]):
        refused = cli(*command, "--consumer", "netwrk", env=env)
        said = flat(refused.stderr)
        assert refused.returncode == 2 and "unknown consumer 'netwrk'; did you mean network?" in said, (command, said)
        assert "the consumer groups are: network, webhooks" in said and refused.stdout == ""
    assert cli("dlq", "list", "--consumer", "webhooks", env=env).returncode == 0
    missing = cli("dlq", "replay", "987654", env=env)  # nothing asked for was replayed
    assert missing.returncode == 1 and "no dead letter #987654" in missing.stderr and missing.stdout == "", missing.stdout
    for institution in ("nobody-here", "operatr"):
        tailed = cli("tail", "--institution", institution, "--no-follow", env=env)
        said = flat(tailed.stderr)
        assert tailed.returncode == 2 and f"'{institution}' is not a member of the network and never was" in said, said
    assert "did you mean operator?" in said


async def test_institutions_creds_writes_credentials_that_work(running_bus: dict[str, str], tmp_path: Path) -> None:
    """A member's credentials from `collabbus institutions creds`, used by a plain NATS client."""
    import nats

    from bus.client import offer

    env = running_bus
    fixture = load_fixtures()["project.registered"]
    member = unique("creds")
    added = cli("institutions", "add", member, "--name", "Creds", "--kind", fixture["kind"], "--country", "TR", env=env)
    assert added.returncode == 0, added.stderr + added.stdout

    path = tmp_path / f"{member}.creds"
    written = cli("institutions", "creds", member, "--output", str(path), "--json", env=env)
    assert written.returncode == 0, written.stderr
    assert json.loads(written.stdout)["output"] == str(path)
    assert json.loads(written.stdout)["inbox_prefix"] == f"_INBOX.{member}"
    assert json.loads(written.stdout)["live_subjects"] == public_live_subjects()
    assert json.loads(written.stdout)["log_requests"] == f"collab.log.{member}"
    assert path.stat().st_mode & 0o777 == 0o600

    printed = cli("institutions", "creds", member, env=env)
    assert printed.returncode == 0 and printed.stdout.startswith("-----BEGIN NATS USER JWT-----")
    assert "-----BEGIN USER NKEY SEED-----" in printed.stdout
    assert "follow the events every member sees" in printed.stderr and "collab.live.*.project.>" in printed.stderr
    assert f"ask for pages of the log on collab.log.{member}" in printed.stderr

    refused = cli("institutions", "creds", "no-such-member", env=env)
    assert refused.returncode == 1 and refused.stdout == "" and "not a member" in refused.stderr

    # --json alone would have printed a secret where a script expects JSON: refused, nothing issued.
    issued_before = cli("institutions", "access", member, "--json", env=env).stdout
    no_file = cli("institutions", "creds", member, "--json", env=env)
    assert no_file.returncode == 2 and no_file.stdout == "" and "give --output FILE" in no_file.stderr
    assert cli("institutions", "access", member, "--json", env=env).stdout == issued_before

    errors: list[Exception] = []

    async def record(exc: Exception) -> None:
        errors.append(exc)

    nc = await nats.connect(f"nats://{env['COLLABBUS_NATS_LISTEN']}", user_credentials=str(path), error_cb=record,
                            inbox_prefix=f"_INBOX.{member}")
    try:
        followed = await nc.subscribe("collab.live.*.project.>")  # the public log, live
        event = project_offer(member, "via-creds")
        verdict = await offer(nc, member, event)
        assert verdict.accepted, verdict.as_dict()
        seen = []  # (other tests may offer projects to the same bus meanwhile)
        while event["id"] not in seen:
            seen.append(json.loads((await followed.next_msg(timeout=5)).data)["id"])
        impostor = dict(event, id=unique("impostor"), source="/institutions/operator")
        assert (await offer(nc, "operator", impostor, timeout=1.0)).reason == "unavailable"
        assert any("permissions violation" in str(e) for e in errors), errors

        # Revoked (it left, or the file leaked): the server closes the connection and refuses the credentials.
        # (Run with other settings than the bus's — here without its listen address — it still
        # reaches the running server: only the revocations change in its configuration.)
        elsewhere = {k: v for k, v in env.items() if k != "COLLABBUS_NATS_LISTEN"}
        revoked = cli("institutions", "revoke", member, "--json", env=elsewhere)
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout) == {"institution": member, "revoked": 0, "nats_credentials_revoked": 2}
        await closed_by_the_server(nc, "the revoked connection stayed open")
        with pytest.raises(Exception, match="Authorization Violation"):
            await nats.connect(f"nats://{env['COLLABBUS_NATS_LISTEN']}", user_credentials=str(path), allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=3, inbox_prefix=f"_INBOX.{member}")
        again = cli("institutions", "revoke", member, env=env)
        assert again.returncode == 0 and "were revoked before; the running server has them refused" in again.stdout
        config = (Path(env["COLLABBUS_DATA_DIR"]) / "nats" / "nats-server.conf").read_text()
        assert f'listen: "{env["COLLABBUS_NATS_LISTEN"]}"' in config  # the running server's own address kept
    finally:
        await nc.close()


async def test_institutions_creds_replace_rotates_a_members_credentials(running_bus: dict[str, str], tmp_path: Path) -> None:
    """`creds --replace`: the member's earlier credentials are refused and their connections
    closed, the new ones work, and its HTTP token is untouched."""
    import nats

    from bus.client import offer

    env = running_bus
    member, token = member_with_token(env, "rotate", "Rotate")
    old, new = tmp_path / "old.creds", tmp_path / "new.creds"
    assert cli("institutions", "creds", member, "--output", str(old), env=env).returncode == 0
    url = f"nats://{env['COLLABBUS_NATS_LISTEN']}"
    held = await nats.connect(url, user_credentials=str(old), inbox_prefix=f"_INBOX.{member}", allow_reconnect=False)
    try:
        rotated = cli("institutions", "creds", member, "--replace", "--output", str(new), "--json", env=env)
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout)["replaced"] == 1
        await closed_by_the_server(held, "the replaced credentials' connection stayed open")
    finally:
        await held.close()
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(url, user_credentials=str(old), allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=3, inbox_prefix=f"_INBOX.{member}")
    nc = await nats.connect(url, user_credentials=str(new), inbox_prefix=f"_INBOX.{member}")
    try:
        event = project_offer(member, "rotated")
        verdict = await offer(nc, member, event)
        assert verdict.accepted, verdict.as_dict()
    finally:
        await nc.close()
    async with httpx.AsyncClient(base_url=f"http://{env['COLLABBUS_HTTP']}") as client:
        me = await client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["id"] == member

    again = cli("institutions", "creds", member, "--replace", env=env)  # printed: what it did goes to stderr
    assert again.returncode == 0 and again.stdout.startswith("-----BEGIN NATS USER JWT-----")
    assert f"revoked 1 earlier NATS credential of {member}" in again.stderr


async def test_a_rotation_without_a_gap_retires_the_earlier_credentials_once_the_new_ones_are_in_use(
    running_bus: dict[str, str], tmp_path: Path
) -> None:
    """New credentials issued beside the old (both connect), then `revoke ID --earlier-creds`: the
    old connection is closed and its file refused, the new connection carries on, the HTTP token works."""
    import nats

    from bus.client import offer

    env = running_bus
    member, token = member_with_token(env, "gapless", "Gapless")
    none_yet = cli("institutions", "revoke", member, "--earlier-creds", env=env)
    assert none_yet.returncode == 1 and f"no NATS credentials were issued to {member}" in none_yet.stderr
    old, new = tmp_path / "old.creds", tmp_path / "new.creds"
    first = cli("institutions", "creds", member, "--output", str(old), "--json", env=env)
    assert first.returncode == 0 and json.loads(first.stdout)["earlier_valid"] == 0, first.stderr
    url = f"nats://{env['COLLABBUS_NATS_LISTEN']}"
    connect = {"inbox_prefix": f"_INBOX.{member}", "allow_reconnect": False}
    held = await nats.connect(url, user_credentials=str(old), **connect)
    try:
        issued = cli("institutions", "creds", member, "--output", str(new), env=env)
        assert issued.returncode == 0, issued.stderr
        assert f"1 earlier NATS credential of {member} stays valid" in issued.stdout
        assert f"collabbus institutions revoke {member} --earlier-creds" in issued.stdout
        fresh = await nats.connect(url, user_credentials=str(new), **connect)
        try:
            assert held.is_connected and fresh.is_connected  # both at once: no gap
            retired = cli("institutions", "revoke", member, "--earlier-creds", "--json", env=env)
            assert retired.returncode == 0, retired.stderr
            assert json.loads(retired.stdout) == {"institution": member, "revoked": 0, "nats_credentials_revoked": 1}
            await closed_by_the_server(held, "the earlier credentials' connection stayed open")
            event = project_offer(member, "gapless")
            verdict = await offer(fresh, member, event)  # the new connection was never cut
            assert verdict.accepted, verdict.as_dict()
        finally:
            await fresh.close()
    finally:
        await held.close()
    with pytest.raises(Exception, match="Authorization Violation"):
        await nats.connect(url, user_credentials=str(old), max_reconnect_attempts=0, connect_timeout=3, **connect)
    async with httpx.AsyncClient(base_url=f"http://{env['COLLABBUS_HTTP']}") as client:
        me = await client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200 and me.json()["id"] == member
    again = cli("institutions", "revoke", member, "--earlier-creds", env=env)
    assert again.returncode == 0 and f"{member} holds no valid NATS credentials issued before its newest" in again.stdout
    access = cli("institutions", "access", member, "--json", env=env)
    assert access.returncode == 0, access.stderr
    listed = json.loads(access.stdout)
    users = [decode_jwt_claims(path.read_text().splitlines()[1])["sub"] for path in (old, new)]
    assert [entry["user"] for entry in listed["nats_credentials"]] == users
    assert listed["nats_credentials"][0]["revoked_at"] is not None and listed["nats_credentials"][1]["revoked_at"] is None
    assert [entry["valid"] for entry in listed["nats_credentials"]] == [False, True]
    assert [row["revoked_at"] for row in listed["tokens"]] == [None]
    shown = cli("institutions", "access", member, env={**env, "COLUMNS": "200"}).stdout
    assert "NATS credentials of " + member + ": 1 valid" in shown and users[0] in shown and "HTTP tokens of" in shown
    lasting = cli("institutions", "creds", member, "--expires", "2w", "--output", str(tmp_path / "lasting.creds"), "--json", env=env)
    assert lasting.returncode == 0, lasting.stderr
    expires_at = json.loads(lasting.stdout)["expires_at"]
    claims = decode_jwt_claims((tmp_path / "lasting.creds").read_text().splitlines()[1])
    assert claims["exp"] == int(datetime.fromisoformat(expires_at).timestamp()) and claims["exp"] - claims["iat"] == 14 * 86400
    assert json.loads(cli("institutions", "access", member, "--json", env=env).stdout)["nats_credentials"][-1]["expires_at"] == expires_at
    both = cli("institutions", "revoke", member, "--earlier-creds", "--token", token, env=env)
    assert both.returncode == 2 and "give one of them" in both.stderr


def test_credentials_issued_to_expire_are_valid_for_exactly_the_time_asked(
    running_bus: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`institutions creds --expires 2w`: the JWT expires two weeks to the second after it says it
    was issued, however late in a second the command reads the clock (it reads it once)."""
    from typer.testing import CliRunner

    import ops.cli

    member, _ = member_with_token(running_bus, "exact", "Exact")
    late_in_a_second = int(time.time()) - 30 + 0.999
    monkeypatch.setattr(ops.cli, "time", type("Clock", (), {"time": staticmethod(lambda: late_in_a_second)}))
    path = tmp_path / "exact.creds"
    result = CliRunner().invoke(ops.cli.app, ["institutions", "creds", member, "--expires", "2w", "--output", str(path), "--json"],
                                env=running_bus)
    assert result.exit_code == 0, result.output
    claims = decode_jwt_claims(path.read_text().splitlines()[1])
    assert claims["iat"] == int(late_in_a_second) and claims["exp"] == claims["iat"] + 14 * 86400
    assert json.loads(result.stdout)["expires_at"] == datetime.fromtimestamp(claims["exp"], timezone.utc).isoformat()


def test_institutions_creds_replace_is_refused_for_an_external_server() -> None:
    import nkeys

    from bus.credentials import new_seed

    env = {**os.environ, "COLLABBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}",
           "COLLABBUS_NATS_ACCOUNT_SEED": new_seed(nkeys.PREFIX_BYTE_ACCOUNT).decode()}
    result = cli("institutions", "creds", "fi-thl", "--replace", env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert "--replace" in result.stderr and "external server" in result.stderr
    retire = cli("institutions", "revoke", "fi-thl", "--earlier-creds", env=env)
    assert retire.returncode == 1 and retire.stdout == ""
    assert "--earlier-creds" in retire.stderr and "external server" in retire.stderr


def test_institutions_creds_on_an_external_server_needs_the_account_seed() -> None:
    env = {**os.environ, "COLLABBUS_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    env.pop("COLLABBUS_NATS_ACCOUNT_SEED", None)
    result = cli("institutions", "creds", "fi-thl", env=env)
    assert result.returncode == 1 and result.stdout == ""
    assert "COLLABBUS_NATS_ACCOUNT_SEED" in result.stderr


def test_a_second_bus_on_the_same_data_dir_is_refused(running_bus: dict[str, str]) -> None:
    """Two buses on one data dir would run two nats-servers on one JetStream store (an accepted
    event could vanish): the second `up` stops before it starts anything, whatever its ports."""
    env = {**running_bus, "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}", "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    config = Path(env["COLLABBUS_DATA_DIR"]) / "nats" / "nats-server.conf"
    before = config.read_text()
    second = cli("up", env=env)
    assert second.returncode == 1
    assert "another collabbus is running on the data dir" in second.stderr and "collabbus up" in second.stderr, second.stderr
    assert config.read_text() == before  # the running server's configuration is untouched
    status = cli("status", "--json", env=running_bus)  # the running bus still answers
    assert status.returncode == 0, status.stderr


def test_status_and_tail_of_a_stopped_bus(tmp_path: Path) -> None:
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}"}
    env.pop("COLLABBUS_NATS_URL", None)
    # A data dir the bus never ran on (a mistyped one, say): nothing is started there, nor created.
    for command in (["tail", "--since", "all", "--no-follow"], ["status", "--json"], ["dlq", "list"], ["institutions", "list"]):
        never = cli(*command, env=env)
        assert never.returncode == 1 and "no bus has run with the data dir" in never.stderr, never.stderr
        assert "Traceback" not in never.stderr and never.stdout == ""
        assert list(tmp_path.iterdir()) == []
    up = spawn("up", env=env)
    assert up.stderr is not None
    deadline = time.monotonic() + 30
    while "is up" not in up.stderr.readline():
        assert time.monotonic() < deadline and up.poll() is None, "collabbus up did not come up"
    up.send_signal(signal.SIGINT)
    assert up.wait(timeout=30) == 0

    result = cli("status", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["bus_running"] is False and "the bus is not running" in result.stderr
    # Its log is read all the same (after an incident, when it is down).
    logged = cli("tail", "--since", "all", "--no-follow", "--json", env=env)
    assert logged.returncode == 0, logged.stderr
    assert [json.loads(line)["event"]["type"] for line in logged.stdout.splitlines()] == ["institution.joined"]  # the operator
    members = cli("institutions", "list", "--json", env=env)  # (it said "cannot reach NATS")
    assert members.returncode == 0, members.stderr
    assert [member["id"] for member in json.loads(members.stdout)["items"]] == ["operator"]
    # A command following the stopped bus's log holds its store: `up` says which one to stop.
    follower = subprocess.Popen([*COLLABBUS, "tail"], env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        assert follower.stderr is not None and "the bus is not running" in follower.stderr.readline()
        refused = cli("up", env=env)
        assert refused.returncode == 1 and f"(pid {follower.pid}: collabbus tail)" in refused.stderr, refused.stderr
    finally:
        follower.terminate()
        follower.wait(timeout=30)


class Following:
    """A command in its own process whose standard output and error are read as they come."""

    def __init__(self, *args: str, env: dict[str, str]) -> None:
        self.proc = spawn(*args, env=env, stdout=subprocess.PIPE)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        for stream, lines in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr)):
            threading.Thread(target=lambda stream=stream, lines=lines: lines.extend(iter(stream.readline, "")), daemon=True).start()

    def wait_for(self, what: str, lines: list[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not any(what in line for line in lines):
            assert time.monotonic() < deadline and self.proc.poll() is None, (what, self.stdout, self.stderr)
            time.sleep(0.1)

    def ids(self) -> list[str]:
        return [json.loads(line)["event"]["id"] for line in self.stdout]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def test_tail_carries_on_across_a_restart_of_the_bus_printing_each_event_once(tmp_path: Path) -> None:
    """`tail` follows the log while the bus is stopped and started again, its nats-server with it.
    When it had printed nothing yet, it printed the whole history again on reconnection, as if new
    (nats-py makes its consumer again after the last event it delivered: the log's beginning, when
    none was). It carries on after the last event it printed — or after the log's end when it
    started — and says when the connection is lost and when it is back."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "0", "COLUMNS": "200"}
    env.pop("COLLABBUS_NATS_URL", None)
    member = unique("fi-tail")

    def project(project_id: str) -> str:
        published = cli("publish", "project.registered", "--as", member, "--json", "--data", json.dumps({
            "project_id": project_id, "title": {"fi": "Kotihoito"}, "owner": member, "status": "active"}), env=env)
        assert published.returncode == 0, published.stdout + published.stderr
        return str(json.loads(published.stdout)["id"])

    def consumers() -> int:
        status = cli("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        return int(json.loads(status.stdout)["streams"]["COLLAB_EVENTS"]["consumers"])

    with collabbus_up(env):
        assert cli("institutions", "add", member, "--name", "Tail", "--kind", "ngo", "--country", "FI", env=env).returncode == 0
        project(unique("p-before"))  # history its filter matches, printed by neither
        before = consumers()
        projects = Following("tail", "--type", "project", "--json", env=env)  # prints nothing before the restart
        everything = Following("tail", "--json", env=env)
        try:
            deadline = time.monotonic() + 30
            while consumers() < before + 2:
                assert time.monotonic() < deadline, "the tails did not subscribe"
            other = unique("fi-other")
            joined = cli("institutions", "add", other, "--name", "Other", "--kind", "ngo", "--country", "FI", "--json", env=env)
            assert joined.returncode == 0, joined.stderr
            everything.wait_for(other, everything.stdout)
        except BaseException:
            projects.stop()
            everything.stop()
            raise
    try:
        for tail in (projects, everything):
            tail.wait_for("lost the connection to NATS", tail.stderr)
        with collabbus_up(env):
            for tail in (projects, everything):
                tail.wait_for("reconnected to NATS", tail.stderr)
            after = project(unique("p-after"))
            for tail in (projects, everything):
                tail.wait_for(after, tail.stdout)
                tail.stop()  # (before this bus stops)
    finally:
        projects.stop()
        everything.stop()
    assert projects.ids() == [after], projects.stdout
    assert everything.ids()[-1] == after and len(everything.ids()) == 2, everything.stdout
    assert len([line for line in projects.stderr if "lost the connection" in line]) == 1, projects.stderr
    assert "Traceback" not in "".join(projects.stderr + everything.stderr)


def test_a_second_ctrl_c_stops_the_bus_at_once_and_it_starts_again_where_it_was(tmp_path: Path) -> None:
    """Ctrl-C drains the bus; a drain can wait (a request in flight gets 5 s). A second Ctrl-C went
    unheard; it ends the process there and then, as a kill would — its nats-server and its
    gatekeeper go with it, and the next `up` carries on from the log as it was."""
    env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
           "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "1"}
    env.pop("COLLABBUS_NATS_URL", None)
    up = spawn("up", env=env)
    assert up.stderr is not None
    try:
        deadline = time.monotonic() + 60
        while "is up" not in up.stderr.readline():
            assert time.monotonic() < deadline and up.poll() is None, "collabbus up did not come up"
        host, port = env["COLLABBUS_HTTP"].split(":")
        with socket.create_connection((host, int(port))) as slow:  # a request in flight: its body never comes
            slow.sendall(b"POST /events HTTP/1.1\r\nHost: bus\r\nContent-Type: application/cloudevents+json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
            time.sleep(0.5)
            up.send_signal(signal.SIGINT)
            while "draining" not in (line := up.stderr.readline()):
                assert line, "no drain"
            assert "Ctrl-C again stops at once" in line
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=30) == 130
        assert "stopped at once" in up.stderr.read()
        deadline = time.monotonic() + 10
        while subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True).stdout.strip():
            assert time.monotonic() < deadline, "processes of this data dir are still running"
            time.sleep(0.1)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    with collabbus_up({**env, "COLLABBUS_GATE_PROCESSES": "0"}):  # the same log, the operator joined once
        logged = cli("tail", "--since", "all", "--no-follow", "--json", env=env)
        assert [json.loads(line)["event"]["type"] for line in logged.stdout.splitlines()] == ["institution.joined"], logged.stderr


def test_up_on_a_taken_http_port_says_so(tmp_path: Path) -> None:
    """`collabbus up` listens before it starts anything: an address in use ends it at once, and
    nothing of the data dir is left running (no nats-server, no gatekeeper process)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path), "COLLABBUS_HTTP": f"127.0.0.1:{port}",
               "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "1"}
        env.pop("COLLABBUS_NATS_URL", None)
        result = cli("up", env=env)
    assert result.returncode == 1, result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "set COLLABBUS_HTTP to another address" in result.stderr
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == "", "processes of this data dir are still running"


def test_a_first_start_that_fails_leaves_a_data_dir_no_bus_has_run_with(tmp_path: Path) -> None:
    """A first `up` that fails (its NATS or HTTP address taken) takes back what it created: it
    left the lock and the embedded server's keys, and `status` there then started a nats-server,
    created its store and reported the streams missing, exit 0 — a mistyped data dir looked like
    a network. The data dir is as it was, and the commands refuse it as one no bus has run with."""
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "README").write_text("an operator's note")

    def as_it_was(data_dir: Path) -> bool:
        return [path.name for path in kept.iterdir()] == ["README"] if data_dir == kept else not data_dir.exists()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for data_dir, setting in ((tmp_path / "data2", "COLLABBUS_NATS_LISTEN"), (kept, "COLLABBUS_NATS_LISTEN"),
                                  (tmp_path / "data3", "COLLABBUS_HTTP")):
            env = {**os.environ, "COLLABBUS_DATA_DIR": str(data_dir), "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}",
                   "COLLABBUS_HTTP": f"127.0.0.1:{free_port()}", "COLLABBUS_GATE_PROCESSES": "0", setting: f"127.0.0.1:{port}"}
            env.pop("COLLABBUS_NATS_URL", None)
            failed = cli("up", env=env)
            assert failed.returncode == 1 and "already in use" in failed.stderr, failed.stderr
            assert as_it_was(data_dir), list(data_dir.iterdir())
            for command in (["status", "--json"], ["dlq", "list"]):
                refused = cli(*command, env={**env, "COLLABBUS_NATS_LISTEN": f"127.0.0.1:{free_port()}"})
                assert refused.returncode == 1 and "no bus has run with the data dir" in refused.stderr, refused.stderr
            assert as_it_was(data_dir), list(data_dir.iterdir())
    env["COLLABBUS_HTTP"] = f"127.0.0.1:{free_port()}"
    with collabbus_up(env):  # (and a start that succeeds keeps what it made)
        pass
    assert (tmp_path / "data3" / "nats").is_dir()
    assert cli("status", "--json", env=env).returncode == 0


def test_the_data_dir_lock_is_never_held_twice_across_a_removal_of_its_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed first start removes the lock file it holds (ops.datadir.take_back). A process that
    opened the file just before, and locks it once it is let go, holds a file no longer there:
    it takes the lock at the path again, so that it and the next process do not both hold the data dir."""
    import fcntl

    from ops import datadir

    first = datadir.lock(tmp_path, "collabbus up")
    flock = fcntl.flock

    def let_go_meanwhile(handle: Any, operation: int) -> None:  # the holder takes back the data dir between open and flock
        if not first.closed:
            datadir.take_back(first, tmp_path, before=set())
        flock(handle, operation)

    monkeypatch.setattr(datadir.fcntl, "flock", let_go_meanwhile)
    held = datadir.lock(tmp_path, "collabbus status")
    monkeypatch.undo()
    try:
        assert os.fstat(held.fileno()).st_ino == os.stat(tmp_path / datadir.LOCK_FILE).st_ino
        with pytest.raises(datadir.DataDirBusy):
            datadir.lock(tmp_path, "collabbus up")
        assert datadir.holder(tmp_path) == f"pid {os.getpid()}: collabbus status"
    finally:
        held.close()


def test_the_portal_sandbox_on_a_taken_port_says_so(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "COLLABBUS_DATA_DIR": str(tmp_path)}
        result = cli("portal", "sandbox", "--listen", f"127.0.0.1:{port}", env=env, timeout=30)
    assert result.returncode == 1 and f"the sandbox cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "NATS" not in result.stderr  # (it blamed NATS)


def test_the_command_lists_show_each_summary_as_flowing_text() -> None:
    """A docstring's line breaks (at the source's width) are not the terminal's: each command's
    summary in a list reads as one paragraph, wrapped at the list's width only."""
    from ops.cli import app, institutions_app

    env = {**os.environ, "COLUMNS": "400"}  # wide enough for every summary on one line
    listed = cli("--help", env=env).stdout
    row = next(line for line in listed.splitlines() if line.startswith("│ gate "))
    assert row.rstrip(" │").endswith("`up` starts COLLABBUS_GATE_PROCESSES of these.")  # the whole summary, one row
    for group in (app, institutions_app):
        for command in group.registered_commands:
            assert command.short_help and "\n" not in command.short_help, command.name
    # So do the paragraphs of a command's help after its first, wrapped at the terminal's width.
    helped = cli("institutions", "creds", "--help", env=env).stdout
    assert ("A standard `.creds` file (user JWT + nkey seed) for any NATS client, which connects with the inbox prefix "
            "`_INBOX.ID`") in helped
    narrow = cli("institutions", "creds", "--help", env={**os.environ, "COLUMNS": "80"}).stdout
    assert max(len(line.rstrip()) for line in narrow.splitlines()) <= 80
    paragraph = narrow[narrow.index("A standard"):narrow.index("╭")].splitlines()
    assert all(len(line.rstrip()) > 60 for line in paragraph[:-2]), paragraph  # filled lines, not the source's breaks


def test_the_shell_completes_commands_options_event_types_and_members(tmp_path: Path, running_bus: dict[str, str]) -> None:
    """`collabbus --install-completion bash` installs a completion that bash runs: the commands,
    their options, the catalog's event types where a type is asked for (`publish TYPE`; `tail
    --type`, which takes a domain too) and the members' ids where a member is (read from the
    read models of the data dir; nothing, and nothing written, where no bus has run)."""
    env = {**running_bus, "HOME": str(tmp_path), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    installed = cli("--install-completion", "bash", env=env)
    assert installed.returncode == 0, installed.stderr
    script = tmp_path / ".bash_completions" / "collabbus.sh"
    assert script.is_file() and str(script) in (tmp_path / ".bashrc").read_text()

    def complete(*words: str, data_dir: Path | None = None) -> list[str]:
        """What bash offers for the last word of ``collabbus WORDS``, through the installed script."""
        shell = (f"source {script}; COMP_WORDS=(collabbus {' '.join(words)}); COMP_CWORD={len(words)}; "
                 '_collabbus_completion collabbus; printf "%s\\n" "${COMPREPLY[@]}"')
        given = env if data_dir is None else {**env, "COLLABBUS_DATA_DIR": str(data_dir)}
        done = subprocess.run(["bash", "-c", shell], env=given, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("dl") == ["dlq"]
    assert complete("dlq", "re") == ["replay"]
    assert "--json" in complete("status", "--j")
    assert complete("publish", "project.regi") == ["project.registered"]
    offered = complete("tail", "--type", "innovation_d")
    assert offered[0] == "innovation_day" and "innovation_day.scheduled" in offered
    assert all(name.startswith("innovation_day") for name in offered)
    assert complete("institutions", "token", "oper") == ["operator"]
    assert complete("publish", "project.registered", "--as", "op") == ["operator"]
    assert complete("institutions", "access", "oper", data_dir=tmp_path / "no-bus") == []
    assert not (tmp_path / "no-bus").exists()


def test_help_names_what_each_setting_takes() -> None:
    """Every setting's option passes text on to the settings, which read and check it; `--help`
    still says what each takes (it said `<str>` of a port, a count and a list alike)."""
    helped = cli("up", "--help", env={**os.environ, "COLUMNS": "200"}).stdout
    kinds = {line.split()[1]: line.split()[2] for line in helped.splitlines() if line.startswith("│ --") and len(line.split()) > 2}
    assert (kinds["--data-dir"], kinds["--http-rate-burst"], kinds["--http-rate-limit"], kinds["--gate-processes"]) == (
        "<path>", "<int>", "<float>", "<int>")
    assert (kinds["--webhook-retry-schedule"], kinds["--nats-url"], kinds["--nats-creds"]) == ("<list>", "<str>", "<path>")
    # A flag takes no value, and says none (Typer 0.29 labelled each `<bool>`: `--demo <bool>`, `--help <bool>`).
    flags = [line for line in helped.splitlines() if line.startswith(("│ --demo ", "│ --standby ", "│ --help "))]
    assert len(flags) == 3 and not [line for line in flags if "<" in line], flags


def test_every_option_and_argument_of_every_command_says_what_it_is() -> None:
    """`--help` described no `--json` of `institutions add`, `update` and `list`, nor their
    `--region`, `--website`, `--contact-email` or `update --kind`: each command's parameters are
    walked, the settings' options with them. `up`'s summary names what it starts, the HTTP
    gateway, handlers and webhooks included (it said "embedded NATS, streams, gatekeeper")."""
    import typer

    from ops.cli import app

    def commands(command: Any, words: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
        for name, sub in (getattr(command, "commands", None) or {}).items():
            yield from commands(sub, (*words, name))
        if getattr(command, "commands", None) is None:
            yield " ".join(words), command

    walked = dict(commands(typer.main.get_command(app)))
    assert {"up", "status", "tail", "dlq replay", "institutions add", "institutions update", "schemas export"} <= set(walked)
    undescribed = [f"{name} {param.opts[0] if param.opts else param.name}" for name, command in walked.items()
                   for param in command.params if not (getattr(param, "help", None) or "").strip()]
    assert undescribed == [], undescribed
    helped = cli("institutions", "update", "--help", env={**os.environ, "COLUMNS": "200"}).stdout
    rows = {line.split()[1]: line for line in helped.splitlines() if line.startswith("│ --")}
    assert "university, municipality" in rows["--kind"] and "as JSON" in rows["--json"], helped
    summary = walked["up"].short_help
    assert all(part in summary for part in ("HTTP gateway", "webhook dispatcher", "handlers", "database migrations")), summary


def test_commands_that_only_connect_and_read_the_log_load_neither_the_bus_nor_the_catalog() -> None:
    """`institutions list`, `tail`, `status`, `dlq list` start in well under a second: the modules
    they connect and read with keep the whole bus (``bus.runtime``) and the event catalog out."""
    probe = ("import sys; from ops import cli, dlq, status; from bus import connection, log; "
             "print(sorted(m for m in ('bus.runtime', 'bus.consumer', 'schemas.registry', 'faststream') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
    # A gatekeeper process (`collabbus gate`) loads the bus, yet applies nothing: no handlers, no SQL.
    gatekeeper = ("import sys; from ops import cli; import bus.runtime; "
                  "print(sorted(m for m in ('handlers.network', 'sqlalchemy', 'sqlmodel') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", gatekeeper], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
    # A member's NATS credentials name the public log subjects without loading the read models.
    credentials = ("import sys; from bus.credentials import partner_permissions; partner_permissions('m-1'); "
                   "print(sorted(m for m in ('handlers.audience', 'sqlalchemy', 'sqlmodel') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", credentials], capture_output=True, text=True, timeout=60)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(scope="session")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """``examples/node/nats_partner.mjs`` with the package its lock file pins (``npm ci``, from the
    npm registry), as a command to run (``nats_follower.mjs`` beside it)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("the Node.js example needs node and npm in CI")
        pytest.skip("node and npm are not installed")
    work = tmp_path_factory.mktemp("node-example")
    for name in ("nats_partner.mjs", "nats_follower.mjs", "package.json", "package-lock.json"):
        shutil.copy(EXAMPLES / "node" / name, work / name)
    installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=work, capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stdout[-2000:] + installed.stderr[-2000:]
    return [node, str(work / "nats_partner.mjs")]


@pytest.mark.parametrize("language", ["python", "node"])
def test_the_nats_partner_example_offers_in_both_modes_with_a_members_credentials(
    running_bus: dict[str, str], tmp_path: Path, language: str, request: pytest.FixtureRequest
) -> None:
    """``examples/nats_partner.py`` (nats-py alone) and ``examples/node/nats_partner.mjs`` (the
    ``nats`` package alone), as a partner's client in any language would do it."""
    env = running_bus
    example = [sys.executable, str(EXAMPLES / "nats_partner.py")] if language == "python" else request.getfixturevalue("node_example")
    member, creds = member_with_creds(env, tmp_path, "tr-nats", "NATS partner", "TR")

    def run_example(event: dict[str, object], *flags: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / f"{event['id']}.json"
        path.write_text(json.dumps(event, ensure_ascii=False), encoding="utf-8")
        return subprocess.run([*example, f"nats://{env['COLLABBUS_NATS_LISTEN']}", str(creds), member, str(path), *flags],
                              capture_output=True, text=True, timeout=60)

    def registered(title: dict[str, str]) -> dict[str, object]:
        project_id = unique("p")
        return {"specversion": "1.0", "id": unique("nx"), "source": f"/institutions/{member}", "type": "project.registered",
                "subject": project_id, "data": {"project_id": project_id, "title": title, "owner": member, "status": "active"}}

    structured = registered({"tr": "Mahalle Mutfakları"})
    first = run_example(structured)
    assert first.returncode == 0 and "accepted as #" in first.stdout, first.stdout + first.stderr
    again = run_example(structured)
    assert again.returncode == 0 and first.stdout.split()[2] in again.stdout and "sent before" in again.stdout

    as_headers = {**registered({"ar": "مطابخ الأحياء", "fi": "Kortteli \"keittiöt\" 100%"}), "time": "2026-12-03T12:00:00+03:00"}
    second = run_example(as_headers, "--binary")  # the attributes as ce- headers, the data (non-ASCII) as the body
    assert second.returncode == 0, second.stdout + second.stderr
    seq = second.stdout.split("#")[1].split()[0]
    logged = cli("tail", "--since", seq, "--count", "1", "--no-follow", "--json", env=env)
    assert logged.returncode == 0, logged.stderr
    event = json.loads(logged.stdout.splitlines()[0])["event"]
    assert (event["id"], event["time"]) == (as_headers["id"], "2026-12-03T12:00:00+03:00")
    assert event["data"]["title"] == {"ar": "مطابخ الأحياء", "fi": "Kortteli \"keittiöt\" 100%"}

    wrong = run_example({**registered({"tr": "x"}), "source": "/institutions/someone-else"}, "--binary")
    assert wrong.returncode == 1 and "rejected (forbidden)" in wrong.stdout and "source:" in wrong.stdout, wrong.stdout


@pytest.mark.parametrize("language", ["python", "node"])
async def test_the_nats_partner_example_offers_again_what_the_network_cannot_take_just_now(
    server: EmbeddedNats, tmp_path: Path, language: str, request: pytest.FixtureRequest
) -> None:
    """A gatekeeper stands in, scripted, on a real nats-server: first the log is unavailable (as
    while it elects a leader after a server was lost), then the event is accepted. The example
    sends the same event again after the `retry_after` it was told, and reports it accepted. A
    rejection for cause is final: sent once."""
    import nats
    from nats.aio.msg import Msg

    example = [sys.executable, str(EXAMPLES / "nats_partner.py")] if language == "python" else request.getfixturevalue("node_example")
    assert server.authority is not None
    creds = tmp_path / "member.creds"
    creds.write_text(server.authority.member_creds("fi-retry"))
    unavailable = {"status": "rejected", "id": "retry-1", "reason": "unavailable", "retry_after": 0.2,
                   "errors": [{"loc": [], "msg": "the event log did not confirm the event; retry with the same id",
                               "type": "log_unavailable"}]}
    accepted = {"status": "accepted", "id": "retry-1", "seq": 7, "duplicate": False}
    forbidden = {"status": "rejected", "id": "retry-1", "reason": "forbidden",
                 "errors": [{"loc": ["source"], "msg": "not a member", "type": "not_member"}]}
    script: list[dict[str, Any]] = [unavailable, accepted]
    offers: list[bytes] = []

    async def gate(msg: Msg) -> None:
        offers.append(msg.data)
        await msg.respond(json.dumps(script[min(len(offers), len(script)) - 1]).encode())

    event = {"specversion": "1.0", "id": "retry-1", "source": "/institutions/fi-retry", "type": "project.registered",
             "subject": "p-retry", "data": {"project_id": "p-retry", "title": {"fi": "Uusi yritys"}, "owner": "fi-retry"}}
    path = tmp_path / "event.json"
    path.write_text(json.dumps(event, ensure_ascii=False), encoding="utf-8")

    async def run() -> tuple[int | None, str, str]:
        process = await asyncio.create_subprocess_exec(*example, server.url, str(creds), "fi-retry", str(path),
                                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode(), err.decode()

    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await nc.subscribe("collab.ingress.fi-retry.>", cb=gate)
        await nc.flush()
        code, out, err = await run()
        assert code == 0 and "accepted as #7" in out, out + err
        assert len(offers) == 2 and offers[0] == offers[1]  # the same event, sent again
        assert "retry with the same id); sending it again in 0.2 s" in err, err
        offers.clear()
        script[:] = [forbidden]
        code, out, err = await run()
        assert code == 1 and "rejected (forbidden)" in out and len(offers) == 1, out + err
    finally:
        await nc.close()


@pytest.mark.parametrize("language", ["python", "node"])
def test_the_nats_follower_example_prints_public_events_live_and_is_refused_a_confidential_subject(
    running_bus: dict[str, str], tmp_path: Path, language: str, request: pytest.FixtureRequest
) -> None:
    """``examples/nats_follower.py`` (nats-py alone) and ``examples/node/nats_follower.mjs`` (the
    ``nats`` package alone): a member's client following the public log over NATS."""
    env = running_bus
    member, creds = member_with_creds(env, tmp_path, "fi-follow", "NATS follower")
    url = f"nats://{env['COLLABBUS_NATS_LISTEN']}"
    if language == "python":
        example = [sys.executable, str(EXAMPLES / "nats_follower.py"), url, str(creds), member]
    else:
        node, partner = request.getfixturevalue("node_example")
        example = [node, str(Path(partner).with_name("nats_follower.mjs")), url, str(creds), member]

    following = subprocess.Popen([*example, f"collab.live.{member}.project.>", "--count", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert following.stderr is not None
        assert following.stderr.readline().startswith("following collab.live."), "the follower did not subscribe"
        project_id = unique("p")
        published = cli("publish", "project.registered", "--as", member, "--json", "--data", json.dumps({
            "project_id": project_id, "title": {"fi": "Kotihoito"}, "owner": member, "status": "active"}), env=env)
        assert published.returncode == 0, published.stdout + published.stderr
        out, _ = following.communicate(timeout=30)
    finally:
        following.kill()
    assert following.returncode == 0
    line = json.loads(out.splitlines()[0])
    event = line["event"]
    assert (event["type"], event["subject"], event["source"]) == ("project.registered", project_id, f"/institutions/{member}")
    assert line["seq"] == json.loads(published.stdout)["seq"]  # its place in the log: where an HTTP catch-up starts

    refused = subprocess.run([*example, "collab.live.*.call.application_submitted.*"], capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "refused a subscription" in refused.stderr, refused.stderr
    assert "call.application_submitted" in refused.stderr


def test_the_nats_follower_example_resumes_without_missing_or_repeating_an_event(running_bus: dict[str, str], tmp_path: Path) -> None:
    """``examples/nats_follower.py --resume FILE``: what was logged before it subscribed (or while
    it was away) is read over NATS, a page at a time from ``collab.log.{id}``, then it carries on
    live; each event once, in log order, also across a restart — the README's recipe for a
    follower that must miss nothing, with nothing but NATS."""
    env = running_bus
    member, creds = member_with_creds(env, tmp_path, "fi-resume", "NATS resumer")

    def publish() -> int:
        published = cli("publish", "project.registered", "--as", member, "--json", "--data", json.dumps({
            "project_id": unique("p"), "title": {"fi": "Kotihoito"}, "owner": member, "status": "active"}), env=env)
        assert published.returncode == 0, published.stdout + published.stderr
        return int(json.loads(published.stdout)["seq"])

    position = tmp_path / "follower.position"
    example = [sys.executable, str(EXAMPLES / "nats_follower.py"), f"nats://{env['COLLABBUS_NATS_LISTEN']}", str(creds), member,
               f"collab.live.{member}.project.>", "--resume", str(position), "--count", "2"]
    follower_env = {key: value for key, value in os.environ.items() if not key.startswith("COLLABBUS_")}  # NATS alone
    before = publish()  # logged before any follower ran
    following = subprocess.Popen(example, env=follower_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert following.stderr is not None
        assert following.stderr.readline().startswith("following collab.live."), "the follower did not subscribe"
        live = publish()  # while it follows: live (and perhaps in its catch-up too: printed once all the same)
        out, err = following.communicate(timeout=30)
    finally:
        following.kill()
    assert following.returncode == 0, err
    assert [json.loads(line)["seq"] for line in out.splitlines()] == [before, live]
    assert position.read_text() == str(live)

    away = [publish(), publish()]  # while it is not running
    again = subprocess.run(example, env=follower_env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["seq"] for line in again.stdout.splitlines()] == away  # those two, not the earlier ones


HEADER_VALUES = ('Kortteli "keittiöt" 100%', "مطابخ الأحياء", "2026-12-03T12:00:00+03:00", "a b\tc")


def python_nats_example() -> Any:
    """``examples/nats_partner.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nats_partner", EXAMPLES / "nats_partner.py")
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_nats_partner_example_percent_encodes_header_values_as_the_gate_decodes_them() -> None:
    from urllib.parse import unquote_to_bytes

    example = python_nats_example()
    for value in HEADER_VALUES:
        encoded = example.percent_encoded(value)
        assert all(0x21 <= ord(c) <= 0x7E and c != '"' for c in encoded), encoded
        assert unquote_to_bytes(encoded).decode("utf-8") == value
    assert example.percent_encoded("2026-12-03T12:00:00+03:00") == "2026-12-03T12:00:00+03:00"  # left as it is


def test_the_node_example_percent_encodes_header_values_as_the_python_one(node_example: list[str]) -> None:
    node, module = node_example
    script = f"import({json.dumps(Path(module).as_uri())}).then(m => console.log(JSON.stringify({json.dumps(HEADER_VALUES)}.map(m.percentEncoded))))"
    encoded = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=60)
    assert encoded.returncode == 0, encoded.stderr
    python = python_nats_example()
    assert json.loads(encoded.stdout) == [python.percent_encoded(value) for value in HEADER_VALUES]


async def test_a_member_the_read_models_have_not_applied_yet_is_named_as_the_log_has_it(poisoned: Poisoned) -> None:
    """The read models behind the log (here they never apply institutions): `institutions token`
    says the member joined and the read models are behind — not "add it first" — and `institutions
    add` refuses to admit it a second time."""
    member = unique("fi-behind")
    await join(poisoned.nc, member, "municipality", country="FI")
    env = cli_env(poisoned.bus)
    code, out, err = await acli("institutions", "token", member, env=env)
    assert code == 1 and out == "", err
    assert f"{member!r} joined the network (a municipality, per the log)" in flat(err) and "have not applied it yet" in flat(err)
    assert "institutions add" not in err
    code, out, err = await acli("institutions", "add", member, "--name", "Again", "--kind", "municipality",
                                     "--country", "FI", env=env)
    assert code == 1 and f"{member} is already a member (a municipality per the log" in flat(err), err
    code, out, err = await acli("institutions", "token", unique("fi-nobody"), env=env)
    assert code == 1 and "add it with `collabbus institutions add` first" in flat(err), err
