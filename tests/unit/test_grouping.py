"""The group-commit queue on its own (no database): who goes into which group, and every outcome."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from command_service.grouping import Grouper, Pending


class Recorder:
    """A `process` that records each group's requests and answers each with its request doubled; the
    first group waits until released, so that later submissions queue behind it."""

    def __init__(self, fail_when: Any = None) -> None:
        self.groups: list[list[Any]] = []
        self.release = asyncio.Event()
        self.fail_when = fail_when

    async def __call__(self, group: list[Pending[Any]]) -> None:
        self.groups.append([p.request for p in group])
        if len(self.groups) == 1:
            await self.release.wait()
        if self.fail_when is not None and self.fail_when(group):
            raise ValueError(f"group {[p.request for p in group]} failed")
        for pending in group:
            if pending.request == "silent":
                continue
            pending.settle(pending.request * 2)


async def started(grouper: Grouper[Any], key: str, request: Any) -> asyncio.Task[Any]:
    task = asyncio.create_task(grouper.submit(key, request))
    await asyncio.sleep(0)  # let it queue
    return task


def test_requests_arriving_during_a_transaction_share_the_next_group_in_order() -> None:
    async def scenario() -> None:
        process = Recorder()
        grouper = Grouper(process, limit=3)
        first = await started(grouper, "a", 1)
        rest = [await started(grouper, key, n) for key, n in [("b", 2), ("c", 3), ("d", 4), ("e", 5)]]
        assert process.groups == [[1]]  # the first started at once, alone
        process.release.set()
        assert await asyncio.gather(first, *rest) == [2, 4, 6, 8, 10]
        assert process.groups == [[1], [2, 3, 4], [5]]  # at most `limit` per group, in arrival order

    asyncio.run(scenario())


def test_two_requests_with_one_key_never_share_a_group() -> None:
    async def scenario() -> None:
        process = Recorder()
        grouper = Grouper(process, limit=10)
        first = await started(grouper, "gate", 0)
        rest = [await started(grouper, key, n) for key, n in [("x", 1), ("x", 2), ("y", 3), ("x", 4)]]
        process.release.set()
        await asyncio.gather(first, *rest)
        assert process.groups == [[0], [1, 3], [2], [4]]

    asyncio.run(scenario())


def test_a_request_whose_caller_gave_up_while_waiting_is_not_processed() -> None:
    async def scenario() -> None:
        process = Recorder()
        grouper = Grouper(process, limit=10)
        first = await started(grouper, "gate", 0)
        gone = await started(grouper, "gone", 1)
        kept = await started(grouper, "kept", 2)
        gone.cancel()
        process.release.set()
        assert await asyncio.gather(first, kept) == [0, 4]
        assert process.groups == [[0], [2]]

    asyncio.run(scenario())


def test_a_failed_group_is_retried_request_by_request_unless_retrying_would_only_fail_again() -> None:
    async def scenario(retry: bool) -> tuple[list[Any], list[list[Any]]]:
        process = Recorder(fail_when=lambda group: len(group) > 1 or group[0].request == 3)
        grouper = Grouper(process, limit=10, retry_alone=lambda exc: retry)
        first = await started(grouper, "gate", 0)
        rest = [await started(grouper, key, n) for key, n in [("a", 1), ("b", 3), ("c", 5)]]
        process.release.set()
        outcomes = await asyncio.gather(first, *rest, return_exceptions=True)
        return [o if isinstance(o, int) else type(o).__name__ for o in outcomes], process.groups

    outcomes, groups = asyncio.run(scenario(retry=True))
    assert outcomes == [0, 2, "ValueError", 10]  # each alone: only the one that fails alone fails
    assert groups == [[0], [1, 3, 5], [1], [3], [5]]
    outcomes, groups = asyncio.run(scenario(retry=False))
    assert outcomes == [0, "ValueError", "ValueError", "ValueError"]
    assert groups == [[0], [1, 3, 5]]


def test_a_request_left_without_an_outcome_fails_instead_of_waiting_forever() -> None:
    async def scenario() -> None:
        process = Recorder()
        process.release.set()
        grouper = Grouper(process, limit=10)
        with pytest.raises(RuntimeError, match="without an outcome"):
            await grouper.submit("k", "silent")
        assert await grouper.submit("k2", 21) == 42  # and the next one runs

    asyncio.run(scenario())


def test_a_group_whose_callers_all_gave_up_is_cancelled_and_the_next_one_runs() -> None:
    async def scenario() -> None:
        cancelled = asyncio.Event()

        async def stuck(group: list[Pending[Any]]) -> None:
            if group[0].request == "stuck":
                try:
                    await asyncio.Event().wait()  # a transaction waiting for a lock
                except asyncio.CancelledError:
                    cancelled.set()
                    raise
            for pending in group:
                pending.settle("done")

        grouper = Grouper(stuck, limit=10)
        one = await started(grouper, "a", "stuck")
        await asyncio.sleep(0)
        one.cancel()  # its deadline passed
        await asyncio.wait_for(cancelled.wait(), 5)
        assert await asyncio.wait_for(grouper.submit("b", "next"), 5) == "done"

    asyncio.run(scenario())
