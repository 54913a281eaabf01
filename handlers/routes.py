"""The network's routing table: every event type's projections, deciders and the timers."""

from __future__ import annotations

from handlers import calls, innovation_days, institutions, projects, validations
from handlers.network import Network, Routes


def network_routes() -> Routes:
    """Projections and workflows of every domain, in one table."""
    routes = Routes()
    # Each domain module contributes PROJECTIONS, DECIDERS and TIMERS.
    routes.add(projections=institutions.PROJECTIONS, deciders=institutions.DECIDERS, timers=institutions.TIMERS)
    routes.add(projections=calls.PROJECTIONS, deciders=calls.DECIDERS, timers=calls.TIMERS)
    routes.add(projections=projects.PROJECTIONS, deciders=projects.DECIDERS, timers=projects.TIMERS)
    routes.add(projections=validations.PROJECTIONS, deciders=validations.DECIDERS, timers=validations.TIMERS)
    routes.add(projections=innovation_days.PROJECTIONS, deciders=innovation_days.DECIDERS, timers=innovation_days.TIMERS)
    return routes


def network() -> Network:
    return Network(network_routes())
