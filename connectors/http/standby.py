"""What a standby bus answers over HTTP while another bus applies the log (``collabbus up --standby``).

Alive (``/healthz`` 200: a supervisor's liveness check must not restart it), not ready
(``/readyz`` 503, saying which bus applies the log: a load balancer sends nobody here), and a 503
problem for anything else, with ``Retry-After``. The whole gateway takes its place once this bus
takes the log over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from connectors.http.problems import problem_response, retry_after


def standby_app(nats_state: Callable[[], str], applying: Callable[[], str]) -> FastAPI:
    """The standby's answers; ``nats_state``: ``ok`` or what the connection is doing;
    ``applying``: which bus applies the log, in words."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = {"nats": nats_state(), "log": f"standby: {applying()} applies the log; this bus takes over when it goes"}
        return JSONResponse({"status": "standby", "checks": checks}, status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def elsewhere(request: Request, path: str) -> Any:
        return problem_response(503, f"this bus is a standby: {applying()} applies the log and answers the API",
                                kind="standby", headers=retry_after(5))

    return app
