"""Prometheus metrics of a bus process, served at ``/metrics`` (CONTRACT §6).

Two kinds:

- what the code counts as it happens — offers judged by the gate, time spent applying each event —
  on prometheus-client's process-wide registry (beside its process and GC metrics);
- what is read from the shared sources of truth when scraped (:func:`snapshot`): the log's last
  sequence, each consumer group's lag, the dead letters per consumer, webhook attempts by outcome,
  the webhook endpoints failing or disabled, the derived events waiting in the outbox.
  Those hold for the whole bus, whichever process serves them, and survive restarts.

Label values are bounded: an event type the catalog does not know is ``unknown``, an institution
the gate does not know as a member is ``other`` (an ingress subject can name anything), and a
webhook endpoint is named by its id (never its URL), as many as the members registered.

``/metrics`` answers whoever reaches the gateway (Prometheus scrapes it without a token), so it says
nothing the members' own reads would not: an offer of a confidential type (an application, a review
before the decision: :mod:`handlers.confidential`) is counted under the institution ``confidential``,
not its member — which members applied to calls or reviewed is for the parties alone. A webhook
endpoint is named by its id and member (the deliveries it is owed; since when it fails, or when it
was disabled) for the operator's alerts: its URL is not served, and its id is of no use without
its member's token.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from functools import cache
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.samples import Sample
from prometheus_client.registry import Collector

from bus.streams import EVENTS_STREAM
from bus.verdict import Verdict

disable_created_metrics()  # ``*_created`` samples double the text and no dashboard reads them

OFFERED = Counter("collabbus_events_offered", "events offered to the gate", ["type", "institution"])
ACCEPTED = Counter("collabbus_events_accepted", "events the gate accepted into the log (duplicates included)", ["type", "institution"])
REJECTED = Counter("collabbus_events_rejected", "events the gate rejected, by reason", ["type", "institution", "reason"])
HANDLER_SECONDS = Histogram(
    "collabbus_handler_duration_seconds", "time to apply one logged event to the read models (projections and workflows)",
    ["type"], buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

TIMERS_SECONDS = Histogram(
    "collabbus_timers_duration_seconds", "time to run the timers once (calls closing at their deadline, invitations "
    "lapsing, late reviewers, meetings at a day's registration deadline), every second: the bus's events wait meanwhile",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

OTHER_INSTITUTION = "other"
CONFIDENTIAL_INSTITUTION = "confidential"
UNKNOWN_TYPE = "unknown"


@cache
def _known_types() -> frozenset[str]:
    from schemas import registry

    return frozenset(registry.event_types())


@cache
def _confidential_types() -> frozenset[str]:
    from handlers.confidential import CONFIDENTIAL

    return CONFIDENTIAL


def event_type_label(*candidates: object) -> str:
    """The first candidate that is a catalog type, else ``unknown``."""
    known = _known_types()
    return next((c for c in candidates if isinstance(c, str) and c in known), UNKNOWN_TYPE)


def count_offer(institution: str, raw: Mapping[str, Any] | None, offered_type: str | None, verdict: Verdict) -> None:
    """Count one offer the gate judged (``institution``: already bounded by the caller; an offer of a
    confidential type is counted without it)."""
    event_type = event_type_label(raw.get("type") if raw else None, offered_type)
    if event_type in _confidential_types():
        institution = CONFIDENTIAL_INSTITUTION
    key = (event_type, institution, None if verdict.accepted else verdict.reason or "unknown")
    counters = _offer_counters.get(key)
    if counters is None:  # the labelled children, looked up once per label set (the labels are bounded)
        outcome = ACCEPTED.labels(event_type, institution) if key[2] is None else REJECTED.labels(*key)
        counters = _offer_counters[key] = (OFFERED.labels(event_type, institution), outcome)
    counters[0].inc()
    counters[1].inc()


_offer_counters: dict[tuple[str, str, str | None], tuple[Any, Any]] = {}


BUS_STATES = ("starting", "standby", "running")
"""What a bus's address serves: ``starting`` (it waits — for JetStream, another bus's lease —,
``/readyz`` saying for what), ``standby`` (another bus applies the log), ``running`` (the gateway)."""


def state_family(state: str) -> GaugeMetricFamily:
    """``collabbus_state``: 1 for the state the bus is in (:data:`BUS_STATES`), 0 for the others."""
    family = GaugeMetricFamily(
        "collabbus_state", "what this bus does: starting (it waits; /readyz says for what), standby (another bus "
        "applies the log) or running (it serves the gateway); 1 for the state it is in", labels=["state"],
    )
    for name in BUS_STATES:
        family.add_metric([name], 1 if name == state else 0)
    return family


def nats_family(connected: bool) -> GaugeMetricFamily:
    """``collabbus_nats_connected``: 1 while the connection is up and its server answers."""
    return GaugeMetricFamily("collabbus_nats_connected", "1 while the bus's connection to NATS is up and its server answers",
                             value=1 if connected else 0)


def waiting_exposition(state: str, *, nats_connected: bool) -> bytes:
    """The Prometheus text of a bus that starts or stands by (``state``): its process's metrics,
    its state and whether NATS answers it. The log's and the read models' series come once it
    runs: a scrape meanwhile must not wait on what the bus itself waits for."""
    waiting = CollectorRegistry(auto_describe=False)
    waiting.register(_Value(state_family(state)))
    waiting.register(_Value(nats_family(nats_connected)))
    return generate_latest(REGISTRY) + generate_latest(waiting)


class _Snapshot(Collector):
    """Metric families from one reading of the bus's status and the webhook attempts."""

    def __init__(self, status: Mapping[str, Any] | None, webhook_attempts: Mapping[str, int] | None, nats_connected: bool) -> None:
        self.status = status
        self.webhook_attempts = webhook_attempts
        self.nats_connected = nats_connected

    def collect(self) -> Iterator[Metric]:
        yield state_family("running")
        yield nats_family(self.nats_connected)
        yield GaugeMetricFamily("collabbus_status_readable", "1 when the log's and consumers' state could be read "
                                "from NATS for this scrape (0: the log, lag and dead-letter series are missing)",
                                value=0 if self.status is None else 1)
        yield from self._webhooks()
        if self.status is None:
            return
        events = self.status["streams"].get(EVENTS_STREAM)
        if events is not None:
            yield GaugeMetricFamily("collabbus_log_last_seq", "last sequence of the event log", value=events["last_seq"])
        wanted = GaugeMetricFamily("collabbus_stream_replicas", "copies a stream of the bus is to have (COLLABBUS_STREAM_REPLICAS)",
                                   labels=["stream"])
        current = GaugeMetricFamily("collabbus_stream_replicas_current", "copies of a stream of the bus that are online and "
                                    "caught up, its leader's included", labels=["stream"])
        for name, stream in sorted(self.status["streams"].items()):
            if stream is not None:
                wanted.add_metric([name], stream["replicas"])
                current.add_metric([name], stream["replicas_current"])
        yield from (wanted, current)
        pending = GaugeMetricFamily("collabbus_consumer_pending", "logged events not yet delivered to a consumer group", labels=["consumer"])
        acks = GaugeMetricFamily("collabbus_consumer_ack_pending", "events delivered to a consumer group, not yet acknowledged", labels=["consumer"])
        lag = GaugeMetricFamily("collabbus_consumer_lag", "logged events a consumer group has not applied yet (pending + ack pending)", labels=["consumer"])
        for name, consumer in self.status["consumers"].items():
            pending.add_metric([name], consumer["pending"])
            acks.add_metric([name], consumer["ack_pending"])
            lag.add_metric([name], consumer["pending"] + consumer["ack_pending"])
        yield from (pending, acks, lag)
        dead = GaugeMetricFamily("collabbus_dead_letters", "messages in the dead-letter stream, per consumer", labels=["consumer"])
        counts = {name: 0 for name in self.status["consumers"]}  # a series for each consumer group, none dead-lettered included
        counts.update(self.status["dead_letters"])
        for name, count in sorted(counts.items()):
            dead.add_metric([name], count)
        yield dead

    def _webhooks(self) -> Iterator[Metric]:
        if self.webhook_attempts is not None:
            attempts = CounterMetricFamily(
                "collabbus_webhook_attempts", "webhook delivery attempts recorded, by outcome (delivered: 2xx; failed: "
                "another status; error: no answer, refused target or timeout)", labels=["outcome"],
            )
            for outcome in ("delivered", "failed", "error"):
                attempts.add_metric([outcome], self.webhook_attempts.get(outcome, 0))
            yield attempts


