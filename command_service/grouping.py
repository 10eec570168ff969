"""Group commit: requests that arrive while a transaction is in flight share the next one.

The invariants, which `Grouper` keeps for any `process` function:
- one group at a time: a request submitted while no group is in flight starts one at once (no waiting
  when idle); requests submitted meanwhile wait, in arrival order, and go together into the next group;
- at most `limit` requests per group, and never two with the same key (a request_id) in one group: a
  second copy waits for a later group, where it finds what the first stored;
- every request taken into a group gets its own outcome: `process` settles each one with `settle` or
  `fail`. When it raises for a group of several, it must have written nothing (one transaction rolled
  back), and each request is processed again in a group of its own, unless `retry_alone` says the
  error would only repeat (a database that cannot be reached): then all fail with it;
- a caller that gives up (its call is cancelled, say past its deadline) before its request was taken
  removes it from the queue; once taken, the group goes on without it while any other caller of the
  group still waits, and is cancelled (its transaction rolled back) when none does.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from prometheus_client import Counter, Gauge, Histogram

T = TypeVar("T")
log = logging.getLogger(__name__)

GROUP_SIZE = Histogram(
    "orders_command_group_size",
    "Commands per shared transaction (its _count is the number of transactions)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
RETRIED = Counter(
    "orders_command_group_retries", "Shared transactions that failed as a whole, their commands then tried one by one"
)
WAITING = Gauge("orders_command_group_waiting", "Commands waiting for the transaction in flight to finish")


@dataclass(eq=False)
class Pending(Generic[T]):
    """One submitted request and the future its caller awaits."""

    key: str
    request: T
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())

    def settle(self, outcome: Any) -> None:
        if not self.future.done():
            self.future.set_result(outcome)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class Grouper(Generic[T]):
    """Runs `process` over groups of submitted requests, one group at a time (see the module docstring)."""

    def __init__(
        self,
        process: Callable[[list[Pending[T]]], Awaitable[None]],
        limit: int,
        retry_alone: Callable[[Exception], bool] = lambda exc: True,
    ) -> None:
        self._process = process
        self._retry_alone = retry_alone
        self._limit = limit
        self._waiting: collections.deque[Pending[T]] = collections.deque()
        self._runner: asyncio.Task[None] | None = None

    async def submit(self, key: str, request: T) -> Any:
        """The outcome `process` gave this request (or the error it failed with)."""
        pending = Pending(key, request)
        self._waiting.append(pending)
        WAITING.inc()
        if self._runner is None:
            # In a context of its own: it serves many calls, so it must not log under the first one's
            # correlation id.
            self._runner = asyncio.create_task(self._run(), name="command-groups", context=contextvars.Context())
        return await pending.future

    async def _run(self) -> None:
        try:
            while group := self._take():
                GROUP_SIZE.observe(len(group))
                try:
                    await self._settle(group)
                except BaseException:  # the service is stopping: its callers are cancelled too
                    for pending in group:
                        pending.future.cancel()
                    raise
                for pending in group:
                    pending.fail(RuntimeError("the group commit left this request without an outcome"))
        finally:
            self._runner = None

    async def _settle(self, group: list[Pending[T]]) -> None:
        work = asyncio.ensure_future(self._process(group))
        abandoned = False

        def gone(_: asyncio.Future[Any]) -> None:
            nonlocal abandoned
            if all(pending.future.cancelled() for pending in group):
                abandoned = True
                work.cancel()

        for pending in group:
            pending.future.add_done_callback(gone)
        try:
            await work
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not abandoned or (task is not None and task.cancelling()):
                raise
        except Exception as exc:
            if len(group) == 1 or not self._retry_alone(exc):
                for pending in group:
                    pending.fail(exc)
                return
            RETRIED.inc()
            log.info("a transaction shared by %d commands failed (%r); trying each alone", len(group), exc)
            for pending in group:
                if not pending.future.done():
                    await self._settle([pending])

    def _take(self) -> list[Pending[T]]:
        """The next group: the longest-waiting requests, at most `limit`, one per key."""
        group: list[Pending[T]] = []
        keys: set[str] = set()
        later: list[Pending[T]] = []
        while self._waiting and len(group) < self._limit:
            pending = self._waiting.popleft()
            if pending.future.done():  # its caller gave up while it waited
                WAITING.dec()
                continue
            if pending.key in keys:
                later.append(pending)
                continue
            WAITING.dec()
            keys.add(pending.key)
            group.append(pending)
        self._waiting.extendleft(reversed(later))
        return group
