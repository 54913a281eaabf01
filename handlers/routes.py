"""The network's routing table: every event type's projections, deciders and the timers; and how
the domains split into lanes that a rebuild replays side by side."""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType
from typing import Any

from handlers import calls, innovation_days, institutions, projects, validations
from handlers.network import Network, Routes

DOMAINS: dict[str, ModuleType] = {
    "institution": institutions,
    "call": calls,
    "project": projects,
    "validation": validations,
    "innovation_day": innovation_days,
}
"""Each domain (an event type's first part) and the module with its tables, PROJECTIONS, DECIDERS
and TIMERS."""

REBUILD_LANES: tuple[tuple[str, ...], ...] = (
    ("institution", "project", "validation"),
    ("institution", "call"),
    ("institution", "project", "innovation_day"),
)
"""The domains a rebuild may replay in processes of their own, one lane each. A lane holds every
domain its handlers read: every domain reads the members (institutions), validations read
projects (conflicts of interest), innovation days read projects' themes (matchmaking when a day
moves). A domain in several lanes is applied by each and kept by the first (its rows, and the
record of its events applied); an event and the events derived from it are of one domain, so each
lane decides and applies its events as the whole network does. Tables whose keys the database
generates are kept by the first lane (a later lane's rows are copied with their keys)."""


def rebuild_lanes(processes: int) -> tuple[tuple[str, ...], ...]:
    """:data:`REBUILD_LANES` for ``processes`` processes: with fewer processes than lanes, the
    last ones are replayed together by the last process (lanes joined keep what each reads)."""
    count = max(1, min(processes, len(REBUILD_LANES)))
    joined = [set(lane) for lane in REBUILD_LANES[:count - 1]]
    joined.append({domain for lane in REBUILD_LANES[count - 1:] for domain in lane})
    return tuple(tuple(domain for domain in DOMAINS if domain in lane) for lane in joined)


def network_routes(domains: Iterable[str] | None = None) -> Routes:
    """Projections and workflows of every domain (or of ``domains``), in one table."""
    routes = Routes()
    # Each domain module contributes PROJECTIONS, DECIDERS and TIMERS.
    for domain in DOMAINS if domains is None else domains:
        module = DOMAINS[domain]
        routes.add(projections=module.PROJECTIONS, deciders=module.DECIDERS, timers=module.TIMERS)
    return routes


def network(domains: Iterable[str] | None = None) -> Network:
    return Network(network_routes(domains))


def domain_tables(domain: str) -> list[Any]:
    """The read-model tables (``sqlalchemy.Table``) of ``domain``, in the order they can be filled."""
    from sqlmodel import SQLModel

    import handlers.tables  # noqa: F401  (every table on the metadata)

    module = DOMAINS[domain].__name__
    own = {mapper.local_table for mapper in SQLModel._sa_registry.mappers  # type: ignore[attr-defined]
           if mapper.class_.__module__ == module}
    return [table for table in SQLModel.metadata.sorted_tables if table in own]
