"""Keyset paging: ``?limit=&cursor=`` → ``{"items", "next_cursor"}``.

A cursor is the sort key of the last item served, base64 of its JSON: the next page starts after
it, so items inserted or removed meanwhile never cause gaps or repeats (offsets would).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from datetime import date, datetime, timezone
from typing import Annotated, Any, Generic, TypeVar

import orjson
import sqlalchemy as sa
from fastapi import Query
from pydantic import BaseModel
from sqlmodel import Session

from connectors.http.problems import ApiProblem

T = TypeVar("T")
Row = TypeVar("Row")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="items per page")]
Cursor = Annotated[str | None, Query(max_length=1024, description="`next_cursor` of the previous page")]


class Page(BaseModel, Generic[T]):
    """One page of a list; ``next_cursor`` is null on the last page."""

    items: list[T]
    next_cursor: str | None


def encode(key: Sequence[Any]) -> str:
    """The opaque cursor of a sort key."""
    return base64.urlsafe_b64encode(orjson.dumps(list(key))).decode().rstrip("=")


DESCENDING = "desc"
"""What a cursor of a list in descending order ends with, after its sort key: it goes on in that
order only."""


def decode(cursor: str, arity: int, *, descending: bool = False) -> list[Any]:
    """The sort key in a cursor; a problem (400) when it is not one of ours, or one of the list in
    the other order."""
    try:
        key = orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        key = None
    ordered = isinstance(key, list) and len(key) == arity + 1 and key[-1] == DESCENDING
    if isinstance(key, list) and (len(key) == arity or ordered) and ordered != descending:
        raise ApiProblem(400, (
            "the cursor is of the list newest first: ask with order=desc, as for the page it came with"
            if ordered else "the cursor is of the list oldest first: ask without order=desc, as for the page it came with"),
            kind="bad_cursor")
    if not isinstance(key, list) or len(key) != arity + descending:
        raise ApiProblem(400, "the cursor is not valid; use next_cursor of the previous page as it is", kind="bad_cursor")
    return key[:arity]


def _python_value(column: Any, value: Any) -> Any:
    """A cursor's JSON value as the column compares it (moments and dates come back from text);
    a value of the wrong kind is a bad cursor, never a database error."""
    column_type = column.property.columns[0].type
    impl = getattr(column_type, "impl_instance", column_type)
    try:
        if isinstance(impl, sa.DateTime) and isinstance(value, str):
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None and impl is not column_type:  # a decorated (UTC) column wants aware moments
                moment = moment.replace(tzinfo=timezone.utc)
            return moment
        if isinstance(impl, sa.Date) and isinstance(value, str):
            return date.fromisoformat(value)
        if isinstance(impl, sa.String) and isinstance(value, str):
            return value
        if isinstance(impl, sa.Integer) and isinstance(value, int) and not isinstance(value, bool):
            return value
    except ValueError:
        pass
    raise ApiProblem(400, "the cursor is not valid", kind="bad_cursor")


def _after(keys: Sequence[Any], values: Sequence[Any], descending: bool = False) -> sa.ColumnElement[bool]:
    """Rows strictly after ``values`` in the order of ``keys`` (written out, so every database and
    column type compares the same way: k1 > v1 OR (k1 = v1 AND k2 > v2) …; ``descending``: <)."""
    clauses = []
    for i, key in enumerate(keys):
        equal = [keys[j] == values[j] for j in range(i)]
        clauses.append(sa.and_(*equal, key < values[i] if descending else key > values[i]))
    return sa.or_(*clauses)


def keyset_page(
    session: Session,
    query: Any,
    keys: Sequence[Any],
    *,
    limit: int,
    cursor: str | None,
    keep: Callable[[Any], bool] | None = None,
    descending: bool = False,
) -> tuple[list[Any], str | None]:
    """A page of ``query``'s rows in the order of ``keys`` (mapped columns, unique together,
    non-null), after ``cursor``; ``descending``: in the reverse order, a cursor going on towards
    the smallest. ``keep`` filters rows in Python where SQL cannot portably (themes in JSON
    lists): rows are then read in chunks until the page is full."""
    after = [_python_value(k, v) for k, v in zip(keys, decode(cursor, len(keys), descending=descending))] if cursor else None
    chunk = limit + 1 if keep is None else max(limit + 1, 200)
    names = [k.key for k in keys]
    found: list[Any] = []
    while True:
        select = query.order_by(*((key.desc() for key in keys) if descending else keys)).limit(chunk)
        if after is not None:
            select = select.where(_after(keys, after, descending))
        rows = session.exec(select).all()
        for row in rows:
            if keep is None or keep(row):
                found.append(row)
                if len(found) > limit:
                    last = found[limit - 1]
                    return found[:limit], encode([_jsonable(getattr(last, n)) for n in names] + ([DESCENDING] if descending else []))
        if len(rows) < chunk:
            return found, None
        after = [getattr(rows[-1], n) for n in names]


def list_page(items: Sequence[Row], key: Callable[[Row], Any], *, limit: int, cursor: str | None) -> tuple[list[Row], str | None]:
    """A page of an ordered list computed in full (a day's registrations), after the item whose
    ``key`` the cursor holds; keys are unique within the list."""
    start = 0
    if cursor:
        (wanted,) = decode(cursor, 1)
        keys = [_jsonable(key(item)) for item in items]
        if wanted not in keys:
            raise ApiProblem(400, "the cursor does not name an item of this list", kind="bad_cursor")
        start = keys.index(wanted) + 1
    page = list(items[start : start + limit])
    more = start + limit < len(items)
    return page, encode([_jsonable(key(page[-1]))]) if more and page else None


def _jsonable(value: Any) -> Any:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value
