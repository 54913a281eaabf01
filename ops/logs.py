"""Logging for a bus process: JSON lines for machines, readable lines for people.

``collabbus up`` configures it once. When standard error is not a terminal (a container, a
service manager, a pipe) every record is one JSON object per line, so a log pipeline can search
by field; on a terminal it is one readable line — unless ``COLLABBUS_LOG_FORMAT`` says which
(``json`` under tmux for a pipeline, ``text`` for a journal read by people). Context the code passes with ``extra`` — above
all ``event_id`` where a log line is about an event — is kept in both, and a line written inside a
traced operation carries its ``trace_id`` and ``span_id``.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson
from opentelemetry import trace

# What every LogRecord has; anything else on a record came in through ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The fields a log call added with ``extra``."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


class TraceContext(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` of the current span, so a log line leads to its trace
    (``collabbus traces TRACE_ID``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = trace.get_current_span().get_span_context()
        if context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


class JsonLines(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the extras, the exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            **extras(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class Readable(logging.Formatter):
    """``12:00:01 WARNING collabbus.gate: message  event_id=…`` and the traceback, if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = "  ".join(f"{key}={value}" for key, value in extras(record).items())
        if not context:
            return line
        first, sep, rest = line.partition("\n")  # the context goes on the message's line, before a traceback
        return f"{first}  {context}{sep}{rest}"


def configure_logging(level: int | str = logging.INFO, stream: TextIO | None = None, form: str = "auto") -> None:
    """Send every logger's records at ``level`` or above (a number, or a name: ``warning``) to
    ``stream`` (standard error) as ``form`` says: ``json``, ``text``, or ``auto`` — JSON unless it
    is a terminal (``COLLABBUS_LOG_FORMAT``, ``COLLABBUS_LOG_LEVEL``)."""
    stream = stream or sys.stderr
    if isinstance(level, str):
        level = logging.getLevelNamesMapping()[level.upper()]
    handler = logging.StreamHandler(stream)
    readable = form == "text" or (form == "auto" and stream.isatty())
    handler.setFormatter(Readable() if readable else JsonLines())
    handler.addFilter(TraceContext())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("alembic").setLevel(max(level, logging.WARNING))  # every migration step is noise at start
    logging.getLogger("httpx").setLevel(max(level, logging.WARNING))  # a line per request of the bus's own clients


REMIND_EVERY = 30.0
"""Seconds between the lines saying that a failure still repeats (:class:`Spell`)."""


class Spell:
    """A failure that repeats while something is away — a pull request refused twice a second
    while a stream elects its leader, a lease's renewal each second, every offer while the log
    does not confirm — said when it starts, every :data:`REMIND_EVERY` seconds while it lasts, and
    when it ends, with how often it failed: not a line each time.

    ``first``, ``still`` and ``ended`` are format strings of the fields given to :meth:`failed`
    (``why`` at least), ``n`` (the failures so far), ``times`` (the same in words: "once",
    "twice", "3 times") and ``seconds`` (since the first)."""

    def __init__(self, logger: logging.Logger, *, first: str, still: str, ended: str, remind: float = REMIND_EVERY,
                 clock: Any = None) -> None:
        import time

        self.logger, self.first, self.still, self.ended_line, self.remind = logger, first, still, ended, remind
        self.clock = clock or time.monotonic
        self.since: float | None = None
        """When the failures began (None: they are not failing)."""
        self.failures = 0
        self._said = 0.0

    def failed(self, **fields: Any) -> None:
        now = self.clock()
        self.failures += 1
        if self.since is None:
            self.since = self._said = now
            self.logger.warning(self.first.format(n=1, times=_times(1), seconds=0.0, **fields))
        elif now - self._said >= self.remind:
            self._said = now
            self.logger.warning(self.still.format(n=self.failures, times=_times(self.failures), seconds=now - self.since, **fields))

    def ended(self) -> None:
        """It works again (nothing is said when it was not failing)."""
        if self.since is not None:
            self.logger.warning(self.ended_line.format(n=self.failures, times=_times(self.failures), seconds=self.clock() - self.since))
            self.since, self.failures = None, 0


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")
