"""``collabbus demo``: the demo network, offered through the public interfaces and read back.

The network and its stories are data (:mod:`ops.demo_data`). :func:`run` offers them as partners
would — NATS ingress for most events, ``POST /events`` for the Finnish validation — waits for the
deadlines the stories need, then reads what happened from the HTTP read API (never from its own
memory) into a summary that :func:`render` prints as tables.

The demo is loaded once: when its last event is already in the log, nothing is offered again and
the summary is read back as it stands. (Offering it again would be harmless anyway within the log's
deduplication window: every event id is deterministic.)

HTTP tokens are issued the way ``collabbus institutions token`` issues them (the demo acts for the
operator and its partners) and revoked when the demo is done.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
from nats.aio.client import Client
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from bus.client import offer
from ops import demo_data as d
from ops.demo_data import Offer, Plan, Step, WaitForMeetings, WaitUntil

ILLUSTRATIVE = (
    "† illustrative: the article gives only the counts (6 metropolitan, 2 provincial, 9 district "
    "municipalities, 30+ projects); these real municipalities stand in for the unnamed ones."
)


class DemoError(RuntimeError):
    """The demo could not run (the bus or the gateway is not there, a token is refused, …)."""


# --- tokens -----------------------------------------------------------------------------------


class TokenDesk:
    """HTTP tokens for the members the demo speaks for, issued as ``collabbus institutions token``
    does (directly in the bus's database) once the read models know the member."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.issued: dict[str, str] = {}
        self._lock = asyncio.Lock()  # one token per member, also for concurrent reads

    async def token(self, institution: str, *, timeout: float = 20.0) -> str:
        async with self._lock:
            if institution not in self.issued:
                self.issued[institution] = await asyncio.to_thread(self._issue, institution, timeout)
            return self.issued[institution]

    def _issue(self, institution: str, timeout: float) -> str:
        from handlers import tokens
        from handlers.db import session_scope
        from handlers.institutions import member

        from sqlalchemy.exc import SQLAlchemyError

        deadline = time.monotonic() + timeout
        while True:
            try:
                with session_scope(self.engine) as session:
                    if member(session, institution) is not None:
                        return tokens.issue(session, institution)
            except SQLAlchemyError as exc:
                raise DemoError(
                    f"the bus's database is not usable ({exc.__class__.__name__}): run the demo with the settings "
                    "of the running bus (the same data dir or COLLABBUS_DATABASE_URL)"
                ) from None
            if time.monotonic() > deadline:
                raise DemoError(f"{institution!r} is not a member in the read models after {timeout:g} s")
            time.sleep(0.05)

    async def revoke_all(self) -> None:
        """Revoke what was issued: the demo's credentials do not outlive it."""
        from handlers import tokens
        from handlers.db import session_scope

        def revoke() -> None:
            with session_scope(self.engine) as session:
                for token in self.issued.values():
                    tokens.revoke(session, token)

        if self.issued:
            await asyncio.to_thread(revoke)
            self.issued.clear()


# --- the gateway, as a partner's HTTP client ------------------------------------------------------


class Gateway:
    """The HTTP gateway: ``POST /events`` and the read API, each call as some member."""

    def __init__(self, client: httpx.AsyncClient, desk: TokenDesk, operator: str) -> None:
        self.client = client
        self.desk = desk
        self.operator = operator

    @property
    def url(self) -> str:
        return str(self.client.base_url).rstrip("/")

    async def _headers(self, institution: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {await self.desk.token(institution or self.operator)}"}

    async def get(self, path: str, *, as_: str | None = None, **params: Any) -> Any:
        response = await self.client.get(path, params=params, headers=await self._headers(as_))
        if response.status_code == 401:
            raise DemoError(
                f"the gateway at {self.url} refused the demo's token: run the demo with the settings of the "
                "running bus (the same data dir or COLLABBUS_DATABASE_URL)"
            )
        if response.status_code != 200:
            raise DemoError(f"GET {path}: {response.status_code} {response.text[:300]}")
        return response.json()

    async def items(self, path: str, *, as_: str | None = None, **params: Any) -> list[Any]:
        """Every item of a paged list."""
        found: list[Any] = []
        cursor = None
        while True:
            page = await self.get(path, as_=as_, limit=500, **params, **({"cursor": cursor} if cursor else {}))
            found.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return found

    async def post_event(self, institution: str, event: dict[str, Any]) -> dict[str, Any]:
        """Offer one structured event; the gatekeeper's verdict (a problem becomes a rejection)."""
        headers = {"content-type": "application/cloudevents+json", **await self._headers(institution)}
        response = await self.client.post("/events", json=event, headers=headers)
        if not response.headers.get("content-type", "").endswith("json"):
            raise DemoError(f"POST /events: {response.status_code} {response.text[:300]}")
        body = response.json()
        if response.status_code == 202:
            return dict(body)
        return {"status": "rejected", "id": event["id"], "reason": body.get("kind"), "detail": body.get("detail")}

    async def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if (await self.client.get("/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise DemoError(f"the HTTP gateway at {self.url} is not ready: is the bus running (collabbus up)?")
            await asyncio.sleep(0.2)


# --- publishing ---------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the gatekeeper answered to the demo's offers."""

    offered: int = 0
    accepted: int = 0
    duplicates: int = 0
    refused: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, verdict: dict[str, Any]) -> None:
        self.offered += 1
        if verdict.get("status") == "accepted":
            self.accepted += 1
            self.duplicates += bool(verdict.get("duplicate"))
        else:
            self.refused.append(verdict)


class Publisher:
    """Carries out the plan's steps: offers, and the waits the stories need."""

    def __init__(self, nc: Client, gateway: Gateway, tally: Tally, progress: Callable[[str, int], None]) -> None:
        self.nc = nc
        self.gateway = gateway
        self.tally = tally
        self.progress = progress
        """Shows what is going on: (description, steps done since the last call)."""

    async def run(self, steps: list[Step]) -> None:
        for step in steps:
            if isinstance(step, Offer):
                self.tally.count(await self.offer(step))
            elif isinstance(step, WaitUntil):
                await self.wait_until(step)
            elif isinstance(step, WaitForMeetings):
                await self.wait_for_meetings(step)
            self.progress(step.chapter, 1)

    async def offer(self, step: Offer) -> dict[str, Any]:
        if step.via == "http":
            return await self.gateway.post_event(step.institution, step.event)
        verdict = await offer(self.nc, step.institution, step.event)
        if verdict.reason == "unavailable":
            raise DemoError(f"the bus did not answer: {verdict.errors[0].msg if verdict.errors else 'unavailable'}")
        return {**verdict.as_dict(), "id": step.event["id"]}

    async def wait_until(self, step: WaitUntil) -> None:
        while (left := (step.moment - datetime.now(timezone.utc)).total_seconds()) > 0:
            self.progress(f"{step.chapter} ({left:.0f} s)", 0)
            await asyncio.sleep(min(left, 0.25))

    async def wait_for_meetings(self, step: WaitForMeetings, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not (await self.gateway.get(f"/innovation-days/{step.day_id}")).get("meetings_proposed_at"):
            if time.monotonic() > deadline:
                raise DemoError(f"no meetings were proposed for {step.day_id} within {timeout:g} s of its deadline")
            await asyncio.sleep(0.2)


async def _loaded(gateway: Gateway) -> bool:
    """Whether the demo's last event is already in the log."""
    last = d.COMPLETION.event
    logged = await gateway.items("/events", type=last["type"], institution=d.COMPLETION.institution, subject=last["subject"])
    return any(item["event"]["id"] == last["id"] for item in logged)


async def _settle(gateway: Gateway, timeout: float = 20.0) -> None:
    """Wait until the read models have applied the whole log (``/ops/status``, as the operator)."""
    deadline = time.monotonic() + timeout
    previous = None
    while time.monotonic() < deadline:
        status = await gateway.get("/ops/status")
        consumers = [c for c in status["consumers"].values() if c]
        caught_up = all(c["pending"] == 0 and c["ack_pending"] == 0 for c in consumers)
        last_seq = (status["streams"].get("COLLAB_EVENTS") or {}).get("last_seq")
        if caught_up and last_seq == previous:
            return
        previous = last_seq if caught_up else None
        await asyncio.sleep(0.2)


async def run(
    nc: Client,
    *,
    operator: str,
    gateway_url: str,
    engine: Any,
    progress: Console | None = None,
) -> dict[str, Any]:
    """Load the demo network (unless it is loaded) and return what the read API says happened.

    ``nc``: a NATS connection of the demo's own; ``engine``: the bus's database, for tokens;
    ``progress``: where to show progress (None: quietly).
    """
    desk = TokenDesk(engine)
    plan = Plan(operator)
    async with httpx.AsyncClient(base_url=gateway_url, timeout=30) as client:
        gateway = Gateway(client, desk, operator)
        try:
            await gateway.wait_ready()
            loaded = await _loaded(gateway)
            tally = Tally()
            if not loaded:
                await _publish(nc, gateway, plan, tally, progress)
            await _settle(gateway)
            summary = await read_back(gateway)
        finally:
            await desk.revoke_all()
    summary["status"] = "already_loaded" if loaded else "loaded"
    summary["published"] = None if loaded else asdict(tally)
    return summary


async def _publish(nc: Client, gateway: Gateway, plan: Plan, tally: Tally, console: Console | None) -> None:
    started = time.monotonic()
    with Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description:<48}"), BarColumn(), MofNCompleteColumn(),
        console=console, disable=console is None, transient=True,
    ) as bar:
        task = bar.add_task("Members join", total=plan.size())

        def show(description: str, done: int) -> None:
            bar.update(task, description=description, advance=done)

        publisher = Publisher(nc, gateway, tally, show)
        await publisher.run(plan.opening())
        for institution in plan.http_publishers:  # partners who speak HTTP get their tokens
            await gateway.desk.token(institution)
        await publisher.run(plan.timed(datetime.now(timezone.utc)))
    tally.seconds = round(time.monotonic() - started, 1)


# --- reading back -----------------------------------------------------------------------------


def text(localized: dict[str, str] | None) -> str:
    """A text in its first (the institution's own) language."""
    return next(iter(localized.values()), "") if localized else ""


async def read_back(gateway: Gateway) -> dict[str, Any]:
    """What happened, from the HTTP read API."""
    members = {m["id"]: m for m in await gateway.items("/institutions")}

    def name(institution: str) -> str:
        return text(members.get(institution, {}).get("name")) or institution

    calls, adoptions, validation, day, training = await asyncio.gather(
        _calls(gateway), _adoptions(gateway, members, name), _validation(gateway),
        _day(gateway, d.SI_DAY), _day(gateway, d.TRAINING),
    )
    return {
        "gateway": gateway.url,
        "members": {"count": len(members), "by_kind": dict(Counter(m["kind"] for m in members.values()))},
        "calls": calls,
        "adoptions": adoptions,
        "validation": validation,
        "innovation_day": day,
        "training": training,
        "explore": explore(gateway.url),
    }


async def _calls(gateway: Gateway) -> dict[str, Any]:
    open_calls = [
        {"call_id": c["call_id"], "owner": c["owner"], "title": c["title"], "kind": c["kind"], "deadline": c["deadline"],
         "budget": c.get("budget")}
        for c in await gateway.items("/calls", status="open")
    ]
    esf = await gateway.get(f"/calls/{d.ESF_CALL}")
    # Applications are shown to the call's publisher (and each to its applicant), as the funder reads them.
    applications = [
        {"application_id": a["application_id"], "applicant": a["applicant"], "requested_amount": a.get("requested_amount"),
         "submitted_at": a["submitted_at"], "outcome": a["status"], "reason": (a.get("reason") or {}).get("code"),
         "awarded_amount": a.get("awarded_amount")}
        for a in await gateway.items(f"/calls/{d.ESF_CALL}/applications", as_=d.ESF_FUND)
    ]
    return {
        "open": open_calls,
        "esf": {"call_id": esf["call_id"], "title": esf["title"], "status": esf["status"], "deadline": esf["deadline"],
                "closed_reason": esf.get("closed_reason"), "applications": applications},
    }


async def _adoptions(gateway: Gateway, members: dict[str, Any], name: Callable[[str], str]) -> dict[str, Any]:
    stats = await gateway.get("/stats/adoptions", owner=d.MERSIN)
    practices: list[dict[str, Any]] = []
    adopters_by_level: dict[str | None, set[str]] = {}
    details = await asyncio.gather(*(gateway.get(f"/projects/{p['project_id']}") for p in d.MERSIN_PROJECTS))
    for detail in details:
        practices.append({"project_id": detail["project_id"], "title": detail["title"],
                          "service_model": detail.get("service_model"), "adoptions": len(detail["adoptions"]),
                          "support": dict(Counter(s for a in detail["adoptions"] for s in a["support"]))})
        for adoption in detail["adoptions"]:
            level = members.get(adoption["adopter"], {}).get("municipality_level")
            adopters_by_level.setdefault(level, set()).add(adoption["adopter"])
    levels = [
        {**level, "names": sorted(name(a) for a in adopters_by_level.get(level["municipality_level"], ()))}
        for level in stats["by_municipality_level"]
    ]
    return {
        "owner": d.MERSIN, "by_municipality_level": levels, "practices": practices,
        "total": sum(level["adoptions"] for level in levels), "illustrative": ILLUSTRATIVE,
    }


async def _validation(gateway: Gateway) -> dict[str, Any]:
    coordinator = d.COMPETENCE_CENTRE  # a party of the workflow: sees the whole course
    view = await gateway.get(f"/validations/{d.VALIDATION}", as_=coordinator)
    course = [
        {"seq": item["seq"], "type": item["event"]["type"], "by": item["event"]["source"].removeprefix("/institutions/")}
        for item in await gateway.items("/events", as_=coordinator, subject=d.VALIDATION)
    ]
    keep = ("validation_id", "project_id", "requester", "coordinator", "status", "outcome", "decided_by",
            "evidence_level", "median_scores", "self_assessment", "reviewers", "reviews", "info_requests")
    return {**{k: view.get(k) for k in keep}, "course": course}


async def _day(gateway: Gateway, day_id: str) -> dict[str, Any]:
    day = await gateway.get(f"/innovation-days/{day_id}")
    registrations = await gateway.items(f"/innovation-days/{day_id}/registrations")
    waited = {
        item["event"]["data"]["registration_id"]
        for item in await gateway.items("/events", type="innovation_day.registration_waitlisted", subject=day_id)
    }
    for registration in registrations:
        registration["promoted"] = registration["status"] == "confirmed" and registration["registration_id"] in waited
    return {
        **{k: day.get(k) for k in ("day_id", "organizer", "title", "format", "starts_at", "registration_deadline",
                                   "capacity", "confirmed", "waitlisted", "meetings_proposed_at")},
        "registrations": registrations,
        "meetings": await gateway.items(f"/innovation-days/{day_id}/meetings"),
    }


def explore(url: str) -> dict[str, str]:
    """Where to look next (all but /docs need ``Authorization: Bearer <token>``; the calendar
    also takes ``?token=``)."""
    return {
        "API docs": f"{url}/docs",
        "projects": f"{url}/projects",
        "Mersin's spread": f"{url}/stats/adoptions?owner={d.MERSIN}",
        "open calls": f"{url}/calls?status=open",
        f"ESF+ applications (as {d.ESF_FUND})": f"{url}/calls/{d.ESF_CALL}/applications",
        "validation": f"{url}/validations/{d.VALIDATION}",
        "Social Innovation Day": f"{url}/innovation-days/{d.SI_DAY}",
        "its meetings": f"{url}/innovation-days/{d.SI_DAY}/meetings",
        "calendar": f"{url}/innovation-days.ics?token=…",
        "the log": f"{url}/events?subject={d.SI_DAY}",
    }


# --- printing ---------------------------------------------------------------------------------


def render(summary: dict[str, Any], console: Console) -> None:
    """The summary as tables."""
    published = summary.get("published")
    if published:
        console.print(
            f"[bold]Demo network loaded[/bold]: {published['offered']} events offered in {published['seconds']} s — "
            f"{published['accepted']} accepted ({published['duplicates']} duplicates), {len(published['refused'])} refused"
        )
        for refused in published["refused"]:
            why = refused.get("detail") or refused.get("errors")
            console.print(f"  [red]refused[/red] {refused.get('id')}: {refused.get('reason')} {why}")
    else:
        console.print("[bold]The demo network is already in the log[/bold]: nothing offered again.")
    members = summary["members"]
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(members["by_kind"].items()))
    console.print(f"{members['count']} members: {kinds}\n")

    _render_calls(summary["calls"], console)
    _render_adoptions(summary["adoptions"], console)
    _render_validation(summary["validation"], console)
    _render_day(summary["innovation_day"], console)
    _render_day(summary["training"], console)

    table = Table("explore", "URL", title="Explore (send Authorization: Bearer $(collabbus institutions token ID))",
                  title_justify="left")
    for label, url in summary["explore"].items():
        table.add_row(label, url)
    console.print(table)


def _render_calls(calls: dict[str, Any], console: Console) -> None:
    table = Table("call", "by", "kind", "deadline", "budget", title="Open calls", title_justify="left")
    for call in calls["open"]:
        budget = call.get("budget") or {}
        table.add_row(text(call["title"]), call["owner"], call["kind"], call["deadline"][:10],
                      f"{budget.get('amount', '')} {budget.get('currency', '')}".strip())
    console.print(table)
    esf = calls["esf"]
    table = Table("application", "applicant", "submitted (UTC)", "outcome", title=(
        f"{text(esf['title'])}: {esf['status']} (deadline {esf['deadline'][11:19]} UTC, seconds after it opened)"),
        title_justify="left")
    for application in esf["applications"]:
        outcome, awarded = application["outcome"], application.get("awarded_amount")
        if outcome == "rejected":
            shown = f"[red]{outcome}: {application['reason']}[/red]"
        elif awarded:
            shown = f"[green]{outcome}: {awarded['amount']} {awarded['currency']}[/green]"
        else:
            shown = f"[green]{outcome}[/green]" if outcome in ("received", "awarded") else outcome
        table.add_row(application["application_id"], application["applicant"], application["submitted_at"][11:19], shown)
    console.print(table)


def _render_adoptions(adoptions: dict[str, Any], console: Console) -> None:
    table = Table("level", "municipalities", "adoptions", "adopting municipalities†",
                  title=f"Mersin's good practices, adopted ({adoptions['total']} adoptions)", title_justify="left")
    for level in adoptions["by_municipality_level"]:
        table.add_row(level["municipality_level"], str(level["municipalities"]), str(level["adoptions"]),
                      ", ".join(level["names"]))
    console.print(table)
    table = Table("practice", "service model", "adoptions", "support given", title_justify="left")
    for practice in adoptions["practices"]:
        support = ", ".join(f"{kind} ×{n}" for kind, n in sorted(practice["support"].items()))
        table.add_row(text(practice["title"]), practice["service_model"] or "", str(practice["adoptions"]), support)
    console.print(table)
    console.print(f"[dim]{adoptions['illustrative']}[/dim]\n")


def _render_validation(validation: dict[str, Any], console: Console) -> None:
    table = Table("#", "event", "by", title=(
        f"Validation {validation['validation_id']} of {validation['project_id']}: "
        f"[bold]{validation['outcome']}[/bold] (decided by {validation['decided_by']}, evidence level "
        f"{validation['evidence_level']})"), title_justify="left")
    for step in validation["course"]:
        table.add_row(str(step["seq"]), step["type"], step["by"])
    console.print(table)
    reviews = validation.get("reviews") or []
    criteria = list(validation.get("median_scores") or {})
    table = Table("reviewer", *criteria, "recommendation", title_justify="left")
    for review in reviews:
        table.add_row(review["reviewer"], *(str(review["scores"][c]) for c in criteria), review["recommendation"])
    table.add_row("[bold]median[/bold]", *(f"{validation['median_scores'][c]:g}" for c in criteria), "")
    console.print(table)


def _render_day(day: dict[str, Any], console: Console) -> None:
    table = Table("registration", "role", "attendees", "status", title=(
        f"{text(day['title'])} ({day['format']}, {day['starts_at'][:10]}): {day['confirmed']}/{day['capacity']} "
        f"confirmed, {len(day['waitlisted'])} waiting" + (f", {closed} not seated" if (closed := sum(
            (r.get("reason") or {}).get("code") == "waitlist_closed" for r in day["registrations"])) else "")), title_justify="left")
    for registration in day["registrations"]:
        status = registration["status"]
        if registration["promoted"]:
            status += " (promoted from the waitlist)"
        elif (registration.get("reason") or {}).get("code") == "waitlist_closed":
            status += " (no seat came free by the deadline)"
        elif registration.get("position"):
            status += f" #{registration['position']}"
        table.add_row(registration["participant"], registration.get("role") or "", str(registration.get("attendees")),
                      status)
    console.print(table)
    if day["meetings"]:
        table = Table("slot (UTC)", "innovator", "funder", "shared themes", title="Proposed meetings",
                      title_justify="left")
        for meeting in day["meetings"]:
            table.add_row(meeting["slot_start"][11:16], meeting["innovator"], meeting["funder"],
                          ", ".join(meeting["shared_themes"]))
        console.print(table)
    console.print()
