"""The HTTP gateway's FastAPI application (CONTRACT §6), built around a running :class:`Bus`."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI
from fastapi_offline import FastAPIOffline

from connectors.http import calendar, events, operations, parameters, problems, read
from bus.ratelimit import RateLimiter
from connectors.webhooks import api as webhooks

if TYPE_CHECKING:
    from bus.runtime import Bus

DESCRIPTION = """\
The HTTP side of the collabbus event bus. Institutions offer CloudEvents on `POST /events`
(structured, binary or batch) and read the network's state; every offered event passes the same
gatekeeper as over NATS. Authenticate with `Authorization: Bearer <token>` (issued by
`collabbus institutions token ID`). Errors are `application/problem+json`.
"""


def create_app(bus: "Bus", *, rate_limiter: RateLimiter | None = None) -> FastAPI:
    """The gateway for ``bus`` (started, with its read models); ``rate_limiter`` defaults to the
    settings' ``http_rate_limit``/``http_rate_burst``."""
    from importlib.metadata import version

    # /docs (Swagger UI) and /redoc from files the gateway serves itself, under /docs/static: an
    # institution's closed network, which reaches no CDN, sees them too.
    app = FastAPIOffline(title="collabbus", version=version("collabbus"), description=DESCRIPTION, static_url="/docs/static")
    app.state.bus = bus
    app.state.rate_limiter = rate_limiter or RateLimiter(bus.settings.http_rate_limit, bus.settings.http_rate_burst)
    app.state.metrics = operations.Metrics()
    app.state.long_polls = Counter()  # per institution, its long polls of /events waiting now
    app.add_middleware(operations.TokenExpiry)
    app.add_middleware(operations.MetricsMiddleware, metrics=app.state.metrics)
    problems.install(app)
    # A member's requests take only the query parameters their routes name; the operations' pages
    # (health, metrics, the documents) are left to what probes, browsers and caches add to a URL.
    for router in (events.router, read.router, calendar.router, webhooks.router):
        app.include_router(router, dependencies=[Depends(parameters.known_parameters)])
    app.include_router(operations.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with error answers as ``application/problem+json`` (what they are)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi

    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    problem = {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}
    for path in document["paths"].values():
        for operation in path.values():
            for status, response in operation.get("responses", {}).items():
                # (under the route's own media type when it answers another: text/html, text/calendar)
                schemas_given = [media.get("schema", {}) for media in response.get("content", {}).values()]
                if any(schema.get("$ref", "").endswith("/ProblemDetail") for schema in schemas_given) or status == "422":  # 422: FastAPI's own
                    response["content"] = {problems.PROBLEM_JSON: problem}
                    response["description"] = problems.TITLES[int(status)]
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ProblemDetail", problems.ProblemDetail.model_json_schema(ref_template="#/components/schemas/{model}"))
    for name, schema in schemas["ProblemDetail"].pop("$defs", {}).items():
        schemas.setdefault(name, schema)
    # Who may call: a Bearer token wherever a 401 can come back; the calendar also takes ?token=.
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": (
            "`collabbus institutions token ID`; for a token that expires, every answer says when in "
            "`collabbus-token-expires` (RFC 3339, UTC)")},
        "token": {"type": "apiKey", "in": "query", "name": "token"},
    }
    for path_name, path in document["paths"].items():
        for operation in path.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{"bearer": []}] + ([{"token": []}] if path_name.endswith(".ics") else [])
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["CloudEvent"] = _cloud_event_schema()
    document["webhooks"] = {"event": _WEBHOOK}
    app.openapi_schema = document
    return document


def _cloud_event_schema() -> dict[str, Any]:
    """The envelope as the gatekeeper reads it; ``data`` is checked against its type's schema."""
    from schemas.envelope import CloudEvent

    schema = CloudEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    assert "$defs" not in schema  # (a flat model: nothing to move into the components)
    schema["properties"]["data"] = {
        "type": "object",
        "description": "the event's data, as the JSON Schema of its type (and major, `dataschema`) says: "
                       "`urn:collabbus:schema:{type}:{major}`, listed by `collabbus schemas list` and in `/asyncapi.json`",
    }
    return schema


_WEBHOOK = {
    "post": {
        "summary": "An event delivered to a registered endpoint (Standard Webhooks 1.0)",
        "description": (
            "Each event an endpoint asked for (`POST /webhooks`) and its institution may see, as a structured "
            "CloudEvent. Verify the signature with any Standard Webhooks library and the endpoint's secret; "
            "answer any 2xx quickly. Anything else is tried again on the retry schedule; 410 disables the "
            "endpoint; 429, 502, 503 and 504 are retried after `Retry-After`. Deliveries about one thing (an "
            "event's domain and subject) arrive in log order, each after the one before it was delivered or given "
            "up (`waiting_for` on a delivery held back; an endpoint with `ordered: false` gets all in any order); "
            "deliveries about different things go in parallel. `collabbus-sequence` is each event's place in the log."
        ),
        "parameters": [
            {"name": "webhook-id", "in": "header", "required": True, "schema": {"type": "string"},
             "description": "the event's id: the same on every retry"},
            {"name": "webhook-timestamp", "in": "header", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"},
             "description": "Unix seconds of this attempt"},
            {"name": "webhook-signature", "in": "header", "required": True, "schema": {"type": "string"},
             "description": "the Standard Webhooks signature: `v1,<base64 HMAC-SHA256 of id.timestamp.body>`, space-separated during a secret rotation"},
            {"name": "collabbus-sequence", "in": "header", "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"},
             "description": "the event's sequence in the network's log (`seq` of `GET /events`): deliveries about "
                            "different things come in no order among each other; of two events about one thing the "
                            "higher sequence is the later (with `ordered: false`, the way to put them in order)"},
            {"name": "traceparent", "in": "header", "required": False, "schema": {"type": "string"},
             "description": "the W3C trace context of the delivery"},
        ],
        "requestBody": {"required": True, "content": {"application/cloudevents+json": {"schema": events.CLOUD_EVENT_REF}}},
        "responses": {
            "2XX": {"description": "delivered"},
            "410": {"description": "gone: the endpoint is disabled"},
            "429": {"description": "tried again after Retry-After"},
        },
    }
}
