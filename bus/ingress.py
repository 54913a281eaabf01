"""NATS ingress: ``collab.ingress.{institution}.{domain}.{event}``, request/reply, queue group ``collabbus-gate``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry import trace

from bus.credentials import BUS_INBOX_PREFIX, MEMBER_INBOXES
from bus.gate import Gate
from bus.ratelimit import RateLimiter
from bus.verdict import Problem, Verdict, reject
from ops import metrics, tracing

INGRESS_SUBJECT = "collab.ingress.*.>"
GATE_QUEUE = "collabbus-gate"
REPLY_HEADERS = {"Content-Type": "application/json"}

log = logging.getLogger("collabbus.ingress")


def split_ingress_subject(subject: str) -> tuple[str, str | None]:
    """(institution, offered type) of an ingress subject; the type is None when the subject is short."""
    tokens = subject.split(".")
    institution = tokens[2] if len(tokens) > 2 else ""
    offered = ".".join(tokens[3:5]) if len(tokens) == 5 else None
    return institution, offered


def reply_allowed(reply: str, institution: str) -> bool:
    """Whether a verdict may go to ``reply``, a reply subject the offering client chose: the
    offering institution's own inbox (``_INBOX.{institution}.…``) or the bus's (its operator's
    offers; ``bus.credentials``), a plain subject without wildcards. The bus publishes with every
    right, so a member could otherwise have it write into another member's inboxes (which that
    member's credentials cannot), into the bus's own or onto wildcard subjects."""
    if not reply.startswith((f"{MEMBER_INBOXES}.{institution}.", f"{BUS_INBOX_PREFIX}.")):
        return False
    return all(token and token not in ("*", ">") for token in reply.split("."))


def retry_after(wait: float) -> float:
    """A rate-limited verdict's ``retry_after``: ``wait`` rounded up to the millisecond (never 0:
    a client that waits so long finds its offer's token there)."""
    return max(math.ceil(wait * 1000), 1) / 1000


DRAIN_TIMEOUT = 10.0
"""Seconds the ingress takes at most to judge the offers it holds queued when it stops."""


async def drained(sub: Subscription | None, tasks: set[asyncio.Task[None]]) -> None:
    """End ``sub`` handling what it holds (drained: the server sends no more, and what it sent is
    handed to its callback), then wait for ``tasks``, the work the callback started."""
    if sub is not None:
        try:
            await asyncio.wait_for(sub.drain(), DRAIN_TIMEOUT)
        except Exception:  # (the connection closing or gone: nothing more comes, nor can be answered)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


