"""The portal connector (CONTRACT §8): entries of an Innokylä-style portal become projects.

Pull, incrementally: list the entries changed since the last sync, page by page, in (updated_at,
id) order. An entry whose organisation's business id names a member (an ``fi-business-id``
identifier) becomes ``project.registered`` the first time and ``project.updated`` with what
changed afterwards, offered through the gate as that member. Organisations that name no member
are reported, never guessed. An entry the connector cannot read (:func:`entry_problems`: not an
object, no id, an organisation that is not an object, text JSON cannot carry) is reported rejected,
as one the gate refuses is, and the rest of its page synced; an answer that is no page at all (an
HTML login page) stops the sync, saying what it was.

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
- not carried: ``tags`` (free text, not theme codes), ``funder`` (a name, not a member: the
  funders of a published project are pushed *to* the portal), ``parent_id``, ``validation``
  (the bus's own validations are pushed *to* the portal).

Push: :func:`push_decisions` follows ``validation.decided`` in the log and writes each decision
about a project that came from the portal (or names an ``innokyla`` reference) to the entry (``PUT /entries/{id}/validation``). That changes the entry's
``updated_at`` but none of the facts above, so the next pull emits nothing: the connector's own
change is not echoed back.

Publication: a project of the network goes onto the portal when an operator marks it, on its
owner's request, with ``collabbus portal publish PROJECT_ID [--type whole|practice]``
(:func:`mark_for_publication`: a row in the connector's own ``portal_publications`` table; the
owner must hold a business id, which is how the portal names organisations and how the pull maps
the entry back). After every complete pull, :meth:`PortalSync.push_publications`:

- creates the entry of a newly marked project (``POST /entries``; title, summary, organisation,
  region, municipality, status mapped back: ``planned`` → ``draft``, ``active`` → ``published``,
  the rest → ``archived``; ``funder``: the names of the partners the project names as its
  funders, :func:`funder_of`), tagged ``collabbus:{project id}``; stores entry ↔ project *before*
  anything else, as a synced entry, so the pull maps the entry to the project and never registers
  it again; then offers ``project.updated`` adding ``{system: "innokyla", id, url}`` to the
  project's ``external_refs``, through the gate in the owner's name. A creation whose answer was
  lost (timeout, crash) is not repeated for a while; the next pull finds the entry by its tag and
  adopts it;
- writes later changes of the project (from the read model) to the entry, three-way: the fields
  that differ between the last pushed version and the project now are laid over the entry as just
  read, and written with ``If-Match``; on 412 (the entry changed between the read and the write)
  the entry is read again and the same fields laid over it, so neither side loses a change to
  another field. What the connector wrote is taken into the entry's synced facts, so it is not
  pulled back; what the portal changed meanwhile is, by the next pull;
- waits while the read model has not applied the connector's last event about the project (the
  reference, or a portal change it pulled), so a project read too early never undoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import httpx
import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from sqlalchemy import Engine
from sqlmodel import Session, col, select

from bus import cloudevents
from bus.verdict import Problem
from connectors.portal import store
from handlers.db import session_scope
from handlers.bookkeeping import AppliedEvent
from handlers.institutions import Institution
from handlers.projects import Project, ProjectPartner
from ops import tracing as traces
from schemas.common import json_type

log = logging.getLogger("collabbus.portal")

SYSTEM = "innokyla"
BUSINESS_ID_SCHEME = "fi-business-id"
STATUS = {"draft": "planned", "published": "active", "archived": "completed"}
RETRYABLE = frozenset({429, 500, 502, 503, 504})
PORTAL_STATUS = {"planned": "draft", "active": "published", "completed": "archived",
                 "cancelled": "archived", "suspended": "archived"}
ENTRY_TYPES = ("whole", "practice")
PUSHED_FIELDS = ("title", "summary", "organisation", "region", "municipality", "status", "funder")
"""The entry fields a published project determines; the others are the portal's own."""
WRITABLE_FIELDS = ("type", "title", "summary", "organisation", "region", "municipality", "funder", "parent_id", "tags", "status")
FACT_SOURCES = {"title": ("title",), "summary": ("summary",), "status": ("status",), "location": ("region", "municipality")}
"""project fact → the entry fields it is made of."""
PUBLICATION_TAG_PREFIX = "collabbus:"
CREATION_CLAIM = timedelta(minutes=2)
MAX_CONFLICTS = 5
_UNSAFE = re.compile(r"[^A-Za-z0-9_:-]")


class PortalUnavailable(Exception):
    """The portal kept failing after every retry."""


class LogUnavailable(Exception):
    """The event log did not confirm an entry's event (a cluster electing its leader, NATS away):
    the sync stops before storing the page, and the next one reads it again."""


class PublicationRefused(Exception):
    """A project that cannot be marked for publication (the reason is the message)."""


class UnreadableAnswer(ValueError):
    """The portal answered something that is not what §8 says (an HTML login page, a page that is
    not an object with ``items``): the sync stops there, saying so, and the next one asks again."""


class MalformedEntry(UnreadableAnswer):
    """An entry the connector cannot read (:func:`entry_problems`): refused on its own, with its
    problems, while the rest of its page is synced."""

    def __init__(self, entry_id: str, problems: list[Problem]) -> None:
        self.entry_id, self.problems = entry_id, problems
        said = "; ".join(f"{'.'.join(map(str, p.loc)) or 'the entry'}: {p.msg}" for p in problems)
        super().__init__(f"the portal's entry {entry_id} cannot be read ({said})")


# --- the portal's HTTP API ----------------------------------------------------------------------


