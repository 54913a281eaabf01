"""``collabbus dlq``: a poison event is listed with its reason, replayed once fixed (exactly once),
and gone from the dead-letter queue; purge asks first."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from sqlmodel import Session

from bus.client import offer
from bus.deadletters import DETAIL_LENGTH
from bus.server import EmbeddedNats
from bus.streams import DLQ_STREAM
from handlers.network import Event
from ops import dlq
from tests.bus.test_consumer import FIXTURE, Recorder, project_event, wait_for
from tests.conftest import join
from tests.ops.conftest import Poisoned, bus_refusing_poison_rows, cli_env, collabbus


async def test_a_poison_event_is_listed_replayed_once_fixed_and_gone(poisoned: Poisoned) -> None:
    bus, recorder = poisoned.bus, poisoned.recorder
    a, b, after = project_event("poison-a"), project_event("poison-b"), project_event("after-1")
    seqs = {}
    for event in (a, b, after):
        verdict = await offer(poisoned.nc, FIXTURE["as"], event)
        assert verdict.accepted
        seqs[event["id"]] = verdict.seq
    await wait_for(lambda: "after-1" in recorder.seen and bus.consumer is not None and bus.consumer.dead_lettered == 2)

    # Given two dead letters, when listed, then each says where it came from and why.
    letters = await dlq.dead_letters(bus.js)
    assert [(x.consumer, x.event_id, x.type, x.original_seq) for x in letters] == [
        ("network", a["id"], "project.registered", seqs[a["id"]]),
        ("network", b["id"], "project.registered", seqs[b["id"]]),
    ]
    first = letters[0]
    assert first.reason == "RuntimeError: cannot apply poison-a" and first.deliveries == 2 and first.error == "RuntimeError"
    assert first.event == (await dlq.dead_letter(bus.js, first.seq)).event == a  # type: ignore[union-attr]

    env = cli_env(bus)
    code, listed, _ = await collabbus("dlq", "list", env=env)
    assert code == 0 and "2 dead letters" in listed
    assert a["id"] in listed and "RuntimeError: cannot apply poison-a" in listed and "project.registered" in listed
    code, shown, _ = await collabbus("dlq", "show", str(first.seq), env=env)
    assert code == 0 and "Traceback" in shown and '"project_id": "poison-a"' in shown
    code, _, missing = await collabbus("dlq", "show", "999", env=env)
    assert code == 1 and "no dead letter #999" in missing
    code, said, _ = await collabbus("dlq", "show", "999", "--json", env=env)
    assert code == 1 and orjson.loads(said) == {"seq": 999, "error": "no dead letter #999"}

    # While the handler still fails, a replay keeps the dead letter and says why.
    kept = await dlq.replay(bus.js, {"network": bus.service}, [first.seq])
    assert [(r.applied, r.error) for r in kept] == [(False, "RuntimeError: cannot apply poison-a")]
    assert a["id"] not in poisoned.applied()

    # Once fixed, the replay applies it and removes it from the queue.
    recorder.poison.clear()
    replayed = await dlq.replay(bus.js, {"network": bus.service}, [first.seq, 999])
    assert [(r.seq, r.applied, r.error) for r in replayed] == [(first.seq, True, None), (999, False, "no dead letter #999")]
    assert recorder.seen.count("poison-a") == 1 and a["id"] in poisoned.applied()
    assert [x.event_id for x in await dlq.dead_letters(bus.js)] == [b["id"]]

    # The same dead letter back (a replay interrupted before the delete): replaying it changes nothing.
    headers = {"Collabbus-Consumer": "network", "Collabbus-Original-Seq": str(seqs[a["id"]]),
               "Collabbus-Original-Stream": "COLLAB_EVENTS", "Collabbus-Error": "RuntimeError", "Nats-Msg-Id": "copy-of-a"}
    await bus.js.publish("collab.dlq.network", orjson.dumps(a), headers=headers, stream=DLQ_STREAM)
    again = await dlq.replay(bus.js, {"network": bus.service})
    assert [(r.event_id, r.applied) for r in again] == [(b["id"], True), (a["id"], True)]
    assert recorder.seen.count("poison-a") == 1 and recorder.seen.count("poison-b") == 1
    assert await dlq.dead_letters(bus.js) == []
    assert await dlq.replay(bus.js, {"network": bus.service}) == []


async def test_a_replay_the_database_fails_says_why_without_the_statements_parameters(poisoned: Poisoned) -> None:
    """A replay whose database failed answered the exception's whole text: the statement with its
    parameters (the event's data, a confidential one's too) on the operator's terminal and in
    `--json` for a script's log. It is one line now, as the dead letter's own reason."""
    import sqlalchemy.exc

    bus = poisoned.bus
    assert (await offer(poisoned.nc, FIXTURE["as"], project_event("poison-a"))).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)

    class Failing:
        def __getattr__(self, name: str) -> Any:
            return getattr(bus.service, name)

        def apply_batch(self, *args: Any, **kwargs: Any) -> Any:
            raise sqlalchemy.exc.IntegrityError("INSERT INTO projects (project_id, title) VALUES (?, ?)",
                                                ("poison-a", "a confidential title"), Exception("UNIQUE constraint failed: projects.project_id"))

    (kept,) = await dlq.replay(bus.js, {"network": Failing()})  # type: ignore[dict-item]
    assert (kept.applied, kept.error) == (False, "IntegrityError: (builtins.Exception) UNIQUE constraint failed: projects.project_id")
    assert [letter.event_id for letter in await dlq.dead_letters(bus.js)] == [kept.event_id]


async def test_purge_asks_first(poisoned: Poisoned) -> None:
    bus = poisoned.bus
    event = project_event("poison-a")
    assert (await offer(poisoned.nc, FIXTURE["as"], event)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    env = cli_env(bus)

    code, _, _ = await collabbus("dlq", "purge", env=env, stdin=b"n\n")
    assert code == 1 and len(await dlq.dead_letters(bus.js)) == 1
    code, out, _ = await collabbus("dlq", "purge", "--yes", env=env)
    assert code == 0 and "deleted 1 dead letter" in out
    assert await dlq.dead_letters(bus.js) == [] and await dlq.counts(bus.js) == {}
    code, out, _ = await collabbus("dlq", "list", "--json", env=env)
    assert code == 0 and '"items": []' in out


async def test_a_dead_letter_names_its_event_and_the_cause_also_when_unreadable_or_invalid(poisoned: Poisoned) -> None:
    """An unreadable message keeps its event id (its Nats-Msg-Id); a validation error's reason is
    its fields, not the library's reference link."""
    from pydantic import BaseModel

    bus = poisoned.bus
    await bus.js.publish(f"collab.events.{FIXTURE['as']}.project.registered.x", b"{not json", headers={"Nats-Msg-Id": "broken-1"})

    class Strict(BaseModel):
        title: str

    def invalid(_session: object, event: object) -> None:
        Strict.model_validate({})

    original = type(poisoned.recorder).__call__

    def call(self: Recorder, session: Session, event: Event[Any]) -> None:
        if getattr(event, "subject", None) == "invalid-1":
            invalid(session, event)
        original(self, session, event)

    type(poisoned.recorder).__call__ = call  # type: ignore[method-assign]
    try:
        assert (await offer(poisoned.nc, FIXTURE["as"], project_event("invalid-1"))).accepted
        await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 2)
    finally:
        type(poisoned.recorder).__call__ = original  # type: ignore[method-assign]
    unreadable, invalid_letter = [x for x in await dlq.dead_letters(bus.js) if x.consumer == "network"]
    assert unreadable.event_id == "broken-1" and unreadable.event is None and unreadable.error == "JSONDecodeError"
    assert invalid_letter.reason.startswith("ValidationError: 1 validation error for Strict; title; Field required")
    assert "errors.pydantic.dev" not in invalid_letter.reason


