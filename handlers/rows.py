"""The base of the read models' tables: rows the handlers create cost a dictionary, not a validation.

SQLModel builds a table row by assigning every field through both pydantic's and SQLAlchemy's
attribute machinery (about 100 µs a row); applying the log creates rows by the hundred thousand.
A table row is not validated on creation anyway (SQLModel skips validation for ``table=True``),
so :class:`TableRow` fills the instance's ``__dict__`` — which pydantic and SQLAlchemy share — with the
given values and the fields' defaults, as ``model_construct`` does. SQLAlchemy reads a new row's
values from that dictionary when it inserts it; later assignments take the usual path.

Unknown field names are refused (SQLModel would drop them silently).
"""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy.orm.attributes import set_attribute
from sqlalchemy.orm.instrumentation import manager_of_class
from sqlmodel import SQLModel
from sqlmodel.main import finish_init


class TableRow(SQLModel):
    """Base of the handlers' tables (see module)."""

    __row_columns__: ClassVar[dict[type[Any], frozenset[str]]] = {}
    """Per table class: its fields that are instrumented columns (no relationships here)."""
    __row_defaults__: ClassVar[dict[type[Any], tuple[frozenset[str], dict[str, Any], tuple[tuple[str, Any], ...]]]] = {}
    """Per class: its field names, the defaults that can be shared (immutable values) and the
    fields whose default is made anew for each row (a list, by its factory)."""

    def __init__(self, **data: Any) -> None:
        if not finish_init.get():  # SQLModel's own validation path builds the row itself
            return
        cls = type(self)
        plan = TableRow.__row_defaults__.get(cls) or _plan(cls)
        names, shared, made = plan
        unknown = data.keys() - names
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(unknown))}")
        values = shared.copy()
        for name, field in made:
            if name not in data:
                values[name] = field.get_default(call_default_factory=True)
        values.update(data)
        self.__dict__.update(values)
        object.__setattr__(self, "__pydantic_fields_set__", set(data))
        object.__setattr__(self, "__pydantic_extra__", None)
        object.__setattr__(self, "__pydantic_private__", None)

    def __setattr__(self, name: str, value: Any) -> None:
        """A column is set as SQLAlchemy sets it (the value in ``__dict__``, the change noted for
        the flush) and marked set for pydantic: what SQLModel does, without asking both libraries
        again on every assignment whether the class is a table and the name a column (applying
        the log sets row attributes by the hundred thousand). Anything else as SQLModel sets it."""
        columns = TableRow.__row_columns__.get(type(self))
        if columns is None:
            columns = _columns(type(self))
        if name in columns:
            set_attribute(self, name, value)
            self.__pydantic_fields_set__.add(name)
        else:
            super().__setattr__(name, value)

    def __getattr__(self, name: str) -> Any:
        if name == "_sa_instance_state":  # asked (by hasattr) of every new row: not there yet
            raise AttributeError(name)
        return super().__getattr__(name)  # type: ignore[misc]


def _columns(cls: type[TableRow]) -> frozenset[str]:
    manager = manager_of_class(cls) if cls.model_config.get("table") else None
    relationships = getattr(cls, "__sqlmodel_relationships__", {})
    names = frozenset(name for name in cls.model_fields if manager is not None and name in manager and name not in relationships)
    TableRow.__row_columns__[cls] = names
    return names


_SHAREABLE = (type(None), bool, int, float, str, bytes, tuple, frozenset)


def _plan(cls: type[TableRow]) -> tuple[frozenset[str], dict[str, Any], tuple[tuple[str, Any], ...]]:
    shared: dict[str, Any] = {}
    made: list[tuple[str, Any]] = []
    for name, field in cls.model_fields.items():
        if field.is_required():
            continue
        if field.default_factory is None and isinstance(field.default, _SHAREABLE):
            shared[name] = field.default
        else:
            made.append((name, field))
    plan = TableRow.__row_defaults__[cls] = (frozenset(cls.model_fields), shared, tuple(made))
    return plan
