"""Errors as RFC 9457 problem details (``application/problem+json``), one shape for every failure.

A refused event's problem lists every error the gatekeeper found, as ``{loc, msg, type}``; so does
a request whose query parameters are wrong.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

import nats.errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError
from opentelemetry import trace
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from bus.gate import field_names, model_at
from bus.streams import jetstream_answered
from bus.verdict import Problem as GateProblem
from bus.verdict import Reason, Verdict
from ops import tracing
from schemas.common import error_message, unknown_name

log = logging.getLogger("collabbus.http")

PROBLEM_JSON = "application/problem+json"

TITLES = {
    400: "Malformed request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Content too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    503: "Unavailable",
}

#: The HTTP status of each reason the gatekeeper refuses an event for (CONTRACT §6).
STATUS_OF_REASON: dict[Reason, int] = {
    "malformed": 400,
    "invalid": 422,
    "forbidden": 403,
    "too_large": 413,
    "unsupported": 415,
    "unavailable": 503,
}

#: Seconds a client should wait before retrying when the log is unavailable.
UNAVAILABLE_RETRY_AFTER = 2


class ProblemItem(BaseModel):
    """One thing wrong: where (``loc``), what (``msg``), a stable code (``type``)."""

    loc: list[str | int]
    msg: str
    type: str


class ProblemDetail(BaseModel):
    """RFC 9457 problem details; ``errors`` lists every problem found, ``id`` names the refused event."""

    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int
    detail: str
    errors: list[ProblemItem] = Field(default_factory=list)
    id: str | None = Field(default=None, description="the refused event's id, when it had one")


class ApiProblem(Exception):
    """Raised anywhere in a request to answer with a problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: Iterable[GateProblem] = (),
        headers: Mapping[str, str] | None = None,
        event_id: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind or _slug(status)
        self.errors = tuple(errors)
        self.headers = dict(headers or {})
        self.event_id = event_id

    def response(self) -> JSONResponse:
        return problem_response(
            self.status, self.detail, kind=self.kind, errors=[e.as_dict() for e in self.errors],
            headers=self.headers, event_id=self.event_id,
        )


#: The kind of problem (``urn:collabbus:problem:{kind}``) an answer of each status has unless it
#: names a narrower one: the gatekeeper's reasons where it has one for the status, so that a bad
#: query and a bad event are told apart by the status and the place, not by two names.
KINDS = {
    **{status: reason for reason, status in STATUS_OF_REASON.items()},
    401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 409: "conflict", 429: "rate_limited",
    500: "internal_error",
}


def _slug(status: int) -> str:
    return KINDS.get(status, "error")


def _allowed_methods(request: Request) -> list[str]:
    """The methods the API documents for the request's path (none for a path it does not document)."""
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        if compile_path(template)[0].match(request.url.path):
            methods |= {method.upper() for method in operations if method.upper() in _METHODS}
    return sorted(methods)


_METHODS = {"GET", "PUT", "POST", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE"}


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
    event_id: str | None = None,
) -> JSONResponse:
    """A ``application/problem+json`` response."""
    body: dict[str, Any] = {
        "type": f"urn:collabbus:problem:{kind or _slug(status)}",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
        "errors": errors or [],
    }
    if event_id is not None:
        body["id"] = event_id
    return JSONResponse(body, status_code=status, headers=dict(headers or {}), media_type=PROBLEM_JSON)


def retry_after(seconds: float) -> dict[str, str]:
    """A ``Retry-After`` header: whole seconds, at least one."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


def rejection(verdict: Verdict) -> ApiProblem:
    """The problem answering a refused event, status by the gatekeeper's reason."""
    reason = verdict.reason or "invalid"
    status = STATUS_OF_REASON[reason]
    headers = retry_after(UNAVAILABLE_RETRY_AFTER) if reason == "unavailable" else None
    detail = "; ".join(
        f"{'.'.join(map(str, problem.loc))}: {problem.msg}" if problem.loc else problem.msg for problem in verdict.errors
    ) or f"the event was refused ({reason})"
    return ApiProblem(status, detail, kind=reason, errors=verdict.errors, headers=headers, event_id=verdict.id)


