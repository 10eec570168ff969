"""The outbox relay against real PostgreSQL and a NATS server these tests stop and start themselves."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import psycopg

from command_service.outbox import RELAY_LOCK_KEY, backlog_of
from orders import jetstream, local_stack
from orders.config import Settings
from orders.db import libpq_url
from tests.support import (
    CommandProcess,
    Infra,
    assert_stream_matches_write_database,
    eventually,
    isolated_settings,
    migrate,
    publish_events,
    scrape_metrics,
    stays,
    stream_events,
    unpublished,
)


async def delete_stream(settings: Settings) -> None:
    nc = await jetstream.connect(settings.nats_url, "test-cleaner", retry_forever=False)
    try:
        await nc.jsm().delete_stream(settings.stream)
    finally:
        await jetstream.close(nc)


def restart(nats: local_stack.LocalNats) -> local_stack.LocalNats:
    """Start nats-server again on the same port with the same store (after nats.stop())."""
    return local_stack.start_nats(nats.config_path.parent, port=nats.port)


def test_relay_wakes_on_commit_survives_a_nats_outage_and_keeps_order(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    # A 60 s poll: anything published sooner was woken by the commit itself.
    settings = isolated_settings(infra, nats_url=own_nats.url, relay_poll_interval=60.0, relay_batch=50)
    asyncio.run(migrate(settings))
    service = CommandProcess(settings, tmp_path)
    nats = own_nats
    try:
        service.product("WAKE-1", 1000)
        eventually(lambda: unpublished(settings) == 0 and len(stream_events(settings)) == 2, 10, "commit woke relay")

        nats.stop()
        skus = [f"OUT-{i}" for i in range(6)]
        for sku in skus:
            service.product(sku, 1000)
        for i in range(40):  # commands keep succeeding while NATS is down
            service.order(skus[i % 6], skus[(i + 1) % 6], skus[(i + 3) % 6])
        waiting = asyncio.run(backlog_of(settings))
        assert waiting == unpublished(settings) and waiting > 150

        nats = restart(nats)
        eventually(lambda: unpublished(settings) == 0, 60, "backlog drained after NATS came back")
        events = assert_stream_matches_write_database(settings)
        assert len(events) == 2 + 6 * 2 + 40 * 4
        relayed = scrape_metrics(settings.command_metrics_addr)
        assert relayed["orders_outbox_round_events_sum"] == len(events)
        assert relayed["orders_outbox_round_events_count"] < len(events) / 10  # the backlog went out in batches
    finally:
        service.stop()
        nats.stop()


def test_events_published_before_a_crash_are_not_duplicated(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """The state a relay leaves when it dies after PubAck but before deleting: published, still in the outbox."""
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    service = CommandProcess(settings, tmp_path)
    service.product("CRASH-1", 100)
    eventually(lambda: unpublished(settings) == 0, 10, "first events published")
    own_nats.stop()
    for _ in range(10):
        service.order("CRASH-1")
    service.proc.kill()  # SIGKILL, with 10 orders' events unpublished
    service.channel.close()
    nats = restart(own_nats)
    try:
        with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
            pending = conn.execute("SELECT subject, headers, payload FROM outbox ORDER BY id").fetchall()
        assert len(pending) == 20

        async def publish_first_half() -> None:  # what the dead relay had got acknowledged
            nc = await jetstream.connect(settings.nats_url, "test-publisher", retry_forever=False)
            try:
                js = nc.jetstream()
                for subject, headers, payload in pending[:10]:
                    await js.publish(subject, bytes(payload), headers=dict(headers))
            finally:
                await jetstream.close(nc)

        asyncio.run(publish_first_half())
        service = CommandProcess(settings, tmp_path)
        eventually(lambda: unpublished(settings) == 0, 30, "restarted relay drained the outbox")
        events = assert_stream_matches_write_database(settings)
        assert len(events) == 2 + 20
        assert "10 events were already in the stream" in service.proc.log_path.read_text()
    finally:
        service.stop()
        nats.stop()


def relay_holder(settings: Settings) -> str | None:
    """application_name of the session holding the relay's advisory lock in this database."""
    with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
        rows = conn.execute(
            "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database()) "
            "AND ((l.classid::bigint << 32) | l.objid::bigint) = %s",
            (RELAY_LOCK_KEY,),
        ).fetchall()
    assert len(rows) <= 1
    return rows[0][0] if rows else None


