"""The examples a member's developer starts from (``examples/``), run as they would run them:
``http_partner.py`` offers events to a real gateway, ``webhook_receiver.py`` receives the
network's deliveries over a real socket and checks them, ``http_follower.py`` follows the log by
long polls; so do their Node.js twins in ``examples/node``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook

from bus.server import free_port
from tests.conftest import unique
from tests.connectors.conftest import Gateway
from tests.handlers.harness import envelope
from tests.webhooks.conftest import Network, eventually, project, register

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


async def partner(
    gateway: Gateway, institution: str, event: dict[str, Any], tmp_path: Path, command: list[str]
) -> subprocess.CompletedProcess[str]:
    """The HTTP partner example (``command``) offering ``event`` as ``institution``."""
    path = tmp_path / f"{event['id']}.json"
    path.write_text(json.dumps(event, ensure_ascii=False), encoding="utf-8")
    env = {**os.environ, "COLLABBUS_URL": gateway.url, "COLLABBUS_TOKEN": gateway.token(institution)}
    return await asyncio.to_thread(subprocess.run, [*command, str(path)], env=env, capture_output=True, text=True, timeout=60)


class Lines:
    """What the receiver prints, one JSON object a line, read as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.items: list[dict[str, Any]] = []

    async def until(self, count: int) -> list[dict[str, Any]]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 20
        while len(self.items) < count:
            assert time.monotonic() < deadline, f"the receiver printed {self.items}"
            line = await asyncio.wait_for(asyncio.to_thread(self.proc.stdout.readline), timeout=20)
            assert line, "the receiver exited"
            self.items.append(json.loads(line))
        return self.items


def example(language: str, name: str) -> list[str]:
    """How to run the example ``name`` (without its suffix) in ``language`` (Node.js: without any package)."""
    if language == "python":
        return [sys.executable, str(EXAMPLES / f"{name}.py")]
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("the Node.js examples need node in CI")
        pytest.skip("node is not installed")
    return [node, str(EXAMPLES / "node" / f"{name}.mjs")]


def commands(language: str) -> tuple[list[str], list[str]]:
    """How to run the HTTP partner and the webhook receiver examples in ``language``."""
    return example(language, "http_partner"), example(language, "webhook_receiver")


