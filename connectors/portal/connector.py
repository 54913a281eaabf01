"""The portal connector (CONTRACT §8): entries of an Innokylä-style portal become projects.

Pull, incrementally: list the entries changed since the last sync, page by page, in (updated_at,
id) order. An entry whose organisation's business id names a member (an ``fi-business-id``
identifier) becomes ``project.registered`` the first time and ``project.updated`` with what
changed afterwards, offered through the gate as that member. Organisations that name no member
are reported, never guessed.

Exactly once, structurally:
- what each entry became (its content hash and the facts emitted) is stored per entry, so an
  entry listed again without a change emits nothing;
- event ids are ``innokyla.{entry}.{revision}.{hash}``: a crash between the gate's answer and
  storing the entry re-offers the same id, which the log keeps once;
- the page cursor is stored after each page, in the same transaction as its entries, so a sync
  that stops (a page that keeps failing, a crash) resumes where it stopped;
- unmapped organisations are reported, not stored: when the members' business ids change, the
  next sync reads every entry again (entries already synced and unchanged still emit nothing).

How an entry maps onto a project:
- ``project_id`` is ``innokyla-{entry id}``; ``external_refs`` is ``[{system: "innokyla", id, url}]``;
- ``title``/``summary`` are the entry's LocalizedText, unchanged;
- ``status``: ``draft`` → ``planned``, ``published`` → ``active``, ``archived`` → ``completed``
  (an archived Innokylä entry is a practice no longer developed; it is not deleted);
- ``location``: ``{country: "FI", region, municipality}`` (Innokylä is Finnish);
- not carried: ``tags`` (free text, not theme codes), ``funder`` (a name, not a member),
  ``parent_id``, ``validation`` (the bus's own validations are pushed *to* the portal).

Push: :func:`push_decisions` follows ``validation.decided`` in the log and writes each decision
about a project that came from the portal (or names an ``innokyla`` reference) to the entry (``PUT /entries/{id}/validation``). That changes the entry's
``updated_at`` but none of the facts above, so the next pull emits nothing: the connector's own
change is not echoed back.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from sqlalchemy import Engine
from sqlmodel import select

from bus import cloudevents
from connectors.portal import store
from handlers.db import session_scope
from handlers.institutions import Institution

log = logging.getLogger("collabbus.portal")

SYSTEM = "innokyla"
BUSINESS_ID_SCHEME = "fi-business-id"
STATUS = {"draft": "planned", "published": "active", "archived": "completed"}
RETRYABLE = frozenset({429, 500, 502, 503, 504})
_UNSAFE = re.compile(r"[^A-Za-z0-9_:-]")


class PortalUnavailable(Exception):
    """The portal kept failing after every retry."""


# --- the portal's HTTP API ----------------------------------------------------------------------


class PortalClient:
    """§8 over httpx, with retries: 429/5xx (honouring ``Retry-After``), timeouts and dropped
    connections are retried with exponential backoff, up to ``attempts`` times per request."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        timeout: float = 10.0,
        attempts: int = 8,
        backoff: float = 0.2,
        max_wait: float = 60.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)
        self.attempts = attempts
        self.backoff = backoff
        self.max_wait = max_wait
        self.retries = 0
        self.waited = 0.0

    async def aclose(self) -> None:
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request, retried while the portal answers with a transient failure."""
        problem = ""
        for attempt in range(self.attempts):
            try:
                response = await self.http.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem = f"{type(exc).__name__}"
                wait = self._backoff(attempt)
            else:
                if response.status_code not in RETRYABLE:
                    return response
                problem = f"HTTP {response.status_code}"
                told = _retry_after(response)
                wait = self._backoff(attempt) if told is None else told
            if attempt + 1 < self.attempts:
                wait = min(wait, self.max_wait)
                self.retries += 1
                self.waited += wait
                log.info("portal %s %s: %s; retrying in %.2f s", method, path, problem, wait)
                await asyncio.sleep(wait)
        raise PortalUnavailable(f"{method} {path}: {problem} after {self.attempts} attempts")

    def _backoff(self, attempt: int) -> float:
        return float(min(self.backoff * 2**attempt, self.max_wait))

    async def list_entries(self, *, updated_since: str | None, cursor: str | None, limit: int) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if updated_since:
            params["updated_since"] = updated_since
        if cursor:
            params["cursor"] = cursor
        response = await self.request("GET", "/api/v1/entries", params=params)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    async def get_entry(self, entry_id: str) -> tuple[dict[str, Any], str | None] | None:
        """The entry and its ETag; None when it no longer exists."""
        response = await self.request("GET", f"/api/v1/entries/{entry_id}")
        if response.status_code in (404, 410):
            return None
        response.raise_for_status()
        return response.json(), response.headers.get("etag")

    async def put_validation(self, entry_id: str, body: Mapping[str, Any]) -> bool:
        """Write a validation decision to the entry; False when the entry is gone."""
        response = await self.request("PUT", f"/api/v1/entries/{entry_id}/validation", json=dict(body))
        if response.status_code in (404, 410):
            return False
        response.raise_for_status()
        return True


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max((moment - datetime.now(UTC)).total_seconds(), 0.0)


# --- mapping ------------------------------------------------------------------------------------


def project_id_of(entry_id: str) -> str:
    """The project an entry becomes: ``innokyla-{id}`` (characters a subject token cannot hold
    are replaced, with a hash suffix so two ids never collide)."""
    safe = _UNSAFE.sub("_", entry_id)
    if safe != entry_id or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(entry_id.encode()).hexdigest()[:16]}"
    return f"{SYSTEM}-{safe}"


def project_facts(entry: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """The ``project.registered`` data an entry stands for (see the module docstring)."""
    facts: dict[str, Any] = {
        "project_id": project_id_of(str(entry["id"])),
        "title": entry.get("title"),
        "owner": owner,
        "status": STATUS.get(str(entry.get("status")), "active"),
        "external_refs": [{"system": SYSTEM, "id": str(entry["id"]), **({"url": entry["url"]} if entry.get("url") else {})}],
    }
    if entry.get("summary"):
        facts["summary"] = entry["summary"]
    location = {"country": "FI"}
    for name in ("region", "municipality"):
        if entry.get(name):
            location[name] = entry[name]
    facts["location"] = location
    return facts


def content_hash(facts: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(facts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def changes_between(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """``project.updated`` changes: every field whose value differs; a field gone is cleared (null)."""
    names = (set(before) | set(after)) - {"project_id", "owner"}
    return {name: after.get(name) for name in sorted(names) if before.get(name) != after.get(name)}


def event_id(entry_id: str, revision: int, digest: str) -> str:
    return f"{SYSTEM}.{_UNSAFE.sub('_', entry_id)[:80]}.{revision}.{digest[:16]}"


# --- the sync -----------------------------------------------------------------------------------


@dataclass
class SyncReport:
    """What one sync did; ``as_dict`` is the ``--json`` output."""

    portal: str
    listed: int = 0
    pages: int = 0
    registered: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    """Events the log already had (a sync re-run after a crash): counted, not emitted twice."""
    deleted: list[str] = field(default_factory=list)
    """Entries listed but gone when fetched: skipped."""
    unmapped: dict[str, dict[str, Any]] = field(default_factory=dict)
    """business id → {name, entries}: organisations that name no member."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    owner_changed: list[str] = field(default_factory=list)
    retries: int = 0
    complete: bool = False
    error: str | None = None
    seconds: float = 0.0

    @property
    def emitted(self) -> int:
        return self.registered + self.updated

    @property
    def rate(self) -> float:
        """Entries processed per second."""
        return self.listed / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "portal": self.portal, "complete": self.complete, "error": self.error,
            "listed": self.listed, "pages": self.pages, "registered": self.registered, "updated": self.updated,
            "unchanged": self.unchanged, "duplicates": self.duplicates, "deleted": self.deleted,
            "unmapped": self.unmapped, "unmapped_entries": sum(u["entries"] for u in self.unmapped.values()),
            "rejected": self.rejected, "owner_changed": self.owner_changed, "retries": self.retries,
            "seconds": round(self.seconds, 3), "entries_per_second": round(self.rate, 1),
            "events_per_second": round(self.emitted / self.seconds, 1) if self.seconds > 0 else 0.0,
        }