async def test_one_dead_letter_is_purged_alone(poisoned: Poisoned) -> None:
    bus = poisoned.bus
    for name in ("poison-a", "poison-b"):
        assert (await offer(poisoned.nc, FIXTURE["as"], project_event(name))).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 2)
    first, second = [x for x in await dlq.dead_letters(bus.js) if x.consumer == "network"]
    env = cli_env(bus)
    code, out, err = await collabbus("dlq", "purge", str(first.seq), "999999", "--yes", env=env)
    assert code == 0 and "deleted 1 dead letter" in out and "no dead letter #999999" in err, (out, err)
    assert [x.seq for x in await dlq.dead_letters(bus.js) if x.consumer == "network"] == [second.seq]
    code, _, err = await collabbus("dlq", "purge", "999999", "--yes", env=env)
    assert code == 1 and "no dead letter #999999" in err


async def test_a_replay_of_a_number_naming_no_dead_letter_says_so_apart_from_those_kept(poisoned: Poisoned) -> None:
    """`dlq replay 99` said "kept #99: no dead letter #99" on standard output, as if there were one
    kept: a number naming none is said on standard error ("no dead letter #99"), apart from the
    dead letters replayed or kept; the replay still exits 1."""
    bus, recorder = poisoned.bus, poisoned.recorder
    recorder.poison.add("poison-c")
    assert (await offer(poisoned.nc, FIXTURE["as"], project_event("poison-c"))).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    recorder.poison.clear()
    assert (await offer(poisoned.nc, FIXTURE["as"], project_event("poison-c"))).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 2)
    head, behind = await dlq.dead_letters(bus.js)
    env = cli_env(bus)
    code, out, err = await collabbus("dlq", "replay", "999998", "999999", env=env)
    assert (code, out) == (1, "") and "no dead letter #999998, #999999" in err and "kept" not in err, err
    code, out, err = await collabbus("dlq", "replay", str(behind.seq), "999999", env=env)
    assert code == 1 and f"kept #{behind.seq} {behind.event_id}: waits for dead letter #{head.seq}" in out, out
    assert "999999" not in out and "no dead letter #999999" in err, (out, err)
    code, out, _ = await collabbus("dlq", "replay", "999999", "--json", env=env)  # (for scripts, as before)
    assert code == 1 and orjson.loads(out)["items"] == [{"seq": 999999, "consumer": None, "event_id": None, "applied": False,
                                                         "error": "no dead letter #999999", "released": None,
                                                         "later_about_it": [], "waited_behind": None}]
    code, out, err = await collabbus("dlq", "replay", str(head.seq), "999999", env=env)
    assert code == 1 and f"replayed #{head.seq} {head.event_id} (network)" in out and "no dead letter #999999" in err, (out, err)
    assert [letter.seq for letter in await dlq.dead_letters(bus.js)] == [behind.seq]


