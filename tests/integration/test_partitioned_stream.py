"""The stream's partitioning, as JetStream itself applies it: subjects, consumers, and the upgrade of a
consumer made before partitions existed."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from orders import jetstream, local_stack
from orders.events import subject_for
from tests.support import Infra, isolated_settings


def test_the_server_partitions_each_aggregate_into_one_partition_and_partition_consumers_see_theirs(
    infra: Infra, own_nats: local_stack.LocalNats
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)

    async def scenario() -> None:
        nc = await jetstream.connect(settings, "test", retry_forever=False)
        try:
            jsm, js = nc.jsm(), nc.jetstream(timeout=5)
            # A consumer as made before partitions existed: every subject of the stream.
            await jetstream.ensure_stream(nc, settings)
            old = replace(jetstream.consumer_config(settings), filter_subject="orders.v1.events.>")
            await jsm.add_consumer(settings.stream, old)
            await js.publish(subject_for("order", "before"), b"1")

            three = replace(settings, partitions=3)
            await jetstream.ensure_stream(nc, three)  # what a command service with ORDERS_PARTITIONS=3 does
            ids = [f"id{n}" for n in range(60)]
            for ident in ids:
                for _ in range(2):
                    await js.publish(subject_for("order", ident), b"x")

            partition_of: dict[str, set[str]] = {}
            for seq in range(2, 2 + 2 * len(ids)):
                stored = (await jsm.get_msg(settings.stream, seq)).subject or ""
                *_, ident, partition = stored.split(".")
                partition_of.setdefault(ident, set()).add(partition)
            assert all(len(found) == 1 for found in partition_of.values())  # one partition per aggregate
            sizes = [sum(found == {str(p)} for found in partition_of.values()) for p in range(3)]
            assert all(size > 0 for size in sizes) and sum(sizes) == len(ids), sizes

            # The shared consumer, set up again by the current code, keeps the unpartitioned subjects only.
            upgraded = await jetstream.ensure_consumer(nc, settings)
            assert upgraded.config.filter_subject == "orders.v1.events.*.*"
            assert upgraded.num_pending == 1  # the event from before the partitioning
            for p in range(3):
                info = await jetstream.ensure_consumer(nc, replace(three, partition=p))
                expected = (f"{settings.consumer}-p{p}", f"orders.v1.events.*.*.{p}")
                assert (info.name, info.config.filter_subject) == expected
                assert info.num_pending == 2 * sizes[p]

            # What `orders up` refuses to leave behind when the number of projectors changes:
            assert await jetstream.undrained_consumers(nc, three) == {settings.consumer: 1}
            by_partition = {f"{settings.consumer}-p{p}": 2 * sizes[p] for p in range(3)}
            assert await jetstream.undrained_consumers(nc, settings) == by_partition
            assert await jetstream.undrained_consumers(nc, replace(settings, partitions=2)) == {
                settings.consumer: 1,
                f"{settings.consumer}-p2": 2 * sizes[2],
            }

            await jetstream.ensure_stream(nc, settings)  # back to no partitions
            assert (await jsm.stream_info(settings.stream)).config.subject_transform is None
            ack = await js.publish(subject_for("order", "after"), b"2")
            assert (await jsm.get_msg(settings.stream, ack.seq)).subject == subject_for("order", "after")
        finally:
            await jetstream.close(nc)

    asyncio.run(scenario())
