"""The bus's status in one dictionary: what ``collabbus status`` prints and ``/ops/status`` answers.

Everything comes from the shared sources of truth — JetStream for the streams, the consumer groups
and the dead letters; the database for how far the read models have applied the log and how the
webhook endpoints are doing — so it reads the same from any process, with the bus running or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from bus import lease
from bus.streams import DLQ_STREAM, EVENTS_STREAM
from handlers.bookkeeping import outbox_backlog, parked
from handlers.db import reading
from handlers.words import unindexed
from ops import dlq
from ops.backup import last_backup

log = logging.getLogger("collabbus.status")


async def collect_status(
    js: JetStreamContext, engine: sa.Engine | None = None, *, running: Mapping[str, Any] | None = None,
    data_dir: Path | None = None, lease_holders: bool = True, portal: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Streams, durable consumer groups, dead letters per consumer, the database's positions and
    the webhook endpoints' health (when the database has them).

    ``running``: consumer name → the ``bus.consumer.Consumer`` running in this process, whose
    counters (events applied, dead-lettered since start) are added, and what it is waiting on: an
    event to try again (``retrying``), a database it cannot write (``holding``).

    ``applied_by`` (unless ``lease_holders`` is false): the bus holding the lease by which one bus applies the log (data dir, pid,
    host, since, ``renewing``: whether it still renews it), as the lease's key says (None: none
    has held it, or the last one stopped); ``standbys``: the buses waiting to take over
    (``collabbus up --standby``), the longest waiting first.

    ``data_dir``: the bus's data dir, whose last backup is reported (``backup``; None when none
    was made from it).

    ``portal``: how the running bus's portal connector's passes have gone (``Passes.state``),
    reported as ``portal`` with what the database holds of the sync (``_portal``).
    """
    streams = {name: await _stream(js, name) for name in (EVENTS_STREAM, DLQ_STREAM)}
    consumers = await _consumers(js, EVENTS_STREAM)
    for name, consumer in (running or {}).items():
        if name in consumers and consumer is not None:
            consumers[name].update(applied=consumer.applied, dead_lettered=consumer.dead_lettered,
                                   retrying=consumer.retrying, holding=consumer.trouble)
    status: dict[str, Any] = {"streams": streams, "consumers": consumers, "dead_letters": await dlq.counts(js)}
    if lease_holders:  # who holds the lease by which one bus applies the log (``bus.lease``), and who waits
        try:
            holder = await lease.holder_of(js, lease.NETWORK)
            status["standbys"] = await lease.standbys_of(js, lease.NETWORK)
        except NatsError as exc:  # (the rest of the report does not depend on it)
            log.warning("the lease on the log could not be read: %s", exc)
            holder, status["standbys"] = None, []
        status["applied_by"] = lease.public_view(holder) if holder else None
    if data_dir is not None:
        status["backup"] = last_backup(data_dir)
    if engine is not None:
        last_seq = (streams[EVENTS_STREAM] or {}).get("last_seq", 0)
        database, webhooks = await asyncio.to_thread(_database, engine, last_seq)
        status["database"] = database
        if webhooks is not None:
            status["webhooks"] = webhooks
    if portal is not None:
        status["portal"] = portal
    return status


# --- what the running bus's consumers wait on, for commands in other processes -----------------

STATE_FILE = "consumers.state.json"
"""In the data dir: the running bus's consumers and what each waits on (``retrying``, ``holding``)."""
STATE_EVERY = 1.0
STATE_FRESH = 10.0
"""A state file not written for this long is a stopped bus's, whatever its pid."""


def running_consumers(bus: Any) -> dict[str, Any]:
    """The consumer groups a bus process runs: name → ``bus.consumer.Consumer``."""
    running = {bus.consumer_settings.name: bus.consumer} if bus.consumer is not None else {}
    if bus.webhooks is not None:
        running[bus.webhooks.consumer.settings.name] = bus.webhooks.consumer
    return running


def consumer_state(running: Mapping[str, Any]) -> dict[str, dict[str, str | None]]:
    """What each running consumer waits on: an event to try again, a database it cannot write."""
    return {name: {"retrying": consumer.retrying, "holding": consumer.trouble}
            for name, consumer in running.items() if consumer is not None}