_TIMEOUTS: tuple[tuple[type[httpx.TimeoutException], str, str], ...] = (
    (httpx.ConnectTimeout, "connect", "no connection to the portal at {where} within {seconds:g} s"),
    (httpx.ReadTimeout, "read", "the portal at {where} did not answer within {seconds:g} s"),
    (httpx.WriteTimeout, "write", "the portal at {where} did not take the request within {seconds:g} s"),
    (httpx.PoolTimeout, "pool", "no connection to the portal at {where} was free within {seconds:g} s"),
)
"""httpx's timeouts, the client's limit each is, and what it means to an operator."""


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

    async def request(self, method: str, path: str, *, idempotent: bool = True, **kwargs: Any) -> httpx.Response:
        """One request, retried while the portal answers with a transient failure.

        A request that is not ``idempotent`` (creating an entry) is retried only when the portal
        certainly did not act on it: 429 and 503 answers, and connections never made. After a
        timeout or another 5xx it may have, so :class:`PortalUnavailable` is raised instead."""
        problem = ""
        for attempt in range(self.attempts):
            try:
                response = await self.http.request(method, path, **kwargs)
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                problem = self._failure(exc)
                if not idempotent and not isinstance(exc, (httpx.ConnectError, httpx.ConnectTimeout)):
                    raise PortalUnavailable(f"{problem} ({method} {path}); the portal may have acted on it") from exc
                wait = self._backoff(attempt)
            else:
                if response.status_code not in RETRYABLE:
                    return response
                problem = f"the portal at {self.where} answered {response.status_code} {response.reason_phrase}".rstrip()
                if not idempotent and response.status_code not in (429, 503):
                    raise PortalUnavailable(f"{problem} ({method} {path}); the portal may have acted on it")
                told = _retry_after(response)
                wait = self._backoff(attempt) if told is None else told
            if attempt + 1 < self.attempts:
                wait = min(wait, self.max_wait)
                self.retries += 1
                self.waited += wait
                log.debug("portal %s %s: %s; retrying in %.2f s", method, path, problem, wait)  # counted in the pass's retries
                await asyncio.sleep(wait)
        raise PortalUnavailable(f"{problem} ({method} {path}, {self.attempts} attempts)")

    @property
    def where(self) -> str:
        """The portal's host (and port), as a message names it."""
        return self.http.base_url.netloc.decode("ascii", "replace")

    def _failure(self, exc: Exception) -> str:
        """What a request that got no answer met, for people: httpx's class names say little
        (``ConnectError``), and what the system said is deep in its causes."""
        for kind, limit, said in _TIMEOUTS:
            if isinstance(exc, kind):
                return said.format(where=self.where, seconds=getattr(self.http.timeout, limit))
        if isinstance(exc, httpx.ConnectError):
            return f"cannot connect to the portal at {self.where}: {_system_said(exc)}"
        if isinstance(exc, httpx.RemoteProtocolError):
            return f"the portal at {self.where} closed the connection without a whole answer"
        return f"the connection to the portal at {self.where} failed: {_system_said(exc)}"

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
        page = self.json_of(response)
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            what = f"items that are {json_type(page.get('items'))}" if isinstance(page, dict) else json_type(page)
            raise UnreadableAnswer(f"the portal at {self.where} answered GET /api/v1/entries with {what}, "
                                   'not an object with items ({"items": [...], "next_cursor": ...})')
        cursor = page.get("next_cursor")
        wrong: str | None = None
        if cursor is not None and not isinstance(cursor, str):
            wrong = f"{json_type(cursor)}, not a string"
        elif cursor is not None and len(cursor) > 2048:
            wrong = "longer than 2048 characters"
        elif cursor is not None and "\x00" in cursor:
            wrong = "holding the NUL character (U+0000), which no database of the bus can store"
        if wrong is not None:
            raise UnreadableAnswer(f"the portal at {self.where} answered GET /api/v1/entries with a next_cursor {wrong}")
        return page

    async def get_entry(self, entry_id: str) -> tuple[dict[str, Any], str | None] | None:
        """The entry and its ETag; None when it no longer exists. :class:`MalformedEntry` when
        the connector cannot read what the portal answered (:func:`entry_problems`)."""
        response = await self.request("GET", f"/api/v1/entries/{entry_id}")
        if response.status_code in (404, 410):
            return None
        response.raise_for_status()
        entry = self.json_of(response)
        problems = entry_problems(entry)
        if problems:
            raise MalformedEntry(entry_id, problems)
        return entry, response.headers.get("etag")

    def json_of(self, response: httpx.Response) -> Any:
        """The answer's JSON, or :class:`UnreadableAnswer` saying what came instead.

        Bytes that are not UTF-8 are kept as lone surrogates (``surrogateescape``) rather than
        failing the whole answer: a page holding one such entry is synced all the same, and
        :func:`entry_problems` refuses that entry alone."""
        request = response.request
        asked = f"{request.method} {request.url.path}"
        try:
            return json.loads(response.content.decode("utf-8-sig", "surrogateescape"))
        except (ValueError, RecursionError) as exc:
            kind = response.headers.get("content-type", "").partition(";")[0].strip().lower()
            if not response.content:
                raise UnreadableAnswer(f"the portal at {self.where} answered {asked} with nothing, not JSON") from None
            if kind != "application/json" and not kind.endswith("+json"):
                raise UnreadableAnswer(f"the portal at {self.where} answered {kind or 'no content type'}, not JSON, "
                                       f"to {asked}") from None
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise UnreadableAnswer(f"the portal at {self.where} answered {asked} with JSON that cannot be read ({why})") from None

    async def create_entry(self, body: Mapping[str, Any]) -> str:
        """Create an entry (``POST /entries``); its id."""
        response = await self.request("POST", "/api/v1/entries", json=dict(body), idempotent=False)
        response.raise_for_status()
        created = self.json_of(response)
        if not isinstance(created, dict) or not created.get("id"):
            raise ValueError("the portal created an entry but did not say its id")
        for problem in entry_problems(created):
            if problem.loc == ("id",):  # (an entry's other fields are its answer to a GET's business)
                raise ValueError(f"the portal created an entry but its id cannot be kept: {problem.msg}")
        return str(created["id"])

    async def put_entry(
        self, entry_id: str, body: Mapping[str, Any], etag: str | None
    ) -> tuple[dict[str, Any], str | None] | Literal["conflict"] | None:
        """Write the entry if it is still at ``etag`` (``If-Match``): the entry as written and its
        new ETag; ``"conflict"`` on 412 (it changed meanwhile); None when it is gone."""
        headers = {"If-Match": etag} if etag else {}
        response = await self.request("PUT", f"/api/v1/entries/{entry_id}", json=dict(body), headers=headers)
        if response.status_code == 412:
            return "conflict"
        if response.status_code in (404, 410):
            return None
        response.raise_for_status()
        written = self.json_of(response) if response.content else None
        if isinstance(written, dict) and written.get("id"):
            return written, response.headers.get("etag")
        return await self.get_entry(entry_id)  # a portal that answers the write without the entry

    async def put_validation(self, entry_id: str, body: Mapping[str, Any]) -> bool:
        """Write a validation decision to the entry; False when the entry is gone."""
        response = await self.request("PUT", f"/api/v1/entries/{entry_id}/validation", json=dict(body))
        if response.status_code in (404, 410):
            return False
        response.raise_for_status()
        return True


