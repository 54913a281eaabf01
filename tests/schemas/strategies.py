"""Data of every catalog type as a partner's own validator would take it: drawn from the JSON
Schemas the bus publishes (Schemathesis's generator, given each schema as an OpenAPI request
body), with texts of any Unicode."""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

import schemathesis
from hypothesis import strategies as st

from schemas import registry


UNSTATABLE = (
    # The order of two times or dates: JSON Schema compares no two values.
    "must be after",
    "must not be after",
    "must not be before",
    # Two fields naming different institutions.
    "must be different institutions",
    # A moment a day or more inside the years 1 to 9999 once its offset is applied.
    "not a day or more inside the years 1 to 9999",
)
"""What the gate refuses that the JSON Schemas cannot state, by the words of its messages."""


def _refs_to_components(schema: Any, type_: str) -> Any:
    """A schema's `#/$defs/X` as `#/components/schemas/{type_}.X`, where an OpenAPI document keeps it."""
    if isinstance(schema, dict):
        return {key: f"#/components/schemas/{type_}.{value.rsplit('/', 1)[-1]}" if key == "$ref" else _refs_to_components(value, type_)
                for key, value in schema.items()}
    if isinstance(schema, list):
        return [_refs_to_components(item, type_) for item in schema]
    return schema


@cache
def _catalog() -> Any:
    paths: dict[str, Any] = {}
    components: dict[str, Any] = {}
    for type_ in registry.event_types():
        schema = copy.deepcopy(registry.json_schema(type_))
        del schema["$schema"], schema["$id"]
        for name, definition in schema.pop("$defs", {}).items():
            components[f"{type_}.{name}"] = _refs_to_components(definition, type_)
        body = {"required": True, "content": {"application/json": {"schema": _refs_to_components(schema, type_)}}}
        paths[f"/{type_}"] = {"post": {"requestBody": body, "responses": {"200": {"description": "taken"}}}}
    document = {"openapi": "3.1.0", "info": {"title": "collabbus catalog", "version": "1"},
                "paths": paths, "components": {"schemas": components}}
    return schemathesis.openapi.from_dict(document)


def catalog_data(type_: str) -> st.SearchStrategy[dict[str, Any]]:
    """The `data` of a `type_` event, valid by its published JSON Schema."""
    return _catalog()[f"/{type_}"]["POST"].as_strategy().map(lambda case: case.body)