class Ingress:
    """The gate's subscription to every institution's ingress subjects (queue group ``collabbus-gate``).

    Offers are judged concurrently, up to ``workers`` at a time; a reply goes back to each
    request's inbox. It speaks nats-py directly: an offer is one small request/reply on the hot
    path, and the framework's per-message machinery cost more than judging the event.
    """

    def __init__(self, nc: Client, gate: Gate, *, workers: int = 64, limiter: RateLimiter | None = None) -> None:
        self.nc = nc
        self.gate = gate
        self.workers = workers
        self.limiter = limiter
        """Offers an institution may make (``ingress_rate_limit``): beyond it an offer is answered
        at once, unread — one member's flood must not starve the gate (and, with it, everyone)."""
        self._warned: dict[tuple[str, str], float] = {}
        self._slots = asyncio.Semaphore(workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Subscription | None = None

    async def start(self) -> None:
        self._sub = await self.nc.subscribe(INGRESS_SUBJECT, queue=GATE_QUEUE, cb=self._take)

    async def stop(self) -> None:
        """Stop taking offers, then answer the ones in hand — those the subscription holds queued
        too (drained: the server sends this process no more, and what it sent is judged). Handing
        the ingress to a gatekeeper process, or to another bus, loses no offer: an offer dropped
        here would be answered by nobody, its sender's request timing out."""
        sub, self._sub = self._sub, None
        await drained(sub, self._tasks)

    async def _take(self, msg: Msg) -> None:
        if self.limiter is not None:
            institution = split_ingress_subject(msg.subject)[0]
            wait = self.limiter.take(institution)
            if wait is not None:
                await self._throttle(msg, institution, wait)
                return
        await self._slots.acquire()  # the subscription's own queue holds the rest meanwhile
        task = asyncio.create_task(self._answer(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _throttle(self, msg: Msg, institution: str, wait: float) -> None:
        """Refuse an offer over the institution's rate, unread: the cheapest answer there is."""
        assert self.limiter is not None
        after = retry_after(wait)
        verdict = Verdict("rejected", None, reason="unavailable", errors=(Problem((), (
            f"{institution!r} is over its rate limit over NATS ({self.limiter.rate:g} offers/s, burst "
            f"{self.limiter.burst}); retry in {after:.3f} s with the same id"), "rate_limited"),), retry_after=after)
        member = institution if self.gate.membership.known(institution) else metrics.OTHER_INSTITUTION
        metrics.count_offer(member, None, split_ingress_subject(msg.subject)[1], verdict)
        if self._first_in_a_minute(("rate", member)):  # a line a minute, not one per offer
            log.warning("ingress: %s is over its rate limit (%g offers/s, burst %d); offers refused unread",
                        institution, self.limiter.rate, self.limiter.burst)
        if msg.reply and reply_allowed(msg.reply, institution):
            with contextlib.suppress(Exception):
                await self.nc.publish(msg.reply, verdict.to_json(), headers=REPLY_HEADERS)

    def _first_in_a_minute(self, key: tuple[str, str]) -> bool:
        """Whether a warning about ``key`` (what, whose) is due: one a minute, so that a member
        cannot fill the log by repeating what is warned about."""
        if len(self._warned) > 10_000:  # (keys come from subjects; bounded all the same)
            self._warned.clear()
        now = time.monotonic()
        if now - self._warned.get(key, -60.0) < 60.0:
            return False
        self._warned[key] = now
        return True

    async def _answer(self, msg: Msg) -> None:
        try:
            institution = split_ingress_subject(msg.subject)[0]
            if msg.reply and not reply_allowed(msg.reply, institution):
                # Not judged: no verdict could reach the client (most often one connected without its
                # inbox prefix), and an event logged without its sender knowing would be offered
                # again, perhaps under a new id.
                member = institution if self.gate.membership.known(institution) else metrics.OTHER_INSTITUTION
                metrics.count_offer(member, None, split_ingress_subject(msg.subject)[1], Verdict(
                    "rejected", None, reason="forbidden", errors=(Problem((), "reply subject not allowed", "reply_not_allowed"),)))
                if self._first_in_a_minute(("reply", institution)):
                    log.warning("ingress: an offer on %s was not judged (nothing logged): its reply subject %r is not an "
                                "inbox of %s, where verdicts go (the client's inbox prefix must be _INBOX.%s); said once a minute",
                                msg.subject, msg.reply[:200], institution, institution)
                return
            verdict = await self.judge(msg.subject, msg.data, msg.headers)
            if msg.reply:
                await self.nc.publish(msg.reply, verdict.to_json(), headers=REPLY_HEADERS)
        except Exception:  # a failed reply costs this offer only; the partner retries with the same id
            log.exception("ingress could not answer an offer on %s", msg.subject)
        finally:
            self._slots.release()

    async def judge(self, subject: str, body: bytes, headers: dict[str, str] | None) -> Verdict:
        institution, offered = split_ingress_subject(subject)
        gate = self.gate
        # The partner's entry: a span continuing the traceparent its request carries.
        with gate.tracer.start_as_current_span(
            "process collab.ingress", context=tracing.context_from_headers(headers), kind=trace.SpanKind.CONSUMER,
            attributes={
                tracing.MESSAGING_SYSTEM: "nats", tracing.MESSAGING_DESTINATION: subject,
                tracing.MESSAGING_OPERATION_TYPE: "process", tracing.MESSAGING_CONSUMER_GROUP: GATE_QUEUE,
                tracing.INSTITUTION: institution, tracing.EVENT_TYPE: offered or "",
            },
        ) as span:
            if offered is None:
                verdict = Verdict(
                    "rejected", None, reason="invalid",
                    errors=reject(
                        "invalid", "subject_invalid",
                        f"offer events on collab.ingress.{{institution}}.{{domain}}.{{event}}, not {subject}",
                    ).problems,
                )
                tracing.mark_refused(span, verdict)
            else:
                verdict = await gate.admit(institution, body, headers, offered_type=offered)
            if verdict.id and span.is_recording():
                span.set_attribute(tracing.MESSAGING_MESSAGE_ID, verdict.id)
        return verdict