def _system_said(exc: BaseException) -> str:
    """What the system said of a failed connection (``connection refused``), from the first
    cause that carries an errno; else the exception's own words."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno is not None:  # (asyncio's strerror names the address again)
            return (os.strerror(cause.errno) if cause.errno > 0 else cause.strerror or str(cause)).lower()
        cause = cause.__cause__ or cause.__context__
    return str(exc).lower() or type(exc).__name__


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


def entry_problems(entry: Any) -> list[Problem]:
    """What keeps the connector from reading an entry (none: it can), each with its place.

    Only what the connector itself relies on: an object with an id, an ``organisation`` object,
    ``tags`` a list, ``updated_at`` a time (the next sync lists from the newest), and text that
    JSON can carry (a lone surrogate such as ``"\\ud800"`` is valid JSON but no text, and bytes
    that are not UTF-8 arrive as such). Whether its title is LocalizedText and the like is the
    gate's to judge, as for any event."""
    if not isinstance(entry, dict):
        return [Problem((), f"an entry is a JSON object, not {json_type(entry)}", "entry_type")]
    problems = []
    entry_id = entry.get("id")
    if entry_id is None or entry_id == "":
        problems.append(Problem(("id",), "the entry has no id", "missing"))
    elif isinstance(entry_id, bool) or not isinstance(entry_id, (str, int)):
        problems.append(Problem(("id",), f"an id is a string, not {json_type(entry_id)}", "string_type"))
    elif len(str(entry_id)) > 256:
        problems.append(Problem(("id",), "an id of more than 256 characters", "string_too_long"))
    elif "\x00" in str(entry_id):
        problems.append(Problem(("id",), "an id holding the NUL character (U+0000), which no database of the bus can store",
                                "string_nul"))
    organisation = entry.get("organisation")
    if organisation is not None and not isinstance(organisation, dict):
        problems.append(Problem(("organisation",), f"an organisation is an object {{name, business_id}}, not "
                                                   f"{json_type(organisation)}", "dict_type"))
    elif organisation is not None and not isinstance(organisation.get("business_id"), (str, type(None))):
        problems.append(Problem(("organisation", "business_id"), "a business id is a string, not "
                                f"{json_type(organisation.get('business_id'))}", "string_type"))
    elif organisation is not None and "\x00" in (organisation.get("business_id") or ""):
        problems.append(Problem(("organisation", "business_id"), "a business id holding the NUL character (U+0000), which "
                                "no database of the bus can store or look up", "string_nul"))
    if entry.get("tags") is not None and not isinstance(entry.get("tags"), list):
        problems.append(Problem(("tags",), f"tags are a list, not {json_type(entry.get('tags'))}", "list_type"))
    updated = entry.get("updated_at")
    if updated is not None and not _is_time(updated):
        problems.append(Problem(("updated_at",), "not an RFC 3339 time", "datetime_parsing"))
    try:
        orjson.dumps(entry)
    except orjson.JSONEncodeError:
        problems.extend(_unencodable(entry, ()))
        if not problems:
            problems.append(Problem((), "the entry cannot be carried as JSON", "json_invalid"))
    return problems


