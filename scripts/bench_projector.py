"""Projector throughput: drain a backlog of synthetic events with several batch sizes.

Usage: .venv/bin/python -m scripts.bench_projector [--events 100000] [--batches 1,64,256] [--runs 1]

Starts its own PostgreSQL and NATS (embedded wheels, durable settings as `orders up` uses), publishes a
consistent synthetic history once, then for each batch size runs a projector process on a fresh read
database and a fresh durable consumer, and times it from SERVING until the consumer's lag is zero.
Prints a Markdown table and a JSON line with the machine's description.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from orders import jetstream, local_stack
from orders.config import Settings
from projector import lag
from scripts.bench_common import exit_on_sigterm
from tests.support import migrate, publish_events, synthetic_history


async def lag_events(settings: Settings) -> int:
    nc = await jetstream.connect(settings.nats_url, "bench", retry_forever=False)
    try:
        return (await lag.measure(nc, settings)).events
    finally:
        await jetstream.close(nc)


def drain(base: Settings, batch: int, run: int, work: Path) -> float:
    settings = Settings(
        **{
            **base.__dict__,
            "read_database_url": base.read_database_url.rsplit("/", 1)[0] + f"/bench_read_{batch}_{run}",
            "consumer": f"bench_{batch}_{run}",
            "projector_batch": batch,
            **local_stack.free_addresses(),
            "log_level": "WARNING",
            "auth": "off",  # the projector serves only its AdminService and health here, on loopback
        }
    )
    asyncio.run(migrate(settings))
    proc = local_stack.start_service("projector", settings.to_env(), work / f"logs-{batch}-{run}")
    try:
        try:
            local_stack.wait_until(lambda: local_stack.grpc_serving(settings.admin_addr), 60, "projector SERVING")
        except TimeoutError:
            raise SystemExit(f"the projector did not start serving; its log ends:\n{proc.log_tail()}") from None
        started = time.monotonic()
        local_stack.wait_until(lambda: asyncio.run(lag_events(settings)) == 0, 3600, "backlog drained", interval=0.5)
        return time.monotonic() - started
    finally:
        proc.stop()


def main() -> None:
    exit_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--batches", default="1,64,256")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-projector-") as tmp:
        work = Path(tmp)
        pg = local_stack.start_postgres(work / "postgres")
        nats = local_stack.start_nats(work / "nats")
        try:
            base = Settings(
                write_database_url=pg.url("bench_write"),
                read_database_url=pg.url("bench_read"),
                nats_url=nats.url,
                stream="BENCH_EVENTS",
            )
            history = synthetic_history(args.events, args.events // 10, 200, seed=1, prefix="B")
            started = time.monotonic()
            asyncio.run(publish_events(base, history.events))
            publish_rate = len(history.events) / (time.monotonic() - started)
            results = {}
            for batch in batches:
                seconds = [drain(base, batch, run, work) for run in range(args.runs)]
                results[batch] = len(history.events) / statistics.median(seconds)
                print(
                    f"batch {batch}: {results[batch]:,.0f} events/s (runs: {[round(s, 1) for s in seconds]} s)",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            nats.stop()
            pg.stop()
    machine = {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    print(f"\nProjector draining a backlog of {args.events:,} events ({machine['cores']} cores):\n")
    print("| batch size | events/s |\n|---|---|")
    for batch, rate in results.items():
        print(f"| {batch} | {rate:,.0f} |")
    print(f"\n(publishing the backlog with 256 acks in flight: {publish_rate:,.0f} events/s)")
    print(
        json.dumps(
            {"events": args.events, "events_per_second": results, "publish_rate": publish_rate, "machine": machine}
        )
    )


if __name__ == "__main__":
    main()
