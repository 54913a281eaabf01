"""What a standby bus answers over HTTP while another bus applies the log (``collabbus up --standby``).

Alive (``/healthz`` 200: a supervisor's liveness check must not restart it), not ready
(``/readyz`` 503, saying which bus applies the log: a load balancer sends nobody here), and a 503
problem for anything else, with ``Retry-After``. Once this bus has taken the log over, the same
server answers so while the read models start (a second or two), then with the whole gateway:
the address never stops answering.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from connectors.http.problems import problem_response, retry_after


def standby_app(nats_state: Callable[[], str], applying: Callable[[], str | None],
                database_state: Callable[[], str] | None = None) -> FastAPI:
    """The standby's answers; ``nats_state``: ``ok`` or what the connection is doing;
    ``applying``: which bus applies the log, in words (None once this one has taken it over);
    ``database_state`` (called in a thread): ``ok`` or why the read models' database does not
    answer — a standby that could not reach it would take the log over only to fail."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        holder = applying()
        checks = {"nats": nats_state()}
        if database_state is not None:
            checks["database"] = await run_in_threadpool(database_state)
        if holder is None:
            checks["log"] = "taking the log over: the read models start"
            return JSONResponse({"status": "starting", "checks": checks}, status_code=503)
        checks["log"] = f"standby: {holder} applies the log; this bus takes over when it goes"
        return JSONResponse({"status": "standby", "checks": checks}, status_code=503)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def elsewhere(request: Request, path: str) -> Any:
        holder = applying()
        if holder is None:
            return problem_response(503, "this bus has taken the log over and starts its API in a moment", kind="standby",
                                    headers=retry_after(1))
        return problem_response(503, f"this bus is a standby: {holder} applies the log and answers the API",
                                kind="standby", headers=retry_after(5))

    return app
