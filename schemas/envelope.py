"""The CloudEvents 1.0 envelope every event travels in (CONTRACT §3).

The envelope is validated here; the ``data`` is validated against the model the registry holds
for ``type`` and the major version named by ``dataschema``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints

from schemas.common import WITHOUT_NUL, Timestamp

EVENT_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
SUBJECT_PATTERN = r"^[A-Za-z0-9_:-]{1,128}$"
INSTITUTION_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
SOURCE_PREFIX = "/institutions/"
SOURCE_PATTERN = r"^/institutions/[a-z0-9][a-z0-9-]{1,62}$"
TYPE_PATTERN = r"^[a-z][a-z_]*\.[a-z][a-z_]*$"
TRACEPARENT_PATTERN = r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
DATA_CONTENT_TYPE = "application/json"

EventId = Annotated[str, StringConstraints(pattern=EVENT_ID_PATTERN)]

#: Attribute order of the canonical structured form on the log.
ATTRIBUTES = (
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "correlationid",
    "causationid",
    "traceparent",
    "tracestate",
)


class CloudEvent(BaseModel):
    """A CloudEvent as the bus accepts it. Unknown attributes are refused so typos surface at once."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    specversion: Literal["1.0"]
    id: EventId
    source: Annotated[str, StringConstraints(pattern=SOURCE_PATTERN)]
    type: Annotated[str, StringConstraints(pattern=TYPE_PATTERN)]
    subject: Annotated[str, StringConstraints(pattern=SUBJECT_PATTERN)]
    time: Timestamp | None = None
    datacontenttype: Literal["application/json"] = "application/json"
    dataschema: Annotated[str, WITHOUT_NUL] | None = None
    correlationid: EventId | None = None
    causationid: EventId | None = None
    traceparent: Annotated[str, StringConstraints(pattern=TRACEPARENT_PATTERN)] | None = None
    tracestate: Annotated[str, StringConstraints(max_length=512), WITHOUT_NUL] | None = None
    data: dict[str, Any]

    @property
    def institution(self) -> str:
        """The institution id named by ``source``."""
        return self.source.removeprefix(SOURCE_PREFIX)


def source_of(institution: str) -> str:
    """The ``source`` attribute of events published by ``institution``."""
    return f"{SOURCE_PREFIX}{institution}"
