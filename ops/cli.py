"""The ``collabbus`` command line (CONTRACT §2).

Exit codes: 0 success, 1 a refused or failed operation (the reason is printed), 2 a usage error.
Every command takes the settings of §1 as options too (``--data-dir``, ``--nats-url``, …).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import os
import re
import signal
import sys
import time
import types
import typing
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Iterator, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional, TypeVar

import orjson
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ops.settings import Settings

app = typer.Typer(
    name="collabbus",
    help="collabbus — an event-driven collaboration bus for networks of institutions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
institutions_app = typer.Typer(help="Membership of the network.", no_args_is_help=True)
schemas_app = typer.Typer(help="The event catalog's JSON Schemas.", no_args_is_help=True)
dlq_app = typer.Typer(help="Dead letters: events a consumer gave up on.", no_args_is_help=True)
app.add_typer(institutions_app, name="institutions")
app.add_typer(schemas_app, name="schemas")
app.add_typer(dlq_app, name="dlq")

def _width(stream: Any) -> int | None:
    """The terminal's width; piped (a log, ssh without a terminal) wide enough that tables keep
    their ids and times whole, unless COLUMNS says otherwise."""
    return None if os.environ.get("COLUMNS") or stream.isatty() else PIPED_WIDTH


PIPED_WIDTH = 160
out = Console(highlight=False, soft_wrap=True, width=_width(sys.stdout))
err = Console(stderr=True, highlight=False, soft_wrap=True, width=_width(sys.stderr))  # one message, one line

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def with_settings(func: F) -> F:
    """Give a command one option per setting (``--data-dir`` …) and pass it the resulting ``Settings``."""
    signature = inspect.signature(func, eval_str=True)
    own = [p for p in signature.parameters.values() if p.name != "settings"]
    taken = {p.name for p in own}
    extra = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, help=(field.description or f"setting COLLABBUS_{name.upper()}"), metavar=_kind_of(field.annotation),
                                 rich_help_panel="Settings (also COLLABBUS_* variables)", show_default=False),
            annotation=Optional[str],
        )
        for name, field in Settings.model_fields.items()
        if name not in taken
    ]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in Settings.model_fields and name not in taken}
        passed = {k: v for k, v in overrides.items() if v is not None}
        try:
            settings = _where_the_bus_runs(Settings(**passed), passed)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                name = str(error["loc"][0]) if error["loc"] else ""
                given = "" if name in _NOT_SHOWN or "secret" in str(Settings.model_fields.get(name, "")).lower() else \
                    f" (given: {error.get('input')!r})"
                err.print(f"[red]invalid setting:[/red] COLLABBUS_{name.upper()} (--{name.replace('_', '-')}): "
                          f"{str(error['msg']).removeprefix('Value error, ')}{given}")
            raise typer.Exit(2) from None
        return func(*args, settings=settings, **kwargs)

    wrapper.__signature__ = signature.replace(parameters=own + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in own + extra}
    return wrapper  # type: ignore[return-value]


def _where_the_bus_runs(settings: Settings, given: dict[str, Any]) -> Settings:
    """``settings`` with the addresses of the bus running on their data dir where they set none
    (``ops.datadir.announce``): a command run on the data dir of a bus started with --nats-listen
    or --http of its own finds it there, as it finds its credentials and read models."""
    from ops import datadir

    announced = datadir.running_addresses(settings.data_dir)
    found: dict[str, Any] = {name: announced[name] for name in ("nats_listen", "http")
                             if name in announced and name not in settings.model_fields_set and announced[name] != getattr(settings, name)}
    return Settings(**given, **found) if found else settings


def _on_external_nats(settings: Settings) -> str | None:
    """For a command not told the external NATS of the bus running on its data dir (it would look
    for an embedded server): what to give it, in words; None otherwise."""
    from ops import datadir

    if not settings.embedded or datadir.running_addresses(settings.data_dir).get("nats") != "external":
        return None
    return (f"the bus running on the data dir {settings.data_dir.resolve()} ({datadir.holder(settings.data_dir)}) uses an "
            "external NATS: give this command its COLLABBUS_NATS_URL and COLLABBUS_NATS_CREDS (and its "
            "COLLABBUS_DATABASE_URL, if it has one), as the bus has them")


def _listening_elsewhere(settings: Settings) -> str:
    """Where the bus on the settings' data dir listens for NATS when the settings name another
    address, in words for an error (empty otherwise)."""
    from ops import datadir

    announced = datadir.running_addresses(settings.data_dir).get("nats_listen")
    if announced is None or announced == settings.nats_listen:
        return ""
    return f": that bus listens at nats://{announced}, not where COLLABBUS_NATS_LISTEN (--nats-listen) says"


def _kind_of(annotation: Any) -> str:
    """How ``--help`` names what a setting takes (its option passes text on to ``Settings``,
    which reads and checks it): ``<int>``, ``<float>``, ``<path>``, ``<list>`` (comma-separated), ``<str>``."""
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] if optional else [annotation]
    kind = kinds[0] if kinds else str
    if typing.get_origin(kind) is list:
        return "<list>"
    return f"<{ {int: 'int', float: 'float', Path: 'path'}.get(kind, 'str') }>"


_NOT_SHOWN = frozenset({"database_url", "nats_url", "nats_public_url", "portal_url", "portal_token", "nats_account_seed"})
"""Settings whose values an error does not repeat: they may hold credentials."""


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a command's coroutine; an operation that fails prints why and exits 1."""
    from bus.server import EmbeddedServerError
    from bus.streams import JETSTREAM_ERRORS, JetStreamUnusable, StreamConfigError, jetstream_problem

    from sqlalchemy.exc import SQLAlchemyError

    try:
        return asyncio.run(coro)
    except (EmbeddedServerError, JetStreamUnusable, StreamConfigError) as exc:
        err.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    except JETSTREAM_ERRORS as exc:  # (before OSError: nats-py's timeout is one)
        err.print(f"[red]error:[/red] {escape(jetstream_problem(exc))}")
        raise typer.Exit(1) from None
    except SQLAlchemyError as exc:  # the read models' database: unreachable, refused, or a URL it cannot use
        _database_problem(exc)
    except OSError as exc:
        if exc.filename is not None and not isinstance(exc, ConnectionError):  # a file or directory, not the network
            err.print(f"[red]error:[/red] cannot use {exc.filename}: {exc.strerror or exc}. Check COLLABBUS_DATA_DIR.")
        else:
            err.print(f"[red]error:[/red] cannot reach NATS: {exc}. Is the bus running (collabbus up)?")
        raise typer.Exit(1) from None


def _database_problem(exc: Exception) -> NoReturn:
    """End a command whose read models' database cannot be used, in one line."""
    orig = getattr(exc, "orig", None)
    first = str(orig if orig is not None else exc).strip().splitlines()
    err.print(f"[red]error:[/red] the read models' database cannot be used ({type(exc).__name__}): "
              f"{first[0] if first else exc!r}. Check COLLABBUS_DATABASE_URL.")
    raise typer.Exit(1) from None


_ANSWER_IN_JSON = False
"""Whether the command running was asked for ``--json`` (backup, restore): a failure is then also
said on standard output, as ``{"error": …}``, for the script reading it."""


def _fail(message: str, *, code: int = 1) -> NoReturn:
    """End the command with ``message`` (plain text): on standard error, and as JSON on standard
    output when the command was asked for ``--json``."""
    err.print(f"[red]error:[/red] {escape(message)}")
    if _ANSWER_IN_JSON:
        out.print_json(data={"error": message})
    raise typer.Exit(code)


def _no_network_here(settings: Settings, what: str) -> NoReturn:
    """End a command run where the bus's network is not (usually: another directory than the
    bus's, whose default data dir ``./.collabbus`` is then another one)."""
    _fail(f"{what}: is {settings.data_dir.resolve()} the running bus's data dir? Run the command in the bus's project "
          "directory, or set COLLABBUS_DATA_DIR (or COLLABBUS_DATABASE_URL and COLLABBUS_NATS_CREDS) as the bus has them.")


async def _connect(settings: Settings, name: str, *, reconnect: bool = False) -> Any:
    """A connection that fails at once when NATS is not there; ``reconnect``: once made, it
    reconnects for as long as it takes (a command that follows the log across a restart of NATS)."""
    import nats

    from bus.connection import connect_options, embedded_bus_creds

    options = connect_options(settings, name)
    async def quiet(_exc: Exception) -> None:  # the failure is reported once, below
        return None

    options.update(connect_timeout=3, error_cb=quiet)
    made: list[Any] = []

    async def lost() -> None:
        if made and not made[0].is_closed:  # (not the command closing it)
            err.print(f"[yellow]lost the connection to NATS[/yellow] at {', '.join(settings.nats_servers)}: "
                      "reconnecting until it is back (the bus restarting?)")

    async def back() -> None:
        url = made[0].connected_url if made else None
        err.print(f"[green]reconnected to NATS[/green]{f' at {url.hostname}:{url.port}' if url else ''}: carrying on where it was")

    if reconnect:
        options.update(disconnected_cb=lost, reconnected_cb=back)
    else:
        options.update(max_reconnect_attempts=1, allow_reconnect=False)
    try:
        made.append(await nats.connect(**options))
        return made[0]
    except Exception as exc:  # nats-py raises several kinds here
        if "authorization" in str(exc).lower() or "authentication" in str(exc).lower():
            used = options.get("user_credentials") or options.get("nkeys_seed")
            if used is None and settings.embedded:
                what = f"no bus credentials at {embedded_bus_creds(settings)}"
            elif used is None and embedded_bus_creds(settings).exists():
                # COLLABBUS_NATS_URL naming the data dir's own embedded server: its credentials are there.
                _fail(f"NATS at {', '.join(settings.nats_servers)} refused this command (with no credentials): the data dir "
                      f"{settings.data_dir.resolve()} has the bus's credentials for its embedded server at "
                      f"{embedded_bus_creds(settings)}; set COLLABBUS_NATS_CREDS to them, or unset COLLABBUS_NATS_URL "
                      "(the embedded server is found at COLLABBUS_NATS_LISTEN)")
            else:
                what = f"with {used or 'no credentials'}"
            _no_network_here(settings, f"NATS at {', '.join(settings.nats_servers)} refused this command ({what})")
        if (external := _on_external_nats(settings)) is not None:
            _fail(external)
        raise ConnectionRefusedError(f"{', '.join(settings.nats_servers)} ({exc.__class__.__name__})") from None


@contextlib.asynccontextmanager
async def _nats(settings: Settings, name: str, *, reconnect: bool = False, fresh: bool = False) -> AsyncIterator[Any]:
    """A connection to the bus's NATS; when the embedded server is not running, it is started for
    the command (so operations work with the bus stopped) and stopped after it — where a bus has
    run (``fresh``: or not yet, for a restore): in a mistyped data dir a new network of nobody's
    would be started, and look fine."""
    from bus.connection import embedded_server, embedded_store
    from bus.server import port_is_taken

    server = held = None
    if settings.embedded and not port_is_taken(*settings.listen_host_port):
        if (external := _on_external_nats(settings)) is not None:
            _fail(external)
        if not fresh and not embedded_store(settings).exists():
            _no_network_here(settings, f"no bus has run with the data dir {settings.data_dir.resolve()} and none "
                                       f"answers at {settings.nats_servers[0]} (nothing was created)")
        from ops import datadir

        try:  # never a second nats-server on the store of a running bus
            held = datadir.lock(settings.data_dir, _this_command())
        except datadir.DataDirBusy as exc:
            elsewhere = _listening_elsewhere(settings)
            raise ConnectionRefusedError(
                f"nothing answers at {settings.nats_servers[0]}, yet {exc}" + (elsewhere or ": its nats-server is down or starting")
            ) from None
        err.print(f"[yellow]the bus is not running[/yellow]: its nats-server was started for this command ({settings.nats_servers[0]})")
        server = embedded_server(settings)
        await server.astart()
    try:
        nc = await _connect(settings, name, reconnect=reconnect and server is None)  # (its own server goes with it)
        try:
            yield nc
        finally:
            await nc.close()
    finally:
        if server is not None:
            await server.astop()
        if held is not None:
            held.close()


def _this_command() -> str:
    """The command this process runs, as an operator typed it (``collabbus dlq list``): its
    words before the first option."""
    words = ["collabbus"]
    for word in sys.argv[1:3]:
        if word.startswith("-"):
            break
        words.append(word)
    return " ".join(words)


def _type_names(*, domains: bool = False) -> set[str]:
    """The catalog's event types, and its domains (``project``) when ``domains``."""
    from schemas import registry

    return {*registry.event_types(), *(registry.domains() if domains else ())}


def _complete_type(incomplete: str) -> list[str]:
    """The event types a word being typed may become: the shell's completion of a type
    (``collabbus --install-completion``)."""
    return sorted(name for name in _type_names() if name.startswith(incomplete))


def _complete_type_or_domain(incomplete: str) -> list[str]:
    """The event types and domains a word being typed may become."""
    return sorted(name for name in _type_names(domains=True) if name.startswith(incomplete))


def _complete_member(incomplete: str) -> list[str]:
    """The members' ids a word being typed may become, read from the read models of the settings
    in the environment (``COLLABBUS_DATA_DIR`` …, not the options typed on the line); none when
    they cannot be read in a moment. It writes nothing: a data dir without a database stays
    without one."""
    import sqlite3
    import urllib.parse

    import sqlalchemy as sa

    from sqlmodel import col

    from handlers.institutions import Institution

    try:
        url = Settings().db_url
        if url.startswith("sqlite"):
            path = sa.make_url(url).database or ""
            if not Path(path).is_file():
                return []
            read_only = f"file:{urllib.parse.quote(path)}?mode=ro"
            engine = sa.create_engine("sqlite://", creator=lambda: sqlite3.connect(read_only, uri=True))
        else:
            engine = sa.create_engine(url, connect_args={"connect_timeout": 2}, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as connection:
                current = sa.select(col(Institution.id)).where(col(Institution.left_at).is_(None)).order_by(col(Institution.id))
                return [str(member) for member in connection.execute(current).scalars() if str(member).startswith(incomplete)]
        finally:
            engine.dispose()
    except Exception:  # a completion says nothing rather than fail the shell's line
        return []


def _known_type(event_type: str, hint: str, *, domains: bool = False) -> None:
    """Refuse an event type the catalog does not have (a domain such as ``project`` too, when
    ``domains``), suggesting the nearest ones."""
    known = _type_names(domains=domains)
    if event_type in known:
        return
    raise typer.BadParameter(f"unknown event type {event_type!r}; {_meant(event_type, known)}`collabbus schemas list` lists them",
                             param_hint=hint)


def _meant(word: str, known: Iterable[str], *, most: int = 3) -> str:
    """``did you mean …? `` naming the nearest of ``known`` to a word not among them, or nothing."""
    import difflib

    near = difflib.get_close_matches(word, sorted(known), n=most, cutoff=0.6)
    return f"did you mean {' or '.join(near)}? " if near else ""


async def _ever_joined(js: Any) -> set[str]:
    """Every institution the log says joined the network, those that left since included."""
    from bus.streams import EVENTS_STREAM

    state = (await js.stream_info(EVENTS_STREAM, subjects_filter="collab.events.*.institution.joined.*")).state
    return {subject.rsplit(".", 1)[-1] for subject in state.subjects or {}}


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
        hint = f" (to read the file {value}, write @{value})" if not value.startswith(("@", "-")) and Path(value).is_file() else ""
        raise typer.BadParameter(f"not valid JSON: {exc}{hint}", param_hint="--data") from None


OUTCOME_WAIT = 10.0
"""Seconds ``publish`` waits for the network to apply an accepted event before it says so."""


def _offer_and_report(
    settings: Settings, institution: str, event: dict[str, Any], *, binary: bool = False, as_json: bool, wait: bool = False
) -> None:
    """Offer one event over NATS ingress as ``institution``, print the verdict, exit 1 if refused.

    ``wait``: once accepted, wait for the network to apply it and report what became of it (a
    workflow rule may refuse it there: exit 1 then too)."""
    from bus.client import offer

    hint: list[str] = []
    """For ``--as`` naming no member: ``did you mean …? `` of the one meant among those that joined."""

    async def main() -> tuple[Any, Any, Any, bool]:
        from bus.runtime import NETWORK_CONSUMER
        from ops.dlq import Waiting

        nc = await _connect(settings, "collabbus-cli")
        try:
            verdict = await offer(nc, institution, event, binary=binary)
            if not verdict.accepted and any(problem.type == "not_member" for problem in verdict.errors):
                with contextlib.suppress(Exception):  # (the hint only: the verdict stands without it)
                    hint[:] = [_meant(institution, await _ever_joined(nc.jetstream()), most=1)]
            if not (wait and verdict.accepted and verdict.id):
                return verdict, None, None, False
            # Until it is applied — or found in the dead-letter queue: the bus could not apply it, or set it aside.
            waiting, letter = Waiting(NETWORK_CONSUMER), None
            deadline = asyncio.get_running_loop().time() + OUTCOME_WAIT
            while (found := await _outcome_of(settings, nc.jetstream(), verdict.id, 1.0)) is None:
                with contextlib.suppress(Exception):
                    letter = await waiting.find(nc.jetstream(), verdict.id)
                if letter is not None or asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.2)  # (no read models here to wait on: not a busy loop)
            return verdict, found, letter, True
        finally:
            await nc.close()

    verdict, found, letter, waited = run(main())
    if as_json:
        body = verdict.as_dict()
        if waited:
            body["outcome"] = found.as_dict() if found is not None else None
            if letter is not None:
                body["waiting"] = _waiting(letter)
        out.print_json(data=body)
    else:
        _print_verdict(verdict)
        if hint:
            err.print(f"{escape(repr(institution))} is not a member of the network (per the log): "
                      f"{escape(hint[0])}`collabbus institutions list` lists the members")
        if waited:
            _print_outcome(verdict.id, found, letter)
    if not verdict.accepted or (found is not None and found.refused):
        raise typer.Exit(1)


