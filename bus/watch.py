"""How far the read models have applied the log, for those waiting on it: a long poll of
``GET /events`` (``?wait=``) waits here for the network to apply more of it.

The bus's network consumer reports each batch it handled (:meth:`AppliedWatch.applied`); a
waiter is woken when the position passes the point it waits beyond. Waking on *applied* rather
than on *logged* lets the read models know a new event before the poll looks at it again, so a
confidential event is judged against its validation or call as the workflow has it.
"""

from __future__ import annotations

import asyncio


class AppliedWatch:
    """The last log sequence the read models applied (0: none since the bus started), and a way
    to wait for it to pass a point. Closing it (the bus stops) wakes every waiter."""

    def __init__(self) -> None:
        self.position = 0
        self.closed = False
        self._changed = asyncio.Event()

    def applied(self, seq: int) -> None:
        """The consumer applied (or dead-lettered) the log up to ``seq``."""
        if seq > self.position:
            self.position = seq
            self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_beyond(self, seq: int, timeout: float) -> bool:
        """Wait until a sequence after ``seq`` is applied: True then, False when ``timeout``
        seconds pass first or the watch is closed."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout
        while self.position <= seq and not self.closed:
            left = until - loop.time()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return False
        return self.position > seq
