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
    ("institution", "call", *projects.PARTIES_DECIDED_BY),
    ("institution", "innovation_day", *projects.PARTIES_DECIDED_BY),
)
"""The domains a rebuild may replay in processes of their own, one lane each. A lane holds what
its domains read: every domain reads the members (institutions), validations read projects
(conflicts of interest), innovation days read projects' themes (matchmaking when a day moves)
and the owner and partners of the project a registration brings, calls the owner and partners
of the project an application names: their lanes apply the events those come from (:data:`handlers.projects.THEMES_DECIDED_BY`, ``PARTIES_DECIDED_BY``), not the
whole domain. An entry is a domain or one event type of a domain. A domain in several lanes
is applied by each and kept by the first that has it whole (its rows, and the record of its
events applied); event types alone are applied, never kept. An event and the events derived from
it are of one domain, so each lane decides and applies its events as the whole network does.
Tables whose keys the database generates are kept by the first lane (a later lane's rows are
copied with their keys)."""


def network_routes(selectors: Iterable[str] | None = None) -> Routes:
    """Projections and workflows of every domain (or of ``selectors``: domains, and event types
    of a domain alone), in one table."""
    routes = Routes()
    wanted = list(DOMAINS) if selectors is None else list(selectors)
    # Each domain module contributes PROJECTIONS, DECIDERS and TIMERS, and READS where its
    # workflows judge events on things of other domains.
    for domain, module in DOMAINS.items():
        reads = getattr(module, "READS", {})
        if domain in wanted:
            routes.add(projections=module.PROJECTIONS, deciders=module.DECIDERS, timers=module.TIMERS, reads=reads)
            continue
        types = [selector for selector in wanted if selector.partition(".")[0] == domain and "." in selector]
        if types:  # timers act on a domain's whole state: not for part of it
            routes.add(projections={t: module.PROJECTIONS[t] for t in types if t in module.PROJECTIONS},
                       deciders={t: module.DECIDERS[t] for t in types if t in module.DECIDERS},
                       reads={t: reads[t] for t in types if t in reads})
    unknown = [s for s in wanted if s.partition(".")[0] not in DOMAINS]
    if unknown:
        raise ValueError(f"no such domain: {', '.join(unknown)}")
    return routes


def network(selectors: Iterable[str] | None = None) -> Network:
    return Network(network_routes(selectors))


def rebuild_lanes(processes: int) -> tuple[tuple[str, ...], ...]:
    """:data:`REBUILD_LANES` for ``processes`` processes: with fewer processes than lanes, the
    last ones are replayed together by the last process (lanes joined keep what each reads)."""
    count = max(1, min(processes, len(REBUILD_LANES)))
    joined = [set(lane) for lane in REBUILD_LANES[:count - 1]]
    joined.append({selector for lane in REBUILD_LANES[count - 1:] for selector in lane})
    return tuple(_ordered(lane) for lane in joined)


def _ordered(lane: set[str]) -> tuple[str, ...]:
    """A lane's entries: its whole domains in the routing order, then the event types of other
    domains (a type whose domain the lane has whole is left out)."""
    whole = [domain for domain in DOMAINS if domain in lane]
    return (*whole, *sorted(s for s in lane if "." in s and s.partition(".")[0] not in whole))


def domain_tables(domain: str) -> list[Any]:
    """The read-model tables (``sqlalchemy.Table``) of ``domain``, in the order they can be filled."""
    from sqlmodel import SQLModel

    import handlers.tables  # noqa: F401  (every table on the metadata)

    module = DOMAINS[domain].__name__
    own = {mapper.local_table for mapper in SQLModel._sa_registry.mappers  # type: ignore[attr-defined]
           if mapper.class_.__module__ == module}
    return [table for table in SQLModel.metadata.sorted_tables if table in own]