async def _outcome_of(settings: Settings, js: Any, event_id: str, timeout: float) -> Any:
    """What became of an accepted event once the network applied it (its refusal, what it led
    to); ``None`` when the read models did not have it within ``timeout`` seconds or cannot be read."""
    from sqlalchemy.exc import SQLAlchemyError

    from bus import log
    from handlers.bookkeeping import applied_event

    engine = _existing_read_models(settings)
    if engine is None:
        return None

    def look() -> Any:
        with engine.connect() as connection:
            return applied_event(connection, event_id)

    deadline = asyncio.get_running_loop().time() + timeout
    try:
        while True:
            try:
                applied = await asyncio.to_thread(look)
            except SQLAlchemyError:  # not migrated yet, or another machine's database: nothing to wait for
                return None
            found = await log.outcome(js, applied)
            settled = found is not None and not found.pending
            if settled or asyncio.get_running_loop().time() >= deadline:
                return found
            await asyncio.sleep(0.05)
    finally:
        engine.dispose()


def _missing_sqlite_file(settings: Settings) -> str | None:
    """The read models' SQLite file when the settings name one that does not exist, or none at
    all (in memory: another process's are out of reach), else None. Commands look at the bus's
    read models; none creates them."""
    from sqlalchemy.engine import make_url

    url = make_url(settings.db_url)
    path = url.database
    if url.get_backend_name() != "sqlite" or (path or "").startswith("file:"):
        return None
    if not path or path == ":memory:":
        return ":memory:"
    return None if Path(path).exists() else path


def _existing_read_models(settings: Settings) -> Any:
    """A read-only engine on the read models when they exist here (the bus may run elsewhere:
    a SQLite file is not created for a look), else ``None``. The caller disposes of it."""
    from handlers.db import make_engine, reading

    if _missing_sqlite_file(settings) is not None:
        return None
    return reading(make_engine(settings.db_url))


def _waiting(letter: Any) -> dict[str, Any]:
    """Why an accepted event is not applied, from its dead letter: set aside behind an earlier one
    about the same thing, or one the bus could not apply."""
    from handlers.service import PARKED

    return {"dead_letter": letter.seq, "set_aside": letter.error == PARKED,
            "waits_for": "/".join(letter.waits_for) if letter.waits_for else None, "reason": letter.reason}


def _print_outcome(event_id: str, found: Any, letter: Any = None) -> None:
    if found is None and letter is not None:
        waiting = _waiting(letter)
        if waiting["set_aside"]:
            about = f" about {escape(waiting['waits_for'].replace('/', ' '))}" if waiting["waits_for"] else ""
            out.print(f"[yellow]set aside[/yellow]: an earlier event{about} could not be applied, and this one waits behind "
                      f"it for the network's operator (dead letter #{letter.seq}: `collabbus dlq list`)")
        else:
            out.print(f"[yellow]not applied[/yellow]: the bus could not apply it ({escape(waiting['reason'])}); it waits for "
                      f"the network's operator as dead letter #{letter.seq} (`collabbus dlq show {letter.seq}`)")
        return
    if found is None:
        out.print(
            f"[yellow]not applied yet[/yellow]: the network did not apply it within {OUTCOME_WAIT:.0f} s "
            f"(is the bus running? `collabbus status`); its outcome later: GET /events/{event_id}"
        )
        return
    refusal = found.refusal
    if refusal is not None:
        seq, rejected = refusal
        reason = (rejected.get("data") or {}).get("reason") or {}
        message = reason.get("message")
        text = next(iter(message.values())) if isinstance(message, dict) and message else ""
        owner = str(rejected.get("source", "")).removeprefix("/institutions/")
        out.print(f"[red]refused[/red] by the workflow: {shown(reason.get('code', '?'))}" + (f" — {shown(text)}" if text else ""))
        out.print(f"  {shown(rejected.get('type'))} #{seq} in {shown(owner)}'s name")
    elif found.refused:
        out.print("[red]refused[/red] by the workflow (its refusal is being logged)")
    else:
        out.print(f"[green]applied[/green] #{found.seq}")
    for seq, derived in found.derived:
        if refusal is None or seq != refusal[0]:
            out.print(f"  led to {derived.get('type')} #{seq}")


def _print_verdict(verdict: Any) -> None:
    if verdict.accepted:
        dup = " (duplicate: already in the log)" if verdict.duplicate else ""
        out.print(f"[green]accepted[/green] {verdict.id} as #{verdict.seq}{dup}")
    else:
        out.print(f"[red]rejected[/red] {verdict.id or '(no id)'} ({verdict.reason})")
        for problem in verdict.errors:
            out.print(f"  {_problem_text(problem.loc, problem.msg, problem.type)}")


_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def visible(text: object) -> str:
    """``text`` with each control character written as ``\\x1b``: a terminal acts on its escapes."""
    return _CONTROLS.sub(lambda control: f"\\x{ord(control.group()):02x}", str(text))


def shown(text: object) -> str:
    """``text`` from the network (a title, a member's name, a reason) as markup that prints it as
    it is: :func:`visible`, and Rich's brackets escaped (``[/fi]`` in a name failed the whole
    listing)."""
    return escape(visible(text))


def _problem_text(loc: Any, msg: str, kind: str) -> str:
    """A problem of a rejection as ``data.title: Field required [missing]`` (markup)."""
    where = ".".join(str(part) for part in loc) or "-"
    return f"{escape(where)}: {escape(str(msg))} [dim]\\[{escape(str(kind))}][/dim]"


def _plural(count: int, word: str, words: str | None = None) -> str:
    """``1 entry``, ``2 entries``."""
    return f"{count:,} {word if count == 1 else words or word + 's'}"


# --------------------------------------------------------------------------- up