def _is_time(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _unencodable(value: Any, loc: tuple[str | int, ...]) -> list[Problem]:
    """Where in ``value`` JSON cannot carry it: text with a lone surrogate (or a byte that was
    not UTF-8), an integer past 64 bits, nesting too deep."""
    if len(loc) > 64:
        return [Problem(loc, "nested too deeply", "json_invalid")]
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            if 0xDC80 <= code <= 0xDCFF:  # a byte decoding kept (surrogateescape)
                return [Problem(loc, f"not UTF-8 text (the byte 0x{code - 0xDC00:02x} at character {exc.start})", "utf8_invalid")]
            return [Problem(loc, f"not text: a lone surrogate (\\u{code:04x}) at character {exc.start}", "string_unicode")]
        return []
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [] if -(2**63) <= value < 2**64 else [Problem(loc, "an integer past 64 bits", "int_too_large")]
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            place = (*loc, printable(key))
            found += _unencodable(key, place) or _unencodable(item, place)
        return found
    if isinstance(value, list):
        return [problem for n, item in enumerate(value) for problem in _unencodable(item, (*loc, n))]
    return []


def printable(text: Any) -> str:
    """``text`` as a message can hold it: a lone surrogate written as its escape."""
    return str(text).encode("utf-8", "backslashreplace").decode("utf-8")


def project_id_of(entry_id: str) -> str:
    """The project an entry becomes: ``innokyla-{id}`` (characters a subject token cannot hold
    are replaced, with a hash suffix so two ids never collide)."""
    safe = _UNSAFE.sub("_", entry_id)
    if safe != entry_id or len(safe) > 100:
        safe = f"{safe[:80]}-{hashlib.sha256(entry_id.encode()).hexdigest()[:16]}"
    return f"{SYSTEM}-{safe}"


def project_facts(
    entry: Mapping[str, Any], owner: str, *, project_id: str | None = None, country: str = "FI"
) -> dict[str, Any]:
    """The ``project.registered`` data an entry stands for (see the module docstring); a
    published project keeps its own id and country."""
    facts: dict[str, Any] = {
        "project_id": project_id or project_id_of(str(entry["id"])),
        "title": entry.get("title"),
        "owner": owner,
        "status": STATUS.get(str(entry.get("status")), "active"),
        "external_refs": [{"system": SYSTEM, "id": str(entry["id"]), **({"url": entry["url"]} if entry.get("url") else {})}],
    }
    if entry.get("summary"):
        facts["summary"] = entry["summary"]
    location = {"country": country}
    for name in ("region", "municipality"):
        if entry.get(name):
            location[name] = entry[name]
    facts["location"] = location
    return facts


def portal_key(url: str) -> str:
    """How the connector's tables name a portal: its base URL as the HTTP client holds it."""
    base = httpx.URL(url.rstrip("/"))
    return str(base if base.raw_path.endswith(b"/") else base.copy_with(raw_path=base.raw_path + b"/"))


def publication_tag(project_id: str) -> str:
    """The tag an entry the connector created carries, naming the project it stands for."""
    return f"{PUBLICATION_TAG_PREFIX}{project_id}"


def published_project_of(entry: Mapping[str, Any]) -> str | None:
    """The project an entry says it was published from (its :func:`publication_tag`)."""
    for tag in entry.get("tags") or []:
        if isinstance(tag, str) and tag.startswith(PUBLICATION_TAG_PREFIX):
            return tag.removeprefix(PUBLICATION_TAG_PREFIX)
    return None


def organisation_of(institution: Institution) -> dict[str, str] | None:
    """The portal's ``organisation`` for a member: its name and business id (None without one)."""
    for identifier in institution.identifiers:
        if identifier.get("scheme") == BUSINESS_ID_SCHEME and identifier.get("value"):
            return {"name": _name_of(institution), "business_id": str(identifier["value"])}
    return None


def _name_of(institution: Institution) -> str:
    """A member's name as the (Finnish) portal shows it: in Finnish, else English, else the first."""
    names = institution.name or {}
    return names.get("fi") or names.get("en") or next(iter(names.values()), institution.id)


def funder_of(session: Session, project_id: str) -> str | None:
    """The portal's ``funder`` of a project: the names of the partners the project names as its
    funders (role ``funder``; public, as the project's events are), in id order — None without
    any. Awards are not carried: what a call awarded is its parties' business."""
    funders = session.exec(select(ProjectPartner.institution).where(
        ProjectPartner.project_id == project_id, ProjectPartner.role == "funder").order_by(col(ProjectPartner.institution))).all()
    names = []
    for funder in funders:
        member = session.get(Institution, funder)
        names.append(_name_of(member) if member is not None else funder)
    return ", ".join(names) or None


def entry_fields(project: Project, organisation: Mapping[str, str], funder: str | None = None) -> dict[str, Any]:
    """The entry fields a published project determines (:data:`PUSHED_FIELDS`)."""
    return {
        "title": dict(project.title),
        "summary": dict(project.summary) if project.summary else None,
        "organisation": dict(organisation),
        "region": project.region,
        "municipality": project.municipality,
        "status": PORTAL_STATUS.get(project.status, "published"),
        "funder": funder,
    }


def _pushed_value(entry: Mapping[str, Any], name: str) -> Any:
    """An entry's field as :func:`entry_fields` would write it (an empty text is no text)."""
    value = entry.get(name)
    return value if value not in ({}, "") else None


def _facts(entry: Mapping[str, Any], owner: str, known: store.PortalEntry | None) -> dict[str, Any]:
    """The facts of an entry, for the project it already stands for when it was synced before."""
    if known is None:
        return project_facts(entry, owner)
    country = (known.data.get("location") or {}).get("country") or "FI"
    return project_facts(entry, owner, project_id=known.project_id, country=country)


def content_hash(facts: Mapping[str, Any]) -> str:
    return hashlib.sha256(orjson.dumps(facts, option=orjson.OPT_SORT_KEYS)).hexdigest()


def changes_between(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """``project.updated`` changes: every field whose value differs; a field gone is cleared (null)."""
    names = (set(before) | set(after)) - {"project_id", "owner"}
    return {name: after.get(name) for name in sorted(names) if before.get(name) != after.get(name)}


def event_id(entry_id: str, revision: int, digest: str) -> str:
    return f"{SYSTEM}.{_UNSAFE.sub('_', entry_id)[:80]}.{revision}.{digest[:16]}"


# --- the sync -----------------------------------------------------------------------------------


def _portal_problem(exc: Exception) -> str:
    """Why a sync stopped, for people: what the portal said, not httpx's advice links."""
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        if status in (401, 403):
            return f"the portal refused the token ({status} from {exc.request.url.host}): check COLLABBUS_PORTAL_TOKEN"
        return f"the portal answered {status} {exc.response.reason_phrase} to {exc.request.method} {exc.request.url.path}"
    return str(exc) or type(exc).__name__


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
    """{entry, event_id, reason, errors: [{loc, msg, type}]}: entries refused, by the gate or as
    malformed (those also say their ``page`` and ``item``, from 1: one may have no id). The pass
    goes on past them; one is read again when it changes on the portal."""
    owner_changed: list[str] = field(default_factory=list)
    published: int = 0
    """Projects marked for publication that became entries on the portal."""
    pushed: int = 0
    """Changes of published projects written to their entries."""
    conflicts: int = 0
    """Writes the portal refused with 412 (the entry changed meanwhile), resolved by re-reading."""
    waiting: list[str] = field(default_factory=list)
    """Published projects not pushed yet: the read model has not applied the connector's last event."""
    publish_errors: list[dict[str, str]] = field(default_factory=list)
    """{project, error}: publications that could not be pushed (retried by the next sync)."""
    retries: int = 0
    complete: bool = False
    error: str | None = None
    seconds: float = 0.0
    traced: int = 0
    """Changed entries that got a trace of their own (at most the connector's ``traced_entries``)."""
    untraced: int = 0
    """Changed entries beyond that: their events carry an unsampled ``traceparent``."""

    @property
    def emitted(self) -> int:
        return self.registered + self.updated

    def reject(self, entry: Any, reason: str, problems: Iterable[Problem], *, event_id: str | None = None,
               page: int | None = None, item: int | None = None) -> None:
        """Report an entry refused (its id as given, None without one)."""
        rejected: dict[str, Any] = {"entry": None if entry is None or entry == "" else printable(entry),
                                    "event_id": event_id, "reason": reason,
                                    "errors": [{**p.as_dict(), "loc": [printable(part) if isinstance(part, str) else part
                                                                      for part in p.loc]} for p in problems]}
        if page is not None:
            rejected.update(page=page, item=item)
        self.rejected.append(rejected)

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
            "published": self.published, "pushed": self.pushed, "conflicts": self.conflicts,
            "waiting": self.waiting, "publish_errors": self.publish_errors,
            "seconds": round(self.seconds, 3), "entries_per_second": round(self.rate, 1),
            "events_per_second": round(self.emitted / self.seconds, 1) if self.seconds > 0 else 0.0,
        }


class _Page:
    """How the entries of one page take turns: at most ``concurrency`` of them are read from the
    portal at a time, and none offers its event before every entry of the page has been read (or
    has ended without an event: unchanged, unmapped, gone, failed).

    The page's events so reach the gate together (as many as the page holds): the log takes them
    in a few writes and the read models apply them in a few transactions. Offered one by one as
    their entries were read, they cost a NATS write and a read-model transaction each: a first
    sync of 10,000 entries (two cores, the sandbox and the bus in the connector's process) ran at
    about 220 entries/s so, the process spending 4.4 ms of CPU time on each, and at about 290 (3.3
    ms) this way. An event is made from its entry as read all the same, and the page is stored
    only once every offer has been answered; an entry's trace shows the wait."""

    def __init__(self, entries: int, concurrency: int) -> None:
        self.reading = asyncio.Semaphore(concurrency)
        """Held while an entry is read (``GET /entries/{id}``)."""
        self.unread = entries
        self.all_read = asyncio.Event()
        if entries == 0:
            self.all_read.set()

    def turn(self) -> _Turn:
        """The turn of one of the page's entries (each takes exactly one)."""
        return _Turn(self)


class _Turn:
    """One entry's turn in its :class:`_Page`."""

    def __init__(self, page: _Page) -> None:
        self.page = page
        self.reading = True

    def read(self) -> None:
        """The entry is read, or needs no reading any more: the page's offers no longer wait for it
        (said once; saying it again changes nothing)."""
        if self.reading:
            self.reading = False
            self.page.unread -= 1
            if self.page.unread <= 0:
                self.page.all_read.set()

    async def offer(self) -> None:
        """Wait until every entry of the page has been read, to offer the entry's event."""
        self.read()
        await self.page.all_read.wait()


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
        tracing: Any = None,
        traced_entries: int = 100,
    ) -> None:
        self.gate = gate
        self.engine = engine
        self.client = client
        # Each pass is a span, with its list calls in its trace; each entry that changed is a
        # trace of its own linked to it (its GET, the event offered from it: the gate's producer
        # span, and that event's way through the bus), up to ``traced_entries`` per pass: the
        # entries beyond are not traced at all, so that a first sync of thousands of entries does
        # not push everything else out of the span store. Default: the bus's tracing.
        self.tracing = tracing if tracing is not None else traces.active()
        self.traced_entries = traced_entries
        if self.tracing is not None:
            self.tracing.instrument_httpx(client.http)
        self.portal = portal or portal_key(str(client.http.base_url))
        self._publications: dict[str, store.PortalPublication] = {}
        """project id → this portal's publications, as loaded when a sync starts."""
        self.page_size = page_size
        self.concurrency = concurrency

    def _members(self) -> dict[str, str]:
        """business id → member, of the members that name one."""
        found: dict[str, str] = {}
        with session_scope(self.engine, read_only=True) as session:
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
        if self.tracing is None or not self.tracing.enabled:
            return await self._sync(full=full, progress=progress)
        with self.tracing.tracer.start_as_current_span(
            "portal sync", attributes={traces.PORTAL: self.portal, "collabbus.portal.full": full},
        ) as span:
            report = await self._sync(full=full, progress=progress)
            span.set_attributes({"collabbus.portal.listed": report.listed, "collabbus.portal.registered": report.registered,
                                 "collabbus.portal.updated": report.updated, "collabbus.portal.entry_traces": report.traced,
                                 "collabbus.portal.entries_untraced": report.untraced})
            if report.error:
                span.set_status(trace.Status(trace.StatusCode.ERROR, report.error))
            return report

    async def _sync(self, *, full: bool, progress: Callable[[SyncReport], None] | None) -> SyncReport:
        report = SyncReport(self.portal)
        started = time.monotonic()
        retries_before = self.client.retries
        members = await asyncio.to_thread(self._members)
        with session_scope(self.engine, read_only=True) as session:
            position = store.load_cursor(session, self.portal)
            self._publications = {row.project_id: row for row in store.publications(session, self.portal)}
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
                report.pages += 1
                report.listed += len(page["items"])
                items = []
                for place, item in enumerate(page["items"], 1):
                    problems = entry_problems(item)
                    if problems:  # the entry's problem, not the page's: the rest is synced
                        report.reject(item.get("id") if isinstance(item, dict) else None, "malformed_entry", problems,
                                      page=report.pages, item=place)
                    else:
                        items.append(item)
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
        except (PortalUnavailable, LogUnavailable, httpx.HTTPError, ValueError) as exc:
            report.error = _portal_problem(exc)  # logged with the pass (_log_pass), by whoever runs it
        if report.complete:
            # After a complete pull only: it has adopted entries whose creation was cut short and
            # has carried the portal's own changes, which a push must not undo.
            await self.push_publications(report)
        report.seconds = time.monotonic() - started
        report.retries = self.client.retries - retries_before
        return report

    def _save(self, rows: list[Any], position: store.PortalCursor) -> None:
        """Store a page's rows with its cursor. The page's stored entries are read in one query, so
        merging a changed one finds it in the session; a new one is added (``merge`` would look
        each up by a query of its own: a first sync is all new entries)."""
        with session_scope(self.engine) as session:
            entries = {row.entry_id: row for row in rows if isinstance(row, store.PortalEntry)}  # an entry listed twice: its last
            stored = store.known_entries(session, self.portal, entries)
            for row in rows:
                if not isinstance(row, store.PortalEntry):
                    session.merge(row)
                elif entries[row.entry_id] is not row:
                    pass  # listed again later in the page: its last row is stored
                elif row.entry_id in stored:
                    session.merge(row)
                else:
                    session.add(row)
            store.save_cursor(session, position)

    async def _apply_page(
        self, items: list[dict[str, Any]], members: dict[str, str], report: SyncReport
    ) -> list[Any]:
        with session_scope(self.engine, read_only=True) as session:
            known = store.known_entries(session, self.portal, [str(item["id"]) for item in items])
        page = _Page(len(items), self.concurrency)

        async def one(item: dict[str, Any]) -> list[Any] | None:
            turn = page.turn()
            try:
                return await self._apply(item, known.get(str(item["id"])), members, report, turn)
            finally:
                turn.read()  # (one that ended before its offer, unchanged or failed, holds up no other)

        # Every entry of the page finishes before a failure ends the sync, so nothing goes on
        # emitting behind its back; the next sync reads the page again and the log recognises
        # the events already emitted by their ids.
        results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
        failures = [result for result in results if isinstance(result, BaseException)]
        if failures:
            raise failures[0]
        return [row for rows in results if isinstance(rows, list) for row in rows]

    def _owner(self, entry: Mapping[str, Any], members: dict[str, str], report: SyncReport) -> str | None:
        organisation = entry.get("organisation") or {}
        business_id = str(organisation.get("business_id") or "")
        owner = members.get(business_id) if business_id else None
        if owner is None:
            seen = report.unmapped.setdefault(business_id or "(none)", {"name": organisation.get("name"), "entries": 0})
            seen["entries"] += 1
        return owner

    async def _apply(
        self, listed: dict[str, Any], known: store.PortalEntry | None, members: dict[str, str], report: SyncReport,
        turn: _Turn,
    ) -> list[Any] | None:
        """What one listed entry becomes: the rows to store with the page (None: nothing)."""
        entry_id = str(listed["id"])
        owner = self._owner(listed, members, report)
        if owner is None:
            return None
        if known is not None and content_hash(_facts(listed, owner, known)) == known.content_hash:
            report.unchanged += 1
            return None
        with self._entry_trace(entry_id, report):
            return await self._apply_changed(entry_id, listed, known, owner, members, report, turn)

    def _entry_trace(self, entry_id: str, report: SyncReport) -> Any:
        """A trace of its own for an entry that changed (its ``GET``, the event it makes and that
        event's way through the bus), linked to the pass's span: a first sync of thousands of
        entries is then thousands of small traces, each whole, not one that no viewer opens.

        Past the pass's ``traced_entries``, an entry runs under a context that is not sampled (a
        trace id of its own, flags ``00``): nothing of it is recorded, neither here nor by the bus
        (parent-based sampling), and its event carries that ``traceparent``."""
        if self.tracing is None or not self.tracing.enabled:
            return contextlib.nullcontext()
        if report.traced >= self.traced_entries:
            report.untraced += 1
            return self.tracing.unsampled()
        report.traced += 1
        passing = trace.get_current_span().get_span_context()
        return self.tracing.tracer.start_as_current_span(
            "portal entry", context=otel_context.Context(),
            links=[trace.Link(passing)] if passing.is_valid else None,
            attributes={traces.PORTAL: self.portal, "collabbus.portal.entry": entry_id},
        )

    async def _apply_changed(
        self, entry_id: str, listed: dict[str, Any], known: store.PortalEntry | None, owner: str,
        members: dict[str, str], report: SyncReport, turn: _Turn,
    ) -> list[Any] | None:
        # Changed or new as listed: read the entry itself, which may have moved on (or gone) since.
        try:
            async with turn.page.reading:
                fetched = await self.client.get_entry(entry_id)
        except MalformedEntry as exc:
            report.reject(entry_id, "malformed_entry", exc.problems)
            return None
        finally:
            turn.read()
        if fetched is None:
            report.deleted.append(entry_id)
            return None
        entry, etag = fetched
        if (entry.get("organisation") or {}).get("business_id") != (listed.get("organisation") or {}).get("business_id"):
            found = self._owner(entry, members, report)
            if found is None:
                return None
            owner = found
        if known is None and (marked := published_project_of(entry)) is not None and marked in self._publications:
            return await self._adopt(entry, etag, owner, self._publications[marked], report)
        facts = _facts(entry, owner, known)
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
        await turn.offer()
        verdict = await self.gate.admit(owner, orjson.dumps(event), cloudevents.structured_headers())
        if verdict.reason == "unavailable":  # not the entry's fault: it must not be passed by (its page is read again)
            why = "; ".join(problem.msg for problem in verdict.errors) or "unavailable"
            raise LogUnavailable(f"the event log did not take entry {entry_id}'s event {event['id']} ({why})")
        if not verdict.accepted:
            report.reject(entry_id, verdict.reason or "rejected", verdict.errors, event_id=str(event["id"]))
            return None
        if verdict.duplicate:
            report.duplicates += 1
        if known is None:
            report.registered += 1
        else:
            report.updated += 1
        rows: list[Any] = [store.PortalEntry(
            portal=self.portal, entry_id=entry_id, project_id=facts["project_id"], owner=owner, content_hash=digest,
            revision=revision, data=facts, etag=etag, synced_at=datetime.now(UTC),
        )]
        publication = self._publications.get(facts["project_id"])
        if known is not None and publication is not None and publication.entry_id == entry_id:
            # The portal changed a published project: what it says now is the base the next push
            # compares the project with, and no push may run before the read model has the change.
            pushed = dict(publication.pushed or {})
            for fact in data["changes"]:
                for name in FACT_SOURCES.get(fact, ()):
                    pushed[name] = _pushed_value(entry, name)
            publication.pushed = pushed
            publication.waiting_for = str(event["id"])
            rows.append(publication)
        return rows

    async def _adopt(
        self, entry: dict[str, Any], etag: str | None, owner: str, publication: store.PortalPublication, report: SyncReport
    ) -> list[Any] | None:
        """An entry the connector created for a published project, found by its tag: when the
        creation was cut short before its id was stored, the publication takes it now; any other
        entry with the tag (a copy) is reported, never registered as a new project."""
        entry_id = str(entry["id"])
        if publication.entry_id is not None and publication.entry_id != entry_id:
            report.reject(entry_id, "copy_of_published_entry", [Problem(("tags",), (
                f"carries the tag of project {publication.project_id}, published as entry {publication.entry_id}"),
                "copy_of_published_entry")])
            return None
        country = await asyncio.to_thread(self._country, publication.project_id)
        facts = project_facts(entry, owner, project_id=publication.project_id, country=country)
        publication.entry_id, publication.etag, publication.attempted_at = entry_id, etag, None
        publication.pushed = {name: _pushed_value(entry, name) for name in PUSHED_FIELDS}
        publication.pushed_at = datetime.now(UTC)
        report.published += 1
        return [publication, store.PortalEntry(
            portal=self.portal, entry_id=entry_id, project_id=publication.project_id, owner=owner,
            content_hash=content_hash(facts), revision=1, data=facts, etag=etag, synced_at=datetime.now(UTC),
        )]

    def _country(self, project_id: str) -> str:
        with session_scope(self.engine, read_only=True) as session:
            project = session.get(Project, project_id)
            return project.country if project is not None and project.country else "FI"

    # --- publication: projects of the network pushed to the portal ----------------------------

    async def push_publications(self, report: SyncReport) -> None:
        """Create the entries of newly marked projects and write the changes of published ones."""
        with session_scope(self.engine, read_only=True) as session:
            marks = store.publications(session, self.portal)
        for mark in marks:
            try:
                problem = await self._push(mark, report)
            except (PortalUnavailable, LogUnavailable, httpx.HTTPError, ValueError) as exc:
                problem = str(exc) or type(exc).__name__
            if problem is not None:  # logged with the pass (_log_pass)
                report.publish_errors.append({"project": mark.project_id, "error": problem})
            if problem != mark.error:
                await asyncio.to_thread(self._note, mark.project_id, error=problem)

    def _note(self, project_id: str, **values: Any) -> store.PortalPublication | None:
        """Store ``values`` on the project's publication; the row as stored."""
        with session_scope(self.engine) as session:
            row = session.get(store.PortalPublication, (self.portal, project_id))
            if row is None:
                return None
            row.sqlmodel_update(values)
            session.add(row)
            return row

    async def _push(self, mark: store.PortalPublication, report: SyncReport) -> str | None:
        """One publication's turn; what went wrong, or None."""
        with session_scope(self.engine, read_only=True) as session:
            # Whether the event is applied and the project, from one moment (a reading
            # transaction): a project read from before the very commit that shows the event
            # applied would undo it when pushed. (Read first all the same.)
            waiting = mark.waiting_for is not None and session.get(AppliedEvent, mark.waiting_for) is None
            project = session.get(Project, mark.project_id)
            owner = session.get(Institution, project.owner) if project is not None else None
            funder = funder_of(session, mark.project_id) if project is not None else None
        if project is None or owner is None:
            return "the project is not in the read model"
        if waiting:
            report.waiting.append(mark.project_id)
            return None
        organisation = organisation_of(owner)
        if organisation is None:
            return f"the owner {owner.id} has no {BUSINESS_ID_SCHEME} identifier"
        desired = entry_fields(project, organisation, funder)
        if mark.entry_id is None:
            created = await self._create(mark, project, desired, report)
            if created is None:
                return None
            mark = created
        if not mark.announced:
            problem = await self._announce(mark, project)
            if problem is not None:
                return problem
        return await self._update(mark, project, desired, report)

    def _claim(self, project_id: str) -> bool:
        """Claim the creation of the project's entry, unless another pass is at it (or was, and
        stopped within :data:`CREATION_CLAIM`: the next complete pull adopts what it created)."""
        now = datetime.now(UTC)
        with session_scope(self.engine) as session:
            row = session.get(store.PortalPublication, (self.portal, project_id), with_for_update=True)
            if row is None or row.entry_id is not None:
                return False
            if row.attempted_at is not None and row.attempted_at > now - CREATION_CLAIM:
                return False
            row.attempted_at = now
            session.add(row)
            return True

    async def _create(
        self, mark: store.PortalPublication, project: Project, desired: dict[str, Any], report: SyncReport
    ) -> store.PortalPublication | None:
        """POST the entry, then store its id (and what it stands for, so the pull knows it)."""
        if not await asyncio.to_thread(self._claim, mark.project_id):
            report.waiting.append(mark.project_id)
            return None
        body = {"type": mark.entry_type, **desired, "parent_id": None,
                "tags": [publication_tag(mark.project_id)]}
        entry_id = await self.client.create_entry(body)
        fetched = await self.client.get_entry(entry_id)
        if fetched is None:
            raise ValueError(f"the entry {entry_id} the portal just created is gone")
        entry, etag = fetched
        facts = project_facts(entry, project.owner, project_id=project.project_id, country=project.country or "FI")
        now = datetime.now(UTC)

        def record() -> store.PortalPublication:
            with session_scope(self.engine) as session:
                row = session.get(store.PortalPublication, (self.portal, mark.project_id))
                assert row is not None  # publications are never deleted
                row.sqlmodel_update({"entry_id": entry_id, "etag": etag, "pushed": desired, "pushed_at": now,
                                     "attempted_at": None, "error": None})
                session.add(row)
                session.merge(store.PortalEntry(
                    portal=self.portal, entry_id=entry_id, project_id=project.project_id, owner=project.owner,
                    content_hash=content_hash(facts), revision=1, data=facts, etag=etag, synced_at=now,
                ))
                return row

        report.published += 1
        created = await asyncio.to_thread(record)
        # A validation decided before the project was published: the portal learns it with the
        # entry (later decisions come through push_decisions).
        decided = await asyncio.to_thread(self._latest_decision, project.project_id)
        if decided is not None:
            await self.client.put_validation(entry_id, decided)
        return created

    async def _announce(self, mark: store.PortalPublication, project: Project) -> str | None:
        """Offer ``project.updated`` with the entry's ``innokyla`` reference, in the owner's name."""
        assert mark.entry_id is not None
        with session_scope(self.engine, read_only=True) as session:
            known = session.get(store.PortalEntry, (self.portal, mark.entry_id))
        ref = next((r for r in (known.data.get("external_refs") or []) if r.get("system") == SYSTEM), None) if known else None
        ref = ref or {"system": SYSTEM, "id": mark.entry_id}
        refs = [{k: v for k, v in r.items() if v is not None} for r in project.external_refs
                if not (r.get("system") == SYSTEM and r.get("id") == mark.entry_id)]
        event = {
            "specversion": "1.0",
            "id": f"{SYSTEM}.published.{_UNSAFE.sub('_', mark.entry_id)[:80]}",
            "source": f"/institutions/{project.owner}",
            "type": "project.updated",
            "subject": project.project_id,
            "data": {"project_id": project.project_id, "changes": {"external_refs": [*refs, ref]}},
        }
        verdict = await self.gate.admit(project.owner, orjson.dumps(event), cloudevents.structured_headers())
        if not verdict.accepted:
            return f"the reference to the entry was refused: {verdict.reason} {[p.as_dict() for p in verdict.errors]}"
        await asyncio.to_thread(self._note, mark.project_id, announced=True, waiting_for=event["id"])
        mark.announced, mark.waiting_for = True, str(event["id"])
        return None

    async def _update(
        self, mark: store.PortalPublication, project: Project, desired: dict[str, Any], report: SyncReport
    ) -> str | None:
        """Write what the bus changed since the last push (and only that) to the entry.

        Three-way: ``mark.pushed`` is the last pushed version, ``desired`` the project now, and
        the portal's entry is read right before the write; the fields that differ between the
        first two are laid over the third and written with ``If-Match``. On 412 someone changed
        the entry between the read and the write: read it again and lay the same fields over it."""
        assert mark.entry_id is not None
        base = mark.pushed or {}
        ours = {name: desired.get(name) for name in PUSHED_FIELDS if desired.get(name) != base.get(name)}
        if not ours:
            return None
        written: tuple[dict[str, Any], str | None] | None = None
        for _ in range(MAX_CONFLICTS + 1):
            fetched = await self.client.get_entry(mark.entry_id)
            if fetched is None:
                return f"the entry {mark.entry_id} was deleted on the portal"
            current, etag = fetched
            body = {**{name: current.get(name) for name in WRITABLE_FIELDS if name in current}, **ours}
            result = await self.client.put_entry(mark.entry_id, body, etag)
            if result is None:
                return f"the entry {mark.entry_id} was deleted on the portal"
            if result != "conflict":
                written = result
                break
            report.conflicts += 1
            log.info("portal entry %s changed while being written; merging again", mark.entry_id)
        if written is None:
            return f"the entry {mark.entry_id} kept changing while being written ({MAX_CONFLICTS + 1} attempts)"
        entry, etag = written
        now = datetime.now(UTC)

        def record() -> None:
            # The pull must not bring back what the connector wrote, but must still bring what the
            # portal changed: only the facts made of the fields written are taken from the entry.
            with session_scope(self.engine) as session:
                row = session.get(store.PortalPublication, (self.portal, mark.project_id))
                known = session.get(store.PortalEntry, (self.portal, mark.entry_id))
                assert row is not None
                row.sqlmodel_update({"pushed": {**base, **ours}, "etag": etag, "pushed_at": now, "error": None})
                session.add(row)
                if known is not None:
                    country = (known.data.get("location") or {}).get("country") or "FI"
                    written_facts = project_facts(entry, known.owner, project_id=known.project_id, country=country)
                    data = dict(known.data)
                    for fact, sources in FACT_SOURCES.items():
                        if set(sources) & set(ours):
                            if fact in written_facts:
                                data[fact] = written_facts[fact]
                            else:
                                data.pop(fact, None)
                    known.data, known.content_hash, known.etag, known.synced_at = data, content_hash(data), etag, now
                    session.add(known)

        await asyncio.to_thread(record)
        report.pushed += 1
        return None

    def _latest_decision(self, project_id: str) -> dict[str, Any] | None:
        """The body of the project's most recent validation decision, if it has one."""
        from handlers.validations import Validation

        with session_scope(self.engine, read_only=True) as session:
            validation = session.exec(
                select(Validation).where(Validation.project_id == project_id, Validation.status == "decided")
                .order_by(col(Validation.decided_at).desc())
            ).first()
            if validation is None:
                return None
            return _validation_body({
                "validation_id": validation.validation_id, "outcome": validation.outcome,
                "evidence_level": validation.evidence_level,
                "decided_at": validation.decided_at.isoformat() if validation.decided_at else None,
            }, None)

    async def push_validation(self, decided: Mapping[str, Any], project_id: str, *, url: str | None = None) -> bool | None:
        """Write a ``validation.decided`` (its data) about ``project_id`` to the portal entry the
        project came from. None: the project has no portal entry; False: the entry is gone."""
        with session_scope(self.engine, read_only=True) as session:
            row = store.entry_of_project(session, project_id)
        if row is None:
            return None
        return await self.client.put_validation(row.entry_id, _validation_body(decided, url))

    async def push_decision(self, event: Mapping[str, Any]) -> bool | None:
        """Push a logged ``validation.decided`` event when its validation is about a portal entry
        (a project that came from the portal, or an ``innokyla`` external reference) and the
        workflow took it: a decision in the log may be one it refused (from another than the
        coordinator, on a decided validation, with medians no review gives), which the portal
        must not show. :class:`NotAppliedYet` while the read models have not judged it."""
        from handlers.bookkeeping import AppliedEvent
        from handlers.network import derived_type
        from handlers.validations import Validation

        data = event["data"]
        with session_scope(self.engine, read_only=True) as session:
            if session.get(AppliedEvent, event["id"]) is None:
                raise NotAppliedYet(event["id"])
            answers = session.exec(select(AppliedEvent.event_id).where(AppliedEvent.caused_by == event["id"])).all()
            if any(derived_type(answer) == "validation.action_rejected" for answer in answers):
                log.info("the validation decision %s was refused by the workflow: not pushed to the portal", event["id"])
                return None
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


