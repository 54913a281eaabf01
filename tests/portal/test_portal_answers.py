"""What the portal sends that the connector cannot use, against a portal on 127.0.0.1 answering
exactly the bytes given (RawPortal): an entry it cannot read is rejected on its own, with its
place, and the rest of its page synced; an answer that is no page stops the pass with one line;
a portal that cannot be reached is said in words, not httpx's class names."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from bus.server import free_port
from connectors.portal import store
from connectors.portal.connector import PortalClient, PortalSync, project_id_of
from handlers.db import session_scope
from handlers.projects import Project
from tests.connectors.conftest import Gateway
from tests.portal.conftest import TOKEN, Network, RawPortal, project_events


def entry(entry_id: str, organisation: object, *, title: str = '{"fi": "Toimintamalli"}', stamp: str = "01") -> bytes:
    """An entry's JSON text; ``title`` as JSON text, so that it can hold what JSON allows and text does not."""
    return (f'{{"id": "{entry_id}", "type": "practice", "title": {title}, "organisation": {json.dumps(organisation)}, '
            f'"status": "published", "tags": [], "url": "https://innokyla.example/practice/{entry_id}", '
            f'"updated_at": "2026-12-{stamp}T10:00:00.000000Z"}}').encode()


def connector(gateway: Gateway, portal: RawPortal, **client: Any) -> PortalSync:
    options: dict[str, Any] = {"timeout": 5.0, "backoff": 0.01, "attempts": 2, **client}
    return PortalSync(gateway.bus.gate, gateway.bus.engine, PortalClient(portal.url, TOKEN, **options), portal=portal.url)


def malformed_page(network: Network) -> list[bytes]:
    """The page the tests list: two good entries among every kind of entry the connector cannot read."""
    organisation = network.organisations[0]
    return [
        entry("good-1", organisation, stamp="01"),
        entry("org-text", "Esimerkki ry", stamp="02"),
        entry("surrogate", organisation, title='{"fi": "\\ud800"}', stamp="03"),
        b"null",
        b'"just text"',
        b'{"title": {"fi": "no id"}, "organisation": null}',
        entry("bad-bytes", organisation, title='{"fi": "Toimintamalli BYTE"}', stamp="04").replace(b"BYTE", b"\xff"),
        entry("good-2", organisation, stamp="05"),
    ]


async def test_entries_the_connector_cannot_read_are_rejected_and_the_rest_of_the_page_synced(
    gateway: Gateway, network: Network, raw_portal: RawPortal,
) -> None:
    raw_portal.list(*malformed_page(network))
    report = await connector(gateway, raw_portal).sync()
    assert report.complete and report.error is None, report.error
    assert (report.listed, report.registered) == (8, 2)
    said = {(r["entry"], r.get("item")): [(".".join(map(str, e["loc"])), e["msg"]) for e in r["errors"]] for r in report.rejected}
    assert said == {
        ("org-text", 2): [("organisation", "an organisation is an object {name, business_id}, not a string")],
        ("surrogate", 3): [("title.fi", "not text: a lone surrogate (\\ud800) at character 0")],
        (None, 4): [("", "an entry is a JSON object, not null")],
        (None, 5): [("", "an entry is a JSON object, not a string")],
        (None, 6): [("id", "the entry has no id")],
        ("bad-bytes", 7): [("title.fi", "not UTF-8 text (the byte 0xff at character 14)")],
    }
    assert {r["reason"] for r in report.rejected} == {"malformed_entry"} and all(r["page"] == 1 for r in report.rejected)
    json.dumps(report.as_dict(), ensure_ascii=False).encode()  # printable as it is

    # The good entries are in the log and stored with the page's cursor, as any page's.
    events = await project_events(gateway, list(network.members.values()))
    assert sorted(e["subject"] for e in events) == [project_id_of("good-1"), project_id_of("good-2")]
    await gateway.settle()
    with session_scope(gateway.bus.engine) as session:
        position = store.load_cursor(session, raw_portal.url)
        assert position.high_water == "2026-12-05T10:00:00.000000Z" and position.cursor is None
        assert set(store.known_entries(session, raw_portal.url, ["good-1", "good-2", "org-text"])) == {"good-1", "good-2"}
        assert session.get(Project, project_id_of("good-2")) is not None

    again = await connector(gateway, raw_portal).sync()  # not stuck: the same page again, the same verdicts
    assert again.complete and (again.unchanged, len(again.rejected), again.emitted) == (2, 6, 0)


async def test_an_entry_holding_the_nul_character_is_rejected_and_the_rest_of_the_page_synced(
    gateway: Gateway, network: Network, raw_portal: RawPortal,
) -> None:
    """U+0000 in an entry's id or its organisation's business id was kept or looked up as it came,
    which PostgreSQL's text cannot hold (the pass failed there); in its texts, the gate refuses it."""
    organisation = network.organisations[0]
    raw_portal.list(entry("nul\\u0000id", organisation), entry("nul-org", {**organisation, "business_id": "x\u0000"}, stamp="02"),
                    entry("nul-title", organisation, title='{"fi": "Toiminta\\u0000malli"}', stamp="03"),
                    entry("good", organisation, stamp="04"))
    report = await connector(gateway, raw_portal).sync()
    assert report.complete and report.error is None and report.registered == 1, report.as_dict()
    said = {r["entry"]: [(".".join(map(str, e["loc"])), e.get("type")) for e in r["errors"]] for r in report.rejected}
    assert said["nul\x00id"] == [("id", "string_nul")] and said["nul-org"] == [("organisation.business_id", "string_nul")]
    assert said["nul-title"] == [("data.title.fi", "string_nul")], report.rejected
    events = await project_events(gateway, list(network.members.values()))
    assert [e["subject"] for e in events] == [project_id_of("good")]