@app.command()
@with_settings
def up(
    demo: Annotated[bool, typer.Option("--demo", help="load the demo network once (see `collabbus demo`)")] = False,
    standby: Annotated[bool, typer.Option(
        "--standby", help="when another bus applies the log, wait and take over when it goes (an external NATS and a "
                          "shared PostgreSQL database)")] = False,
    *,
    settings: Settings,
) -> None:
    """Start everything: embedded NATS (unless a URL is set), streams, gatekeepers, database migrations, read
    models and workflows (the handlers), webhook dispatcher, the connectors configured, HTTP gateway. Ctrl-C
    drains and stops.

    One bus applies a log. With --standby, a bus finding another one applying it waits (judging
    NATS offers meanwhile; over HTTP alive, /healthz 200, and not ready, /readyz 503, the rest of
    the API 503) and takes over within seconds when
    that one stops or stops renewing its lease (killed, cut off from NATS); the read models,
    tokens and webhooks it takes over are in the database both use. Exits 1 when this bus loses
    the log to another while it runs."""
    from bus.lease import describe
    from bus.runtime import Bus, keep_startup_objects
    from ops import datadir
    from ops.logs import configure_logging

    configure_logging(settings.log_level, form=settings.log_format)
    if standby and settings.embedded:
        err.print("[red]error:[/red] a standby waits for another bus on a NATS both reach: set COLLABBUS_NATS_URL "
                  "(the embedded nats-server is this bus's own)")
        raise typer.Exit(2)
    if standby and settings.db_url.startswith("sqlite"):
        err.print("[red]error:[/red] a standby takes over the read models, tokens and webhooks of the bus it follows: "
                  "they must be in a database both reach (COLLABBUS_DATABASE_URL=postgresql+psycopg://…), not SQLite "
                  "in a data dir")
        raise typer.Exit(2)
    before = datadir.contents(settings.data_dir)
    try:
        held = datadir.lock(settings.data_dir, "collabbus up")
    except datadir.DataDirBusy as exc:
        err.print(f"[red]error:[/red] another collabbus is running on the data dir {settings.data_dir.resolve()} ({exc.holder}); "
                  "stop it first, or give this bus a data dir of its own (COLLABBUS_DATA_DIR)")
        raise typer.Exit(1) from None
    except OSError as exc:
        err.print(f"[red]error:[/red] the data dir {settings.data_dir} cannot be used: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    started: list[bool] = []  # (once its nats-server and streams are: a bus has run with the data dir)

    async def main() -> None:
        from connectors.http.server import HttpGateway
        from connectors.http.starting import Starting, starting_app

        bus = Bus(settings)
        stop = _stop_on_signals(again_at_once=True)
        # The address answers from the first moment, however long the start waits: alive, not ready, saying why.
        starting = Starting(nats=bus.nats_state, doing=lambda: bus.doing)
        host, port = settings.http_host_port
        listening = HttpGateway(bus, host, port, app=starting_app(starting))
        try:
            await listening.start()
        except OSError as exc:
            err.print(f"[red]error:[/red] {exc.strerror or exc} (set COLLABBUS_HTTP to another address)")
            raise typer.Exit(1) from None
        bus.http = listening  # (see Bus.start_http: the gateway is served there once the bus has started; stopped with the bus)
        # NATS, the streams, the operator (waiting while a cluster elects); offers are judged here until a gatekeeper is ready
        if not await _started(bus, bus.start(state=False), stop):
            return
        started.append(True)
        # For the commands run on this data dir (_where_the_bus_runs, _on_external_nats):
        nats = {"nats_listen": f"{bus.server.host}:{bus.server.port}"} if bus.server is not None else {"nats": "external"}
        datadir.announce(held, "collabbus up", http=f"{host}:{listening.port}", **nats)
        if standby:
            try:
                taken = await _wait_for_the_log(bus, stop, starting)
            except BaseException:
                await bus.stop()
                raise
            if not taken:
                await bus.stop()
                err.print("stopped")
                return

        async def state_and_gateway() -> None:
            await bus.start_state()
            await bus.start_http()

        async def the_rest() -> tuple[BaseException | None, BaseException | None]:
            # The gatekeeper processes start (a Python process each, loading the bus) while this one
            # migrates the read models and builds the gateway: on two cores, side by side.
            return await asyncio.gather(bus.start_gatekeepers(), state_and_gateway(), return_exceptions=True)

        try:
            finished = await _unless_stopped(the_rest(), stop)  # (it may wait: the lease, an election)
            if finished is None:
                await bus.stop()
                err.print("stopped")
                return
            for outcome in finished.result():
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException as exc:  # (the database's errors are told by `run`, once the bus has stopped)
            await bus.stop()  # the gatekeepers, the lease: a standby that took over lets it go
            if not isinstance(exc, (OSError, RuntimeError)):
                raise
            err.print(f"[red]error:[/red] {getattr(exc, 'strerror', None) or exc}")
            raise typer.Exit(1) from None
        where = f"embedded nats-server at {settings.nats_servers[0]}" if settings.embedded else ", ".join(settings.nats_servers)
        err.print(f"[bold]collabbus[/bold] is up: NATS {where}, data in {settings.data_dir.resolve()}")
        judged = f"{bus.gates.count} gatekeeper process{'es' if bus.gates.count > 1 else ''}" if bus.gates else "this process"
        err.print(f"  operator: {settings.operator} · ingress: collab.ingress.{{institution}}.{{domain}}.{{event}}, judged by {judged}")
        err.print(f"  HTTP gateway: {bus.http.url} (docs at {bus.http.url}/docs)")
        err.print("  Ctrl-C to stop")
        keep_startup_objects()
        loading = asyncio.create_task(_load_demo(settings, bus)) if demo else None
        portal = asyncio.create_task(_run_portal(settings, bus, stop)) if settings.portal_url else None
        lost = False
        try:
            lost = await _until_stopped_or_lost(stop, bus.lost_lease)
            # Taken over by a rebuild (--force), or taken and let go again (its key deleted: a rebuild
            # that finished before this bus's next renewal, say): applied again once the lease is free.
            while lost and (not bus.lost_to or bus.lost_to.get("role") == "rebuild"):
                if bus.lost_to:
                    err.print(f"{describe(bus.lost_to)} took the log over (--force): this bus stopped applying it, "
                              "and applies it again once the rebuild has finished")
                else:
                    err.print("the log was taken over from this bus and let go again (by a rebuild with --force, say): "
                              "this bus applies it again, from where the read models are")
                resumed = await _unless_stopped(bus.resume_after_rebuild(), stop)
                if resumed is None:
                    lost = False
                    break
                resumed.result()
                err.print("the rebuild has finished: this bus applies the log again")
                lost = await _until_stopped_or_lost(stop, bus.lost_lease)
        finally:
            if portal is not None:  # safe mid-page: the cursor is stored per page and event ids are deterministic
                portal.cancel()
                await asyncio.gather(portal, return_exceptions=True)
            if loading is not None and not loading.done():
                loading.cancel()
                await asyncio.gather(loading, return_exceptions=True)
            err.print("draining… (Ctrl-C again stops at once)")
            await bus.stop()
            err.print("stopped")
        if lost:
            err.print("[red]error:[/red] another bus took over the log while this one could not renew its lease "
                      "(stalled, or cut off from NATS); this one stopped applying it. Start it with --standby to "
                      "follow the other")
            raise typer.Exit(1)

    try:
        run(main())
    finally:
        if started:
            held.close()
        else:  # (stopped, or failed, before its nats-server and streams were there: the data dir is as it was)
            datadir.take_back(held, settings.data_dir, before)


async def _started(bus: Any, starting: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Start ``bus`` (``starting``, one of its start methods) unless Ctrl-C or SIGTERM comes first —
    a start can wait for JetStream (a cluster electing) — and stop what it started then, or when
    it failed (which is raised); False when stopped first."""
    started = await _unless_stopped(starting, stop)
    if started is not None and started.exception() is None:
        return True
    await bus.stop()
    if started is None:
        err.print("stopped")
        return False
    started.result()  # (raises what starting raised)
    return False


async def _wait_for_the_log(bus: Any, stop: asyncio.Event, starting: Any) -> bool:
    """``up --standby``: hold the lease by which one bus applies the log, waiting for as long as
    another holds it, its address saying so (``starting``: ``connectors.http.starting.Starting``);
    False when stopped first."""
    from bus.lease import BUCKET, Standby, describe
    from connectors.http.operations import database_check
    from handlers.db import make_engine

    def waiting(holder: dict[str, Any]) -> None:
        starting.applying = describe(holder)
        err.print(f"standby: {starting.applying} applies the log; this bus judges NATS offers and takes over when it goes "
                  f"(meanwhile http://{bus.settings.http}/healthz is 200, /readyz 503)")

    database = make_engine(bus.settings.db_url)  # for /readyz only: the read models start at the takeover
    starting.applying, starting.database = "another bus", lambda: database_check(database)
    announced = Standby(bus.js, bus.consumer_settings.name, str(bus.settings.data_dir.resolve()),
                        replicas=bus.settings.stream_replicas)  # for `collabbus status`
    async def stand_by() -> None:  # (what an election begun meanwhile leaves unanswered is waited through)
        leases = [f"KV_{BUCKET}"]
        await bus.through_elections(leases, "announcing this standby", announced.start)
        await bus.through_elections(leases, "standing by for the lease", lambda: bus.take_lease(patience=None, on_wait=waiting))

    try:
        taken = await _unless_stopped(stand_by(), stop)
        if taken is not None:
            taken.result()  # (raises what taking it raised)
    finally:
        starting.applying = starting.database = None  # taken over: "starting" until the read models run, then the gateway
        await announced.stop()
        database.dispose()
    return taken is not None


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> "asyncio.Task[T] | None":
    """Run ``work`` until it ends or ``stop`` is set, when it is cancelled: its task once it ended
    (``result()`` raises what it raised), None when stopped first."""
    working = asyncio.create_task(work)
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({working, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    if working.done():
        return working
    working.cancel()
    await asyncio.gather(working, return_exceptions=True)
    return None


async def _until_stopped_or_lost(stop: asyncio.Event, lost: asyncio.Event) -> bool:
    """Wait for Ctrl-C/SIGTERM or for the bus to lose the log to another; True for the latter."""
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(lost.wait())]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
    return lost.is_set()


def _stop_on_signals(*, again_at_once: bool = False) -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM: a long-running command drains and stops when it is.
    ``again_at_once``: a second signal ends the process there and then (exit 130), as a kill would —
    for a bus whose drain an operator will not wait for; the log, the read models and the
    consumers are made to survive that (its nats-server and gatekeepers stop with it)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def signalled() -> None:
        if again_at_once and stop.is_set():
            err.print("stopped at once (a second signal): nothing more was drained")
            os._exit(130)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled)
    return stop


async def _run_portal(settings: Settings, bus: Any, stop: asyncio.Event) -> None:
    """``up`` with ``COLLABBUS_PORTAL_URL``: the portal connector, every ``COLLABBUS_PORTAL_INTERVAL`` s."""
    from connectors.portal.connector import Passes, from_settings, push_decisions, sync_periodically
    from connectors.webhooks.targets import RefusedTarget

    try:
        sync = await from_settings(settings, bus.gate, bus.engine, traced_entries=settings.portal_traced_entries)
    except RefusedTarget as exc:
        err.print(f"[red]portal:[/red] {exc}")
        return
    if bus.tracing is not None:
        bus.tracing.instrument_httpx(sync.client.http)  # portal calls as client spans
    err.print(f"  portal connector: {settings.portal_url} every {settings.portal_interval:g} s")
    bus.portal_passes = passes = Passes(portal=sync.client.where)
    try:
        await asyncio.gather(sync_periodically(sync, settings.portal_interval, stop, on_report=passes.note),
                             push_decisions(bus.js, sync, stop))
    finally:
        await sync.client.aclose()


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


@app.command()
@with_settings
def gate(*, settings: Settings) -> None:
    """Run a gatekeeper alone: judge offers from NATS ingress (queue group collabbus-gate) and log
    the accepted ones, on a bus another process runs. `up` starts COLLABBUS_GATE_PROCESSES of these."""
    from bus.gates import READY_LINE
    from bus.runtime import Bus, keep_startup_objects
    from ops.logs import configure_logging

    configure_logging(settings.log_level, form=settings.log_format)

    async def main() -> None:
        bus = Bus(settings)
        stop = _stop_on_signals()
        if not await _started(bus, bus.start_gatekeeper(), stop):
            return
        keep_startup_objects()
        sys.stdout.buffer.write(READY_LINE + b"\n")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await bus.stop()

    run(main())


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
    """Publish the demo network (institutions and stories from the reports behind the project, README) through the public
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
    event_type: Annotated[str, typer.Argument(metavar="TYPE", help="event type, e.g. project.registered",
                                              autocompletion=_complete_type)],
    as_: Annotated[str, typer.Option("--as", help="the publishing institution's id", autocompletion=_complete_member)],
    data: Annotated[str, typer.Option(help="the data: @file.json, - for standard input, or inline JSON")],
    subject: Annotated[Optional[str], typer.Option(help="the aggregate id; default: taken from the data")] = None,
    event_id: Annotated[Optional[str], typer.Option("--id", help="event id; default: a new UUID")] = None,
    correlation_id: Annotated[Optional[str], typer.Option(help="conversation the event belongs to")] = None,
    causation_id: Annotated[Optional[str], typer.Option(help="the event that caused this one")] = None,
    binary: Annotated[bool, typer.Option(help="send in binary mode (ce- headers)")] = False,
    wait: Annotated[bool, typer.Option(help="once accepted, wait for the network to apply it and report what became of it")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict (and its outcome) as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Publish one event through the gatekeeper; prints accepted or rejected with reasons, then
    (unless --no-wait) whether the network applied it or a workflow rule refused it, and what it
    led to. Exits 1 when it is rejected or refused."""
    from schemas import registry

    _known_type(event_type, "TYPE")
    payload = _load_data(data)
    if subject is None and isinstance(payload, dict):
        field = registry.spec_for(event_type).subject_field
        subject = str(payload.get(field)) if payload.get(field) is not None else None
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

    _offer_and_report(settings, as_, event, binary=binary, as_json=as_json, wait=wait)


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
        if key == "reason" and isinstance(data.get(key), dict) and data[key].get("code"):  # a refusal's
            return f"reason={data[key]['code']}"
    return ""


def _render_line(logged: Any) -> str:
    event = logged.event
    institution = str(event.get("source", "")).removeprefix("/institutions/")
    time = str(event.get("time", ""))[:19].replace("T", " ")
    summary = _summary(event)
    return (
        f"[dim]#{logged.seq:<6}[/dim] {shown(time)}  [bold cyan]{shown(event.get('type', '?')):<40}[/bold cyan] "
        f"{shown(institution)} → {shown(event.get('subject', ''))}" + (f"  [italic]{shown(summary)}[/italic]" if summary else "")
    )


@app.command()
@with_settings
def tail(
    event_type: Annotated[Optional[str], typer.Option("--type", help="a type (project.registered) or domain (project)",
                                                      autocompletion=_complete_type_or_domain)] = None,
    institution: Annotated[Optional[str], typer.Option(help="only events of this institution", autocompletion=_complete_member)] = None,
    subject: Annotated[Optional[str], typer.Option(help="only events about this aggregate")] = None,
    since: Annotated[str, typer.Option(help="all, new, a sequence number, a duration (10m, 2h) or an RFC 3339 time")] = "new",
    count: Annotated[Optional[int], typer.Option(help="stop after this many events")] = None,
    follow: Annotated[bool, typer.Option(help="keep following new events")] = True,
    as_json: Annotated[bool, typer.Option("--json", help='a line per event (JSON Lines): {"seq": its place in the log, "event": the canonical event}')] = False,
    *,
    settings: Settings,
) -> None:
    """Follow the event log live, readable."""
    from bus import log
    from nats.js.api import DeliverPolicy  # noqa: F401  (validated below)
    from nats.js.errors import NotFoundError

    try:
        log.parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from None
    if event_type is not None:  # a typo would follow nothing, silently
        _known_type(event_type, "--type", domains=True)
    subject_filter = log.event_filter(event_type, institution, subject)

    async def main() -> None:
        seen = 0
        # With the bus stopped its log is read all the same (after an incident, say): ``_nats``
        # starts the embedded server for the command.
        async with _nats(settings, "collabbus-tail", reconnect=follow) as nc:  # (across a restart of the bus's NATS)
            if institution is not None and institution not in (joined := await _ever_joined(nc.jetstream())):
                raise typer.BadParameter(f"{institution!r} is not a member of the network and never was (per the log): it has "
                                         f"no events to follow; {_meant(institution, joined)}`collabbus institutions list` "
                                         "lists the members", param_hint="--institution")
            # Closed before the connection: its subscription ends while the connection still can.
            def unreadable(seq: int, why: str) -> None:
                err.print(f"[yellow]#{seq} is not an event[/yellow] ({escape(why[:200])}); the consumers dead-letter it")

            reading = log.read(nc.jetstream(), subject_filter, since=since, follow=follow, on_unreadable=unreadable)
            async with contextlib.aclosing(reading) as events:
                async for logged in events:
                    if as_json:
                        sys.stdout.write(orjson.dumps({"seq": logged.seq, "event": logged.event}).decode() + "\n")
                        sys.stdout.flush()
                    else:
                        out.print(_render_line(logged))
                    seen += 1
                    if count is not None and seen >= count:
                        return

    try:
        run(main())
    except KeyboardInterrupt:
        pass
    except NotFoundError:
        err.print("[red]error:[/red] no event log here yet: the bus has never run with this data dir and NATS "
                  f"({settings.data_dir}); start it once (collabbus up)")
        raise typer.Exit(1) from None


# --------------------------------------------------------------------------- rebuild


@app.command()
@with_settings
def rebuild(
    projection: Annotated[Optional[str], typer.Option(help="the consumer group to rebuild (network)")] = None,
    force: Annotated[bool, typer.Option(help="rebuild even while a bus applies the log: the rebuild takes the log over "
                                              "from it, and it applies the log again once the rebuild has finished")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    held_rows: Annotated[Optional[int], typer.Option(
        "--held-rows", min=1000, show_default=False,
        help="read-model rows kept in memory between batches, by each process (default 50,000, ~100 MB each); fewer on a small "
             "machine, at some cost in speed")] = None,
    processes: Annotated[Optional[int], typer.Option(
        "--processes", min=1, show_default=False,
        help="processes replaying the domains side by side (default: one per core this process may run on, up to 3, the lanes there are); "
             "1 replays everything in this one")] = None,
    *,
    settings: Settings,
) -> None:
    """Drop the read models and replay them from the log, with a progress bar: the domains side by
    side in a process each (--processes), the log read by one more."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from bus.gates import usable_cores
    from bus.rebuild import Lanes
    from bus.rebuild import rebuild as replay
    from bus.connection import connect_options
    from bus.lease import Lease, LogHeld, describe, holder_of
    from bus.runtime import NETWORK_CONSUMER, keep_startup_objects
    from bus.streams import EVENTS_STREAM
    from handlers.db import make_engine, migrate
    from handlers.routes import REBUILD_LANES, network, rebuild_lanes
    from handlers.service import REBUILD_HELD_ROWS, NetworkService
    from ops import dlq

    if projection not in (None, NETWORK_CONSUMER):
        raise typer.BadParameter(f"unknown projection {projection!r}; the consumer groups are: {NETWORK_CONSUMER}", param_hint="--projection")

    if processes is not None and processes > len(REBUILD_LANES):
        raise typer.BadParameter(f"the domains are replayed in {len(REBUILD_LANES)} processes at most", param_hint="--processes")
    lane_count = processes or min(len(REBUILD_LANES), usable_cores())

    rows = held_rows or REBUILD_HELD_ROWS
    lanes = Lanes(rebuild_lanes(lane_count), settings.data_dir / ".rebuild", rows) if lane_count > 1 else None

    lost: list[dict[str, Any]] = []  # the bus that took the log over while the rebuild could not renew its lease
    dead_letters: list[int] = []  # the read models' dead letters still in the queue after the rebuild

    async def main() -> Any:
        command = asyncio.current_task()
        assert command is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, command.cancel)  # ended as by Ctrl-C
        lease: Lease | None = None
        try:
            async with _nats(settings, "collabbus-rebuild") as nc:
                js = nc.jetstream()
                if lanes is not None:
                    lanes.start()  # the other lanes' processes start up while the bus is looked for and the schema checked
                if not force and await _consumer_active(js, EVENTS_STREAM, NETWORK_CONSUMER):
                    err.print("[red]error:[/red] a running bus is consuming the log; stop it (Ctrl-C on collabbus up) "
                              "before a rebuild, or pass --force")
                    raise typer.Exit(1)
                # Held while the read models are replayed: a bus starting meanwhile waits or refuses.
                # With --force it is taken from a bus that holds it, which then stops applying the
                # log rather than apply it beside the rebuild, and applies it again afterwards.
                def stop_rebuilding(holder: dict[str, Any]) -> None:
                    lost.append(holder)
                    command.cancel()

                holder = await holder_of(js, NETWORK_CONSUMER) if force else None
                lease = Lease(js, NETWORK_CONSUMER, data_dir=str(settings.data_dir.resolve()), role="rebuild",
                              replicas=settings.stream_replicas, on_lost=stop_rebuilding)
                try:
                    await lease.take(patience=1.0, force=force)
                except LogHeld as exc:
                    lease = None
                    err.print(f"[red]error:[/red] {describe(exc.holder)} applies the log; stop it (Ctrl-C on "
                              "collabbus up) before a rebuild, or pass --force")
                    raise typer.Exit(1) from None
                if holder is not None and holder.get("renewing"):
                    err.print(f"[yellow]took the log over from {describe(holder)}[/yellow]: it stops applying the log "
                              "and applies it again once the rebuild has finished")
                try:
                    engine = make_engine(settings.db_url)
                    await asyncio.to_thread(migrate, engine)
                    service = NetworkService(engine, network(lanes.domains[0] if lanes else None), held_rows=rows)
                    keep_startup_objects()
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

                        reader = connect_options(settings, "collabbus-rebuild-reader")
                        report = await replay(js, service, connect=reader, progress=progress, lanes=lanes)
                    engine.dispose()
                    # What it could not apply waits for the operator in the dead-letter queue, as the
                    # consumer leaves it: the read models lack it until `dlq replay` applies it.
                    report.dead_lettered = await dlq.dead_letter_failures(js, report.failures, NETWORK_CONSUMER)
                    dead_letters[:] = [(await dlq.counts(js)).get(NETWORK_CONSUMER, 0)]
                    return report
                finally:
                    if lease is not None:  # (before the connection closes)
                        await lease.release()
        finally:
            if lanes is not None:
                lanes.close()  # (also when the bus is running, or the schema could not be brought up to date)

    try:
        report = run(main())
    except (KeyboardInterrupt, asyncio.CancelledError) as stopped:  # Ctrl-C, SIGTERM (main's ``finally`` has ended the lanes)
        # What the read models say, not how far the replay was seen to get: with lanes, the first
        # lane can have read the whole log while the others' rows are not in.
        if lost:
            err.print(f"[red]error:[/red] {describe(lost[0])} took over the log while the rebuild could not renew its "
                      "lease (stalled for 5 s); the rebuild stopped. Stop that bus, then rebuild again")
            _rebuild_interrupted(settings)
            raise typer.Exit(1) from None
        _rebuild_interrupted(settings)
        raise typer.Exit(130 if isinstance(stopped, KeyboardInterrupt) else 128 + signal.SIGTERM) from None
    if as_json:  # (dead_letters: the read models' still in the queue)
        out.print_json(data={**report.as_dict(), "dead_letters": dead_letters[0] if dead_letters else 0})
    else:
        out.print(f"rebuilt the read models from {report.events} events in {report.seconds:.1f} s "
                  f"({report.rate:,.0f} events/s), up to #{report.last_seq}")
        if report.lanes:
            out.print(f"  [dim]in {len(report.lanes)} processes side by side: "
                      + "; ".join(f"{', '.join(lane['domains'])} ({lane['events']:,} events)" for lane in report.lanes) + "[/dim]")
        if report.rows_let_go:
            out.print(f"  [dim]it kept up to {report.held_rows:,} read-model rows in memory and let {report.rows_let_go:,} "
                      "go on the way (--held-rows)[/dim]")
        for failure in report.failures:
            out.print(f"  [red]failed[/red] #{failure['seq']} {failure['id']}: {failure['error']}")
        if report.dead_lettered:
            out.print(f"  [yellow]{report.dead_lettered} event{'s' if report.dead_lettered != 1 else ''} it could not apply "
                      f"{'are' if report.dead_lettered != 1 else 'is'} in the dead-letter queue[/yellow]: the read models lack "
                      "them until `collabbus dlq replay --consumer network` applies them (once what failed is mended)")
        if dead_letters and dead_letters[0]:
            count = dead_letters[0]
            out.print(f"  [yellow]the dead-letter queue still holds {count:,} of the read models' dead letter{'s' if count != 1 else ''}"
                      "[/yellow]: the rebuild applied the log in its order, those events included (any it could not apply are "
                      "named above); `collabbus dlq replay --consumer network` removes the ones applied (each is applied once)")
    if report.failures:
        raise typer.Exit(1)


def _copy_progress(as_json: bool) -> Any:
    """A progress display of what a backup or restore copies, by item, in bytes (on stderr)."""
    from rich.progress import DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

    return Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), DownloadColumn(), TransferSpeedColumn(),
                    console=err, disable=as_json, transient=False)


def _progress_callback(bar: Any) -> Any:
    tasks: dict[str, Any] = {}

    def progress(item: str, copied: int) -> None:
        if item not in tasks:
            for earlier in tasks.values():
                bar.update(earlier, total=bar.tasks[earlier].completed)
            tasks[item] = bar.add_task(item, total=None)
        bar.update(tasks[item], completed=copied)

    return progress


