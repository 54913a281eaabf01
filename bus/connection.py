"""How a bus process or command reaches NATS: its connection options, and the embedded server's
store, keys and credentials under the data dir. Kept apart from ``bus.runtime`` (the whole bus)
so that a command that only connects does not load the bus to do it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bus.credentials import BUS_INBOX_PREFIX, Authority
from bus.server import EmbeddedNats
from ops.settings import Settings


PING_INTERVAL = 10
"""Seconds between a connection's pings to its server. Two left unanswered and the third due, the
connection is stale: nats-py closes it and reconnects (~30 s; with its own default of 2 minutes,
six). What goes unnoticed till then: a connection the network cut without closing it (a moved
machine, a firewall's forgotten flow), and a connection nats-py stopped reading (the PONG of a
flush that timed out, coming late, ends its reading: it flushes so itself after a reconnect)."""

MAX_OUTSTANDING_PINGS = 2


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """nats-py connection options for a bus process.

    The bus authenticates with ``COLLABBUS_NATS_CREDS`` when it is set; otherwise, when it runs
    the embedded server, with the credentials that server created under the data dir on its
    first start (``bus.credentials``).
    """
    options: dict[str, Any] = {
        "servers": settings.nats_servers,
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "ping_interval": PING_INTERVAL,
        "max_outstanding_pings": MAX_OUTSTANDING_PINGS,
        "inbox_prefix": BUS_INBOX_PREFIX,  # replies to the bus out of every member's sight
    }
    creds = settings.nats_creds
    if creds is None and settings.embedded and embedded_bus_creds(settings).exists():
        creds = embedded_bus_creds(settings)
    if creds is not None:
        if creds.read_text().lstrip().startswith("SU"):
            options["nkeys_seed"] = str(creds)
        else:
            options["user_credentials"] = str(creds)
    return options


def embedded_store(settings: Settings) -> Path:
    """Where the embedded server keeps its configuration, keys and JetStream store."""
    return settings.data_dir / "nats"


def embedded_bus_creds(settings: Settings) -> Path:
    """The bus's own credentials for the embedded server (written on its first start)."""
    return embedded_store(settings) / Authority.DIRECTORY / Authority.BUS_CREDS


def embedded_authority(settings: Settings) -> Authority:
    """The embedded server's keys (created when the data dir has none yet)."""
    return Authority.load_or_create(embedded_store(settings) / Authority.DIRECTORY)


def embedded_server(settings: Settings) -> EmbeddedNats:
    host, port = settings.listen_host_port
    return EmbeddedNats(embedded_store(settings), host, port)  # with authentication (the default)


def connection_state(nc: Any) -> str:
    """``ok``, ``reconnecting`` or ``disconnected``: a NATS connection's state, as ``/readyz`` says it."""
    return "ok" if nc.is_connected else "reconnecting" if nc.is_reconnecting else "disconnected"


PING_TIMEOUT = 1.0
"""Seconds a connection's server has to answer a ping before it is called not answering."""


async def answering(nc: Any, timeout: float = PING_TIMEOUT) -> str:
    """:func:`connection_state`, and for a connection that is up whether its server answers:
    a server stopped (SIGSTOP) or stuck keeps the connection open but answers nothing.

    Asked as JetStream's account information, a request its credentials allow (the bus needs
    JetStream's API), not a flush: nats-py leaves a flush that timed out waiting for its PONG, and
    the late PONG then stops its reading of the connection for good (until it finds the
    connection stale, minutes later). A request that timed out is forgotten cleanly."""
    state = connection_state(nc)
    if state != "ok":
        return state
    try:
        await nc.jetstream(timeout=timeout).account_info()
    except Exception as exc:  # (nats-py: its TimeoutError, or the connection closing meanwhile)
        return f"not answering: no reply within {timeout:g} s ({type(exc).__name__})"
    return "ok"
