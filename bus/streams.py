"""The two JetStream streams, declared explicitly (CONTRACT §4).

The bus owns these settings: on start it creates a missing stream, and where an existing stream
differs from what the settings ask it applies the change and logs every field it changed. Fields a
stream cannot change in place (storage) are reported as an error instead of being papered over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RePublish, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, NoStreamResponseError, NotFoundError, ServiceUnavailableError

from ops.logs import Spell

EVENTS_STREAM = "COLLAB_EVENTS"
DLQ_STREAM = "COLLAB_DLQ"
EVENTS_SUBJECTS = "collab.events.>"
LIVE_PREFIX = "collab.live"
LIVE_SUBJECTS = f"{LIVE_PREFIX}.>"
"""Where nats-server republishes each message the log has stored, with ``Nats-Stream``,
``Nats-Sequence``, ``Nats-Time-Stamp`` and ``Nats-Last-Sequence`` headers beside the event's own:
what members follow live over NATS (``handlers.confidential.public_live_subjects``)."""
DLQ_SUBJECTS = "collab.dlq.>"

log = logging.getLogger("collabbus.streams")


class StreamConfigError(RuntimeError):
    """An existing stream cannot be brought to the configured settings."""


@dataclass(frozen=True)
class StreamChange:
    stream: str
    field: str
    old: object
    new: object


def desired_streams(*, replicas: int, duplicate_window: float, max_msg_size: int) -> list[StreamConfig]:
    """The streams as the settings want them."""
    return [
        StreamConfig(
            name=EVENTS_STREAM,
            description="collabbus: the accepted event log, the network's audit trail",
            subjects=[EVENTS_SUBJECTS],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
            duplicate_window=duplicate_window,
            deny_delete=True,
            deny_purge=True,
            allow_direct=True,
            max_msg_size=max_msg_size,
            republish=RePublish(src=EVENTS_SUBJECTS, dest=LIVE_SUBJECTS),
        ),
        StreamConfig(
            name=DLQ_STREAM,
            description="collabbus: dead letters, one subject per consumer",
            subjects=[DLQ_SUBJECTS],
            storage=StorageType.FILE,
            retention=RetentionPolicy.LIMITS,
            discard=DiscardPolicy.OLD,
            num_replicas=replicas,
            duplicate_window=120.0,
            deny_delete=False,
            deny_purge=False,
            allow_direct=True,
        ),
    ]

# Fields the bus owns on an existing stream; the rest (limits an operator may have set by hand) are left alone.
_OWNED = ("subjects", "num_replicas", "duplicate_window", "deny_delete", "deny_purge", "allow_direct", "max_msg_size", "republish")
_IMMUTABLE = ("storage", "retention")


async def ensure_streams(js: JetStreamContext, configs: list[StreamConfig], *,
                         on_wait: Callable[[str], None] | None = None) -> list[StreamChange]:
    """Create missing streams and bring existing ones to ``configs``; returns the changes made.
    ``on_wait`` is told, in words, what a stream waits for (servers for its replicas)."""
    changes: list[StreamChange] = []
    for wanted in configs:
        assert wanted.name
        try:
            info = await js.stream_info(wanted.name)
        except NotFoundError:
            await _placed(lambda: js.add_stream(wanted), wanted, on_wait)
            log.info("created stream %s", wanted.name)
            continue
        current = info.config
        for name in _IMMUTABLE:
            if getattr(current, name) != getattr(wanted, name):
                raise StreamConfigError(
                    f"stream {wanted.name} has {name}={getattr(current, name)}, the bus needs "
                    f"{getattr(wanted, name)}; this cannot be changed in place"
                )
        diff = [
            StreamChange(wanted.name, name, getattr(current, name), getattr(wanted, name))
            for name in _OWNED
            if _normal(getattr(current, name)) != _normal(getattr(wanted, name))
        ]
        if diff:
            for name in _OWNED:
                setattr(current, name, getattr(wanted, name))
            await _placed(lambda: js.update_stream(current), wanted, on_wait)
            for change in diff:
                log.warning("stream %s: %s changed from %r to %r", change.stream, change.field, change.old, change.new)
            changes.extend(diff)
    return changes


class JetStreamUnusable(RuntimeError):
    """JetStream cannot be used here, and waiting will not change it (not enabled, not allowed)."""


JETSTREAM_NOT_ENABLED = 10039
"""JetStream's error code for an account it is not enabled for."""

ELECTING = ("a cluster electing its leaders (for seconds after a node is lost or the nodes restart), or one with fewer "
            "than a quorum of its nodes running")

JETSTREAM_ERRORS = (nats.errors.TimeoutError, NoStreamResponseError, APIError)
"""What a JetStream request that was not answered, or answered with an error, raises (nats-py)."""

class Unanswered(RuntimeError):
    """What the bus asked of JetStream was not answered just now, said in words (the request's own
    error its ``__cause__``, if any): the log not taking an event of the bus's own, the leases'
    bucket not answering."""


UNANSWERED = (nats.errors.TimeoutError, NoStreamResponseError, ServiceUnavailableError, Unanswered)
"""What a JetStream request raises while JetStream, or the stream asked, cannot answer just now
(its cluster electing a leader, short of a quorum): worth waiting through."""