async def keep_consumer_state(
    data_dir: Path, running: Callable[[], Mapping[str, Any]], every: float = STATE_EVERY, *,
    portal: Callable[[], dict[str, Any] | None] = lambda: None,
) -> None:
    """Keep :func:`consumer_state` in ``<data dir>/consumers.state.json`` (written when it changes,
    its time renewed every ``every`` s) until cancelled, then remove it: ``collabbus status`` runs in another process and reads it there
    (``/ops/status`` asks the consumers directly). With them, how the portal connector's passes
    have gone (``portal``: ``Passes.state``, None without the connector)."""
    path = data_dir / STATE_FILE
    staging = path.with_name(f".{STATE_FILE}.{os.getpid()}")
    written: bytes | None = None
    try:
        while True:
            state = orjson.dumps({"pid": os.getpid(), "consumers": consumer_state(running()), "portal": portal()})
            try:
                if state == written:
                    os.utime(path)  # unchanged: only says the bus still runs
                else:
                    staging.write_bytes(state)
                    os.replace(staging, path)  # a reader sees the old state or the new one, never half of one
                    written = state
            except OSError as exc:  # a full disk must not stop the bus: only the report goes without
                written = None
                log.debug("consumer state not written: %s", exc)
            await asyncio.sleep(every)
    finally:
        for leftover in (staging, path):
            with contextlib.suppress(OSError):
                leftover.unlink()


def read_consumer_state(data_dir: Path) -> dict[str, dict[str, Any]] | None:
    """The running bus's consumer state (:func:`keep_consumer_state`), or None when there is none,
    or it is a stopped bus's (not written lately, or its process is gone)."""
    consumers = (_running_bus_state(data_dir) or {}).get("consumers")
    return consumers if isinstance(consumers, dict) else None


def read_portal_state(data_dir: Path) -> dict[str, Any] | None:
    """How the running bus's portal connector's passes have gone (``Passes.state``), or None
    when no bus runs here, or it runs no portal connector."""
    portal = (_running_bus_state(data_dir) or {}).get("portal")
    return portal if isinstance(portal, dict) else None


