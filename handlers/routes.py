"""The network's routing table: every event type's projections, deciders and the timers."""

from __future__ import annotations

from handlers import validations
from handlers.network import Network, Routes


def network_routes() -> Routes:
    """Projections and workflows of every domain, in one table."""
    routes = Routes()
    # Each domain module contributes PROJECTIONS, DECIDERS and TIMERS.
    routes.add(projections=validations.PROJECTIONS, deciders=validations.DECIDERS, timers=validations.TIMERS)
    return routes


def network() -> Network:
    return Network(network_routes())
