"""The event catalog: frozen data models per domain and the registry that maps types to them."""

from schemas.common import EventData
from schemas.registry import (
    REGISTRY,
    EventSpec,
    UnknownEventType,
    UnknownMajorVersion,
    event_types,
    export_json_schemas,
    json_schema,
    may_emit,
    parse_dataschema,
    spec_for,
)

__all__ = [
    "REGISTRY",
    "EventData",
    "EventSpec",
    "UnknownEventType",
    "UnknownMajorVersion",
    "event_types",
    "export_json_schemas",
    "json_schema",
    "may_emit",
    "parse_dataschema",
    "spec_for",
]
