"""Which bus applies the log: a lease in a NATS key-value bucket (one bus applies a log).

A bus that applies the log — runs its consumers, timers, relay and webhooks — holds the lease
named after its network consumer in the bucket ``collabbus_buses``: a key it created, whose
revision it moves every :data:`RENEW_EVERY` seconds. Creating a key is atomic on the server, so
of two buses starting at the same moment one holds it and the other waits (or, unless it is a
standby, refuses); a holder whose revision has not moved for :data:`STALE_AFTER` seconds is gone
(killed, or cut off from NATS), and the lease is taken over by a compare-and-set on the revision
seen, which again only one taker wins. A bus that stops deletes its key, so its successor starts
at once; so does one finding that the holder was a process of this host that has ended.

A taker waits :data:`STALE_AFTER` seconds from the first moment it saw a revision; the holder
applies events only while its last renewal that went through was sent less than
``STALE_AFTER - FENCE_MARGIN`` seconds ago (:attr:`Lease.fresh`), both on their own clocks of
time since boot, which count a suspended machine's sleep (:func:`clock`). So a holder cut off from NATS, or stalled, has stopped applying before anyone can take
over — at most the batch in hand finishes — and it learns that it lost the lease at its next
renewal, which is refused (:attr:`Lease.lost`): it stops for good then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import orjson
from nats.errors import ConnectionClosedError
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from bus.log import stored
from bus.streams import UNANSWERED, Unanswered
from bus.tasks import stop_if_cancelled
from ops.logs import Spell

log = logging.getLogger("collabbus.lease")

BUCKET = "collabbus_buses"
NETWORK = "network"
"""The lease of a bus applying the log: named after its network consumer (``bus.runtime.NETWORK_CONSUMER``)."""
RENEW_EVERY = 1.0
"""Seconds between a holder's renewals."""
STALE_AFTER = 5.0
"""Seconds a lease's revision must stand still before another bus takes it over."""
FENCE_MARGIN = 1.5
"""Seconds before a taker may act by which a holder that could not renew stops applying."""
FORGET_STANDBY_AFTER = 120.0
"""Seconds after which a standby's announcement nobody renews (the standby was killed) is removed
by the next standby that starts."""

_HELD_HERE: dict[str, "Lease"] = {}
"""The leases held by this process, by token: a holder of this host and process that is not among
them (a bus abandoned without stopping) is gone."""


class LogHeld(RuntimeError):
    """Another bus holds the lease (it applies the log)."""

    def __init__(self, message: str, holder: dict[str, Any]) -> None:
        super().__init__(message)
        self.holder = holder


def describe(holder: dict[str, Any]) -> str:
    """"the bus at /srv/collabbus (pid 4242 on host-a, since 2026-12-05T05:00:00Z)"."""
    what = "the rebuild of the read models" if holder.get("role") == "rebuild" else "the bus"
    where = f" at {holder['data_dir']}" if holder.get("data_dir") else ""
    return f"{what}{where} (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')})"


