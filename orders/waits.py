"""Waiting with a deadline, and stopping a worker, without losing a cancellation.

Invariant: a task waiting here that is cancelled raises CancelledError, whatever else happened in the
same turn of the event loop. Python 3.11's `asyncio.wait_for` breaks this: when the awaited result and
the cancellation arrive in the same turn, it returns the result and the cancellation is gone (CPython
gh-86296; 3.12 rebuilt `wait_for` on `asyncio.timeout`). A worker stopped with `cancel()` then runs on
and whoever awaits it waits forever. `asyncio.timeout` tells its own cancellation from anyone else's
(`Task.uncancel`), so every deadline in the services is written with it. Libraries still use
`wait_for` (nats-py's requests and flushes), so a worker is stopped with `cancel_and_wait`, which asks
again until the worker has finished.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger(__name__)

CANCEL_AGAIN_AFTER = 1.0  # seconds


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until event is set or timeout seconds have passed; True when it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True


async def cancel_and_wait(task: asyncio.Task[Any], again_after: float = CANCEL_AGAIN_AFTER) -> None:
    """Cancel task and wait until it has finished, cancelling it again every again_after seconds while
    it runs on (a cancellation swallowed by a library). What the task raised, other than its
    cancellation, is raised here."""
    while True:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=again_after)
        if done:
            break
        log.warning("task %s ran on after cancel(); cancelling it again", task.get_name())
    if not task.cancelled():
        task.result()
