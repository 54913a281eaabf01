"""The gatekeeper's answer to an offered event (CONTRACT §4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, Field

#: Why an event was refused, coarsely: the HTTP gateway maps these to status codes.
Reason = Literal["malformed", "invalid", "too_large", "unsupported", "forbidden", "unavailable"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an event: where (``loc``), what (``msg``) and a stable code (``type``)."""

    loc: tuple[str | int, ...]
    msg: str
    type: str

    def as_dict(self) -> dict[str, Any]:
        return {"loc": list(self.loc), "msg": self.msg, "type": self.type}


@dataclass(frozen=True)
class Verdict:
    """Accepted (with the log sequence) or rejected (with every problem found)."""

    status: Literal["accepted", "rejected"]
    id: str | None
    seq: int | None = None
    duplicate: bool = False
    errors: tuple[Problem, ...] = ()
    reason: Reason | None = None
    event: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    retry_after: float | None = None
    """Seconds to wait before offering it again (an institution over its rate limit)."""

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def as_dict(self) -> dict[str, Any]:
        if self.accepted:
            return {"status": "accepted", "id": self.id, "seq": self.seq, "duplicate": self.duplicate}
        body: dict[str, Any] = {
            "status": "rejected",
            "id": self.id,
            "reason": self.reason,
            "errors": [problem.as_dict() for problem in self.errors],
        }
        if self.retry_after is not None:
            body["retry_after"] = self.retry_after
        return body

    def to_json(self) -> bytes:
        return orjson.dumps(self.as_dict())

    @classmethod
    def from_json(cls, body: bytes) -> "Verdict":
        """Read a verdict as a partner's client does."""
        data = orjson.loads(body)
        if data.get("status") == "accepted":
            return cls("accepted", data.get("id"), data.get("seq"), bool(data.get("duplicate")))
        errors = tuple(Problem(tuple(e.get("loc", ())), e.get("msg", ""), e.get("type", "")) for e in data.get("errors", ()))
        return cls("rejected", data.get("id"), errors=errors, reason=data.get("reason"), retry_after=data.get("retry_after"))


class ProblemBody(BaseModel):
    """One problem as the verdict's JSON carries it."""

    loc: list[str | int] = Field(description="where: attribute names and data path (empty: the event as a whole)")
    msg: str = Field(description="what, for people")
    type: str = Field(description=(
        "a stable code: the gate's own (e.g. `json_invalid`, `utf8_invalid`, `percent_encoding_invalid`, `unknown_type`, `unknown_major`, "
        "`dataschema_invalid`, `type_mismatch`, `subject_invalid`, `subject_mismatch`, `source_mismatch`, "
        "`owner_mismatch`, `participant_mismatch`, `not_member`, `operator_kept`, `municipalities_only`, `kind_may_not_emit`, "
        "`string_nul`, `too_large`, `too_large_for_nats`, `id_taken`, `log_unavailable`, `rate_limited`, `mode_unclear`, `unsupported_content_type`) "
        "or pydantic's error type for a field (e.g. `missing`, `string_type`, `extra_forbidden`)"
    ))


class AcceptedVerdict(BaseModel):
    """The event is in the log: its sequence there (an id offered again: the first one's, with
    ``duplicate``)."""

    status: Literal["accepted"]
    id: str
    seq: int
    duplicate: bool


class RejectedVerdict(BaseModel):
    """The event was refused and is not in the log; ``errors`` lists every problem found."""

    status: Literal["rejected"]
    id: str | None = Field(description="the offered event's id, when it could be read")
    reason: Reason = Field(description=(
        "why it was refused: `malformed` (not readable), `invalid` (envelope or data), `too_large`, `unsupported`, "
        "`forbidden` (source, membership, kind), `unavailable` (the log did not confirm it, or the institution is over "
        "its rate limit: retry with the same id)"
    ))
    errors: list[ProblemBody]
    retry_after: float | None = Field(default=None, description=(
        "seconds to wait before offering it again with the same id (present when the institution is over its rate "
        "limit over NATS; over HTTP the `Retry-After` header says it)"))


VerdictBody = Annotated[AcceptedVerdict | RejectedVerdict, Field(discriminator="status")]
"""The verdict's JSON (``Verdict.as_dict``), for the OpenAPI and AsyncAPI documents: told apart by
``status``, so a client generator gives two types."""


class Rejection(Exception):
    """Raised inside the gate to refuse an event; carries the problems found."""

    def __init__(self, reason: Reason, *problems: Problem) -> None:
        super().__init__("; ".join(p.msg for p in problems))
        self.reason = reason
        self.problems = problems


def reject(reason: Reason, code: str, msg: str, *loc: str | int) -> Rejection:
    """A one-problem rejection."""
    return Rejection(reason, Problem(tuple(loc), msg, code))
