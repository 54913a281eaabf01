"""Field types shared by every event of the catalog (CONTRACT.md §3 and §5).

The constraints live in the types, so pydantic enforces them and the exported JSON Schemas say the
same thing to partners who validate in other languages. Regular expressions spell out ASCII
classes (`[0-9]`, not `\\d`): pydantic's regex engine treats `\\d` as any Unicode digit.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta, timezone
from enum import StrEnum
from typing import Annotated, Any, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StringConstraints,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

__all__ = [
    "COUNTRY_CODES",
    "CRITERIA",
    "CURRENCY_CODES",
    "MINOR_UNITS",
    "THEMES",
    "AggregateId",
    "Changes",
    "CountryCode",
    "Criterion",
    "CurrencyCode",
    "Day",
    "DecimalString",
    "EmailAddress",
    "EventData",
    "EventId",
    "EvidenceLevel",
    "ExternalRef",
    "InstitutionId",
    "InstitutionKind",
    "Label",
    "LanguageTag",
    "LocalizedText",
    "Money",
    "NonNegativeDecimalString",
    "NotClearable",
    "Reason",
    "Score",
    "Theme",
    "Timestamp",
    "ValueObject",
    "Whole",
    "WebUrl",
    "check_theme",
    "minor_units",
    "nearest",
    "theme_codes",
]

T = TypeVar("T")
JsonDict = dict[str, Any]


def null_unless(field: str, value: str, other: str) -> JsonDict:
    """A JSON Schema's words for "``other`` is null or absent unless ``field`` is ``value``" (a
    model's validator says it to the gate), for a partner's own validator."""
    return {"if": {"required": [field], "properties": {field: {"not": {"const": value}}}},
            "then": {"properties": {other: {"type": "null"}}}}


# --- identifiers ------------------------------------------------------------------------------

InstitutionId = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
"""An institution of the network, e.g. `tr-mersin-bb`, `fi-thl`."""

AggregateId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_:-]{1,128}$")]
"""Id of a call, project, validation, day, application, registration...: no dot, since it
becomes the NATS subject token of the envelope `subject`."""

EventId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9._:-]{1,128}$")]
"""A CloudEvent `id` (dots allowed), for events that name another event."""

# --- text -------------------------------------------------------------------------------------

LanguageTag = Annotated[str, StringConstraints(pattern=r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$")]
"""A BCP 47 language tag such as `fi`, `tr`, `ar`, `sv-FI`."""

WITHOUT_NUL_PATTERN = r"^[^\u0000]*$"
"""A text without the NUL character, in the JSON Schemas' words: the gate refuses one holding it
(:data:`NUL_MESSAGE`) with one search of the body, so the models leave it to the gate."""

WITHOUT_NUL = Field(json_schema_extra={"pattern": WITHOUT_NUL_PATTERN})

LocalizedText = Annotated[
    dict[LanguageTag, Annotated[str, StringConstraints(min_length=1), WITHOUT_NUL]],
    Field(min_length=1, json_schema_extra={"additionalProperties": False}),
]
"""Text meant for people, per language. Stored exactly as sent: no stripping, no normalising."""

Label = Annotated[str, StringConstraints(min_length=1, max_length=300), WITHOUT_NUL]
"""A short single-language string (a region, an address, a unit), kept exactly as sent."""

_WEB_URL = (
    r"^https?://(?:\[[0-9A-Fa-f:.]+\](?::[0-9]+)?|(?:[^\s/?#%\[\]]|%[0-9A-Fa-f]{2})+)"
    r"(?:[/?#](?:[^\s%\[\]]|%[0-9A-Fa-f]{2})*)?$"
)
_WEB_URL_FORM = re.compile(_WEB_URL)


def _web_url(value: str, info: ValidationInfo) -> str:
    if not _WEB_URL_FORM.match(value) and not logged(info):
        raise PydanticCustomError(
            "string_pattern_mismatch",
            "Input should be an http(s) address: a % begins an escape such as %C3%A4, brackets only enclose an IPv6 host",
        )
    return value


WebUrl = Annotated[
    str,
    StringConstraints(max_length=2048, pattern=r"^https?://[^\s/?#]+[^\s]*$"),
    AfterValidator(_web_url),
    Field(json_schema_extra={"format": "iri", "pattern": _WEB_URL}),
]
"""An http(s) address. A plain string rather than `HttpUrl`, which would rewrite what was sent.
An IRI: letters beyond ASCII are kept as written (`https://example.fi/päivä`); a `%` must begin
an escape (`%C3%A4`), and brackets only enclose an IPv6 host (checked at the gate; the looser
form before it is what older logs hold)."""

EmailAddress = Annotated[
    str,
    StringConstraints(max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$"),
    Field(json_schema_extra={"format": "email"}),
]

# --- places and money -------------------------------------------------------------------------

# ISO 3166-1 alpha-2, all 249 officially assigned codes.
COUNTRY_CODES: frozenset[str] = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS
    BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE
    EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM
    HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC
    LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA
    NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO
    TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
    """.split()
)

