"""The running bus: NATS (embedded or not), streams, membership, the gate and its ingress.

``Bus`` is the one composition root for everything that touches NATS; the CLI, the HTTP gateway
and the tests start it and read its parts.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from faststream.nats import NatsBroker
from nats.aio.client import Client
from nats.js import JetStreamContext

from bus.gate import Gate
from bus.ingress import add_ingress
from bus.membership import Membership
from bus.server import EmbeddedNats
from bus.streams import desired_streams, ensure_streams
from bus.verdict import Verdict
from ops.settings import Settings
from schemas.envelope import source_of

log = logging.getLogger("collabbus.bus")


def connect_options(settings: Settings, name: str) -> dict[str, Any]:
    """nats-py connection options for a bus process."""
    options: dict[str, Any] = {
        "servers": settings.nats_servers,
        "name": name,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
    }
    if settings.nats_creds:
        creds = str(settings.nats_creds)
        if settings.nats_creds.read_text().lstrip().startswith("SU"):
            options["nkeys_seed"] = creds
        else:
            options["user_credentials"] = creds
    return options


def embedded_server(settings: Settings) -> EmbeddedNats:
    host, port = settings.listen_host_port
    return EmbeddedNats(settings.data_dir / "nats", host, port)


@dataclass
class Bus:
    """Everything that touches NATS in one bus process."""

    settings: Settings
    server: EmbeddedNats | None = None
    broker: NatsBroker = field(init=False)
    gate: Gate = field(init=False)
    membership: Membership = field(init=False)

    @property
    def nc(self) -> Client:
        return self.broker.connection

    @property
    def js(self) -> JetStreamContext:
        return self.broker.config.connection_state.stream

    async def start(self, *, ingress: bool = True) -> None:
        """Start NATS if embedded, declare the streams, bootstrap the operator, open the ingress."""
        settings = self.settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if settings.embedded and self.server is None:
            self.server = embedded_server(settings)
            await self.server.astart()
        self.broker = NatsBroker(**connect_options(settings, "collabbus"), logger=None)
        await self.broker.connect()
        await ensure_streams(
            self.js,
            desired_streams(
                replicas=settings.stream_replicas,
                duplicate_window=settings.duplicate_window,
                max_msg_size=min(self.nc.max_payload, settings.max_event_bytes + 4096),
            ),
        )
        self.membership = Membership(self.nc, self.js)
        await self.membership.start()
        self.gate = Gate(self.nc, self.js, self.membership, max_event_bytes=settings.max_event_bytes)
        await self.ensure_operator()
        if ingress:
            add_ingress(self.broker, self.gate)
        await self.broker.start()

    async def ensure_operator(self) -> Verdict | None:
        """The network's operator is its first member, created on the first start."""
        operator = self.settings.operator
        if await self.membership.kind_of(operator) is not None:
            return None
        verdict = await self.gate.publish_internal(
            {
                "specversion": "1.0",
                "id": f"institution.joined.{operator}",
                "source": source_of(operator),
                "type": "institution.joined",
                "subject": operator,
                "data": {
                    "id": operator,
                    "name": {"en": self.settings.operator_name},
                    "kind": "operator",
                    "country": self.settings.operator_country,
                },
            }
        )
        if not verdict.accepted:
            raise RuntimeError(f"could not register the operator {operator!r}: {verdict.as_dict()}")
        log.info("registered the network operator %r", operator)
        return verdict

    async def stop(self) -> None:
        """Drain subscriptions and connections, then stop the embedded server."""
        if hasattr(self, "membership"):
            await self.membership.stop()
        if hasattr(self, "broker"):
            await self.broker.stop()
        if self.server is not None:
            await self.server.astop()
            self.server = None

    async def __aenter__(self) -> "Bus":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_forever(bus: Bus, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set, then drain."""
    try:
        await stop.wait()
    finally:
        await bus.stop()
