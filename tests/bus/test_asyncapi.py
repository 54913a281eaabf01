"""The AsyncAPI document as a client generator reads it (CONTRACT §4): each log event tells its
type, inline schemas carry no titles that would merge different enums into one type, the NATS
headers and the dead-letter subjects are declared."""

from __future__ import annotations

import json
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
    log = messages["log:project.registered:Message"]["headers"]
    assert set(log["required"]) == {"Nats-Msg-Id", "Content-Type"}
    offer = messages["ingress:project.registered:SubscribeMessage"]["headers"]
    assert "^ce-[a-z0-9]+$" in offer["patternProperties"]
    assert offer["properties"]["Content-Type"]["enum"] == ["application/cloudevents+json", "application/json"]
    assert document["channels"]["dead-letters"]["address"] == "collab.dlq.{consumer}"
    assert "Collabbus-Error" in messages["DeadLetter"]["headers"]["properties"]
