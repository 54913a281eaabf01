"""What a process applying the log learns when another one took it over.

Apart from ``handlers.bookkeeping`` (which raises it) so that the bus's own modules catch it
without loading the read models: a gatekeeper process loads the bus and never SQL.
"""

from __future__ import annotations


class PositionTaken(Exception):
    """Another process took over applying the log, or applied it from where a batch in hand
    starts: the transaction writes nothing (it is rolled back), and what this process kept of the
    read models is stale."""

    def __init__(self, consumer: str, position: int, first: int | None = None) -> None:
        if first is None:
            told = f"another process took over applying the log (consumer {consumer}, applied up to #{position})"
        else:
            told = f"another process applied the log up to #{position} (consumer {consumer}) while this one held a batch from #{first}"
        super().__init__(told)
        self.consumer, self.position, self.first = consumer, position, first
