"""An undecodable event, published with an order's subject and the usual headers, injected during load.

The exact expectation: the poison is dead-lettered (status dead, no version) and the order's next
event (its cancellation) is parked behind it, so the read model keeps that one order at version 1,
PLACED. Every other aggregate applies: verify differs in exactly that order's status, cancel_reason
and version, and the stream check lists the poison as undecodable and finds nothing twice. Once an
operator discards the poison and replays the parked event, verify is green.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg

from orders import jetstream, local_stack
from orders.config import Settings
from orders.db import libpq_url
from orders.events import HEADER_CORRELATION_ID, HEADER_EVENT_TYPE, HEADER_MSG_ID, ORDER, subject_for
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings

POISON = b"\x0a\xff\xff not an EventEnvelope"


def publish_poison(settings: Settings, order_id: str) -> int:
    """Publish undecodable bytes as the order's next event; return its stream sequence."""

    async def send() -> int:
        nc = await jetstream.connect(settings, "fault-test", retry_forever=False)
        try:
            headers = {
                HEADER_MSG_ID: str(uuid.uuid4()),
                HEADER_EVENT_TYPE: "order_cancelled",
                HEADER_CORRELATION_ID: "fault-test-poison",
            }
            ack = await nc.jetstream().publish(subject_for(ORDER, order_id), POISON, headers=headers)
            return int(ack.seq)
        finally:
            await jetstream.close(nc)

    return asyncio.run(send())


def projected_version(settings: Settings, order_id: str) -> int:
    with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
        row = conn.execute("SELECT version FROM order_summaries WHERE order_id = %s", (order_id,)).fetchone()
    return int(row[0]) if row else 0


def dead_letters(settings: Settings) -> list[tuple[int, str, int, str, int | None]]:
    """(id, status, stream_seq, aggregate_id, aggregate_version) of every dead letter."""
    with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
        rows = conn.execute(
            "SELECT id, status, stream_seq, aggregate_id, aggregate_version FROM dead_letters ORDER BY id"
        ).fetchall()
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def only_differences_of(order_id: str, report: dict[str, object]) -> set[str]:
    """The fields verify reports for order_id, or {'other'} when it reports anything else too (or could
    not report: a server unreachable for the moment)."""
    if "differences" not in report:
        return {"other"}
    fields = set()
    for line in report["differences"]:  # type: ignore[attr-defined]
        prefix = f"order {order_id}: "
        fields.add(line[len(prefix) :].split(" ")[0] if line.startswith(prefix) else "other")
    return fields


def cli(settings: Settings, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "orders.cli", *args],
        env={**os.environ, **settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_poison_event_is_dead_lettered_and_everything_else_applies(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url)
    with harness.loaded_system(settings, tmp_path, "x") as (system, client, load):
        with load.running():
            harness.wait_for_commands(load, 200)
            probe = client.place("poison-probe", [(system.skus[0], 1)])
            eventually(lambda: projected_version(settings, probe.order_id) == 1, 30, "the probe order projected")
            poison_seq = publish_poison(settings, probe.order_id)
            assert client.cancel(probe.order_id).ok  # its event goes to the stream after the poison
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 200)

        letters = eventually(lambda: len(found := dead_letters(settings)) == 2 and found, 30, "two dead letters")
        assert [(status, seq, aggregate, version) for _, status, seq, aggregate, version in letters] == [
            ("dead", poison_seq, probe.order_id, None),
            ("parked", letters[1][2], probe.order_id, 2),
        ]
        report = eventually(
            lambda: (
                (r := harness.verify_cli(settings)[1]) and "other" not in only_differences_of(probe.order_id, r) and r
            ),
            60,
            "verify differing only in the probe order",
        )
        assert only_differences_of(probe.order_id, report) == {"status", "cancel_reason", "version"}
        assert report["stream"]["undecodable"] == [poison_seq]  # and no event twice (no stream differences)

        cli(settings, "dead-letters", "discard", str(letters[0][0]))
        cli(settings, "dead-letters", "replay", str(letters[1][0]))
        assert projected_version(settings, probe.order_id) == 2
        harness.finish("poison event", system, client, caught_up, started)