class _WithGatekeepers(Collector):
    """This process's metrics with the gatekeeper processes' counters added in (``bus.gates``):
    one family per name, each sample the sum over the processes."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        theirs: dict[str, Metric] = {}
        with contextlib.suppress(OSError):  # the directory is made again when the bus starts
            theirs = {family.name: family for family in MultiProcessCollector(None, path=self.directory).collect()}
        for family in REGISTRY.collect():
            other = theirs.pop(family.name, None)
            if other is not None:
                totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
                for sample in (*family.samples, *other.samples):
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    totals[key] = totals.get(key, 0.0) + sample.value
                family.samples = [Sample(name, dict(labels), value) for (name, labels), value in totals.items()]
            yield family
        yield from theirs.values()


class _Gatekeepers(Collector):
    """How the bus's gatekeeper processes are doing (``bus.gates.GateProcesses``)."""

    def __init__(self, gates: Any) -> None:
        self.gates = gates

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("collabbus_gatekeepers", "gatekeeper processes the bus runs", value=self.gates.count)
        yield GaugeMetricFamily("collabbus_gatekeepers_ready", "gatekeeper processes judging offers now", value=self.gates.ready)
        yield CounterMetricFamily(
            "collabbus_gatekeeper_restarts", "gatekeeper processes started again after they exited", value=self.gates.restarts,
        )


