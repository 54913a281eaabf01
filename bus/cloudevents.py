"""Reading CloudEvents off the wire: structured JSON and binary mode (``ce-`` headers).

Binary mode follows the CloudEvents NATS binding draft (also the HTTP binding): every context
attribute is a ``ce-<name>`` header whose value is percent-encoded; ``data`` is the body. A plain
``Content-Type`` such as ``application/json`` is the datacontenttype, as the Go SDK sends it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote_to_bytes

import orjson

from schemas.common import json_type
from schemas.envelope import ATTRIBUTES, STRUCTURED_CONTENT_TYPE


class Malformed(ValueError):
    """The bytes are not a CloudEvent at all (bad JSON, bad UTF-8, bad header encoding)."""

    def __init__(self, code: str, msg: str, loc: tuple[str | int, ...] = ()) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.loc = loc


def header(headers: Mapping[str, str] | None, name: str) -> str | None:
    """Case-insensitive header lookup."""
    if not headers:
        return None
    value = headers.get(name)
    if value is not None:
        return value
    lname = name.lower()
    for key, val in headers.items():
        if key.lower() == lname:
            return val
    return None


def loads(body: bytes, what: str = "body", at: tuple[str | int, ...] = ()) -> Any:
    """Parse JSON, telling invalid UTF-8 apart from invalid JSON, and refusing an object that
    names a member twice (:func:`_names_twice`; ``at``: where the text is in the event)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as uexc:
            raise Malformed("utf8_invalid", f"the {what} is not valid UTF-8 (byte {uexc.start})") from None
        raise Malformed("json_invalid", f"the {what} is not valid JSON: {exc}") from None
    if len(_NAME_ENDS.findall(body)) != _members(value):
        _names_twice(body, what, at)
    return value


_NAME_ENDS = re.compile(rb'"\s*:')
"""Where a member's name ends in JSON text, and where a string holds the same characters: at least
as many as the members parsed, as many only when no object names a member twice."""


def _members(value: Any) -> int:
    """How many members the objects in ``value`` have in all (without recursion: JSON may nest
    deeper than the interpreter's stack)."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if type(item) is dict:
            count += len(item)
            stack += [inner for inner in item.values() if type(inner) is dict or type(inner) is list]
        elif type(item) is list:
            stack += [inner for inner in item if type(inner) is dict or type(inner) is list]
    return count


class _Twice(dict):  # type: ignore[type-arg]
    """An object of JSON text that names ``name`` more than once."""

    name: str


def _names_twice(body: bytes, what: str, at: tuple[str | int, ...]) -> None:
    """Refuse JSON text with an object that names a member twice (``{"id": "a", "id": "b"}``):
    JSON's parsers differ on which one counts (the last, the first, an error), so what its sender
    meant — or what a proxy before the bus checked — cannot be told."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        kept = dict(items)
        if len(kept) == len(items):
            return kept
        twice = _Twice(kept)
        seen: set[str] = set()
        twice.name = next(name for name, _ in items if name in seen or seen.add(name))  # type: ignore[func-returns-value]
        return twice

    try:
        found = _first_twice(json.loads(body, object_pairs_hook=pairs))
    except RecursionError:  # (orjson reads up to 1,024 levels, the interpreter's recursion not quite)
        raise Malformed("json_invalid", f"the {what} is nested too deeply") from None
    if found is not None:
        loc, name = (*at, *found[0]), found[1]
        place = f" (at {'.'.join(map(str, loc))})" if loc else ""
        raise Malformed("duplicate_name", f"the {what} names {name!r} twice in one object{place}: which one is meant "
                        "cannot be told", loc)


