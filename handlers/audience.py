"""Who may see a logged event: every member, or for the workflows' confidential events only some.

``GET /events`` shows an event and webhooks deliver it by this one rule; which types are
confidential is :mod:`handlers.confidential`'s (a member's NATS credentials let it subscribe to the
others' log subjects), who may see one is each domain's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlmodel import Session

from handlers import calls, validations
from handlers.confidential import CONFIDENTIAL

__all__ = ["CONFIDENTIAL", "audience"]


def audience(session: Session, envelope: Mapping[str, Any]) -> frozenset[str] | None:
    """The institutions that may see a logged event; None: every member."""
    event_type = envelope.get("type")
    if event_type in validations.CONFIDENTIAL:
        return validations.audience(session, envelope)
    if event_type in calls.CONFIDENTIAL:
        return calls.audience(session, envelope)
    return None