def _running_bus_state(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATE_FILE
    try:
        written = path.stat().st_mtime
        state = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    if time.time() - written > STATE_FRESH or not isinstance(state, dict) or not _alive(state.get("pid")):
        return None
    return state


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process, alive
        return True
    return True


async def _stream(js: JetStreamContext, name: str) -> dict[str, Any] | None:
    try:
        info = await js.stream_info(name)
    except NotFoundError:
        return None
    state = info.state
    replicas = info.config.num_replicas or 1
    cluster = info.cluster
    if cluster is None or replicas == 1:  # one copy, the server's own (or a server outside a cluster)
        leader, behind = (cluster.leader if cluster is not None else None), []
    else:  # the leader's copy and each follower's: one offline, or not caught up, is behind
        leader = cluster.leader
        peers = cluster.replicas or []
        behind = sorted(peer.name or "(a replica)" for peer in peers if peer.offline or not peer.current)
        behind += ["(a replica not placed)"] * max(0, replicas - 1 - len(peers))
        if leader is None:
            behind.append("(no leader)")
    return {
        "messages": state.messages,
        "bytes": state.bytes,
        "first_seq": state.first_seq,
        "last_seq": state.last_seq,
        "replicas": replicas,
        "leader": leader,
        "replicas_current": max(0, replicas - len(behind)),
        "replicas_behind": behind,
        "consumers": state.consumer_count,
    }


async def _consumers(js: JetStreamContext, stream: str) -> dict[str, dict[str, Any]]:
    """The stream's durable consumers (the groups; tools' short-lived cursors are left out)."""
    try:
        infos = await js.consumers_info(stream)
    except NotFoundError:
        return {}
    found = {}
    for info in sorted(infos, key=lambda i: i.name):
        if not info.config.durable_name:
            continue
        delivered = info.delivered
        found[info.name] = {
            "stream": stream,
            "pending": info.num_pending or 0,
            "ack_pending": info.num_ack_pending or 0,
            "redelivered": info.num_redelivered or 0,
            "waiting": info.num_waiting or 0,
            "last_delivered": delivered.stream_seq if delivered else 0,
            "last_active": _time(delivered.last_active) if delivered else None,
            "acked": info.ack_floor.stream_seq if info.ack_floor else 0,
        }
    return found


def _database(engine: sa.Engine, last_seq: int) -> tuple[dict[str, Any], list[dict[str, Any]] | None]:
    """How far each consumer's database position is (and how far behind the log), and the
    webhook endpoints (None when the database has no webhook tables)."""
    database: dict[str, Any] = {"url": engine.url.render_as_string(hide_password=True)}
    try:
        with reading(engine).connect() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            positions: dict[str, int] = {}
            for table in ("consumer_positions", "webhook_consumer_positions"):
                if table in tables:
                    positions.update(connection.execute(sa.text(f"SELECT consumer, seq FROM {table}")).all())
            database["positions"] = {
                name: {"seq": seq, "behind": max(last_seq - seq, 0)} for name, seq in sorted(positions.items())
            }
            if "parked_subjects" in tables:  # what a consumer sets aside behind its dead letters
                database["set_aside"] = [
                    {"consumer": consumer, "domain": domain, "subject": subject, "behind": first, "last": last}
                    for consumer, domain, subject, first, last in parked(connection)
                ]
            if "outbox" in tables:
                waiting, oldest = outbox_backlog(connection)
                database["outbox"] = {"waiting": waiting, "oldest": _time(oldest)}
            if "portal_cursors" in tables:
                database["portals"] = _portals(connection, tables)
            if connection.dialect.name == "postgresql" and "projects" in tables:  # (SQLite's search has no index)
                database["search_unindexed"] = unindexed(connection)
            if "webhook_endpoints" not in tables:
                return database, None
            owed: dict[str, int] = dict(connection.execute(sa.text(
                "SELECT endpoint_id, COUNT(*) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL GROUP BY endpoint_id"
            )).all())
            rows = connection.execute(sa.text(
                "SELECT id, institution, url, enabled, disabled_reason, disabled_at, failing_since, last_success_at "
                "FROM webhook_endpoints ORDER BY institution, id"
            )).mappings().all()
            last_errors = {row["id"]: _last_error(connection, row["id"]) for row in rows if row["failing_since"] is not None}
    except sa.exc.SQLAlchemyError as exc:
        database["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        return database, None
    webhooks = [
        {
            "id": row["id"], "institution": row["institution"], "url": row["url"], "enabled": bool(row["enabled"]),
            "disabled_reason": row["disabled_reason"], "disabled_at": _time(row["disabled_at"]),
            "failing_since": _time(row["failing_since"]),
            "last_success_at": _time(row["last_success_at"]), "owed": owed.get(row["id"], 0),
            "last_error": last_errors.get(row["id"]),
        }
        for row in rows
    ]
    return database, webhooks


def _portals(connection: sa.Connection, tables: set[str]) -> list[dict[str, Any]]:
    """What the database holds of each portal's sync: how far it read (the newest change applied,
    when its last page was stored, whether a paged read is under way), the entries it knows, and
    the network's projects marked for publication there, with those whose last push failed."""
    entries: dict[str, int] = dict(connection.execute(sa.text(
        "SELECT portal, COUNT(*) FROM portal_entries GROUP BY portal")).all()) if "portal_entries" in tables else {}
    published: dict[str, tuple[int, int]] = {
        portal: (marked, int(failing or 0)) for portal, marked, failing in connection.execute(sa.text(
            "SELECT portal, COUNT(*), SUM(CASE WHEN error IS NULL THEN 0 ELSE 1 END) FROM portal_publications GROUP BY portal"))
    } if "portal_publications" in tables else {}
    return [
        {"portal": portal, "high_water": high_water, "saved_at": _time(saved_at), "reading": cursor is not None,
         "entries": entries.get(portal, 0), "publications": published.get(portal, (0, 0))[0],
         "publications_failing": published.get(portal, (0, 0))[1]}
        for portal, high_water, saved_at, cursor in connection.execute(sa.text(
            "SELECT portal, high_water, saved_at, cursor FROM portal_cursors ORDER BY portal"))
    ]


def _last_error(connection: sa.Connection, endpoint_id: str) -> str | None:
    """What a failing endpoint's last attempt met (``HTTP 500: its answer's start``), for an
    operator who cannot read the endpoint's deliveries (its member's)."""
    row = connection.execute(sa.text(
        "SELECT a.error, a.response FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id "
        "WHERE d.endpoint_id = :endpoint ORDER BY a.id DESC LIMIT 1"
    ), {"endpoint": endpoint_id}).first()
    if row is None or row[0] is None:
        return None
    answer = " ".join(str(row[1] or "").split())[:120]
    return f"{row[0]}: {answer}" if answer else str(row[0])


def _time(value: datetime | str | None) -> str | None:
    """A stored moment as the API writes it: UTC, ``Z`` (SQLite hands back naive text)."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return value
    else:
        moment = value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