def test_only_one_relay_publishes_and_another_takes_over(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    first = CommandProcess(settings, tmp_path / "a")
    second_settings = Settings(**{**settings.__dict__, **local_stack.free_addresses()})
    second = CommandProcess(second_settings, tmp_path / "b")
    try:
        eventually(lambda: relay_holder(settings) == f"orders-relay-{first.proc.pid}", 10, "first relay leads")
        second.product("HA-1", 100)
        for _ in range(5):
            second.order("HA-1")  # committed by the follower, published by the leader
        eventually(lambda: unpublished(settings) == 0, 10, "leader published the follower's events")
        assert relay_holder(settings) == f"orders-relay-{first.proc.pid}"

        first.proc.kill()
        eventually(lambda: relay_holder(settings) == f"orders-relay-{second.proc.pid}", 10, "second took over")
        for _ in range(5):
            second.order("HA-1")
        eventually(lambda: unpublished(settings) == 0, 10, "new leader published")
        assert len(assert_stream_matches_write_database(settings)) == 2 + 10 * 2
    finally:
        first.stop()
        second.stop()


def test_rounds_go_out_as_atomic_batches_and_event_by_event_where_the_stream_refuses_them(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """Each relay round (of at least relay_atomic_min rows, 1 here) is one atomic batch: its events carry
    one Nats-Batch-Id and lie next to each other in the stream. On a stream that refuses atomic
    publishes (an operator turned them off), the relay publishes event by event instead and nothing is
    lost, doubled or reordered."""
    settings = isolated_settings(infra, nats_url=own_nats.url, relay_atomic_min=1)
    asyncio.run(migrate(settings))
    service = CommandProcess(settings, tmp_path)
    try:
        service.product("ATOM-1", 1000)
        service.product("ATOM-2", 1000)
        for _ in range(20):
            service.order("ATOM-1", "ATOM-2")
        eventually(lambda: unpublished(settings) == 0, 15, "events published")
        events = assert_stream_matches_write_database(settings)
        assert all(event.batch for event in events)
        positions: dict[str | None, list[int]] = defaultdict(list)
        for event in events:
            positions[event.batch].append(event.seq)
        for seqs in positions.values():
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # each batch stored in one piece

        async def refuse_atomic_publishes() -> None:
            nc = await jetstream.connect(settings.nats_url, "test-operator", retry_forever=False)
            try:
                config = jetstream.stream_config(settings)
                config.allow_atomic = False
                await nc.jsm().update_stream(config)
            finally:
                await jetstream.close(nc)

        asyncio.run(refuse_atomic_publishes())
        for _ in range(10):
            service.order("ATOM-2", "ATOM-1")
        eventually(lambda: unpublished(settings) == 0, 15, "events published one by one")
        later = assert_stream_matches_write_database(settings)[len(events) :]
        assert len(later) == 10 * 3 and not any(event.batch for event in later)
        assert "JetStream takes no atomic batches here" in service.proc.log_path.read_text()
    finally:
        service.stop()


def test_the_relay_health_is_not_serving_while_it_cannot_relay(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """Connected to NATS but unable to create its stream (another stream holds the subjects), or to read
    the outbox (the table renamed away), the relay reports NOT_SERVING, while commands' own health stays
    SERVING; it recovers without a restart."""
    blocking = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(publish_events(blocking, []))  # a stream of another system on the same subjects
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    service = CommandProcess(settings, tmp_path)

    def relay() -> str | None:
        return local_stack.grpc_health(settings.command_addr, "relay")

    try:
        stays(lambda: relay() == "NOT_SERVING", 3.0, "the relay NOT_SERVING while its stream cannot be created")
        asyncio.run(delete_stream(blocking))
        eventually(lambda: relay() == "SERVING", 15, "the relay SERVING")
        with psycopg.connect(libpq_url(settings.write_database_url), autocommit=True) as conn:
            conn.execute("ALTER TABLE outbox RENAME TO outbox_away")
            eventually(lambda: relay() == "NOT_SERVING", 15, "the relay NOT_SERVING while its rounds fail")
            assert local_stack.grpc_health(settings.command_addr, "orders.v1.CommandService") == "SERVING"
            conn.execute("ALTER TABLE outbox_away RENAME TO outbox")
        eventually(lambda: relay() == "SERVING", 15, "the relay SERVING again")
        service.product("RELAY-HEALTH-1", 1)
        eventually(lambda: unpublished(settings) == 0, 10, "the outbox drained")
    finally:
        service.stop()