async def test_a_dead_letters_detail_is_a_traceback_of_the_projects_frames_and_the_log_leaves_out_the_parameters(
    tmp_path: Path, server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    """The detail was the traceback's last 1,500 characters, its lines joined by " | ": it began
    mid-word, without its indentation or the frames naming the handler, while every attempt's log
    line carried the whole statement with its parameters (the event's data). The detail keeps the
    project's own frames and the exception, and `dlq show` prints it as a traceback; the log line
    names the statement by its first line, without parameters."""
    bus = await bus_refusing_poison_rows(tmp_path, server, flush_in_handler=True)
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        with caplog.at_level(logging.WARNING, logger="collabbus"):
            assert (await offer(nc, FIXTURE["as"], project_event("poison-secret-7"))).accepted
            await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
        failed = [record.getMessage() for record in caplog.records if "handler failed on" in record.getMessage()]
        assert len(failed) == 2, failed
        for said in failed:
            assert "(sqlite3.IntegrityError) impact reports of poison projects are refused [SQL: INSERT INTO project_impact_reports" in said
            assert "poison-secret-7" not in said and "parameters" not in said and "\n" not in said, said
        (letter,) = await dlq.dead_letters(bus.js)
        stored = await bus.js.get_msg(DLQ_STREAM, seq=letter.seq)
        assert len((stored.headers or {})["Collabbus-Error-Detail"]) <= 3 * DETAIL_LENGTH
        lines = letter.detail.splitlines()
        assert lines[0] == "Traceback (most recent call last):", lines
        assert lines[1].startswith('  File "handlers/service.py", line ') and lines[2].startswith("    derived += "), lines
        assert any(line.startswith('  File "handlers/network.py", line ') and line.endswith(", in _project") for line in lines), lines
        assert any(line.startswith("    ") for line in lines) and any(line.startswith("  … ") and "left out" in line for line in lines)
        exception = next(at for at, line in enumerate(lines) if line.startswith("sqlalchemy.exc.IntegrityError: "))
        assert lines[exception + 1].startswith("[SQL: INSERT INTO project_impact_reports") and "poison-secret-7" in lines[exception + 2]
        assert letter.reason == "IntegrityError: (sqlite3.IntegrityError) impact reports of poison projects are refused"

        env = cli_env(bus)
        code, shown, _ = await collabbus("dlq", "show", str(letter.seq), env=env)
        assert code == 0 and "\n  Traceback (most recent call last):\n" in shown, shown
        assert '\n    File "handlers/service.py", line ' in shown and "\n  sqlalchemy.exc.IntegrityError: (sqlite3" in shown, shown
        code, listed, _ = await collabbus("dlq", "list", "--json", env=env)
        assert orjson.loads(listed)["items"][0]["reason"] == letter.reason

        # One written before (its lines joined by " | ", cut to its end) is read as it was.
        old = ("in apply_batch | derived += len(self.network.apply(session, event)) | RuntimeError: cannot apply poison-old | "
               "[SQL: INSERT INTO projects (project_id) VALUES (?)] | [parameters: ('poison-old',)]")
        await bus.js.publish("collab.dlq.network", orjson.dumps(project_event("poison-old")), stream=DLQ_STREAM, headers={
            "Collabbus-Consumer": "network", "Collabbus-Error": "RuntimeError", "Collabbus-Error-Detail": old})
        (_, written_before) = await dlq.dead_letters(bus.js)
        assert written_before.detail.splitlines()[:3] == ["in apply_batch", "derived += len(self.network.apply(session, event))",
                                                          "RuntimeError: cannot apply poison-old"]
        assert written_before.reason == "RuntimeError: cannot apply poison-old"
        code, shown, _ = await collabbus("dlq", "show", str(written_before.seq), env=env)
        assert code == 0 and "\n  in apply_batch\n  derived += len(self.network.apply(session, event))\n  RuntimeError: " in shown, shown
    finally:
        await nc.close()
        await bus.stop()


def test_a_failures_detail_fits_and_keeps_where_it_was_raised_and_what_it_says() -> None:
    """However deep the failure and long its message, the detail fits a dead letter's header: the
    traceback's frames are left out from the outermost, the exception's text is cut at its end."""
    from handlers.service import _describe

    def deep(depth: int) -> None:
        if depth == 0:
            raise ValueError("the innermost says: " + "x" * 5000)
        deep(depth - 1)

    try:
        deep(200)
    except ValueError as exc:
        detail = _describe(exc)
    assert len(detail) <= DETAIL_LENGTH, len(detail)
    lines = detail.splitlines()
    assert lines[0] == "Traceback (most recent call last):" and lines[-1].startswith("ValueError: the innermost says: xxx")
    assert lines[-1].endswith("…") and 'raise ValueError("the innermost says: " + "x" * 5000)' in detail  # where it was raised
    assert any(line.startswith("  … ") and line.endswith(" frames left out") for line in lines), lines


async def test_a_dead_letter_in_any_language_is_listed_with_a_readable_reason(poisoned: Poisoned) -> None:
    """An error text with Turkish in it (the event's own title) is kept as written: nats-py read
    such a header back as an ``email.header.Header``, and ``dlq list`` crashed on the whole queue."""
    bus = poisoned.bus
    broken = {"specversion": "1.0", "id": "bad-tr-1", "source": f"/institutions/{FIXTURE['as']}", "type": "project.registered",
              "subject": "bad-tr-1", "time": "2026-12-02T10:00:00+00:00", "datacontenttype": "application/json",
              "data": {"project_id": "bad-tr-1", "title": {"tr": "Şehir Büyük Mahalle Mutfakları"}}}
    await bus.js.publish(f"collab.events.{FIXTURE['as']}.project.registered.bad-tr-1", orjson.dumps(broken),
                         headers={"Nats-Msg-Id": "bad-tr-1"})
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    (letter,) = [x for x in await dlq.dead_letters(bus.js) if x.consumer == "network"]
    assert letter.event_id == "bad-tr-1" and "Mahalle Mutfakları" in letter.detail
    assert letter.reason.startswith("ValidationError: ") and "Field required" in letter.reason
    assert "errors.pydantic.dev" not in letter.reason and "For further information" not in letter.reason
    env = cli_env(bus)
    code, listed, err = await collabbus("dlq", "list", "--json", env=env)
    assert code == 0, err
    assert [item["event_id"] for item in orjson.loads(listed)["items"]] == ["bad-tr-1"]
    code, shown, err = await collabbus("dlq", "show", str(letter.seq), env=env)
    assert code == 0 and "Şehir Büyük" in shown, err


def test_a_reason_leaves_out_the_libraries_links_and_statements() -> None:
    traceback = [
        "Traceback (most recent call last):", '  File "handlers/service.py", line 204, in _apply',
        "sqlalchemy.exc.OperationalError: (sqlite3.OperationalError) attempt to write a readonly database",
        "[SQL: INSERT INTO projects (project_id, title) VALUES (?, ?)]", "[parameters: ('p', '{\"tr\": \"Mahalle\"}')]",
        "(Background on this error at: https://sqlalche.me/e/21/e3q8)",
    ]
    assert dlq.reason_of("OperationalError", traceback) == (
        "OperationalError: (sqlite3.OperationalError) attempt to write a readonly database")


async def test_the_later_events_about_a_dead_lettered_thing_wait_behind_it_and_are_replayed_in_order(poisoned: Poisoned) -> None:
    """A project's registration is dead-lettered: the later events about that project are set
    aside behind it in the dead-letter queue (not applied without it), while other projects'
    flow. `dlq show` names them; replaying one alone waits for the earlier; replaying all applies
    them in the log's order, lets the project go, and its next event is applied as it comes."""
    bus, recorder = poisoned.bus, poisoned.recorder
    recorder.poison.add("poison-c")
    first = project_event("poison-c")
    verdict = await offer(poisoned.nc, FIXTURE["as"], first)
    assert verdict.accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    recorder.poison.clear()  # (fixed: only the order keeps the next one back)
    later, elsewhere = project_event("poison-c"), project_event("another-project")
    seqs = [verdict.seq, *[(await offer(poisoned.nc, FIXTURE["as"], event)).seq for event in (later, elsewhere)]]
    await wait_for(lambda: "another-project" in recorder.seen and bus.consumer is not None and bus.consumer.dead_lettered == 2)
    assert "poison-c" not in recorder.seen and later["id"] not in poisoned.applied()
    head, behind = await dlq.dead_letters(bus.js)
    assert (head.event_id, behind.event_id, behind.original_seq) == (first["id"], later["id"], seqs[1])
    assert behind.error == "Parked" and behind.reason.startswith(f"Parked: set aside behind #{head.original_seq}: an earlier event about project poison-c")

    env = cli_env(bus)
    code, listed, _ = await collabbus("dlq", "list", env=env)  # the events set aside are counted on the line of the one they wait behind
    assert code == 0 and "2 dead letters, 1 of them set aside behind the others (counted on their lines; --all lists them)" in listed
    assert first["id"] in listed and later["id"] not in listed and "1 event waits behind it" in listed
    code, listed, _ = await collabbus("dlq", "list", "--all", env=env)
    assert code == 0 and later["id"] in listed and f"behind #{head.seq} (log #{head.original_seq})" in listed
    code, listed, _ = await collabbus("dlq", "list", "--json", env=env)
    assert [item["waits_behind"] for item in orjson.loads(listed)["items"]] == [None, head.seq]
    code, shown, _ = await collabbus("dlq", "show", str(head.seq), "--json", env=env)
    assert code == 0 and orjson.loads(shown)["later_about_it"] == [{"seq": seqs[1], "type": "project.registered", "waiting": True}]
    code, _, said = await collabbus("dlq", "show", str(head.seq), env=env)
    assert code == 0 and f"1 later event about poison-c waits behind it in the dead-letter queue: #{seqs[1]} project.registered" in said
    assert "warning" not in said  # (nothing about it was applied without it)

    code, kept, _ = await collabbus("dlq", "replay", str(behind.seq), env=env)
    assert code == 1 and f"kept #{behind.seq}" in kept and f"waits for dead letter #{head.seq}" in kept
    assert later["id"] not in poisoned.applied()

    code, replayed, _ = await collabbus("dlq", "replay", "--consumer", "webhooks", "--json", env=env)
    assert code == 0 and orjson.loads(replayed) == {"items": []} and len(await dlq.dead_letters(bus.js)) == 2
    code, _, said = await collabbus("dlq", "replay", str(head.seq), "--consumer", "network", env=env)
    assert code == 2 and "not both" in said
    code, replayed, _ = await collabbus("dlq", "replay", "--consumer", "network", "--json", env=env)
    items = orjson.loads(replayed)["items"]
    assert code == 0 and [(item["seq"], item["applied"]) for item in items] == [(head.seq, True), (behind.seq, True)]
    assert items[1]["released"] == {"domain": "project", "subject": "poison-c"} and items[0]["released"] is None
    assert (items[0]["waited_behind"], items[1]["waited_behind"]) == (None, head.seq)
    assert items[0]["later_about_it"] == [{"seq": behind.original_seq, "type": "project.registered", "waiting": True}]
    assert items[1]["later_about_it"] is None  # (its head's list names it)
    assert await dlq.dead_letters(bus.js) == [] and {first["id"], later["id"]} <= poisoned.applied()

    after = project_event("poison-c")
    assert (await offer(poisoned.nc, FIXTURE["as"], after)).accepted
    await wait_for(lambda: after["id"] in poisoned.applied())
    assert bus.consumer is not None and bus.consumer.dead_lettered == 2


async def test_a_validation_request_waits_behind_its_projects_dead_letter(poisoned: Poisoned) -> None:
    """A request to validate a project whose registration is in the dead-letter queue is set
    aside behind it (its workflow would judge it without the project): listed behind it, kept
    when replayed alone before it, applied after it when all are replayed; both are let go."""
    from handlers.validations import READS
    from tests.handlers.harness import envelope

    bus, recorder = poisoned.bus, poisoned.recorder
    assert bus.service is not None
    bus.service.network.routes.add(reads={"validation.requested": READS["validation.requested"]})  # (its one projection aside)
    recorder.poison.add("poison-v")
    registration = project_event("poison-v")
    assert (await offer(poisoned.nc, FIXTURE["as"], registration)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    request = envelope("validation.requested", FIXTURE["as"], {
        "validation_id": "val-poison-v", "project_id": "poison-v", "coordinator": "fi-thl",
        "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2}})
    assert (await offer(poisoned.nc, FIXTURE["as"], request)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 2)
    head, behind = await dlq.dead_letters(bus.js)
    assert (behind.event_id, behind.error, behind.waits_for) == (request["id"], "Parked", ("project", "poison-v"))
    assert behind.summary()["waits_for"] == "project/poison-v" and head.summary()["waits_for"] is None
    assert "an earlier event about project poison-v is in the dead-letter queue" in behind.reason
    assert dlq.set_aside_behind([head, behind]) == {behind.seq: head}
    assert sorted(subject for _, subject, _, _ in bus.service.parked()) == ["poison-v", "val-poison-v"]

    recorder.poison.clear()
    kept = await dlq.replay(bus.js, {"network": bus.service}, [behind.seq])
    assert not kept[0].applied and f"waits for dead letter #{head.seq}" in (kept[0].error or "") and "project poison-v" in (kept[0].error or "")
    replayed = await dlq.replay(bus.js, {"network": bus.service})
    assert [(r.event_id, r.applied) for r in replayed] == [(registration["id"], True), (request["id"], True)]
    assert await dlq.dead_letters(bus.js) == [] and bus.service.parked() == []
    assert {registration["id"], request["id"]} <= poisoned.applied()


async def test_purging_a_dead_letter_lets_its_thing_go_once_none_of_its_events_is_left(poisoned: Poisoned) -> None:
    """An operator who gives up on a dead letter purges it, and the events set aside behind it;
    the thing is let go only once none of its events is left, and its next event is applied."""
    bus, recorder = poisoned.bus, poisoned.recorder
    recorder.poison.add("poison-d")
    first, later = project_event("poison-d"), project_event("poison-d")
    for event in (first, later):
        assert (await offer(poisoned.nc, FIXTURE["as"], event)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 2)
    recorder.poison.clear()
    head, behind = await dlq.dead_letters(bus.js)
    assert behind.error == "Parked"

    env = cli_env(bus)
    code, said, _ = await collabbus("dlq", "purge", str(head.seq), "--yes", env=env)
    assert code == 0 and "deleted 1 dead letter" in said and "let go" not in said  # (the later one is still there)
    code, _, said = await collabbus("dlq", "purge", "--json", env=env)
    assert code == 2 and "--json needs --yes" in said
    code, said, _ = await collabbus("dlq", "purge", "--yes", "--json", env=env)
    assert code == 0 and orjson.loads(said) == {"deleted": 1, "released": [{"consumer": "network", "domain": "project", "subject": "poison-d"}]}
    code, said, _ = await collabbus("dlq", "purge", str(head.seq), "--yes", "--json", env=env)
    assert code == 1 and orjson.loads(said)["error"] == f"no dead letter #{head.seq}"
    after = project_event("poison-d")
    assert (await offer(poisoned.nc, FIXTURE["as"], after)).accepted
    await wait_for(lambda: after["id"] in poisoned.applied())
    assert bus.consumer is not None and bus.consumer.dead_lettered == 2 and later["id"] not in poisoned.applied()


async def test_later_events_applied_without_a_dead_letter_are_named_with_a_warning(poisoned: Poisoned) -> None:
    """A later event about a dead letter's thing that was applied without it (its thing let go
    while the dead letter stayed, as a data dir from before things were set aside has it): `dlq
    show` and `dlq replay` warn that a replay applies the dead letter after it."""
    bus, recorder = poisoned.bus, poisoned.recorder
    recorder.poison.add("poison-e")
    first = project_event("poison-e")
    assert (await offer(poisoned.nc, FIXTURE["as"], first)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    recorder.poison.clear()
    assert bus.service is not None and bus.service.release(("project", "poison-e"), bus.service.parked()[0][3])
    later = project_event("poison-e")
    seq = (await offer(poisoned.nc, FIXTURE["as"], later)).seq
    await wait_for(lambda: later["id"] in poisoned.applied())
    [letter] = await dlq.dead_letters(bus.js)

    env = cli_env(bus)
    code, shown, _ = await collabbus("dlq", "show", str(letter.seq), "--json", env=env)
    assert code == 0 and orjson.loads(shown)["later_about_it"] == [{"seq": seq, "type": "project.registered", "waiting": False}]
    code, _, warned = await collabbus("dlq", "show", str(letter.seq), env=env)
    assert code == 0 and f"1 later event about poison-e was applied while it waited here: #{seq} project.registered" in warned
    code, replayed, warned = await collabbus("dlq", "replay", str(letter.seq), env=env)
    assert code == 0 and f"replayed #{letter.seq}" in replayed and "let go" not in replayed
    assert f"#{seq} project.registered" in warned and "Replayed, it is applied after them" in warned
    assert await dlq.dead_letters(bus.js) == []


async def test_a_sender_asking_for_its_event_is_told_it_waits_for_the_operator(tmp_path: Path, server: EmbeddedNats) -> None:
    """Over HTTP, `GET /events/{id}` of an event the bus could not apply, or set aside behind one
    it could not, said 404 — as of an event never logged — for as long as it waited. Whoever may
    see the event reads `waiting`, with why in words for a partner (no internal error): any
    member a public event; a confidential application its sender, the partners it names and the
    operator, any other member still the 404. Once replayed, it is `applied`."""
    import httpx

    from bus.runtime import Bus
    from bus.server import free_port
    from handlers import tokens
    from handlers.db import session_scope
    from bus.consumer import ConsumerSettings
    from ops.settings import Settings
    from tests.conftest import join

    from handlers.network import Network, Routes
    from tests.conftest import load_fixtures, unique

    recorder = Recorder()
    recorder.poison.update({"poison-h", "poison-call"})
    projections = {"project.registered": recorder, "call.application_submitted": recorder}
    bus = Bus(Settings(data_dir=tmp_path, nats_url=server.url, nats_creds=server.bus_creds, http=f"127.0.0.1:{free_port()}"),
              network_factory=lambda: Network(Routes().add(projections=projections)),
              consumer_settings=ConsumerSettings("network", max_deliver=2, backoff=(0.05,)))
    await bus.start()
    await bus.start_http()
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        submitted = load_fixtures()["call.application_submitted"]
        sender, other, applicant, partner = FIXTURE["as"], "fi-another-member", submitted["as"], submitted["event"]["data"]["partners"][0]
        for who, kind in ((sender, FIXTURE["kind"]), (other, "ngo"), (applicant, submitted["kind"]), (partner, "municipality")):
            await join(nc, who, kind)
        failed, behind = project_event("poison-h"), project_event("poison-h")
        for event in (failed, behind):
            assert (await offer(nc, sender, event)).accepted
        application = {**submitted["event"], "id": unique("app"), "subject": "poison-call",
                       "data": {**submitted["event"]["data"], "call_id": "poison-call"}}
        assert (await offer(nc, applicant, application)).accepted
        await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 3)
        with session_scope(bus.engine) as session:
            keys = {who: tokens.issue(session, who) for who in (sender, other, applicant, partner, bus.settings.operator)}
        async with httpx.AsyncClient(base_url=bus.http.url, timeout=30) as client:
            async def read(event_id: str, who: str) -> httpx.Response:
                return await client.get(f"/events/{event_id}", headers={"Authorization": f"Bearer {keys[who]}"})

            answer = await read(behind["id"], sender)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert (body["outcome"], body["event"], body["refusal"], body["derived"]) == ("waiting", behind, None, [])
            assert body["waiting"].startswith("set aside: an earlier event about project poison-h could not be applied")
            first = (await read(failed["id"], sender)).json()
            assert first["outcome"] == "waiting" and first["waiting"].startswith("the bus could not apply it")
            assert "RuntimeError" not in (await read(failed["id"], sender)).text  # (the bus's own error stays the operator's)
            assert (await read(behind["id"], bus.settings.operator)).json()["outcome"] == "waiting"
            assert (await read(behind["id"], other)).json()["outcome"] == "waiting"  # (a public event: in the log for all)
            for party in (applicant, partner, bus.settings.operator):
                assert (await read(application["id"], party)).json()["outcome"] == "waiting", party
            assert (await read(application["id"], other)).status_code == 404  # confidential: not a party of it

            recorder.poison.clear()
            assert [r.applied for r in await dlq.replay(bus.js, {"network": bus.service})] == [True, True, True]
            assert (await read(behind["id"], sender)).json()["outcome"] == "applied"
    finally:
        await nc.close()
        await bus.stop()


async def test_the_gateways_index_of_waiting_events_reads_only_new_dead_letters_and_forgets_deleted_ones(
    poisoned: Poisoned, monkeypatch: Any,
) -> None:
    """``GET /events/{id}``'s index of a consumer's dead letters reads, at each look after the
    queue grew, only the dead letters added since; one replayed or purged since is not found."""
    bus, recorder = poisoned.bus, poisoned.recorder
    recorder.poison.update({"poison-w1", "poison-w2", "poison-w3"})
    reads: list[int] = []
    listing = dlq.dead_letters

    async def counted(js: Any, consumer: str | None = None, *, after: int = 0) -> list[dlq.DeadLetter]:
        reads.append(after)
        return await listing(js, consumer, after=after)

    monkeypatch.setattr(dlq, "dead_letters", counted)
    events = [project_event(f"poison-w{i}") for i in (1, 2, 3)]
    for event in events[:2]:
        assert (await offer(poisoned.nc, FIXTURE["as"], event)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 2)
    index = dlq.Waiting("network")
    first = await index.find(bus.js, events[0]["id"])
    assert first is not None and first.event_id == events[0]["id"] and reads == [0]
    assert (await index.find(bus.js, events[1]["id"])) is not None and reads == [0]  # the queue did not change

    assert (await offer(poisoned.nc, FIXTURE["as"], events[2])).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 3)
    third = await index.find(bus.js, events[2]["id"])
    assert third is not None and len(reads) == 2 and reads[1] >= first.seq + 1  # only what came after

    assert await dlq.discard(bus.js, [first.seq]) == [first.seq]
    assert await index.find(bus.js, events[0]["id"]) is None
    assert (await index.find(bus.js, events[1]["id"])) is not None
    assert await index.find(bus.js, "never-dead-lettered") is None


async def test_a_replay_tells_people_of_the_events_set_aside_on_the_line_of_the_one_they_waited_behind(poisoned: Poisoned) -> None:
    """`dlq replay` for people: the dead letter, then the events set aside behind it counted on
    its line (not a line each: a busy thing set aside has thousands), and the thing let go."""
    bus, recorder = poisoned.bus, poisoned.recorder
    recorder.poison.add("poison-r")
    events = [project_event("poison-r") for _ in range(3)]
    for event in events:
        assert (await offer(poisoned.nc, FIXTURE["as"], event)).accepted
    await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 3)
    recorder.poison.clear()
    head = (await dlq.dead_letters(bus.js))[0]

    code, said, _ = await collabbus("dlq", "replay", "--consumer", "network", env=cli_env(bus))
    assert code == 0, said
    lines = [line for line in said.splitlines() if line.strip()]
    assert lines == [f"replayed #{head.seq} {events[0]['id']} (network), with the 2 events set aside behind it",
                     "let go project poison-r: none of its events is left in the dead-letter queue, its later events are "
                     "applied as they come"], lines
    assert {event["id"] for event in events} <= poisoned.applied()


async def test_a_rebuild_says_the_read_models_dead_letters_are_still_in_the_queue(tmp_path: Path, server: EmbeddedNats) -> None:
    """A rebuild applies the log in its order, a dead-lettered event included (here the handler
    that failed on it is fixed): it says the queue still holds it, and `dlq replay` removes it."""
    from bus.consumer import ConsumerSettings
    from bus.runtime import Bus
    from ops.settings import Settings
    from tests.bus.test_consumer import recording
    from tests.conftest import join

    recorder = Recorder()
    recorder.poison.add("poison-rb")
    bus = Bus(Settings(data_dir=tmp_path, nats_url=server.url, nats_creds=server.bus_creds),
              network_factory=recording(recorder), consumer_settings=ConsumerSettings("network", max_deliver=2, backoff=(0.05,)))
    await bus.start()
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        assert (await offer(nc, FIXTURE["as"], project_event("poison-rb"))).accepted
        await wait_for(lambda: bus.consumer is not None and bus.consumer.dead_lettered == 1)
    finally:
        await nc.close()
        await bus.stop()
    env = cli_env(bus)
    code, said, _ = await collabbus("rebuild", "--processes", "1", env=env)
    assert code == 0, said
    assert "the dead-letter queue still holds 1 of the read models' dead letter" in said
    assert "collabbus dlq replay --consumer network" in said
    code, said, _ = await collabbus("dlq", "replay", "--consumer", "network", env=env)
    assert code == 0 and "replayed #1" in said, said
    code, said, _ = await collabbus("rebuild", "--processes", "1", env=env)
    assert code == 0 and "dead-letter queue" not in said
    code, said, _ = await collabbus("rebuild", "--processes", "1", "--json", env=env)
    assert code == 0 and orjson.loads(said)["dead_letters"] == 0


async def test_an_event_a_rebuild_cannot_apply_waits_in_the_dead_letter_queue(tmp_path: Path, server: EmbeddedNats) -> None:
    """A rebuild passes an event it cannot apply (here the database refuses its row) and names it:
    it is also put into the read models' dead-letter queue — where the read models' lack of it
    shows (`dlq list`, `status`) and whence `dlq replay` applies it once what failed is mended —
    instead of being gone from them with nothing but the rebuild's report to say so."""
    import sqlite3

    from bus.runtime import Bus
    from ops.settings import Settings
    from tests.conftest import join

    bus = Bus(Settings(data_dir=tmp_path, nats_url=server.url, nats_creds=server.bus_creds))
    await bus.start()
    nc = await nats.connect(server.url, **server.connect_options())
    try:
        await join(nc, FIXTURE["as"], FIXTURE["kind"])
        events = [project_event("fine-before"), project_event("refused-row"), project_event("fine-after")]
        for event in events:
            assert (await offer(nc, FIXTURE["as"], event)).accepted
        logged = (await bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
        await wait_for(lambda: bus.service is not None and bus.service.position() == logged)
    finally:
        await nc.close()
        await bus.stop()
    database = tmp_path / "collabbus.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TRIGGER refuse_row BEFORE INSERT ON projects WHEN NEW.project_id = 'refused-row' "
                   "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")
    env = cli_env(bus)
    code, said, _ = await collabbus("rebuild", "--processes", "1", env=env)
    assert code == 1, said
    assert f"failed #{logged - 1} {events[1]['id']}" in said
    assert "1 event it could not apply is in the dead-letter queue" in said and "collabbus dlq replay --consumer network" in said
    code, listed, _ = await collabbus("dlq", "list", "--json", env=env)
    [letter] = orjson.loads(listed)["items"]
    assert (letter["consumer"], letter["original_seq"], letter["event_id"]) == ("network", logged - 1, events[1]["id"]), letter
    code, said, _ = await collabbus("rebuild", "--processes", "1", "--json", env=env)  # again: not put in twice
    assert code == 1 and orjson.loads(said)["dead_lettered"] == 0 and orjson.loads(said)["dead_letters"] == 1, said
    with sqlite3.connect(database) as db:
        db.execute("DROP TRIGGER refuse_row")
    code, said, _ = await collabbus("dlq", "replay", "--consumer", "network", env=env)
    assert code == 0 and f"{events[1]['id']}" in said, said
    with sqlite3.connect(database) as db:
        found = {row[0] for row in db.execute("SELECT project_id FROM projects")}
    assert {"fine-before", "refused-row", "fine-after"} <= found


async def test_publish_says_why_an_event_it_offered_is_not_applied(poisoned: Poisoned) -> None:
    """`collabbus publish` waits for what became of the event: one the bus could not apply, and one
    set aside behind it, are named as the dead-letter queue has them — not "is the bus running?"."""
    import json

    env = cli_env(poisoned.bus)
    failing, behind = project_event("poison-a"), project_event("poison-a")
    code, said, err = await collabbus("publish", "project.registered", "--as", FIXTURE["as"], "--data",
                                      json.dumps(failing["data"]), env=env)
    assert code == 0, said + err
    assert "not applied: the bus could not apply it (RuntimeError: cannot apply poison-a)" in said, said
    assert "is the bus running" not in said
    code, said, err = await collabbus("publish", "project.registered", "--as", FIXTURE["as"], "--data",
                                      json.dumps(behind["data"]), "--json", env=env)
    assert code == 0, said + err
    waiting = json.loads(said)["waiting"]
    assert waiting["set_aside"] is True and waiting["waits_for"] == "project/poison-a", waiting