class _Portal(Collector):
    """How the portal connector's passes have gone (``connectors.portal.connector.Passes``)."""

    def __init__(self, passes: Any) -> None:
        self.passes = passes

    def collect(self) -> Iterator[Metric]:
        passes = CounterMetricFamily("collabbus_portal_sync_passes", "portal sync passes, by outcome (complete; stopped: "
                                     "the portal or the log failed it, and the next pass resumes from the last page stored)",
                                     labels=["outcome"])
        passes.add_metric(["complete"], self.passes.complete)
        passes.add_metric(["stopped"], self.passes.stopped)
        yield passes
        yield CounterMetricFamily("collabbus_portal_entries_rejected", "portal entries the sync rejected (malformed, or refused "
                                  "by the gate): read again only once they change on the portal", value=self.passes.rejected)
        yield GaugeMetricFamily("collabbus_portal_sync_stopped", "1 when the last portal sync pass stopped before its end",
                                value=1 if self.passes.last_stopped else 0)
        if self.passes.last_complete_at is not None:
            yield GaugeMetricFamily("collabbus_portal_sync_last_complete_timestamp_seconds",
                                    "when the last complete portal sync pass ended", value=self.passes.last_complete_at)


class _Checkpoints(Collector):
    """The SQLite files the bus checkpoints in the background (``ops.wal``): how far their
    write-ahead logs have grown (one that keeps growing is not being checkpointed) and how many
    checkpoints were made."""

    def __init__(self, checkpointers: Sequence[Any]) -> None:
        self.checkpointers = checkpointers

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily("collabbus_sqlite_wal_bytes", "size of a SQLite database's write-ahead log "
                                 "(checkpointed in the background; bounded at 40 MB should that stop)", labels=["database"])
        made = CounterMetricFamily("collabbus_sqlite_checkpoints", "background checkpoints of a SQLite database's "
                                   "write-ahead log", labels=["database"])
        for checkpointer in self.checkpointers:
            size.add_metric([checkpointer.path.name], checkpointer.wal_bytes)
            made.add_metric([checkpointer.path.name], checkpointer.checkpoints)
        yield from (size, made)


class _Outbox(Collector):
    """The derived events the relay has not logged yet."""

    def __init__(self, waiting: int, oldest_age: float | None) -> None:
        self.waiting, self.oldest_age = waiting, oldest_age

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("collabbus_outbox_events", "derived events (the workflows' answers) waiting in the outbox "
                                "for the relay to log them", value=self.waiting)
        yield GaugeMetricFamily("collabbus_outbox_oldest_age_seconds", "how long the oldest derived event in the outbox "
                                "has waited (0 when none waits): one that keeps growing is not being logged",
                                value=self.oldest_age or 0.0)


class _AccessExpiries(Collector):
    """When members lose access (``access_expiries``)."""

    def __init__(self, expiries: Mapping[tuple[str, str], float]) -> None:
        self.expiries = expiries

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "collabbus_access_expires_timestamp_seconds",
            "when the last of a member's valid HTTP tokens (kind=token) or NATS credentials (kind=nats) expires (Unix "
            "time); no series while it holds one valid until revoked, or none", labels=["institution", "kind"])
        for (institution, kind), at in sorted(self.expiries.items()):
            family.add_metric([institution, kind], at)
        yield family