class PortalSync:
    """Pulls a portal's entries into the bus through ``gate`` (a ``bus.gate.Gate``)."""

    def __init__(
        self,
        gate: Any,
        engine: Engine,
        client: PortalClient,
        *,
        portal: str | None = None,
        page_size: int = 100,
        concurrency: int = 8,
    ) -> None:
        self.gate = gate
        self.engine = engine
        self.client = client
        self.portal = portal or str(client.http.base_url)
        self.page_size = page_size
        self.concurrency = concurrency

    def _members(self) -> dict[str, str]:
        """business id → member, of the members that name one."""
        found: dict[str, str] = {}
        with session_scope(self.engine) as session:
            for institution in session.exec(select(Institution)):
                if not institution.active:
                    continue
                for identifier in institution.identifiers:
                    if identifier.get("scheme") == BUSINESS_ID_SCHEME:
                        found.setdefault(str(identifier.get("value")), institution.id)
        return found

    async def sync(self, *, full: bool = False, progress: Callable[[SyncReport], None] | None = None) -> SyncReport:
        """One pass over what changed since the last sync (``full``: over everything; entries
        unchanged since they were synced still emit nothing)."""
        report = SyncReport(self.portal)
        started = time.monotonic()
        retries_before = self.client.retries
        members = await asyncio.to_thread(self._members)
        with session_scope(self.engine) as session:
            position = store.load_cursor(session, self.portal)
        mapping = content_hash(members)
        if position.mapping is not None and position.mapping != mapping:
            full = True  # organisations skipped as unmapped may name a member now
        position.mapping = mapping
        if full:
            position.cursor, position.updated_since = None, None
        elif position.cursor is None:
            position.updated_since = position.high_water  # a new paged read from where the last one ended
        try:
            while True:
                page = await self.client.list_entries(
                    updated_since=position.updated_since, cursor=position.cursor, limit=self.page_size
                )
                items = [item for item in page.get("items") or [] if isinstance(item, dict) and item.get("id")]
                report.pages += 1
                report.listed += len(items)
                rows = await self._apply_page(items, members, report)
                if items:
                    newest = max(str(item.get("updated_at") or "") for item in items)
                    position.high_water = max(position.high_water or "", newest) or None
                position.cursor = page.get("next_cursor")
                await asyncio.to_thread(self._save, rows, position)
                if progress is not None:
                    report.seconds = time.monotonic() - started
                    report.retries = self.client.retries - retries_before
                    progress(report)
                if not position.cursor:
                    break
            report.complete = True
        except (PortalUnavailable, httpx.HTTPError, ValueError) as exc:
            report.error = str(exc) or type(exc).__name__
            log.warning("portal sync stopped: %s (the next sync resumes from the last page)", report.error)
        report.seconds = time.monotonic() - started
        report.retries = self.client.retries - retries_before
        return report

    def _save(self, rows: list[store.PortalEntry], position: store.PortalCursor) -> None:
        with session_scope(self.engine) as session:
            for row in rows:
                session.merge(row)
            store.save_cursor(session, position)

    async def _apply_page(
        self, items: list[dict[str, Any]], members: dict[str, str], report: SyncReport
    ) -> list[store.PortalEntry]:
        with session_scope(self.engine) as session:
            known = store.known_entries(session, self.portal, [str(item["id"]) for item in items])
        gate = asyncio.Semaphore(self.concurrency)

        async def one(item: dict[str, Any]) -> store.PortalEntry | None:
            async with gate:
                return await self._apply(item, known.get(str(item["id"])), members, report)

        # Every entry of the page finishes before a failure ends the sync, so nothing goes on
        # emitting behind its back; the next sync reads the page again and the log recognises
        # the events already emitted by their ids.
        results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise failures[0]
        return [row for row in results if isinstance(row, store.PortalEntry)]

    def _owner(self, entry: Mapping[str, Any], members: dict[str, str], report: SyncReport) -> str | None:
        organisation = entry.get("organisation") or {}
        business_id = str(organisation.get("business_id") or "")
        owner = members.get(business_id) if business_id else None
        if owner is None:
            seen = report.unmapped.setdefault(business_id or "(none)", {"name": organisation.get("name"), "entries": 0})
            seen["entries"] += 1
        return owner

    async def _apply(
        self, listed: dict[str, Any], known: store.PortalEntry | None, members: dict[str, str], report: SyncReport
    ) -> store.PortalEntry | None:
        entry_id = str(listed["id"])
        owner = self._owner(listed, members, report)
        if owner is None:
            return None
        if known is not None and content_hash(project_facts(listed, owner)) == known.content_hash:
            report.unchanged += 1
            return None
        # Changed or new as listed: read the entry itself, which may have moved on (or gone) since.
        fetched = await self.client.get_entry(entry_id)
        if fetched is None:
            report.deleted.append(entry_id)
            return None
        entry, etag = fetched
        if (entry.get("organisation") or {}).get("business_id") != (listed.get("organisation") or {}).get("business_id"):
            owner = self._owner(entry, members, report)
            if owner is None:
                return None
        facts = project_facts(entry, owner)
        digest = content_hash(facts)
        if known is not None and digest == known.content_hash:
            report.unchanged += 1
            return None
        if known is not None and known.owner != owner:
            report.owner_changed.append(entry_id)  # a project's owner cannot change; an operator decides
            return None
        revision = (known.revision if known else 0) + 1
        if known is None:
            event_type, data = "project.registered", facts
        else:
            event_type, data = "project.updated", {"project_id": facts["project_id"], "changes": changes_between(known.data, facts)}
        event = {
            "specversion": "1.0",
            "id": event_id(entry_id, revision, digest),
            "source": f"/institutions/{owner}",
            "type": event_type,
            "subject": facts["project_id"],
            "data": data,
        }
        verdict = await self.gate.admit(owner, orjson.dumps(event), cloudevents.structured_headers())
        if not verdict.accepted:
            report.rejected.append({"entry": entry_id, "event_id": event["id"], "reason": verdict.reason,
                                    "errors": [p.as_dict() for p in verdict.errors]})
            return None
        if verdict.duplicate:
            report.duplicates += 1
        if known is None:
            report.registered += 1
        else:
            report.updated += 1
        return store.PortalEntry(
            portal=self.portal, entry_id=entry_id, project_id=facts["project_id"], owner=owner, content_hash=digest,
            revision=revision, data=facts, etag=etag, synced_at=datetime.now(UTC),
        )

    async def push_validation(self, decided: Mapping[str, Any], project_id: str, *, url: str | None = None) -> bool | None:
        """Write a ``validation.decided`` (its data) about ``project_id`` to the portal entry the
        project came from. None: the project has no portal entry; False: the entry is gone."""
        with session_scope(self.engine) as session:
            row = store.entry_of_project(session, project_id)
        if row is None:
            return None
        return await self.client.put_validation(row.entry_id, _validation_body(decided, url))

    async def push_decision(self, event: Mapping[str, Any]) -> bool | None:
        """Push a logged ``validation.decided`` event when its validation is about a portal entry
        (a project that came from the portal, or an ``innokyla`` external reference)."""
        from handlers.validations import Validation

        data = event["data"]
        with session_scope(self.engine) as session:
            validation = session.get(Validation, data["validation_id"])
            entry_id: str | None = None
            if validation is not None and validation.external_ref and validation.external_ref.get("system") == SYSTEM:
                entry_id = str(validation.external_ref["id"])
            elif validation is not None and validation.project_id:
                row = store.entry_of_project(session, validation.project_id)
                entry_id = row.entry_id if row is not None else None
        if entry_id is None:
            return None
        return await self.client.put_validation(entry_id, _validation_body({**data, "decided_at": event.get("time")}, None))