class NotAppliedYet(Exception):
    """A logged event the read models have not applied (nor refused) yet."""


async def push_decisions(js: Any, sync: PortalSync, stop: asyncio.Event, *, durable: str = PUSH_CONSUMER) -> None:
    """Follow ``validation.decided`` in the log (a durable consumer, so nothing is missed while
    the bus is down) and push those about portal entries that the workflow took. Pushing twice
    writes the same thing. One the read models have not judged yet is asked for again, a second
    later, then two, four … up to a minute (one dead-lettered waits so until it is replayed)."""
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
                except NotAppliedYet:  # (the read models judge it in a moment; one dead-lettered, once replayed)
                    await msg.nak(delay=min(2.0 ** (msg.metadata.num_delivered - 1), 60.0))
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


# --- marking projects for publication ----------------------------------------------------------


def mark_for_publication(engine: Engine, portal: str, project_id: str, entry_type: str = "whole") -> store.PortalPublication:
    """Mark a project of the network for publication on ``portal`` (a :func:`portal_key`); the
    connector creates its entry on its next sync. Marking again changes nothing.

    Refused (:class:`PublicationRefused`) when the project is unknown, came from the portal, or
    its owner has no business id (the portal names organisations by it, and the pull maps the
    entry back to the owner by it)."""
    if entry_type not in ENTRY_TYPES:
        raise PublicationRefused(f"the entry type must be one of {', '.join(ENTRY_TYPES)}, not {entry_type!r}")
    with session_scope(engine) as session:
        existing = session.get(store.PortalPublication, (portal, project_id))
        if existing is not None:
            return existing
        source = store.entry_of_project(session, project_id)
        project = session.get(Project, project_id)
        if project is None and source is None:
            raise PublicationRefused(f"no project {project_id!r} in the network")
        refs = [r for r in project.external_refs if r.get("system") == SYSTEM] if project is not None else []
        if source is not None or refs:
            entry = source.entry_id if source is not None else refs[0].get("id")
            raise PublicationRefused(f"project {project_id!r} is on the portal already (entry {entry})")
        assert project is not None
        owner = session.get(Institution, project.owner)
        if owner is None or organisation_of(owner) is None:
            raise PublicationRefused(
                f"the owner {project.owner!r} has no {BUSINESS_ID_SCHEME} identifier: the portal names "
                f"organisations by business id (add it: `collabbus institutions update {project.owner} "
                f"--identifier {BUSINESS_ID_SCHEME}=…`)"
            )
        row = store.PortalPublication(portal=portal, project_id=project_id, entry_type=entry_type, marked_at=datetime.now(UTC))
        session.add(row)
        return row


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


