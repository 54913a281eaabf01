"""Who is calling: ``Authorization: Bearer <token>`` → the institution (and the request's bus).

Publishing needs a valid token only: the gatekeeper itself refuses non-members, with the same
reasons as over NATS. Reading needs a token of a current member.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Query, Request
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from connectors.http import parameters
from connectors.http.problems import ApiProblem
from handlers import tokens
from handlers.db import reading

if TYPE_CHECKING:
    from bus.runtime import Bus

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="collabbus"'}


def bus_of(request: Request) -> "Bus":
    """The bus this gateway serves."""
    return request.app.state.bus  # type: ignore[no-any-return]


def engine_of(request: Request) -> Any:
    """The read models' engine; 503 while the bus runs without them."""
    engine = bus_of(request).engine
    if engine is None:
        raise ApiProblem(503, "the read models are not running in this bus process", headers={"Retry-After": "5"})
    return engine


def read_session(request: Request) -> Iterator[Session]:
    """A session for reading, closed as soon as the endpoint returns (SQLite's lock with it)."""
    with Session(reading(engine_of(request))) as session:
        yield session


SessionDep = Annotated[Session, Depends(read_session, scope="function")]


def bearer_token(request: Request) -> str | None:
    """The token of the request's ``Authorization: Bearer`` header, if any."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _holder_of(engine: Any, token: str) -> tuple[str, datetime | None] | None:
    with reading(engine).connect() as connection:  # one indexed read: no session or ORM rows needed
        return tokens.holder_of(connection, token)


async def _authenticate(request: Request, token: str | None, *, calendar: bool = False) -> str:
    if token is None:
        raise ApiProblem(401, "send Authorization: Bearer <token>; `collabbus institutions token ID` issues one", headers=_CHALLENGE)
    engine = engine_of(request)
    if engine.dialect.name == "sqlite":  # a primary-key read takes less than handing it to a thread
        held = _holder_of(engine, token)
    else:
        held = await run_in_threadpool(_holder_of, engine, token)
    if held is None:
        raise ApiProblem(401, await run_in_threadpool(_why_refused, engine, token), headers=_CHALLENGE)
    institution, expires = held
    if tokens.calendar_only(token) and not calendar:
        raise ApiProblem(403, "a calendar token reads the calendar feed only (/innovation-days.ics?token=…): send a "
                         "member's token (`collabbus institutions token ID`)", kind="calendar_token")
    if expires is not None:  # said on the answer (operations.TokenExpiry): a client can warn before it stops working
        request.state.token_expires = expires
    refused = getattr(request.state, parameters.REFUSED, None)  # (a query parameter the route does not take)
    if refused is not None:
        raise refused
    return institution


def _why_refused(engine: Any, token: str) -> str:
    with reading(engine).connect() as connection:
        return tokens.why_refused(connection, token)


async def token_holder(request: Request) -> str:
    """The institution whose token the request carries."""
    return await _authenticate(request, bearer_token(request))


async def _require_member(request: Request, institution: str) -> str:
    if await bus_of(request).membership.kind_of(institution) is None:
        raise ApiProblem(403, f"{institution!r} is not a member of the network", kind="not_member")
    return institution


async def member(request: Request) -> str:
    """The calling institution, a current member."""
    return await _require_member(request, await token_holder(request))


async def calendar_member(
    request: Request,
    token: Annotated[str | None, Query(description="the token, for calendar clients that cannot send headers")] = None,
) -> str:
    """Like :func:`member`, also accepting ``?token=``, and a calendar token (``institutions token
    ID --calendar``: a URL handed to a calendar service should not carry a token that publishes)."""
    return await _require_member(request, await _authenticate(request, bearer_token(request) or token, calendar=True))


Publisher = Annotated[str, Depends(token_holder)]
Member = Annotated[str, Depends(member)]
CalendarMember = Annotated[str, Depends(calendar_member)]
