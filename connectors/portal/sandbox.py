"""A local portal that speaks CONTRACT §8 for real (``collabbus portal sandbox``).

Innokylä publishes no API, so the connector is developed and tested against this: entries
(practices, *toimintamalli*, and projects/programmes, *kokonaisuus*) in a SQLite file, listed in
(updated_at, id) order with keyset cursors, ``ETag``/``If-Match`` on single entries, Bearer auth,
and the faults a real portal has, switchable while it runs (``POST /_sandbox/faults`` with the
faults to change; those it does not name stay as they were):

- ``rate_limit_every``: every Nth API request answers 429 with ``Retry-After: retry_after``;
- ``error_every``: every Nth answers 503;
- ``slow_every`` / ``slow_seconds``: every Nth is answered that much later (client timeouts);
- ``change_every`` / ``change_count``: before every Nth list page, that many entries change
  (a page that changes while being read);
- ``delete_every``: after every Nth list page, the page's last entry is deleted (deleted
  between list and get);
- ``edits_before_put`` / ``edit_before_put``: the next that many ``PUT /entries/{id}`` with
  ``If-Match`` find the entry just edited by someone else (``edit_before_put`` applied to it), so
  they answer 412: the race between a client's read and its write, made deterministic.

``POST /_sandbox/seed`` (or :meth:`PortalStore.seed`) creates many entries at once for tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import socket
import sqlite3
import threading
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Request
from fastapi.responses import JSONResponse

ENTRY_TYPES = ("practice", "whole")
STATUSES = ("draft", "published", "archived")
_WRITABLE = ("type", "title", "summary", "organisation", "region", "municipality", "funder", "parent_id", "tags", "status")


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds, ``Z``: sorts as text in time order."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class Faults:
    """The switchable faults (0 disables one); counters run over API requests."""

    rate_limit_every: int = 0
    retry_after: int = 1
    error_every: int = 0
    slow_every: int = 0
    slow_seconds: float = 0.0
    change_every: int = 0
    change_count: int = 1
    delete_every: int = 0
    edits_before_put: int = 0
    edit_before_put: dict[str, Any] | None = None


_FAULT_TYPES = {f.name: str(f.type) for f in fields(Faults)}


def _fits(annotation: str, value: Any) -> bool:
    """Whether ``value`` is of a fault's type (``int``, ``float``, or an object or null)."""
    if isinstance(value, bool):
        return False
    if annotation == "int":
        return isinstance(value, int) and value >= 0
    if annotation == "float":
        return isinstance(value, (int, float)) and value >= 0
    return value is None or isinstance(value, dict)


@dataclass
class FaultLog:
    """What the sandbox did to its clients, so tests can check the faults really happened."""

    rate_limited: int = 0
    errors: int = 0
    slowed: int = 0
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    edited_before_put: list[str] = field(default_factory=list)


@dataclass
class SandboxState:
    """The faults switched on, and the request counters they run on."""

    faults: Faults
    requests: int = 0
    lists: int = 0


