"""Pages of the log over NATS (``collab.log.{institution}``, ``bus.logpages``): a member with its
own credentials reads what it may see, as ``GET /events`` shows it — on a running bus with read
models on SQLite and PostgreSQL, a real nats-server and a real HTTP gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.client import Client

from bus.credentials import member_inbox_prefix, partner_creds
from bus.server import EmbeddedNats
from tests.conftest import unique
from tests.connectors.conftest import Gateway
from tests.connectors.test_gateway import open_funding_call, project


async def connect_member(nats_server: EmbeddedNats, tmp_path: Path, institution: str) -> Client:
    """``institution``'s own connection, with the credentials the bus issues to members."""
    assert nats_server.authority is not None
    creds = tmp_path / f"{institution}.creds"
    creds.write_text(partner_creds(nats_server.authority.account, institution))
    return await nats.connect(nats_server.url, user_credentials=str(creds), inbox_prefix=member_inbox_prefix(institution))


async def ask(nc: Client, institution: str, request: Any) -> dict[str, Any]:
    body = request if isinstance(request, bytes) else orjson.dumps(request)
    reply = await nc.request(f"collab.log.{institution}", body, timeout=10)
    assert reply.headers is not None and reply.headers.get("Content-Type") == "application/json"
    return orjson.loads(reply.data)  # type: ignore[no-any-return]


