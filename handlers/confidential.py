"""Which event types are confidential — for some members only — and so which subjects every
member may follow over NATS.

Who among the members may see a confidential event is :mod:`handlers.audience`'s to say, from the
read models; which types are confidential is said here, apart from them, so that what needs only
the types (a member's NATS credentials, the AsyncAPI document) loads no read models.
"""

from __future__ import annotations

from schemas import registry

CALL_APPLICATION_EVENTS = frozenset({
    "call.application_submitted", "call.application_received", "call.application_rejected",
    "call.application_decided", "call.application_withdrawn", "call.full_proposal_submitted",
    "call.application_lapsed",
})
"""Applications, the answers to them, and what becomes of them: not every member's business
(competing applicants would see each other's requests, amounts and awards)."""

CALL_EVENTS = CALL_APPLICATION_EVENTS | {"call.action_rejected"}
"""The calls' event types not every member may see: the application events, and the refusal of
a decision on or withdrawal of an application (a refused publication, amendment or closing is
public, as the call is)."""

VALIDATION_EVENTS = frozenset({
    "validation.review_submitted", "validation.info_requested", "validation.info_provided", "validation.action_rejected",
    "validation.review_overdue",
})
"""The validation workflow's event types that not every member may see (the rest are public)."""

CONFIDENTIAL = CALL_EVENTS | VALIDATION_EVENTS
"""The event types not every member may see."""


LOG_PREFIX = "collab.events"
LIVE_PREFIX = "collab.live"
"""Where the log's server republishes each event it has stored (``bus.streams``): the log as it is,
each message with its sequence."""


def public_live_subjects() -> list[str]:
    """The subjects members' NATS credentials let them subscribe to: those of
    :func:`public_log_subjects` under ``collab.live``, where nats-server republishes every event
    the log stored, in the log's order, with its ``Nats-Sequence``. (Not the log subjects
    themselves: what is published there is what was offered, a repeat or an id another event
    holds included, before the log has taken or refused it.)"""
    return [LIVE_PREFIX + subject[len(LOG_PREFIX):] for subject in public_log_subjects()]


def public_log_subjects() -> list[str]:
    """The log subjects of the event types every member may see (members follow them under
    ``collab.live``, :func:`public_live_subjects`): a domain's ``collab.events.*.{domain}.>`` when
    none of its types is confidential, else ``collab.events.*.{domain}.{event}.*`` for each of its
    public types.
    (A confidential event is for some members only, which a subject cannot say: its parties read
    it over HTTP and webhooks.)"""
    by_domain: dict[str, list[str]] = {}
    for event_type in registry.event_types():
        by_domain.setdefault(event_type.partition(".")[0], []).append(event_type)
    subjects = []
    for domain, types in sorted(by_domain.items()):
        public = [event_type for event_type in types if event_type not in CONFIDENTIAL]
        if len(public) == len(types):
            subjects.append(f"{LOG_PREFIX}.*.{domain}.>")
        else:
            subjects.extend(f"{LOG_PREFIX}.*.{event_type}.*" for event_type in public)
    return subjects