def access_expiries(engine: Any, authority: Any = None) -> dict[tuple[str, str], float]:
    """``(institution, "token" | "nats")`` → when the member loses that access: the latest expiry
    of its valid tokens (the read models' ``institution_tokens``) or of the NATS credentials the
    embedded server's ``authority`` issued, for the members all of whose valid ones expire."""
    import sqlalchemy as sa

    latest: dict[tuple[str, str], float | None] = {}

    def note(institution: str, kind: str, expires: float | None) -> None:
        key = (institution, kind)
        known = latest.get(key, 0.0)
        latest[key] = None if expires is None or known is None else max(known, expires)

    if engine is not None:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            from handlers.db import reading
            from handlers.tokens import valid_expiries

            with reading(engine).connect() as connection:
                rows = valid_expiries(connection)
            for institution, expires in rows:
                note(institution, "token", expires.timestamp() if expires is not None else None)
    if authority is not None:
        for entry in authority.valid_credentials():
            note(entry["institution"], "nats", entry["expires_at"])
    return {key: at for key, at in latest.items() if at is not None}


ENDPOINT_STATES = ("enabled", "failing", "disabled")
"""A webhook endpoint is ``enabled`` (delivering), ``failing`` (enabled, no success since an
attempt failed) or ``disabled`` (nothing is sent to it)."""


class _WebhookEndpoints(Collector):
    """How the webhook endpoints fare (:func:`webhook_endpoints`)."""

    def __init__(self, endpoints: Sequence[Mapping[str, Any]]) -> None:
        self.endpoints = endpoints

    def collect(self) -> Iterator[Metric]:
        from connectors.webhooks.store import disabled_cause

        states = GaugeMetricFamily("collabbus_webhook_endpoints", "webhook endpoints by state: enabled (delivering), failing "
                                   "(enabled, no success since an attempt failed) or disabled (nothing is sent to it)",
                                   labels=["state"])
        failing = GaugeMetricFamily(
            "collabbus_webhook_endpoint_failing_since_timestamp_seconds", "when an enabled webhook endpoint's first failed "
            "attempt since its last success was made (Unix time; it is disabled after five days of it); no series while it "
            "delivers or is disabled", labels=["endpoint", "institution"])
        disabled = GaugeMetricFamily(
            "collabbus_webhook_endpoint_disabled_timestamp_seconds", "when a disabled webhook endpoint was disabled (Unix "
            "time), and why: gone (it answered 410), failing (no success for five days), owner, left (its institution left "
            "the network) or other; no series while it is enabled", labels=["endpoint", "institution", "reason"])
        owed = GaugeMetricFamily("collabbus_webhook_owed", "deliveries still owed to a webhook endpoint (waiting for their "
                                 "next attempt; a disabled endpoint's wait until it is enabled again)",
                                 labels=["endpoint", "institution"])
        counts = dict.fromkeys(ENDPOINT_STATES, 0)
        for endpoint in self.endpoints:
            labels = [endpoint["id"], endpoint["institution"]]
            if not endpoint["enabled"]:
                counts["disabled"] += 1
                at = endpoint["disabled_at"]
                disabled.add_metric([*labels, disabled_cause(endpoint["disabled_reason"])], at.timestamp() if at else 0.0)
            elif endpoint["failing_since"] is not None:
                counts["failing"] += 1
                failing.add_metric(labels, endpoint["failing_since"].timestamp())
            else:
                counts["enabled"] += 1
            owed.add_metric(labels, endpoint["owed"])
        for state, count in counts.items():
            states.add_metric([state], count)
        yield from (states, failing, disabled, owed)


