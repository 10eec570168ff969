"""100,000 calls without a token to made-up method names, while authenticated load goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, isolated_settings

FLOOD = 100_000
WARM_UP = 2_000  # flood calls before the baseline is taken: one-time allocations of the refusal path
IN_FLIGHT = 64
TOKEN = "loadgen-" + "t" * 32


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


FLOODER = """
import asyncio, json, sys, uuid
import grpc

PER_CHANNEL = 2000  # grpc's client keeps state per method name a channel has called: a fresh channel
                    # now and then keeps the flooder's own cost per call flat (the server's is measured)

async def main(address, calls, in_flight):
    codes = {}
    remaining = iter(range(calls))

    async def worker(channel, share):
        for _ in range(share):
            if next(remaining, None) is None:
                return
            call = channel.unary_unary(f"/orders.v1.CommandService/{uuid.uuid4()}")
            try:
                await call(b"", timeout=10)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            codes[code] = codes.get(code, 0) + 1

    for _ in range(0, calls, PER_CHANNEL):
        async with grpc.aio.insecure_channel(address) as channel:
            await asyncio.gather(*(worker(channel, PER_CHANNEL // in_flight + 1) for _ in range(in_flight)))
    print(json.dumps(codes))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""


def flood(address: str, calls: int) -> dict[str, int]:
    """calls unauthenticated calls to random method names of the CommandService, from a process of their
    own (the test process is busy with the load's threads); the status codes counted."""
    done = subprocess.run(
        [sys.executable, "-c", FLOODER, address, str(calls), str(IN_FLIGHT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


@pytest.mark.timeout(900)  # 100,000 calls take about 1.5 minutes here, more on a slower or busier machine
def test_a_flood_of_unauthenticated_calls_costs_only_a_bounded_amount(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = isolated_settings(
        infra,
        nats_url=own_nats.url,
        auth="on",
        auth_tokens=f"loadgen orders:write,inventory:write,orders:read,admin {TOKEN}",
        client_token=TOKEN,
    )
    # A steady but light authenticated load (20 commands/s): the flood, not the load, is under test.
    with harness.loaded_system(settings, tmp_path, "u", workers=1, rate=20) as (system, client, load):
        service = system.processes["command"]
        metrics_url = f"http://{settings.command_metrics_addr}/metrics"
        log = service.log_path
        with load.running():
            harness.wait_for_commands(load, 100)
            assert flood(settings.command_addr, WARM_UP) == {"UNAUTHENTICATED": WARM_UP}
            before = (rss_kib(service.pid), len(harness.fetch(metrics_url)), log.stat().st_size)
            flood_started = time.monotonic()
            codes = flood(settings.command_addr, FLOOD)
            flood_seconds = time.monotonic() - flood_started
            after = (rss_kib(service.pid), len(harness.fetch(metrics_url)), log.stat().st_size)
            refused = harness.metric(
                metrics_url, 'orders_rpc_requests_total{code="UNAUTHENTICATED",method="unknown",service="unknown"}'
            )
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 100)
        harness.finish("100,000 unauthenticated calls", system, client, caught_up, started)

    assert codes == {"UNAUTHENTICATED": FLOOD}
    grown_kib, metrics_grown = after[0] - before[0], after[1] - before[1]
    with open(log, "rb") as text:
        text.seek(before[2])
        refusal_lines = sum(1 for line in text if b"refused /orders.v1.CommandService/" in line)
    print(
        f"flood: {FLOOD / flood_seconds:.0f} calls/s; RSS +{grown_kib} KiB, /metrics +{metrics_grown} B, "
        f"{refusal_lines} refusal log lines"
    )
    assert grown_kib < 16 * 1024, f"the command service grew by {grown_kib} KiB"
    assert metrics_grown < 1024, f"/metrics grew by {metrics_grown} bytes"
    assert refusal_lines <= flood_seconds / 10 + 1  # one line per 10 s at most, naming how many it stands for
    assert refused == WARM_UP + FLOOD  # each one counted, under one label set
