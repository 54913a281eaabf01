"""Membership of the network: `institution.*`, offered by the operator alone."""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import ConfigDict, StringConstraints, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from schemas.common import (
    CountryCode,
    EmailAddress,
    EventData,
    InstitutionId,
    InstitutionKind,
    Label,
    LocalizedText,
    NotClearable,
    Theme,
    WITHOUT_NUL,
    ValueObject,
    WebUrl,
    logged,
    null_unless,
)

__all__ = ["Identifier", "InstitutionJoined", "InstitutionLeft", "InstitutionUpdated"]

MunicipalityLevel = Literal["metropolitan", "provincial", "district"]

LEVEL_OF_A_MUNICIPALITY_SCHEMA = null_unless("kind", "municipality", "municipality_level")
"""The JSON Schema's words for :func:`level_of_a_municipality`."""


def level_of_a_municipality(level: MunicipalityLevel | None, info: ValidationInfo) -> MunicipalityLevel | None:
    """A municipality level belongs to a municipality: it is what the adoption statistics count
    municipalities by. Checked on offers only: an event logged before the check stands (and the
    statistics count members of kind `municipality` alone)."""
    kind = info.data.get("kind")
    if level is not None and kind is not None and kind != "municipality" and not logged(info):
        raise PydanticCustomError(
            "municipalities_only", "A municipality level is for municipalities only; this institution's kind is '{kind}'",
            {"kind": kind},
        )
    return level


class Identifier(ValueObject):
    """How another register names the institution (`fi-business-id`, `tr-tax-id`); the portal
    connector maps organisations to members through these."""

    scheme: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    value: Annotated[str, StringConstraints(min_length=1, max_length=128), WITHOUT_NUL]


class InstitutionJoined(EventData):
    """An institution became a member; its kind decides what it may offer to the network. A
    `municipality_level` is given to a municipality only."""

    model_config = ConfigDict(json_schema_extra=LEVEL_OF_A_MUNICIPALITY_SCHEMA)

    id: InstitutionId
    name: LocalizedText
    kind: InstitutionKind
    country: CountryCode
    region: Label | None = None
    municipality_level: MunicipalityLevel | None = None
    themes: tuple[Theme, ...] = ()
    identifiers: tuple[Identifier, ...] = ()
    website: WebUrl | None = None
    contact_email: EmailAddress | None = None

    @field_validator("municipality_level")
    @classmethod
    def _level_of_a_municipality(cls, level: MunicipalityLevel | None, info: ValidationInfo) -> MunicipalityLevel | None:
        return level_of_a_municipality(level, info)


class InstitutionUpdated(EventData):
    """Some facts about a member changed: `id` plus only the fields that changed, with the same
    meaning as in `institution.joined`. A present `null` clears an optional field; `name`, `kind`
    and `country` cannot be cleared; lists are replaced whole. A member whose kind changes from
    `municipality` to another loses its `municipality_level`."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 2, **LEVEL_OF_A_MUNICIPALITY_SCHEMA})

    id: InstitutionId
    name: NotClearable[LocalizedText] = None
    kind: NotClearable[InstitutionKind] = None
    country: NotClearable[CountryCode] = None
    region: Label | None = None
    municipality_level: MunicipalityLevel | None = None
    themes: NotClearable[tuple[Theme, ...]] = None
    identifiers: NotClearable[tuple[Identifier, ...]] = None
    website: WebUrl | None = None
    contact_email: EmailAddress | None = None

    @field_validator("municipality_level")
    @classmethod
    def _level_of_a_municipality(cls, level: MunicipalityLevel | None, info: ValidationInfo) -> MunicipalityLevel | None:
        return level_of_a_municipality(level, info)

    @model_validator(mode="after")
    def _changes_something(self) -> Self:
        if not self.model_fields_set - {"id"}:
            raise ValueError("institution.updated must carry at least one changed field")
        return self


class InstitutionLeft(EventData):
    """A member left the network; its past events stay in the log."""

    id: InstitutionId
    reason: LocalizedText | None = None
