"""The ``collabbus`` command line (CONTRACT §2).

Exit codes: 0 success, 1 a refused or failed operation (the reason is printed), 2 a usage error.
Every command takes the settings of §1 as options too (``--data-dir``, ``--nats-url``, …).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from ops.settings import Settings

app = typer.Typer(
    name="collabbus",
    help="collabbus — an event-driven collaboration bus for networks of institutions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
institutions_app = typer.Typer(help="Membership of the network.", no_args_is_help=True)
schemas_app = typer.Typer(help="The event catalog's JSON Schemas.", no_args_is_help=True)
app.add_typer(institutions_app, name="institutions")
app.add_typer(schemas_app, name="schemas")

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

F = TypeVar("F", bound=Callable[..., Any])


def with_settings(func: F) -> F:
    """Give a command one option per setting (``--data-dir`` …) and pass it the resulting ``Settings``."""
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "settings"]
    taken = {p.name for p in own}
    extra = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, help=(field.description or f"setting COLLABBUS_{name.upper()}"),
                                 rich_help_panel="Settings (also COLLABBUS_* variables)", show_default=False),
            annotation=Optional[str],
        )
        for name, field in Settings.model_fields.items()
        if name not in taken
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in Settings.model_fields and name not in taken}
        try:
            settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            err.print(f"[red]invalid settings:[/red] {exc}")
            raise typer.Exit(2) from None
        return func(*args, settings=settings, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper  # type: ignore[return-value]


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's coroutine; an operation that fails prints why and exits 1."""
    from bus.server import EmbeddedServerError

    try:
        return asyncio.run(coro)
    except EmbeddedServerError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    except (ConnectionRefusedError, OSError) as exc:
        err.print(f"[red]error:[/red] cannot reach NATS: {exc}. Is the bus running (collabbus up)?")
        raise typer.Exit(1) from None


async def _connect(settings: Settings, name: str) -> Any:
    import nats

    from bus.runtime import connect_options

    options = connect_options(settings, name)
    async def quiet(_exc: Exception) -> None:  # the failure is reported once, below
        return None

    options.update(max_reconnect_attempts=1, connect_timeout=3, allow_reconnect=False, error_cb=quiet)
    try:
        return await nats.connect(**options)
    except Exception as exc:  # nats-py raises several kinds here
        raise ConnectionRefusedError(f"{', '.join(settings.nats_servers)} ({exc.__class__.__name__})") from None


def _load_data(value: str) -> Any:
    """``@file.json``, ``-`` (standard input) or inline JSON."""
    if value == "-":
        text = sys.stdin.buffer.read()
    elif value.startswith("@"):
        path = Path(value[1:])
        if not path.is_file():
            raise typer.BadParameter(f"no such file: {path}", param_hint="--data")
        text = path.read_bytes()
    else:
        text = value.encode()
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise typer.BadParameter(f"not valid JSON: {exc}", param_hint="--data") from None


def _print_verdict(verdict: Any, as_json: bool) -> None:
    if as_json:
        out.print_json(data=verdict.as_dict())
    elif verdict.accepted:
        dup = " (duplicate: already in the log)" if verdict.duplicate else ""
        out.print(f"[green]accepted[/green] {verdict.id} as #{verdict.seq}{dup}")
    else:
        out.print(f"[red]rejected[/red] {verdict.id or '(no id)'} ({verdict.reason})")
        for problem in verdict.errors:
            loc = ".".join(str(part) for part in problem.loc) or "-"
            out.print(f"  {loc}: {problem.msg} [dim]\\[{problem.type}][/dim]")


# --------------------------------------------------------------------------- up