def _first_twice(value: Any) -> tuple[tuple[str | int, ...], str] | None:
    """Where the first object naming a member twice is in ``value``, and the name."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, loc = stack.pop()
        if isinstance(item, _Twice):
            return loc, item.name
        inner = item.items() if isinstance(item, dict) else enumerate(item) if isinstance(item, list) else ()
        stack += reversed([(each, (*loc, key)) for key, each in inner])
    return None


def _says_structured(headers: Mapping[str, str] | None) -> bool:
    return (header(headers, "content-type") or "").strip().lower().startswith("application/cloudevents")


def _has_attributes(headers: Mapping[str, str] | None) -> bool:
    return any(key.lower().startswith("ce-") for key in (headers or {}))


def is_structured(headers: Mapping[str, str] | None) -> bool:
    """Structured mode unless the message carries binary-mode ``ce-`` attributes."""
    return _says_structured(headers) or not _has_attributes(headers)


def names_mode(headers: Mapping[str, str] | None) -> bool:
    """Whether a message says which mode it is in (a cloudevents Content-Type or ``ce-`` headers);
    one that says neither is read as structured (:func:`is_structured`)."""
    return _says_structured(headers) or _has_attributes(headers)


def ignores_attributes(headers: Mapping[str, str] | None) -> bool:
    """Whether a message carries ``ce-`` headers that are not read: its Content-Type says it is a
    structured event, whose attributes are all in the body."""
    return _says_structured(headers) and _has_attributes(headers)


def parse_structured(body: bytes) -> dict[str, Any]:
    """A structured-mode CloudEvent: the whole event is one JSON object."""
    event = loads(body)
    if not isinstance(event, dict):
        raise Malformed("json_invalid", f"a structured CloudEvent is a JSON object, not {json_type(event)}")
    return event


_STRAY_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode_header_value(name: str, value: str) -> str:
    if not value.isascii():
        raise _outside_ascii(name, value)
    if "%" in value and _STRAY_PERCENT.search(value):
        raise Malformed(
            "percent_encoding_invalid",
            f"header ce-{name} has a '%' not followed by two hex digits: its value is percent-encoded "
            "(a '%' itself is %25)", (name,),
        )
    try:
        return unquote_to_bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("utf8_invalid", f"header ce-{name} is not percent-encoded UTF-8", (name,)) from None


def _outside_ascii(name: str, value: str) -> Malformed:
    """A ``ce-`` header's value holding more than ASCII, which the bindings percent-encode: bytes
    that are not UTF-8 (nats-py reads them as U+FFFD), or UTF-8 sent as it is (read as Latin-1
    over HTTP, as UTF-8 over NATS)."""
    if "\ufffd" in value:
        return Malformed("utf8_invalid", f"header ce-{name} holds bytes that are not UTF-8: a value is percent-encoded "
                         "UTF-8 (é is %C3%A9)", (name,))
    try:
        value = value.encode("latin-1").decode("utf-8")  # (UTF-8 read as Latin-1, as HTTP's are: the character sent)
    except UnicodeError:
        pass
    first = next(c for c in value if not c.isascii())
    return Malformed("percent_encoding_invalid", f"header ce-{name} holds {first!r}, outside ASCII: a value is "
                     "percent-encoded UTF-8 (é is %C3%A9)", (name,))


def parse_binary(body: bytes, headers: Mapping[str, str]) -> dict[str, Any]:
    """A binary-mode CloudEvent: attributes in ``ce-`` headers, the data in the body."""
    event: dict[str, Any] = {}
    for key, value in headers.items():
        lkey = key.lower()
        if lkey.startswith("ce-"):
            name = lkey[3:]
            if name == "data":
                raise Malformed("data_in_header", "in binary mode the data is the body, not a ce-data header", ("data",))
            event[name] = _decode_header_value(name, value)
    content_type = header(headers, "content-type")
    if "datacontenttype" not in event and content_type:
        event["datacontenttype"] = content_type.split(";")[0].strip()
    if body:
        event["data"] = loads(body, "data", ("data",))
    return event


def unsupported_content_type(headers: Mapping[str, str] | None) -> str | None:
    """Why a message's Content-Type cannot be read as one event (None: it can): a batch, a
    structured format other than JSON, a charset other than UTF-8."""
    media, _, parameters = (header(headers, "content-type") or "").partition(";")
    media = media.strip().lower()
    if media == "application/cloudevents-batch+json":
        return "a batch (application/cloudevents-batch+json) is offered over HTTP (POST /events); over NATS, one event a message"
    if media.startswith("application/cloudevents") and media != "application/cloudevents+json":
        return f"{media} is not supported: a structured event is application/cloudevents+json"
    if media and _has_attributes(headers) and media != "application/json" and not media.endswith("+json"):
        return f"{media} is not accepted: an event's data is JSON (ce- headers with application/json data)"
    for parameter in parameters.split(";"):
        name, _, value = parameter.partition("=")
        charset = value.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            return f"charset {charset} is not supported: events are UTF-8"
    return None


def offered_id(headers: Mapping[str, str] | None) -> str | None:
    """The ``ce-id`` of a binary-mode message when it can be read: the id a refusal names even
    when the data or another attribute cannot be read."""
    value = header(headers, "ce-id") if not is_structured(headers) else None
    try:
        return unquote_to_bytes(value).decode("utf-8") if value is not None else None
    except UnicodeDecodeError:
        return None


def parse(body: bytes, headers: Mapping[str, str] | None) -> dict[str, Any]:
    """Parse a CloudEvent in whichever mode the message uses."""
    if is_structured(headers):
        return parse_structured(body)
    assert headers is not None
    return parse_binary(body, headers)


def plain_json_content_type(event: dict[str, Any]) -> bool:
    """A ``datacontenttype`` of JSON with its own charset said (``application/json;
    charset=utf-8``, as SDKs may send it) made ``application/json``: the same event. True when it
    was changed."""
    content_type = event.get("datacontenttype")
    if not isinstance(content_type, str) or ";" not in content_type:
        return False
    media, _, parameters = content_type.partition(";")
    said = [parameter.strip().lower().replace('"', "") for parameter in parameters.split(";") if parameter.strip()]
    if media.strip().lower() != "application/json" or not all(p in ("charset=utf-8", "charset=utf8") for p in said):
        return False
    event["datacontenttype"] = "application/json"
    return True


def to_binary(event: Mapping[str, Any]) -> tuple[dict[str, str], bytes]:
    """Headers and body of ``event`` in binary mode (used by clients and tests)."""
    headers = {"content-type": str(event.get("datacontenttype", "application/json"))}
    for name in ATTRIBUTES:
        if name in event and event[name] is not None and name != "datacontenttype":
            headers[f"ce-{name}"] = quote(str(event[name]), safe="")
    headers["ce-datacontenttype"] = headers["content-type"]
    return headers, orjson.dumps(event.get("data"))


def structured_headers() -> dict[str, str]:
    return {"content-type": STRUCTURED_CONTENT_TYPE}