# ISO 4217 currencies in use (2025): fund, metal, test and no-currency codes left out; withdrawn
# HRK, CUC, SLL, ZWL and ANG replaced by their successors (EUR, CUP, SLE, ZWG, XCG).
CURRENCY_CODES: frozenset[str] = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD
    CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP
    GMD GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD
    KYD KZT LAK LBP LKR LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN
    NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP
    SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY TTD TWD TZS UAH UGX USD UYU UZS VED VES
    VND VUV WST XAF XCD XCG XOF XPF YER ZAR ZMW ZWG
    """.split()
)

MINOR_UNITS: dict[str, int] = {
    **{code: 0 for code in "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX VND VUV XAF XOF XPF".split()},
    **{code: 3 for code in "BHD IQD JOD KWD LYD OMR TND".split()},
}
"""ISO 4217's minor units of the currencies that do not count in hundredths (every other one of
:data:`CURRENCY_CODES` has two decimals: cents, kuruş)."""


def minor_units(currency: str) -> int:
    """How many decimals an amount in ``currency`` has (ISO 4217: 2 for EUR, TRY, USD; 0 for JPY,
    ISK; 3 for KWD)."""
    return MINOR_UNITS.get(currency, 2)


def _member_of(codes: frozenset[str], what: str, example: str) -> AfterValidator:
    def check(value: str) -> str:
        if value not in codes:
            raise ValueError(f"{value!r} is not an assigned {what}, such as {example}")
        return value

    return AfterValidator(check)


CountryCode = Annotated[
    str,
    _member_of(COUNTRY_CODES, "ISO 3166-1 alpha-2 country code (two capital letters)", "FI or TR"),
    Field(json_schema_extra={"enum": sorted(COUNTRY_CODES)}),
]

CurrencyCode = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Z]{3}$"),
    _member_of(CURRENCY_CODES, "ISO 4217 currency code", "EUR or TRY"),
    Field(json_schema_extra={"enum": sorted(CURRENCY_CODES)}),
]

DecimalString = Annotated[str, StringConstraints(pattern=r"^-?[0-9]+(\.[0-9]+)?$")]
"""A decimal number as a string ("1500000.00"), so no amount is rounded through a float."""

# --- time -------------------------------------------------------------------------------------


LOGGED = "logged"
"""Validation context key: the data is an event the log already holds (``{LOGGED: True}``). What an
earlier version of the gate accepted then stands: the checks added to the gate since (RFC 3339
text, bounds on counts, well-formed web addresses) are not applied again, or a replay of an older
log would refuse events that were accepted and applied, and everything that followed from them."""


def logged(info: ValidationInfo) -> bool:
    """Whether ``info`` is of reading an event from the log (see :data:`LOGGED`)."""
    context = info.context
    return isinstance(context, dict) and context.get(LOGGED) is True


RFC3339_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?(?:[Zz]|[+-][0-9]{2}:[0-9]{2})")
"""RFC 3339's ``date-time`` (section 5.6), which JSON Schema's ``format: date-time`` names. Python
and pydantic read more (a space for the ``T``, ``+0000``, no seconds), which clients in other
languages (Go's ``time.RFC3339``, JSON Schema validators) refuse: such a value in the log would
break them."""

RFC3339_FULL_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_LOCAL_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(?::[0-9]{2}(?:\.[0-9]+)?)?")


def representable(moment: datetime) -> bool:
    """Whether ``moment`` is a day or more inside the years 1 to 9999 in UTC, where the bus keeps,
    compares and counts from it (``9999-12-31T23:59:59-14:00`` is in year 10000 there, which no
    date holds: its projection failed, for good)."""
    try:
        return _EARLIEST <= moment.astimezone(timezone.utc) <= _LATEST
    except OverflowError:
        return False


_EARLIEST = datetime.min.replace(tzinfo=timezone.utc) + timedelta(days=1)
_LATEST = datetime.max.replace(tzinfo=timezone.utc) - timedelta(days=1)
OUT_OF_RANGE = "in UTC, this one is not a day or more inside the years 1 to 9999"
"""What a moment :func:`representable` refuses is told."""


def _text_or(kind: type) -> BeforeValidator:
    """Refuse numbers (Unix timestamps) that pydantic would otherwise turn into times, and text
    that is not RFC 3339: the contract, and the JSON Schema, say RFC 3339 text."""
    form, example = (RFC3339_DATE_TIME, "2026-03-01T09:00:00+02:00") if kind is datetime else (RFC3339_FULL_DATE, "2026-03-01")

    code = "datetime_parsing" if kind is datetime else "date_parsing"  # pydantic's own, for text it cannot read

    def check(value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, str):
            problem = f"Input should be an RFC 3339 {'date-time' if kind is datetime else 'full-date'} such as {example}"
            if not form.fullmatch(value):
                if logged(info):  # accepted by an earlier gate: read as it was then
                    return value
                if kind is datetime and _LOCAL_TIME.fullmatch(value):
                    raise PydanticCustomError("timezone_aware", "Input should have timezone info (Z or an offset such as +02:00)")
                raise PydanticCustomError(code, problem)
            try:  # read here, as the strict models take no text (``t``/``z`` may be lower case)
                moment = datetime.fromisoformat(value.upper()) if kind is datetime else date.fromisoformat(value)
            except ValueError:
                raise PydanticCustomError(code, f"{problem}: this one does not exist") from None
            if isinstance(moment, datetime) and moment.tzinfo is not None and not logged(info) and not representable(moment):
                raise PydanticCustomError(code, f"{problem}: {OUT_OF_RANGE}")
            return moment
        if not isinstance(value, kind):
            raise ValueError(f"expected an RFC 3339 string, got {json_type(value)}")
        return value

    return BeforeValidator(check)


def at_most(limit: int) -> tuple[Any, ...]:
    """An upper bound for a count, checked at the gate (the JSON Schema's ``maximum``); an event
    the log already holds is read as it was accepted (see :data:`LOGGED`)."""

    def check(value: int, info: ValidationInfo) -> int:
        if value > limit and not logged(info):
            raise PydanticCustomError("less_than_equal", "Input should be less than or equal to {le}", {"le": limit})
        return value

    return (AfterValidator(check), Field(json_schema_extra={"maximum": limit}))


AMOUNT_WHOLE_DIGITS, AMOUNT_DECIMALS = 15, 12
"""The most digits an amount has before its point and after it, checked at the gate: an amount of
a quadrillion or more is a mistake, and the sums of what a call awarded are then exact (the
decimal arithmetic keeps 28 digits)."""

AMOUNT_PATTERN = rf"^[0-9]{{1,{AMOUNT_WHOLE_DIGITS}}}(\.[0-9]{{1,{AMOUNT_DECIMALS}}})?$"
"""An amount as the JSON Schema gives it (the gate reads a logged one of any length, and says the
bound in its own words)."""


def _bounded_amount(value: str, info: ValidationInfo) -> str:
    if logged(info):  # accepted by an earlier gate: read as it was then
        return value
    whole, _, decimals = value.partition(".")
    if len(whole) > AMOUNT_WHOLE_DIGITS:
        raise PydanticCustomError("decimal_whole_digits", f"Input should be an amount of at most {AMOUNT_WHOLE_DIGITS} digits "
                                                          f"before the decimal point, not {len(whole)}")
    if len(decimals) > AMOUNT_DECIMALS:
        raise PydanticCustomError("decimal_max_places", f"Input should be an amount of at most {AMOUNT_DECIMALS} digits "
                                                        f"after the decimal point, not {len(decimals)}")
    return value


NonNegativeDecimalString = Annotated[
    str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?$"), AfterValidator(_bounded_amount),
    Field(json_schema_extra={"pattern": AMOUNT_PATTERN}),
]
"""An amount of money as decimal text (never rounded): ``"1500000.00"``."""


Timestamp = Annotated[AwareDatetime, _text_or(datetime)]
"""A moment with its UTC offset; naive datetimes are refused."""

Day = Annotated[date, _text_or(date)]
"""A calendar date (`2026-03-01`)."""

# --- vocabularies -----------------------------------------------------------------------------

# Sosyokent specialisation areas: domain -> sub-codes. Extend here; everything else follows.
THEMES: dict[str, frozenset[str]] = {
    "migration_population": frozenset({"migrants", "ageing", "cohesion"}),
    "environment_urbanisation": frozenset(
        {"climate", "urban_transformation", "urbanisation", "municipal_services"}
    ),
    "economy": frozenset({"income_inequality", "disability_participation", "disadvantaged_groups"}),
    "education": frozenset({"literacy", "schooling", "lifelong_learning", "quality"}),
    "health_care": frozenset({"basic_services", "elderly_care", "public_health"}),
}


def theme_codes() -> list[str]:
    """Every valid theme code, sorted: each domain alone and each `domain.sub_code`."""
    return sorted([*THEMES, *(f"{d}.{s}" for d, subs in THEMES.items() for s in subs)])


def check_theme(value: str) -> str:
    domain, dot, sub = value.partition(".")
    if domain not in THEMES or (dot and sub not in THEMES[domain]):
        raise ValueError(f"unknown theme code {value!r}{_theme_hint(value)}")
    return value


def _theme_hint(value: str) -> str:
    """The codes a wrong one was probably meant to be: a sub-code without its area
    (``elderly_care``), the start of an area (``health``), or a misspelling."""
    codes = theme_codes()
    meant = [code for code in codes if "." in code and code.partition(".")[2] == value]
    meant = meant or [code for code in THEMES if value and code.startswith(value)]
    meant = meant or difflib.get_close_matches(value, codes, n=3, cutoff=0.75)
    if meant:
        return f"; did you mean {' or '.join(repr(code) for code in meant[:3])}?"
    return f"; the areas are {', '.join(sorted(THEMES))}, each alone or with a sub-code (`collabbus schemas list`)"


Theme = Annotated[
    str,
    AfterValidator(check_theme),
    # Built when the schema is, so an extended THEMES shows up in the exported schemas too.
    Field(json_schema_extra=lambda schema: schema.update(enum=theme_codes())),
]


class InstitutionKind(StrEnum):
    """What an institution is; decides which event types it may offer (the registry's emitters)."""

    UNIVERSITY = "university"
    MUNICIPALITY = "municipality"
    NGO = "ngo"
    COOPERATIVE = "cooperative"
    COMPETENCE_CENTRE = "competence_centre"
    PUBLIC_AGENCY = "public_agency"
    FUNDER = "funder"
    COMPANY = "company"
    SOCIAL_ENTERPRISE = "social_enterprise"
    OPERATOR = "operator"


Criterion = Literal[
    "novelty", "effectiveness", "user_involvement", "transferability", "sustainability", "equity"
]
"""The validation criteria every review scores."""

CRITERIA: tuple[Criterion, ...] = (
    "novelty",
    "effectiveness",
    "user_involvement",
    "transferability",
    "sustainability",
    "equity",
)

def _whole(value: Any) -> Any:
    """A number without a fraction (``4.0``) is the integer it names, as JSON Schema's ``integer``
    reads it (a client whose language writes whole floats that way sends it so); text, booleans
    and fractions are left as they are, for the strict check to refuse."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


Whole = BeforeValidator(_whole)
"""For a strict ``int``, after its bounds (so that they stay in its JSON Schema): ``4`` or
``4.0``; not ``"4"``, ``4.5`` or ``true``."""

# Strict: "3", 3.7 and true are not scores (3.0 is 3).
Score = Annotated[int, Strict(), Field(ge=1, le=5), Whole]
EvidenceLevel = Annotated[int, Strict(), Field(ge=1, le=5), Whole]
"""Nesta standards of evidence, level 1 (a logical account) to 5 (proven to scale)."""

# --- base classes and small shared parts ------------------------------------------------------

_FROZEN = ConfigDict(frozen=True, extra="forbid")


class ValueObject(BaseModel):
    """A part of event data (money, a partner, a venue): frozen, unknown fields refused."""

    model_config = _FROZEN


class EventData(BaseModel):
    """The `data` of one event type. Frozen, since events are facts; unknown fields are refused,
    so a typo surfaces at the gate instead of being silently dropped."""

    model_config = _FROZEN


class Money(ValueObject):
    """An amount in a currency; the amount is decimal text so it is never rounded."""

    amount: NonNegativeDecimalString
    currency: CurrencyCode


class ExternalRef(ValueObject):
    """How another system (e.g. Innokylä) names the same thing."""

    system: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
    id: Annotated[str, StringConstraints(min_length=1, max_length=256), WITHOUT_NUL]
    url: WebUrl | None = None


def _refuse_null(value: T | None) -> T:
    if value is None:
        raise ValueError("cannot be cleared (null); leave the field out to keep its value")
    return value


def _drop_null_branch(schema: JsonDict) -> None:
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    else:
        schema["anyOf"] = branches
    schema.pop("default", None)


NotClearable = Annotated[
    T | None, AfterValidator(_refuse_null), Field(json_schema_extra=_drop_null_branch)
]
"""A field of a change set that may be replaced but not cleared: leaving it out keeps the value,
`null` is refused. Clearable fields of a change set are plain `X | None = None`."""


class Changes(ValueObject):
    """A change set (call.amended, project.updated): the fields present are the new values; a
    present `null` clears an optional field. At least one field must be present."""

    model_config = ConfigDict(json_schema_extra={"minProperties": 1})

    @model_validator(mode="after")
    def _names_a_field(self) -> Self:
        if not self.model_fields_set:
            raise ValueError("changes must name at least one field")
        return self


class Reason(ValueObject):
    """Why a workflow refused something: a code for machines (each refusal event narrows it to
    its own vocabulary), an optional message for people."""

    code: str
    message: LocalizedText | None = None


def json_type(value: object) -> str:
    """What a decoded JSON value is, in JSON's words: messages go to clients written in any language."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# What each pattern of the catalog and the API asks for, in words: "String should match pattern
# '^[a-z0-9][a-z0-9-]{1,62}$'" is exact, and a person has to decode it. The JSON Schemas keep the
# patterns themselves.
_PATTERN_WORDS = {
    r"^[a-z0-9][a-z0-9-]{1,62}$": "an institution id: 2 to 63 lower-case letters (a-z), digits and hyphens, "
                                  "not beginning with a hyphen, e.g. mersin-bb",
    r"^/institutions/[a-z0-9][a-z0-9-]{1,62}$": "/institutions/ and the sender's institution id (2 to 63 lower-case "
                                                "letters, digits and hyphens), e.g. /institutions/mersin-bb",
    r"^[A-Za-z0-9_:-]{1,128}$": "an id of 1 to 128 letters (A-Z, a-z), digits, '_', ':' and '-' (no dots or spaces)",
    r"^[A-Za-z0-9._:-]{1,128}$": "an id of 1 to 128 letters (A-Z, a-z), digits, '.', '_', ':' and '-' (no spaces)",
    r"^[a-z][a-z_]*\.[a-z][a-z_]*$": "an event type: its domain and name in lower case joined by a dot, "
                                      "e.g. project.registered",
    r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$": "a W3C traceparent in lower-case hex: "
                                                            "version-trace id-parent id-flags, e.g. "
                                                            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8})*$": "a language tag (BCP 47) such as fi, sv or sv-FI",
    r"^[^@\s]+@[^@\s]+\.[^@\s]+$": "an email address such as info@example.org",
    r"^[A-Z]{3}$": "an ISO 4217 currency code in capitals, e.g. EUR",
    r"^-?[0-9]+(\.[0-9]+)?$": 'a decimal number written as a string, e.g. "1500000.00"',
    r"^[0-9]+(\.[0-9]+)?$": 'a decimal number of at least 0 written as a string, e.g. "1500000.00"',
    AMOUNT_PATTERN: f'a decimal number of at least 0 written as a string, of at most {AMOUNT_WHOLE_DIGITS} digits before '
                    f'the point and {AMOUNT_DECIMALS} after it, e.g. "1500000.00"',
    r"^[A-Za-z]{2}$": "a two-letter country code (ISO 3166-1 alpha-2), e.g. FI",
    r"^https?://[^\s/?#]+[^\s]*$": "an http(s) address, e.g. https://example.fi/page",
    _WEB_URL: "an http(s) address, e.g. https://example.fi/page",
    WITHOUT_NUL_PATTERN: "text without the NUL character (U+0000)",
    r"^[a-z0-9][a-z0-9_-]{0,62}$": "a code of 1 to 63 lower-case letters (a-z), digits, '_' and '-', "
                                   "not beginning with either, e.g. innokyla",
    r"^[a-z0-9][a-z0-9-]{0,62}$": "a code of 1 to 63 lower-case letters (a-z), digits and '-', "
                                  "not beginning with '-', e.g. fi-business-id",
}


NUL_MESSAGE = "Input should be text without the NUL character (U+0000), which the network's databases cannot store"
"""What a text holding U+0000 is told: PostgreSQL's text cannot hold it (its driver fails the
statement), so nothing the network stores or looks up may have it."""


def nul_replaced(value: Any) -> Any:
    """``value`` (JSON) with U+0000 as U+FFFD in every text and member's name: how the read models
    take an event the log holds from before the gate refused NUL (PostgreSQL cannot store it)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {nul_replaced(name): nul_replaced(item) for name, item in value.items()}
    if isinstance(value, list):
        return [nul_replaced(item) for item in value]
    return value


def without_nul(text: str | None) -> str | None:
    """``text``, refused (``string_nul``) when it holds the NUL character (:data:`NUL_MESSAGE`)."""
    if text is not None and "\x00" in text:
        raise PydanticCustomError("string_nul", NUL_MESSAGE)
    return text


AWARE_TIME = "Input should be a time with its UTC offset, such as 2027-01-20T00:00:00Z or 2027-01-20T12:00:00+02:00"
"""What a moment with its offset is, for a value that is none: a date alone, or a time without it."""


def error_message(error: Mapping[str, Any]) -> str:
    """The message of one of pydantic's errors, with a pattern the value did not match said in words."""
    if error.get("type") == "string_pattern_mismatch":
        words = _PATTERN_WORDS.get(str((error.get("ctx") or {}).get("pattern")))
        if words is not None:
            return f"Input should be {words}"
    if error.get("type") == "timezone_aware":  # (a date alone, or a time without its offset)
        return AWARE_TIME
    if error.get("type") in ("too_short", "too_long"):
        return _count_words(error) or str(error.get("msg", ""))
    if error.get("type") == "value_error":  # a check of the catalog's own, which says what it means
        return str(error.get("msg", "")).removeprefix("Value error, ")
    given = error.get("input")
    if error.get("type") == "string_type" and isinstance(given, (int, float)) and not isinstance(given, bool):
        # An amount sent as a JSON number: it is text here, so that no parser rounds it.
        return f'Input should be a string: write the number as one, "{given}"'
    message = str(error.get("msg", ""))
    if error.get("type") in ("enum", "literal_error") and "input" in error:
        return message + _not_one_of(given, re.findall(r"'([^']*)'", str((error.get("ctx") or {}).get("expected", ""))))
    if error.get("type") in _TYPE_ERRORS and "input" in error:
        return f"{message}, not {json_type(given)}"
    return message


_TYPE_ERRORS = frozenset({"string_type", "int_type", "float_type", "bool_type", "dict_type", "list_type", "tuple_type",
                          "model_type", "model_attributes_type", "date_type", "datetime_type", "decimal_type"})
"""Pydantic's errors of a value of another JSON type than the one asked for: their message says
what it should be, and the sender is told what it was too (null, most often, from a serializer
writing every field)."""


def _not_one_of(given: object, choices: list[str]) -> str:
    """What to add to "Input should be 'a', 'b' or 'c'": what was given instead, and the choice
    nearest to it, which is most often what was meant (a misspelt kind, role or status)."""
    if not isinstance(given, str):
        return f", not {json_type(given)}"
    if len(given) > 64:
        return ", not this string"
    near = nearest(given, choices) if choices else None
    return f", not {given!r}" + (f"; did you mean {near!r}?" if near else "")


def _count_words(error: Mapping[str, Any]) -> str | None:
    """Too few or too many items, in JSON's words (pydantic's name Python's types: "Tuple should
    have at least 1 item after validation"), or in a query's: how often a parameter is given."""
    ctx = error.get("ctx") or {}
    least = error.get("type") == "too_short"
    bound = ctx.get("min_length" if least else "max_length")
    if not isinstance(bound, int):
        return None
    actual = ctx.get("actual_length")
    loc = tuple(error.get("loc") or ())
    if loc[:1] == ("query",):
        times = "once" if bound == 1 else f"{bound} times"
        said = f"at least {times}" if least else f"at most {times}"
        return f"Input should be given {said}" + (f", not {actual}" if isinstance(actual, int) else "")
    if ctx.get("field_type") == "Dictionary":
        what, one, many = "an object with", "entry", "entries"
    else:
        what, one, many = "an array of", "item", "items"
    noun = one if bound == 1 else many
    return f"Input should be {what} {'at least' if least else 'at most'} {bound} {noun}" + (
        f", not {actual}" if isinstance(actual, int) else "")


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The one of ``candidates`` nearest to ``name``, which is most often what was meant by a name
    that names nothing (a typo in an id); None when none is near enough (an edit similarity under
    60 %). Of equally near ones, the first. Every "did you mean" of an unknown id or name asks this
    one, so they all suggest alike. The comparison is compiled (RapidFuzz): it is asked of every id of
    a kind — a portal's 100,000 projects take milliseconds, where difflib took seconds of the
    worker or of the bus's apply holding its batch."""
    from rapidfuzz import fuzz, process  # (on the first unknown id: ~5 MB a process that meets none does without)

    if isinstance(candidates, Mapping):  # (its keys, as iterating it gives; RapidFuzz would compare its values)
        candidates = candidates.keys()
    near = process.extractOne(name, candidates, scorer=fuzz.ratio, score_cutoff=60)
    return near[0] if near is not None else None


def unknown_name(name: str, what: str, known: Iterable[str], rest: str = "") -> str:
    """What to say of a name that is not one of ``known`` (``what`` it is not), with the nearest of
    them (:func:`nearest`): ``'sujbect' is not an attribute …; did you mean 'subject'?`` and then
    ``rest`` (what the names are, say)."""
    near = nearest(name, known)
    return f"{name!r} is not {what}" + (f"; did you mean {near!r}?" if near else "") + rest