def webhook_endpoints(engine: Any) -> list[dict[str, Any]] | None:
    """Every webhook endpoint's id, institution, whether it is enabled, since when it fails, when
    and why it was disabled, and how many deliveries it is owed; None without webhook tables (or
    when they cannot be read)."""
    import sqlalchemy as sa

    if engine is None:
        return None
    try:
        from handlers.db import reading

        with reading(engine).connect() as connection:
            if not sa.inspect(connection).has_table("webhook_endpoints"):
                return None
            owed: dict[str, int] = dict(connection.execute(sa.text(
                "SELECT endpoint_id, COUNT(*) FROM webhook_deliveries WHERE next_attempt_at IS NOT NULL GROUP BY endpoint_id"
            )).all())
            rows = connection.execute(sa.text(
                "SELECT id, institution, enabled, failing_since, disabled_at, disabled_reason FROM webhook_endpoints ORDER BY id"
            )).mappings().all()
    except sa.exc.SQLAlchemyError:
        return None
    return [{**row, "enabled": bool(row["enabled"]), "failing_since": _utc(row["failing_since"]),
             "disabled_at": _utc(row["disabled_at"]), "owed": owed.get(row["id"], 0)} for row in rows]


def _utc(value: datetime | str | None) -> datetime | None:
    """A stored moment, aware (SQLite hands back naive UTC text)."""
    if value is None:
        return None
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


class _Backup(Collector):
    """When the network was last backed up from this data dir (``collabbus backup``)."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.at = datetime.fromisoformat(record["at"]).timestamp() if record.get("at") else 0.0

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("collabbus_backup_last_timestamp_seconds", "when the last `collabbus backup` of this data "
                                "dir's network was made (Unix time; 0: none was)", value=self.at)


class _Value(Collector):
    """One metric family, as it is."""

    def __init__(self, family: Metric) -> None:
        self.family = family

    def collect(self) -> Iterator[Metric]:
        yield self.family


def exposition(
    status: Mapping[str, Any] | None,
    webhook_attempts: Mapping[str, int] | None,
    *registries: CollectorRegistry,
    gates: Any = None,
    nats_connected: bool = True,
    checkpointers: Sequence[Any] = (),
    outbox: tuple[int, float | None] | None = None,
    backup: Mapping[str, Any] | None = None,
    expiries: Mapping[tuple[str, str], float] | None = None,
    lease_age: float | None = None,
    set_aside: Mapping[str, int] | None = None,
    webhook_endpoints: Sequence[Mapping[str, Any]] | None = None,
    consumers: Mapping[str, Mapping[str, str | None]] | None = None,
    portal: Any = None,
) -> bytes:
    """The Prometheus text of ``registries``, the process-wide metrics (with the counters of the
    gatekeeper processes ``gates``, when the bus runs any), a status snapshot (None: NATS could
    not be read; everything else is still served), the background checkpoints of SQLite files
    and the outbox (:func:`outbox_waiting`); ``backup``: the data dir's last backup record
    (``ops.backup.last_backup``, ``{}`` when there is none); ``expiries``: when members lose
    access (:func:`access_expiries`); ``lease_age``: seconds since this bus last renewed its lease
    on the log (``bus.lease.Lease.renewed_ago``; None: it holds none); ``set_aside``: per consumer,
    how many things it sets aside behind its dead letters (:func:`set_aside_counts`);
    ``webhook_endpoints``: how the webhook endpoints fare (:func:`webhook_endpoints`; None: the
    database has no webhook tables, or could not be read); ``consumers``: what the consumer groups
    this process runs wait on (``ops.status.consumer_state``); ``portal``: how the portal
    connector's passes have gone (``connectors.portal.connector.Passes``; None: it does not run)."""
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Snapshot(status, webhook_attempts, nats_connected))
    if outbox is not None:
        snapshot.register(_Outbox(*outbox))
    if backup is not None:
        snapshot.register(_Backup(backup))
    if expiries is not None:
        snapshot.register(_AccessExpiries(expiries))
    if lease_age is not None:
        snapshot.register(_Value(GaugeMetricFamily(
            "collabbus_log_lease_renewed_age_seconds", "seconds since this bus last renewed its lease on the log (it "
            "applies events only while this is under 3.5; another bus may take the log over after 5)", value=lease_age)))
    if set_aside is not None:
        aside = GaugeMetricFamily("collabbus_set_aside", "things (a project, a call…) whose later events wait in the dead-letter "
                                  "queue behind one the consumer could not apply, per consumer", labels=["consumer"])
        for consumer, count in sorted(set_aside.items()):
            aside.add_metric([consumer], count)
        snapshot.register(_Value(aside))
    if webhook_endpoints is not None:
        snapshot.register(_WebhookEndpoints(webhook_endpoints))
    if consumers is not None:
        retrying = GaugeMetricFamily("collabbus_consumer_retrying", "1 while a consumer group waits to try an event "
                                     "again that failed (the events after it wait; dead-lettered after its last delivery)",
                                     labels=["consumer"])
        holding = GaugeMetricFamily("collabbus_consumer_holding", "1 while a consumer group holds its events back because "
                                    "it cannot write its database or has lost its lease on the log (/readyz says why)",
                                    labels=["consumer"])
        for name, waits in sorted(consumers.items()):
            retrying.add_metric([name], 1 if waits.get("retrying") else 0)
            holding.add_metric([name], 1 if waits.get("holding") else 0)
        snapshot.register(_Value(retrying))
        snapshot.register(_Value(holding))
    if portal is not None:
        snapshot.register(_Portal(portal))
    if checkpointers:
        snapshot.register(_Checkpoints(checkpointers))
    process: Any = REGISTRY
    if gates is not None:
        process = CollectorRegistry(auto_describe=False)
        process.register(_WithGatekeepers(str(gates.metrics_dir)))
        snapshot.register(_Gatekeepers(gates))
    return b"".join(generate_latest(registry) for registry in (*registries, process, snapshot))