async def test_an_entry_created_under_an_id_the_bus_cannot_keep_is_said_so(raw_portal: RawPortal) -> None:
    """The id a portal answers a creation with was kept as it came: an object as its Python text,
    one too long or holding U+0000 failed the write on PostgreSQL."""
    for answer, said in ((b'{"id": "a\\u0000"}', "holding the NUL character"), (b'{"id": "' + b"x" * 300 + b'"}', "more than 256"),
                         (b'{"id": {"n": 1}}', "a string, not an object")):
        raw_portal.page = (201, "application/json", answer)
        client = PortalClient(raw_portal.url, TOKEN, timeout=5.0, backoff=0.01, attempts=1)
        try:
            with pytest.raises(ValueError, match="the portal created an entry but its id cannot be kept: .*" + said):
                await client.create_entry({"type": "practice", "title": {"fi": "Toimintamalli"}})
        finally:
            await client.aclose()


async def test_an_entry_that_reads_differently_on_its_own_is_rejected_by_its_id(
    gateway: Gateway, network: Network, raw_portal: RawPortal,
) -> None:
    organisation = network.organisations[0]
    raw_portal.list(entry("moved-on", organisation), entry("fine", organisation, stamp="02"))
    raw_portal.entries["moved-on"] = entry("moved-on", {"name": "X", "business_id": 123})
    report = await connector(gateway, raw_portal).sync()
    assert report.complete and report.registered == 1
    [rejected] = report.rejected
    assert (rejected["entry"], rejected["errors"][0]["loc"]) == ("moved-on", ["organisation", "business_id"])


async def test_an_answer_that_is_no_page_stops_the_pass_saying_what_it_was(
    gateway: Gateway, network: Network, raw_portal: RawPortal,
) -> None:
    for answer, said in [
        ((200, "text/html; charset=utf-8", b"<html><body>Kirjaudu sis\xc3\xa4\xc3\xa4n</body></html>"),
         f"the portal at {raw_portal.url.removeprefix('http://')} answered text/html, not JSON, to GET /api/v1/entries"),
        ((200, "application/json", b"[]"), "answered GET /api/v1/entries with an array, not an object with items"),
        ((200, "application/json", b'{"entries": []}'), "with items that are null, not an object with items"),
        ((200, "application/json", b'{"items": [], "next_cursor": 7}'), "with a next_cursor a number, not a string"),
        ((200, "application/json", b'{"items": [], "next_cursor": "a\\u0000"}'), "with a next_cursor holding the NUL character"),
        ((200, "application/json", b'{"items": ['), "answered GET /api/v1/entries with JSON that cannot be read"),
    ]:
        raw_portal.page = answer
        report = await connector(gateway, raw_portal).sync()
        assert not report.complete and report.error is not None and said in report.error, (answer, report.error)


async def test_a_portal_that_cannot_be_reached_is_said_in_words(gateway: Gateway, raw_portal: RawPortal) -> None:
    port = free_port()  # nothing listens there
    closed = PortalSync(gateway.bus.gate, gateway.bus.engine, PortalClient(f"http://127.0.0.1:{port}", TOKEN, backoff=0.01, attempts=2),
                        portal=f"closed-{port}")
    report = await closed.sync()
    assert report.error == f"cannot connect to the portal at 127.0.0.1:{port}: connection refused (GET /api/v1/entries, 2 attempts)"

    raw_portal.silent = True
    report = await connector(gateway, raw_portal, timeout=0.3).sync()
    where = raw_portal.url.removeprefix("http://")
    assert report.error == f"the portal at {where} did not answer within 0.3 s (GET /api/v1/entries, 2 attempts)"


async def test_an_entry_versioned_by_a_long_etag_is_synced(gateway: Gateway, network: Network, raw_portal: RawPortal) -> None:
    """An ETag is opaque and HTTP sets it no length: one of 640 characters (a hash of the entry
    and its revision, say) failed the page's storing on PostgreSQL, and every pass after it."""
    raw_portal.etag = '"' + "0123456789abcdef" * 40 + '"'
    raw_portal.list(entry("long-etag", network.organisations[0], stamp="06"))
    report = await connector(gateway, raw_portal).sync()
    assert report.complete and report.error is None and report.registered == 1, report.error
    with session_scope(gateway.bus.engine) as session:
        known = store.known_entries(session, raw_portal.url, ["long-etag"])["long-etag"]
        assert known.etag == raw_portal.etag


def test_each_of_the_clients_timeouts_is_said_with_its_own_limit() -> None:
    """httpx's four timeouts are four limits of the client: each is named by what did not happen
    in time, with the limit it had (its class's name said nothing to an operator)."""
    client = PortalClient("http://portal.example:8443", TOKEN)
    client.http.timeout = httpx.Timeout(connect=1, read=2, write=3, pool=4)
    said = {kind.__name__: client._failure(kind("timed out")) for kind in
            (httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)}
    assert said == {
        "ConnectTimeout": "no connection to the portal at portal.example:8443 within 1 s",
        "ReadTimeout": "the portal at portal.example:8443 did not answer within 2 s",
        "WriteTimeout": "the portal at portal.example:8443 did not take the request within 3 s",
        "PoolTimeout": "no connection to the portal at portal.example:8443 was free within 4 s",
    }


async def test_a_portal_failing_past_its_retries_is_said_with_its_status(gateway: Gateway, raw_portal: RawPortal) -> None:
    raw_portal.page = (503, "text/plain", b"busy")
    report = await connector(gateway, raw_portal).sync()
    where = raw_portal.url.removeprefix("http://")
    assert report.error == f"the portal at {where} answered 503 X (GET /api/v1/entries, 2 attempts)"