@app.command()
@with_settings
def up(
    demo: Annotated[bool, typer.Option("--demo", help="load the demo network once (see `collabbus demo`)")] = False,
    *,
    settings: Settings,
) -> None:
    """Start the bus: embedded NATS (unless a URL is set), streams, gatekeeper. Ctrl-C drains and stops."""
    from bus.runtime import Bus

    async def main() -> None:
        bus = Bus(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await bus.start()
        try:
            await bus.start_http()
        except OSError as exc:
            await bus.stop()
            err.print(f"[red]error:[/red] {exc.strerror or exc} (set COLLABBUS_HTTP to another address)")
            raise typer.Exit(1) from None
        where = f"embedded nats-server at {settings.nats_servers[0]}" if settings.embedded else ", ".join(settings.nats_servers)
        err.print(f"[bold]collabbus[/bold] is up: NATS {where}, data in {settings.data_dir.resolve()}")
        err.print(f"  operator: {settings.operator} · ingress: collab.ingress.{{institution}}.{{domain}}.{{event}}")
        err.print(f"  HTTP gateway: {bus.http.url} (docs at {bus.http.url}/docs)")
        err.print("  Ctrl-C to stop")
        loading = asyncio.create_task(_load_demo(settings, bus)) if demo else None
        try:
            await stop.wait()
        finally:
            if loading is not None and not loading.done():
                loading.cancel()
                await asyncio.gather(loading, return_exceptions=True)
            err.print("draining…")
            await bus.stop()
            err.print("stopped")

    run(main())


async def _load_demo(settings: Settings, bus: Any) -> None:
    """``up --demo``: once the bus serves, load the demo network through its public interfaces."""
    from ops import demo

    try:
        nc = await _connect(settings, "collabbus-demo")
        try:
            summary = await demo.run(nc, operator=settings.operator, gateway_url=bus.http.url, engine=bus.engine, progress=err)
        finally:
            await nc.close()
    except (demo.DemoError, ConnectionRefusedError) as exc:
        err.print(f"[red]demo:[/red] {exc}")
        return
    if summary["status"] == "already_loaded":
        err.print("  demo network: already loaded (`collabbus demo` prints it)")
    else:
        demo.render(summary, out)
        err.print("  demo network loaded")


# --------------------------------------------------------------------------- demo


def _gateway_url(settings: Settings) -> str:
    """Where a client reaches the gateway the settings describe (a wildcard address means this host)."""
    host, port = settings.http_host_port
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@app.command()
@with_settings
def demo(
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable summary")] = False,
    *,
    settings: Settings,
) -> None:
    """Publish the demo network (institutions and stories from the seed documents) through the public
    interfaces of a running bus, then print what happened, read back from the HTTP read API."""
    from handlers.db import make_engine
    from ops import demo as demo_network

    async def main() -> Any:
        nc = await _connect(settings, "collabbus-demo")
        engine = make_engine(settings.db_url)
        try:
            return await demo_network.run(
                nc, operator=settings.operator, gateway_url=_gateway_url(settings), engine=engine,
                progress=None if as_json else err,
            )
        finally:
            await nc.close()
            engine.dispose()

    try:
        summary = run(main())
    except demo_network.DemoError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(json.dumps(summary, ensure_ascii=False, indent=2) + "\n")
    else:
        demo_network.render(summary, out)
    if summary["published"] and summary["published"]["refused"]:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- publish


def new_event_id() -> str:
    """A fresh event id (time-ordered UUID text)."""
    return str(uuid.uuid4())


@app.command()
@with_settings
def publish(
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="event type, e.g. project.registered")],
    as_: Annotated[str, typer.Option("--as", help="the publishing institution's id")],
    data: Annotated[str, typer.Option(help="the data: @file.json, - for standard input, or inline JSON")],
    subject: Annotated[Optional[str], typer.Option(help="the aggregate id; default: taken from the data")] = None,
    event_id: Annotated[Optional[str], typer.Option("--id", help="event id; default: a new UUID")] = None,
    correlation_id: Annotated[Optional[str], typer.Option(help="conversation the event belongs to")] = None,
    causation_id: Annotated[Optional[str], typer.Option(help="the event that caused this one")] = None,
    binary: Annotated[bool, typer.Option(help="send in binary mode (ce- headers)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Publish one event through the gatekeeper; prints accepted or rejected with reasons."""
    from bus.client import offer
    from schemas import registry

    payload = _load_data(data)
    if subject is None and isinstance(payload, dict):
        try:
            field = registry.spec_for(event_type).subject_field
            subject = str(payload.get(field)) if payload.get(field) is not None else None
        except LookupError:
            subject = None
    event = {
        "specversion": "1.0",
        "id": event_id or new_event_id(),
        "source": f"/institutions/{as_}",
        "type": event_type,
        "subject": subject or "",
        "datacontenttype": "application/json",
        "data": payload,
    }
    if correlation_id:
        event["correlationid"] = correlation_id
    if causation_id:
        event["causationid"] = causation_id

    async def main() -> Any:
        nc = await _connect(settings, "collabbus-cli")
        try:
            return await offer(nc, as_, event, binary=binary)
        finally:
            await nc.close()

    verdict = run(main())
    _print_verdict(verdict, as_json)
    if not verdict.accepted:
        raise typer.Exit(1)


# --------------------------------------------------------------------------- tail


def _summary(event: dict[str, Any]) -> str:
    data = event.get("data") or {}
    for key in ("title", "name"):
        text = data.get(key)
        if isinstance(text, dict) and text:
            return str(next(iter(text.values())))
    for key in ("outcome", "reason", "recommendation", "status"):
        if isinstance(data.get(key), str):
            return f"{key}={data[key]}"
    return ""


def _render_line(logged: Any) -> str:
    event = logged.event
    institution = str(event.get("source", "")).removeprefix("/institutions/")
    time = str(event.get("time", ""))[:19].replace("T", " ")
    summary = _summary(event)
    return (
        f"[dim]#{logged.seq:<6}[/dim] {time}  [bold cyan]{event.get('type', '?'):<40}[/bold cyan] "
        f"{institution} → {event.get('subject', '')}" + (f"  [italic]{summary}[/italic]" if summary else "")
    )


@app.command()
@with_settings
def tail(
    event_type: Annotated[Optional[str], typer.Option("--type", help="a type (project.registered) or domain (project)")] = None,
    institution: Annotated[Optional[str], typer.Option(help="only events of this institution")] = None,
    subject: Annotated[Optional[str], typer.Option(help="only events about this aggregate")] = None,
    since: Annotated[str, typer.Option(help="all, new, a sequence number, a duration (10m, 2h) or an RFC 3339 time")] = "new",
    count: Annotated[Optional[int], typer.Option(help="stop after this many events")] = None,
    follow: Annotated[bool, typer.Option(help="keep following new events")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="one canonical event per line (JSON Lines)")] = False,
    *,
    settings: Settings,
) -> None:
    """Follow the event log live, readable."""
    from bus import log
    from nats.js.api import DeliverPolicy  # noqa: F401  (validated below)

    try:
        log.parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    subject_filter = log.event_filter(event_type, institution, subject)

    async def main() -> None:
        nc = await _connect(settings, "collabbus-tail")
        seen = 0
        try:
            async for logged in log.read(nc.jetstream(), subject_filter, since=since, follow=follow):
                if as_json:
                    sys.stdout.write(orjson.dumps(logged.event).decode() + "\n")
                    sys.stdout.flush()
                else:
                    out.print(_render_line(logged))
                seen += 1
                if count is not None and seen >= count:
                    return
        finally:
            await nc.close()

    try:
        run(main())
    except KeyboardInterrupt:
        pass


# --------------------------------------------------------------------------- rebuild


@app.command()
@with_settings
def rebuild(
    projection: Annotated[Optional[str], typer.Option(help="the consumer group to rebuild (network)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even though a bus seems to be consuming")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Drop the read models and replay them from the log, with a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bus.rebuild import rebuild as replay
    from bus.runtime import NETWORK_CONSUMER, embedded_server
    from bus.server import port_is_taken
    from bus.streams import EVENTS_STREAM
    from handlers.db import make_engine, migrate
    from handlers.routes import network
    from handlers.service import NetworkService

    if projection not in (None, NETWORK_CONSUMER):
        raise typer.BadParameter(f"unknown projection {projection!r}; the consumer groups are: {NETWORK_CONSUMER}", param_hint="--projection")

    async def main() -> Any:
        server = None
        if settings.embedded and not port_is_taken(*settings.listen_host_port):
            server = embedded_server(settings)
            await server.astart()
        nc = await _connect(settings, "collabbus-rebuild")
        try:
            js = nc.jetstream()
            if not force and await _consumer_active(js, EVENTS_STREAM, NETWORK_CONSUMER):
                err.print("[red]error:[/red] a running bus is consuming the log; stop it (Ctrl-C on collabbus up) "
                          "before a rebuild, or pass --force")
                raise typer.Exit(1)
            engine = make_engine(settings.db_url)
            await asyncio.to_thread(migrate, engine)
            service = NetworkService(engine, network())
            with Progress(
                TextColumn("[bold]rebuilding[/bold]"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:>8.0f} events/s"), TimeRemainingColumn(),
                console=err, disable=as_json, transient=False,
            ) as bar:
                task = bar.add_task("rebuild", total=None, rate=0.0)
                started = asyncio.get_running_loop().time()

                def progress(done: int, total: int) -> None:
                    elapsed = max(asyncio.get_running_loop().time() - started, 1e-6)
                    bar.update(task, completed=done, total=total, rate=done / elapsed)

                report = await replay(js, service, progress=progress)
            engine.dispose()
            return report
        finally:
            await nc.close()
            if server is not None:
                await server.astop()

    report = run(main())
    if as_json:
        out.print_json(data=report.as_dict())
    else:
        out.print(f"rebuilt the read models from {report.events} events in {report.seconds:.1f} s "
                  f"({report.rate:,.0f} events/s), up to #{report.last_seq}")
        for failure in report.failures:
            out.print(f"  [red]failed[/red] #{failure['seq']} {failure['id']}: {failure['error']}")
    if report.failures:
        raise typer.Exit(1)


async def _consumer_active(js: Any, stream: str, name: str) -> bool:
    """True when some process is pulling from the durable consumer right now."""
    from nats.js.errors import NotFoundError

    for _ in range(3):
        try:
            info = await js.consumer_info(stream, name)
        except NotFoundError:
            return False
        if info.num_waiting:
            return True
        await asyncio.sleep(0.3)
    return False


# --------------------------------------------------------------------------- institutions


@institutions_app.command("add")
@with_settings
def institutions_add(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="e.g. tr-mersin-bb")],
    name: Annotated[str, typer.Option(help="the institution's name")],
    kind: Annotated[str, typer.Option(help="university, municipality, ngo, cooperative, competence_centre, …")],
    country: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2 code, e.g. TR")],
    lang: Annotated[str, typer.Option(help="language of the name (BCP 47)")] = "en",
    region: Annotated[Optional[str], typer.Option()] = None,
    municipality_level: Annotated[Optional[str], typer.Option(help="metropolitan, provincial or district")] = None,
    theme: Annotated[Optional[list[str]], typer.Option(help="theme code; repeat for several")] = None,
    identifier: Annotated[Optional[list[str]], typer.Option(help="SCHEME=VALUE, e.g. fi-business-id=0245895-8")] = None,
    website: Annotated[Optional[str], typer.Option()] = None,
    contact_email: Annotated[Optional[str], typer.Option()] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    *,
    settings: Settings,
) -> None:
    """Add a member: the operator publishes institution.joined."""
    from bus.client import offer

    data: dict[str, Any] = {"id": institution_id, "name": {lang: name}, "kind": kind, "country": country}
    optional = {"region": region, "municipality_level": municipality_level, "website": website, "contact_email": contact_email}
    data.update({k: v for k, v in optional.items() if v is not None})
    if theme:
        data["themes"] = theme
    if identifier:
        pairs = []
        for item in identifier:
            scheme, sep, value = item.partition("=")
            if not sep:
                raise typer.BadParameter(f"{item!r}: use SCHEME=VALUE", param_hint="--identifier")
            pairs.append({"scheme": scheme, "value": value})
        data["identifiers"] = pairs
    event = {
        "specversion": "1.0",
        "id": new_event_id(),
        "source": f"/institutions/{settings.operator}",
        "type": "institution.joined",
        "subject": institution_id,
        "data": data,
    }

    async def main() -> Any:
        nc = await _connect(settings, "collabbus-cli")
        try:
            return await offer(nc, settings.operator, event)
        finally:
            await nc.close()

    verdict = run(main())
    _print_verdict(verdict, as_json)
    if not verdict.accepted:
        raise typer.Exit(1)


@institutions_app.command("list")
@with_settings
def institutions_list(
    as_json: Annotated[bool, typer.Option("--json")] = False,
    *,
    settings: Settings,
) -> None:
    """The members of the network, as the log says."""
    from bus import log

    async def main() -> dict[str, dict[str, Any]]:
        nc = await _connect(settings, "collabbus-cli")
        members: dict[str, dict[str, Any]] = {}
        try:
            async for logged in log.read(nc.jetstream(), log.event_filter("institution"), since="all"):
                event = logged.event
                if event["type"] == "institution.left":
                    members.pop(event["subject"], None)
                elif event["type"] == "institution.joined":
                    members[event["subject"]] = dict(event["data"])
                else:
                    members.setdefault(event["subject"], {}).update(event["data"])
        finally:
            await nc.close()
        return members

    members = run(main())
    if as_json:
        out.print_json(data={"items": list(members.values())})
        return
    table = Table("id", "name", "kind", "country", "level")
    for member in members.values():
        name = member.get("name") or {}
        table.add_row(member.get("id"), next(iter(name.values()), ""), member.get("kind"), member.get("country"), member.get("municipality_level") or "")
    out.print(table)


@institutions_app.command("token")
@with_settings
def institutions_token(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="a member's id")],
    *,
    settings: Settings,
) -> None:
    """Print a new HTTP token for a member, and nothing else (only its hash is stored)."""
    from sqlalchemy.exc import SQLAlchemyError

    from handlers import tokens
    from handlers.db import make_engine, migrate, session_scope
    from handlers.institutions import member

    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        with session_scope(engine) as session:
            if member(session, institution_id) is None:
                err.print(f"[red]error:[/red] {institution_id!r} is not a member of the network (per the read models "
                          f"at {settings.db_url}); add it with `collabbus institutions add` first")
                raise typer.Exit(1)
            token = tokens.issue(session, institution_id)
    except SQLAlchemyError as exc:
        err.print(f"[red]error:[/red] the database is not reachable: {exc.__class__.__name__}: {exc}")
        raise typer.Exit(1) from None
    finally:
        engine.dispose()
    sys.stdout.write(token + "\n")


# --------------------------------------------------------------------------- schemas, asyncapi


@schemas_app.command("export")
def schemas_export(directory: Annotated[Path, typer.Argument(metavar="DIR")]) -> None:
    """Write one JSON Schema per event type (and major version) into DIR."""
    from schemas import registry

    paths = registry.export_json_schemas(directory)
    err.print(f"wrote {len(paths)} schemas to {directory}")


@app.command()
def asyncapi(
    yaml: Annotated[bool, typer.Option("--yaml", help="YAML instead of JSON")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write to a file")] = None,
) -> None:
    """Print the AsyncAPI 3 document of the bus's subjects and event payloads."""
    from bus.asyncapi import asyncapi_document

    document = asyncapi_document()
    if yaml:
        import yaml as pyyaml

        text = pyyaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps(document, indent=2, ensure_ascii=False)
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text + "\n")


def main() -> None:  # pragma: no cover - console script
    app()