async def test_a_member_reads_the_pages_of_the_log_it_may_see_over_nats_as_over_http(
    gateway: Gateway, nats_server: EmbeddedNats, tmp_path: Path,
) -> None:
    funder, applicant, outsider = await gateway.join("funder", "SE"), await gateway.join("ngo"), await gateway.join("university")
    start = (await gateway.bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
    call_id = await open_funding_call(gateway, funder)
    await gateway.offer(applicant, "call.application_submitted", {
        "call_id": call_id, "application_id": unique("a"), "requested_amount": {"amount": "9000", "currency": "EUR"}})
    for _ in range(3):
        await gateway.offer(outsider, "project.registered", project(outsider))
    await gateway.settle()

    for viewer in (applicant, outsider):
        nc = await connect_member(nats_server, tmp_path, viewer)
        try:
            over_http = await gateway.client.get("/events", params={"after_seq": start, "limit": 500}, headers=gateway.auth(viewer))
            assert over_http.status_code == 200
            wanted = over_http.json()["items"]
            page = await ask(nc, viewer, {"after_seq": start, "limit": 500})
            assert page == {"items": wanted, "next_cursor": None}
            types = [item["event"]["type"] for item in page["items"]]
            # The application (and the workflow's answer to it) is the applicant's and the funder's business.
            assert ("call.application_submitted" in types) == (viewer == applicant), types
            assert types.count("project.registered") == 3

            # Page by page, from the cursor; filtered by type and institution as GET /events is.
            seen: list[int] = []
            after = start
            while True:
                page = await ask(nc, viewer, {"after_seq": after, "limit": 2})
                assert len(page["items"]) <= 2
                seen += [item["seq"] for item in page["items"]]
                if page["next_cursor"] is None:
                    break
                after = int(page["next_cursor"])
            assert seen == [item["seq"] for item in wanted]
            projects = await ask(nc, viewer, {"after_seq": start, "type": ["project.*"], "institution": outsider})
            assert [item["event"]["type"] for item in projects["items"]] == ["project.registered"] * 3
        finally:
            await nc.close()


async def test_a_request_the_log_cannot_take_is_refused_saying_why(gateway: Gateway, nats_server: EmbeddedNats, tmp_path: Path) -> None:
    member = await gateway.join("ngo")
    nc = await connect_member(nats_server, tmp_path, member)
    try:
        for request, reason, code, loc in (
            (b"{not json", "malformed", "json_invalid", []),
            ([1, 2], "malformed", "json_invalid", []),
            ({"after_seq": "5"}, "invalid", "int_type", ["after_seq"]),
            ({"limit": 0}, "invalid", "greater_than_equal", ["limit"]),
            ({"typ": ["project"]}, "invalid", "extra_forbidden", ["typ"]),
            ({"type": ["projekt"]}, "invalid", "unknown_event_type", ["type", 0]),
        ):
            answer = await ask(nc, member, request)
            assert answer["status"] == "rejected" and answer["reason"] == reason, (request, answer)
            assert [(e["type"], e["loc"]) for e in answer["errors"]] == [(code, loc)], (request, answer)
        assert "did you mean 'type'?" in (await ask(nc, member, {"typ": []}))["errors"][0]["msg"]
        assert "did you mean 'project'?" in (await ask(nc, member, {"type": ["projekt"]}))["errors"][0]["msg"]
        first = await ask(nc, member, b"")  # nothing asked: the first page of every type, as GET /events answers it
        over_http = (await gateway.client.get("/events", headers=gateway.auth(member))).json()
        assert first == over_http and first["items"], first  # the same defaults: from the log's start, 50 at most
    finally:
        await nc.close()


async def test_a_page_goes_only_to_an_inbox_of_the_asking_member(gateway: Gateway, partner: Client) -> None:
    """Asked with another member's inbox as the reply subject (by a connection whose credentials
    allow it: the bus's own), nothing is answered; with the member's own, the page comes."""
    member, other = await gateway.join("ngo"), await gateway.join("ngo")
    theirs = await partner.subscribe(f"_INBOX.{other}.spy")
    own = await partner.subscribe(f"_INBOX.{member}.mine")
    await partner.publish(f"collab.log.{member}", b"{}", reply=f"_INBOX.{other}.spy")
    await partner.publish(f"collab.log.{member}", b"{}", reply=f"_INBOX.{member}.mine")
    answered = await own.next_msg(timeout=10)
    assert orjson.loads(answered.data)["items"]
    with pytest.raises(nats.errors.TimeoutError):
        await theirs.next_msg(timeout=1)
    # An institution that is no member is told so, and shown nothing.
    stranger = await partner.subscribe("_INBOX.x-nobody.box")
    await partner.publish("collab.log.x-nobody", b"{}", reply=stranger.subject)
    refused = orjson.loads((await stranger.next_msg(timeout=10)).data)
    assert (refused["status"], refused["reason"], [e["type"] for e in refused["errors"]]) == ("rejected", "forbidden", ["not_member"])
    await asyncio.gather(theirs.unsubscribe(), own.unsubscribe(), stranger.unsubscribe())


async def test_a_page_holds_no_more_than_the_server_takes_in_one_message(
    gateway: Gateway, nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    member = await gateway.join("ngo")
    start = (await gateway.bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
    for _ in range(6):
        await gateway.offer(member, "project.registered", project(member, summary={"en": "x" * 2000}))
    nc = await connect_member(nats_server, tmp_path, member)
    try:
        monkeypatch.setattr(type(gateway.bus.nc), "max_payload", property(lambda _: 7000))  # the server's limit, made small
        seen: list[int] = []
        after = start
        while True:
            page = await ask(nc, member, {"after_seq": after, "limit": 500, "institution": member})
            assert 1 <= len(page["items"]) <= 2, len(page["items"])  # ~2.5 kB each
            seen += [item["seq"] for item in page["items"]]
            if page["next_cursor"] is None:
                break
            after = int(page["next_cursor"])
        assert len(seen) == 6 and seen == sorted(seen)
    finally:
        await nc.close()


async def test_an_event_too_large_for_a_reply_over_nats_is_refused_saying_where_to_read_it_and_the_next_page_goes_on(
    gateway: Gateway, nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An event the gate took fits in one message, but not with what a page adds around it (a page
    always held one event at least: its reply could not be sent, and the member waited in vain)."""
    member = await gateway.join("ngo")
    start = (await gateway.bus.js.stream_info("COLLAB_EVENTS")).state.last_seq
    small = await gateway.offer(member, "project.registered", project(member))
    large = await gateway.offer(member, "project.registered", project(member, summary={"en": "x" * 4000}))
    after = await gateway.offer(member, "project.registered", project(member))
    await gateway.settle()
    logged = (await gateway.bus.js.get_msg("COLLAB_EVENTS", large["seq"])).data or b""
    nc = await connect_member(nats_server, tmp_path, member)
    try:
        # The server's limit, made a little larger than the large event alone.
        monkeypatch.setattr(type(gateway.bus.nc), "max_payload", property(lambda _: len(logged) + 100))
        first = await ask(nc, member, {"after_seq": start, "limit": 500, "institution": member})
        assert [item["seq"] for item in first["items"]] == [small["seq"]] and first["next_cursor"] == str(small["seq"])

        refused = await ask(nc, member, {"after_seq": small["seq"], "limit": 500, "institution": member})
        assert (refused["status"], refused["reason"], refused["id"]) == ("rejected", "too_large", large["id"])
        (problem,) = refused["errors"]
        assert problem["type"] == "too_large_for_nats" and problem["loc"] == []
        assert f"the event at sequence {large['seq']} ({len(logged):,} bytes)" in problem["msg"], problem
        assert f"GET /events?after_seq={small['seq']}&limit=1" in problem["msg"] and f"after_seq {large['seq']}" in problem["msg"]

        # Read over HTTP as it says, and the pages over NATS go on after it.
        over_http = await gateway.client.get("/events", params={"after_seq": small["seq"], "limit": 1, "institution": member},
                                             headers=gateway.auth(member))
        assert [item["seq"] for item in over_http.json()["items"]] == [large["seq"]]
        rest = await ask(nc, member, {"after_seq": large["seq"], "limit": 500, "institution": member})
        assert [item["seq"] for item in rest["items"]] == [after["seq"]] and rest["next_cursor"] is None
    finally:
        await nc.close()


async def test_a_member_asking_for_pages_without_end_is_told_when_to_ask_again(
    gateway: Gateway, nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bus.ratelimit import RateLimiter

    member = await gateway.join("ngo")
    pages = gateway.bus.log_pages
    assert pages is not None
    monkeypatch.setattr(pages, "limiter", RateLimiter(2.0, 3))  # (10 a second, 50 at once, made small)
    nc = await connect_member(nats_server, tmp_path, member)
    try:
        answers = [await ask(nc, member, {"limit": 1}) for _ in range(5)]
    finally:
        await nc.close()
    assert [("items" in answer) for answer in answers] == [True, True, True, False, False]
    refused = answers[3]
    assert (refused["reason"], refused["errors"][0]["type"]) == ("unavailable", "rate_limited")
    assert 0 < refused["retry_after"] <= 0.5
