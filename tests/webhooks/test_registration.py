"""Registering webhook endpoints (CONTRACT §6): each belongs to the token's institution, and only
targets that may receive webhooks are accepted."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from nats.errors import NoServersError

from tests.connectors.test_gateway import problem
from tests.webhooks.conftest import Network, Receiver, register


async def test_an_institution_manages_its_own_endpoints(network: Network, receiver: Receiver) -> None:
    gateway = await network.start()
    owner, other = await gateway.join("municipality"), await gateway.join("ngo")
    auth, foreign = gateway.auth(owner), gateway.auth(other)

    response = await gateway.client.post("/webhooks", headers=auth, json={
        "url": receiver.url("/hooks"), "event_types": ["project.*", "call.published", "validation", "project"], "description": "test"})
    assert response.status_code == 201, response.text
    created = response.json()
    assert response.headers["location"] == f"/webhooks/{created['id']}"  # where the new endpoint is
    assert created["id"].startswith("ep_") and created["enabled"] is True and created["disabled_at"] is None
    # A bare domain, as /events?type= takes it, is the domain's wildcard; each is kept once.
    assert created["event_types"] == ["project.*", "call.published", "validation.*"] and created["description"] == "test"
    assert created["secret"].startswith("whsec_") and len(base64.b64decode(created["secret"][6:])) >= 24
    endpoint = f"/webhooks/{created['id']}"

    listed = (await gateway.client.get("/webhooks", headers=auth)).json()
    assert [e["id"] for e in listed["items"]] == [created["id"]] and listed["next_cursor"] is None
    assert "secret" not in listed["items"][0]
    shown = (await gateway.client.get(endpoint, headers=auth)).json()
    assert "secret" not in shown and shown["url"] == receiver.url("/hooks")

    # Another member sees nothing of it.
    assert (await gateway.client.get("/webhooks", headers=foreign)).json()["items"] == []
    for method, path, body in [
        ("GET", endpoint, None), ("PATCH", endpoint, {"description": "mine"}), ("DELETE", endpoint, None),
        ("GET", f"{endpoint}/deliveries", None), ("POST", f"{endpoint}/deliveries/1/resend", None),
        ("POST", f"{endpoint}/recover", {"since": "2026-01-01T00:00:00Z"}),
    ]:
        problem(await gateway.client.request(method, path, json=body, headers=foreign), 404, "not_found")

    changed = await gateway.client.patch(endpoint, json={"description": "kitchens", "event_types": ["project.registered"]}, headers=auth)
    assert changed.status_code == 200, changed.text
    assert changed.json()["description"] == "kitchens" and changed.json()["event_types"] == ["project.registered"]
    assert changed.json()["secret"] is None
    disabled = (await gateway.client.patch(endpoint, json={"enabled": False}, headers=auth)).json()
    assert disabled["enabled"] is False and disabled["disabled_reason"] == "disabled by its owner"
    assert disabled["disabled_at"] is not None and disabled["disabled_at"] >= created["created_at"]
    enabled = (await gateway.client.patch(endpoint, json={"enabled": True}, headers=auth)).json()
    assert enabled["enabled"] is True and enabled["disabled_reason"] is None
    assert enabled["disabled_at"] == disabled["disabled_at"]  # from when to recover what it missed

    rotated = (await gateway.client.patch(endpoint, json={"rotate_secret": True}, headers=auth)).json()
    assert rotated["secret"].startswith("whsec_") and rotated["secret"] != created["secret"]
    assert rotated["previous_secret_until"] is not None

    assert (await gateway.client.delete(endpoint, headers=auth)).status_code == 204
    problem(await gateway.client.get(endpoint, headers=auth), 404, "not_found")


async def test_bad_registrations_are_refused_with_problems(network: Network, receiver: Receiver) -> None:
    gateway = await network.start()
    owner = await gateway.join("municipality")
    auth = gateway.auth(owner)

    async def refused(body: dict[str, object], kind: str) -> dict[str, Any]:
        return problem(await gateway.client.post("/webhooks", json=body, headers=auth), 422, kind)

    body = await refused({"url": receiver.url("/"), "event_types": ["project.registerd", "nothing.*", "call.*"]}, "invalid")
    assert [e["loc"] for e in body["errors"]] == [["event_types", 0], ["event_types", 1]]
    assert "did you mean 'project.registered'?" in body["errors"][0]["msg"]  # a typo: named
    assert "did you mean" not in body["errors"][1]["msg"]  # nothing near
    body = await refused({"url": receiver.url("/"), "event_types": ["validaton.*"]}, "invalid")
    assert body["errors"][0]["msg"].endswith("did you mean 'validation.*'?")
    for everything in ("*", "*.*"):  # a wildcard for every type: told how that is asked for
        body = await refused({"url": receiver.url("/"), "event_types": [everything]}, "invalid")
        assert body["errors"][0]["msg"] == (f"{everything!r} is neither an event type nor a domain such as 'project' or "
                                            "'project.*'; every type is asked for by leaving event_types out (or [])")
    for url in ("ftp://127.0.0.1/x", "not a url", "http:///path"):
        await refused({"url": url}, "refused_target")
    with_credentials = await refused({"url": receiver.url("/").replace("http://", "http://user:secret@")}, "refused_target")
    assert "password" in with_credentials["detail"] and "secret" not in with_credentials["detail"]
    await refused({"url": "http://no-such-host.invalid/hook"}, "refused_target")
    # U+0000, which PostgreSQL's text cannot hold (it answered 500 there), in a description or a change of it.
    nul = await refused({"url": receiver.url("/"), "description": "Hook\u0000"}, "invalid")
    assert [(e["loc"], e["type"]) for e in nul["errors"]] == [(["description"], "string_nul")]
    endpoint = (await register(gateway, owner, receiver.url("/")))["id"]
    nul = problem(await gateway.client.patch(f"/webhooks/{endpoint}", json={"description": "\u0000"}, headers=auth), 422, "invalid")
    assert [(e["loc"], e["type"]) for e in nul["errors"]] == [(["description"], "string_nul")]
    malformed = await gateway.client.post("/webhooks", content=b'{"url": ', headers={**auth, "content-type": "application/json"})
    body = problem(malformed, 400, "malformed")  # as POST /events answers what is not JSON
    assert body["detail"] == "the body is not valid JSON: expecting value at character 8"  # (FastAPI's: "8: JSON decode error")
    assert body["errors"] == [{"loc": [], "msg": body["detail"], "type": "json_invalid"}]
    as_form = await gateway.client.post("/webhooks", content=b'{"url": "http://x"}', headers={  # curl -d without -H
        **auth, "content-type": "application/x-www-form-urlencoded"})
    assert "Content-Type: application/json" in problem(as_form, 415, "unsupported")["detail"]
    problem(await gateway.client.post("/webhooks", json={"url": receiver.url("/")}), 401, "unauthorized")
    extra = problem(await gateway.client.post("/webhooks", json={"url": receiver.url("/"), "secret": "mine"}, headers=auth),
                    422, "invalid")
    assert [e["loc"] for e in extra["errors"]] == [["secret"]]  # named as the service's own checks name places


async def test_loopback_targets_are_refused_unless_allowed(network: Network, receiver: Receiver) -> None:
    gateway = await network.start(allow=[])
    owner = await gateway.join("municipality")
    for url in (receiver.url("/hook"), receiver.url("/hook", host="localhost"), "http://[::1]/", "http://10.1.2.3/",
                "http://169.254.169.254/latest/meta-data", "http://[::ffff:127.0.0.1]/"):
        response = await gateway.client.post("/webhooks", json={"url": url}, headers=gateway.auth(owner))
        body = problem(response, 422, "refused_target")
        assert "COLLABBUS_WEBHOOK_ALLOW_NETWORKS" in body["detail"], body  # says why, and what would allow it
    assert (await gateway.client.get("/webhooks", headers=gateway.auth(owner))).json()["items"] == []


async def test_the_bodies_take_json_booleans_and_times_as_rfc_3339_text_only(network: Network, receiver: Receiver) -> None:
    """What pydantic's lax mode would read as a boolean ("no", "off", 0) or a time (a Unix
    timestamp) is refused, and changes nothing."""
    gateway = await network.start()
    owner = await gateway.join("municipality")
    auth = gateway.auth(owner)
    created = await register(gateway, owner, receiver.url("/strict"))
    endpoint = f"/webhooks/{created['id']}"

    for change in ({"enabled": "no"}, {"enabled": "off"}, {"enabled": 0}, {"enabled": "true"}, {"ordered": "yes"},
                   {"ordered": 0}, {"rotate_secret": "true"}, {"rotate_secret": 1}):
        refused = problem(await gateway.client.patch(endpoint, json=change, headers=auth), 422, "invalid")
        (name,) = change
        given = "a string" if isinstance(change[name], str) else "a number"
        assert refused["errors"] == [{"loc": [name], "msg": f"Input should be a valid boolean, not {given}",
                                      "type": "bool_type"}], change
    shown = (await gateway.client.get(endpoint, headers=auth)).json()
    assert shown["enabled"] is True and shown["ordered"] is True and shown["disabled_reason"] is None
    assert shown["previous_secret_until"] is None
    refused = problem(await gateway.client.post("/webhooks", json={"url": receiver.url("/"), "ordered": "no"}, headers=auth),
                      422, "invalid")
    assert [(e["loc"], e["type"]) for e in refused["errors"]] == [(["ordered"], "bool_type")]
    refused = problem(await gateway.client.post("/webhooks", json={"url": receiver.url("/"), "event_types": "project.*"},
                                                headers=auth), 422, "invalid")
    assert [(e["loc"], e["type"]) for e in refused["errors"]] == [(["event_types"], "list_type")]
    assert [e["id"] for e in (await gateway.client.get("/webhooks", headers=auth)).json()["items"]] == [created["id"]]

    for since in (1767225600, "1767225600", "2026-01-01 00:00:00Z"):
        refused = problem(await gateway.client.post(f"{endpoint}/recover", json={"since": since}, headers=auth), 422, "invalid")
        assert [e["loc"] for e in refused["errors"]] == [["since"]], since
    refused = problem(await gateway.client.post(f"{endpoint}/recover", json={"since": "2026-01-01T00:00:00Z", "until": 1767312000},
                                                headers=auth), 422, "invalid")
    assert [e["loc"] for e in refused["errors"]] == [["until"]]
    recovered = await gateway.client.post(f"{endpoint}/recover", json={"since": "2026-01-01T00:00:00Z", "until": "2026-01-02T00:00:00+02:00"},
                                          headers=auth)
    assert recovered.status_code == 202, recovered.text
    changed = await gateway.client.patch(endpoint, json={"enabled": False, "ordered": False, "rotate_secret": True}, headers=auth)
    assert changed.status_code == 200, changed.text
    assert changed.json()["enabled"] is False and changed.json()["ordered"] is False and changed.json()["secret"]


async def test_an_unknown_field_in_a_body_is_named_with_the_fields_taken_and_the_one_meant(network: Network, receiver: Receiver) -> None:
    gateway = await network.start()
    owner = await gateway.join("municipality")
    auth = gateway.auth(owner)
    created = await register(gateway, owner, receiver.url("/fields"))
    endpoint = f"/webhooks/{created['id']}"

    refused = problem(await gateway.client.post("/webhooks", json={"url": receiver.url("/"), "secret": "mine", "evnet_types": []},
                                                headers=auth), 422, "invalid")
    said = {tuple(e["loc"]): e for e in refused["errors"]}
    assert said[("secret",)] == {"loc": ["secret"], "type": "extra_forbidden",
                                 "msg": "'secret' is not a field of the body (it takes url, event_types, description, ordered)"}
    assert said[("evnet_types",)]["msg"] == (
        "'evnet_types' is not a field of the body; did you mean 'event_types'? (it takes url, event_types, description, ordered)")
    assert said[("evnet_types",)]["type"] == "extra_forbidden" and set(said) == {("secret",), ("evnet_types",)}
    assert "did you mean 'event_types'?" in refused["detail"]

    refused = problem(await gateway.client.patch(endpoint, json={"enabeld": False}, headers=auth), 422, "invalid")
    assert refused["errors"] == [{"loc": ["enabeld"], "type": "extra_forbidden", "msg": (
        "'enabeld' is not a field of the body; did you mean 'enabled'? "
        "(it takes url, event_types, description, enabled, ordered, rotate_secret)")}]
    assert (await gateway.client.get(endpoint, headers=auth)).json()["enabled"] is True

    refused = problem(await gateway.client.post(f"{endpoint}/recover", json={"sinse": "2026-01-01T00:00:00Z"}, headers=auth),
                      422, "invalid")
    assert refused["errors"] == [{"loc": ["sinse"], "type": "extra_forbidden", "msg": (
        "'sinse' is not a field of the body; did you mean 'since'? (it takes since, until, after_seq, until_seq)")}]
    refused = problem(await gateway.client.post(f"{endpoint}/recover", json={"until": "2026-01-01T00:00:00Z"}, headers=auth),
                      422, "invalid")
    assert refused["errors"] == [{"loc": ["since"], "type": "missing", "msg": "since or after_seq is required: where the window starts"}]
    refused = problem(await gateway.client.post(f"{endpoint}/recover", json={"after_seq": 5, "until_seq": 4}, headers=auth),
                      422, "invalid")
    assert refused["errors"] == [{"loc": ["until_seq"], "type": "invalid_window", "msg": "before after_seq"}]


async def test_what_a_body_that_cannot_be_read_is_answered_is_in_the_api_description(network: Network, receiver: Receiver) -> None:
    """A body that is not JSON (400), one sent as another media type or none at all (415): each
    answer is one the OpenAPI document lists for the operation."""
    gateway = await network.start()
    owner = await gateway.join("municipality")
    auth = gateway.auth(owner)
    created = await register(gateway, owner, receiver.url("/described"))
    paths = (await gateway.client.get("/openapi.json")).json()["paths"]
    operations = [("POST", "/webhooks", "/webhooks"), ("PATCH", f"/webhooks/{created['id']}", "/webhooks/{endpoint_id}"),
                  ("POST", f"/webhooks/{created['id']}/recover", "/webhooks/{endpoint_id}/recover")]
    for method, path, template in operations:
        documented = paths[template][method.lower()]["responses"]
        not_json = await gateway.client.request(method, path, content=b'{"url":', headers={**auth, "content-type": "application/json"})
        problem(not_json, 400, "malformed")
        as_text = await gateway.client.request(method, path, content=b'{"url": "http://x"}', headers={**auth, "content-type": "text/plain"})
        assert problem(as_text, 415, "unsupported")["detail"] == (
            "the body is read as JSON: send it with Content-Type: application/json (not text/plain)")
        for status in (400, 415):
            assert str(status) in documented, (method, template, status)
            assert "application/problem+json" in documented[str(status)]["content"]
    nothing = await gateway.client.post(f"/webhooks/{created['id']}/recover", headers=auth)
    assert problem(nothing, 415, "unsupported")["detail"] == (
        "the request has no body and no Content-Type: send the body as JSON, with Content-Type: application/json")


async def test_a_change_naming_the_endpoints_present_state_neither_asks_where_the_log_is_nor_moves_its_places(
    network: Network, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A form that sends every field sends ``enabled`` as it is: that changes nothing of where the
    endpoint was disabled or enabled, so it is answered while NATS does not answer, and the
    endpoint's places in the log stay as they were."""
    gateway = await network.start()
    owner = await gateway.join("municipality")
    auth = gateway.auth(owner)
    path = f"/webhooks/{(await register(gateway, owner, receiver.url('/same')))['id']}"
    disabled = (await gateway.client.patch(path, json={"enabled": False}, headers=auth)).json()
    enabled = (await gateway.client.patch(path, json={"enabled": True}, headers=auth)).json()
    assert enabled["enabled"] is True and enabled["enabled_after_seq"] is not None

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise NoServersError()

    assert gateway.bus is not None
    with monkeypatch.context() as nats_down:
        nats_down.setattr(gateway.bus.js, "stream_info", unreachable)
        same = await gateway.client.patch(path, json={"enabled": True, "description": "kitchens"}, headers=auth)
        assert same.status_code == 200, same.text
    assert same.json()["description"] == "kitchens" and same.json()["enabled"] is True
    assert (same.json()["disabled_after_seq"], same.json()["enabled_after_seq"]) == (disabled["disabled_after_seq"],
                                                                                     enabled["enabled_after_seq"])

    again = (await gateway.client.patch(path, json={"enabled": False}, headers=auth)).json()
    with monkeypatch.context() as nats_down:
        nats_down.setattr(gateway.bus.js, "stream_info", unreachable)
        same = await gateway.client.patch(path, json={"enabled": False, "description": "paused"}, headers=auth)
        assert same.status_code == 200, same.text
    assert same.json()["enabled"] is False and same.json()["disabled_at"] == again["disabled_at"]
    assert (same.json()["disabled_after_seq"], same.json()["enabled_after_seq"]) == (again["disabled_after_seq"], None)


