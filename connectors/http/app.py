"""The HTTP gateway's FastAPI application (CONTRACT §6), built around a running :class:`Bus`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI

from connectors.http import calendar, events, operations, problems, read
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

    app = FastAPI(title="collabbus", version=version("collabbus"), description=DESCRIPTION)
    app.state.bus = bus
    app.state.rate_limiter = rate_limiter or RateLimiter(bus.settings.http_rate_limit, bus.settings.http_rate_burst)
    app.state.metrics = operations.Metrics()
    app.add_middleware(operations.MetricsMiddleware, metrics=app.state.metrics)
    problems.install(app)
    for router in (events.router, read.router, calendar.router, webhooks.router, operations.router):
        app.include_router(router)
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
                schema = response.get("content", {}).get("application/json", {}).get("schema", {})
                if schema.get("$ref", "").endswith("/ProblemDetail") or status == "422":  # 422: FastAPI's own
                    response["content"] = {problems.PROBLEM_JSON: problem}
                    response["description"] = problems.TITLES[int(status)]
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("ProblemDetail", problems.ProblemDetail.model_json_schema(ref_template="#/components/schemas/{model}"))
    for name, schema in schemas["ProblemDetail"].pop("$defs", {}).items():
        schemas.setdefault(name, schema)
    # Who may call: a Bearer token wherever a 401 can come back; the calendar also takes ?token=.
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "`collabbus institutions token ID`"},
        "token": {"type": "apiKey", "in": "query", "name": "token"},
    }
    for path_name, path in document["paths"].items():
        for operation in path.values():
            if "401" in operation.get("responses", {}):
                operation["security"] = [{"bearer": []}] + ([{"token": []}] if path_name.endswith(".ics") else [])
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    app.openapi_schema = document
    return document
