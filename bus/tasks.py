"""What asyncio's tasks need here beyond the standard library."""

from __future__ import annotations

import asyncio


def stop_if_cancelled() -> None:
    """Raise the cancellation of the running task if one was asked for and swallowed on the way.

    Python 3.11's ``asyncio.wait_for`` — which nats-py's requests await — returns the awaited
    result when it completes as the task is cancelled, and the cancellation is lost: a loop of
    requests (a rebuild, a lease's renewals) would then run on as if nothing had been asked. The
    task still counts the request (``Task.cancelling``), which this honours."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError()