async def test_a_member_has_at_most_so_many_endpoints(network: Network, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each endpoint is sent every event it asks for by the bus's one dispatcher: a member could
    register endpoints without end (a script's loop), and slow every other member's deliveries."""
    from connectors.webhooks import api

    monkeypatch.setattr(api, "MAX_ENDPOINTS", 2)
    gateway = await network.start()
    owner, other = await gateway.join("municipality"), await gateway.join("ngo")
    first = await register(gateway, owner, receiver.url("/a"))
    await register(gateway, owner, receiver.url("/b"))
    refused = await gateway.client.post("/webhooks", json={"url": receiver.url("/c")}, headers=gateway.auth(owner))
    said = problem(refused, 409, "conflict")
    assert said["detail"].startswith(f"{owner} has 2 webhook endpoints, as many as a member may have: delete one"), said
    await register(gateway, other, receiver.url("/c"))  # another member's are its own
    assert (await gateway.client.patch(f"/webhooks/{first['id']}", json={"enabled": False}, headers=gateway.auth(owner))).status_code == 200
    problem(await gateway.client.post("/webhooks", json={"url": receiver.url("/c")}, headers=gateway.auth(owner)), 409, "conflict")
    assert (await gateway.client.delete(f"/webhooks/{first['id']}", headers=gateway.auth(owner))).status_code == 204
    await register(gateway, owner, receiver.url("/c"))