@app.command()
@with_settings
def backup(
    target: Annotated[Path, typer.Argument(help="a new directory to write the backup into")],
    check: Annotated[bool, typer.Option("--check", help="have NATS verify every stored message's checksum first "
                                                          "(slower; a damaged log is refused, not copied)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print what was backed up as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Back the network up: the log and the dead letters (JetStream snapshots), the SQLite read
    models (webhook endpoints, tokens and the portal connector's state are only there) and the
    embedded server's keys. Runs while the bus runs. The backup holds secrets: keep it so."""
    from bus.connection import embedded_store
    from bus.credentials import Authority
    from ops import backup as copies

    global _ANSWER_IN_JSON
    _ANSWER_IN_JSON = as_json
    if settings.embedded and not embedded_store(settings).is_dir():
        _no_network_here(settings, f"no embedded nats-server store at {embedded_store(settings)}")
    auth_dir = embedded_store(settings) / Authority.DIRECTORY if settings.embedded else None

    async def main() -> Any:
        async with _nats(settings, "collabbus-backup") as nc:
            with _copy_progress(as_json) as bar:
                return await copies.back_up(nc, target, network=settings.operator, db_url=settings.db_url,
                                            auth_dir=auth_dir, progress=_progress_callback(bar), check=check)

    try:
        manifest = run(main())
    except copies.BackupError as exc:
        _fail(str(exc))
    copies.note_done(settings.data_dir, target, manifest)
    if as_json:
        out.print_json(data=manifest.as_dict())
        return
    for stream in manifest.streams:
        span = f" (#{stream.first_seq}–#{stream.last_seq})" if stream.messages else ""
        out.print(f"{stream.name}: {stream.messages:,} messages{span}, {stream.consumers} consumers, {stream.bytes:,} bytes")
    database = manifest.database
    if database.get("file"):
        out.print(f"read models: {database['file']}, {database['bytes']:,} bytes")
    else:
        out.print(f"[yellow]read models:[/yellow] not copied: they are in {database.get('kind')}; back that database up "
                  "with its own tools, before this backup (the log must hold all it applied)")
    if manifest.auth:
        out.print("the embedded server's keys: copied (members' credentials stay valid after a restore)")
    out.print(f"backed up into {target} — it holds secrets; `collabbus restore {target}` puts it into a new data dir")


@app.command()
@with_settings
def restore(
    source: Annotated[Path, typer.Argument(help="a directory `collabbus backup` wrote")],
    as_json: Annotated[bool, typer.Option("--json", help="print what was restored as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Restore a backup into a new data dir (or a NATS without the network's streams): the log,
    the dead letters, the read models and the embedded server's keys. Every file is checked
    against the backup's checksums first, and a restore that fails is undone. Start the bus on it
    after: it applies whatever the log holds past the read models' copy."""
    import shutil

    from bus.connection import embedded_store
    from bus.credentials import Authority
    from bus.server import port_is_taken
    from ops import backup as copies

    global _ANSWER_IN_JSON
    _ANSWER_IN_JSON = as_json
    try:
        manifest = copies.read_manifest(source)
        copies.check_database_target(source, settings.db_url)  # before anything is written
        if settings.embedded and port_is_taken(*settings.listen_host_port):
            raise copies.BackupError(f"something listens at {settings.nats_listen} already (a running bus?): restore "
                                     "into a data dir no bus runs on, then start it")
        with _copy_progress(as_json) as bar:
            verified = copies.verify(source, manifest, _progress_callback(bar))
        auth_dir = embedded_store(settings) / Authority.DIRECTORY if settings.embedded else None
        auth_placed = copies.place_auth(source, auth_dir) if auth_dir is not None else False
    except copies.BackupError as exc:
        _fail(str(exc))

    async def main() -> tuple[dict[str, Any], Path | str | None]:
        async with _nats(settings, "collabbus-restore", fresh=True) as nc:
            there = await copies.existing_streams(nc)
            if there:
                raise copies.BackupError(f"this NATS has the network's streams already ({', '.join(there)}): restore "
                                         "into a new data dir, or a NATS without them")
            with _copy_progress(as_json) as bar:
                return await copies.restore_all(nc, source, manifest, settings.db_url, _progress_callback(bar))

    try:
        states, database = run(main())
    except BaseException as exc:
        if auth_placed and auth_dir is not None:  # the restore is undone: it can be run again
            shutil.rmtree(auth_dir, ignore_errors=True)
        if isinstance(exc, copies.BackupError):
            _fail(str(exc))
        raise
    report = {"source": str(source), "created_at": manifest["created_at"], "streams": states,
              "database": str(database) if database else None, "auth": auth_placed, "verified": verified}
    if as_json:
        out.print_json(data=report)
        return
    for name, state in states.items():
        span = f" (#{state.get('first_seq', 0)}–#{state.get('last_seq', 0)})" if state.get("messages") else ""
        out.print(f"{name}: {state.get('messages', 0):,} messages{span}")
    if not verified:
        out.print("[yellow]checksums:[/yellow] none in the backup's manifest (made by an older collabbus): its files "
                  "were not checked before the restore")
    out.print(f"read models: {database}" if database else
              "[yellow]read models:[/yellow] none in the backup: restore their database's own backup (pg_dump) now; "
              "without one, `collabbus rebuild` makes the read models from the log, but webhook endpoints, tokens "
              "and the portal connector's state were only in the database")
    if auth_placed:
        out.print("the embedded server's keys: restored")
    out.print(f"restored the backup of {manifest['created_at']}; start the bus on it (collabbus up)")


def _rebuild_interrupted(settings: Settings) -> None:
    """Tell the operator what an interrupted rebuild left: read models up to some point of the log."""
    from handlers.bookkeeping import ConsumerPosition, read_position

    engine = _existing_read_models(settings)
    position = None
    if engine is not None:
        try:
            with engine.connect() as connection:
                position = read_position(connection, ConsumerPosition.__table__, "network")  # type: ignore[attr-defined]
        except Exception:  # nothing more to say than that it stopped
            pass
        finally:
            engine.dispose()
    where = f"the log up to #{position}" if position else "part of the log"
    err.print(f"[yellow]rebuild interrupted[/yellow]: the read models hold {where}. Run `collabbus rebuild` "
              "again to replay it all, or start the bus: it applies the rest of the log (what the read models "
              "hold already, once: from their position on, the events of another lane of the rebuild too).")


async def _consumer_active(js: Any, stream: str, name: str) -> bool:
    """True when some process is applying the durable consumer right now (as a bus starting
    looks: :func:`bus.consumer.claim_consumer`, waiting no longer than a second)."""
    from bus.consumer import ConsumerBusy, claim_consumer

    try:
        await claim_consumer(js, stream, name, patience=1.0)
    except ConsumerBusy:
        return True
    return False


# --------------------------------------------------------------------------- status


@app.command()
@with_settings
def status(
    as_json: Annotated[bool, typer.Option("--json", help="print the status as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Streams, consumers and their lag, dead letters, the read models' position, webhook endpoints.
    Exits 1 when the read models' database cannot be read."""
    from bus.server import port_is_taken
    from bus.streams import JETSTREAM_ERRORS, jetstream_problem
    from ops import datadir
    from ops.status import collect_status, read_consumer_state, read_portal_state

    async def main() -> dict[str, Any]:
        engine = _existing_database(settings)
        stopped = settings.embedded and not port_is_taken(*settings.listen_host_port)  # (its server is started for this)
        try:
            async with _nats(settings, "collabbus-status") as nc:
                report = await collect_status(nc.jetstream(), engine, data_dir=settings.data_dir)
        except ConnectionRefusedError as exc:  # (a report still, for a script: what could not be read, and why)
            held = datadir.holder(settings.data_dir) if settings.embedded else None
            why = (f"the bus holds its data dir ({held}) but its NATS does not answer at {settings.nats_servers[0]}"
                   + (_listening_elsewhere(settings) or " (stopped, overloaded?)") if held and "collabbus up" in held
                   else f"cannot reach NATS: {exc}. Is the bus running (collabbus up)?")
            return {"bus_running": True if held and "collabbus up" in held else None, "error": why}
        except JETSTREAM_ERRORS as exc:
            return {"bus_running": None, "error": jetstream_problem(exc)}
        finally:
            if engine is not None:
                engine.dispose()
        # Running: a bus on this data dir keeps its consumer state fresh; any bus's consumers keep a
        # pull request open (not between one expiring and the next, so that alone can miss it).
        waiting_on = None if stopped else read_consumer_state(settings.data_dir)
        report["bus_running"] = not stopped and (waiting_on is not None or any(c["waiting"] for c in report["consumers"].values()))
        for name, state in (waiting_on or {}).items():  # what the running bus's consumers wait on, as /ops/status says
            if name in report["consumers"] and isinstance(state, dict):
                report["consumers"][name].update(retrying=state.get("retrying"), holding=state.get("holding"))
        if not stopped and (portal := read_portal_state(settings.data_dir)) is not None:
            report["portal"] = portal
        return report

    report = run(main())
    if "error" in report:  # nothing read: the reason, for people and (with --json) for scripts
        err.print(f"[red]error:[/red] {escape(report['error'])}")
        if as_json:
            out.print_json(data=report)
        raise typer.Exit(1)
    if as_json:
        out.print_json(data=report)
    else:
        _render_status(report)
    if "error" in report.get("database", {}):  # for scripts and health checks: not a healthy report
        raise typer.Exit(1)


def _render_portal(report: dict[str, Any]) -> None:
    """The portal connector's passes (a running bus's) and what the database holds of each sync."""
    passes = report.get("portal")
    if passes is not None:
        where = f"portal sync ({escape(passes['portal'])})"
        if not passes["passes"]:
            out.print(f"{where}: no pass ended yet since the bus started")
        else:
            last = _in_utc(passes["last_pass_at"])
            if passes["last_stopped"]:
                out.print(f"[red]{where}: the last pass, at {last}, stopped: {escape(passes['last_error'] or '')}[/red] (the next "
                          f"resumes from the last page stored; the last complete pass: {_in_utc(passes['last_complete_at']) or 'none yet'})")
            else:
                out.print(f"{where}: the last pass complete, at {last}")
            out.print(f"  {_plural(passes['passes'], 'pass', 'passes')} since the bus started, {passes['stopped']} stopped; "
                      f"{_plural(passes['rejected'], 'entry', 'entries')} rejected"
                      + (f" ([yellow]{passes['last_rejected']} by the last pass[/yellow]: collabbus portal sync lists them)"
                         if passes["last_rejected"] else ""))
    for portal in report.get("database", {}).get("portals") or ():
        failing = portal["publications_failing"]
        out.print(f"portal {escape(portal['portal'])}: {_plural(portal['entries'], 'entry', 'entries')} synced, the newest change "
                  f"read {escape(portal['high_water'] or 'none yet')}, the last page stored at {_in_utc(portal['saved_at'])}"
                  + (" (a paged read under way)" if portal["reading"] else "")
                  + (f"; {_plural(portal['publications'], 'project')} published"
                     + (f", [yellow]{failing} whose last push failed[/yellow]" if failing else "") if portal["publications"] else ""))


def _existing_database(settings: Settings) -> Any:
    """An engine for the read models, unless they are a SQLite file that does not exist (a report
    must not create one)."""
    from handlers.db import make_engine

    if _missing_sqlite_file(settings) is not None:
        return None
    return make_engine(settings.db_url)


def _render_status(report: dict[str, Any]) -> None:
    streams = Table("stream", "messages", "bytes", "first #", "last #", "replicas", title="streams", title_justify="left")
    for name, stream in report["streams"].items():
        if stream is None:
            streams.add_row(name, "[red]missing[/red]", "", "", "", "")
        else:
            replicas = str(stream["replicas"])
            if stream["replicas_behind"]:  # (a copy offline or not caught up: one more lost and the log may stop)
                replicas = (f"[yellow]{stream['replicas_current']} of {stream['replicas']} current"
                            f" ({', '.join(stream['replicas_behind'])} behind)[/yellow]")
            streams.add_row(name, f"{stream['messages']:,}", f"{stream['bytes']:,}", str(stream["first_seq"]),
                            str(stream["last_seq"]), replicas)
    out.print(streams)
    positions = report.get("database", {}).get("positions", {})
    consumers = Table("consumer", "pending", "unacked", "redelivered", "waiting", "last #", "db #", "dlq",
                      title="consumers", title_justify="left")
    for name, consumer in report["consumers"].items():
        lag = consumer["pending"] + consumer["ack_pending"]
        consumers.add_row(
            escape(name), f"[{'yellow' if lag else 'green'}]{consumer['pending']:,}[/]", f"{consumer['ack_pending']:,}",
            f"{consumer['redelivered']:,}", str(consumer["waiting"]), f"#{consumer['last_delivered']}",
            f"#{positions[name]['seq']}" if name in positions else "",
            str(report["dead_letters"].get(name, 0)),
        )
    out.print(consumers)
    from bus.lease import describe

    if report.get("applied_by"):
        holder = report["applied_by"]
        if holder.get("renewing"):
            out.print(f"log applied by {escape(describe(holder))}")
        else:
            out.print(f"[yellow]log last applied by {escape(describe(holder))}, which no longer renews its lease "
                      f"(last at {escape(str(holder.get('renewed_at')))}): it is not running, and the next bus to start "
                      "takes over[/yellow]")
    for standby in report.get("standbys") or ():
        out.print(f"standby: {escape(describe(standby))}, waiting to take over")
    for name, consumer in report["consumers"].items():
        if consumer.get("holding"):
            out.print(f"[red]{escape(name)} is {escape(consumer['holding'])}[/red]")
        if consumer.get("retrying"):
            out.print(f"[yellow]{escape(name)}: {escape(consumer['retrying'])}[/yellow]")
    others = {k: v for k, v in report["dead_letters"].items() if k not in report["consumers"]}
    if others:
        out.print("dead letters of other senders: " + ", ".join(f"{escape(k)} {v}" for k, v in others.items()))
    database = report.get("database")
    if database is None:
        out.print("database: none yet (the bus has not run with these settings)")
    elif "error" in database:
        out.print(f"database {escape(database['url'])}: [red]{escape(database['error'])}[/red]")
    else:
        behind = ", ".join(f"{escape(k)} at #{v['seq']} ({v['behind']} behind)" for k, v in positions.items()) or "nothing applied yet"
        out.print(f"database {escape(database['url'])}: {behind}")
        set_aside = database.get("set_aside") or []
        for thing in set_aside[:SET_ASIDE_SHOWN]:
            out.print(f"[yellow]set aside: {escape(thing['domain'])} {escape(thing['subject'])} behind #{thing['behind']}[/yellow] "
                      f"({escape(thing['consumer'])}: its later events wait in the dead-letter queue, the last #{thing['last']}; "
                      "collabbus dlq list, replay)")
        if len(set_aside) > SET_ASIDE_SHOWN:
            out.print(f"[yellow]… and {len(set_aside) - SET_ASIDE_SHOWN:,} more things set aside[/yellow] (status --json lists "
                      "them all; collabbus dlq list)")
        if unsearched := database.get("search_unindexed"):
            from handlers.words import trigram_statements

            out.print(f"[yellow]search: no index of {', '.join(unsearched)}[/yellow] (pg_trgm could not be had when they were "
                      "migrated: each ?q= reads every row). A superuser indexes them with: "
                      + escape("; ".join(["CREATE EXTENSION IF NOT EXISTS pg_trgm", *trigram_statements(unsearched)])))
        outbox = database.get("outbox")
        if outbox and outbox["waiting"]:
            out.print(f"[yellow]outbox: {outbox['waiting']} derived event(s) not logged yet, the oldest since "
                      f"{(outbox['oldest'] or '')[:19]}[/yellow] (the relay logs them; a count that keeps growing "
                      "means it cannot)")
    _render_portal(report)
    if "backup" in report:
        backup = report["backup"]
        if backup is None:
            out.print("[yellow]backup: none made from this data dir[/yellow] (collabbus backup DIR; README, Backups)")
        else:
            out.print(f"backup: the last at {backup['at'][:19].replace('T', ' ')} UTC into {escape(backup['into'])}")
    if report.get("webhooks"):
        now = datetime.now(timezone.utc)
        hooks = Table("endpoint", "institution", "url", "state", "last success", "owed", title="webhook endpoints",
                      title_justify="left")
        for hook in report["webhooks"]:
            hooks.add_row(escape(hook["id"]), escape(hook["institution"]), escape(hook["url"]), _endpoint_state(hook, now),
                          _in_utc(hook["last_success_at"]) or "never", str(hook["owed"]))
        out.print(hooks)
        for hook in report["webhooks"]:
            if hook.get("last_error"):
                met = "failing" if hook["enabled"] else "its last attempt"
                out.print(f"  [yellow]{escape(hook['id'])}[/yellow] {met}: {shown(hook['last_error'])}")


def _endpoint_state(hook: Mapping[str, Any], now: datetime) -> str:
    """A webhook endpoint's state for people: ``enabled``, ``failing since … (2 h)`` or ``disabled …: why``."""
    if not hook["enabled"]:
        when = _in_utc(hook.get("disabled_at"))
        return f"[red]disabled{' ' + when if when else ''}: {escape(hook['disabled_reason'] or 'no reason recorded')}[/red]"
    if hook["failing_since"]:
        since = datetime.fromisoformat(hook["failing_since"])
        return f"[yellow]failing since {_in_utc(hook['failing_since'])} ({_how_long(now - since)})[/yellow]"
    return "[green]enabled[/green]"


def _in_utc(moment: str | None) -> str | None:
    """An RFC 3339 moment (``status --json``'s) as ``2026-12-06 09:15 UTC``."""
    if not moment:
        return None
    return f"{datetime.fromisoformat(moment).astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"


def _how_long(lasted: timedelta) -> str:
    """``under a minute``, ``40 min``, ``2 h``, ``3 d`` (rounded down)."""
    seconds = max(lasted.total_seconds(), 0.0)
    if seconds < 60:
        return "under a minute"
    if seconds < 3600:
        return f"{int(seconds // 60)} min"
    if seconds < 2 * 86400:
        return f"{int(seconds // 3600)} h"
    return f"{int(seconds // 86400)} d"


# --------------------------------------------------------------------------- traces


@app.command()
@with_settings
def traces(
    trace_id: Annotated[Optional[str], typer.Argument(metavar="[TRACE_ID]", help="show this trace (32 hex digits)")] = None,
    event: Annotated[Optional[str], typer.Option("--event", metavar="ID", help="show the trace of this event")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="how many recent traces to show")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="print the traces as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Recent traces as trees — service, operation, institution, event type, duration, status,
    errors — from the embedded trace store (<data dir>/traces.db); one trace by id or by event."""
    from ops import tracing

    if trace_id is not None and event is not None:
        err.print("[red]error:[/red] give a TRACE_ID or --event, not both")
        raise typer.Exit(2)
    if trace_id is not None and not tracing.TRACE_ID_PATTERN.match(trace_id.lower()):
        err.print(f"[red]error:[/red] {trace_id!r} is not a trace id (32 hexadecimal digits)")
        raise typer.Exit(2)
    store = settings.data_dir / tracing.STORE_FILE
    try:
        if event is not None:
            trace_id = tracing.trace_of_event(store, event)
            if trace_id is None:
                _no_trace(f"no trace of event {event!r} in {store}")
        if trace_id is not None:
            found = tracing.load_trace(store, trace_id)
            if found is None:
                _no_trace(f"no trace {trace_id.lower()} in {store}")
            traces = [found]
        else:
            traces = tracing.recent_traces(store, limit)
    except tracing.TraceStoreMissing as exc:
        _no_trace(str(exc))
    if as_json:
        out.print_json(data=traces[0] if trace_id is not None else {"traces": traces})
        return
    if not traces:
        out.print(f"no traces in {store} yet")
    for number, one in enumerate(traces):
        if number:
            out.print()
        _render_trace(one)


def _no_trace(message: str) -> NoReturn:
    from ops.tracing import otlp_traces_endpoint

    endpoint = otlp_traces_endpoint(os.environ)
    err.print(f"[red]error:[/red] {message}")
    if endpoint is not None:
        err.print(f"  spans go to OTLP at {endpoint} (OTEL_EXPORTER_OTLP_ENDPOINT), not to the local store")
    raise typer.Exit(1)


def _render_trace(found: dict[str, Any]) -> None:
    from rich.tree import Tree

    from ops.tracing import walk

    errors = found["errors"]
    title = (
        f"[bold]trace {found['trace_id']}[/bold]  {found['started_at']}  ·  {found['spans']} span{'s' if found['spans'] != 1 else ''}  ·  "
        f"{found['duration_ms']:.1f} ms" + (f"  ·  [red]{errors} failed[/red]" if errors else "")
    )
    tree = Tree(title)
    branches: dict[str, Tree] = {}
    for span in walk(found):
        parent = branches.get(span["parent_id"] or "", tree)
        branches[span["span_id"]] = parent.add(_span_line(span))
    out.print(tree)


def _span_line(span: Mapping[str, Any]) -> str:
    """One span of a trace for people: what and where, then what came of it — a webhook
    delivery's endpoint, host and HTTP status; a failed attempt's error and which delivery of
    its event it was; a dead-lettering's reason. Each as it is (an error may quote a member's
    text: :func:`shown`)."""
    from ops import tracing

    attributes = span["attributes"]
    parts = [f"[bold]{shown(span['operation'])}[/bold]", f"[dim]{span['kind']} · {shown(span['service'] or '')}[/dim]"]
    if span["event_type"]:
        parts.append(shown(span["event_type"]))
    if span["institution"]:
        parts.append(f"[cyan]{shown(span['institution'])}[/cyan]")
    if span["kind"] == "client" and "http.request.method" in attributes:
        endpoint = attributes.get(tracing.WEBHOOK_ENDPOINT)
        host = attributes.get("server.address")
        parts.append("to " + " at ".join(shown(str(part)) for part in (endpoint, host) if part))
        status = attributes.get("http.response.status_code")
        if status is not None:
            parts.append(f"[{'green' if 200 <= int(status) < 300 else 'red'}]HTTP {shown(str(status))}[/]")
    parts.append(f"{span['duration_ms']:.1f} ms")
    if (delivery := attributes.get(tracing.DELIVERY)) is not None and span["kind"] == "consumer":
        limit = attributes.get(tracing.MAX_DELIVER)
        parts.append(f"[yellow]delivery {delivery}{f' of {limit}' if limit else ''}[/yellow]")
    if span["status"] == "error":
        said = [line for text in span["errors"][:3] if (line := _first_of(text))]
        parts.append("[red]failed" + (": " + shown("; ".join(said)) if said else "") + "[/red]")
    if (reason := attributes.get(tracing.DEAD_LETTER_REASON)) is not None:
        deliveries = attributes.get(tracing.DELIVERY)
        parts.append(f"[red]dead-lettered{f' after {deliveries} deliveries' if deliveries else ''}: {shown(_first_of(str(reason)))}[/red]")
    return "  ".join(parts)


def _first_of(text: str) -> str:
    """The first line of an error, no longer than a line of a tree can hold (``--json`` has it all)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= 100 else line[:99] + "…"


# --------------------------------------------------------------------------- dlq


@dlq_app.command("list")
@with_settings
def dlq_list(
    consumer: Annotated[Optional[str], typer.Option(help="only this consumer's dead letters")] = None,
    every: Annotated[bool, typer.Option("--all", help="list the events set aside behind a dead letter one by one too")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the list as JSON (every dead letter)")] = False,
    *,
    settings: Settings,
) -> None:
    """The dead letters, oldest first: where each came from and why it failed. The events set
    aside behind one (Parked: a later event about the same thing) are counted on its line;
    --all lists them too."""
    from ops import dlq

    async def main() -> list[Any]:
        async with _nats(settings, "collabbus-dlq") as nc:
            await _known_consumer(nc.jetstream(), consumer)
            return await dlq.dead_letters(nc.jetstream(), consumer)

    letters = run(main())
    behind = dlq.set_aside_behind(letters)
    if as_json:
        out.print_json(data={"items": [{**letter.summary(), "waits_behind": behind[letter.seq].seq if letter.seq in behind else None}
                                       for letter in letters]})
        return
    if not letters:
        out.print("no dead letters")
        return
    waiting: dict[int, int] = {}
    for head in behind.values():
        waiting[head.seq] = waiting.get(head.seq, 0) + 1
    listed = letters if every else [letter for letter in letters if letter.seq not in behind]
    title = f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}"
    if behind:
        title += (f", {len(behind)} of them set aside behind the others" + ("" if every else " (counted on their lines; --all lists them)"))
    table = Table("#", "consumer", "event id", "type", "log #", "deliveries", "failed at", "reason", "set aside", title=title)
    for letter in listed:
        table.add_row(
            str(letter.seq), escape(letter.consumer), escape(letter.event_id or "") or "[dim]unreadable[/dim]",
            escape(letter.type or ""), str(letter.original_seq or ""), str(letter.deliveries or ""),
            (letter.failed_at or "")[:19].replace("T", " "), shown(letter.reason),
            f"[yellow]{_events_wait(waiting[letter.seq])} behind it[/yellow]" if letter.seq in waiting
            else f"behind #{behind[letter.seq].seq} (log #{behind[letter.seq].original_seq})" if letter.seq in behind else "",
        )
    out.print(table)


async def _known_consumer(js: Any, consumer: str | None) -> None:
    """Refuse a consumer group that is none of the bus's and has no dead letters (a typo would
    find none, and look fine), naming those there are."""
    from ops import dlq

    if consumer is None or consumer in dlq.CONSUMERS:
        return
    known = {*dlq.CONSUMERS, *await dlq.counts(js)}
    if consumer not in known:
        raise typer.BadParameter(f"unknown consumer {consumer!r}; {_meant(consumer, known)}the consumer groups are: "
                                 f"{', '.join(sorted(known))}", param_hint="--consumer")


SET_ASIDE_SHOWN = 10
"""How many things set aside ``collabbus status`` names one by one (the oldest first)."""


def _events_wait(count: int) -> str:
    return "1 event waits" if count == 1 else f"{count:,} events wait"


@dlq_app.command("show")
@with_settings
def dlq_show(
    seq: Annotated[int, typer.Argument(metavar="N", help="the dead letter's number (dlq list)")],
    as_json: Annotated[bool, typer.Option("--json", help="print it as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """One dead letter in full: the headers, the error's detail and the event."""
    from ops import dlq

    async def main() -> Any:
        async with _nats(settings, "collabbus-dlq") as nc:
            letter = await dlq.dead_letter(nc.jetstream(), seq)
            return letter, (await dlq.later_about_it(nc.jetstream(), letter) if letter is not None else [])

    letter, later = run(main())
    if letter is None:
        err.print(f"[red]error:[/red] no dead letter #{seq} (see collabbus dlq list)")
        if as_json:  # (a script reads why on stdout too)
            out.print_json(data={"seq": seq, "error": f"no dead letter #{seq}"})
        raise typer.Exit(1)
    if as_json:
        out.print_json(data={**letter.as_dict(), "later_about_it": later})
        return
    for said in _later_said(later, letter):
        err.print(said)
    table = Table(show_header=False, box=None)
    for key, value in letter.as_dict().items():
        if key not in ("detail", "event", "raw"):
            table.add_row(f"[bold]{key}[/bold]", "" if value is None else shown(value))
    out.print(table)
    out.print("[bold]detail[/bold]")
    out.print("\n".join(f"  {visible(line)}" for line in letter.detail.splitlines()), markup=False)
    out.print("[bold]event[/bold]")
    if letter.event is not None:
        out.print_json(visible(orjson.dumps(letter.event).decode()))  # (JSON escapes C0, not DEL or C1)
    else:
        out.print(visible(letter.raw or ""), markup=False)


@dlq_app.command("replay")
@with_settings
def dlq_replay(
    seqs: Annotated[Optional[list[int]], typer.Argument(metavar="[N]...", help="dead letters to replay; none: all")] = None,
    consumer: Annotated[Optional[str], typer.Option(help="only this consumer's dead letters")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the outcome as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Apply dead-lettered events again through their consumer (each at most once), in the log's
    order; those applied leave the dead-letter queue, those failing again stay. The events set
    aside behind a dead letter that are replayed with it are counted on its line (--json names each)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from ops import dlq

    if consumer is not None and seqs:
        err.print("[red]error:[/red] give dead letters' numbers or --consumer, not both")
        raise typer.Exit(2)

    async def main() -> tuple[list[Any], dict[int, tuple[Any, list[dict[str, Any]]]], dict[int, Any]]:
        async with _nats(settings, "collabbus-dlq") as nc:
            js = nc.jetstream()
            await _known_consumer(js, consumer)
            queued = await dlq.dead_letters(js)
            behind = dlq.set_aside_behind(queued)
            letters = {letter.seq: letter for letter in queued if (not seqs or letter.seq in seqs) and consumer in (None, letter.consumer)}
            # What was applied while a dead letter waited is asked of the ones the others wait behind.
            later = {seq: (letter, await dlq.later_about_it(js, letter, queued=queued))
                     for seq, letter in letters.items() if seq not in behind}
            if consumer is not None and not letters:
                return [], later, behind
            chosen = sorted(letters) if consumer is not None else seqs or None
            engine, appliers = await _appliers(settings)
            try:
                with Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              console=err, disable=as_json or len(letters) < 2, transient=True) as bar:
                    task = bar.add_task("replay", total=len(letters))
                    results = await dlq.replay(js, appliers, chosen, queued=queued,
                                               progress=lambda done, total: bar.update(task, completed=done, total=total))
                return results, later, behind
            finally:
                engine.dispose()

    results, later, behind = run(main())
    if as_json:
        # (an event set aside waited behind another: the later events about its thing are that
        # one's, so its own are null — not asked — rather than an empty list)
        out.print_json(data={"items": [{**result.as_dict(),
                                        "later_about_it": None if result.seq in behind else later.get(result.seq, (None, []))[1],
                                        "waited_behind": behind[result.seq].seq if result.seq in behind else None}
                                       for result in results]})
    elif not results:
        out.print("no dead letters")
    else:
        _replayed_said(results, later, behind)
    if any(not result.applied for result in results):
        raise typer.Exit(1)


def _replayed_said(results: list[Any], later: dict[int, tuple[Any, list[dict[str, Any]]]], behind: dict[int, Any]) -> None:
    """What a replay came to, for people: each dead letter replayed or kept; the events set aside
    behind one and replayed with it counted on its line, not listed one by one; the numbers asked
    for that name no dead letter, on standard error."""
    missing = [result.seq for result in results if not result.found]
    if missing:
        err.print(f"no dead letter {', '.join(f'#{seq}' for seq in missing)}")
    along: dict[int, int] = {}
    for result in results:
        if result.applied and result.seq in behind:
            along[behind[result.seq].seq] = along.get(behind[result.seq].seq, 0) + 1
    for result in results:
        if not result.found:
            continue
        if result.applied and result.seq in behind:
            if result.released:  # (the last of its thing's events: told once all are replayed)
                out.print(_released(result.released))
            continue
        if result.applied:
            count = along.get(result.seq, 0)
            with_it = f", with the {_events_set_aside(count)} behind it" if count else ""
            out.print(f"[green]replayed[/green] #{result.seq} {escape(result.event_id or '')} ({escape(result.consumer or '')}){with_it}")
            letter, after = later.get(result.seq, (None, []))
            for said in _later_said([item for item in after if not item["waiting"]], letter):
                err.print(said)
            if result.released:
                out.print(_released(result.released))
        else:
            named = f" {escape(result.event_id)}" if result.event_id else ""
            out.print(f"[red]kept[/red] #{result.seq}{named}: {escape(result.error or '')}")


def _events_set_aside(count: int) -> str:
    return "event set aside" if count == 1 else f"{count:,} events set aside"


def _later_said(later: list[dict[str, Any]], letter: Any) -> list[str]:
    """What an operator is told of the later events about the same thing as a dead letter: those
    applied while it waited (a warning), and those waiting behind it in the queue."""
    from ops.dlq import LATER_SHOWN

    event = (letter.event or {}) if letter is not None else {}
    thing = escape(str(event.get("subject")))
    more = f" (of the first {LATER_SHOWN} later events)" if len(later) >= LATER_SHOWN else ""
    said = []
    applied = [item for item in later if not item.get("waiting")]
    if applied:
        named = ", ".join(f"#{item['seq']} {item['type']}" for item in applied)
        said.append(f"[yellow]warning:[/yellow] {len(applied)} later event{'s' if len(applied) != 1 else ''} about "
                    f"{thing} {'were' if len(applied) != 1 else 'was'} applied while it waited here{more}: "
                    f"{escape(named)}. Replayed, it is applied after them, not before (an update refused meanwhile as "
                    "unknown stays refused); `collabbus rebuild` applies the log in its order.")
    waiting = [item for item in later if item.get("waiting")]
    if waiting:
        named = ", ".join(f"#{item['seq']} {item['type']}" for item in waiting)
        said.append(f"{len(waiting)} later event{'s' if len(waiting) != 1 else ''} about {thing} "
                    f"{'wait' if len(waiting) != 1 else 'waits'} behind it in the dead-letter queue{more}: {escape(named)}. "
                    "`collabbus dlq replay` applies them after it, in the log's order.")
    return said


def _released(thing: dict[str, str]) -> str:
    """What an operator is told when a thing set aside behind dead letters is let go."""
    return (f"[green]let go[/green] {escape(thing['domain'])} {escape(thing['subject'])}: none of its events is left in the "
            "dead-letter queue, its later events are applied as they come")


async def _appliers(settings: Settings) -> tuple[Any, dict[str, Any]]:
    """The database and, per consumer group, what applies its events (as the running bus has them)."""
    from bus.runtime import NETWORK_CONSUMER
    from connectors.webhooks.dispatcher import WEBHOOKS_CONSUMER, DeliveryRecorder, RetrySchedule
    from handlers.db import make_engine, migrate
    from handlers.routes import network
    from handlers.service import NetworkService

    engine = make_engine(settings.db_url)
    await asyncio.to_thread(migrate, engine)
    schedule = RetrySchedule(tuple(settings.webhook_retry_schedule) or (0.0,))
    service = NetworkService(engine, network())
    await asyncio.to_thread(lambda: service.rules_epochs(record=False))  # a dead letter is judged as a rebuild judges it
    return engine, {
        NETWORK_CONSUMER: service,
        WEBHOOKS_CONSUMER: DeliveryRecorder(engine, WEBHOOKS_CONSUMER, schedule),
    }


@dlq_app.command("purge")
@with_settings
def dlq_purge(
    seqs: Annotated[Optional[list[int]], typer.Argument(metavar="[N]...", help="only these dead letters (numbers from `dlq list`)")] = None,
    consumer: Annotated[Optional[str], typer.Option(help="only this consumer's dead letters")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print what was deleted and let go as JSON (with --yes)")] = False,
    *,
    settings: Settings,
) -> None:
    """Delete dead letters for good (after a confirmation): the ones given, or all (of --consumer)."""
    if as_json and not yes:
        err.print("[red]error:[/red] --json needs --yes (a script cannot answer the confirmation)")
        raise typer.Exit(2)
    from ops import dlq

    async def main() -> tuple[int, list[Any]]:
        async with _nats(settings, "collabbus-dlq") as nc:
            js = nc.jetstream()
            await _known_consumer(js, consumer)
            deleted = await delete(js)
            if not deleted:
                return 0, []
            engine, appliers = await _appliers(settings)
            try:
                return deleted, await dlq.settle(js, appliers)
            finally:
                engine.dispose()

    async def delete(js: Any) -> int:
        if seqs:
            found = [letter.seq for letter in await dlq.dead_letters(js, consumer) if letter.seq in set(seqs)]
            missing = sorted(set(seqs) - set(found))
            said = f"no dead letter {', '.join(f'#{n}' for n in missing)}" + (f" of {consumer}" if consumer else "")
            if missing:
                err.print(said)
            if not found:
                if as_json:
                    out.print_json(data={"deleted": 0, "released": [], "error": said})
                raise typer.Exit(1)
            if not yes and not typer.confirm(f"delete {len(found)} dead letter{'s' if len(found) != 1 else ''} for good?"):
                err.print("nothing deleted")
                raise typer.Exit(1)
            return len(await dlq.discard(js, found))
        count = sum(n for name, n in (await dlq.counts(js)).items() if consumer in (None, name))
        if not count:
            return 0
        if not yes and not typer.confirm(f"delete {count} dead letter{'s' if count != 1 else ''} for good?"):
            err.print("nothing deleted")
            raise typer.Exit(1)
        return await dlq.purge(js, consumer)

    deleted, released = run(main())
    if as_json:
        out.print_json(data={"deleted": deleted, "released": [{"consumer": name, "domain": domain, "subject": subject}
                                                              for name, (domain, subject) in released]})
        return
    out.print(f"deleted {deleted} dead letter{'s' if deleted != 1 else ''}" if deleted else "no dead letters")
    for _consumer, (domain, subject) in released:
        out.print(_released({"domain": domain, "subject": subject}))


# --------------------------------------------------------------------------- institutions


@institutions_app.command("add")
@with_settings
def institutions_add(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="e.g. tr-mersin-bb")],
    name: Annotated[str, typer.Option(help="the institution's name")],
    kind: Annotated[str, typer.Option(help="university, municipality, ngo, cooperative, competence_centre, …")],
    country: Annotated[str, typer.Option(help="ISO 3166-1 alpha-2 code, e.g. TR")],
    lang: Annotated[str, typer.Option(help="language of the name (BCP 47)")] = "en",
    region: Annotated[Optional[str], typer.Option(help="the region it is in, as it writes it, e.g. Mersin")] = None,
    municipality_level: Annotated[Optional[str], typer.Option(help="metropolitan, provincial or district")] = None,
    theme: Annotated[Optional[list[str]], typer.Option(help="theme code; repeat for several")] = None,
    identifier: Annotated[Optional[list[str]], typer.Option(help="SCHEME=VALUE, e.g. fi-business-id=0245895-8")] = None,
    website: Annotated[Optional[str], typer.Option(help="its web site, an http(s) URL")] = None,
    contact_email: Annotated[Optional[str], typer.Option(help="an email address to reach it at")] = None,
    replace: Annotated[bool, typer.Option(help="an existing member: restate all its facts (those not given are cleared)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict (and what the network made of it) as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Add a member: the operator publishes institution.joined (and the command waits until the
    network has applied it). An ID that is already a member is refused unless --replace (to change
    some facts: `institutions update`)."""
    present = None if replace else _current_member(settings, institution_id)
    if present is not None:
        err.print(
            f"[red]error:[/red] {institution_id} is already a member ({present}). `institutions add` would restate "
            "every fact of it and clear those not given: pass --replace for that, or use `collabbus institutions "
            "update` to change some."
        )
        raise typer.Exit(1)

    data: dict[str, Any] = {"id": institution_id, "name": {lang: name}, "kind": kind, "country": country}
    optional = {"region": region, "municipality_level": municipality_level, "website": website, "contact_email": contact_email}
    data.update({k: v for k, v in optional.items() if v is not None})
    if theme:
        data["themes"] = theme
    if identifier:
        data["identifiers"] = _identifiers(identifier)
    _offer_and_report(settings, settings.operator, _operator_event(settings, "institution.joined", data), as_json=as_json, wait=True)


_CLEARABLE = ("region", "municipality_level", "website", "contact_email")


@institutions_app.command("update")
@with_settings
def institutions_update(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="a member, e.g. tr-mersin-bb", autocompletion=_complete_member)],
    name: Annotated[Optional[str], typer.Option(help="the institution's name (in --lang; replaces every language)")] = None,
    kind: Annotated[Optional[str], typer.Option(help="university, municipality, ngo, cooperative, competence_centre, …")] = None,
    country: Annotated[Optional[str], typer.Option(help="ISO 3166-1 alpha-2 code")] = None,
    lang: Annotated[str, typer.Option(help="language of the name (BCP 47)")] = "en",
    region: Annotated[Optional[str], typer.Option(help="the region it is in, as it writes it, e.g. Mersin")] = None,
    municipality_level: Annotated[Optional[str], typer.Option(help="metropolitan, provincial or district")] = None,
    theme: Annotated[Optional[list[str]], typer.Option(help="theme code; repeat for several (replaces the list)")] = None,
    identifier: Annotated[Optional[list[str]], typer.Option(help="SCHEME=VALUE; repeat for several (replaces the list)")] = None,
    website: Annotated[Optional[str], typer.Option(help="its web site, an http(s) URL")] = None,
    contact_email: Annotated[Optional[str], typer.Option(help="an email address to reach it at")] = None,
    clear: Annotated[Optional[list[str]], typer.Option(help=f"a fact to clear: {', '.join(_CLEARABLE)}, themes, identifiers; repeat for several")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the verdict (and what the network made of it) as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Change some facts of a member: the operator publishes institution.updated with only those
    given (the others stay as they are)."""
    data: dict[str, Any] = {"id": institution_id}
    if name is not None:
        data["name"] = {lang: name}
    given = {"kind": kind, "country": country, "region": region, "municipality_level": municipality_level,
             "website": website, "contact_email": contact_email}
    data.update({k: v for k, v in given.items() if v is not None})
    if theme:
        data["themes"] = theme
    if identifier:
        data["identifiers"] = _identifiers(identifier)
    for fact in clear or ():
        if fact in ("themes", "identifiers"):
            data[fact] = []
        elif fact in _CLEARABLE:
            data[fact] = None
        else:
            raise typer.BadParameter(f"{fact!r}: one of {', '.join(_CLEARABLE)}, themes, identifiers "
                                     "(name, kind and country can be changed, not cleared)", param_hint="--clear")
        if fact in given and given[fact] is not None or fact == "themes" and theme or fact == "identifiers" and identifier:
            raise typer.BadParameter(f"{fact} is both given and cleared", param_hint="--clear")
    if len(data) == 1:
        raise typer.BadParameter("nothing to change: give at least one fact (or --clear one)")
    _offer_and_report(settings, settings.operator, _operator_event(settings, "institution.updated", data), as_json=as_json, wait=True)


def _identifiers(items: list[str]) -> list[dict[str, str]]:
    pairs = []
    for item in items:
        scheme, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: use SCHEME=VALUE", param_hint="--identifier")
        pairs.append({"scheme": scheme, "value": value})
    return pairs


def _operator_event(settings: Settings, event_type: str, data: dict[str, Any]) -> dict[str, Any]:
    """A membership event in the operator's name, about the institution ``data`` names."""
    return {
        "specversion": "1.0",
        "id": new_event_id(),
        "source": f"/institutions/{settings.operator}",
        "type": event_type,
        "subject": data["id"],
        "data": data,
    }


def _current_member(settings: Settings, institution_id: str) -> str | None:
    """How the read models here describe ``institution_id`` while it is a member, else how the
    log does (joined, and not applied by the read models yet: the bus is behind), else ``None``
    (also when there is nothing here to ask)."""
    from sqlalchemy.exc import SQLAlchemyError
    from sqlmodel import Session

    from handlers.institutions import member

    engine = _existing_read_models(settings)
    if engine is None:
        return None
    try:
        with Session(engine) as session:
            found = member(session, institution_id)
            if found is not None:
                name = next(iter(found.name.values()), found.id)
                return f"{name}, {found.kind}, {found.country}"
    except SQLAlchemyError:  # not migrated yet, or not reachable: the bus decides as it always does
        return None
    finally:
        engine.dispose()
    kind = _member_per_log(settings, institution_id)
    return f"a {kind} per the log, which the read models have not applied yet" if kind is not None else None


def _member_per_log(settings: Settings, institution_id: str) -> str | None:
    """The kind of ``institution_id`` while the log says it is a member (None: it does not, or the
    log cannot be asked): what a command asks when the read models do not know it — they may be
    behind the log."""
    from bus.membership import Membership

    async def main() -> str | None:
        async with _nats(settings, "collabbus-cli") as nc:
            return await Membership(nc, nc.jetstream()).kind_of(institution_id)

    try:
        return run(main())
    except (typer.Exit, Exception):  # (NATS not reachable: the read models' word stands)
        return None


def _ever_a_member(settings: Settings, session: Any, institution_id: str, nothing_done: str) -> None:
    """Refuse an id that is not a member and never was: the read models have no institution of
    it, and no HTTP token or NATS credentials were issued to it (a typo, which would otherwise
    find nothing and look fine). A member that left may still hold some, and stays a valid id."""
    from sqlmodel import col, select

    from bus.connection import embedded_authority, embedded_store
    from bus.credentials import Authority
    from handlers import tokens
    from handlers.institutions import Institution

    if session.get(Institution, institution_id) is not None or tokens.tokens_of(session, institution_id):
        return
    if settings.embedded and (embedded_store(settings) / Authority.DIRECTORY).is_dir() \
            and embedded_authority(settings).issued_to(institution_id):
        return
    known = session.exec(select(col(Institution.id))).all()
    err.print(f"[red]error:[/red] {escape(repr(institution_id))} is not a member of the network and never was (per the read "
              f"models); {escape(_meant(institution_id, known, most=1))}`collabbus institutions list` lists the members"
              + (f". {nothing_done}" if nothing_done else ""))
    raise typer.Exit(1)


@institutions_app.command("list")
@with_settings
def institutions_list(
    as_json: Annotated[bool, typer.Option("--json", help="print the members as JSON, each with all its facts")] = False,
    *,
    settings: Settings,
) -> None:
    """The members of the network, as the log says."""
    from bus import log

    async def main() -> dict[str, dict[str, Any]]:
        members: dict[str, dict[str, Any]] = {}
        async with _nats(settings, "collabbus-cli") as nc:  # (the bus stopped: its log is read all the same)
            async for logged in log.read(nc.jetstream(), log.event_filter("institution"), since="all"):
                event = logged.event
                if event["type"] == "institution.left":
                    members.pop(event["subject"], None)
                elif event["type"] == "institution.joined":
                    members[event["subject"]] = dict(event["data"])
                else:
                    members.setdefault(event["subject"], {}).update(event["data"])
        return members

    members = run(main())
    if as_json:
        out.print_json(data={"items": list(members.values())})
        return
    table = Table("id", "name", "kind", "country", "level")
    for member in members.values():
        name = member.get("name") or {}
        table.add_row(*(shown(value) for value in (member.get("id"), next(iter(name.values()), ""), member.get("kind"),
                                                    member.get("country"), member.get("municipality_level") or "")))
    out.print(table)


@institutions_app.command("token")
@with_settings
def institutions_token(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="a member's id", autocompletion=_complete_member)],
    expires: Annotated[Optional[str], typer.Option(
        "--expires", metavar="DURATION", help="valid for this long: 90d, 12h, 30m, 2w (default: until revoked)")] = None,
    label: Annotated[Optional[str], typer.Option(
        "--label", help="whose or what for (up to 100 characters), as `institutions access` lists it")] = None,
    calendar: Annotated[bool, typer.Option(
        "--calendar", help="a token that reads the calendar feed only (/innovation-days.ics?token=…), for a calendar "
        "subscription's URL: it publishes and reads nothing else")] = False,
    *,
    settings: Settings,
) -> None:
    """Print a new HTTP token for a member, and nothing else (only its hash is stored)."""
    from handlers import tokens
    from handlers.db import session_scope
    from handlers.institutions import member

    valid_for = _duration(expires, "--expires") if expires is not None else None
    if label is not None and not 0 < len(label.strip()) <= 100:
        raise typer.BadParameter("a label is 1 to 100 characters", param_hint="--label")
    with _read_models(settings) as engine, session_scope(engine) as session:
        unknown = member(session, institution_id) is None
    if unknown:
        from sqlalchemy.engine import make_url

        where = make_url(settings.db_url).render_as_string(hide_password=True)  # (a password is not for a terminal)
        kind = _member_per_log(settings, institution_id)
        if kind is not None:
            err.print(f"[red]error:[/red] {institution_id!r} joined the network (a {kind}, per the log), but the read "
                      f"models at {where} have not applied it yet: the bus is behind or not running "
                      "(`collabbus status`); ask again once they have")
        else:
            err.print(f"[red]error:[/red] {institution_id!r} is not a member of the network (per the read models "
                      f"at {where}); add it with `collabbus institutions add` first")
        raise typer.Exit(1)
    with _read_models(settings) as engine, session_scope(engine) as session:
        token = tokens.issue(session, institution_id, valid_for=valid_for, calendar=calendar,
                             label=label.strip() if label else ("calendar feed only" if calendar else None))
    sys.stdout.write(token + "\n")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _duration(text: str, hint: str) -> timedelta:
    """``90d``, ``12h``, ``30m``, ``2w``, ``45s``: a positive span of time."""
    found = re.fullmatch(r"\s*([1-9][0-9]{0,6})\s*([smhdw])\s*", text.lower())
    if found is None:
        raise typer.BadParameter(f"{text!r} is not a duration such as 90d, 12h, 30m or 2w", param_hint=hint)
    return timedelta(seconds=int(found.group(1)) * _DURATION_UNITS[found.group(2)])


@institutions_app.command("revoke")
@with_settings
def institutions_revoke(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="a member's (or former member's) id", autocompletion=_complete_member)],
    token: Annotated[Optional[str], typer.Option(
        "--token", help="revoke this token only: the token ('-': read it from stdin), or the start of its SHA-256 "
        "as `institutions access ID` lists it")] = None,
    earlier_creds: Annotated[bool, typer.Option(
        "--earlier-creds", help="revoke only the NATS credentials issued to the member before its newest valid "
        "ones (the end of a rotation: those and its HTTP tokens stay)")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print {institution, revoked} as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Revoke a member's access: every HTTP token it holds and every NATS credentials issued to it
    (a member that left, a leak, a developer who left), or only the HTTP token given with --token.
    Tokens stop at the gateway's next request; the embedded server refuses the credentials at once
    and closes their connections (on an external server, revoke them in its account's JWT). A
    rotation without a gap: `institutions creds ID -o new.creds` (the earlier credentials stay
    valid), deploy the new file, then `institutions revoke ID --earlier-creds`."""
    from bus.credentials import Authority
    from bus.connection import embedded_store
    from handlers import tokens
    from handlers.db import session_scope

    if earlier_creds:
        _revoke_earlier_creds(settings, institution_id, as_json, token_given=token is not None)
        return
    if token == "-":
        token = sys.stdin.readline().strip()
    with _read_models(settings) as engine, session_scope(engine) as session:
        _ever_a_member(settings, session, institution_id, "Nothing was revoked")
        if token is not None and re.fullmatch(r"[0-9a-f]{8,64}", token):  # as `institutions access` names it
            listed = [row.token_hash for row in tokens.tokens_of(session, institution_id) if row.token_hash.startswith(token)]
            if len(listed) > 1:
                err.print(f"[red]error:[/red] {len(listed)} tokens of {institution_id} start with {token}: give more of it")
                raise typer.Exit(1)
            revoked = int(tokens.revoke_hash(session, listed[0])) if listed else 0
        elif token is not None:
            if tokens.institution_of(session.connection(), token) not in (institution_id, None):
                err.print(f"[red]error:[/red] that token is not {institution_id}'s")
                raise typer.Exit(1)
            revoked = int(tokens.revoke(session, token))
        else:
            revoked = tokens.revoke_all(session, institution_id)
    credentials, reloaded = None, False
    if token is None and settings.embedded and (embedded_store(settings) / Authority.DIRECTORY).is_dir():
        credentials, reloaded = _revoke_nats_credentials(settings, institution_id)
    if as_json:
        out.print_json(data={"institution": institution_id, "revoked": revoked,
                             **({"nats_credentials_revoked": credentials} if credentials is not None else {})})
    elif token is not None:
        out.print(f"revoked the token of {institution_id}" if revoked else f"that token of {institution_id} was unknown or revoked already")
    else:
        out.print(f"revoked {revoked} token{'s' if revoked != 1 else ''} of {institution_id}")
        if credentials:
            out.print(f"revoked {credentials} NATS credential{'s' if credentials != 1 else ''} of {institution_id}: "
                      + ("the server closed their connections" if reloaded else "refused from the bus's next start"))
        elif reloaded:
            out.print(f"the NATS credentials of {institution_id} were revoked before; the running server has them refused")
    if token is not None and not revoked:  # a script revoking a leaked token must not take a typo for success
        raise typer.Exit(1)


def _revoke_earlier_creds(settings: Settings, institution_id: str, as_json: bool, *, token_given: bool) -> None:
    """`institutions revoke ID --earlier-creds`: every NATS credentials issued to the member but
    its newest valid ones, revoked and applied by a running embedded server."""
    from bus.connection import embedded_authority, embedded_store
    from bus.credentials import Authority

    if token_given:
        err.print("[red]error:[/red] --earlier-creds revokes NATS credentials, --token an HTTP token: give one of them")
        raise typer.Exit(2)
    if settings.nats_account_seed is not None or not settings.embedded:
        err.print("[red]error:[/red] --earlier-creds revokes the credentials the embedded server issued; "
                  "on an external server revoke them in its account's JWT (e.g. `nsc revocations add-user`)")
        raise typer.Exit(1)
    if not (embedded_store(settings) / Authority.DIRECTORY).is_dir() or not embedded_authority(settings).issued_to(institution_id):
        err.print(f"[red]error:[/red] no NATS credentials were issued to {institution_id} here "
                  f"(`collabbus institutions creds {institution_id}` issues them)")
        raise typer.Exit(1)
    if not embedded_authority(settings).valid_credentials(institution_id):
        err.print(f"[red]error:[/red] {institution_id} holds no valid NATS credentials to keep (all expired or revoked): "
                  f"nothing was revoked; `collabbus institutions creds {institution_id}` issues new ones")
        raise typer.Exit(1)
    revoked, reloaded = _revoke_nats_credentials(settings, institution_id, keep_newest=True)
    if as_json:
        out.print_json(data={"institution": institution_id, "revoked": 0, "nats_credentials_revoked": revoked})
    elif revoked:
        out.print(f"revoked {revoked} earlier NATS credential{'s' if revoked != 1 else ''} of {institution_id}: "
                  + ("the server closed their connections" if reloaded else "refused from the bus's next start")
                  + "; its newest credentials and its HTTP tokens stay")
    else:
        out.print(f"{institution_id} holds no valid NATS credentials issued before its newest")


def _revoke_nats_credentials(settings: Settings, institution_id: str, *, keep_newest: bool = False) -> tuple[int, bool]:
    """Revoke every NATS credentials the embedded server's authority issued to ``institution_id``
    (``keep_newest``: all but the last issued) and have a running server apply it: (how many were
    revoked now, whether a running server reloaded). Exits 1 when the running server could not
    apply it."""
    from bus.connection import embedded_authority, embedded_server, embedded_store
    from bus.server import EmbeddedServerError

    revoked, theirs = embedded_authority(settings).revoke(institution_id, keep_newest=keep_newest)
    reloaded = False
    if theirs:  # (again, when revoked before: a reload that failed then is tried again)
        try:  # a running server applies it now; a stopped one when it starts
            reloaded = embedded_server(settings).reload()
        except EmbeddedServerError as exc:
            err.print(f"[red]error:[/red] the credentials of {institution_id} are revoked in {embedded_store(settings)}, "
                      f"but the running server has not applied it: {exc}. Run this command again, or restart the bus.")
            raise typer.Exit(1) from None
    return revoked, reloaded


@institutions_app.command("creds")
@with_settings
def institutions_creds(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="a member's id", autocompletion=_complete_member)],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write the file here (0600) instead of stdout")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="report where the file went, as JSON (with --output)")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="revoke the member's earlier NATS credentials first (its HTTP tokens stay)")] = False,
    expires: Annotated[Optional[str], typer.Option(
        "--expires", metavar="DURATION", help="valid for this long: 90d, 12h, 30m, 2w (default: until revoked)")] = None,
    *,
    settings: Settings,
) -> None:
    """Write new NATS credentials for a member: it may offer events as itself and follow the public log.

    A standard `.creds` file (user JWT + nkey seed) for any NATS client, which connects with the
    inbox prefix `_INBOX.ID` (e.g. Go `nats.CustomInboxPrefix`, nats-py `inbox_prefix`): the
    credentials let it read those inboxes only, where its verdicts arrive, and subscribe to the
    events every member sees as the log stores them, on `collab.live.…` (listed by `--json`; the
    confidential ones are read over HTTP and webhooks). Signed with the embedded
    server's account key, or with COLLABBUS_NATS_ACCOUNT_SEED on an external server; the server
    needs no reload. Earlier credentials of the member stay valid until `institutions revoke ID
    --earlier-creds` (a rotation without a gap: once the new file is deployed) or `institutions
    revoke ID` (with its HTTP tokens), or are revoked at once with --replace (a developer who left,
    a file that leaked, credentials from an earlier version); the running server closes their
    connections."""
    from bus.connection import embedded_authority
    from bus.credentials import CredentialsError, member_inbox_prefix, partner_creds, public_key, read_account_seed, write_secret
    from bus.logpages import member_log_requests
    from bus.membership import Membership
    from handlers.confidential import public_live_subjects

    if as_json and output is None:  # (stdout holds the secret: a report there would be mixed into it, or lost)
        err.print("[red]error:[/red] --json reports where the credentials were written: give --output FILE too; "
                  "nothing was issued. (`institutions access ID --json` lists a member's credentials, "
                  "`GET /me` its live subjects)")
        raise typer.Exit(2)
    # One reading of the clock for both claims: the credentials are valid for exactly the time asked.
    issued = int(time.time())
    until = issued + int(_duration(expires, "--expires").total_seconds()) if expires is not None else None
    try:
        if settings.nats_account_seed is not None:
            account = read_account_seed(settings.nats_account_seed.get_secret_value())
        elif settings.embedded:
            account = embedded_authority(settings).account
        else:
            err.print("[red]error:[/red] issuing NATS credentials for an external server needs its account's signing key: "
                      "set COLLABBUS_NATS_ACCOUNT_SEED (or --nats-account-seed) to the account's nkey seed (SA…) or a file holding it")
            raise typer.Exit(1)
    except CredentialsError as exc:
        err.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from None
    if replace and (settings.nats_account_seed is not None or not settings.embedded):
        err.print("[red]error:[/red] --replace revokes the credentials the embedded server issued; "
                  "on an external server revoke them in its account's JWT (e.g. `nsc revocations add-user`)")
        raise typer.Exit(1)

    async def main() -> str | None:
        async with _nats(settings, "collabbus-cli") as nc:
            return await Membership(nc, nc.jetstream()).kind_of(institution_id)

    if run(main()) is None:
        err.print(f"[red]error:[/red] {institution_id!r} is not a member of the network (per the log); "
                  "add it with `collabbus institutions add` first")
        raise typer.Exit(1)
    # Revoked before the new ones are issued: a revocation names every credentials issued to the
    # member until then, so the new ones are not among them.
    replaced, reloaded = _revoke_nats_credentials(settings, institution_id) if replace else (0, False)
    earlier: int | None = None  # (unknown on an external server)
    if settings.nats_account_seed is None and settings.embedded:  # noted, so that `institutions revoke` can revoke them
        authority = embedded_authority(settings)
        earlier = len(authority.valid_credentials(institution_id))  # (before these are noted)
        creds = authority.member_creds(institution_id, expires=until, issued_at=issued)
    else:
        creds = partner_creds(account, institution_id, expires=until, issued_at=issued)
    prefix = member_inbox_prefix(institution_id)
    connecting = (f"connect with the inbox prefix {prefix} (verdicts come to {prefix}.>, the only inboxes these "
                  "credentials may read); they may also follow the events every member sees as the log stores them, "
                  "each with its log sequence (the Nats-Sequence header), on " + ", ".join(public_live_subjects())
                  + f", and ask for pages of the log on {member_log_requests(institution_id)} (what they missed while away)")
    expiry = datetime.fromtimestamp(until, timezone.utc).isoformat() if until is not None else None
    if expiry is not None:
        connecting = f"valid until {expiry[:19].replace('T', ' ')} UTC (the server closes their connections then); " + connecting
    if replace:
        connecting = (f"revoked {replaced} earlier NATS credential{'s' if replaced != 1 else ''} of {institution_id}"
                      + (" (the server closed their connections)" if reloaded and replaced else "") + "; " + connecting)
    elif earlier:
        connecting += (f". {earlier} earlier NATS credential{'s' if earlier != 1 else ''} of {institution_id} "
                       f"{'stay' if earlier != 1 else 'stays'} valid: once the new file is in use, "
                       f"`collabbus institutions revoke {institution_id} --earlier-creds` revokes "
                       f"{'them' if earlier != 1 else 'it'}")
    if output is None:
        sys.stdout.write(creds)
        err.print(connecting, soft_wrap=True)
        return
    write_secret(output, creds)
    if as_json:
        out.print_json(data={"institution": institution_id, "output": str(output), "account": public_key(account),
                             "inbox_prefix": prefix, "live_subjects": public_live_subjects(),
                             "log_requests": member_log_requests(institution_id), "expires_at": expiry,
                             **({"replaced": replaced} if replace else {}),
                             **({"earlier_valid": earlier} if earlier is not None and not replace else {})})
    else:
        out.print(f"wrote NATS credentials for {institution_id} to {output}; {connecting}", soft_wrap=True)


@institutions_app.command("access")
@with_settings
def institutions_access(
    institution_id: Annotated[str, typer.Argument(metavar="ID", help="a member's (or former member's) id", autocompletion=_complete_member)],
    as_json: Annotated[bool, typer.Option("--json", help="print {institution, tokens, nats_credentials} as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Who may speak for a member: every HTTP token and NATS credentials issued to it, when, until
    when, and whether and when they were revoked. Tokens are named by the start of their SHA-256
    (only that is stored); credentials by their user key (the `sub` of the file's JWT). The NATS
    credentials are those the embedded server's keys signed (an external server's account keeps its own)."""
    from bus.connection import embedded_authority, embedded_store
    from bus.credentials import Authority
    from handlers import tokens
    from handlers.db import session_scope

    def stamp(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    now = datetime.now(timezone.utc)
    with _read_models(settings) as engine, session_scope(engine) as session:
        _ever_a_member(settings, session, institution_id, "")
        held: list[dict[str, Any]] = [{"sha256": row.token_hash[:12], "label": row.label, "created_at": stamp(row.created_at),
                 "expires_at": stamp(row.expires_at), "revoked_at": stamp(row.revoked_at), "valid": tokens.is_valid(row, now)}
                for row in tokens.tokens_of(session, institution_id)]
    creds: list[dict[str, Any]] | None = None
    if settings.nats_account_seed is None and settings.embedded:
        creds = []
        if (embedded_store(settings) / Authority.DIRECTORY).is_dir():
            def when(seconds: int | None) -> str | None:
                return stamp(datetime.fromtimestamp(seconds, timezone.utc)) if seconds is not None else None
            creds = [{"user": entry["user"], "issued_at": when(entry["issued_at"]), "expires_at": when(entry["expires_at"]),
                      "revoked_at": when(entry["revoked_at"]), "valid": entry["valid"]}
                     for entry in embedded_authority(settings).credentials_of(institution_id)]
    if as_json:
        out.print_json(data={"institution": institution_id, "tokens": held, "nats_credentials": creds})
        return

    def shown(value: str | None, none: str = "—") -> str:
        return value[:19].replace("T", " ") if value else none

    def valid(rows: list[dict[str, Any]]) -> int:
        return sum(1 for row in rows if row["valid"])

    columns = ("issued (UTC)", "expires (UTC)", "revoked (UTC)")
    table = Table("token (sha256)", "label", *columns, title=f"HTTP tokens of {institution_id}: {valid(held)} valid")
    for row in held:
        table.add_row(f"{row['sha256']}…", escape(row["label"] or "—"), shown(row["created_at"]), shown(row["expires_at"], "never"),
                      shown(row["revoked_at"]))
    out.print(table if held else f"HTTP tokens of {institution_id}: none issued")
    if creds is None:
        out.print(f"NATS credentials of {institution_id}: signed with the external server's account key, "
                  "which keeps no list here (its account's JWT holds the revocations)")
        return
    table = Table("user key", *columns, title=f"NATS credentials of {institution_id}: {valid(creds)} valid")
    for entry in creds:
        table.add_row(entry["user"], shown(entry["issued_at"]), shown(entry["expires_at"], "never"), shown(entry["revoked_at"]))
    out.print(table if creds else f"NATS credentials of {institution_id}: none issued here")


# --------------------------------------------------------------------------- schemas, asyncapi


@schemas_app.command("list")
def schemas_list(
    as_json: Annotated[bool, typer.Option("--json", help="the catalog as JSON")] = False,
) -> None:
    """The event catalog: each type, who may offer it, and the data field naming its aggregate
    (the envelope's subject)."""
    from rich.table import Table

    from schemas import registry
    from schemas.common import InstitutionKind

    specs = [spec for _, spec in sorted(registry.REGISTRY.items())]
    if as_json:
        out.print_json(data=[
            {"type": spec.type, "major": spec.major, "dataschema": spec.dataschema, "offered_by": sorted(spec.emitters),
             "by_workflows": spec.workflow, "subject_field": spec.subject_field}
            for spec in specs
        ])
        return
    members = {kind.value for kind in InstitutionKind} - {"operator"}
    table = Table("type", "offered by", "subject (data field)", box=None)
    for spec in specs:
        everyone = members <= spec.emitters
        who = ", ".join((["every member"] if everyone else []) + sorted(spec.emitters - members if everyone else spec.emitters))
        if spec.workflow:
            who = f"{who} [dim](and the workflows)[/dim]" if who else "[dim]the workflows[/dim]"
        table.add_row(spec.type + (f" v{spec.major}" if spec.major != 1 else ""), who, spec.subject_field)
    out.print(table)


@schemas_app.command("export")
def schemas_export(directory: Annotated[Path, typer.Argument(metavar="DIR", help="a directory of its own (created if need be)")]) -> None:
    """Write one JSON Schema per event type (and major version) into DIR."""
    from schemas import registry

    if (directory / "__init__.py").exists():  # e.g. the catalog's own package, schemas/
        raise typer.BadParameter(f"{directory} holds Python code (__init__.py): choose a directory of its own, "
                                 "e.g. exported-schemas/", param_hint="DIR")
    try:
        paths = registry.export_json_schemas(directory)
    except OSError as exc:  # not a directory, not writable, a path under a file
        err.print(f"[red]error:[/red] cannot write into {directory}: {exc.strerror or exc}")
        raise typer.Exit(1) from None
    err.print(f"wrote {len(paths)} schemas to {directory}")


@app.command()
@with_settings
def asyncapi(
    yaml: Annotated[bool, typer.Option("--yaml", help="YAML instead of JSON")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write to a file")] = None,
    *,
    settings: Settings,
) -> None:
    """Print the AsyncAPI 3 document of the bus's subjects and event payloads (its server: the
    bus's NATS address, as the gateway's /asyncapi.json gives it)."""
    from bus.asyncapi import asyncapi_document

    document = asyncapi_document(settings.nats_address)
    if yaml:
        import yaml as pyyaml

        text = pyyaml.safe_dump(document, sort_keys=False, allow_unicode=True)
    else:
        text = json.dumps(document, indent=2, ensure_ascii=False)
    if output:
        output.write_text(text)
    else:
        sys.stdout.write(text + "\n")


# --------------------------------------------------------------------------- portal (CONTRACT §8)

portal_app = typer.Typer(help="The portal connector: keeps an Innokylä-style portal and the network in sync (README: The Innokylä-style portal).", no_args_is_help=True)
app.add_typer(portal_app, name="portal")


def _render_portal_report(report: Any) -> None:
    """A pass for people. One that completed with entries rejected says so on its first line and
    exits 0 all the same: the rest of the portal is synced, and each rejected entry is read
    again once it changes on the portal."""
    from connectors.portal.connector import rejected_entry

    summary = report.as_dict()
    state = ("[green]complete[/green]" if report.complete else
             f"[red]stopped[/red]: {escape(report.error or '')} (the next sync resumes from the last page stored)")
    if report.rejected:
        state += f"; [yellow]{_plural(len(report.rejected), 'entry', 'entries')} rejected[/yellow]"
    out.print(f"portal sync of {escape(report.portal)}: {state}")
    out.print(f"  listed {_plural(report.listed, 'entry', 'entries')} in {_plural(report.pages, 'page')}, {report.seconds:.1f} s "
              f"({summary['entries_per_second']:,.0f} entries/s); retries {report.retries}")
    events = f"{report.registered} project.registered, {report.updated} project.updated"
    if report.duplicates:  # a pass cut short after the log took them, before they were stored
        out.print(f"  emitted {_plural(report.emitted - report.duplicates, 'event')} ({events}, of which {report.duplicates} "
                  f"{'was' if report.duplicates == 1 else 'were'} in the log already: not emitted again); unchanged {report.unchanged}")
    else:
        out.print(f"  emitted {events}; unchanged {report.unchanged}")
    if report.deleted:
        out.print(f"  [yellow]deleted before they could be read[/yellow] ({len(report.deleted)}): {', '.join(report.deleted[:10])}")
    if report.unmapped:
        out.print(f"  [yellow]unmapped organisations[/yellow] ({len(report.unmapped)}, {summary['unmapped_entries']} entries "
                  "read in this pass; add their business id to a member's identifiers as fi-business-id: the next sync "
                  "then reads the whole portal again by itself):")
        for business_id, seen in sorted(report.unmapped.items()):
            out.print(f"    {escape(business_id)} {escape(str(seen['name'] or ''))}: {seen['entries']} entries in this pass")
    for rejected in report.rejected[:10]:
        out.print(f"  [red]rejected[/red] {escape(rejected_entry(rejected))} ({escape(rejected['reason'])})", soft_wrap=True)
        for problem in rejected["errors"]:
            out.print(f"    {_problem_text(problem['loc'], problem['msg'], problem['type'])}", soft_wrap=True)
    if len(report.rejected) > 10:
        out.print(f"  … and {len(report.rejected) - 10} more rejected (--json lists them all)")
    if report.owner_changed:
        out.print(f"  [yellow]organisation changed to another member[/yellow] (not applied): {', '.join(report.owner_changed[:10])}")
    if report.published or report.pushed or report.conflicts or report.waiting:
        out.print(f"  published {report.published} projects, wrote {report.pushed} changes to their entries"
                  f" ({report.conflicts} concurrent portal edits merged); waiting for the read model: {len(report.waiting)}")
    for failed in report.publish_errors[:10]:
        out.print(f"  [red]not published[/red] {escape(failed['project'])}: {escape(failed['error'])} (retried by the next sync)")


@portal_app.command("sync")
@with_settings
def portal_sync(
    once: Annotated[bool, typer.Option("--once", help="one sync, then exit (default: every COLLABBUS_PORTAL_INTERVAL s)")] = False,
    full: Annotated[bool, typer.Option("--full", help="read every entry, not only those changed since the last sync")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print each summary as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Pull the portal's entries into the bus as projects of the members they belong to.

    Members are mapped through the read models that the running bus keeps (their `fi-business-id`
    identifiers)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn

    from bus.runtime import Bus
    from bus.server import port_is_taken
    from connectors.portal.connector import from_settings
    from connectors.webhooks.targets import RefusedTarget
    from handlers.db import make_engine, migrate

    _portal_url(settings)
    if settings.embedded and port_is_taken(*settings.listen_host_port):
        from bus.connection import embedded_bus_creds

        settings = settings.model_copy(update={  # the running bus's server, as the bus connects to it
            "nats_url": f"nats://{settings.nats_listen}", "nats_creds": settings.nats_creds or embedded_bus_creds(settings)})

    async def main() -> bool:
        bus = Bus(settings)
        stop = _stop_on_signals()
        await bus.start(ingress=False, state=False)
        engine = make_engine(settings.db_url)
        ok, whole = True, full
        try:
            await asyncio.to_thread(migrate, engine)
            try:
                sync = await from_settings(settings, bus.gate, engine, traced_entries=settings.portal_traced_entries)
            except RefusedTarget as exc:
                err.print(f"[red]error:[/red] the portal: {exc}")
                raise typer.Exit(1) from None
            try:
                while True:
                    with Progress(SpinnerColumn(), TextColumn("[bold]portal sync[/bold] {task.description}"),
                                  console=err, disable=as_json, transient=True) as bar:
                        task = bar.add_task("listing…")

                        latest: list[Any] = []

                        def progress(report: Any, task: Any = task) -> None:
                            bar.update(task, description=f"{report.pages} pages, {report.listed} entries, "
                                       f"{report.emitted} events, {report.rate:,.0f} entries/s")
                            latest[:] = [report]

                        # Stopped mid-pass, the pass is cut short: safe, the cursor is stored per page and
                        # event ids are deterministic, so the next sync carries on where this one was.
                        passing = await _unless_stopped(sync.sync(full=whole, progress=progress), stop)
                        if passing is None:
                            err.print("portal sync stopped mid-pass; the next one carries on from the last page stored")
                            if as_json:  # what the pass did until then, for a script (complete: false)
                                cut = latest[0].as_dict() if latest else {"portal": settings.portal_url, "complete": False}
                                out.print_json(data={**cut, "complete": False, "error": "interrupted"})
                            ok = False
                            break
                        report = passing.result()
                    whole = False  # later passes read what changed since
                    ok = report.complete
                    if as_json:
                        out.print_json(data=report.as_dict())
                    else:
                        _render_portal_report(report)
                    if once:
                        break
                    try:
                        await asyncio.wait_for(stop.wait(), timeout=settings.portal_interval)
                        break
                    except TimeoutError:
                        continue
            finally:
                await sync.client.aclose()
        finally:
            engine.dispose()
            await bus.stop()
        return ok

    if not run(main()):
        raise typer.Exit(1)


@portal_app.command("publish")
@with_settings
def portal_publish(
    project_id: Annotated[str, typer.Argument(help="the project to publish on the portal")],
    entry_type: Annotated[str, typer.Option("--type", help="the portal entry's type: whole (a project) or practice")] = "whole",
    as_json: Annotated[bool, typer.Option("--json", help="print the publication as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """Mark a project of the network for publication on the portal (on its owner's request).

    The connector (`collabbus portal sync`, or `collabbus up`) creates the entry on its next sync,
    adds the entry to the project's external_refs, and from then on writes the project's changes to
    it. Marking a project again changes nothing."""
    from connectors.portal.connector import PublicationRefused, mark_for_publication, portal_key

    portal = portal_key(_portal_url(settings))
    with _read_models(settings) as engine:
        try:
            mark = mark_for_publication(engine, portal, project_id, entry_type)
        except PublicationRefused as exc:
            err.print(f"[red]refused:[/red] {escape(str(exc))}")
            raise typer.Exit(1) from None
    summary = _publication(mark)
    if as_json:
        out.print_json(data=summary)
    elif mark.entry_id:
        out.print(f"project {escape(project_id)} is published as portal entry {escape(mark.entry_id)}")
    else:
        out.print(f"project {escape(project_id)} is marked for publication on {escape(mark.portal)}; "
                  "the connector creates its entry on its next sync")
        if mark.error:
            out.print(f"  [yellow]last attempt:[/yellow] {escape(mark.error)}")


def _portal_url(settings: Settings) -> str:
    """The configured portal's URL; without one, a usage error."""
    if not settings.portal_url:
        err.print("[red]error:[/red] no portal configured: set COLLABBUS_PORTAL_URL (or --portal-url)")
        raise typer.Exit(2)
    return settings.portal_url


@contextlib.contextmanager
def _read_models(settings: Settings) -> Iterator[Any]:
    """An engine on the migrated read models, disposed afterwards; a database that cannot be
    reached ends the command with one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from handlers.db import make_engine, migrate

    missing = _missing_sqlite_file(settings)
    if missing is not None:
        _no_network_here(settings, f"no read models at {missing}")
    engine = make_engine(settings.db_url)
    try:
        migrate(engine)
        yield engine
    except SQLAlchemyError as exc:
        _database_problem(exc)
    finally:
        engine.dispose()


def _publication(mark: Any) -> dict[str, Any]:
    """A publication mark as ``portal publish``/``publications`` report it."""
    return {"portal": mark.portal, "project_id": mark.project_id, "entry_type": mark.entry_type,
            "entry_id": mark.entry_id, "marked_at": mark.marked_at.isoformat(),
            "pushed_at": mark.pushed_at.isoformat() if mark.pushed_at else None, "error": mark.error}


@portal_app.command("publications")
@with_settings
def portal_publications(
    as_json: Annotated[bool, typer.Option("--json", help="print the publications as JSON")] = False,
    *,
    settings: Settings,
) -> None:
    """The projects marked for publication on the portal: their entries, last push and last error."""
    from connectors.portal.connector import portal_key
    from connectors.portal.store import publications
    from handlers.db import session_scope

    portal = portal_key(_portal_url(settings))
    with _read_models(settings) as engine, session_scope(engine) as session:
        found = [_publication(mark) for mark in publications(session, portal)]
    if as_json:
        out.print_json(data=found)
        return
    if not found:
        out.print("no project is marked for publication on this portal")
        return
    for mark in found:
        entry = f"entry {escape(mark['entry_id'])}" if mark["entry_id"] else "no entry yet"
        pushed = f", last push {_in_utc(mark['pushed_at'])}" if mark["pushed_at"] else ""
        out.print(f"{escape(mark['project_id'])} ({mark['entry_type']}): {entry}, marked {_in_utc(mark['marked_at'])}{pushed}",
                  soft_wrap=True)
        if mark["error"]:
            out.print(f"  [yellow]last error:[/yellow] {escape(mark['error'])}", soft_wrap=True)


@portal_app.command("sandbox")
@with_settings
def portal_sandbox(
    listen: Annotated[str, typer.Option("--listen", metavar="HOST:PORT", help="where the sandbox portal listens")] = "127.0.0.1:8090",
    token: Annotated[Optional[str], typer.Option("--token", help="the Bearer token it accepts (default: any)")] = None,
    seed: Annotated[int, typer.Option("--seed", help="create this many sample entries first, when it has none yet")] = 0,
    *,
    settings: Settings,
) -> None:
    """Serve a local portal for trying the connector: the portal's API as the connector uses it
    (entries in <data dir>/portal-sandbox.db), with switchable faults (POST /_sandbox/faults)."""
    from connectors.portal.sandbox import PortalSandbox, sample_entries

    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise typer.BadParameter(f"{listen!r} is not HOST:PORT", param_hint="--listen")

    async def main() -> None:
        sandbox = PortalSandbox(settings.data_dir / "portal-sandbox.db", host or "127.0.0.1", int(port), token=token)
        present = len(sandbox.store.ids())
        if seed and present:  # kept from an earlier run: seeding again would add as many again
            err.print(f"[yellow]not seeding:[/yellow] the sandbox keeps {present} entries from before "
                      f"(in {settings.data_dir / 'portal-sandbox.db'}; delete the file to start empty)")
        elif seed:
            sandbox.store.seed(sample_entries(seed, [{"name": "Esimerkki ry", "business_id": "0000000-0"}]))
        stop = _stop_on_signals()
        try:
            await sandbox.start()
        except OSError as exc:  # (run() would take it for NATS; the sandbox has nothing to do with it)
            err.print(f"[red]error:[/red] the sandbox cannot listen on {listen}: {exc.strerror or exc}; choose another --listen")
            raise typer.Exit(1) from None
        err.print(f"portal sandbox at {sandbox.url} (API under /api/v1, docs at {sandbox.url}/docs), "
                  f"{len(sandbox.store.ids())} entries; Ctrl-C to stop")
        try:
            await stop.wait()
        finally:
            await sandbox.stop()

    run(main())


# --------------------------------------------------------------------------- bench (CONTRACT §9)


@app.command()
def bench(
    events: Annotated[Optional[int], typer.Option(min=50, help="events per throughput phase (default 5000, with --quick 200)")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="a smoke run: few events, every phase, well under a minute of measuring")] = False,
    only: Annotated[Optional[str], typer.Option(help="comma-separated phases: raw,bus,http,latency,webhooks,rebuild")] = None,
    config: Annotated[Optional[str], typer.Option("--config", help="comma-separated nats-server configurations: sync_always,sync_default")] = None,
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="requests in flight, for the bus and for raw nats-py alike")] = 64,
    rebuild_events: Annotated[Optional[int], typer.Option(min=100, help="events in the log for the rebuild (default 100000, with --quick 1000)")] = None,
    budget: Annotated[Optional[float], typer.Option(min=1, help="seconds a bus throughput phase may take (default 12, with --quick 60)")] = None,
    output: Annotated[Path, typer.Option("--out", help="where to write the results as JSON")] = Path("bench/results.json"),
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """The benchmark: raw nats-py against the bus (NATS and HTTP), latency at a fixed rate, webhook
    fan-out, rebuild and memory, on fresh nats-servers in both sync configurations."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ops import bench as benchmark

    def names(value: Optional[str], allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
        if value is None:
            return allowed
        chosen = tuple(part.strip() for part in value.split(",") if part.strip())
        unknown = [part for part in chosen if part not in allowed]
        if unknown or not chosen:
            raise typer.BadParameter(f"{', '.join(map(repr, unknown)) or repr(value)}: choose from {', '.join(allowed)}", param_hint=option)
        return chosen

    changes: dict[str, Any] = {
        "phases": names(only, benchmark.PHASES, "--only"),
        "configurations": names(config, tuple(benchmark.CONFIGURATIONS), "--config"),
        "concurrency": concurrency,
    }
    for name, value in (("events", events), ("rebuild_events", rebuild_events), ("budget", budget)):
        if value is not None:
            changes[name] = value
    options = benchmark.BenchOptions.quick_run(**changes) if quick else benchmark.BenchOptions(**changes)

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        task = bar.add_task("starting", total=None)
        current = {"description": ""}

        def progress(description: str, done: int, total: int | None) -> None:
            if description != current["description"]:
                current["description"] = description
                bar.reset(task, description=description, total=total, completed=done)
            else:
                bar.update(task, completed=done, total=total)

        results = run(benchmark.run(options, progress))
    benchmark.write(results, output)
    if as_json:
        sys.stdout.write(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    else:
        _render_bench(results, output)
    if benchmark.failed_phases(results):
        err.print(f"[red]failed:[/red] {', '.join(benchmark.failed_phases(results))} (see {output})")
        raise typer.Exit(1)


def _render_bench(results: dict[str, Any], output: Path) -> None:
    from ops.bench import CPU_PARTS, cpu_rows, rows

    machine = results["machine"]
    out.print(f"[bold]collabbus bench[/bold] on {escape(machine['cpu'])}, {machine['cores']} cores, "
              f"{machine['memory']['value']:g} GB, Python {machine['python']}, {escape(machine['nats_server'])}; "
              f"{results['seconds']['value']:g} s")
    table = Table("configuration", "figure", "value", "status", title="measured", title_justify="left")
    for configuration, label, value, status in rows(results):
        colour = "green" if status == "ok" else "yellow" if status == "timed_out" else "red" if status else ""
        table.add_row(configuration, label, value, f"[{colour}]{escape(status)}[/]" if colour else "")
    out.print(table)
    cpu = Table("configuration", "phase", *(part.replace("_", "-") for part in CPU_PARTS), "together",
                title="CPU an event (µs): where the cores went", title_justify="left")
    for configuration, phase, parts, together in cpu_rows(results):
        cpu.add_row(configuration, phase, *("—" if value is None else f"{value:,.0f}" for value in parts), f"{together:,.0f}")
    if cpu.row_count:
        out.print(cpu)
    targets = Table("target", "value", "met", title="targets (issue 7)", title_justify="left")
    for target in results["targets"]:
        measured = target["measured"]
        value = "—" if measured["value"] is None else f"{measured['value']:,} {measured['unit']}"
        met = {True: "[green]yes[/green]", False: "[red]no[/red]", None: "[dim]not measured[/dim]"}[target["met"]]
        table_note = f" ({escape(target['note'])})" if target["note"] else ""
        targets.add_row(target["target"], value, met + table_note)
    out.print(targets)
    out.print(f"results written to {output}")


def main() -> None:  # pragma: no cover - console script
    app()


def _flowing_help(group: typer.Typer) -> None:
    """Typer keeps a docstring's line breaks in a command list's summaries and in the paragraphs of
    a command's help after its first (they break the text at the width of the source, not the
    terminal's): each paragraph is given joined, and the first alone as the summary."""
    for command in group.registered_commands:
        if command.short_help is None and command.help is None and command.callback is not None and command.callback.__doc__:
            paragraphs = [" ".join(paragraph.split()) for paragraph in inspect.cleandoc(command.callback.__doc__).split("\n\n")]
            command.short_help = paragraphs[0]
            command.help = "\n\n".join(paragraphs)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _flowing_help(sub.typer_instance)


_flowing_help(app)
