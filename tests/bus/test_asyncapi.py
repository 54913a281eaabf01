"""The AsyncAPI document as a client generator reads it (CONTRACT §4): each log event tells its
type, inline schemas carry no titles that would merge different enums into one type, the NATS
headers and the dead-letter subjects are declared."""

from __future__ import annotations

import json
import re
from typing import Any

from bus.asyncapi import asyncapi_document
from bus.gate import typed_envelope
from schemas import registry


def _titles_below(node: Any) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        if isinstance(node.get("title"), str):
            found.append(node["title"])
        for value in node.values():
            found += _titles_below(value)
    elif isinstance(node, list):
        for value in node:
            found += _titles_below(value)
    return found


def test_every_event_schema_pins_its_type_and_dataschema() -> None:
    schemas = asyncapi_document()["components"]["schemas"]
    for type_ in registry.event_types():
        spec = registry.spec_for(type_)
        properties = schemas[typed_envelope(spec).__name__]["properties"]
        assert properties["type"]["const"] == type_
        assert properties["dataschema"]["anyOf"][0]["const"] == spec.dataschema


def test_inline_schemas_have_no_titles_but_properties_named_title_stay() -> None:
    """Pydantic titles an inline enum after its field (every refusal's ``code`` was "Code"); a
    generator then made one type of them all."""
    schemas = asyncapi_document()["components"]["schemas"]
    for name, schema in schemas.items():
        below = {key: value for key, value in schema.items() if key != "title"}
        assert _titles_below(below) == [], name
    assert "title" in schemas["CallPublished"]["properties"]  # a call's title, a field
    codes = [json.dumps(schemas[name]["properties"]["code"]) for name in ("ApplicationRefusal", "RegistrationRefusal")]
    assert "after_deadline" in codes[0] and "not_participant" in codes[1]


def test_the_messages_declare_their_headers_and_the_dead_letters_their_channel() -> None:
    document = asyncapi_document()
    messages = document["components"]["messages"]
    log = messages["log.project.registered"]["headers"]
    assert set(log["required"]) == {"Nats-Msg-Id", "Content-Type"}
    live = messages["live.project.registered"]["headers"]  # what a follower resumes by
    assert {"Nats-Sequence", "Nats-Stream", "Nats-Msg-Id"} <= set(live["required"])
    assert document["channels"]["live.project.registered"]["address"] == "collab.live.{institution}.project.registered.{subject}"
    assert "live.call.application_submitted" not in document["channels"]  # confidential: never on a live subject
    assert "`subject` must be its `data.call_id`" in document["channels"]["ingress.call.application_submitted"]["description"]
    offer = messages["ingress.project.registered"]["headers"]
    assert "^ce-[a-z0-9]+$" in offer["patternProperties"]
    assert offer["properties"]["Content-Type"]["enum"] == ["application/cloudevents+json", "application/json"]
    assert document["channels"]["dead-letters"]["address"] == "collab.dlq.{consumer}"
    assert "Collabbus-Error" in messages["DeadLetter"]["headers"]["properties"]


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        return ([node["$ref"]] if isinstance(node.get("$ref"), str) else []) + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_keys_are_what_asyncapi_allows_and_every_reference_resolves() -> None:
    """AsyncAPI 3.0 keys are ``[A-Za-z0-9._-]``: validators and code generators refuse the
    ``ingress:{type}:SubscribeMessage`` FastStream writes."""
    document = asyncapi_document()
    key = re.compile(r"^[A-Za-z0-9._-]+$")
    sections = {"channels": document["channels"], "operations": document["operations"], **{
        f"components.{name}": items for name, items in document["components"].items()}}
    for section, items in sections.items():
        assert [name for name in items if not key.match(name)] == [], section
    assert "ingress.project.registered" in document["operations"] and "log.project.registered" in document["channels"]
    assert document["components"]["messages"]["ingress.project.registered"]["title"] == "project.registered (offered)"
    refs = _refs(document)
    assert len(refs) > 100
    for ref in refs:
        node: Any = document
        for part in ref.removeprefix("#/").split("/"):
            assert isinstance(node, dict) and part in node, ref
            node = node[part]


def test_the_verdict_is_one_of_two_shapes_told_apart_by_status() -> None:
    from jsonschema import Draft202012Validator

    from bus.verdict import Problem, Verdict

    schemas = asyncapi_document()["components"]["schemas"]
    assert schemas["Verdict"]["discriminator"] == "status"  # AsyncAPI's form: the property's name
    assert schemas["Verdict"]["oneOf"] == [{"$ref": "#/components/schemas/AcceptedVerdict"}, {"$ref": "#/components/schemas/RejectedVerdict"}]

    def validator(name: str) -> Any:  # the component, its references resolved within the document
        return Draft202012Validator({**schemas[name], "components": {"schemas": schemas}})

    accepted, rejected = validator("AcceptedVerdict"), validator("RejectedVerdict")
    ok = Verdict("accepted", "e-1", seq=7).as_dict()
    refused = Verdict("rejected", "e-2", errors=(Problem(("data", "title"), "missing", "missing"),), reason="invalid").as_dict()
    assert accepted.is_valid(ok) and not rejected.is_valid(ok)
    assert rejected.is_valid(refused) and not accepted.is_valid(refused)
    assert not rejected.is_valid({**refused, "errors": [{"loc": [], "msg": "no type"}]})


def test_every_process_writes_the_same_document() -> None:
    """Processes hash strings differently (PYTHONHASHSEED): the document does not follow it, so
    a committed copy or a generated client changes only with the catalog."""
    import os
    import subprocess
    import sys

    written = [
        subprocess.run([sys.executable, "-m", "ops", "asyncapi"], env={**os.environ, "PYTHONHASHSEED": seed},
                       capture_output=True, check=True, timeout=120).stdout
        for seed in ("1", "2")
    ]
    assert written[0] == written[1] and json.loads(written[0])["channels"]
    assert list(json.loads(written[0])["channels"]) == sorted(json.loads(written[0])["channels"])
