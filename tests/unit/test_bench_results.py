"""The benchmark reads what its client processes send while they run, so a large result cannot deadlock it."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any

import pytest

from scripts.bench_common import collect_results

BIG = 4 * 1024 * 1024  # far beyond a pipe's buffer (64 KiB on Linux)


def send_latencies(results: Any, n: int) -> None:
    results.put({"latencies": [0.001] * n})


def fail_before_sending(results: Any) -> None:
    raise SystemExit(3)


def test_results_larger_than_the_pipe_buffer_are_collected() -> None:
    ctx = mp.get_context("spawn")  # not fork: this process runs gRPC threads
    results = ctx.Queue()
    procs = [ctx.Process(target=send_latencies, args=(results, BIG // 8)) for _ in range(2)]
    for proc in procs:
        proc.start()
    outputs = collect_results(results, procs, timeout=60)
    assert [len(out["latencies"]) for out in outputs] == [BIG // 8, BIG // 8]
    assert [proc.exitcode for proc in procs] == [0, 0]


def test_a_client_that_dies_without_a_result_is_reported() -> None:
    ctx = mp.get_context("spawn")  # not fork: this process runs gRPC threads
    results = ctx.Queue()
    procs = [ctx.Process(target=fail_before_sending, args=(results,))]
    procs[0].start()
    with pytest.raises(RuntimeError, match="exited with 3"):
        collect_results(results, procs, timeout=60)