class PortalStore:
    """The entries, in one SQLite file; safe to use from several threads."""

    def __init__(self, path: Path | str, *, base_url: str = "https://innokyla.example") -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/")
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS entries (id TEXT PRIMARY KEY, updated_at TEXT NOT NULL, "
            "version INTEGER NOT NULL, body TEXT NOT NULL)"
        )
        self._db.execute("CREATE INDEX IF NOT EXISTS entries_order ON entries (updated_at, id)")
        row = self._db.execute("SELECT max(updated_at) FROM entries").fetchone()
        self._last = _parse(row[0]) if row and row[0] else datetime.fromtimestamp(0, UTC)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _now(self) -> datetime:
        # Strictly increasing, so (updated_at, id) order is the order of changes.
        now = max(datetime.now(UTC), self._last + timedelta(microseconds=1))
        self._last = now
        return now

    def _row(self, body: dict[str, Any], version: int) -> tuple[str, str, int, str]:
        return body["id"], body["updated_at"], version, json.dumps(body, ensure_ascii=False)

    def create(self, entry: dict[str, Any]) -> dict[str, Any]:
        """A new entry (without id) → the stored entry."""
        return self.seed([entry])[0]

    def seed(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Create many entries in one transaction."""
        created = []
        with self._lock:
            self._db.execute("BEGIN")
            try:
                for entry in entries:
                    entry_id = str(entry.get("id") or uuid.uuid4().hex[:16])
                    stamp = rfc3339(self._now())
                    body = _normalised({**entry, "id": entry_id})
                    body.update(id=entry_id, url=f"{self.base_url}/{body['type']}/{entry_id}",
                                created_at=stamp, updated_at=stamp)
                    self._db.execute("INSERT INTO entries VALUES (?, ?, ?, ?)", self._row(body, 1))
                    created.append(body)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return created

    def get(self, entry_id: str) -> tuple[dict[str, Any], int] | None:
        """The entry and its version (the ETag), or None."""
        with self._lock:
            row = self._db.execute("SELECT body, version FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return (json.loads(row[0]), row[1]) if row else None

    def update(self, entry_id: str, changes: dict[str, Any], *, if_version: int | None = None) -> tuple[dict[str, Any], int] | str:
        """Apply ``changes``; ``"missing"`` or ``"conflict"`` when it cannot."""
        with self._lock:
            found = self.get(entry_id)
            if found is None:
                return "missing"
            body, version = found
            if if_version is not None and if_version != version:
                return "conflict"
            body.update(changes)
            body["updated_at"] = rfc3339(self._now())
            self._db.execute("UPDATE entries SET updated_at = ?, version = ?, body = ? WHERE id = ?",
                             (body["updated_at"], version + 1, json.dumps(body, ensure_ascii=False), entry_id))
            return body, version + 1

    def delete(self, entry_id: str) -> bool:
        with self._lock:
            return self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,)).rowcount > 0

    def page(self, updated_since: str, after: tuple[str, str] | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        """Entries with ``updated_at >= updated_since`` after the key ``after``; and whether more follow."""
        with self._lock:
            if after is None:
                rows = self._db.execute(
                    "SELECT body FROM entries WHERE updated_at >= ? ORDER BY updated_at, id LIMIT ?",
                    (updated_since, limit + 1),
                ).fetchall()
            else:
                rows = self._db.execute(
                    "SELECT body FROM entries WHERE updated_at >= ? AND (updated_at > ? OR (updated_at = ? AND id > ?)) "
                    "ORDER BY updated_at, id LIMIT ?",
                    (updated_since, after[0], after[0], after[1], limit + 1),
                ).fetchall()
        items = [json.loads(row[0]) for row in rows]
        return items[:limit], len(items) > limit

    def ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT id FROM entries ORDER BY id")]

    def all(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(row[0]) for row in self._db.execute("SELECT body FROM entries ORDER BY updated_at, id")]


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _normalised(entry: dict[str, Any]) -> dict[str, Any]:
    body = {name: entry.get(name) for name in _WRITABLE}
    body["type"] = body["type"] or "practice"
    body["status"] = body["status"] or "published"
    body["tags"] = body["tags"] or []
    body["validation"] = entry.get("validation")
    return body


def _encode_cursor(updated_since: str, last: dict[str, Any]) -> str:
    raw = json.dumps([updated_since, last["updated_at"], last["id"]]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, tuple[str, str]]:
    raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
    since, updated_at, entry_id = json.loads(raw)
    return str(since), (str(updated_at), str(entry_id))


def sample_entries(n: int, organisations: list[dict[str, str]], *, seed: int = 1) -> list[dict[str, Any]]:
    """``n`` plausible entries spread over ``organisations``, with Finnish, Swedish and English
    texts (and now and then Arabic), for tests and demos."""
    rng = random.Random(seed)
    regions = [("Uusimaa", "Helsinki"), ("Pirkanmaa", "Tampere"), ("Varsinais-Suomi", "Turku"), ("Pohjois-Pohjanmaa", "Oulu")]
    entries = []
    for i in range(n):
        region, municipality = rng.choice(regions)
        title = {"fi": f"Toimintamalli {i}: yhteisöllinen asuminen", "sv": f"Verksamhetsmodell {i}"}
        if i % 7 == 0:
            title["ar"] = f"نموذج العمل {i}"
        entries.append({
            "type": ENTRY_TYPES[i % 2],
            "title": title,
            "summary": {"fi": f"Kuvaus {i} — ikääntyneiden kotona asumisen tuki.", "en": f"Summary {i}"},
            "organisation": dict(organisations[i % len(organisations)]),
            "region": region,
            "municipality": municipality,
            "funder": "STEA" if i % 3 == 0 else None,
            "parent_id": None,
            "tags": ["ikääntyneet", "asuminen"][: 1 + i % 2],
            "status": "archived" if i % 10 == 9 else "published",
        })
    return entries


def create_app(store: PortalStore, *, token: str | None, faults: Faults | None = None) -> FastAPI:
    """The sandbox's HTTP app; ``token`` None accepts any Bearer token."""
    app = FastAPI(title="collabbus portal sandbox (CONTRACT §8)", docs_url="/docs")
    state = SandboxState(faults or Faults())
    log = FaultLog()
    app.state.store = store
    app.state.fault_log = log
    app.state.sandbox = state

    async def guard(request: Request) -> None:
        """Bearer auth, then the request-counting faults (a dependency: cheaper than middleware)."""
        if token is not None and request.headers.get("authorization") != f"Bearer {token}":
            raise HTTPException(401, "unauthorized", headers={"WWW-Authenticate": "Bearer"})
        f: Faults = state.faults
        state.requests += 1
        n = state.requests
        if f.slow_every and n % f.slow_every == 0:
            log.slowed += 1
            await asyncio.sleep(f.slow_seconds)
        if f.rate_limit_every and n % f.rate_limit_every == 0:
            log.rate_limited += 1
            raise HTTPException(429, "rate limited", headers={"Retry-After": str(f.retry_after)})
        if f.error_every and n % f.error_every == 0:
            log.errors += 1
            raise HTTPException(503, "temporarily unavailable")

    api = APIRouter(prefix="/api/v1", dependencies=[Depends(guard)])

    @api.get("/entries")
    async def list_entries(updated_since: str | None = None, cursor: str | None = None, limit: int = 100) -> Any:
        limit = max(1, min(limit, 1000))
        f: Faults = state.faults
        state.lists += 1
        if f.change_every and state.lists % f.change_every == 0:
            ids = store.ids()
            for entry_id in random.Random(state.lists).sample(ids, min(f.change_count, len(ids))):
                found = store.get(entry_id)
                if found:
                    title = dict(found[0]["title"] or {"fi": entry_id})
                    title["fi"] = title.get("fi", "") + " (muutettu)"
                    store.update(entry_id, {"title": title})
                    log.changed.append(entry_id)
        if cursor:
            try:
                since, after = _decode_cursor(cursor)
            except (ValueError, TypeError):
                return JSONResponse({"error": "invalid cursor"}, status_code=400)
        else:
            try:
                since, after = rfc3339(_parse(updated_since)) if updated_since else "", None
            except ValueError:
                return JSONResponse({"error": "updated_since must be RFC 3339"}, status_code=400)
        items, more = store.page(since, after, limit)
        if f.delete_every and state.lists % f.delete_every == 0 and items:
            store.delete(items[-1]["id"])
            log.deleted.append(items[-1]["id"])
        return {"items": items, "next_cursor": _encode_cursor(since, items[-1]) if more else None}

    @api.get("/entries/{entry_id}")
    async def get_entry(entry_id: str) -> Any:
        found = store.get(entry_id)
        if found is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(found[0], headers={"ETag": f'"{found[1]}"'})

    @api.post("/entries", status_code=201)
    async def post_entry(request: Request) -> Any:
        body = await request.json()
        if not isinstance(body, dict) or "id" in body:
            return JSONResponse({"error": "an Entry without id"}, status_code=400)
        created = store.create(body)
        return JSONResponse(created, status_code=201, headers={"ETag": '"1"', "Location": f"/api/v1/entries/{created['id']}"})

    @api.put("/entries/{entry_id}")
    async def put_entry(entry_id: str, request: Request, if_match: str | None = Header(None)) -> Any:
        body = await request.json()
        if not isinstance(body, dict):
            return JSONResponse({"error": "an object of the fields to change"}, status_code=400)
        version = _version(if_match)
        changes = {k: v for k, v in body.items() if k in _WRITABLE}
        f: Faults = state.faults
        if version is not None and f.edits_before_put > 0 and f.edit_before_put:
            f.edits_before_put -= 1
            if store.update(entry_id, dict(f.edit_before_put)) != "missing":
                log.edited_before_put.append(entry_id)
        result = store.update(entry_id, changes, if_version=version)
        if result == "missing":
            return JSONResponse({"error": "not found"}, status_code=404)
        if result == "conflict":
            return JSONResponse({"error": "the entry changed meanwhile"}, status_code=412)
        assert isinstance(result, tuple)
        return JSONResponse(result[0], headers={"ETag": f'"{result[1]}"'})

    @api.put("/entries/{entry_id}/validation")
    async def put_validation(entry_id: str, request: Request) -> Any:
        body = await request.json()
        wanted = {"validation_id", "outcome", "evidence_level", "decided_at", "url"}
        if not isinstance(body, dict) or not {"validation_id", "outcome"} <= set(body) or set(body) - wanted:
            return JSONResponse({"error": f"expected {sorted(wanted)}"}, status_code=400)
        result = store.update(entry_id, {"validation": body})
        if result == "missing":
            return JSONResponse({"error": "not found"}, status_code=404)
        assert isinstance(result, tuple)
        return JSONResponse(result[0], headers={"ETag": f'"{result[1]}"'})

    app.include_router(api)

    @app.post("/_sandbox/faults")
    async def set_faults(request: Request) -> Any:
        body = await request.json()
        known = sorted(f.name for f in fields(Faults))
        if not isinstance(body, dict) or set(body) - set(known):
            unknown = sorted(set(body) - set(known)) if isinstance(body, dict) else []
            what = f"unknown faults {unknown}" if unknown else "a JSON object of faults"
            return JSONResponse({"error": f"{what}; the faults are {known}"}, status_code=422)
        # Numbers as numbers: a "3" was taken, and every request then answered 500.
        wrong = [name for name, value in body.items() if not _fits(_FAULT_TYPES[name], value)]
        if wrong:
            expected = ", ".join(f"{name}: {_FAULT_TYPES[name]}" for name in wrong)
            return JSONResponse({"error": f"invalid faults ({expected})"}, status_code=422)
        # A partial update: the faults named change, the others stay as they were (switching one
        # on must not switch the others off); 0 turns one off.
        state.faults = Faults(**{**asdict(state.faults), **body})
        return asdict(state.faults)

    @app.get("/_sandbox/faults")
    async def get_faults() -> Any:
        return {"faults": asdict(state.faults), "log": asdict(log)}

    @app.post("/_sandbox/seed")
    async def seed(request: Request) -> Any:
        body = await request.json()
        if isinstance(body, dict) and "count" in body:
            entries = sample_entries(int(body["count"]), body.get("organisations") or [{"name": "Esimerkki ry", "business_id": "0000000-0"}],
                                     seed=int(body.get("seed", 1)))
        else:
            entries = body
        created = await asyncio.to_thread(store.seed, entries)
        return {"created": len(created), "ids": [e["id"] for e in created]}

    return app


def _version(if_match: str | None) -> int | None:
    if not if_match:
        return None
    try:
        return int(if_match.strip().removeprefix("W/").strip('"'))
    except ValueError:
        return -1


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class PortalSandbox:
    """The sandbox served by uvicorn in the current event loop (port 0: any free port)."""

    def __init__(self, path: Path | str, host: str = "127.0.0.1", port: int = 0, *, token: str | None = None,
                 faults: Faults | None = None) -> None:
        self.host, self.port = host, port
        self.store = PortalStore(path, base_url="https://innokyla.example")
        self.app = create_app(self.store, token=token, faults=faults)
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def faults(self) -> Faults:
        return self.app.state.sandbox.faults  # type: ignore[no-any-return]

    @faults.setter
    def faults(self, value: Faults) -> None:
        self.app.state.sandbox.faults = value

    @property
    def fault_log(self) -> FaultLog:
        return self.app.state.fault_log  # type: ignore[no-any-return]

    async def start(self) -> None:
        # IPPROTO_TCP named, so asyncio turns Nagle's algorithm off (else ~40 ms per response).
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=False, log_config=None,
                                timeout_graceful_shutdown=2)
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="portal-sandbox")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("the portal sandbox stopped while starting")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None
        self.store.close()
