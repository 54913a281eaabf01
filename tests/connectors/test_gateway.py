"""The HTTP gateway as a partner uses it (CONTRACT §6), against a real uvicorn server, a real
nats-server and read models on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import gzip
import html
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import httpx
import orjson
import pytest
from icalendar import Calendar, vInt
from prometheus_client.parser import text_string_to_metric_families

from bus.cloudevents import to_binary
from bus.gate import INPUT_FACTOR
from connectors.http.paging import encode
from bus.ratelimit import RateLimiter
from bus.streams import EVENTS_STREAM
from connectors.http.server import HttpGateway
from handlers import tokens
from handlers.confidential import public_live_subjects
from handlers.db import session_scope
from tests.conftest import unique
from tests.connectors.conftest import Gateway
from tests.handlers.harness import envelope

PROBLEM_JSON = "application/problem+json"


def project(owner: str, project_id: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "project_id": project_id or unique("p"),
        "title": {"tr": "Mahalle Mutfakları", "en": "Neighbourhood Kitchens"},
        "themes": ["health_care.basic_services"],
        "owner": owner,
        "status": "active",
        "location": {"country": "TR", "region": "Mersin", "municipality": "Akdeniz"},
        **extra,
    }


def problem(response: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    """Check a problem answer and return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["status"] == status and body["type"] == f"urn:collabbus:problem:{kind}"
    assert body["title"] and body["detail"]
    return body  # type: ignore[no-any-return]


