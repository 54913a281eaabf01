"""Workflow decisions as pure functions over small frozen snapshots of the state: no database, no
clock, no I/O, so they are unit-tested directly and give the same answer live and in a rebuild."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Refusal:
    """Why a workflow refuses an event: a code from the refusal event's vocabulary, and a sentence
    for people."""

    code: str
    message: str

    def as_reason(self) -> dict[str, Any]:
        """The ``reason`` of a ``…_rejected`` event."""
        return {"code": self.code, "message": {"en": self.message}}
