"""A sandbox portal (CONTRACT §8) over real HTTP on 127.0.0.1, and the gateway's bus to sync into."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from bus.log import read
from connectors.portal.connector import PortalClient, PortalSync
from connectors.portal.sandbox import Faults, PortalSandbox
from tests.conftest import OPERATOR
from tests.connectors.conftest import Gateway, gateway, institution_id  # noqa: F401  (fixture)
from tests.handlers.harness import envelope

TOKEN = "sandbox-token"


def business_id() -> str:
    """A fresh Finnish business id (Y-tunnus shape)."""
    digits = f"{uuid.uuid4().int % 10**7:07d}"
    return f"{digits}-{uuid.uuid4().int % 10}"


@dataclass
class Network:
    """Members with business ids, and an organisation that names no member."""

    members: dict[str, str]
    """business id → member"""
    organisations: list[dict[str, str]]
    unmapped: dict[str, str]


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[PortalSandbox]:
    portal = PortalSandbox(tmp_path / "portal.db", token=TOKEN)
    await portal.start()
    try:
        yield portal
    finally:
        await portal.stop()


class RawPortal:
    """A portal on 127.0.0.1 that answers exactly the bytes it is given, for what the sandbox
    cannot serve (text that is not UTF-8, lone surrogates, HTML): ``page`` answers the list, and
    ``entries`` (id → the entry's JSON text) each ``GET /api/v1/entries/{id}``."""

    def __init__(self) -> None:
        self.page: tuple[int, str, bytes] = (200, "application/json", b'{"items": [], "next_cursor": null}')
        self.entries: dict[str, bytes] = {}
        self.silent = False
        """Take requests and never answer them."""
        self.etag = '"1"'
        """The ETag every answer has."""
        self.server: asyncio.Server | None = None
        self.closing = asyncio.Event()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def list(self, *entries: bytes) -> None:
        """A page of these entries (raw JSON texts), each also answered on its own by its id."""
        for raw in entries:
            with contextlib.suppress(ValueError, LookupError, TypeError):
                self.entries[str(json.loads(raw.decode("utf-8", "surrogateescape"))["id"])] = raw
        self.page = (200, "application/json", b'{"items": [' + b", ".join(entries) + b'], "next_cursor": null}')

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                if self.silent:
                    await self.closing.wait()
                    break
                path = head.split(" ")[1].partition("?")[0]
                status, kind, body = self.page
                if path != "/api/v1/entries":
                    found = self.entries.get(path.removeprefix("/api/v1/entries/"))
                    status, kind, body = (200, "application/json", found) if found is not None else (404, "application/json", b"{}")
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\ncontent-length: {len(body)}\r\n"
                             f"etag: {self.etag}\r\n\r\n".encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw_portal() -> AsyncIterator[RawPortal]:
    portal = RawPortal()
    portal.server = await asyncio.start_server(portal.handle, "127.0.0.1", 0)
    try:
        yield portal
    finally:
        portal.closing.set()
        portal.server.close()


async def join(gateway: Gateway, kind: str, bid: str) -> str:  # noqa: F811
    """A new member holding business id ``bid``, admitted by the operator through the gate.

    (Not over the gateway's HTTP client: after a test that keeps it idle for seconds, its pooled
    connection may meet uvicorn's keep-alive timeout.)"""
    member = institution_id()
    data = {"id": member, "name": {"en": member}, "kind": kind, "country": "FI",
            "identifiers": [{"scheme": "fi-business-id", "value": bid}]}
    verdict = await gateway.bus.gate.admit(OPERATOR, orjson.dumps(envelope("institution.joined", OPERATOR, data)),
                                           {"content-type": "application/cloudevents+json"})
    assert verdict.accepted, verdict.as_dict()
    return member


@pytest.fixture
async def network(gateway: Gateway) -> Network:  # noqa: F811
    members: dict[str, str] = {}
    organisations = []
    for kind in ("ngo", "municipality"):
        bid = business_id()
        member = await join(gateway, kind, bid)
        members[bid] = member
        organisations.append({"name": f"Organisaatio {member}", "business_id": bid})
    unmapped = {"name": "Tuntematon säätiö sr", "business_id": business_id()}
    await gateway.settle()  # the connector maps organisations through the members' read model
    return Network(members, organisations, unmapped)


def portal_sync(gateway: Gateway, sandbox: PortalSandbox, **client: Any) -> PortalSync:  # noqa: F811
    """A connector as a fresh process would build it (state only in the database)."""
    options: dict[str, Any] = {"timeout": 5.0, "backoff": 0.02, "attempts": 8, **client}
    page_size = options.pop("page_size", 100)
    # Sandboxes of earlier tests may have had the same port: their state is kept apart by the store's path.
    key = f"{sandbox.url}#{sandbox.store.path}"
    return PortalSync(gateway.bus.gate, gateway.bus.engine, PortalClient(sandbox.url, TOKEN, **options),
                      portal=key, page_size=page_size)


async def project_events(gateway: Gateway, members: list[str]) -> list[dict[str, Any]]:  # noqa: F811
    """Every project event the members have in the log, in log order."""
    found: list[tuple[int, dict[str, Any]]] = []
    for member in members:
        async for logged in read(gateway.bus.js, f"collab.events.{member}.project.>", since="all", idle_timeout=0.5):
            found.append((logged.seq, logged.event))
    return [event for _, event in sorted(found, key=lambda pair: pair[0])]


__all__ = ["Faults", "Network", "RawPortal", "business_id", "portal_sync", "project_events"]