def outbox_waiting(engine: Any) -> tuple[int, float | None] | None:
    """How many derived events wait in the outbox and the oldest one's age in seconds; None
    without the read models (or when they cannot be read)."""
    import sqlalchemy as sa

    if engine is None:
        return None
    try:
        from handlers.bookkeeping import outbox_backlog
        from handlers.db import reading

        with reading(engine).connect() as connection:
            waiting, oldest = outbox_backlog(connection)
    except sa.exc.SQLAlchemyError:
        return None
    age = None if oldest is None else max((datetime.now(timezone.utc) - oldest).total_seconds(), 0.0)
    return waiting, age


def set_aside_counts(engine: Any, consumers: Sequence[str] = ("network",)) -> dict[str, int] | None:
    """Per consumer (``consumers`` with 0 when none), how many things it sets aside behind its
    dead letters; None without the read models (or when they cannot be read)."""
    import sqlalchemy as sa

    if engine is None:
        return None
    try:
        from handlers.bookkeeping import parked
        from handlers.db import reading

        with reading(engine).connect() as connection:
            things = parked(connection)
    except sa.exc.SQLAlchemyError:
        return None
    counts = {consumer: 0 for consumer in consumers}
    for consumer, *_ in things:
        counts[consumer] = counts.get(consumer, 0) + 1
    return counts


class WebhookAttempts:
    """Webhook attempts recorded in the database, by outcome, for ``/metrics``.

    Read from the attempt log the dispatcher keeps (CONTRACT §7), so the numbers hold across
    processes and restarts without a hook in the dispatcher. An attempt is never changed, only
    added or (with its endpoint, or past the retention) deleted: the first scrape counts the log,
    each later one only the attempts recorded since (their ids past the last one counted) — a
    scrape does not read a year of attempts. The counts never go down: deleted attempts stay
    counted, as a counter wants."""

    def __init__(self) -> None:
        self.counted: dict[str, int] = {}
        self._last_id = 0
        self._lock = threading.Lock()  # two scrapes at once count each attempt once

    def read(self, engine: Any) -> dict[str, int] | None:
        """The counts so far; None without webhook tables (or when they cannot be read)."""
        with self._lock:
            return self._read(engine)

    def _read(self, engine: Any) -> dict[str, int] | None:
        import sqlalchemy as sa

        if engine is None:
            return None
        try:
            from handlers.db import reading

            with reading(engine).connect() as connection:
                if not sa.inspect(connection).has_table("webhook_attempts"):
                    return None
                newest = connection.execute(sa.text("SELECT MAX(id) FROM webhook_attempts")).scalar() or 0
                self._last_id = min(self._last_id, newest)  # (the newest deleted: their ids may be given again)
                rows = connection.execute(sa.text(
                    "SELECT CASE WHEN status_code IS NULL THEN 'error' "
                    "WHEN status_code BETWEEN 200 AND 299 THEN 'delivered' ELSE 'failed' END AS outcome, COUNT(*) "
                    "FROM webhook_attempts WHERE id > :last AND id <= :newest GROUP BY 1"
                ), {"last": self._last_id, "newest": newest}).all()
        except sa.exc.SQLAlchemyError:
            return None
        for outcome, count in rows:
            self.counted[outcome] = self.counted.get(outcome, 0) + int(count)
        self._last_id = newest
        return dict(self.counted)