async def wait_for_jetstream(js: JetStreamContext, streams: Iterable[str], *, denied: Callable[[], str | None] = lambda: None,
                             every: float = 0.5, on_wait: Callable[[str], None] | None = None) -> float:
    """Wait until JetStream answers, and each of ``streams`` that exists answers through its leader
    (a missing one is the caller's to create): a bus starting while its cluster elects its leaders
    — the nodes restarted together, a node lost — waits for them, saying so (at once, then every
    30 s), rather than fail on the first unanswered request. Returns the seconds waited.

    :class:`JetStreamUnusable` at once for what waiting will not mend: JetStream not enabled for the
    account or on the server (no responders), or ``denied()`` — the connection's permissions
    violation — naming JetStream's API. ``on_wait`` is told what it waits for, in words, each time
    it asks again."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiting = Spell(log, first=f"waiting for {{what}}: {{why}} — {ELECTING}",
                    still="still waiting for {what}: {why} ({seconds:.0f} s so far)",
                    ended="JetStream answers (after {seconds:.1f} s)", clock=loop.time)
    names = list(streams)
    while True:
        what = "JetStream"
        try:
            await js.account_info()
            for name in names:
                what = f"the stream {name}"
                try:
                    await js.stream_info(name)
                except NotFoundError:
                    pass
            waiting.ended()
            return loop.time() - started
        except APIError as exc:
            if isinstance(exc.__context__, nats.errors.NoRespondersError):  # (how nats-py's JetStream API says it)
                raise _no_jetstream() from exc
            if exc.err_code == JETSTREAM_NOT_ENABLED:
                raise JetStreamUnusable(f"JetStream is not enabled for the bus's NATS account ({exc.description}): "
                                        "the account needs JetStream (its limits, or `jetstream: enabled`)") from exc
            problem = jetstream_answered(exc)
        except nats.errors.NoRespondersError as exc:
            raise _no_jetstream() from exc
        except (nats.errors.TimeoutError, NoStreamResponseError) as exc:
            problem = jetstream_answered(exc)
        refused = denied()
        if refused is not None and "$js.api." in refused.lower():  # (nats-py lower-cases the server's words)
            raise JetStreamUnusable(f"NATS refused the bus JetStream's API ({refused}): its credentials must allow "
                                    "publishing to $JS.API.> besides the bus's subjects")
        waiting.failed(what=what, why=problem)
        if on_wait is not None:
            on_wait(f"waiting for {what}: {problem}")
        await asyncio.sleep(every)


def jetstream_answered(exc: BaseException) -> str:
    """What a JetStream request met, in words: no answer, or JetStream's error."""
    if isinstance(exc, APIError) and (exc.code is not None or exc.description):
        return f"JetStream answered {exc.description or 'an error'!r} ({exc.code}/{exc.err_code})"
    if isinstance(exc, APIError) and isinstance(exc.__context__, nats.errors.NoRespondersError):
        return "nothing answers JetStream's API (no responders)"
    return f"no answer from JetStream ({type(exc).__name__})"


def jetstream_problem(exc: BaseException) -> str:
    """A one-off command's JetStream request that failed, said for an operator: what it met and
    what it may mean."""
    if isinstance(exc, APIError) and exc.code not in (None, 503):  # an answer: JetStream refused what was asked
        return jetstream_answered(exc)
    return f"{jetstream_answered(exc)}: {ELECTING}; try again in a few seconds"


def _no_jetstream() -> JetStreamUnusable:
    return JetStreamUnusable("nothing answers JetStream's API on this NATS (no responders): JetStream is not enabled on "
                             "its server (nats-server -js, or `jetstream {}` in its configuration)")


NO_SUITABLE_PEERS = 10005
"""JetStream's error code for a stream whose replicas the cluster has too few servers for."""


async def _placed(change: Callable[[], Awaitable[object]], wanted: StreamConfig,
                  on_wait: Callable[[str], None] | None = None) -> None:
    """Make or change a stream, waiting while the cluster has fewer servers up than its replicas
    (nodes still joining after a restart, one of three down when the streams are first made),
    saying so at once and then every 30 s."""
    loop = asyncio.get_running_loop()
    waiting = Spell(log, first=f"stream {wanted.name}: waiting for servers for its {wanted.num_replicas} replicas ({{why}}): "
                               "nodes of the cluster still starting, or COLLABBUS_STREAM_REPLICAS more than its servers",
                    still=f"stream {wanted.name}: still waiting for servers for its {wanted.num_replicas} replicas "
                          "({why}; {seconds:.0f} s so far)",
                    ended=f"stream {wanted.name}: placed (after {{seconds:.1f}} s)", clock=loop.time)
    while True:
        try:
            await change()
        except BadRequestError as exc:
            if exc.err_code != NO_SUITABLE_PEERS:
                raise
            waiting.failed(why=exc.description)
            if on_wait is not None:
                on_wait(f"the stream {wanted.name} waits for servers for its {wanted.num_replicas} replicas ({exc.description})")
            await asyncio.sleep(0.5)
            continue
        waiting.ended()
        return


def _normal(value: object) -> object:
    if isinstance(value, RePublish):
        return (value.src, value.dest, bool(value.headers_only))
    if isinstance(value, list):
        return sorted(value)
    if isinstance(value, float):
        return round(value, 3)
    return value