def _log_pass(report: SyncReport) -> None:
    """One line per pass with its counts (JSON fields in the log), and a warning per thing an
    operator has to act on: entries refused, organisations that map to no member, owner changes,
    publications that failed."""
    summary = report.as_dict()
    counts = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    log.log(logging.INFO if report.complete else logging.WARNING,
            "portal sync %s: %d listed, %d registered, %d updated, %d unchanged, %d rejected, %d retries, %.1f s",
            "complete" if report.complete else f"stopped ({report.error}; the next sync resumes from the last page stored)",
            report.listed, report.registered, report.updated, report.unchanged, len(report.rejected), report.retries,
            report.seconds, extra={"portal_sync": counts})
    for rejected in summary["rejected"]:
        log.warning("portal %s", describe_rejection(rejected), extra={"portal_sync": {"rejected": rejected}})
    for organisation, unmapped in summary["unmapped"].items():
        log.warning("portal organisation %s (business id %s) maps to no member (%s entries read in this pass): add the "
                    "business id to a member's identifiers (collabbus institutions update ID --identifier "
                    "fi-business-id=…); the next sync then reads the whole portal again by itself", unmapped.get("name"),
                    organisation, unmapped.get("entries"),
                    extra={"portal_sync": {"unmapped": organisation}})
    for changed in summary["owner_changed"]:
        log.warning("portal entry's organisation changed to another member (not applied): %s", changed)
    for problem in summary["publish_errors"]:
        log.warning("publishing project %s on the portal failed: %s (the next sync tries again)", problem["project"],
                    problem["error"])


