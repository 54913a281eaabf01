"""The query parameters a member's request may have: those its route takes, each once.

A query parameter a route does not take is refused (422) rather than passed over: a misspelt
filter (``?ownr=``) would otherwise answer the whole list as if it were the one asked for. The
refusal names the parameter most likely meant and those the route takes, as the gate names an
event's unknown attribute. A parameter given twice with different values where the route takes
one is refused too (which one was meant cannot be told); the same value twice is that value.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator

from fastapi import Request
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from bus.verdict import Problem
from connectors.http.problems import ApiProblem
from schemas.common import NUL_MESSAGE, unknown_name


def _query_parameters(dependant: Dependant) -> Iterator[tuple[str, bool]]:
    """Each query parameter of ``dependant`` and of its dependencies (a calendar's ``token``),
    by the name it has in a URL, with whether it takes several values (``type`` of ``/events``)."""
    for field in dependant.query_params:
        yield field.alias, _several(field.field_info.annotation)
    for dependency in dependant.dependencies:
        yield from _query_parameters(dependency)


def _several(annotation: object) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_several(arg) for arg in typing.get_args(annotation))
    return origin in (list, set, frozenset, tuple) or annotation in (list, set, frozenset, tuple)


def taken(route: APIRoute) -> dict[str, bool]:
    """The query parameters ``route`` takes, in the order it declares them, each with whether it
    takes several values. (Walked for each request: a handful of dependencies.)"""
    return dict(_query_parameters(route.dependant))


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _what_it_takes(route: APIRoute, names: list[str]) -> str:
    if names:
        return f" (it takes {_listed(names)})"
    if route.body_field is not None:
        return " (it takes no query parameters: what it is given goes in its JSON body)"
    return " (it takes no query parameters)"


REFUSED = "refused_parameters"
"""Where :func:`known_parameters` leaves its refusal, in the request's state."""


async def known_parameters(request: Request) -> None:
    """Refuse (422) a request with a query parameter its route does not take, or one given with
    several values where it takes one, or a parameter (of the query or the path) holding the NUL
    character, which no row has (PostgreSQL's text cannot hold it: its driver fails the query) —
    once its caller is known: the refusal waits in the request's state (:data:`REFUSED`) for the
    route's authentication (``connectors.http.auth``), which raises it, so that a request without
    a valid token is told that first (401), as for any other invalid query."""
    route = request.scope.get("route")
    if not isinstance(route, APIRoute):
        return
    given = [("path", name, value) for name, value in request.path_params.items()]
    given += [("query", name, value) for name, value in request.query_params.multi_items()]
    errors = list({(place, name): Problem((place, name), NUL_MESSAGE, "string_nul")
                   for place, name, value in given if isinstance(value, str) and "\x00" in value}.values())
    names = taken(route)
    operation = f"{request.method} {route.path_format}"
    for name in dict.fromkeys(request.query_params):
        if name not in names:
            msg = unknown_name(name, f"a parameter of {operation}", names, _what_it_takes(route, list(names)))
            errors.append(Problem(("query", name), msg, "extra_forbidden"))
        elif not names[name] and len(values := dict.fromkeys(request.query_params.getlist(name))) > 1:
            listed = _listed([repr(value[:100]) for value in values])
            errors.append(Problem(("query", name), f"{name!r} is given {len(values)} values, {listed}: {operation} takes one",
                                  "multiple_values"))
    if errors:
        setattr(request.state, REFUSED, ApiProblem(422, "; ".join(error.msg for error in errors), kind="invalid", errors=errors))
