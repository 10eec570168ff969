"""Waiting with a deadline without losing a cancellation.

Invariant: a task waiting here that is cancelled raises CancelledError, whatever else happened in the
same turn of the event loop. Python 3.11's `asyncio.wait_for` breaks this: when the awaited result and
the cancellation arrive in the same turn, it returns the result and the cancellation is gone (CPython
gh-86296; 3.12 rebuilt `wait_for` on `asyncio.timeout`). A worker stopped with `cancel()` then runs on
and whoever awaits it waits forever. `asyncio.timeout` tells its own cancellation from anyone else's
(`Task.uncancel`), so every deadline in the services is written with it.
"""

from __future__ import annotations

import asyncio


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until event is set or timeout seconds have passed; True when it was set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        return False
    return True
