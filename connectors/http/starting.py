"""What a bus's address answers before its gateway serves: while the bus starts, and while it
stands by (``collabbus up --standby``) for another bus that applies the log.

``collabbus up`` listens from its first moment, so that the address answers however long the
start waits (a cluster electing its leaders or short of a quorum, another bus's lease): alive
(``/healthz`` 200: a supervisor's liveness check must not restart a bus that waits), not ready
(``/readyz`` 503, saying what the start does or which bus applies the log: a load balancer sends
nobody here), its metrics (``/metrics``: the process's, ``collabbus_state`` and whether NATS answers
— a Prometheus target that is up, saying the bus starts or stands by), and a 503 problem for
anything else, with ``Retry-After``. Once the bus has started,
the same server answers with the whole gateway (``HttpGateway.serve_gateway``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from connectors.http.problems import UNAVAILABLE_RETRY_AFTER, problem_response, retry_after


@dataclass
class Starting:
    """What the address says meanwhile: ``nats`` — ``ok`` or what the connection is doing;
    ``doing`` — the start's step, in words; ``applying`` — while this bus stands by, which bus
    applies the log, in words; ``database`` (called in a thread) — while it stands by, ``ok`` or
    why the read models' database does not answer (a standby that could not reach it would take
    the log over only to fail)."""

    nats: Callable[[], str]
    doing: Callable[[], str]
    applying: str | None = None
    database: Callable[[], str] | None = None


def starting_app(state: Starting) -> FastAPI:
    """The answers of a bus's address before its gateway serves, as ``state`` says them."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        holder, database = state.applying, state.database
        checks = {"nats": state.nats()}
        if database is not None:
            checks["database"] = await run_in_threadpool(database)
        if holder is None:
            checks["start"] = state.doing()
            return JSONResponse({"status": "starting", "checks": checks}, status_code=503)
        checks["log"] = f"standby: {holder} applies the log; this bus takes over when it goes"
        return JSONResponse({"status": "standby", "checks": checks}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        from ops.metrics import waiting_exposition

        text = waiting_exposition("standby" if state.applying is not None else "starting", nats_connected=state.nats() == "ok")
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def elsewhere(request: Request, path: str) -> Any:
        holder = state.applying
        if holder is None:
            return problem_response(503, f"the bus is starting ({state.doing()}); retry in a moment", kind="unavailable",
                                    headers=retry_after(UNAVAILABLE_RETRY_AFTER))
        return problem_response(503, f"this bus is a standby: {holder} applies the log and answers the API",
                                kind="standby", headers=retry_after(5))

    return app