def renewed_ago(holder: dict[str, Any], now: datetime | None = None) -> float | None:
    """Seconds since the holder last renewed its lease (None: not said)."""
    try:
        renewed = datetime.fromisoformat(str(holder["renewed_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None
    return ((now or datetime.now(timezone.utc)) - renewed).total_seconds()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def bucket(js: JetStreamContext, *, replicas: int = 1) -> KeyValue:
    """The leases' bucket, made when missing (one value a key: only the newest counts); what it
    needs said when it cannot be used — as ``bus.streams.Unanswered`` when a request was not
    answered, for a starting bus to wait through."""
    try:
        try:
            return await js.key_value(BUCKET)
        except BucketNotFoundError:
            return await js.create_key_value(KeyValueConfig(
                bucket=BUCKET, description="collabbus: which bus applies the log", history=1,
                storage=StorageType.FILE, replicas=replicas))
    except (BucketNotFoundError, NatsError) as exc:  # (permissions, no JetStream, too few servers for the replicas)
        # (Unanswered for a request that was not answered: an election, or a permission NATS
        # denied — which a starting bus learns from its connection while it waits, bus.streams.)
        kind = Unanswered if isinstance(exc, UNANSWERED) else RuntimeError
        raise kind(
            f"the bus cannot use the NATS key-value bucket {BUCKET!r} by which one bus applies the log "
            f"({str(exc) or type(exc).__name__}): JetStream must be enabled for its account, and its credentials must "
            f"allow the stream KV_{BUCKET} and the subjects $KV.{BUCKET}.>") from exc


async def holder_of(js: JetStreamContext, name: str, *, watch: float = 1.5) -> dict[str, Any] | None:
    """Who holds the lease ``name`` by its key (None: nobody, or no bucket yet), with ``renewing``:
    whether it still renews it. When the time it last renewed (``renewed_at``, by its own clock)
    is recent, it is taken to; otherwise the key is watched for ``watch`` seconds, so that a
    holder whose clock is behind this one's is not called stopped."""
    try:
        kv = await js.key_value(BUCKET)
        entry = await kv.get(name)
    except (BucketNotFoundError, KeyNotFoundError):
        return None
    holder = _holder(entry.value)
    ago = renewed_ago(holder)
    renewing = ago is not None and ago <= STALE_AFTER
    if not renewing:
        await asyncio.sleep(watch)
        try:
            renewing = (await kv.get(name)).revision != entry.revision
        except KeyNotFoundError:
            return None  # it stopped meanwhile
    return {**holder, "renewing": renewing}


def _holder(value: bytes | None) -> dict[str, Any]:
    try:
        holder = orjson.loads(value or b"{}")
    except orjson.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _machine() -> str:
    """This machine since its last boot and this process namespace: two hosts of one name (cloned
    machines) differ in the first, containers of one host in the second; "" where unknown."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            return f"{boot.read().strip()}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _ended_here(holder: dict[str, Any]) -> bool:
    """The holder was a process of this machine and process namespace that has ended, or a bus of
    this process that was abandoned without stopping: nothing renews the lease any more."""
    machine = _machine()
    if not machine or holder.get("machine") != machine or holder.get("host") != socket.gethostname():
        return False
    if not isinstance(holder.get("pid"), int):
        return False
    if holder["pid"] == os.getpid():
        held = _HELD_HERE.get(holder.get("token", ""))
        return held is None or held._renewing is None or held._renewing.done()
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def clock() -> float:
    """Seconds since boot, the time a machine spent suspended included (``CLOCK_BOOTTIME``, where
    there is one; else the monotonic clock): a holder whose machine slept past its lease does not
    take itself for fresh on waking. (A taker reads the key again before it decides, so its own
    sleep cannot make a renewing holder look stale.)"""
    return time.clock_gettime(time.CLOCK_BOOTTIME) if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic()


def _identity(data_dir: str, role: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "machine": _machine(), "data_dir": data_dir, "role": role,
            "since": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "token": secrets.token_hex(8)}


def public_view(holder: dict[str, Any]) -> dict[str, Any]:
    """What a key says of a bus, for people: not its token, nor its machine's boot id."""
    return {k: v for k, v in holder.items() if k not in ("token", "machine")}


class Standby:
    """A bus waiting for the lease ``name`` (``collabbus up --standby``), announced under
    ``{name}.standby.{token}`` in the bucket and renewed every second, so that ``collabbus status``
    lists the standbys there are (:func:`standbys_of`). Its key goes when it stops waiting; the
    keys of standbys that were killed, when the next one starts."""

    def __init__(self, js: JetStreamContext, name: str, data_dir: str = "", *, replicas: int = 1) -> None:
        self.js, self.name, self.replicas = js, name, replicas
        self.me = _identity(data_dir, "standby")
        self.key = f"{name}.standby.{self.me['token']}"
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        kv = await bucket(self.js, replicas=self.replicas)
        await self._forget_the_gone(kv)
        self._task = asyncio.create_task(self._announce(kv), name=f"standby-{self.name}")

    async def _forget_the_gone(self, kv: KeyValue) -> None:
        """Remove the announcements nobody renewed for :data:`FORGET_STANDBY_AFTER` seconds (by
        their clocks: a minute's skew between hosts is no harm here)."""
        try:
            gone = [key for key, ago, _ in await _announcements(self.js, self.name) if ago > FORGET_STANDBY_AFTER]
        except Exception as exc:  # (not worth not waiting for: the next standby to start looks again)
            log.info("standby %s: the announcements were not read (%s)", self.name, exc)
            return
        for key in gone:
            try:
                await kv.purge(key)
                log.info("standby %s: removed %s, not announced for %.0f s", self.name, key, FORGET_STANDBY_AFTER)
            except Exception as exc:  # (NATS away: the next standby to start removes it)
                log.info("standby %s: %s not removed (%s)", self.name, key, exc)

    async def _announce(self, kv: KeyValue) -> None:
        while not self._stopped:
            try:
                await kv.put(self.key, orjson.dumps({**self.me, "renewed_at": _now()}))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: said again on the next round
                log.info("standby %s: not announced (%s)", self.name, exc)
            await asyncio.sleep(RENEW_EVERY)
            stop_if_cancelled()

    async def stop(self) -> None:
        self._stopped = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        try:
            await (await self.js.key_value(BUCKET)).purge(self.key)
        except Exception as exc:  # it goes stale, and status leaves it out
            log.info("standby %s: its key was not removed (%s)", self.name, exc)


async def _announcements(js: JetStreamContext, name: str) -> list[tuple[str, float, dict[str, Any]]]:
    """``(key, seconds since renewed, value)`` of each standby announced for the lease ``name``:
    each key's last value, read without a consumer (a removed one's is its purge marker, empty:
    left out)."""
    prefix = f"$KV.{BUCKET}."
    found = []
    async for message in stored(js, f"KV_{BUCKET}", f"{prefix}{name}.standby.>", from_leader=True):
        standby = _holder(message.data)
        ago = renewed_ago(standby)
        if ago is not None:
            found.append((message.subject.removeprefix(prefix), ago, standby))
    return found


async def standbys_of(js: JetStreamContext, name: str) -> list[dict[str, Any]]:
    """The standbys waiting for the lease ``name`` that announced themselves within the last
    ``3 × STALE_AFTER`` seconds (by their clocks), the longest waiting first."""
    try:
        found = [public_view(standby) for _, ago, standby in await _announcements(js, name) if ago <= 3 * STALE_AFTER]
    except NotFoundError:  # no bucket yet
        return []
    return sorted(found, key=lambda standby: str(standby.get("since")))


@dataclass
class Lease:
    """The lease ``name`` (the network consumer's name), for one bus."""

    js: JetStreamContext
    name: str
    data_dir: str = ""
    role: str = "bus"
    """``bus``, or ``rebuild`` while ``collabbus rebuild`` replays the log (no bus may apply it then)."""
    replicas: int = 1
    renew_every: float = RENEW_EVERY
    stale_after: float = STALE_AFTER
    fence_margin: float = FENCE_MARGIN
    on_lost: Callable[[dict[str, Any]], Any] | None = None
    """Called (with the new holder) when a renewal finds that another bus took the lease over."""
    lost: dict[str, Any] | None = None
    """The bus that took the lease over, once this one lost it."""
    _kv: KeyValue | None = field(default=None, init=False, repr=False)
    _revision: int = field(default=0, init=False, repr=False)
    _renewing: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _renewed: float = field(default=0.0, init=False, repr=False)
    """When (:func:`clock`) the last renewal that went through, or the take, was sent."""
    _losing: bool = field(default=False, init=False, repr=False)
    _stopped: bool = field(default=False, init=False, repr=False)
    me: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.me = _identity(self.data_dir, self.role)

    def _value(self) -> bytes:
        return orjson.dumps({**self.me, "renewed_at": _now()})

    @property
    def held(self) -> bool:
        return self._renewing is not None and not self._renewing.done() and self.lost is None

    @property
    def renewed_ago(self) -> float | None:
        """Seconds since the last renewal that went through (or the take) was sent; None when not held."""
        return clock() - self._renewed if self.held else None

    @property
    def fresh(self) -> bool:
        """Held, and renewed recently enough that no other bus can have taken it over yet: what
        applies the log asks this before each batch (a taker waits ``stale_after`` from the last
        renewal it saw; this stops ``fence_margin`` before)."""
        return self.held and clock() - self._renewed < self.stale_after - self.fence_margin

    async def take(self, *, patience: float | None, on_wait: Callable[[dict[str, Any]], Any] | None = None,
                   force: bool = False) -> None:
        """Hold the lease, waiting up to ``patience`` seconds (None: as long as it takes) for its
        holder to go; raise :class:`LogHeld` when it is still held then. ``on_wait`` is called
        once, with the holder, when this has to wait. ``force``: take it from a holder that still
        renews it (``rebuild --force``), which learns it at its next renewal and stops applying the
        log; what it was applying meanwhile is fenced off in the database (``claim_position``)."""
        loop = asyncio.get_running_loop()
        deadline = None if patience is None else loop.time() + patience
        self._kv = kv = await bucket(self.js, replicas=self.replicas)
        try:
            await self._take(kv, loop, deadline, on_wait, force)
        except asyncio.CancelledError:  # a write may have reached the server all the same
            await self._delete_if_ours()
            raise
        _HELD_HERE[self.me["token"]] = self
        self._renewing = asyncio.create_task(self._renew(), name=f"lease-{self.name}")

    async def _take(self, kv: KeyValue, loop: asyncio.AbstractEventLoop, deadline: float | None,
                    on_wait: Callable[[dict[str, Any]], Any] | None, force: bool = False) -> None:
        seen: tuple[int, float] | None = None  # (revision, when first seen)
        waited = False
        unanswered = False
        while True:
            sent = clock()
            try:
                try:
                    self._revision, self._renewed = await kv.create(self.name, self._value()), sent
                    return
                except KeyWrongLastSequenceError:
                    pass
                try:
                    entry = await kv.get(self.name)
                except KeyNotFoundError:
                    await asyncio.sleep(0.05)
                    continue  # deleted meanwhile: create again
                stop_if_cancelled()  # (nats-py's requests can swallow a cancellation: see bus.tasks)
                holder = _holder(entry.value)
                revision = entry.revision or 0
                now = clock()
                if seen is None or seen[0] != revision:
                    seen = (revision, now)
                if _ended_here(holder) or force or now - seen[1] >= self.stale_after:
                    sent = clock()
                    try:
                        self._revision, self._renewed = await kv.update(self.name, self._value(), last=revision), sent
                    except KeyWrongLastSequenceError:
                        await asyncio.sleep(0.05)
                        continue  # another bus took it first (or the holder renewed)
                    if force and not _ended_here(holder) and now - seen[1] < self.stale_after:
                        log.warning("lease %s: took it from %s, which still renewed it (by force)", self.name, describe(holder))
                    else:
                        log.warning("lease %s: took it over from %s, which no longer renewed it", self.name, describe(holder))
                    return
                if unanswered:
                    log.info("lease %s: the leases answer again", self.name)
                    unanswered = False
            except (asyncio.CancelledError, ConnectionClosedError):
                raise
            except NatsError as exc:
                # The leases do not answer (their bucket electing a leader, NATS away): wait on. The
                # holder cannot be seen renewing meanwhile, so that time does not count towards its
                # staleness: it is measured again from the first answer.
                if not unanswered:
                    log.warning("lease %s: the leases do not answer (%s); waiting on", self.name, exc)
                unanswered = True
                seen = None
                if deadline is not None and loop.time() >= deadline:
                    raise
                await asyncio.sleep(min(0.25, self.renew_every / 2))
                continue
            if deadline is not None and loop.time() >= deadline:
                if holder.get("role") == "rebuild":
                    raise LogHeld(f"{describe(holder)} is replaying the log into the read models: start the bus once "
                                  "it has finished (or run it with --standby to start then)", holder)
                raise LogHeld(
                    f"{describe(holder)} applies the log (its {self.name!r} consumer on this NATS): one bus applies "
                    "the log — stop the other one first, run this one with --standby to take over when it goes, "
                    "or run `collabbus gate` beside it for more ingress", holder)
            if not waited:
                waited = True
                if on_wait is not None:
                    on_wait(holder)
            await asyncio.sleep(min(0.25, self.renew_every / 2))

    async def _renew(self) -> None:
        assert self._kv is not None
        failing = Spell(log, first=f"lease {self.name}: could not renew it ({{why}}); trying again",
                        still=f"lease {self.name}: still could not renew it ({{why}}): failed {{times}} in {{seconds:.0f}} s",
                        ended=f"lease {self.name}: renewed again (failed {{times}} in {{seconds:.1f}} s)", clock=clock)
        while not self._stopped:
            await asyncio.sleep(self.renew_every)
            stop_if_cancelled()  # (a cancellation a request swallowed on the last round: see bus.tasks)
            sent = clock()
            try:
                self._revision, self._renewed = await self._kv.update(self.name, self._value(), last=self._revision), sent
                failing.ended()
                continue
            except asyncio.CancelledError:
                raise
            except ConnectionClosedError:  # closed for good (the process is stopping): nothing renews it any more
                log.info("lease %s: the connection closed; no longer renewed", self.name)
                _HELD_HERE.pop(self.me["token"], None)
                return
            except KeyWrongLastSequenceError:
                pass
            except Exception as exc:  # NATS away: try again (meanwhile ``fresh`` lapses, and nothing is applied)
                failing.failed(why=exc)
                continue
            # Refused: the key moved. An earlier renewal whose answer was lost (a timeout, a reconnect)
            # may have gone through after all; only another holder's value is a loss.
            try:
                entry: Any = await self._kv.get(self.name)
            except KeyNotFoundError:
                entry = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lease %s: a renewal was refused and the key cannot be read (%s); looking again", self.name, exc)
                continue
            holder = _holder(entry.value) if entry is not None else {}
            if entry is not None and holder.get("token") == self.me["token"]:
                self._revision = entry.revision or self._revision  # ours: renewed from there on the next round
                continue
            await self._lose(holder)
            return

    async def _lose(self, holder: dict[str, Any]) -> None:
        self._losing, self.lost = True, holder
        _HELD_HERE.pop(self.me["token"], None)
        log.error("lease %s: %s holds it now (this one could not renew it in time); this one stops applying the log",
                  self.name, describe(holder) if holder else "nobody (its key was deleted)")
        if self.on_lost is not None:
            try:
                outcome = self.on_lost(holder)
                if asyncio.iscoroutine(outcome):
                    await outcome
            except Exception:
                log.exception("lease %s: stopping after the loss failed", self.name)

    async def release(self) -> None:
        """Stop renewing and delete the key if it is still this one's: the next bus takes it at once.
        While a loss is being handled (``on_lost`` stopping what applies the log), that is waited for."""
        _HELD_HERE.pop(self.me["token"], None)
        task, self._renewing = self._renewing, None
        if task is None:
            return
        if self._losing:
            await asyncio.gather(task, return_exceptions=True)
            return
        self._stopped = True  # (ends the renewals even where a request swallows the cancellation)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self.lost is None:
            await self._delete_if_ours()

    async def _delete_if_ours(self) -> None:
        """Delete the key if it holds this lease's value (whatever revision the last answer said)."""
        if self._kv is None:
            return
        connection = getattr(self.js, "_nc", None)  # (nats-py's: the context's connection)
        if connection is not None and not connection.is_connected:  # (asking would only wait for its timeout)
            log.info("lease %s: not deleted, NATS being away: it goes stale in %.0f s (at once for a bus started on "
                     "this host)", self.name, self.stale_after)
            return
        try:
            entry = await self._kv.get(self.name)
            if _holder(entry.value).get("token") == self.me["token"]:
                await self._kv.delete(self.name, last=entry.revision)
        except KeyNotFoundError:
            pass
        except Exception as exc:  # taken over meanwhile, or NATS away: the key goes stale
            log.info("lease %s: not deleted (%s)", self.name, exc)