async def walk(client: httpx.AsyncClient, path: str, headers: dict[str, str], **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of a list, following next_cursor."""
    pages = []
    cursor = None
    while True:
        response = await client.get(path, params={**params, **({"cursor": cursor} if cursor else {})}, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages


@pytest.fixture(scope="module")
async def municipality(gateway: Gateway) -> str:
    return await gateway.join("municipality", "TR", municipality_level="metropolitan")


# --- publishing ----------------------------------------------------------------------------------


async def test_an_event_posted_in_each_mode_is_logged_and_readable(gateway: Gateway) -> None:
    # A member of its own: the module's municipality registers projects in other tests, which a
    # worker may have run before this one.
    municipality = await gateway.join("municipality", "TR", municipality_level="metropolitan")
    auth = gateway.auth(municipality)
    structured, binary, batched = project(municipality), project(municipality), project(municipality)

    response = await gateway.post(auth, envelope("project.registered", municipality, structured))
    assert response.status_code == 202 and response.json()["status"] == "accepted"

    headers, body = to_binary(envelope("project.registered", municipality, binary))
    response = await gateway.client.post("/events", content=body, headers={**headers, **auth})
    assert response.status_code == 202 and response.json()["status"] == "accepted", response.text

    batch = [
        envelope("project.registered", municipality, batched),
        envelope("project.registered", municipality, {"project_id": unique("p")}),  # judged on its own: invalid
        {"specversion": "1.0"},
    ]
    response = await gateway.client.post(
        "/events", content=orjson.dumps(batch), headers={"content-type": "application/cloudevents-batch+json", **auth}
    )
    assert response.status_code == 202, response.text
    verdicts = response.json()
    assert [v["status"] for v in verdicts] == ["accepted", "rejected", "rejected"]
    assert verdicts[1]["reason"] == "invalid" and verdicts[1]["id"] == batch[1]["id"]

    logged = await gateway.client.get("/events", params={"institution": municipality, "type": "project.registered"}, headers=auth)
    assert [item["event"]["data"]["project_id"] for item in logged.json()["items"]] == [
        structured["project_id"], binary["project_id"], batched["project_id"],
    ]
    await gateway.settle()
    for data in (structured, binary, batched):
        response = await gateway.client.get(f"/projects/{data['project_id']}", headers=auth)
        assert response.status_code == 200, response.text
        resource = response.json()
        assert resource["title"] == data["title"]  # Unicode as sent
        assert resource["location"] == data["location"] and resource["owner"] == municipality
        assert resource["partners"] == [] and resource["adoptions"] == [] and resource["impact"] == []


async def test_a_retried_event_is_one_event(gateway: Gateway, municipality: str) -> None:
    event = envelope("project.registered", municipality, project(municipality))
    first = await gateway.post(municipality, event)
    again = await gateway.post(municipality, event)
    assert first.status_code == again.status_code == 202
    assert again.json()["duplicate"] is True and again.json()["seq"] == first.json()["seq"]


async def test_malformed_bodies_are_400(gateway: Gateway, municipality: str) -> None:
    auth = {**gateway.auth(municipality), "content-type": "application/cloudevents+json"}
    body = problem(await gateway.client.post("/events", content=b'{"specversion": ', headers=auth), 400, "malformed")
    assert body["errors"][0]["type"] == "json_invalid"
    batch_headers = {**auth, "content-type": "application/cloudevents-batch+json"}
    not_a_list = problem(await gateway.client.post("/events", content=b'{"not": "a list"}', headers=batch_headers), 400, "malformed")
    assert not_a_list["detail"].endswith("not an object")  # in JSON's words: clients are written in any language
    assert [(e["type"], e["msg"]) for e in not_a_list["errors"]] == [("json_invalid", not_a_list["detail"])]
    for bad, code in ((b'[{"specversion": ', "json_invalid"), (b'[{"id": "caf\xe9"}]', "utf8_invalid")):
        refused = problem(await gateway.client.post("/events", content=bad, headers=batch_headers), 400, "malformed")
        assert [e["type"] for e in refused["errors"]] == [code], refused  # each problem listed, as for one event
    headers, data = to_binary(envelope("project.registered", municipality, project(municipality)))
    for value, code, said in (("proj-köök".encode(), "percent_encoding_invalid", "holds 'ö', outside ASCII"),  # UTF-8 as it is
                              (b"proj-k\xf6\xf6k", "percent_encoding_invalid", "holds 'ö', outside ASCII"),  # Latin-1
                              (b"proj-k\xff", "percent_encoding_invalid", "holds 'ÿ', outside ASCII")):
        sent = {key.encode(): text.encode() for key, text in {**headers, **gateway.auth(municipality)}.items()}
        raw = problem(await gateway.client.post("/events", content=data, headers={**sent, b"ce-subject": value}), 400, "malformed")
        assert [(e["type"], e["loc"]) for e in raw["errors"]] == [(code, ["subject"])], raw
        assert said in raw["errors"][0]["msg"] and "%C3%A9" in raw["errors"][0]["msg"], raw
    assert (await gateway.client.post("/events", content=data, headers={**headers, **gateway.auth(municipality)})).status_code == 202
    event = envelope("project.registered", municipality, project(municipality))
    twice = orjson.dumps(event).replace(b'"source":', b'"source":"/institutions/someone-else","source":', 1)
    refused = problem(await gateway.client.post("/events", content=twice, headers=auth), 400, "malformed")
    assert [(e["type"], e["loc"]) for e in refused["errors"]] == [("duplicate_name", [])], refused
    assert refused["detail"] == "the body names 'source' twice in one object: which one is meant cannot be told"
    in_a_batch = b"[" + orjson.dumps(envelope("project.registered", municipality, project(municipality))) + b"," + twice + b"]"
    refused = problem(await gateway.client.post("/events", content=in_a_batch, headers=batch_headers), 400, "malformed")
    assert [(e["type"], e["loc"]) for e in refused["errors"]] == [("duplicate_name", [1])], refused
    assert (await gateway.post(municipality, event)).status_code == 202  # the same event, once each name
    answered = await gateway.client.post("/events", content=b'[1, "x", null, []]', headers=batch_headers)
    assert answered.status_code == 202
    assert [v["errors"][0]["msg"].rpartition(", not ")[2] for v in answered.json()] == ["a number", "a string", "null", "an array"]
    assert {v["status"] for v in answered.json()} == {"rejected"}


async def test_no_unknown_or_revoked_token_is_401(gateway: Gateway, municipality: str) -> None:
    event = envelope("project.registered", municipality, project(municipality))
    response = await gateway.client.post("/events", json=event, headers={"content-type": "application/cloudevents+json"})
    problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].startswith("Bearer")
    unknown = problem(await gateway.post({"Authorization": "Bearer cb_not-a-token"}, event), 401, "unauthorized")
    assert unknown["detail"] == "the token is unknown"
    token = gateway.token(municipality)
    with session_scope(gateway.bus.engine) as session:
        assert tokens.revoke(session, token)
    revoked = problem(await gateway.post({"Authorization": f"Bearer {token}"}, event), 401, "unauthorized")
    assert revoked["detail"].startswith("the token was revoked at ")
    problem(await gateway.client.get("/projects", headers={"Authorization": f"Bearer {token}"}), 401, "unauthorized")


async def test_a_token_that_expires_works_until_then_and_is_401_after(gateway: Gateway, municipality: str) -> None:
    with session_scope(gateway.bus.engine) as session:
        lasting = tokens.issue(session, municipality, valid_for=timedelta(seconds=1), label="the intranet's sync")
    me = await gateway.client.get("/me", headers={"Authorization": f"Bearer {lasting}"})
    assert me.status_code == 200
    said = me.json()["token"]  # the token a developer is using, and when it stops working
    assert said["sha256"] == tokens.token_hash(lasting)[:12] and said["label"] == "the intranet's sync"
    assert datetime.fromisoformat(said["expires_at"]) - datetime.fromisoformat(said["created_at"]) == timedelta(seconds=1)
    assert datetime.fromisoformat(me.headers["collabbus-token-expires"]) == datetime.fromisoformat(said["expires_at"]).replace(microsecond=0)
    await asyncio.sleep(1.2)
    expired = problem(await gateway.client.get("/me", headers={"Authorization": f"Bearer {lasting}"}), 401, "unauthorized")
    assert expired["detail"].startswith("the token expired at ") and "collabbus institutions token" in expired["detail"]


async def test_every_answer_to_a_request_whose_token_expires_says_when(gateway: Gateway, municipality: str) -> None:
    """So that a client can warn in time: the answers say when (to the second, UTC), the refusals
    too; a token valid until revoked, nothing."""
    with session_scope(gateway.bus.engine) as session:
        expiring = tokens.issue(session, municipality, valid_for=timedelta(hours=1))
    auth = {"Authorization": f"Bearer {expiring}"}
    me = await gateway.client.get("/me", headers=auth)
    assert me.status_code == 200 and me.headers["collabbus-token-expires"].endswith("Z")
    expiry = datetime.fromisoformat(me.json()["token"]["expires_at"]).replace(microsecond=0)
    assert datetime.fromisoformat(me.headers["collabbus-token-expires"]) == expiry
    missing = await gateway.client.get(f"/projects/{unique('none')}", headers=auth)
    assert missing.status_code == 404 and datetime.fromisoformat(missing.headers["collabbus-token-expires"]) == expiry
    lasting = await gateway.client.get("/me", headers=gateway.auth(municipality))
    assert lasting.status_code == 200 and "collabbus-token-expires" not in lasting.headers


async def test_publishing_as_another_institution_or_a_type_your_kind_may_not_emit_is_403(gateway: Gateway, municipality: str) -> None:
    other = await gateway.join("ngo")
    body = problem(await gateway.post(municipality, envelope("project.registered", other, project(other))), 403, "forbidden")
    assert [e["type"] for e in body["errors"]] == ["source_mismatch"] and body["errors"][0]["loc"] == ["source"]

    joined = {"id": unique("x"), "name": {"en": "x"}, "kind": "ngo", "country": "FI"}
    body = problem(await gateway.post(municipality, envelope("institution.joined", municipality, joined)), 403, "forbidden")
    assert [e["type"] for e in body["errors"]] == ["kind_may_not_emit"]


async def test_an_invalid_event_is_422_with_every_error_listed(gateway: Gateway, municipality: str) -> None:
    data = project(municipality, status="bogus")
    del data["title"]
    event = envelope("project.registered", municipality, data, id="not a valid id!")
    body = problem(await gateway.post(municipality, event), 422, "invalid")
    locs = {tuple(error["loc"]) for error in body["errors"]}
    assert {("id",), ("data", "title"), ("data", "status")} <= locs
    assert all(error["msg"] and error["type"] for error in body["errors"])
    (bad_id,) = (error for error in body["errors"] if error["loc"] == ["id"])  # the pattern in words
    assert bad_id["msg"] == "Input should be an id of 1 to 128 letters (A-Z, a-z), digits, '.', '_', ':' and '-' (no spaces)"


async def test_too_large_bodies_are_413_also_when_streamed(gateway: Gateway, municipality: str) -> None:
    limit = gateway.bus.settings.max_event_bytes
    data = project(municipality, summary={"en": "x" * limit})
    problem(await gateway.post(municipality, envelope("project.registered", municipality, data)), 413, "too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the input limit applies while reading
        for _ in range(INPUT_FACTOR * limit // 4096 + 2):
            yield b" " * 4096

    headers = {**gateway.auth(municipality), "content-type": "application/cloudevents+json"}
    refused = problem(await gateway.client.post("/events", content=chunks(), headers=headers), 413, "too_large")
    # It names the event's limit, not only the input limit it ran into.
    assert refused["detail"] == f"the body is over {INPUT_FACTOR * limit} bytes, {INPUT_FACTOR} times an event's limit of {limit} bytes: not read"


async def test_a_wrong_path_or_method_is_a_problem_saying_what_was_asked(gateway: Gateway, municipality: str) -> None:
    auth = gateway.auth(municipality)
    missing = problem(await gateway.client.get("/project", headers=auth), 404, "not_found")
    assert missing["detail"] == "no resource at /project; the API is described at /docs (and /openapi.json)"
    refused = await gateway.client.delete("/projects/p-1", headers=auth)
    assert problem(refused, 405, "method_not_allowed")["detail"] == "DELETE is not allowed on /projects/p-1; allowed: GET"
    assert refused.headers["allow"] == "GET"
    # A path served by two routes (GET and POST /events) names both's methods.
    both = await gateway.client.put("/events", headers=auth)
    assert problem(both, 405, "method_not_allowed")["detail"] == "PUT is not allowed on /events; allowed: GET, POST"
    assert both.headers["allow"] == "GET, POST"
    hooks = await gateway.client.put("/webhooks", headers=auth)
    assert hooks.status_code == 405 and hooks.headers["allow"] == "GET, POST"


async def test_a_gzipped_body_is_inflated_within_the_limits(gateway: Gateway, municipality: str) -> None:
    auth = gateway.auth(municipality)
    structured = {**auth, "content-type": "application/cloudevents+json", "content-encoding": "gzip"}
    event = envelope("project.registered", municipality, project(municipality, title={"fi": "Kävelykeskusta"}))
    accepted = await gateway.client.post("/events", content=gzip.compress(orjson.dumps(event)), headers=structured)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["id"] == event["id"] and accepted.json()["duplicate"] is False

    batch = [envelope("project.registered", municipality, project(municipality)) for _ in range(3)]
    batched = await gateway.client.post("/events", content=gzip.compress(orjson.dumps(batch)),
                                        headers={**structured, "content-type": "application/cloudevents-batch+json"})
    assert [v["id"] for v in batched.json() if v["status"] == "accepted"] == [e["id"] for e in batch]

    # A small body that inflates past the limit is refused as it inflates (the limit is on the events).
    limit = gateway.bus.settings.max_event_bytes
    bomb = envelope("project.registered", municipality, project(municipality, summary={"en": "x" * (INPUT_FACTOR * limit)}))
    packed = gzip.compress(orjson.dumps(bomb))
    assert len(packed) < limit // 10
    problem(await gateway.client.post("/events", content=packed, headers=structured), 413, "too_large")

    for broken in (b"not gzip at all", gzip.compress(orjson.dumps(event))[:-12], gzip.compress(b"{}") + b"trailing"):
        detail = problem(await gateway.client.post("/events", content=broken, headers=structured), 400, "malformed")["detail"]
        assert "not valid gzip" in detail
    refused = await gateway.client.post("/events", content=b"x", headers={**structured, "content-encoding": "br"})
    assert "Content-Encoding 'br'" in problem(refused, 415, "unsupported")["detail"]
    assert refused.headers["accept-encoding"] == "gzip"
    plain = await gateway.client.post("/events", content=orjson.dumps(envelope("project.registered", municipality, project(municipality))),
                                      headers={**structured, "content-encoding": "identity"})
    assert plain.status_code == 202, plain.text


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/cloudevents+xml", None])
async def test_unsupported_content_types_are_415(gateway: Gateway, municipality: str, content_type: str | None) -> None:
    headers = gateway.auth(municipality)
    if content_type:
        headers["content-type"] = content_type
    detail = problem(await gateway.client.post("/events", content=b"<event/>", headers=headers), 415, "unsupported")["detail"]
    if content_type is None:  # said as what is missing, not as a media type refused
        assert detail.startswith("the request has no Content-Type; send application/cloudevents+json,"), detail
    else:
        assert detail.startswith(f"{content_type} is not "), detail


async def test_over_the_rate_limit_is_429_with_retry_after(gateway: Gateway, municipality: str) -> None:
    limited = HttpGateway(gateway.bus, "127.0.0.1", 0, rate_limiter=RateLimiter(rate=0.5, burst=2, clock=lambda: 0.0))
    await limited.start()
    try:
        async with httpx.AsyncClient(base_url=limited.url) as client:
            auth = {**gateway.auth(municipality), "content-type": "application/cloudevents+json"}
            for _ in range(2):
                event = envelope("project.registered", municipality, project(municipality))
                assert (await client.post("/events", content=orjson.dumps(event), headers=auth)).status_code == 202
            event = envelope("project.registered", municipality, project(municipality))
            response = await client.post("/events", content=orjson.dumps(event), headers=auth)
            problem(response, 429, "rate_limited")
            assert int(response.headers["retry-after"]) == 2  # one token at 0.5/s
            other = await gateway.join("ngo")  # the limit is per institution
            event = envelope("project.registered", other, project(other))
            headers = {**gateway.auth(other), "content-type": "application/cloudevents+json"}
            assert (await client.post("/events", content=orjson.dumps(event), headers=headers)).status_code == 202
    finally:
        await limited.stop()


# --- reading -------------------------------------------------------------------------------------


async def test_a_whole_number_sent_as_a_float_is_accepted_as_the_integer(gateway: Gateway, municipality: str) -> None:
    """What JSON Schema's ``integer`` allows (3.0) passes the gate and reads back as 3; 3.5 does not."""
    accepted = project(municipality, sdgs=[3.0, 11])
    response = await gateway.post(municipality, envelope("project.registered", municipality, accepted))
    assert response.status_code == 202, response.text
    refused = await gateway.post(municipality, envelope("project.registered", municipality, project(municipality, sdgs=[3.5])))
    assert [e["loc"] for e in problem(refused, 422, "invalid")["errors"]] == [["data", "sdgs", 0]]
    await gateway.settle()
    found = await gateway.client.get(f"/projects/{accepted['project_id']}", headers=gateway.auth(municipality))
    assert found.status_code == 200 and found.json()["sdgs"] == [3, 11]


async def test_paging_walks_a_list_without_gaps_or_duplicates(gateway: Gateway) -> None:
    owner = await gateway.join("ngo")
    ids = [f"{owner}-{n:02d}" for n in range(7)]
    for n, project_id in enumerate(reversed(ids)):
        themes = ["education.literacy"] if n % 2 else ["health_care.elderly_care"]
        await gateway.offer(owner, "project.registered", project(owner, project_id, themes=themes))
    await gateway.settle()
    auth = gateway.auth(owner)

    pages = await walk(gateway.client, "/projects", auth, owner=owner, limit=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    assert [item["project_id"] for page in pages for item in page] == ids

    pages = await walk(gateway.client, "/projects", auth, owner=owner, theme="health_care", limit=2)
    assert [item["project_id"] for page in pages for item in page] == [ids[0], ids[2], ids[4], ids[6]]
    assert all(len(page) == 2 for page in pages)

    for cursor in ("bm90LWEtY3Vyc29y", encode([5]), encode(["a", "b"])):  # not ours, a number for an id, too long
        problem(await gateway.client.get("/projects", params={"cursor": cursor}, headers=auth), 400, "bad_cursor")
    problem(await gateway.client.get("/projects", params={"limit": 0}, headers=auth), 422, "invalid")
    problem(await gateway.client.get(f"/projects/{owner}-nope", headers=auth), 404, "not_found")
    typo = problem(await gateway.client.get(f"/projects/{ids[3]}x", headers=auth), 404, "not_found")  # answered with the one meant
    assert typo["detail"] == f"no project '{ids[3]}x'; did you mean {ids[3]!r}?"
    short = problem(await gateway.client.get(f"/projects/{owner}-0", headers=auth), 404, "not_found")  # as near to all seven
    assert short["detail"] == f"no project '{owner}-0'; did you mean {ids[0]!r}?"  # the first by id, on either database


async def test_calls_are_filtered_by_status_and_eligibility(gateway: Gateway, municipality: str) -> None:
    funder = await gateway.join("funder", "SE")
    now = datetime.now(timezone.utc)

    def call(kinds: list[str], countries: list[str]) -> dict[str, Any]:
        return {
            "call_id": unique("c"), "title": {"en": "Social inclusion pilots"}, "kind": "funding",
            "themes": ["economy.disadvantaged_groups"], "eligible_kinds": kinds, "eligible_countries": countries,
            "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat(),
            "deadline_model": "single_stage",
        }

    for_municipalities, for_ngos, for_all = call(["municipality"], ["TR"]), call(["ngo"], []), call([], [])
    for data in (for_municipalities, for_ngos, for_all):
        await gateway.offer(funder, "call.published", data)
    await gateway.settle()
    auth = gateway.auth(municipality)
    pages = await walk(gateway.client, "/calls", auth, status="open", eligible_kind="municipality", country="TR", theme="economy")
    found = {item["call_id"] for page in pages for item in page}
    assert for_municipalities["call_id"] in found and for_all["call_id"] in found and for_ngos["call_id"] not in found
    response = await gateway.client.get(f"/calls/{for_ngos['call_id']}", headers=auth)
    assert response.json()["status"] == "open" and response.json()["eligible_kinds"] == ["ngo"]
    typo = problem(await gateway.client.get(f"/calls/{for_ngos['call_id']}x", headers=auth), 404, "not_found")
    assert typo["detail"] == f"no call '{for_ngos['call_id']}x'; did you mean {for_ngos['call_id']!r}?"

    # By deadline: the offset written as a developer writes it, also with its `+` left bare in the URL.
    soon = {**call([], []), "deadline": (now + timedelta(days=3)).isoformat()}
    await gateway.offer(funder, "call.published", soon)
    await gateway.settle()
    week = (now + timedelta(days=7)).astimezone(timezone(timedelta(hours=3))).replace(microsecond=0)
    for written in (week.isoformat(), week.isoformat().replace("+", " ")):  # the latter: what a bare `+` arrives as
        pages = await walk(gateway.client, "/calls", auth, deadline_before=written)
        found = {item["call_id"] for page in pages for item in page}
        assert soon["call_id"] in found and for_all["call_id"] not in found, written
    # No offset: which moment is meant cannot be told; and what is no time at all is told the same (not "datetime or date").
    for unclear in ("2026-12-05T10:00:00", "2026-12-05", "notadate"):
        said = problem(await gateway.client.get("/calls", params={"deadline_before": unclear}, headers=auth), 422, "invalid")
        assert [(e["loc"], e["msg"]) for e in said["errors"]] == [(["query", "deadline_before"], (
            "Input should be a time with its UTC offset, such as 2027-01-20T00:00:00Z or 2027-01-20T12:00:00+02:00"))], said
    # A moment that is no date in UTC, where it is compared (it answered 500).
    for extreme in ("9999-12-31T23:59:59-14:00", "0001-01-01T00:00:00+14:00"):
        said = problem(await gateway.client.get("/calls", params={"deadline_before": extreme}, headers=auth), 422, "invalid")
        assert said["errors"][0]["msg"].endswith("in UTC, this one is not a day or more inside the years 1 to 9999"), said
    # A funder's own calls; a country or theme that is none is told so, as in an event (it answered an empty page).
    theirs = await walk(gateway.client, "/calls", auth, owner=funder)
    assert {item["call_id"] for page in theirs for item in page} == {c["call_id"] for c in (for_municipalities, for_ngos, for_all, soon)}
    assert await walk(gateway.client, "/calls", auth, owner=municipality) == [[]]
    for params, loc, meant in ((({"country": "XX"}), "country", "'XX' is not an assigned ISO 3166-1 alpha-2 country code"),
                              (({"theme": "econmy"}), "theme", "did you mean 'economy'?"),
                              (({"theme": "econmy"}), "theme", "unknown theme code 'econmy'")):
        for path in ("/calls", "/projects", "/institutions"):
            refused = problem(await gateway.client.get(path, params=params, headers=auth), 422, "invalid")
            assert [e["loc"] for e in refused["errors"]] == [["query", loc]] and meant in refused["errors"][0]["msg"], (path, refused)
            assert not refused["errors"][0]["msg"].startswith("Value error"), refused  # (pydantic's words for a check's)
    lower = await walk(gateway.client, "/calls", auth, country="tr", eligible_kind="municipality")  # either case, as before
    assert for_municipalities["call_id"] in {item["call_id"] for page in lower for item in page}


async def test_a_two_stage_call_says_which_stage_it_is_in(gateway: Gateway, municipality: str) -> None:
    """Past its deadline a two-stage call is closed to applications, and an invited applicant
    read it closed while it still took its full proposal."""
    funder = await gateway.join("funder", "SE")
    now = datetime.now(timezone.utc)
    two_stage, single = unique("c"), await open_funding_call(gateway, funder)
    await gateway.offer(funder, "call.published", {
        "call_id": two_stage, "title": {"en": "Care at home"}, "kind": "funding", "deadline_model": "two_stage",
        "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(seconds=2)).isoformat(),
        "full_proposal_deadline": (now + timedelta(days=30)).isoformat()})
    await gateway.settle()

    async def read(call_id: str) -> tuple[str, str | None]:
        answer = (await gateway.client.get(f"/calls/{call_id}", headers=gateway.auth(municipality))).json()
        return answer["status"], answer["stage"]

    assert await read(two_stage) == ("open", "first") and await read(single) == ("open", None)
    await asyncio.sleep(max(0.0, (now + timedelta(seconds=2.2) - datetime.now(timezone.utc)).total_seconds()))
    assert await read(two_stage) == ("closed", "second")
    pages = await walk(gateway.client, "/calls", gateway.auth(municipality), owner=funder)
    assert {item["call_id"]: item["stage"] for page in pages for item in page} == {two_stage: "second", single: None}
    await gateway.offer(funder, "call.closed", {"call_id": two_stage, "reason": "filled"})
    await gateway.settle()
    assert await read(two_stage) == ("closed", "ended")


async def test_calls_are_filtered_by_their_kind(gateway: Gateway, municipality: str) -> None:
    """A cooperative looking for a tender, a municipality for funding: the kind of call is what
    they look for first."""
    funder = await gateway.join("funder", "SE")
    now = datetime.now(timezone.utc)
    published: dict[str, str] = {}
    for kind in ("funding", "tender", "training"):
        published[kind] = unique("c")
        await gateway.offer(funder, "call.published", {
            "call_id": published[kind], "title": {"en": f"A {kind}"}, "kind": kind, "deadline_model": "single_stage",
            "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat()})
    await gateway.settle()
    auth = gateway.auth(municipality)
    for kind, call_id in published.items():
        pages = await walk(gateway.client, "/calls", auth, kind=kind, owner=funder, limit=1)
        assert [(item["call_id"], item["kind"]) for page in pages for item in page] == [(call_id, kind)]
    pages = await walk(gateway.client, "/calls", auth, kind="tender", status="open")
    assert published["tender"] in {item["call_id"] for page in pages for item in page}
    assert all(item["kind"] == "tender" for page in pages for item in page)
    refused = problem(await gateway.client.get("/calls", params={"kind": "grant"}, headers=auth), 422, "invalid")
    assert [e["loc"] for e in refused["errors"]] == [["query", "kind"]], refused


async def test_applications_to_a_call_are_shown_to_its_parties_only(gateway: Gateway, municipality: str) -> None:
    funder, partner = await gateway.join("funder", "SE"), await gateway.join("ngo")
    competitor, outsider = await gateway.join("ngo"), await gateway.join("university")
    now = datetime.now(timezone.utc)
    call_id = unique("c")
    await gateway.offer(funder, "call.published", {
        "call_id": call_id, "title": {"en": "Social inclusion pilots"}, "kind": "funding",
        "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat(),
        "deadline_model": "single_stage",
    })
    ours = {"call_id": call_id, "application_id": unique("a"), "partners": [partner], "requested_amount": {"amount": "90000", "currency": "EUR"}}
    theirs = {"call_id": call_id, "application_id": unique("a"), "requested_amount": {"amount": "60000", "currency": "EUR"}}
    submitted = await gateway.offer(municipality, "call.application_submitted", ours)
    await gateway.offer(competitor, "call.application_submitted", theirs)
    await gateway.settle()

    async def seen_by(institution: str) -> list[tuple[str, str]]:
        found = await gateway.client.get("/events", params={"type": "call", "subject": call_id}, headers=gateway.auth(institution))
        assert found.status_code == 200, found.text
        return sorted((item["event"]["type"], item["event"]["data"].get("application_id", "")) for item in found.json()["items"])

    def answered(*applications: dict[str, Any]) -> list[tuple[str, str]]:
        ids = [a["application_id"] for a in applications]
        return sorted([("call.published", ""), *((t, i) for i in ids for t in ("call.application_submitted", "call.application_received"))])

    assert await seen_by(funder) == answered(ours, theirs)  # the call's publisher sees every application
    assert await seen_by(municipality) == answered(ours) == await seen_by(partner)  # the applicant and its partners
    assert await seen_by(competitor) == answered(theirs)
    assert await seen_by(outsider) == answered()
    hidden = await gateway.client.get(f"/events/{submitted['id']}", headers=gateway.auth(competitor))
    assert hidden.status_code == 404
    shown = await gateway.client.get(f"/events/{submitted['id']}", headers=gateway.auth(partner))
    assert shown.status_code == 200 and shown.json()["event"]["data"]["requested_amount"]["amount"] == "90000"


async def open_funding_call(gateway: Gateway, funder: str, *, two_stage: bool = False) -> str:
    """A funding call open for a month with a budget in euros (``two_stage``: with full proposals
    due a month later); returns its id."""
    now = datetime.now(timezone.utc)
    call_id = unique("c")
    second = {"deadline_model": "two_stage", "full_proposal_deadline": (now + timedelta(days=60)).isoformat()}
    await gateway.offer(funder, "call.published", {
        "call_id": call_id, "title": {"en": "Care at home"}, "kind": "funding",
        "budget": {"amount": "500000", "currency": "EUR"},
        "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat(),
        "deadline_model": "single_stage", **(second if two_stage else {}),
    })
    return call_id


async def test_a_calls_applications_are_listed_for_its_publisher_and_each_applicant_sees_its_own(
    gateway: Gateway, municipality: str
) -> None:
    funder, partner = await gateway.join("funder", "SE"), await gateway.join("ngo")
    competitor, late = await gateway.join("ngo"), await gateway.join("university")
    outsider = await gateway.join("university")
    call_id = await open_funding_call(gateway, funder)
    practice = project(municipality)
    await gateway.offer(municipality, "project.registered", practice)
    ours = {"call_id": call_id, "application_id": unique("a"), "partners": [partner], "project_id": practice["project_id"],
            "requested_amount": {"amount": "90000", "currency": "EUR"}}
    theirs = {"call_id": call_id, "application_id": unique("a"), "requested_amount": {"amount": "60000", "currency": "EUR"}}
    refused = {"call_id": call_id, "application_id": unique("a"), "requested_amount": {"amount": "1000", "currency": "SEK"}}
    for institution, data in ((municipality, ours), (competitor, theirs), (late, refused)):
        await gateway.offer(institution, "call.application_submitted", data)
    await gateway.settle()
    path = f"/calls/{call_id}/applications"

    async def listed(institution: str, **params: Any) -> list[tuple[str, str]]:
        pages = await walk(gateway.client, path, gateway.auth(institution), limit=1, **params)
        return [(item["application_id"], item["status"]) for page in pages for item in page]

    # The publisher sees every application, in the order they were answered, one page at a time.
    assert await listed(funder) == [(ours["application_id"], "received"), (theirs["application_id"], "received"),
                                    (refused["application_id"], "rejected")]
    assert await listed(funder, status="rejected") == [(refused["application_id"], "rejected")]
    assert await listed(funder, applicant=competitor) == [(theirs["application_id"], "received")]
    assert await listed(funder, project_id=practice["project_id"]) == [(ours["application_id"], "received")]
    # Anyone else: what it applied for or is a partner in, nothing of the competitors'.
    assert await listed(municipality) == [(ours["application_id"], "received")] == await listed(partner)
    assert await listed(competitor) == [(theirs["application_id"], "received")]
    assert await listed(late) == [(refused["application_id"], "rejected")]
    assert await listed(outsider) == []
    # Across calls, each sees the applications it is a party to.
    mine = await walk(gateway.client, "/applications", gateway.auth(funder), limit=2)
    assert [(item["call_id"], item["application_id"]) for page in mine for item in page] == [
        (call_id, a["application_id"]) for a in (ours, theirs, refused)]
    for institution, expected in ((partner, [ours]), (competitor, [theirs]), (outsider, [])):
        pages = await walk(gateway.client, "/applications", gateway.auth(institution))
        assert [item["application_id"] for page in pages for item in page] == [a["application_id"] for a in expected]
    pages = await walk(gateway.client, "/applications", gateway.auth(municipality))  # (it applies in other tests too)
    made = {item["application_id"] for page in pages for item in page}
    assert ours["application_id"] in made and not made & {theirs["application_id"], refused["application_id"]}
    filtered = await gateway.client.get("/applications", params={"status": "rejected", "call_id": call_id}, headers=gateway.auth(funder))
    assert [item["application_id"] for item in filtered.json()["items"]] == [refused["application_id"]]

    item = await gateway.client.get(f"{path}/{ours['application_id']}", headers=gateway.auth(partner))
    assert item.status_code == 200, item.text
    assert item.json()["applicant"] == municipality and item.json()["requested_amount"] == ours["requested_amount"]
    assert item.json()["partners"] == [partner]
    rejection = (await gateway.client.get(f"{path}/{refused['application_id']}", headers=gateway.auth(funder))).json()
    assert rejection["status"] == "rejected" and rejection["reason"]["code"] == "currency_mismatch"
    hidden = await gateway.client.get(f"{path}/{ours['application_id']}", headers=gateway.auth(competitor))
    assert "no application" in problem(hidden, 404, "not_found")["detail"]
    assert "no call" in problem(await gateway.client.get("/calls/c-none/applications", headers=gateway.auth(funder)),
                                404, "not_found")["detail"]
    problem(await gateway.client.get(path, params={"status": "pending"}, headers=gateway.auth(funder)), 422, "invalid")


async def test_a_calls_publisher_reads_how_many_applications_it_has_and_no_other_member_does(
    gateway: Gateway, municipality: str
) -> None:
    funder, competitor, outsider = await gateway.join("funder", "SE"), await gateway.join("ngo"), await gateway.join("university")
    call_id = await open_funding_call(gateway, funder)

    def applying(amount: str, currency: str = "EUR") -> dict[str, Any]:
        return {"call_id": call_id, "application_id": unique("a"), "requested_amount": {"amount": amount, "currency": currency}}

    ours, theirs, taken_back, refused = applying("90000"), applying("60000"), applying("1000"), applying("1000", "SEK")
    for institution, data in ((municipality, ours), (competitor, theirs), (competitor, taken_back), (outsider, refused)):
        await gateway.offer(institution, "call.application_submitted", data)
    await gateway.settle()
    await gateway.offer(competitor, "call.application_withdrawn", {"call_id": call_id, "application_id": taken_back["application_id"]})
    await gateway.offer(funder, "call.application_decided", {"call_id": call_id, "application_id": ours["application_id"],
                                                             "decision": "awarded",
                                                             "awarded_amount": {"amount": "80000.50", "currency": "EUR"}})
    await gateway.settle()
    counts = {"total": 4, "received": 1, "rejected": 1, "invited": 0, "proposal_sent": 0, "awarded": 1, "declined": 0,
              "withdrawn": 1, "lapsed": 0, "awarded_amount": {"amount": "80000.50", "currency": "EUR"}}
    for institution, expected in ((funder, counts), (municipality, None), (competitor, None), (outsider, None)):
        answer = await gateway.client.get(f"/calls/{call_id}", headers=gateway.auth(institution))
        assert answer.status_code == 200, answer.text
        assert answer.json()["applications"] == expected, institution
        pages = await walk(gateway.client, "/calls", gateway.auth(institution), owner=funder)
        assert [item["applications"] for page in pages for item in page if item["call_id"] == call_id] == [expected], institution
    # A call nobody applied to yet: none, said so to its publisher.
    quiet = await open_funding_call(gateway, funder)
    await gateway.settle()
    answer = (await gateway.client.get(f"/calls/{quiet}", headers=gateway.auth(funder))).json()
    assert answer["applications"] == {**dict.fromkeys(counts, 0), "awarded_amount": None}
    # A call without a budget: what it awarded, in the currency of its awards.
    now, unbudgeted = datetime.now(timezone.utc), unique("c")
    await gateway.offer(funder, "call.published", {
        "call_id": unbudgeted, "title": {"en": "Seed money"}, "kind": "funding", "deadline_model": "single_stage",
        "opens_at": (now - timedelta(days=1)).isoformat(), "deadline": (now + timedelta(days=30)).isoformat()})
    await gateway.settle()
    asked = {"call_id": unbudgeted, "application_id": unique("a"), "requested_amount": {"amount": "50000", "currency": "SEK"}}
    await gateway.offer(municipality, "call.application_submitted", asked)
    await gateway.settle()
    await gateway.offer(funder, "call.application_decided", {"call_id": unbudgeted, "application_id": asked["application_id"],
                                                             "decision": "awarded",
                                                             "awarded_amount": {"amount": "40000", "currency": "SEK"}})
    await gateway.settle()
    answer = (await gateway.client.get(f"/calls/{unbudgeted}", headers=gateway.auth(funder))).json()
    assert answer["applications"]["awarded"] == 1, answer
    assert answer["applications"]["awarded_amount"] == {"amount": "40000", "currency": "SEK"}, answer
    # A page of its calls, with and without a budget, says each one's in its own currency.
    pages = await walk(gateway.client, "/calls", gateway.auth(funder), owner=funder)
    awarded = {item["call_id"]: item["applications"]["awarded_amount"] for page in pages for item in page}
    assert awarded == {call_id: counts["awarded_amount"], quiet: None, unbudgeted: {"amount": "40000", "currency": "SEK"}}


async def test_a_publishers_decisions_and_a_withdrawal_are_seen_by_each_applications_parties_only(
    gateway: Gateway, municipality: str
) -> None:
    funder, partner = await gateway.join("funder", "SE"), await gateway.join("ngo")
    competitor, outsider = await gateway.join("ngo"), await gateway.join("university")
    call_id = await open_funding_call(gateway, funder)
    ours = {"call_id": call_id, "application_id": unique("a"), "partners": [partner], "requested_amount": {"amount": "90000", "currency": "EUR"}}
    theirs = {"call_id": call_id, "application_id": unique("a"), "requested_amount": {"amount": "60000", "currency": "EUR"}}
    await gateway.offer(municipality, "call.application_submitted", ours)
    await gateway.offer(competitor, "call.application_submitted", theirs)
    await gateway.settle()
    award = await gateway.offer(funder, "call.application_decided", {
        "call_id": call_id, "application_id": ours["application_id"], "decision": "awarded",
        "awarded_amount": {"amount": "75000", "currency": "EUR"}, "comment": {"en": "Funded for 18 months"},
    })
    await gateway.offer(competitor, "call.application_withdrawn", {"call_id": call_id, "application_id": theirs["application_id"],
                                                                    "reason": {"en": "Our partner left"}})
    snooping = await gateway.offer(outsider, "call.application_withdrawn", {"call_id": call_id, "application_id": ours["application_id"]})
    await gateway.settle()

    path = f"/calls/{call_id}/applications"
    listed = await gateway.client.get(path, headers=gateway.auth(funder))
    assert [(item["application_id"], item["status"]) for item in listed.json()["items"]] == [
        (ours["application_id"], "awarded"), (theirs["application_id"], "withdrawn")]
    item = (await gateway.client.get(f"{path}/{ours['application_id']}", headers=gateway.auth(partner))).json()
    assert item["awarded_amount"] == {"amount": "75000", "currency": "EUR"} and item["comment"] == {"en": "Funded for 18 months"}
    assert item["decided_at"] is not None and item["requested_amount"] == ours["requested_amount"]
    assert item["withdrawal_reason"] is None  # (an award has none)
    taken_back = (await gateway.client.get(f"{path}/{theirs['application_id']}", headers=gateway.auth(funder))).json()
    assert taken_back["status"] == "withdrawn" and taken_back["withdrawal_reason"] == {"en": "Our partner left"}
    awarded = await gateway.client.get(path, params={"status": "awarded"}, headers=gateway.auth(competitor))
    assert awarded.json()["items"] == []  # a competitor learns nothing of the award
    for shown in ((await gateway.client.get(f"/calls/{call_id}", headers=gateway.auth(competitor))).json(),
                  *(await gateway.client.get("/calls", headers=gateway.auth(competitor))).json()["items"]):
        assert "awarded" not in shown and "75000" not in orjson.dumps(shown).decode()  # nor does the call say what it awarded

    async def seen_by(institution: str) -> list[tuple[str, str]]:
        found = await gateway.client.get("/events", params={"type": "call", "subject": call_id}, headers=gateway.auth(institution))
        assert found.status_code == 200, found.text
        return sorted((item["event"]["type"], item["event"]["data"].get("reason", {}).get("code", "")) for item in found.json()["items"]
                      if item["event"]["type"] in ("call.application_decided", "call.application_withdrawn", "call.action_rejected"))

    decision, withdrawal = ("call.application_decided", ""), ("call.application_withdrawn", "")
    refusal = ("call.action_rejected", "unknown_application")
    assert await seen_by(funder) == sorted([decision, withdrawal, withdrawal, refusal])
    assert await seen_by(municipality) == [decision] == await seen_by(partner)  # not the outsider's try, nor its refusal
    assert await seen_by(competitor) == [withdrawal]
    assert await seen_by(outsider) == sorted([withdrawal, refusal])  # what it said, and the answer to it
    hidden = await gateway.client.get(f"/events/{award['id']}", headers=gateway.auth(competitor))
    assert hidden.status_code == 404
    assert (await gateway.client.get(f"/events/{snooping['id']}", headers=gateway.auth(outsider))).status_code == 200
    assert (await gateway.client.get(f"/events/{snooping['id']}", headers=gateway.auth(municipality))).status_code == 404


async def test_a_two_stage_calls_invitation_and_full_proposal_are_seen_by_the_applications_parties_only(
    gateway: Gateway, municipality: str
) -> None:
    funder, partner, competitor = await gateway.join("funder", "SE"), await gateway.join("ngo"), await gateway.join("ngo")
    call_id = await open_funding_call(gateway, funder, two_stage=True)
    ours = {"call_id": call_id, "application_id": unique("a"), "partners": [partner], "requested_amount": {"amount": "90000", "currency": "EUR"}}
    await gateway.offer(municipality, "call.application_submitted", ours)
    await gateway.settle()
    await gateway.offer(funder, "call.application_decided", {"call_id": call_id, "application_id": ours["application_id"],
                                                             "decision": "invited", "comment": {"en": "Please detail the budget"}})
    await gateway.settle()
    proposal = await gateway.offer(municipality, "call.full_proposal_submitted", {
        "call_id": call_id, "application_id": ours["application_id"], "summary": {"fi": "Kotihoito kolmessa kunnassa"},
        "requested_amount": {"amount": "85000", "currency": "EUR"}, "url": "https://example.org/full-proposal.pdf"})
    await gateway.settle()

    call = (await gateway.client.get(f"/calls/{call_id}", headers=gateway.auth(competitor))).json()
    assert call["deadline_model"] == "two_stage" and call["full_proposal_deadline"] is not None
    item = (await gateway.client.get(f"/calls/{call_id}/applications/{ours['application_id']}", headers=gateway.auth(partner))).json()
    assert item["status"] == "proposal_sent" and item["invited_at"] is not None and item["full_proposal_at"] is not None
    assert item["invitation_comment"] == {"en": "Please detail the budget"}
    assert item["full_proposal"] == {"summary": {"fi": "Kotihoito kolmessa kunnassa"},
                                     "requested_amount": {"amount": "85000", "currency": "EUR"}, "url": "https://example.org/full-proposal.pdf"}
    assert item["requested_amount"] == ours["requested_amount"]
    for party in (funder, municipality, partner):
        assert (await gateway.client.get(f"/events/{proposal['id']}", headers=gateway.auth(party))).status_code == 200
    assert (await gateway.client.get(f"/events/{proposal['id']}", headers=gateway.auth(competitor))).status_code == 404
    listed = await gateway.client.get("/applications", params={"status": "proposal_sent"}, headers=gateway.auth(partner))
    assert [entry["application_id"] for entry in listed.json()["items"]] == [ours["application_id"]]


async def test_an_invitation_that_lapses_is_seen_lapsed_by_the_applications_parties_only(gateway: Gateway, municipality: str) -> None:
    funder, partner, competitor = await gateway.join("funder", "SE"), await gateway.join("ngo"), await gateway.join("ngo")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    call_id, application_id = unique("c"), unique("a")
    due = now + timedelta(seconds=5)  # the bus's own timer lapses the invitation once this has passed
    await gateway.offer(funder, "call.published", {
        "call_id": call_id, "title": {"en": "Care at home"}, "kind": "funding", "opens_at": (now - timedelta(days=1)).isoformat(),
        "deadline": (now + timedelta(seconds=3)).isoformat(), "deadline_model": "two_stage", "full_proposal_deadline": due.isoformat(),
    })
    await gateway.offer(municipality, "call.application_submitted", {"call_id": call_id, "application_id": application_id, "partners": [partner]})
    await gateway.settle()
    await gateway.offer(funder, "call.application_decided", {"call_id": call_id, "application_id": application_id, "decision": "invited"})
    path = f"/calls/{call_id}/applications/{application_id}"
    deadline = asyncio.get_running_loop().time() + 30
    while (item := (await gateway.client.get(path, headers=gateway.auth(partner))).json())["status"] != "lapsed":
        assert asyncio.get_running_loop().time() < deadline, item
        await asyncio.sleep(0.2)
    assert datetime.fromisoformat(item["decided_at"]) == due and item["invited_at"] is not None and item["full_proposal"] is None
    await gateway.settle()

    async def lapses_seen(institution: str) -> list[dict[str, Any]]:
        found = await gateway.client.get("/events", params={"type": "call.application_lapsed", "subject": call_id},
                                         headers=gateway.auth(institution))
        return [item["event"] for item in found.json()["items"]]

    for party in (funder, municipality, partner):
        [lapse] = await lapses_seen(party)
        assert lapse["source"] == f"/institutions/{funder}" and lapse["data"]["application_id"] == application_id
    assert await lapses_seen(competitor) == []
    listed = await gateway.client.get("/applications", params={"status": "lapsed"}, headers=gateway.auth(municipality))
    assert [entry["application_id"] for entry in listed.json()["items"]] == [application_id]


async def test_a_token_cannot_read_confidential_reviews_of_others(gateway: Gateway, municipality: str) -> None:
    coordinator = await gateway.join("competence_centre")
    first = await gateway.join("university")
    second = await gateway.join("university")
    outsider = await gateway.join("university")
    practice = project(municipality)
    await gateway.offer(municipality, "project.registered", practice)
    validation_id = unique("v")
    await gateway.offer(municipality, "validation.requested", {
        "validation_id": validation_id, "project_id": practice["project_id"], "coordinator": coordinator, "quorum": 2,
        "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2, "statement": {"en": "we think it works"}},
    })
    soon = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(seconds=2)  # due dates may not be past already
    for reviewer, due_by in ((first, "2099-01-01T00:00:00Z"), (second, soon.isoformat().replace("+00:00", "Z"))):
        await gateway.offer(coordinator, "validation.reviewer_assigned",
                            {"validation_id": validation_id, "reviewer": reviewer, "due_by": due_by})
    scores = {c: 4 for c in ("novelty", "effectiveness", "user_involvement", "transferability", "sustainability", "equity")}
    review = {"validation_id": validation_id, "scores": scores, "evidence_level": 3, "recommendation": "validate",
              "comments": {"fi": "Vahva näyttö."}}
    submitted = await gateway.offer(first, "validation.review_submitted", review)
    await gateway.settle()

    async def seen_by(institution: str) -> tuple[list[str] | None, int]:
        auth = gateway.auth(institution)
        view = (await gateway.client.get(f"/validations/{validation_id}", headers=auth)).json()
        logged = await gateway.client.get("/events", params={"type": "validation.review_submitted", "subject": validation_id}, headers=auth)
        reviews = [r["reviewer"] for r in view["reviews"]] if "reviews" in view else None
        return reviews, len(logged.json()["items"])

    assert await seen_by(outsider) == (None, 0)
    hidden = await gateway.client.get(f"/events/{submitted['id']}", headers=gateway.auth(outsider))
    assert hidden.status_code == 404  # a confidential review is not there for those who may not see it
    shown = await gateway.client.get(f"/events/{submitted['id']}", headers=gateway.auth(municipality))
    assert shown.status_code == 200 and shown.json()["event"]["data"]["comments"] == review["comments"]
    intruder = await gateway.join("university")
    intruding = await gateway.offer(intruder, "validation.review_submitted", review)  # not assigned: refused
    await gateway.settle()

    async def refusals(who: str) -> list[str]:
        found = await gateway.client.get("/events", params={"type": "validation.action_rejected", "subject": validation_id},
                                         headers=gateway.auth(who))
        return [item["event"]["data"]["rejected_event_id"] for item in found.json()["items"]]

    for who in (intruder, coordinator, second):  # whom it refused and the parties see it; nobody else
        assert await refusals(who) == [intruding["id"]], who
    assert await refusals(outsider) == []
    refused = (await gateway.client.get(f"/events/{intruding['id']}", headers=gateway.auth(coordinator))).json()
    assert refused["outcome"] == "refused" and refused["refusal"]["event"]["data"]["reason"]["code"] == "not_assigned"
    assert await seen_by(second) == ([], 0)  # an assigned reviewer sees only their own
    undecided = await walk(gateway.client, "/validations", gateway.auth(outsider), coordinator=coordinator)
    assert [(v["validation_id"], v["status"], v["median_scores"]) for page in undecided for v in page] == [
        (validation_id, "in_review", {})]
    await asyncio.sleep(max(0.0, (soon - datetime.now(timezone.utc)).total_seconds()) + 0.1)  # the second is late now
    for who, expected in ((second, [validation_id]), (outsider, [])):  # a reviewer's own assignments
        mine = await walk(gateway.client, "/validations", gateway.auth(who), reviewer=who)
        assert [v["validation_id"] for page in mine for v in page] == expected
    worklist = await walk(gateway.client, "/validations", gateway.auth(second), reviewer=second)
    assert worklist[0][0]["assignment"] == {"due_by": soon.isoformat().replace("+00:00", "Z"), "reviewed": False, "overdue": True}
    others = await walk(gateway.client, "/validations", gateway.auth(outsider), reviewer=second)
    assert others[0][0]["assignment"] is None  # another's work list shows no progress

    async def late(who: str, **filters: str) -> list[str]:
        pages = await walk(gateway.client, "/validations", gateway.auth(who), overdue="true", **filters)
        return [v["validation_id"] for page in pages for v in page]

    assert await late(coordinator, coordinator=coordinator) == [validation_id]  # the coordinator's list to chase
    chase = await walk(gateway.client, "/validations", gateway.auth(coordinator), coordinator=coordinator, overdue="true")
    assert chase[0][0]["late_reviewers"] == [{"reviewer": second, "due_by": soon.isoformat().replace("+00:00", "Z")}]
    for who, filters in ((outsider, {"coordinator": coordinator}), (coordinator, {"coordinator": coordinator, "overdue": "false"})):
        listed = await walk(gateway.client, "/validations", gateway.auth(who), **filters)
        assert all(item["late_reviewers"] is None for page in listed for item in page), (who, listed)

    async def named_late(who: str) -> list[str]:
        found = await gateway.client.get("/events", params={"type": "validation.review_overdue", "subject": validation_id},
                                         headers=gateway.auth(who))
        return [item["event"]["data"]["reviewer"] for item in found.json()["items"]]

    deadline = asyncio.get_running_loop().time() + 30  # the bus's own timer names the late reviewer, once
    while await named_late(coordinator) != [second]:
        assert asyncio.get_running_loop().time() < deadline, "nobody named the late reviewer"
        await asyncio.sleep(0.2)
    for party in (municipality, first, second):  # the validation's parties; not the outsider
        assert await named_late(party) == [second], party
    assert await named_late(outsider) == []
    assert await late(second, reviewer=second) == [validation_id] and await late(first, reviewer=first) == []
    on_time = await walk(gateway.client, "/validations", gateway.auth(first), reviewer=first, overdue="false")
    assert [v["validation_id"] for page in on_time for v in page] == [validation_id]
    nosy = problem(await gateway.client.get("/validations", params={"overdue": "true", "reviewer": second},
                                            headers=gateway.auth(outsider)), 422, "invalid")
    assert nosy["errors"] == [{"loc": ["overdue"], "msg": "needs reviewer, coordinator or requester naming you",
                               "type": "party_required"}]
    detail = (await gateway.client.get(f"/validations/{validation_id}", headers=gateway.auth(coordinator))).json()
    assert all(r["assigned_at"].endswith("Z") for r in detail["reviewers"])
    progress = {r["reviewer"]: (r["reviewed"], r["overdue"]) for r in detail["reviewers"]}
    assert progress == {first: (True, False), second: (False, True)}  # the second is past the due date
    assert all(r["counted"] is r["reviewed"] for r in detail["reviewers"]) and detail["quorum_reachable"] is True
    outsiders_view = (await gateway.client.get(f"/validations/{validation_id}", headers=gateway.auth(outsider))).json()
    assert all("reviewed" not in r and "overdue" not in r for r in outsiders_view["reviewers"])
    assert "quorum_reachable" not in outsiders_view
    # An id that names no validation is answered with the one most likely meant (any member sees them all).
    typo = problem(await gateway.client.get(f"/validations/{validation_id[:-1]}", headers=gateway.auth(outsider)), 404, "not_found")
    assert typo["detail"] == f"no validation {validation_id[:-1]!r}; did you mean {validation_id!r}?"
    unlike = problem(await gateway.client.get("/validations/zzzz-qqqq-wwww", headers=gateway.auth(outsider)), 404, "not_found")
    assert unlike["detail"] == "no validation 'zzzz-qqqq-wwww'"
    assert detail["requested_at"].endswith("Z")
    assert await seen_by(first) == ([first], 1)
    assert await seen_by(municipality) == ([first], 1)
    assert await seen_by(coordinator) == ([first], 2)  # and the intruder's review it refused

    await gateway.offer(second, "validation.review_submitted", review)  # quorum: the rule decides
    await gateway.settle()
    response = await gateway.client.get(f"/validations/{validation_id}", headers=gateway.auth(outsider))
    assert response.json()["status"] == "decided" and response.json()["outcome"] == "validated"
    assert await late(coordinator, coordinator=coordinator) == []  # decided: nobody is late any more
    assert await seen_by(outsider) == ([first, second], 2)
    public = (await gateway.client.get(f"/validations/{validation_id}", headers=gateway.auth(outsider))).json()
    assert [(r["reviewer"], r["counted"]) for r in public["reviews"]] == [(first, True), (second, True)]
    await gateway.offer(municipality, "project.partner_joined", {  # a stake gained after the decision: it stood on both reviews
        "project_id": practice["project_id"], "partner": {"institution": first, "role": "funder", "relation": "donation"}})
    await gateway.settle()
    for viewer in (outsider, coordinator):
        as_decided = (await gateway.client.get(f"/validations/{validation_id}", headers=gateway.auth(viewer))).json()
        assert [(r["reviewer"], r["counted"]) for r in as_decided["reviews"]] == [(first, True), (second, True)], viewer
    assert [(r["reviewer"], r["counted"]) for r in as_decided["reviewers"]] == [(first, True), (second, True)]
    listed = await walk(gateway.client, "/validations", gateway.auth(outsider), coordinator=coordinator)
    assert [v["validation_id"] for page in listed for v in page] == [validation_id]
    assert "reviews" not in listed[0][0]
    # A review after the decision is refused: nobody but its reviewer and the coordinator sees it
    # (it is not one of the reviews the decision made public), and to another member the event is
    # "refused", not "applied", though it may not see the refusal.
    afterwards = await gateway.offer(first, "validation.review_submitted", {**review, "recommendation": "reject"})
    await gateway.settle()
    assert await seen_by(outsider) == ([first, second], 2) and await seen_by(municipality) == ([first, second], 2)
    assert await seen_by(coordinator) == ([first, second], 4)  # (the intruder's and this refused one too)
    told = (await gateway.client.get(f"/events/{afterwards['id']}", headers=gateway.auth(coordinator))).json()
    assert told["outcome"] == "refused" and told["refusal"]["event"]["data"]["reason"]["code"] == "already_decided"
    assert (await gateway.client.get(f"/events/{afterwards['id']}", headers=gateway.auth(outsider))).status_code == 404
    # A reviewer assignment the workflow refused: the assignment is public, the refusal the parties'.
    another = unique("val")
    await gateway.offer(municipality, "validation.requested", {
        "validation_id": another, "project_id": practice["project_id"], "coordinator": coordinator, "quorum": 1,
        "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2, "statement": {"en": "we think it works"}},
    })
    conflicted = await gateway.offer(coordinator, "validation.reviewer_assigned", {"validation_id": another, "reviewer": municipality})
    await gateway.settle()
    to_coordinator = (await gateway.client.get(f"/events/{conflicted['id']}", headers=gateway.auth(coordinator))).json()
    assert to_coordinator["refusal"]["event"]["data"]["reason"]["code"] == "conflict_of_interest"
    to_outsider = (await gateway.client.get(f"/events/{conflicted['id']}", headers=gateway.auth(outsider))).json()
    assert (to_outsider["outcome"], to_outsider["refusal"], to_outsider["derived"]) == ("refused", None, [])


async def test_whom_a_refused_validation_event_named_is_told_of_the_refusal(gateway: Gateway, municipality: str) -> None:
    """An assignment and a request are public: the reviewer and the coordinator they name see them
    (a reviewer's integration starts work on its assignment). When the workflow refuses one, they
    were told nothing of it; the refusal names them now (``named``) and they see it — nobody else
    but the parties."""
    coordinator = await gateway.join("competence_centre")
    reviewer, outsider = await gateway.join("university"), await gateway.join("competence_centre")  # (another centre)
    practice = project(municipality)
    await gateway.offer(municipality, "project.registered", practice)
    validation_id = unique("val")
    request = {"validation_id": validation_id, "project_id": practice["project_id"], "coordinator": coordinator, "quorum": 1,
               "self_assessment": {"scores": {"novelty": 4}, "evidence_level": 2, "statement": {"en": "we think it works"}}}
    await gateway.offer(municipality, "validation.requested", request)
    not_by_the_coordinator = await gateway.offer(outsider, "validation.reviewer_assigned",
                                                 {"validation_id": validation_id, "reviewer": reviewer})
    no_such_project = await gateway.offer(municipality, "validation.requested",
                                          {**request, "validation_id": unique("val"), "project_id": "no-such-project"})
    await gateway.settle()

    async def told(event: dict[str, Any], who: str) -> dict[str, Any] | None:
        seen = (await gateway.client.get(f"/events/{event['id']}", headers=gateway.auth(who))).json()
        assert seen["outcome"] == "refused", seen
        return seen["refusal"]

    refusal = await told(not_by_the_coordinator, reviewer)
    assert refusal is not None and refusal["event"]["data"]["reason"]["code"] == "not_coordinator"
    assert refusal["event"]["data"]["named"] == reviewer and refusal["event"]["data"]["actor"] == outsider
    refusal = await told(no_such_project, coordinator)
    assert refusal is not None and refusal["event"]["data"]["reason"]["code"] == "unknown_project"
    assert refusal["event"]["data"]["named"] == coordinator
    other = await gateway.join("ngo")
    assert await told(not_by_the_coordinator, other) is None and await told(no_such_project, other) is None
    # A typo in an id the workflow looks up is answered with the one most likely meant.
    typos = [
        await gateway.offer(municipality, "validation.requested",
                            {**request, "validation_id": unique("val"), "project_id": practice["project_id"] + "x"}),
        await gateway.offer(municipality, "validation.requested",
                            {**request, "validation_id": unique("val"), "coordinator": coordinator + "x"}),
        await gateway.offer(coordinator, "validation.reviewer_assigned", {"validation_id": validation_id, "reviewer": reviewer + "x"}),
    ]
    await gateway.settle()
    said = [(await told(typo, municipality if at < 2 else coordinator) or {})["event"]["data"]["reason"] for at, typo in enumerate(typos)]
    assert [reason["code"] for reason in said] == ["unknown_project", "coordinator_not_competence_centre", "not_member"]
    for reason, meant in zip(said, (practice["project_id"], coordinator, reviewer)):
        assert reason["message"]["en"].endswith(f"; did you mean {meant!r}?"), reason
    # Questions from outside the workflow are refused, and not delivered to the validation's parties.
    nosy = await gateway.offer(outsider, "validation.info_requested", {
        "validation_id": validation_id, "questions": [{"question_id": "q1", "text": {"en": "Who are you?"}}]})
    await gateway.settle()
    refusal = await told(nosy, coordinator)
    assert refusal is not None and refusal["event"]["data"]["reason"]["code"] == "not_assigned"
    assert (await gateway.client.get(f"/events/{nosy['id']}", headers=gateway.auth(municipality))).status_code == 404
    # The same project put forward twice to one coordinator (a double click): the second is refused
    # while the first is open; to another centre, or once the first is withdrawn, it is taken.
    twice = await gateway.offer(municipality, "validation.requested", {**request, "validation_id": unique("val")})
    elsewhere = await gateway.offer(municipality, "validation.requested",
                                    {**request, "validation_id": unique("val"), "coordinator": outsider})
    await gateway.offer(municipality, "validation.withdrawn", {"validation_id": validation_id, "reason": {"en": "put forward again"}})
    after_withdrawal = await gateway.offer(municipality, "validation.requested", {**request, "validation_id": unique("val")})
    await gateway.settle()
    refusal = await told(twice, municipality)
    assert refusal is not None and refusal["event"]["data"]["reason"]["code"] == "already_open"
    assert f"in {validation_id}, which is open" in refusal["event"]["data"]["reason"]["message"]["en"]
    for taken in (elsewhere, after_withdrawal):
        seen = (await gateway.client.get(f"/events/{taken['id']}", headers=gateway.auth(municipality))).json()
        assert seen["outcome"] == "applied", seen
    listed = await gateway.client.get("/events", params={"type": "validation.action_rejected"}, headers=gateway.auth(reviewer))
    assert [item["event"]["data"]["rejected_event_id"] for item in listed.json()["items"]] == [not_by_the_coordinator["id"]]


async def test_the_calendar_shows_texts_without_the_control_characters_rfc_5545_keeps_out(gateway: Gateway) -> None:
    """A title, summary or venue sent with a control character (a form feed, an escape) was written
    into the feed as it came: RFC 5545 allows none in a text but the tab, and a strict calendar
    client may refuse the whole feed for one."""
    organiser = await gateway.join("competence_centre")
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=60)
    day_id = unique("day")
    await gateway.offer(organiser, "innovation_day.scheduled", {
        "day_id": day_id, "title": {"en": "Innovation\x0cDay\x1b[1m\tone"}, "summary": {"en": "a\x7fb\nc"},
        "format": "innovation_day", "starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=7)).isoformat(),
        "attendance_mode": "offline", "venue": {"name": {"en": "Hall\x07 A"}, "address": "Street 6", "country": "FI"},
        "capacity": 10, "registration_deadline": (start - timedelta(days=7)).isoformat(),
    })
    await gateway.settle()
    feed = await gateway.client.get("/innovation-days.ics", params={"token": gateway.token(organiser), "lang": "en"})
    assert feed.status_code == 200
    assert not {byte for byte in feed.content if byte < 0x20 and byte not in b"\t\r\n" or byte == 0x7F}
    shown = {str(e["uid"]): e for e in Calendar.from_ical(feed.content).walk("VEVENT")}[f"{day_id}@collabbus"]
    assert str(shown["summary"]) == "InnovationDay[1m\tone" and str(shown["description"]) == "ab\nc"
    assert str(shown["location"]).startswith("Hall A")


async def test_innovation_days_their_registrations_and_the_calendar(gateway: Gateway, municipality: str) -> None:
    organiser = await gateway.join("competence_centre")
    funder = await gateway.join("funder")
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=60)
    days = []
    for n, capacity in enumerate((2, 100)):
        day_id = unique("day")
        days.append(day_id)
        await gateway.offer(organiser, "innovation_day.scheduled", {
            "day_id": day_id, "title": {"fi": f"Sosiaalisten innovaatioiden päivä {n}", "en": f"Social Innovation Day {n}"},
            "format": "innovation_day", "starts_at": (start + timedelta(days=n)).isoformat(),
            "ends_at": (start + timedelta(days=n, hours=7)).isoformat(), "attendance_mode": "offline",
            "venue": {"name": {"fi": "Tieteiden talo"}, "address": "Kirkkokatu 6, Helsinki", "country": "FI"},
            "capacity": capacity, "registration_deadline": (start - timedelta(days=7)).isoformat(),
            "themes": ["health_care"], "languages": ["fi", "en"],
        })
    registrations = [unique("reg"), unique("reg")]
    for registration_id, participant in zip(registrations, (municipality, funder)):
        await gateway.offer(participant, "innovation_day.registration_requested", {
            "day_id": days[0], "registration_id": registration_id, "participant": participant,
            "role": "innovator" if participant == municipality else "funder", "attendees": 2,
        })
    await gateway.settle()
    auth = gateway.auth(funder)

    day = (await gateway.client.get(f"/innovation-days/{days[0]}", headers=auth)).json()
    assert day["capacity"] == 2 and day["confirmed"] == 2
    documented = (await gateway.client.get("/openapi.json")).json()["components"]["schemas"]["InnovationDay"]["properties"]
    assert set(day) <= set(documented), set(day) - set(documented)  # a generated client keeps every field
    assert [w["registration_id"] for w in day["waitlisted"]] == [registrations[1]]
    pages = await walk(gateway.client, f"/innovation-days/{days[0]}/registrations", auth, limit=1)
    assert [[r["registration_id"] for r in page] for page in pages] == [[registrations[0]], [registrations[1]]]
    assert [r["status"] for page in pages for r in page] == ["confirmed", "waitlisted"]
    meetings = await gateway.client.get(f"/innovation-days/{days[0]}/meetings", headers=auth)
    assert meetings.json() == {"items": [], "next_cursor": None}
    problem(await gateway.client.get(f"/innovation-days/{unique('day')}", headers=auth), 404, "not_found")
    typo = problem(await gateway.client.get(f"/innovation-days/{days[0]}x", headers=auth), 404, "not_found")
    assert typo["detail"] == f"no innovation day '{days[0]}x'; did you mean {days[0]!r}?"

    all_days = [d["day_id"] for page in await walk(gateway.client, "/innovation-days", auth, limit=500) for d in page]
    token = gateway.token(funder)
    feed = await gateway.client.get("/innovation-days.ics", params={"token": token, "lang": "fi"})  # no header
    assert feed.status_code == 200 and feed.headers["content-type"].startswith("text/calendar")
    calendar = Calendar.from_ical(feed.content)
    events = {str(e["uid"]): e for e in calendar.walk("VEVENT")}
    assert len(events) == len(all_days) and set(days) <= {uid.removesuffix("@collabbus") for uid in events}
    first = events[f"{days[0]}@collabbus"]
    assert str(first["summary"]) == "Sosiaalisten innovaatioiden päivä 0"
    assert first.decoded("dtstart") == start and "Tieteiden talo" in str(first["location"])
    assert int(cast(vInt, first["sequence"])) == 0
    # The organiser by its id, and by its name for calendar clients to show (a urn they may not).
    named = (await gateway.client.get(f"/institutions/{organiser}", headers=auth)).json()["name"]
    assert str(first["organizer"]) == f"urn:collabbus:institution:{organiser}"
    assert first["organizer"].params["CN"] == (named.get("fi") or named.get("en") or next(iter(named.values())))

    # Moved, then cancelled: each change raises SEQUENCE, so calendars replace what they keep.
    await gateway.offer(organiser, "innovation_day.rescheduled", {
        "day_id": days[1], "starts_at": (start + timedelta(days=9)).isoformat(), "ends_at": (start + timedelta(days=9, hours=7)).isoformat(),
    })
    await gateway.offer(organiser, "innovation_day.cancelled", {"day_id": days[1], "reason": {"en": "storm warning"}})
    await gateway.settle()
    feed = await gateway.client.get("/innovation-days.ics", params={"token": token})
    changed = {str(e["uid"]): e for e in Calendar.from_ical(feed.content).walk("VEVENT")}[f"{days[1]}@collabbus"]
    assert int(cast(vInt, changed["sequence"])) == 2 and str(changed["status"]) == "CANCELLED"
    assert changed.decoded("dtstart") == start + timedelta(days=9)
    problem(await gateway.client.get("/innovation-days.ics"), 401, "unauthorized")


async def open_day(gateway: Gateway, organiser: str, capacity: int = 10) -> str:
    """A day of ``organiser``'s, open for registration for a week more; returns its id."""
    day_id = unique("day")
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
    await gateway.offer(organiser, "innovation_day.scheduled", {
        "day_id": day_id, "title": {"en": "Innovation day"}, "format": "innovation_day",
        "starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=6)).isoformat(), "attendance_mode": "online",
        "online_url": "https://meet.example.org/day", "capacity": capacity,
        "registration_deadline": (start - timedelta(days=23)).isoformat(), "themes": ["health_care"], "languages": ["en"]})
    return day_id


async def test_a_member_finds_the_gatherings_it_is_registered_for_and_has_them_in_its_calendar(gateway: Gateway) -> None:
    """A participant found its registrations only by reading every day's registrations, and its
    calendar held every gathering of the network: ?participant= keeps the days it holds a
    confirmed or waitlisted registration for (not one it cancelled), ?organizer= a centre's own."""
    organiser, other_organiser = await gateway.join("competence_centre"), await gateway.join("competence_centre")
    participant, someone = await gateway.join("ngo"), await gateway.join("ngo")
    full, open_, left, elsewhere = (await open_day(gateway, organiser, capacity=1), await open_day(gateway, organiser),
                                    await open_day(gateway, organiser), await open_day(gateway, other_organiser))
    for who, day_id in ((someone, full), (participant, full), (participant, open_), (participant, left), (someone, elsewhere)):
        await gateway.offer(who, "innovation_day.registration_requested", {
            "day_id": day_id, "registration_id": f"{day_id}-{who}", "participant": who, "role": "observer", "attendees": 1})
    await gateway.offer(participant, "innovation_day.registration_cancelled", {"day_id": left, "registration_id": f"{left}-{participant}"})
    await gateway.settle()

    auth = gateway.auth(someone)
    mine = [d["day_id"] for page in await walk(gateway.client, "/innovation-days", auth, limit=1, participant=participant) for d in page]
    assert sorted(mine) == sorted([full, open_])  # waitlisted on the full one, confirmed on the other
    organised = (await gateway.client.get("/innovation-days", params={"organizer": other_organiser}, headers=auth)).json()
    assert [d["day_id"] for d in organised["items"]] == [elsewhere]
    feed = await gateway.client.get("/innovation-days.ics", params={"token": gateway.token(participant), "participant": participant})
    assert feed.status_code == 200
    assert sorted(str(e["uid"]).removesuffix("@collabbus") for e in Calendar.from_ical(feed.content).walk("VEVENT")) == sorted([full, open_])


async def test_participant_is_one_parameter_checked_and_described_alike_on_the_days_the_calendar_and_the_meetings(gateway: Gateway) -> None:
    """?participant= on a day's meetings was declared apart from the lists': a value no
    institution id can be (in capitals, with a space) read an empty page of meetings as if the
    institution had none, where the days and the calendar refused it. It is refused alike, saying
    what an institution id is, and described alike."""
    organiser, member = await gateway.join("competence_centre"), await gateway.join("ngo")
    day_id = await open_day(gateway, organiser)
    await gateway.settle()
    auth = gateway.auth(member)
    said: dict[str, set[str]] = {}
    for path, params in (("/innovation-days", {}), (f"/innovation-days/{day_id}/meetings", {}),
                         ("/innovation-days.ics", {"token": gateway.token(member)})):
        for wrong in (member.upper(), f"{member} ", "x" * 64):
            refused = problem(await gateway.client.get(path, params={**params, "participant": wrong}, headers=auth), 422, "invalid")
            assert [error["loc"] for error in refused["errors"]] == [["query", "participant"]], (path, wrong)
            said.setdefault(wrong, set()).add(refused["errors"][0]["msg"])
        assert (await gateway.client.get(path, params={**params, "participant": member}, headers=auth)).status_code == 200
    assert all(len(messages) == 1 for messages in said.values()), said
    assert "an institution id" in said[member.upper()].pop()
    openapi = (await gateway.client.get("/openapi.json")).json()["paths"]
    declared = [next(p for p in openapi[path]["get"]["parameters"] if p["name"] == "participant")
                for path in ("/innovation-days", "/innovation-days/{day_id}/meetings", "/innovation-days.ics")]
    assert declared[0] == declared[1] == declared[2]


async def test_a_participants_calendar_holds_its_meetings_and_the_meetings_say_when_they_end(gateway: Gateway) -> None:
    """The meetings the matchmaking proposed were only in /meetings, each with its start alone: a
    participant's calendar (?participant=) holds its own meetings, and each meeting says when its
    slot ends; ?participant= on /meetings keeps an institution's."""
    organiser, innovator, funder, other = (await gateway.join("competence_centre"), await gateway.join("ngo"),
                                           await gateway.join("funder"), await gateway.join("ngo"))
    day_id, start = unique("day"), datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
    await gateway.offer(organiser, "innovation_day.scheduled", {
        "day_id": day_id, "title": {"en": "Innovation day"}, "format": "innovation_day", "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=2)).isoformat(), "attendance_mode": "online", "online_url": "https://meet.example.org/day",
        "capacity": 10, "registration_deadline": (datetime.now(timezone.utc) + timedelta(seconds=3)).isoformat(), "themes": ["health_care"]})
    for who, role in ((innovator, "innovator"), (funder, "funder"), (other, "observer")):
        await gateway.offer(who, "innovation_day.registration_requested", {
            "day_id": day_id, "registration_id": unique("reg"), "participant": who, "role": role, "attendees": 1})
    await gateway.settle()
    auth = gateway.auth(other)
    for _ in range(150):  # the matchmaking runs once the deadline has passed
        if (await gateway.client.get(f"/innovation-days/{day_id}", headers=auth)).json()["meetings_proposed_at"]:
            break
        await asyncio.sleep(0.2)

    [meeting] = (await gateway.client.get(f"/innovation-days/{day_id}/meetings", params={"participant": innovator}, headers=auth)).json()["items"]
    assert (meeting["innovator"], meeting["funder"]) == (innovator, funder)
    assert datetime.fromisoformat(meeting["slot_end"]) - datetime.fromisoformat(meeting["slot_start"]) == timedelta(minutes=20)
    assert (await gateway.client.get(f"/innovation-days/{day_id}/meetings", params={"participant": other}, headers=auth)).json()["items"] == []
    for who in (innovator, funder):
        feed = Calendar.from_ical((await gateway.client.get("/innovation-days.ics", params={"token": gateway.token(who), "participant": who})).content)
        [booked] = [e for e in feed.walk("VEVENT") if ".meeting." in str(e["uid"])]
        assert booked.decoded("dtstart") == datetime.fromisoformat(meeting["slot_start"]) == start
        assert booked.decoded("dtend") == datetime.fromisoformat(meeting["slot_end"])
        assert innovator in str(booked["summary"]) and funder in str(booked["summary"])
    feed = Calendar.from_ical((await gateway.client.get("/innovation-days.ics", params={"token": gateway.token(other), "participant": other})).content)
    assert [str(e["uid"]) for e in feed.walk("VEVENT")] == [f"{day_id}@collabbus"]  # its day, no meeting of others


async def test_a_calendar_token_reads_the_calendar_feed_and_nothing_else(gateway: Gateway) -> None:
    """The calendar feed's URL, handed to a calendar service, carried a member's token, which
    publishes in its name and reads the whole API: a calendar token reads the feed only."""
    from handlers import tokens
    from handlers.db import session_scope

    organiser, participant = await gateway.join("competence_centre"), await gateway.join("ngo")
    day_id = await open_day(gateway, organiser)
    await gateway.settle()
    with session_scope(gateway.bus.engine) as session:
        token = tokens.issue(session, participant, calendar=True)

    feed = await gateway.client.get("/innovation-days.ics", params={"token": token})
    assert feed.status_code == 200 and f"{day_id}@collabbus" in {str(e["uid"]) for e in Calendar.from_ical(feed.content).walk("VEVENT")}
    bearer = {"Authorization": f"Bearer {token}"}
    for refused in (await gateway.client.get(f"/innovation-days/{day_id}", headers=bearer), await gateway.client.get("/me", headers=bearer),
                    await gateway.post(bearer, envelope("innovation_day.registration_requested", participant, {
                        "day_id": day_id, "registration_id": unique("reg"), "participant": participant, "role": "observer",
                        "attendees": 1}))):
        assert problem(refused, 403, "calendar_token")["detail"].startswith("a calendar token reads the calendar feed only")


async def test_a_refused_cancellation_is_the_cancellations_refusal_and_the_registration_stands(gateway: Gateway) -> None:
    """A member cancelling another's registration is refused. Every member (the participant too)
    sees the cancellation refused, naming who tried and the registration — at GET /events/{id}
    and in the day's events a webhook delivers —, and no registration_rejected tells anybody that
    the registration, which stands confirmed, was rejected."""
    organiser, participant, other = await gateway.join("competence_centre"), await gateway.join("ngo"), await gateway.join("university")
    day_id, registration_id = await open_day(gateway, organiser), unique("reg")
    await gateway.offer(participant, "innovation_day.registration_requested", {
        "day_id": day_id, "registration_id": registration_id, "participant": participant, "role": "observer", "attendees": 1})
    cancellation = await gateway.offer(other, "innovation_day.registration_cancelled", {"day_id": day_id, "registration_id": registration_id})
    await gateway.settle()

    for who in (other, participant, organiser):
        seen = (await gateway.client.get(f"/events/{cancellation['id']}", headers=gateway.auth(who))).json()
        assert seen["outcome"] == "refused" and [item["event"]["type"] for item in seen["derived"]] == ["innovation_day.action_rejected"]
        refusal = seen["refusal"]["event"]
        assert refusal["source"] == f"/institutions/{organiser}" and refusal["causationid"] == cancellation["id"]
        assert (refusal["data"]["rejected_type"], refusal["data"]["rejected_event_id"]) == ("innovation_day.registration_cancelled", cancellation["id"])
        assert (refusal["data"]["actor"], refusal["data"]["registration_id"], refusal["data"]["reason"]["code"]) == (
            other, registration_id, "not_participant")
    about_the_day = (await gateway.client.get("/events", params={"subject": day_id}, headers=gateway.auth(participant))).json()["items"]
    assert sorted(item["event"]["type"] for item in about_the_day) == [  # (the confirmation may come after the cancellation)
        "innovation_day.action_rejected", "innovation_day.registration_cancelled", "innovation_day.registration_confirmed",
        "innovation_day.registration_requested", "innovation_day.scheduled"]
    registrations = (await gateway.client.get(f"/innovation-days/{day_id}/registrations", headers=gateway.auth(participant))).json()
    assert [(r["registration_id"], r["status"]) for r in registrations["items"]] == [(registration_id, "confirmed")]


async def test_a_second_registration_for_a_day_is_refused_while_the_first_is_live(gateway: Gateway) -> None:
    """An institution registers once per day: a second registration (under another id) would take
    the last seat as well, and is refused, naming the first."""
    organiser, participant, other = await gateway.join("competence_centre"), await gateway.join("ngo"), await gateway.join("ngo")
    day_id, first, second = await open_day(gateway, organiser, capacity=3), unique("reg"), unique("reg")
    offered = [await gateway.offer(who, "innovation_day.registration_requested", {
        "day_id": day_id, "registration_id": registration_id, "participant": who, "role": "observer", "attendees": attendees})
        for who, registration_id, attendees in ((participant, first, 2), (participant, second, 1), (other, unique("reg"), 1))]
    await gateway.settle()

    seen = (await gateway.client.get(f"/events/{offered[1]['id']}", headers=gateway.auth(participant))).json()
    assert seen["outcome"] == "refused"
    reason = seen["refusal"]["event"]["data"]["reason"]
    assert seen["refusal"]["event"]["type"] == "innovation_day.registration_rejected" and reason["code"] == "already_registered"
    assert first in reason["message"]["en"]
    day = (await gateway.client.get(f"/innovation-days/{day_id}", headers=gateway.auth(other))).json()
    assert (day["confirmed"], day["waitlisted"]) == (3, [])  # the last seat is the other member's
    assert (await gateway.client.get(f"/events/{offered[2]['id']}", headers=gateway.auth(other))).json()["outcome"] == "applied"


async def test_adoptions_are_counted_by_municipality_level(gateway: Gateway, municipality: str) -> None:
    district = await gateway.join("municipality", "TR", municipality_level="district")
    practice = project(municipality)
    await gateway.offer(municipality, "project.registered", practice)
    await gateway.offer(municipality, "project.adopted", {
        "adoption_id": unique("a"), "project_id": practice["project_id"], "adopter": district, "support": ["study_visit"],
    })
    await gateway.settle()
    auth = gateway.auth(district)
    stats = (await gateway.client.get("/stats/adoptions", params={"owner": municipality}, headers=auth)).json()
    levels = {level["municipality_level"]: level for level in stats["by_municipality_level"]}
    assert levels["district"]["municipalities"] == 1 and levels["district"]["adoptions"] == 1
    assert levels["provincial"]["adoptions"] == 0
    detail = (await gateway.client.get(f"/projects/{practice['project_id']}", headers=auth)).json()
    assert [a["adopter"] for a in detail["adoptions"]] == [district]


async def test_adoptions_by_municipalities_without_a_level_are_shown_and_an_unknown_owner_is_told_so(gateway: Gateway) -> None:
    """A municipality that joined without its level took a practice up: no level counts it, and the
    statistics say whose adoptions those are (they added up to less than the adoptions, silently).
    An owner that is no institution (a typo) is refused with the one meant, on the statistics and on
    /projects, where it answered nothing adopted and no projects; a former member's are answered."""
    owner = await gateway.join("municipality", "TR", municipality_level="metropolitan")
    unlevelled, district = await gateway.join("municipality", "TR"), await gateway.join("municipality", "TR", municipality_level="district")
    practice = project(owner)
    await gateway.offer(owner, "project.registered", practice)
    for adopter in (unlevelled, district):
        await gateway.offer(adopter, "project.adopted", {
            "adoption_id": unique("a"), "project_id": practice["project_id"], "adopter": adopter, "support": ["study_visit"]})
    await gateway.settle()
    auth = gateway.auth(district)
    stats = (await gateway.client.get("/stats/adoptions", params={"owner": owner}, headers=auth)).json()
    assert [level["adoptions"] for level in stats["by_municipality_level"]] == [0, 0, 1]
    assert stats["without_level"] == {"municipalities": [unlevelled], "adoptions": 1}

    for path in ("/stats/adoptions", "/projects"):
        typo = problem(await gateway.client.get(path, params={"owner": owner + "x"}, headers=auth), 422, "invalid")
        assert [(e["loc"], e["type"]) for e in typo["errors"]] == [(["query", "owner"], "unknown_institution")], typo
        assert typo["errors"][0]["msg"] == f"'{owner}x' is not an institution of the network; did you mean {owner!r}?"
    await gateway.offer("operator", "institution.left", {"id": owner})
    await gateway.settle()
    listed = await walk(gateway.client, "/projects", auth, owner=owner)
    assert [item["project_id"] for page in listed for item in page] == [practice["project_id"]]


async def test_every_filter_naming_an_institution_refuses_one_that_is_none_with_the_one_meant(gateway: Gateway) -> None:
    """A typo in an institution filter of the calls, the applications, the validations, the
    gatherings or the calendar answered an empty page (or an empty calendar), as
    if the institution had nothing: each is told the one meant, as /projects' and the statistics'
    are; a former member's are answered."""
    member = await gateway.join("funder", "FI")
    auth = gateway.auth(member)
    call = {"call_id": unique("c"), "title": {"en": "Call"}, "kind": "funding", "deadline_model": "single_stage",
            "opens_at": (datetime.now(timezone.utc) - timedelta(days=1)).isoformat(),
            "deadline": (datetime.now(timezone.utc) + timedelta(days=30)).isoformat()}
    await gateway.offer(member, "call.published", call)
    await gateway.settle()
    asked = [("/calls", "owner"), ("/applications", "applicant"), (f"/calls/{call['call_id']}/applications", "applicant"),
             ("/validations", "coordinator"), ("/validations", "requester"), ("/validations", "reviewer"),
             ("/innovation-days", "participant"), ("/innovation-days", "organizer"), ("/innovation-days.ics", "participant"),
             ("/innovation-days.ics", "organizer")]
    for path, parameter in asked:
        typo = problem(await gateway.client.get(path, params={parameter: member + "x"}, headers=auth), 422, "invalid")
        assert [(e["loc"], e["type"]) for e in typo["errors"]] == [(["query", parameter], "unknown_institution")], (path, typo)
        assert typo["errors"][0]["msg"] == f"'{member}x' is not an institution of the network; did you mean {member!r}?"
    await gateway.offer("operator", "institution.left", {"id": member})
    await gateway.settle()
    other = gateway.auth(await gateway.join("ngo", "FI"))
    for path, parameter in asked:
        answered = await gateway.client.get(path, params={parameter: member}, headers=other)
        assert answered.status_code == 200, (path, answered.text)


async def test_projects_are_found_by_partner_adopter_and_place_as_people_write_it(gateway: Gateway) -> None:
    """An NGO finds the projects it is a partner of, a municipality the practices it adopted, and
    anyone the projects of a place written without its accents or in capitals (``yenisehir``,
    ``YENİŞEHİR`` for Yenişehir): each answered nothing, or was refused as a parameter."""
    owner = await gateway.join("municipality", "TR", municipality_level="metropolitan")
    ngo, district = await gateway.join("ngo", "TR"), await gateway.join("municipality", "TR", municipality_level="district")
    place = {"country": "TR", "region": "Mersin", "municipality": "Yenişehir"}
    partnered, adopted_, elsewhere = (
        project(owner, location=place, partners=[{"institution": ngo, "role": "partner", "relation": "partnership"}]),
        project(owner, location={"country": "TR", "region": "Mersin"}),
        project(owner, location={"country": "TR", "region": "Adana", "municipality": "Seyhan"}))
    for data in (partnered, adopted_, elsewhere):
        await gateway.offer(owner, "project.registered", data)
    await gateway.offer(district, "project.adopted", {
        "adoption_id": unique("a"), "project_id": adopted_["project_id"], "adopter": district, "support": ["study_visit"]})
    await gateway.settle()
    auth = gateway.auth(ngo)

    async def found(**params: Any) -> list[str]:
        return [item["project_id"] for page in await walk(gateway.client, "/projects", auth, owner=owner, **params) for item in page]

    assert await found(partner=ngo) == [partnered["project_id"]]
    assert await found(adopter=district) == [adopted_["project_id"]]
    for written in ("Yenişehir", "yenisehir", "YENİŞEHİR", "yenişehir"):
        assert await found(municipality=written) == [partnered["project_id"]], written
    assert sorted(await found(region="MERSIN")) == sorted([partnered["project_id"], adopted_["project_id"]])
    assert await found(region="mersin", municipality="seyhan") == []
    typo = problem(await gateway.client.get("/projects", params={"partner": ngo + "x"}, headers=auth), 422, "invalid")
    assert [(e["loc"], e["type"]) for e in typo["errors"]] == [(["query", "partner"], "unknown_institution")]


async def test_projects_calls_members_and_days_are_found_by_the_words_of_their_texts_in_any_language(gateway: Gateway) -> None:
    """A municipality looking for a practice to take up, an applicant for a call, a partner for a
    member's id, a funder for a gathering searches by words as people type them: without Turkish or
    Finnish letters, in capitals, a word's part (the title and summary of a project, a call or a
    gathering; a member's name).
    Every word must be there, in the title or the summary, in any of their languages; what the
    owner changes is searched as it reads now; LIKE's own characters are taken as themselves."""
    owner = await gateway.join("municipality", "TR", municipality_level="metropolitan")
    elderly = project(owner, title={"tr": "Evde Yaşlı Destek Hizmetleri", "en": "Home-based support for older people"},
                      summary={"fi": "Ikääntyneiden kotipalvelu ja työelämä"})
    kitchens = project(owner)  # Mahalle Mutfakları, Neighbourhood Kitchens
    centre = project(owner, title={"ar": "برنامج دعم المبتكرين الاجتماعيين"}, summary={"en": "Funding 100% of 50_50 pilots"})
    for data in (elderly, kitchens, centre):
        await gateway.offer(owner, "project.registered", data)
    await gateway.settle()
    auth = gateway.auth(owner)

    async def found(path: str = "/projects", **params: Any) -> list[str]:
        key = "project_id" if path == "/projects" else "call_id"
        pages = await walk(gateway.client, path, auth, owner=params.pop("owner", owner), **params)
        return sorted(item[key] for page in pages for item in page)

    for q, expected in (("yasli", [elderly]), ("YAŞLI destek", [elderly]), ("tyoelama", [elderly]), ("OLDER home", [elderly]),
                        ("kitchen", [kitchens]), ("mutfaklari", [kitchens]), ("support kitchens", []),
                        ("المبتكرين", [centre]), ("100%", [centre]), ("%", [centre]), ("_", [centre]), ("0_5", [centre])):
        assert await found(q=q) == sorted(p["project_id"] for p in expected), q
    await gateway.offer(owner, "project.updated", {"project_id": kitchens["project_id"], "changes": {"title": {"en": "Community canteens"}}})
    await gateway.settle()
    assert await found(q="kitchens") == [] and await found(q="canteen") == [kitchens["project_id"]]
    for blank in (" ", "\t"):
        (refused,) = problem(await gateway.client.get("/projects", params={"q": blank}, headers=auth), 422, "invalid")["errors"]
        assert refused["loc"] == ["query", "q"] and "a word to look for" in refused["msg"], refused

    funder = await gateway.join("funder", "FI")
    call_id = await open_funding_call(gateway, funder)  # "Care at home"
    await gateway.settle()
    assert await found("/calls", owner=funder, q="CARE home") == [call_id] and await found("/calls", owner=funder, q="kitchen") == []
    await gateway.offer(funder, "call.amended", {"call_id": call_id, "reason": {"en": "Wider"}, "changes": {
        "title": {"fi": "Työelämäosallisuus"}, "summary": {"en": "Care at home, and work"}}})
    await gateway.settle()
    assert await found("/calls", owner=funder, q="tyoelamaosallisuus work") == [call_id]
    assert await found("/calls", owner=funder, q="care") == [call_id] and await found("/calls", owner=funder, q="Mahalle") == []

    # Members, by their names.
    mersin = await gateway.join("municipality", "TR", municipality_level="metropolitan",
                                name={"tr": "Mersin Büyükşehir Belediyesi", "en": "Mersin Metropolitan Municipality"})
    thl = await gateway.join("competence_centre", "FI", name={"fi": "Terveyden ja hyvinvoinnin laitos"})

    async def members(q: str) -> list[str]:
        return sorted(item["id"] for page in await walk(gateway.client, "/institutions", auth, q=q) for item in page)

    assert await members("buyuksehir") == [mersin] and await members("METROPOLITAN mersin") == [mersin]
    assert await members("hyvinvoinnin") == [thl] and await members("mersin laitos") == []
    await gateway.offer("operator", "institution.updated", {"id": thl, "name": {"en": "Finnish Institute for Health and Welfare"}})
    await gateway.settle()
    assert await members("welfare") == [thl] and await members("laitos") == []

    # Gatherings, by their titles and summaries.
    starts = datetime.now(timezone.utc) + timedelta(days=40)
    day = {"day_id": unique("d"), "title": {"fi": "Sosiaalisten innovaatioiden päivä"}, "summary": {"en": "Innovators meet funders"},
           "format": "innovation_day", "starts_at": starts.isoformat(), "ends_at": (starts + timedelta(hours=6)).isoformat(),
           "attendance_mode": "online", "online_url": "https://example.fi/day", "capacity": 10,
           "registration_deadline": (starts - timedelta(days=7)).isoformat()}
    await gateway.offer(thl, "innovation_day.scheduled", day)
    await gateway.settle()
    pages = await walk(gateway.client, "/innovation-days", auth, organizer=thl, q="PAIVA funders")
    assert [item["day_id"] for page in pages for item in page] == [day["day_id"]]
    assert await walk(gateway.client, "/innovation-days", auth, organizer=thl, q="kitchens") == [[]]


async def test_a_project_shows_which_of_its_owner_partners_and_adopters_left_the_network(gateway: Gateway) -> None:
    """When a member leaves, the projects it owns, took part in or adopted keep it — it did — and
    say since when it is a member no more, where the project read as if nothing had changed. A
    partner that never joined is told from a member (both had no ``left_at``)."""
    owner, staying, leaving = (await gateway.join("municipality", "TR", municipality_level="metropolitan"),
                               await gateway.join("ngo", "TR"), await gateway.join("university", "TR"))
    adopter = await gateway.join("municipality", "TR", municipality_level="district")
    stranger = unique("tr-coop")
    practice = project(owner, partners=[{"institution": staying, "role": "partner"}, {"institution": leaving, "role": "supporter"},
                                        {"institution": stranger, "role": "partner"}])
    await gateway.offer(owner, "project.registered", practice)
    await gateway.offer(adopter, "project.adopted", {
        "adoption_id": unique("a"), "project_id": practice["project_id"], "adopter": adopter, "support": ["presentation"]})
    await gateway.settle()
    auth = gateway.auth(staying)
    before = (await gateway.client.get(f"/projects/{practice['project_id']}", headers=auth)).json()
    assert before["owner_left_at"] is None and [p["left_at"] for p in before["partners"]] == [None, None, None]
    assert {p["institution"]: p["joined"] for p in before["partners"]} == {staying: True, leaving: True, stranger: False}
    for gone in (leaving, adopter, owner):
        await gateway.offer("operator", "institution.left", {"id": gone})
    await gateway.settle()
    after = (await gateway.client.get(f"/projects/{practice['project_id']}", headers=auth)).json()
    left_at = {gone: (await gateway.client.get(f"/institutions/{gone}", headers=auth)).json()["left_at"] for gone in (leaving, adopter, owner)}
    assert after["owner_left_at"] == left_at[owner]
    assert {p["institution"]: (p["joined"], p["left_at"]) for p in after["partners"]} == {
        staying: (True, None), leaving: (True, left_at[leaving]), stranger: (False, None)}
    assert [(a["adopter"], a["adopter_left_at"]) for a in after["adoptions"]] == [(adopter, left_at[adopter])]


async def test_a_projects_reference_elsewhere_without_an_address_is_shown(gateway: Gateway) -> None:
    """An external reference's `url` is optional; one sent as null (as serializers write what is
    unset) made the project's page answer 500."""
    owner = await gateway.join("municipality", municipality_level="district")
    practice = project(owner, external_refs=[{"system": "innokyla", "id": "1234", "url": None},
                                             {"system": "tyokokeilu", "id": "77", "url": "https://example.fi/77"}])
    await gateway.offer(owner, "project.registered", practice)
    await gateway.settle()
    shown = await gateway.client.get(f"/projects/{practice['project_id']}", headers=gateway.auth(owner))
    assert shown.status_code == 200, shown.text
    assert shown.json()["external_refs"] == [{"system": "innokyla", "id": "1234", "url": None},
                                             {"system": "tyokokeilu", "id": "77", "url": "https://example.fi/77"}]


async def test_events_pages_through_the_log(gateway: Gateway) -> None:
    owner = await gateway.join("cooperative")
    posted = [(await gateway.offer(owner, "project.registered", project(owner)))["seq"] for _ in range(5)]
    auth = gateway.auth(owner)
    pages = await walk(gateway.client, "/events", auth, institution=owner, limit=2)
    assert [len(page) for page in pages] == [2, 2, 1]
    assert [item["seq"] for page in pages for item in page] == posted
    assert all(item["event"]["source"] == f"/institutions/{owner}" for page in pages for item in page)
    response = await gateway.client.get("/events", params={"institution": owner, "after_seq": posted[2]}, headers=auth)
    assert [item["seq"] for item in response.json()["items"]] == posted[3:]
    # A cursor goes on with a listing that after_seq started: both at once, one would be dropped without a word.
    both = problem(await gateway.client.get("/events", params={"institution": owner, "limit": 2, "cursor": str(posted[1]),
                                                                "after_seq": posted[3]}, headers=auth), 422, "invalid")
    assert [(e["loc"], e["type"]) for e in both["errors"]] == [(["query", "cursor"], "cursor_with_after_seq")]
    assert "give after_seq or cursor, not both" in both["detail"]
    problem(await gateway.client.get("/events", params={"subject": "a.b"}, headers=auth), 422, "invalid")


async def test_events_of_several_types_come_as_one_list_in_log_order(gateway: Gateway) -> None:
    """`type` repeated: the events of any of the types or domains asked for, in log order, each
    once however the filters overlap, paged as one list; more than 20 is a 422, as is a bad one."""
    owner = await gateway.join("cooperative")
    auth = gateway.auth(owner)
    practices = [project(owner) for _ in range(3)]
    offered: list[tuple[str, int]] = []
    for practice in practices:
        offered.append(("project.registered", (await gateway.offer(owner, "project.registered", practice))["seq"]))
        changes = {"summary": {"en": f"{practice['project_id']} grows"}}
        offered.append(("project.updated", (await gateway.offer(owner, "project.updated", {
            "project_id": practice["project_id"], "changes": changes}))["seq"]))
        offered.append(("project.completed", (await gateway.offer(owner, "project.completed", {
            "project_id": practice["project_id"], "outcome": {"en": "done"}, "ended_on": "2026-04-30"}))["seq"]))
    wanted = [seq for event_type, seq in offered if event_type != "project.updated"]
    pages = await walk(gateway.client, "/events", auth, institution=owner, type=["project.completed", "project.registered"], limit=4)
    assert [len(page) for page in pages] == [4, 2]
    assert [item["seq"] for page in pages for item in page] == wanted  # log order across the types
    overlapping = await gateway.client.get("/events", params={"institution": owner, "type": ["project", "project.updated"]}, headers=auth)
    assert [item["seq"] for item in overlapping.json()["items"]] == [seq for _, seq in offered]  # each once
    for domain in ("project", "project.*"):  # a domain as webhooks take it too
        whole = await gateway.client.get("/events", params={"institution": owner, "type": domain}, headers=auth)
        assert whole.status_code == 200 and [item["seq"] for item in whole.json()["items"]] == [seq for _, seq in offered], whole.text
    one = await gateway.client.get("/events", params={"institution": owner, "type": "project.updated"}, headers=auth)
    assert [item["event"]["type"] for item in one.json()["items"]] == ["project.updated"] * 3
    too_many = problem(await gateway.client.get("/events", params={"type": ["project"] * 21}, headers=auth), 422, "invalid")
    assert [(e["loc"], e["msg"]) for e in too_many["errors"]] == [(["query", "type"], "Input should be given at most 20 times, not 21")]
    problem(await gateway.client.get("/events", params={"type": ["project", "Project"]}, headers=auth), 422, "invalid")
    # A misspelt type or domain is refused, with what was likely meant, rather than matching nothing for ever.
    misspelt = problem(await gateway.client.get("/events", params={"type": ["project", "call.publised", "calls", "nope"]},
                                                headers=auth), 422, "invalid")
    assert [(error["loc"], error["type"]) for error in misspelt["errors"]] == [
        (["query", "type", 1], "unknown_event_type"), (["query", "type", 2], "unknown_event_type"),
        (["query", "type", 3], "unknown_event_type")]
    assert "did you mean 'call.published'?" in misspelt["errors"][0]["msg"] and "'nope'" in misspelt["errors"][2]["msg"]


async def test_a_long_poll_of_the_log_is_answered_as_soon_as_an_event_shows(gateway: Gateway) -> None:
    owner = await gateway.join("cooperative")
    first = await gateway.offer(owner, "project.registered", project(owner))
    await gateway.settle()
    auth = gateway.auth(owner)
    loop = asyncio.get_running_loop()
    started = loop.time()
    params = {"institution": owner, "after_seq": first["seq"], "wait": 30}
    polling = asyncio.create_task(gateway.client.get("/events", params=params, headers=auth, timeout=60))
    await asyncio.sleep(1.0)
    assert not polling.done()  # nothing after it yet: the poll waits
    second = await gateway.offer(owner, "project.registered", project(owner))
    response = await polling
    assert response.status_code == 200, response.text
    assert [item["seq"] for item in response.json()["items"]] == [second["seq"]]
    assert loop.time() - started < 30  # when the event showed, not at the end of the wait

    started = loop.time()
    quiet = await gateway.client.get("/events", params={**params, "after_seq": second["seq"], "wait": 1}, headers=auth)
    assert quiet.json() == {"items": [], "next_cursor": None}
    assert loop.time() - started >= 1  # nothing showed: an empty page once the wait is over
    assert len((await gateway.client.get("/events", params={**params, "after_seq": first["seq"], "wait": 1},
                                         headers=auth)).json()["items"]) == 1  # something to show: at once, as without a wait
    for wait in (61, -1):
        problem(await gateway.client.get("/events", params={"wait": wait}, headers=auth), 422, "invalid")


async def test_a_member_has_at_most_eight_long_polls_waiting_at_once(gateway: Gateway) -> None:
    owner = await gateway.join("cooperative")
    first = await gateway.offer(owner, "project.registered", project(owner))
    await gateway.settle()
    auth = gateway.auth(owner)
    params = {"institution": owner, "after_seq": first["seq"], "wait": 30}
    waiting = [asyncio.create_task(gateway.client.get("/events", params=params, headers=auth, timeout=60)) for _ in range(8)]
    await asyncio.sleep(1.0)
    assert not any(poll.done() for poll in waiting)
    ninth = problem(await gateway.client.get("/events", params=params, headers=auth), 429, "rate_limited")
    assert "8 long polls" in ninth["detail"]

    def long_polls() -> float:
        [family] = [f for f in text_string_to_metric_families(metrics.text) if f.name == "collabbus_http_long_polls"]
        return float(family.samples[0].value)

    metrics = await gateway.client.get("/metrics")
    assert long_polls() == 8
    other = await gateway.join("ngo")  # another member's are its own
    assert (await gateway.client.get("/events", params={**params, "wait": 1}, headers=gateway.auth(other))).status_code == 200
    assert (await gateway.client.get("/events", params={**params, "wait": 0}, headers=auth)).status_code == 200  # no wait, no limit
    second = await gateway.offer(owner, "project.registered", project(owner))
    answers = await asyncio.gather(*waiting)
    assert {tuple(item["seq"] for item in answer.json()["items"]) for answer in answers} == {(second["seq"],)}
    again = await gateway.client.get("/events", params={**params, "after_seq": second["seq"], "wait": 1}, headers=auth)
    assert again.status_code == 200  # they answered: room again
    metrics = await gateway.client.get("/metrics")
    assert long_polls() == 0

    # A client that goes away (a follower restarting) does not keep its place until the wait is over.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as leaving:
        gone = [asyncio.create_task(leaving.get("/events", params={**params, "after_seq": second["seq"], "wait": 60}, headers=auth))
                for _ in range(8)]
        await asyncio.sleep(1.0)
        metrics = await gateway.client.get("/metrics")
        assert long_polls() == 8
        for poll in gone:
            poll.cancel()
        await asyncio.gather(*gone, return_exceptions=True)
    deadline = asyncio.get_running_loop().time() + 10  # (a waiting poll looks every second)
    while (metrics := await gateway.client.get("/metrics")) and long_polls() > 0:
        assert asyncio.get_running_loop().time() < deadline, "the abandoned polls kept their places"
        await asyncio.sleep(0.2)
    assert (await gateway.client.get("/events", params={**params, "after_seq": second["seq"], "wait": 1}, headers=auth)).status_code == 200


async def test_a_long_poll_is_not_answered_by_an_event_its_caller_may_not_see(gateway: Gateway, municipality: str) -> None:
    funder, competitor = await gateway.join("funder", "SE"), await gateway.join("ngo")
    now = datetime.now(timezone.utc).replace(microsecond=0)
    call_id = unique("c")
    published = await gateway.offer(funder, "call.published", {
        "call_id": call_id, "title": {"en": "Care at home"}, "kind": "funding", "opens_at": (now - timedelta(days=1)).isoformat(),
        "deadline": (now + timedelta(days=30)).isoformat(), "deadline_model": "single_stage",
    })
    await gateway.settle()
    loop = asyncio.get_running_loop()

    def poll(institution: str, wait: int) -> asyncio.Task[httpx.Response]:
        params = {"subject": call_id, "after_seq": published["seq"], "wait": wait}
        return asyncio.create_task(gateway.client.get("/events", params=params, headers=gateway.auth(institution), timeout=60))

    started = loop.time()
    theirs, ours = poll(competitor, 3), poll(funder, 30)
    await asyncio.sleep(0.5)
    applied = await gateway.offer(municipality, "call.application_submitted", {"call_id": call_id, "application_id": unique("a")})
    assert [item["event"]["id"] for item in (await ours).json()["items"]] == [applied["id"]]  # the call's publisher sees it
    assert loop.time() - started < 30
    assert (await theirs).json()["items"] == []  # to another member the application does not exist
    assert loop.time() - started >= 3


async def test_an_event_can_be_looked_up_with_its_refusal_and_what_it_led_to(gateway: Gateway) -> None:
    owner = await gateway.join("cooperative")
    outsider = await gateway.join("ngo")
    organiser = await gateway.join("competence_centre")
    practice = project(owner)
    registered = await gateway.offer(owner, "project.registered", practice)
    changed = await gateway.offer(outsider, "project.updated", {
        "project_id": practice["project_id"], "changes": {"title": {"en": "Taken over"}}})
    day_id, registration_id = unique("day"), unique("reg")
    start = datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=30)
    await gateway.offer(organiser, "innovation_day.scheduled", {
        "day_id": day_id, "title": {"en": "Innovation day"}, "format": "innovation_day",
        "starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=6)).isoformat(), "attendance_mode": "online",
        "online_url": "https://meet.example.org/day", "capacity": 10, "registration_deadline": start.isoformat(),
        "themes": ["health_care"], "languages": ["en"]})
    registration = await gateway.offer(owner, "innovation_day.registration_requested", {
        "day_id": day_id, "registration_id": registration_id, "participant": owner, "role": "innovator", "attendees": 1})
    await gateway.settle()
    auth = gateway.auth(outsider)

    def types(outcome: dict[str, Any]) -> list[str]:
        return [item["event"]["type"] for item in outcome["derived"]]

    applied = (await gateway.client.get(f"/events/{registered['id']}", headers=auth)).json()
    assert (applied["seq"], applied["event"]["id"], applied["outcome"]) == (registered["seq"], registered["id"], "applied")
    assert (applied["refusal"], applied["derived"], applied["derived_pending"]) == (None, [], [])

    refused = (await gateway.client.get(f"/events/{changed['id']}", headers=auth)).json()
    assert refused["outcome"] == "refused" and types(refused) == ["project.action_rejected"]
    refusal = refused["refusal"]
    assert refusal == refused["derived"][0] and refusal["seq"] > changed["seq"]
    assert refusal["event"]["source"] == f"/institutions/{owner}"  # in the owner's name, yet found by its sender
    assert refusal["event"]["data"]["rejected_event_id"] == changed["id"]
    assert (refusal["event"]["data"]["actor"], refusal["event"]["data"]["reason"]["code"]) == (outsider, "not_owner")
    title = (await gateway.client.get(f"/projects/{practice['project_id']}", headers=auth)).json()["title"]
    assert title == practice["title"]

    confirmed = (await gateway.client.get(f"/events/{registration['id']}", headers=auth)).json()
    assert confirmed["outcome"] == "applied" and types(confirmed) == ["innovation_day.registration_confirmed"]
    assert confirmed["derived"][0]["event"]["causationid"] == registration["id"]
    own = (await gateway.client.get(f"/events/{refusal['event']['id']}", headers=auth)).json()  # a derived event itself
    assert (own["seq"], own["outcome"]) == (refusal["seq"], "applied")

    missing = problem(await gateway.client.get(f"/events/{unique('e')}", headers=auth), 404, "not_found")
    assert "moments" in missing["detail"]
    problem(await gateway.client.get("/events/not%20an%20id", headers=auth), 422, "invalid")
    problem(await gateway.client.get(f"/events/{registered['id']}"), 401, "unauthorized")


async def test_members_are_listed_by_municipality_level_and_theme(gateway: Gateway) -> None:
    """A network reading the spread by municipality level lists the municipalities of a level (those
    that took nothing up as well), and the members working on a theme (an area takes its sub-themes):
    both parameters were refused."""
    district = await gateway.join("municipality", "TR", municipality_level="district", themes=["health_care.elderly_care"])
    metropolitan = await gateway.join("municipality", "TR", municipality_level="metropolitan", themes=["education.literacy"])
    ngo = await gateway.join("ngo", "TR", themes=["health_care"])
    auth = gateway.auth(ngo)

    async def listed(**params: Any) -> set[str]:
        return {item["id"] for page in await walk(gateway.client, "/institutions", auth, country="TR", **params) for item in page}

    districts = await listed(municipality_level="district")
    assert district in districts and not districts & {metropolitan, ngo}
    caring = await listed(theme="health_care")
    assert {district, ngo} <= caring and metropolitan not in caring
    assert await listed(theme="health_care.elderly_care", municipality_level="district") >= {district}
    wrong = problem(await gateway.client.get("/institutions", params={"municipality_level": "county"}, headers=auth), 422, "invalid")
    assert [e["loc"] for e in wrong["errors"]] == [["query", "municipality_level"]]


async def test_a_former_member_cannot_read_and_is_shown_as_one(gateway: Gateway, municipality: str) -> None:
    leaving = await gateway.join("ngo", "TR", website="https://example.org/ngo")
    auth, reader = gateway.auth(leaving), gateway.auth(municipality)
    assert (await gateway.client.get("/institutions", headers=auth)).status_code == 200
    member = await gateway.client.get(f"/institutions/{leaving}", headers=reader)
    assert member.status_code == 200, member.text
    assert {k: member.json()[k] for k in ("id", "kind", "country", "website", "left_at")} == {
        "id": leaving, "kind": "ngo", "country": "TR", "website": "https://example.org/ngo", "left_at": None}
    await gateway.offer("operator", "institution.left", {"id": leaving, "reason": {"en": "moved on"}})
    await gateway.settle()
    problem(await gateway.client.get("/institutions", headers=auth), 403, "not_member")
    # The log still names it as a source: who it was stays readable, with when it left.
    former = (await gateway.client.get(f"/institutions/{leaving}", headers=reader)).json()
    assert former["id"] == leaving and former["left_at"] is not None
    current = [item["id"] for page in await walk(gateway.client, "/institutions", reader, limit=500) for item in page]
    assert leaving not in current and municipality in current
    problem(await gateway.client.get("/institutions/t-nobody-here", headers=reader), 404, "not_found")
    typo = problem(await gateway.client.get(f"/institutions/{municipality}x", headers=reader), 404, "not_found")
    assert typo["detail"] == f"no institution '{municipality}x'; did you mean {municipality!r}?"
    wrong = problem(await gateway.client.get("/institutions/Not_An_Id", headers=reader), 422, "invalid")
    assert "an institution id" in wrong["detail"]


# --- operations ----------------------------------------------------------------------------------


async def test_the_openapi_document_describes_every_operation_and_parameter(gateway: Gateway) -> None:
    """What a developer reads at /docs: each operation says what it answers, each path and query
    parameter what it selects, and the parameters with a fixed set of values list them (a typo
    is a 422 naming them, not an empty page)."""
    openapi = (await gateway.client.get("/openapi.json")).json()
    undescribed = [
        f"{method.upper()} {path} {parameter['name']}"
        for path, operations in openapi["paths"].items()
        for method, operation in operations.items()
        for parameter in operation.get("parameters", [])
        if parameter["in"] in ("path", "query") and not parameter.get("description")
    ]
    assert undescribed == []
    bare = [f"{method.upper()} {path}" for path, operations in openapi["paths"].items()
            for method, operation in operations.items() if not operation.get("description")]
    assert bare == []
    statuses = {path: next(p for p in ops["get"].get("parameters", []) if p["name"] == "status")
                for path, ops in openapi["paths"].items() if "get" in ops and any(p["name"] == "status" for p in ops["get"].get("parameters", []))}
    assert set(statuses) >= {"/calls", "/projects", "/validations", "/innovation-days", "/applications"}
    for path, parameter in statuses.items():
        assert "enum" in str(parameter["schema"]), path
    member = await gateway.join("university")
    typo = problem(await gateway.client.get("/innovation-days", params={"status": "sheduled"}, headers=gateway.auth(member)), 422,
                   "invalid")
    assert "scheduled" in typo["detail"]


async def test_the_openapi_document_types_offered_events_and_describes_webhook_deliveries(gateway: Gateway, municipality: str) -> None:
    from jsonschema import Draft202012Validator

    openapi = (await gateway.client.get("/openapi.json")).json()
    assert openapi["openapi"].startswith("3.1")  # (webhooks are 3.1's)
    content = openapi["paths"]["/events"]["post"]["requestBody"]["content"]
    assert content["application/cloudevents+json"]["schema"] == {"$ref": "#/components/schemas/CloudEvent"}
    assert content["application/cloudevents-batch+json"]["schema"]["items"] == {"$ref": "#/components/schemas/CloudEvent"}
    envelope_schema = openapi["components"]["schemas"]["CloudEvent"]
    assert {"specversion", "id", "source", "type", "subject", "data"} <= set(envelope_schema["required"])
    validator = Draft202012Validator(envelope_schema)
    offered = envelope("project.registered", municipality, project(municipality))
    assert validator.is_valid(offered), list(validator.iter_errors(offered))
    assert not validator.is_valid({**offered, "colour": "blue"})  # unknown attributes are refused, as by the gate
    assert (await gateway.post(municipality, {**offered, "colour": "blue"})).status_code == 422

    delivery = openapi["webhooks"]["event"]["post"]
    assert {p["name"] for p in delivery["parameters"] if p["required"]} == {"webhook-id", "webhook-timestamp", "webhook-signature",
                                                                             "collabbus-sequence"}
    assert delivery["requestBody"]["content"]["application/cloudevents+json"]["schema"] == {"$ref": "#/components/schemas/CloudEvent"}


async def test_operations_endpoints(gateway: Gateway) -> None:
    client = gateway.client
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready", "checks": {"nats": "ok", "database": "ok", "consumer": "ok"}}
    openapi = (await client.get("/openapi.json")).json()
    assert {"/events", "/projects/{project_id}", "/innovation-days.ics"} <= set(openapi["paths"])
    assert "application/problem+json" in openapi["paths"]["/events"]["post"]["responses"]["422"]["content"]
    for path, operation in ((path, operation) for path, item in openapi["paths"].items() for operation in item.values()):
        for status, response in operation.get("responses", {}).items():  # a page's or a calendar's problems too
            if status.startswith(("4", "5")) and "ProblemDetail" in str(response):
                assert set(response.get("content", {})) == {"application/problem+json"}, (path, status, response)
    unknown = await client.get("/docs/asyncapi", params={"domain": "projekt"})
    assert unknown.status_code == 404 and unknown.headers["content-type"] == "application/problem+json"
    docs = await client.get("/docs")  # its UI from the gateway itself, not a CDN a closed network cannot reach
    assert docs.status_code == 200 and "/docs/static/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
    for asset in ("/docs/static/swagger-ui-bundle.js", "/docs/static/swagger-ui.css", "/docs/static/redoc.standalone.js"):
        served = await client.get(asset)
        assert served.status_code == 200 and len(served.content) > 10_000, asset
    redoc = await client.get("/redoc")
    assert redoc.status_code == 200 and "/docs/static/redoc.standalone.js" in redoc.text and "fonts.googleapis" not in redoc.text
    asyncapi = (await client.get("/asyncapi.json")).json()
    assert asyncapi["asyncapi"].startswith("3.")
    server = next(iter(asyncapi["servers"].values()))
    assert server["host"] == gateway.bus.settings.nats_servers[0].split("://")[-1]  # where this bus's NATS is
    assert "_INBOX.{ID}" in server["description"] and asyncapi["defaultContentType"] == "application/cloudevents+json"
    assert not [m for m in asyncapi["components"]["messages"].values() if "correlationId" in m]
    page = await client.get("/docs/asyncapi")  # rendered by the gateway: no script, nothing fetched from elsewhere
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<script" not in page.text and "src=" not in page.text and not re.search(r'href="(?!#|/)', page.text)
    for key, channel in asyncapi["channels"].items():  # (the verdicts' reply channel has no address of its own)
        assert f'<code class="subject">{html.escape(channel.get("address") or key)}</code>' in page.text
    linked = set(re.findall(r'href="#schema-([^"]+)"', page.text))
    assert linked and linked <= set(re.findall(r'id="schema-([^"]+)"', page.text)) == set(asyncapi["components"]["schemas"])
    assert ".schema:target pre{display:block}" in page.text  # a linked schema shows itself, no script needed
    prose = re.sub(r"<pre>.*?</pre>", "", page.text, flags=re.S)  # (schemas are shown as they are)
    assert "<code>_INBOX.{ID}</code>" in prose and "`" not in prose  # the descriptions' code spans
    # One domain's page: its subjects (offering, the log, the verdicts) and the schemas they use, linked from the whole page.
    domains = sorted({key.split(".")[1] for key in asyncapi["channels"] if key.startswith("log.")})
    assert all(f'href="/docs/asyncapi?domain={name}"' in page.text for name in domains)
    calls = await client.get("/docs/asyncapi", params={"domain": "call"})
    assert calls.status_code == 200 and "<script" not in calls.text and len(calls.text) < len(page.text) / 2
    shown = set(re.findall(r'<code class="subject">([^<]+)</code>', calls.text))
    wanted = {html.escape(channel.get("address") or key) for key, channel in asyncapi["channels"].items()
              if key.startswith(("ingress.call.", "log.call.", "live.call.")) or key == "ingress-reply"}
    assert shown == wanted and any(".call." in subject for subject in shown)
    assert "collab.live.{institution}.call.published.{subject}" in shown and "Following the log (live)" in calls.text
    on_page = set(re.findall(r'id="schema-([^"]+)"', calls.text))
    assert set(re.findall(r'href="#schema-([^"]+)"', calls.text)) <= on_page < set(asyncapi["components"]["schemas"])
    assert {"CallPublished", "AcceptedVerdict"} <= on_page and "ProjectRegistered" not in on_page
    unknown = await client.get("/docs/asyncapi", params={"domain": "calls"})
    assert unknown.status_code == 404 and "call, innovation_day, institution, project, validation" in unknown.json()["detail"]
    interactive = await client.get("/docs/asyncapi/interactive")  # FastStream's page, linked from it
    assert interactive.status_code == 200 and "AsyncApiStandalone" in interactive.text
    assert 'href="/docs/asyncapi/interactive"' in page.text
    metrics = await client.get("/metrics")
    assert "collabbus_http_requests_total" in metrics.text and "collabbus_log_last_seq" in metrics.text
    # counted by route template and status, whatever the path
    assert 'collabbus_http_requests_total{method="GET",route="/healthz",status="200"}' in metrics.text
    await client.get("/projects/no-such-project", headers=gateway.auth("operator"))
    metrics = await client.get("/metrics")
    assert 'route="/projects/{project_id}",status="404"' in metrics.text
    problem(await client.get("/ops/status", headers=gateway.auth(await gateway.join("ngo"))), 403, "operator_only")
    status = (await client.get("/ops/status", headers=gateway.auth("operator"))).json()
    assert status["streams"]["COLLAB_EVENTS"]["last_seq"] > 0
    problem(await client.get("/no-such-thing"), 404, "not_found")


async def test_derived_events_the_relay_has_not_logged_show_in_metrics_and_status(gateway: Gateway, municipality: str) -> None:
    bus = gateway.bus
    relay, service = bus.relay, bus.service
    assert relay is not None and service is not None
    await gateway.settle()
    await relay.stop()  # as when the relay cannot log: the workflows' answers wait in the outbox
    try:
        funder = await gateway.join("funder")
        call_id = await open_funding_call(gateway, funder)
        await gateway.offer(municipality, "call.application_submitted", {"call_id": call_id, "application_id": unique("a")})
        while (await asyncio.to_thread(service.position)) < (await bus.js.stream_info(EVENTS_STREAM)).state.last_seq:
            await asyncio.sleep(0.05)
        waiting = await asyncio.to_thread(service.outbox, peek=True)
        assert any(event_id.startswith("call.application_received.") for event_id, _ in waiting)

        def scraped(text: str, name: str) -> float:
            return next(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)

        metrics = (await gateway.client.get("/metrics")).text
        assert scraped(metrics, "collabbus_outbox_events") == len(waiting)
        assert scraped(metrics, "collabbus_outbox_oldest_age_seconds") > 0
        status = (await gateway.client.get("/ops/status", headers=gateway.auth("operator"))).json()
        assert status["database"]["outbox"]["waiting"] == len(waiting)
        assert status["database"]["outbox"]["oldest"].endswith("Z")
    finally:
        await relay.start()
    await gateway.settle()  # logged once the relay runs again
    metrics = (await gateway.client.get("/metrics")).text
    assert scraped(metrics, "collabbus_outbox_events") == 0 and scraped(metrics, "collabbus_outbox_oldest_age_seconds") == 0
    status = (await gateway.client.get("/ops/status", headers=gateway.auth("operator"))).json()
    assert status["database"]["outbox"] == {"waiting": 0, "oldest": None}


async def test_a_token_tells_whom_it_speaks_for_and_what_its_kind_may_offer(gateway: Gateway, municipality: str) -> None:
    await gateway.settle()  # (until the read models have applied its joining, `institution` is null)
    token = gateway.token(municipality)
    me = await gateway.client.get("/me", headers={"Authorization": f"Bearer {token}"})
    assert me.status_code == 200, me.text
    body = me.json()
    assert (body["id"], body["kind"], body["institution"]["id"], body["institution"]["kind"]) == (
        municipality, "municipality", municipality, "municipality")
    assert {"project.registered", "call.application_submitted", "validation.requested"} <= set(body["may_emit"])
    assert not {"institution.joined", "call.application_received", "validation.decided"} & set(body["may_emit"])
    assert body["may_emit"] == sorted(body["may_emit"])
    assert body["token"]["sha256"] == tokens.token_hash(token)[:12] and body["token"]["expires_at"] is None  # valid until revoked
    assert body["nats"] == {"url": f"nats://{gateway.bus.settings.nats_address}", "ingress": f"collab.ingress.{municipality}.>",
                            "inbox_prefix": f"_INBOX.{municipality}", "live_subjects": public_live_subjects(),
                            "log_requests": f"collab.log.{municipality}"}  # what its NATS credentials allow
    centre = (await gateway.client.get("/me", headers=gateway.auth(await gateway.join("competence_centre")))).json()
    assert {"validation.reviewer_assigned", "validation.decided"} <= set(centre["may_emit"])
    operator = (await gateway.client.get("/me", headers=gateway.auth("operator"))).json()
    assert operator["kind"] == "operator" and "institution.joined" in operator["may_emit"]
    assert "project.registered" in operator["may_emit"] and "call.published" not in operator["may_emit"]
    problem(await gateway.client.get("/me"), 401, "unauthorized")
    gone = await gateway.join("ngo")
    departing = gateway.auth(gone)
    await gateway.offer("operator", "institution.left", {"id": gone, "reason": {"en": "merged"}})
    problem(await gateway.client.get("/me", headers=departing), 403, "not_member")


async def test_the_readiness_check_reports_a_missing_consumer(gateway: Gateway) -> None:
    consumer, gateway.bus.consumer = gateway.bus.consumer, None
    try:
        response = await gateway.client.get("/readyz")
    finally:
        gateway.bus.consumer = consumer
    assert response.status_code == 503 and response.json()["checks"]["consumer"] == "not bound"


def test_the_rate_limit_refills_over_time() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=10, burst=5, clock=lambda: now[0])
    assert limiter.take("a", 5) is None and limiter.take("a") == pytest.approx(0.1)
    now[0] = 0.35  # three tokens back
    assert limiter.take("a", 3) is None and limiter.take("a") is not None
    assert limiter.take("b", 5) is None  # buckets are per institution


def test_an_unavailable_log_is_503_with_retry_after() -> None:
    from bus.verdict import Problem, Verdict
    from connectors.http.problems import rejection

    refused = rejection(Verdict("rejected", "e-1", reason="unavailable", errors=(Problem((), "no log", "log_unavailable"),)))
    response = refused.response()
    assert response.status_code == 503 and "retry-after" in response.headers
    assert orjson.loads(response.body)["errors"] == [{"loc": [], "msg": "no log", "type": "log_unavailable"}]


async def test_an_internal_error_is_a_problem_and_the_connection_stays_open(
    gateway: Gateway, municipality: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import connectors.http.read as read

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug in the read API")

    monkeypatch.setattr(read, "keyset_page", broken)
    token = gateway.token(municipality)
    host, port = gateway.url.removeprefix("http://").rstrip("/").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        request = f"GET {{}} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\r\n"
        answers = []
        for path in ("/projects", "/healthz"):  # two requests on one connection, as a pooled client sends them
            writer.write(request.format(path).encode())
            await writer.drain()
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).decode()
            length = int(next(line.split(":")[1] for line in head.split("\r\n") if line.lower().startswith("content-length")))
            answers.append((head.split(" ")[1], head.lower(), await reader.readexactly(length)))
    finally:
        writer.close()
    (status, head, body), (second, _, _) = answers
    assert status == "500" and "application/problem+json" in head and "connection: close" not in head
    assert orjson.loads(body)["type"] == "urn:collabbus:problem:internal_error"
    assert second == "200"
    assert "a bug in the read API" in caplog.text  # the traceback is in the bus's log


async def test_a_log_sequence_beyond_64_bits_is_a_422(gateway: Gateway, municipality: str) -> None:
    auth = gateway.auth(municipality)
    for params in ({"after_seq": 10**20}, {"cursor": str(10**20)}):
        response = await gateway.client.get("/events", params=params, headers=auth)
        assert response.status_code in (400, 422) and response.headers["content-type"] == "application/problem+json", response.text


async def test_filters_take_only_values_that_can_match(gateway: Gateway, municipality: str) -> None:
    auth = gateway.auth(municipality)
    for path, params in (("/projects", {"status": "bogus"}), ("/calls", {"eligible_kind": "spaceship"}),
                         ("/institutions", {"kind": "spaceship"}), ("/validations", {"status": "pending"}),
                         ("/projects", {"country": "TUR"})):
        response = await gateway.client.get(path, params=params, headers=auth)
        assert response.status_code == 422 and response.headers["content-type"] == "application/problem+json", (path, response.text)
        assert next(iter(params)) in response.json()["detail"]
    wrong_case = await gateway.client.get("/events", params={"type": ["project", "Project"]}, headers=auth)
    assert problem(wrong_case, 422, "invalid")["errors"] == [{  # (the second type given), as webhooks' event_types are told
        "loc": ["query", "type", 1], "type": "unknown_event_type",
        "msg": "'Project' is neither an event type nor a domain such as 'project' or 'project.*'; did you mean 'project'?",
    }]
    practice = project(municipality)
    await gateway.offer(municipality, "project.registered", practice)
    await gateway.settle()
    country = practice["location"]["country"]
    found = {}
    for code in (country, country.lower()):
        pages = await walk(gateway.client, "/projects", auth, country=code, owner=municipality)
        found[code] = [item["project_id"] for page in pages for item in page]
    assert found[country] == found[country.lower()] and practice["project_id"] in found[country]


async def test_a_nul_character_in_an_id_or_a_filter_is_refused_where_postgresql_failed_on_it(gateway: Gateway, municipality: str) -> None:
    """No row has U+0000 (PostgreSQL's text cannot hold it): a path or a query holding it made
    PostgreSQL's driver fail the query, answered 500. It is refused, naming the parameter."""
    auth = gateway.auth(municipality)
    for path, params, loc in (("/projects/a%00b", {}, ["path", "project_id"]), ("/calls/a%00b", {}, ["path", "call_id"]),
                              ("/validations/a%00b", {}, ["path", "validation_id"]), ("/webhooks/a%00b", {}, ["path", "endpoint_id"]),
                              ("/innovation-days/a%00b", {}, ["path", "day_id"]), ("/projects", {"owner": "a\x00b"}, ["query", "owner"]),
                              ("/projects", {"q": "\x00"}, ["query", "q"]), ("/calls", {"q": "kitchen\x00"}, ["query", "q"])):
        refused = problem(await gateway.client.get(path, params=params, headers=auth), 422, "invalid")
        assert [(e["loc"], e["type"]) for e in refused["errors"]] == [(loc, "string_nul")], (path, refused)
    assert (await gateway.client.get("/projects", params={"q": "kitchen"}, headers=auth)).status_code == 200


async def test_a_query_parameter_a_route_does_not_take_is_refused_naming_the_one_meant(gateway: Gateway, municipality: str) -> None:
    """A misspelt filter answered the whole list as if it were the one asked for. Every route of a
    member's API refuses a parameter it does not take, naming the one likely meant and those it
    takes; the operations' pages take whatever probes, browsers and caches add."""
    auth = gateway.auth(municipality)
    typo = problem(await gateway.client.get("/projects", params={"ownr": "fi-tampere", "limit": 1}, headers=auth), 422, "invalid")
    assert typo["errors"] == [{"loc": ["query", "ownr"], "type": "extra_forbidden", "msg": (
        "'ownr' is not a parameter of GET /projects; did you mean 'owner'? "
        "(it takes theme, country, region, municipality, status, owner, partner, adopter, q, limit and cursor)")}]
    unknown = problem(await gateway.client.get("/projects", params={"foo": "bar"}, headers=auth), 422, "invalid")
    assert [e["loc"] for e in unknown["errors"]] == [["query", "foo"]] and "did you mean" not in unknown["detail"]
    for path, params, meant in (
        ("/events", {"after_sq": 1}, "after_seq"),
        ("/calls", {"deadline": "2027-01-20T00:00:00Z"}, "deadline_before"),
        ("/calls/no-call/applications", {"applicnt": municipality}, "applicant"),
        ("/innovation-days.ics", {"tokn": "x"}, "token"),
        ("/webhooks", {"limt": 1}, "limit"),
        ("/webhooks/ep_none/deliveries", {"stauts": "failed"}, "status"),
    ):
        said = problem(await gateway.client.get(path, params=params, headers=auth), 422, "invalid")
        assert f"did you mean {meant!r}?" in said["errors"][0]["msg"], (path, said)
    for path, params, meant in (("/projects", {"status": "activ"}, "active"), ("/calls", {"status": "opne"}, "open")):
        (misspelt,) = problem(await gateway.client.get(path, params=params, headers=auth), 422, "invalid")["errors"]
        assert misspelt["msg"].endswith(f", not {params['status']!r}; did you mean {meant!r}?"), misspelt
    takes_none = problem(await gateway.client.get("/events/no-such-event", params={"verbose": 1}, headers=auth), 422, "invalid")
    assert takes_none["errors"][0]["msg"] == "'verbose' is not a parameter of GET /events/{event_id} (it takes no query parameters)"
    in_the_body = problem(await gateway.client.patch("/webhooks/ep_none", params={"enabled": "false"}, json={}, headers=auth),
                          422, "invalid")
    assert in_the_body["detail"].endswith("(it takes no query parameters: what it is given goes in its JSON body)")
    calendar = await gateway.client.get("/innovation-days.ics", params={"token": gateway.token(municipality), "lang": "fi"})
    assert calendar.status_code == 200, calendar.text
    # A caller without a valid token is told that first, whatever its query.
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        refused = await gateway.client.get("/projects", params={"ownr": municipality}, headers=headers)
        assert refused.status_code == 401, refused.text
    assert (await gateway.client.get("/innovation-days.ics", params={"tokn": gateway.token(municipality)})).status_code == 401
    # The same value twice is that value; two values where one is taken cannot both be meant.
    twice = await gateway.client.get("/projects", params=[("owner", municipality), ("owner", municipality)], headers=auth)
    assert twice.status_code == 200, twice.text
    two = problem(await gateway.client.get("/calls", params=[("status", "open"), ("status", "closed")], headers=auth), 422, "invalid")
    assert two["errors"] == [{"loc": ["query", "status"], "type": "multiple_values",
                              "msg": "'status' is given 2 values, 'open' and 'closed': GET /calls takes one"}]
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/asyncapi.json", "/docs/asyncapi"):
        answer = await gateway.client.get(path, params={"_": "1765000000", "utm_source": "newsletter"})
        assert answer.status_code == 200, (path, answer.text[:500])
    one_domain = await gateway.client.get("/docs/asyncapi", params={"domain": "call", "v": "2"})
    assert one_domain.status_code == 200 and "collab.live.{institution}.call.published.{subject}" in one_domain.text


def test_every_route_of_a_members_api_authenticates_its_caller() -> None:
    """A query parameter a route does not take is refused by the route's authentication, once the
    caller is known (``connectors.http.parameters``): every route checked for it authenticates."""
    from fastapi.routing import APIRoute

    from connectors.http import auth, calendar, events, read
    from connectors.webhooks import api as webhooks

    def calls(dependant: Any) -> list[Any]:
        return [dependant.call, *(call for dependency in dependant.dependencies for call in calls(dependency))]

    every = [route for router in (events.router, read.router, calendar.router, webhooks.router) for route in router.routes]
    routes = [route for route in every if isinstance(route, APIRoute)]
    assert len(routes) == len(every) > 20
    for route in routes:
        found = [call for call in calls(route.dependant) if call in (auth.member, auth.token_holder, auth.calendar_member)]
        assert len(found) == 1, (route.path, found)


async def test_an_invalid_item_of_a_list_is_one_problem_named_by_its_place(gateway: Gateway, municipality: str) -> None:
    practice = project(municipality)
    await gateway.offer(municipality, "project.registered", practice)
    report = {"project_id": practice["project_id"], "period": {"start": "2026-01-01", "end": "2026-06-30"},
              "indicators": [{"name": {"en": "meals served"}, "value": 48200, "unit": "meal"}]}  # a number, not a string
    body = problem(await gateway.post(municipality, envelope("project.impact_reported", municipality, report)), 422, "invalid")
    assert [e["loc"] for e in body["errors"]] == [["data", "indicators", 0, "value"]]  # not also "too short"
    assert body["detail"].startswith("data.indicators.0.value: ")


async def test_what_in_the_log_is_no_event_is_passed_by_the_readers(gateway: Gateway, municipality: str, tmp_path: Path) -> None:
    """Bytes put into the log by hand (the bus's own credentials can): the consumers dead-letter
    them; GET /events, a webhook recovery and `collabbus tail` pass them (they answered 500 and a
    traceback for every page, window and reader that spanned them, for good)."""
    from datetime import datetime, timezone

    since = datetime.now(timezone.utc)
    before = await gateway.offer(municipality, "project.registered", project(municipality))
    junk = await gateway.bus.js.publish(f"collab.events.{municipality}.project.registered.junk", b"\xff\xfe not json",
                                        headers={"Nats-Msg-Id": unique("junk")})
    after = await gateway.offer(municipality, "project.registered", project(municipality))
    auth = gateway.auth(municipality)
    page = await gateway.client.get("/events", params={"after_seq": junk.seq - 2, "limit": 10}, headers=auth)
    assert page.status_code == 200, page.text
    ids = [item["event"]["id"] for item in page.json()["items"]]
    assert before["id"] in ids and after["id"] in ids and junk.seq not in [item["seq"] for item in page.json()["items"]]
    from bus import log
    from connectors.webhooks.dispatcher import logged_between

    recovered = [seq async for seq, _ in logged_between(gateway.bus.js, since, datetime.now(timezone.utc))]  # a recovery's window
    assert junk.seq not in recovered and {before["seq"], after["seq"]} <= set(recovered)
    told: list[int] = []  # what `collabbus tail` prints a warning line for
    tailed = [e.seq async for e in log.read(gateway.bus.js, since=str(junk.seq - 1), on_unreadable=lambda seq, _: told.append(seq))]
    assert junk.seq not in tailed and after["seq"] in tailed and told == [junk.seq]