def _validation_body(decided: Mapping[str, Any], url: str | None) -> dict[str, Any]:
    return {
        "validation_id": decided["validation_id"],
        "outcome": decided["outcome"],
        "evidence_level": decided.get("evidence_level"),
        "decided_at": decided.get("decided_at") or datetime.now(UTC).isoformat(),
        "url": url,
    }


PUSH_CONSUMER = "portal-push"


async def push_decisions(js: Any, sync: PortalSync, stop: asyncio.Event, *, durable: str = PUSH_CONSUMER) -> None:
    """Follow ``validation.decided`` in the log (a durable consumer, so nothing is missed while
    the bus is down) and push those about portal entries. Pushing twice writes the same thing."""
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from bus.streams import EVENTS_STREAM

    config = ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, ack_wait=120)
    sub = await js.pull_subscribe("collab.events.*.validation.decided.*", durable=durable, stream=EVENTS_STREAM, config=config)
    try:
        while not stop.is_set():
            try:
                messages = await sub.fetch(10, timeout=1.0)
            except (NatsTimeoutError, TimeoutError):  # nats-py raises either when nothing came
                continue
            for msg in messages:
                try:
                    await sync.push_decision(orjson.loads(msg.data))
                except (PortalUnavailable, httpx.HTTPError) as exc:
                    log.warning("pushing a validation decision to the portal failed: %s; retrying later", exc)
                    await msg.nak(delay=30)
                except Exception:
                    log.exception("cannot push a validation decision; skipped")
                    await msg.ack()
                else:
                    await msg.ack()
    finally:
        await sub.unsubscribe()


