"""Who may see a logged event: every member, or for the workflows' confidential events only some.

``GET /events`` shows an event, webhooks deliver it, and a member's NATS credentials let it
subscribe to its log subject by this one rule; each domain with confidential events says which
they are and who may see them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlmodel import Session

from handlers import calls, validations
from schemas import registry

CONFIDENTIAL = validations.CONFIDENTIAL | calls.CONFIDENTIAL
"""The event types not every member may see."""


def audience(session: Session, envelope: Mapping[str, Any]) -> frozenset[str] | None:
    """The institutions that may see a logged event; None: every member."""
    event_type = envelope.get("type")
    if event_type in validations.CONFIDENTIAL:
        return validations.audience(session, envelope)
    if event_type in calls.CONFIDENTIAL:
        return calls.audience(session, envelope)
    return None


def public_log_subjects() -> list[str]:
    """The log subjects of the event types every member may see, which members' NATS credentials
    let them subscribe to: a domain's ``collab.events.*.{domain}.>`` when none of its types is
    confidential, else ``collab.events.*.{domain}.{event}.*`` for each of its public types.
    (A confidential event is for some members only, which a subject cannot say: its parties read
    it over HTTP and webhooks.)"""
    by_domain: dict[str, list[str]] = {}
    for event_type in registry.event_types():
        by_domain.setdefault(event_type.partition(".")[0], []).append(event_type)
    subjects = []
    for domain, types in sorted(by_domain.items()):
        public = [event_type for event_type in types if event_type not in CONFIDENTIAL]
        if len(public) == len(types):
            subjects.append(f"collab.events.*.{domain}.>")
        else:
            subjects.extend(f"collab.events.*.{event_type}.*" for event_type in public)
    return subjects
