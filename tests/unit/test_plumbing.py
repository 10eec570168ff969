"""Tokens, change notifications, settings and events: the small formats the processes exchange."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime

import pytest

from orders import consistency, local_stack
from orders.backoff import Backoff
from orders.config import ConfigError, Settings
from orders.events import EventContext, UndecodableEvent, build_event, parse_event
from orders.v1 import events_pb2
from orders.waits import cancel_and_wait, wait_event
from projector.consumer import NOTIFY_CHUNK_BYTES, change_payloads
from projector.projections import Change, NeverApplicable, check_applicable


def test_consistency_token_round_trip() -> None:
    versions = {("order", str(uuid.uuid4())): 1, ("product", "SKU-1"): 42}
    assert consistency.decode(consistency.encode(versions)) == versions


@pytest.mark.parametrize("token", ["", "!!!", "W10", "e30", "W1sieCIsImEiLDFdXQ", "W1sibyIsImEiLDBdXQ", "a" * 20000])
def test_garbage_tokens_are_rejected(token: str) -> None:
    with pytest.raises(consistency.InvalidToken):
        consistency.decode(token)


def test_change_notifications_fit_postgres_payload_limit() -> None:
    changes = [Change("order", str(uuid.uuid4()), 3, i, f"customer-{i}") for i in range(1000)]
    payloads = change_payloads(changes)
    assert len(payloads) > 1
    assert all(len(p.encode()) <= NOTIFY_CHUNK_BYTES for p in payloads)
    decoded = [item for p in payloads for item in json.loads(p)]
    assert decoded == [[c.kind, c.key, c.version, c.stream_seq, c.customer_id] for c in changes]


def test_settings_name_the_bad_variable() -> None:
    with pytest.raises(ConfigError, match="ORDERS_COMMAND_ADDR"):
        Settings.from_env({"ORDERS_COMMAND_ADDR": "no-port"})
    with pytest.raises(ConfigError, match=r"ORDERS_PARTITION must be below ORDERS_PARTITIONS \(2\)"):
        Settings.from_env({"ORDERS_PARTITIONS": "2", "ORDERS_PARTITION": "2"})
    with pytest.raises(ConfigError, match="ORDERS_PROJECTOR_BATCH"):
        Settings.from_env({"ORDERS_PROJECTOR_BATCH": "0"})
    with pytest.raises(ConfigError, match="ORDERS_WRITE_DATABASE_URL"):
        Settings.from_env({"ORDERS_WRITE_DATABASE_URL": "mysql://x"})
    settings = Settings.from_env({"ORDERS_QUERY_ADDR": "0.0.0.0:6000"})
    assert settings.query_addr == "0.0.0.0:6000"
    assert Settings.from_env(settings.to_env()) == settings


def test_event_envelope_round_trip_and_headers() -> None:
    meta = EventContext(occurred_at=datetime.now(UTC), correlation_id="corr", causation_id="req")
    event = build_event(meta, "product", "SKU-1", 2, inventory_adjusted=events_pb2.InventoryAdjusted(delta=3, stock=7))
    assert event.subject == "orders.v1.events.product.SKU-1"
    assert event.headers["Nats-Msg-Id"] == event.event_id
    parsed = parse_event(event.payload)
    assert (parsed.event_id, parsed.aggregate_version, parsed.inventory_adjusted.stock) == (event.event_id, 2, 7)
    check_applicable(parsed)


def test_undecodable_and_contradictory_events_are_permanent_errors() -> None:
    with pytest.raises(UndecodableEvent):
        parse_event(b"\xff\xff\xff")
    with pytest.raises(UndecodableEvent):
        parse_event(
            events_pb2.EventEnvelope(aggregate_type="order", aggregate_id="x", aggregate_version=1).SerializeToString()
        )
    placed_late = events_pb2.EventEnvelope(
        aggregate_type="order", aggregate_id="x", aggregate_version=2, order_placed=events_pb2.OrderPlaced()
    )
    with pytest.raises(NeverApplicable):
        check_applicable(placed_late)
    wrong_aggregate = events_pb2.EventEnvelope(
        aggregate_type="product", aggregate_id="x", aggregate_version=2, order_cancelled=events_pb2.OrderCancelled()
    )
    with pytest.raises(NeverApplicable):
        check_applicable(wrong_aggregate)


def test_logs_are_json_lines_unless_written_to_a_terminal() -> None:
    import io
    import json
    import logging

    from orders.correlation import bound, child_traceparent
    from orders.runtime import configure_logging

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    pipe, terminal = io.StringIO(), Terminal()
    trace = child_traceparent(None)
    try:
        for stream in (pipe, terminal):
            configure_logging("INFO", "auto", stream)
            with bound("corr-1", trace):
                logging.getLogger("orders.test").info("hello %s", "world")
    finally:
        logging.getLogger().handlers.clear()
    entry = json.loads(pipe.getvalue())
    assert (entry["message"], entry["level"], entry["correlation_id"], entry["traceparent"]) == (
        "hello world",
        "INFO",
        "corr-1",
        trace,
    )
    assert "INFO orders.test [corr-1]: hello world" in terminal.getvalue()


def test_trace_context_continues_the_callers_trace_or_starts_one() -> None:
    from orders.correlation import child_traceparent, correlation_id_from

    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    child = child_traceparent(parent)
    assert child.split("-")[1] == parent.split("-")[1] and child.split("-")[2] != parent.split("-")[2]
    for broken in (None, "", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01"):
        fresh = child_traceparent(broken)
        assert len(fresh) == 55 and fresh.split("-")[1] != "0" * 32
    assert correlation_id_from("order-42") == "order-42"
    assert correlation_id_from("x" * 129) != "x" * 129
    assert correlation_id_from("has space") != "has space"


@pytest.mark.parametrize("module", ["command_service", "query_service", "projector"])
def test_a_service_with_a_bad_setting_stops_at_once_naming_the_variable(module: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "ORDERS_LOG_FORMAT": "xml"}
    result = subprocess.run([sys.executable, "-m", module], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "configuration error: ORDERS_LOG_FORMAT='xml' is invalid: expected one of auto, json, text" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_throttle_lets_one_through_per_interval_and_counts_the_rest() -> None:
    from orders.runtime import Throttle

    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.allow() == 0
    assert [throttle.allow() for _ in range(5)] == [None] * 5
    now[0] += 10.0
    assert throttle.allow() == 5
    assert throttle.allow() is None


def test_backoff_doubles_up_to_its_ceiling_and_starts_over_after_a_success() -> None:
    backoff = Backoff(0.2, 1.0)
    assert [backoff.next() for _ in range(5)] == [0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next() == 0.2


def test_wal_positions_and_when_a_standby_has_replayed_enough() -> None:
    from orders.read_changes import Announcement, format_lsn, parse_lsn, replayed_enough

    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("16/B374D848")) == "16/B374D848"
    with pytest.raises(ValueError):
        parse_lsn("B374D848")
    assert replayed_enough(1000, 1000) and not replayed_enough(999, 1000)
    # An insert position just past a page header (the last record ended at the page's start): the
    # standby's replay position stays at the page's start, which is enough.
    page = 5 * 8192
    assert replayed_enough(page, page + 24) and replayed_enough(page, page + 40)
    assert not replayed_enough(page, page + 48) and not replayed_enough(page - 8, page + 24)
    sent = Announcement(page + 100, [["order", "o", 2, 9, "c"]], resync=True)
    assert Announcement.decode(sent.encode()) == sent
    for bad in (b"{}", b"not json", b'{"lsn": "0/1", "changes": [["order"]]}'):
        with pytest.raises(ValueError):
            Announcement.decode(bad)


def test_a_replica_lagging_past_the_threshold_fails_projection_health() -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from query_service.__main__ import ProjectionProbe

    lagging = SimpleNamespace(replica_lag_seconds=7.5, replica_lag_bytes=4096)
    probe = ProjectionProbe(cast(Any, None), Settings(lag_alert_seconds=6.0), cast(Any, lagging))
    assert asyncio.run(probe()) == "the read replica lags 4096 bytes / 7.5s behind the projector"


def test_a_task_cancelled_while_its_event_is_set_stops() -> None:
    """The invariant of orders.waits: a waiter cancelled in the same turn as its event is set, or a few
    turns later while still running, raises CancelledError instead of running on (asyncio.wait_for on
    3.11 fails this). A waiter that finished before cancel() was called is not in question."""

    async def cancel_after_set(turns: int) -> str:
        event = asyncio.Event()

        async def worker() -> str:
            await wait_event(event, 30)
            await asyncio.sleep(0)
            return "ran on"

        task = asyncio.create_task(worker())
        await asyncio.sleep(0)  # the worker now waits on the event
        event.set()
        for _ in range(turns):
            await asyncio.sleep(0)
        if not task.cancel():
            return f"finished first: {await task}"
        try:
            return await task
        except asyncio.CancelledError:
            return "cancelled"

    async def scenario() -> list[str]:
        return [await cancel_after_set(turns) for turns in range(4)]

    outcomes = asyncio.run(scenario())
    assert outcomes[0] == "cancelled" and "ran on" not in outcomes, outcomes
    assert outcomes[-1] == "finished first: ran on", outcomes  # the scenario reaches the harmless case


def test_wait_event_says_whether_the_event_came_before_the_deadline() -> None:
    async def scenario() -> tuple[bool, bool]:
        event = asyncio.Event()
        timed_out = await wait_event(event, 0.01)
        asyncio.get_running_loop().call_soon(event.set)
        return timed_out, await wait_event(event, 30)

    assert asyncio.run(scenario()) == (False, True)


def test_cancel_and_wait_asks_again_until_a_worker_that_swallowed_its_cancel_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> tuple[bool, int]:
        swallowed = 0

        async def worker() -> None:
            nonlocal swallowed
            while True:
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed += 1  # what 3.11's wait_for does in a library now and then

        task = asyncio.create_task(worker(), name="swallower")
        await asyncio.sleep(0)
        async with asyncio.timeout(10):
            await cancel_and_wait(task, again_after=0.05)
        return task.cancelled(), swallowed

    assert asyncio.run(scenario()) == (True, 1)
    assert "task swallower ran on after cancel()" in caplog.text


def test_cancel_and_wait_raises_what_the_worker_raised() -> None:
    async def scenario() -> None:
        async def worker() -> None:
            try:
                await asyncio.sleep(30)
            finally:
                raise RuntimeError("failed while stopping")

        task = asyncio.create_task(worker())
        await asyncio.sleep(0)
        await cancel_and_wait(task)

    with pytest.raises(RuntimeError, match="failed while stopping"):
        asyncio.run(scenario())


def test_free_port_never_hands_out_a_port_twice() -> None:
    # Nothing binds them here, so every one still looks free: only the memory of what was given keeps
    # two servers started later from being given the same port.
    ports = [local_stack.free_port() for _ in range(1000)]
    assert len(set(ports)) == len(ports)