@pytest.mark.parametrize("language", ["python", "node"])
async def test_the_examples_offer_events_and_receive_them_as_signed_webhooks(network: Network, tmp_path: Path, language: str) -> None:
    offering, receiving = commands(language)
    gateway = await network.start()
    owner, other = await gateway.join("municipality"), await gateway.join("ngo")
    port = free_port()
    endpoint = await register(gateway, owner, f"http://127.0.0.1:{port}/", ["project.*"])
    receiver = subprocess.Popen([*receiving, str(port)], text=True,
                                env={**os.environ, "COLLABBUS_WEBHOOK_SECRET": endpoint["secret"]},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert receiver.stderr is not None and "listening" in receiver.stderr.readline()
        lines = Lines(receiver)

        data = project(owner)
        registered = envelope("project.registered", owner, data, id=unique("ex"))
        offered = await partner(gateway, owner, registered, tmp_path, offering)
        assert offered.returncode == 0, offered.stdout + offered.stderr
        assert "accepted as #" in offered.stdout and "applied" in offered.stdout

        change = envelope("project.updated", other, {"project_id": data["project_id"], "changes": {"status": "completed"}},
                          id=unique("ex"))
        refused = await partner(gateway, other, change, tmp_path, offering)
        assert refused.returncode == 1 and f"refused by the workflow: not_owner — Only {owner}" in refused.stdout, refused.stdout

        broken = envelope("project.registered", owner, {**project(owner), "status": "finished"}, id=unique("ex"))
        rejected = await partner(gateway, owner, broken, tmp_path, offering)
        assert rejected.returncode == 1 and "refused by the gateway (422" in rejected.stdout, rejected.stdout
        assert rejected.stdout.count("data.status:") == 1, rejected.stdout  # each problem once, on its own line

        # The registration, the refused update and its refusal, each verified and printed once.
        received = await lines.until(3)
        assert sorted(item["type"] for item in received) == ["project.action_rejected", "project.registered", "project.updated"]
        assert {item["id"] for item in received} >= {registered["id"], change["id"]}

        # What the receiver itself does: signatures, repeats, order.
        url = f"http://127.0.0.1:{port}/"
        signer = Webhook(endpoint["secret"])

        def delivery(event_id: str, subject: str, sequence: int) -> tuple[bytes, dict[str, str]]:
            body = json.dumps({"specversion": "1.0", "id": event_id, "source": f"/institutions/{owner}",
                               "type": "project.updated", "subject": subject, "data": {}}).encode()
            now = int(time.time())
            signature = signer.sign(event_id, datetime.fromtimestamp(now, tz=timezone.utc), body.decode())
            return body, {"webhook-id": event_id, "webhook-timestamp": str(now), "webhook-signature": signature,
                          "collabbus-sequence": str(sequence), "content-type": "application/cloudevents+json"}

        async with httpx.AsyncClient(timeout=10) as http:
            subject = unique("p")
            newer, older = delivery(unique("ev"), subject, 9_000_001), delivery(unique("ev"), subject, 9_000_000)
            for body, headers in (newer, newer, older):  # a retry of the first, then an older event arriving late
                assert (await http.post(url, content=body, headers=headers)).status_code == 204
            forged = {**newer[1], "webhook-id": unique("ev")}  # the signature is the first one's
            assert (await http.post(url, content=newer[0], headers=forged)).status_code == 400
            unsigned = {k: v for k, v in newer[1].items() if k != "webhook-signature"}
            assert (await http.post(url, content=newer[0], headers=unsigned)).status_code == 400
        received = await lines.until(5)
        assert [(item["sequence"], item["stale"]) for item in received[3:]] == [(9_000_001, False), (9_000_000, True)]

        # Deliveries handled in parallel (the bus sends up to 8 at a time to an endpoint) each print one whole line.
        burst = [delivery(unique("ev"), unique("p"), 1) for _ in range(100)]
        async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=8)) as http:
            answers = await asyncio.gather(*(http.post(url, content=body, headers=headers) for body, headers in burst))
        assert {answer.status_code for answer in answers} == {204}
        received = await lines.until(105)
        assert {item["id"] for item in received[5:]} == {json.loads(body)["id"] for body, _ in burst}
        await asyncio.sleep(0.5)  # nothing more: the repeat and the forgeries were not printed
        assert receiver.poll() is None
    finally:
        receiver.terminate()
        rest, _ = receiver.communicate(timeout=10)
    assert rest == "", rest


