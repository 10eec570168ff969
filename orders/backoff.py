"""The one reconnect/retry delay schedule: doubling from a first delay up to a ceiling."""

from __future__ import annotations

import asyncio

FIRST_DELAY = 0.2
MAX_DELAY = 5.0


class Backoff:
    """Delays of first, 2 x first, 4 x first ... capped at ceiling; `reset` after a success."""

    def __init__(self, first: float = FIRST_DELAY, ceiling: float = MAX_DELAY) -> None:
        self._first, self._ceiling = first, ceiling
        self._next = first

    def next(self) -> float:
        """The delay to wait now (the following one doubles)."""
        delay = self._next
        self._next = min(delay * 2, self._ceiling)
        return delay

    def reset(self) -> None:
        self._next = self._first

    async def sleep(self) -> None:
        await asyncio.sleep(self.next())