def describe_rejection(rejected: Mapping[str, Any]) -> str:
    """A refused entry of :attr:`SyncReport.rejected` in a line: which, why, and each problem as
    ``loc: msg [type]`` (as ``collabbus publish`` shows a rejection)."""
    return f"{rejected_entry(rejected)} rejected ({rejected['reason']}): " + "; ".join(
        problem_line(problem) for problem in rejected["errors"])


def rejected_entry(rejected: Mapping[str, Any]) -> str:
    """``entry e-1``, or where an entry without an id was: ``item 3 of page 1 (no id)``."""
    if rejected.get("entry") is not None:
        return f"entry {rejected['entry']}"
    return f"item {rejected.get('item')} of page {rejected.get('page')} (no id)"


def problem_line(problem: Mapping[str, Any]) -> str:
    """A problem ``{loc, msg, type}`` as ``data.title: Field required [missing]``."""
    loc = ".".join(str(part) for part in problem.get("loc") or ()) or "-"
    return f"{loc}: {problem.get('msg')} [{problem.get('type')}]"


@dataclass
class Passes:
    """How a running bus's portal sync passes have gone, for ``/metrics`` (``ops.metrics``) and
    ``collabbus status`` (:meth:`state`): an operator learns that the sync stops, or rejects
    entries, without reading the log."""

    portal: str = ""
    """The portal synced (its host and port)."""
    complete: int = 0
    stopped: int = 0
    """Passes that ended before their end: the portal or the log failed them (the next resumes)."""
    rejected: int = 0
    """Entries the passes rejected (malformed, or refused by the gate)."""
    last_stopped: bool = False
    last_complete_at: float | None = None
    """When the last complete pass ended (seconds since the epoch)."""
    last_pass_at: float | None = None
    last_error: str | None = None
    """Why the last pass stopped (None: it was complete)."""
    last_rejected: int = 0
    """Entries the last pass rejected."""

    def note(self, report: SyncReport | None) -> None:
        """A pass's report; None: the pass failed on something unforeseen (logged)."""
        self.last_pass_at = time.time()
        if report is not None and report.complete:
            self.complete += 1
            self.last_complete_at = self.last_pass_at
        else:
            self.stopped += 1
        self.last_rejected = len(report.rejected) if report is not None else 0
        self.rejected += self.last_rejected
        self.last_stopped = report is None or not report.complete
        self.last_error = None if not self.last_stopped else (
            report.error if report is not None and report.error else "the pass failed on something unforeseen (the bus's log says what)")

    def state(self) -> dict[str, Any]:
        """The passes as ``collabbus status`` shows them (times in UTC, RFC 3339)."""
        def moment(at: float | None) -> str | None:
            return None if at is None else datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

        return {"portal": self.portal, "passes": self.complete + self.stopped, "complete": self.complete, "stopped": self.stopped,
                "rejected": self.rejected, "last_pass_at": moment(self.last_pass_at), "last_complete_at": moment(self.last_complete_at),
                "last_stopped": self.last_stopped, "last_error": self.last_error, "last_rejected": self.last_rejected}


async def sync_periodically(
    sync: PortalSync, interval: float, stop: asyncio.Event, *, on_report: Callable[[SyncReport | None], None] | None = None
) -> None:
    """Sync now and then every ``interval`` seconds until ``stop`` is set (``collabbus up``);
    ``on_report`` is given each pass's report (None for a pass that failed on something unforeseen)."""
    while not stop.is_set():
        report: SyncReport | None = None
        try:
            report = await sync.sync()
        except Exception:  # a bug in one pass must not end the connector; the cursor is safe
            log.exception("portal sync failed")
        else:
            _log_pass(report)
        if on_report is not None:
            on_report(report)
        try:
            await asyncio.wait_for(stop.wait(), timeout=interval)
        except TimeoutError:
            pass