@pytest.mark.parametrize("language", ["python", "node"])
async def test_the_partner_example_says_when_its_event_waits_for_the_operator(
    network: Network, tmp_path: Path, language: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event the bus could not apply (its projection failing, its retries spent) and one about
    the same project set aside behind it: the HTTP partner example says each is logged and waits
    for the network's operator, and exits 3 — not 404's "not applied within 30 s"."""
    from handlers import projects

    offering, _ = commands(language)
    project_registered = projects.PROJECTIONS["project.registered"]
    broken: set[str] = set()

    def failing(session: Any, event: Any) -> None:
        if event.subject in broken:
            raise RuntimeError("the read model cannot take it")
        project_registered(session, event)

    monkeypatch.setitem(projects.PROJECTIONS, "project.registered", failing)
    gateway = await network.start()
    owner = await gateway.join("municipality")
    data = project(owner)
    broken.add(data["project_id"])
    registered = envelope("project.registered", owner, data, id=unique("ex"))
    offered = await partner(gateway, owner, registered, tmp_path, offering)
    assert offered.returncode == 3, offered.stdout + offered.stderr
    assert "accepted as #" in offered.stdout and "logged, not applied yet: the bus could not apply it" in offered.stdout
    assert "RuntimeError" not in offered.stdout

    update = envelope("project.updated", owner, {"project_id": data["project_id"], "changes": {"status": "completed"}},
                      id=unique("ex"))
    behind = await partner(gateway, owner, update, tmp_path, offering)
    assert behind.returncode == 3, behind.stdout + behind.stderr
    assert f"logged, not applied yet: set aside: an earlier event about project {data['project_id']}" in behind.stdout


@pytest.mark.parametrize("language", ["python", "node"])
async def test_the_follower_example_prints_the_log_as_it_grows_and_goes_on_where_it_stopped(
    network: Network, tmp_path: Path, language: str
) -> None:
    command = [*example(language, "http_follower"), "project.registered", "project.updated"]
    gateway = await network.start()
    owner = await gateway.join("municipality")
    position = tmp_path / "follower.position"
    assert network.start_seq is not None
    position.write_text(str(network.start_seq - 1))  # the session's log holds other tests' events: after them
    env = {**os.environ, "COLLABBUS_URL": gateway.url, "COLLABBUS_TOKEN": gateway.token(owner),
           "COLLABBUS_POSITION_FILE": str(position)}
    practices = [project(owner) for _ in range(2)]
    before = [await gateway.offer(owner, "project.registered", practice) for practice in practices]

    def start() -> tuple[subprocess.Popen[str], Lines]:
        proc = subprocess.Popen(command, text=True, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        return proc, Lines(proc)

    def seqs(items: list[dict[str, Any]]) -> list[int]:
        return [item["seq"] for item in items]

    follower, lines = start()
    try:
        assert seqs(await lines.until(2)) == [v["seq"] for v in before]  # what was logged before it started
        assert {item["event"]["type"] for item in lines.items} == {"project.registered"}
        await asyncio.sleep(1.0)  # waiting in a long poll now
        await gateway.offer(owner, "project.completed", {  # a type it did not ask for
            "project_id": practices[1]["project_id"], "outcome": {"en": "done"}, "ended_on": "2026-04-30"})
        later = await gateway.offer(owner, "project.updated", {"project_id": practices[0]["project_id"], "changes": {"summary": {"en": "more"}}})
        printed = await lines.until(3)
        assert seqs(printed)[2] == later["seq"] and printed[2]["event"]["type"] == "project.updated"  # as it is logged, within the poll's 30 s
        assert await eventually(lambda: position.read_text() == str(later["seq"]))
    finally:
        follower.terminate()
        follower.communicate(timeout=10)

    missed = await gateway.offer(owner, "project.registered", project(owner))  # logged while it is not running
    follower, lines = start()
    try:
        assert seqs(await lines.until(1)) == [missed["seq"]]  # from where it stopped: nothing again, nothing skipped
        await asyncio.sleep(0.5)
        assert len(lines.items) == 1 and follower.poll() is None
    finally:
        follower.terminate()
        follower.communicate(timeout=10)

    refused = await asyncio.to_thread(subprocess.run, command, env={**env, "COLLABBUS_TOKEN": "cb_not-a-token"},
                                      capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "refused by the gateway (401" in refused.stderr, refused.stderr
    position.write_text("not a number")
    garbled = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, text=True, timeout=60)
    assert garbled.returncode == 2 and "holds no log sequence ('not a number'" in garbled.stderr.replace('"', "'"), garbled.stderr


@pytest.mark.parametrize("language", ["python", "node"])
def test_the_http_partner_example_sends_again_what_the_gateway_cannot_take_just_now(tmp_path: Path, language: str) -> None:
    """A gateway stands in, scripted, on a real socket: the first offer is answered 503 with
    `Retry-After` (the log electing a leader), the second accepted. The example waits as told,
    sends the same event again and follows it to its outcome."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    offering, _ = commands(language)
    posted: list[bytes] = []

    class Scripted(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def answer(self, status: int, body: dict[str, Any], **headers: str) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/problem+json" if status >= 400 else "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            posted.append(self.rfile.read(int(self.headers["Content-Length"])))
            if len(posted) == 1:
                self.answer(503, {"type": "urn:collabbus:problem:unavailable", "title": "Unavailable", "status": 503,
                                  "detail": "the event log did not confirm the event; retry with the same id"},
                            **{"Retry-After": "1"})
            else:
                self.answer(202, {"status": "accepted", "id": "again-1", "seq": 12, "duplicate": False})

        def do_GET(self) -> None:
            self.answer(200, {"seq": 12, "event": {}, "outcome": "applied", "refusal": None, "derived": [], "derived_pending": []})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        event = {"specversion": "1.0", "id": "again-1", "source": "/institutions/fi-again", "type": "project.registered",
                 "subject": "p-again", "data": {"project_id": "p-again", "title": {"fi": "Uudestaan"}, "owner": "fi-again"}}
        path = tmp_path / "event.json"
        path.write_text(json.dumps(event, ensure_ascii=False), encoding="utf-8")
        env = {**os.environ, "COLLABBUS_URL": f"http://127.0.0.1:{server.server_address[1]}", "COLLABBUS_TOKEN": "t"}
        started = time.monotonic()
        done = subprocess.run([*offering, str(path)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "accepted as #12" in done.stdout and "applied" in done.stdout, done.stdout + done.stderr
        assert len(posted) == 2 and posted[0] == posted[1] and time.monotonic() - started >= 1.0  # the same event, after the wait
    finally:
        server.shutdown()
        server.server_close()
