"""Partitioned projection under faults: a partition's projector SIGKILLed, and the partition count
changed (none → 2 → 3) while commands keep coming. Nothing lost, nothing applied twice, read = write."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import grpc

from orders import jetstream, local_stack, security
from orders.config import Settings
from orders.v1 import admin_pb2, admin_pb2_grpc
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings, stream_events


def partitioned(settings: Settings, partitions: int, partition: int = 0) -> Settings:
    """settings for a projector of one partition (its own listen addresses), or for the command service."""
    return replace(harness.with_addresses(settings), partitions=partitions, partition=partition)


def partitions_of_aggregates(settings: Settings, first_seq: int = 0) -> dict[tuple[str, str], set[str]]:
    """For each aggregate, the partitions its events from first_seq on are stored under ('' for none)."""
    found: dict[tuple[str, str], set[str]] = defaultdict(set)
    for event in stream_events(settings):
        if event.seq >= first_seq:
            tokens = event.subject.split(".")
            found[event.aggregate].add(tokens[5] if len(tokens) == 6 else "")
    return found


def consumer(settings: Settings, name: str) -> tuple[int, int]:
    """(events not yet delivered, delivered and not yet acknowledged) of a durable consumer."""

    async def ask() -> tuple[int, int]:
        nc = await jetstream.connect(settings, "fault-test", retry_forever=False)
        try:
            info = await nc.jsm().consumer_info(settings.stream, name)
            return info.num_pending or 0, info.num_ack_pending or 0
        finally:
            await jetstream.close(nc)

    return asyncio.run(ask())


def last_seq(settings: Settings) -> int:
    return int(harness.stream_info(settings).state.last_seq or 0)


def projection_lag(settings: Settings) -> admin_pb2.GetProjectionLagResponse:
    with grpc.insecure_channel(settings.admin_addr) as channel:
        reply: admin_pb2.GetProjectionLagResponse = admin_pb2_grpc.AdminServiceStub(channel).GetProjectionLag(
            admin_pb2.GetProjectionLagRequest(), timeout=10
        )
        return reply


def test_a_partitions_projector_sigkilled_under_load(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    base = isolated_settings(infra, nats_url=own_nats.url, projector_batch=16, ack_wait=2.0)
    settings = replace(base, partitions=2)
    client = harness.Client([settings.command_addr], security.call_metadata(settings))
    with harness.system(settings, tmp_path) as system:
        system.start("command", "command_service")
        projectors = {p: partitioned(settings, 2, p) for p in (0, 1)}
        for p, own in projectors.items():
            system.start(f"projector-p{p}", "projector", own)
        skus = system.seed_catalog(client)
        load = harness.Load(client, skus, [f"pk{i}" for i in range(50)], total=1500)
        with load.running():
            for kill in range(2):
                harness.wait_for_count(load, 400 * (kill + 1))
                system.restart_killed("projector-p1")
            caught_up = harness.caught_up_after(settings, time.monotonic())
        harness.finish("partition projector SIGKILL x2", system, client, caught_up, started)

        stored = partitions_of_aggregates(settings)
        assert stored and all(len(found) == 1 and found <= {"0", "1"} for found in stored.values()), stored
        assert {next(iter(found)) for found in stored.values()} == {"0", "1"}  # both partitions used
        lag: admin_pb2.GetProjectionLagResponse = eventually(
            lambda: (r := projection_lag(projectors[0])).lag_events == 0 and r, 60, "lag 0"
        )
        assert [(p.partition, p.consumer, p.lag_events) for p in lag.partitions] == [
            (0, f"{settings.consumer}-p0", 0),
            (1, f"{settings.consumer}-p1", 0),
        ]


def test_the_partition_count_changed_under_load(infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path) -> None:
    """The documented procedure, twice: from one shared consumer to 2 partitions, then to 3.

    1. Restart the command services with the new ORDERS_PARTITIONS: new events go to the new partitions.
    2. Start a projector for each new partition; restart the others with the new settings.
    3. Stop the projectors whose consumer no longer receives events once it has nothing pending.
    """
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url, projector_batch=16)
    # A gRPC server that stops gracefully answers the calls that reach it in that instant with CANCELLED
    # (grpc.aio: about 3% of the calls of the stop's half second in a test of its own); commands are
    # idempotent by request_id, so the client retries those too.
    retryable = (*harness.RETRYABLE, grpc.StatusCode.CANCELLED)
    client = harness.Client([settings.command_addr], security.call_metadata(settings), retryable)
    with harness.system(settings, tmp_path) as system:
        system.start("command", "command_service")
        system.start("projector", "projector")
        skus = system.seed_catalog(client)
        load = harness.Load(client, skus, [f"pc{i}" for i in range(50)], total=2400)
        with load.running():
            harness.wait_for_count(load, 400)
            system.processes["command"].stop()
            system.start("command", "command_service", replace(settings, partitions=2))
            switched_to_two = last_seq(settings) + 1
            for p in (0, 1):
                system.start(f"projector-p{p}", "projector", partitioned(settings, 2, p))
            eventually(lambda: consumer(settings, settings.consumer) == (0, 0), 60, "the shared consumer drained")
            system.processes.pop("projector").stop()

            harness.wait_for_count(load, 1200)
            system.processes["command"].stop()
            system.start("command", "command_service", replace(settings, partitions=3))
            switched_to_three = last_seq(settings) + 1
            system.start("projector-p2", "projector", partitioned(settings, 3, 2))
            for p in (0, 1):  # one after the other: the partition keeps a projector throughout
                system.processes[f"projector-p{p}"].stop()
                system.start(f"projector-p{p}", "projector", partitioned(settings, 3, p))
            caught_up = harness.caught_up_after(settings, time.monotonic())
        harness.finish("partitions 0 -> 2 -> 3 under load", system, client, caught_up, started)

        by_era = partitions_of_aggregates(settings)
        assert {p for found in by_era.values() for p in found} == {"", "0", "1", "2"}
        after_three = partitions_of_aggregates(settings, first_seq=switched_to_three)
        assert after_three and all(len(found) == 1 for found in after_three.values())
        assert switched_to_two < switched_to_three