def install(app: FastAPI) -> None:
    """Answer every error — ours, routing's, parameter validation's — as a problem."""

    async def api_problem(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiProblem)
        # The request's span (POST /events is traced) says why it was refused: a missing token, a
        # rate limit, an oversize body. A refused event's own reasons are on it already.
        tracing.mark_failed_unless_failed(trace.get_current_span(), f"{exc.status} {exc.kind}: {exc.detail}")
        return exc.response()

    async def http_exception(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        detail = str(exc.detail)
        # Routing's own answers say what was asked and where to look, not only the status's name.
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no resource at {request.url.path}; the API is described at /docs (and /openapi.json)"
        elif exc.status_code == 405 and detail == "Method Not Allowed":
            # Routing names the methods of the first route on the path only (GET and POST /events
            # are two): every route's, as RFC 9110 asks of Allow.
            allowed = ", ".join(_allowed_methods(request)) or (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
            detail = f"{request.method} is not allowed on {request.url.path}" + (f"; allowed: {allowed}" if allowed else "")
            headers = {name: value for name, value in (exc.headers or {}).items() if name.lower() != "allow"}
            return problem_response(405, detail, headers={**headers, **({"Allow": allowed} if allowed else {})})
        return problem_response(exc.status_code, detail, headers=exc.headers)

    async def invalid_parameters(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [{"loc": _loc(e.get("loc", ())), "msg": _unknown_field(request, e) or error_message(e), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        not_json = media_type != "application/json" and not media_type.endswith("+json")
        whole = [e for e in errors if e["loc"] == []]
        if whole and not media_type and whole[0]["type"] == "missing":  # (a body without a Content-Type is read as JSON)
            return problem_response(
                415, "the request has no body and no Content-Type: send the body as JSON, with Content-Type: application/json",
                kind="unsupported",
            )
        if whole and media_type and not_json:  # JSON sent as a form (curl -d), or not JSON at all
            return problem_response(
                415, f"the body is read as JSON: send it with Content-Type: application/json (not {media_type})", kind="unsupported",
            )
        broken = next((e for e in exc.errors() if e.get("type") == "json_invalid"), None)
        if broken is not None:  # not JSON at all: malformed, as POST /events answers it (FastAPI: "8: JSON decode error")
            where = broken.get("loc", ())[-1:]
            reason = str((broken.get("ctx") or {}).get("error") or "not JSON").rstrip(".").lower()
            msg = f"the body is not valid JSON: {reason}" + (f" at character {where[0]}" if where and isinstance(where[0], int) else "")
            return problem_response(400, msg, kind="malformed", errors=[{"loc": [], "msg": msg, "type": "json_invalid"}])
        detail = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errors)
        return problem_response(422, detail or "invalid request", errors=errors)

    async def log_unavailable(request: Request, exc: Exception) -> JSONResponse:
        # What the log answered, or that it did not: a stream electing its leader, a cluster
        # without its quorum, NATS away. Nothing is wrong with the request: it is asked again.
        detail = f"the event log does not answer just now ({jetstream_answered(exc)}); retry in a few seconds"
        log.info("HTTP %s %s: %s", request.method, request.url.path, detail)  # (the consumers and the gate say it too)
        return problem_response(503, detail, kind="unavailable", headers=retry_after(UNAVAILABLE_RETRY_AFTER),
                                errors=[{"loc": [], "msg": detail, "type": "log_unavailable"}])

    async def internal_error(_request: Request, _exc: Exception) -> JSONResponse:
        return problem_response(500, "the bus could not answer this request; the error is in its log", kind="internal_error")

    app.add_exception_handler(ApiProblem, api_problem)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    for unavailable in LOG_UNAVAILABLE:
        app.add_exception_handler(unavailable, log_unavailable)
    app.add_exception_handler(Exception, internal_error)


LOG_UNAVAILABLE: tuple[type[Exception], ...] = (
    nats.errors.TimeoutError, NoStreamResponseError, ServiceUnavailableError, nats.errors.NoRespondersError,
    nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
)
"""What a request reading the log meets when the log cannot answer it just now: answered 503
``unavailable`` with ``Retry-After``, as an offer then is (not 500)."""


def _unknown_field(request: Request, error: Mapping[str, Any]) -> str | None:
    """What to say of a field a request's JSON body has and its model does not: the fields it
    takes, and the one most likely meant (as the gatekeeper says it of an event's); None for any
    other error, or where the fields taken are not known."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") != "extra_forbidden" or loc[:1] != ("body",) or not isinstance(loc[-1], str):
        return None
    body = getattr(request.scope.get("route"), "body_field", None)
    model = body.field_info.annotation if body is not None else None
    inner = model_at(model, loc[1:-1]) if isinstance(model, type) and issubclass(model, BaseModel) else None
    if inner is None:
        return None
    names = field_names(inner)
    what = f"a field of {'.'.join(map(str, loc[1:-1]))}" if len(loc) > 2 else "a field of the body"
    return unknown_name(loc[-1], what, names, f" (it takes {', '.join(names)})")


def _loc(loc: Any) -> list[Any]:
    """A problem's place as the bus's own checks name it: a body's fields by their names (FastAPI
    puts ``body`` first), query and path parameters with where they came from."""
    parts = list(loc)
    return parts[1:] if parts[:1] == ["body"] else parts


class KeepConnection:
    """The outermost layer: an exception the app answered with a 500 problem (Starlette raises it
    again after answering) is logged here, not handed to uvicorn — which would close the
    connection, and a partner's pooled client would see its next request fail."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.app(scope, receive, send)
        except Exception:
            if scope["type"] != "http":
                raise
            log.exception("HTTP %s %s failed", scope.get("method"), scope.get("path"))


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem answers (the app moves them to ``application/problem+json``)."""
    return {status: {"model": ProblemDetail, "description": TITLES.get(status, "Error")} for status in statuses}