# --- running it ---------------------------------------------------------------------------------


async def from_settings(settings: Any, gate: Any, engine: Engine, **options: Any) -> PortalSync:
    """The connector for ``COLLABBUS_PORTAL_URL``/``_TOKEN``. The portal, like a webhook target,
    must resolve to a public address or to a network ``COLLABBUS_WEBHOOK_ALLOW_NETWORKS`` allows
    (``connectors.webhooks.targets.RefusedTarget`` otherwise)."""
    from connectors.webhooks.targets import networks, resolve

    if not settings.portal_url:
        raise ValueError("no portal configured: set COLLABBUS_PORTAL_URL")
    await resolve(settings.portal_url, networks(settings.webhook_allow_networks))
    client = PortalClient(settings.portal_url, settings.portal_token)
    return PortalSync(gate, engine, client, **options)


async def sync_periodically(
    sync: PortalSync, interval: float, stop: asyncio.Event, *, on_report: Callable[[SyncReport], None] | None = None
) -> None:
    """Sync now and then every ``interval`` seconds until ``stop`` is set (``collabbus up``)."""
    while not stop.is_set():
        try:
            report = await sync.sync()
        except Exception:  # a bug in one pass must not end the connector; the cursor is safe
            log.exception("portal sync failed")
        else:
            log.info("portal sync: %s", {k: v for k, v in report.as_dict().items() if not isinstance(v, (list, dict))})
            if on_report is not None:
                on_report(report)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
