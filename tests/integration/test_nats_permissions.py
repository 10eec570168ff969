"""The shipped NATS permissions (deploy/nats-auth.conf): each service can do its part and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import nats
import psycopg
import pytest
from nats.aio.msg import Msg

from command_service.outbox import WAKE_SUBJECT
from orders import jetstream, local_stack, outbox_report, read_changes
from orders.config import Settings
from orders.db import libpq_url
from orders.outbox_report import OutboxReport
from orders.read_changes import Announcement
from orders.v1 import commands_pb2_grpc
from tests.support import Infra, add_product, eventually, isolated_settings, migrate, new_sku, place, start_serving

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {
    "ORDERS_NATS_COMMAND_PASSWORD": "command-pw-4f1c",
    "ORDERS_NATS_PROJECTOR_PASSWORD": "projector-pw-9a2e",
    "ORDERS_NATS_QUERY_PASSWORD": "query-pw-77d0",
}


@pytest.fixture
def guarded_nats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[local_stack.LocalNats]:
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)  # nats-server reads them from its environment
    (tmp_path / "nats").mkdir()
    shutil.copy(ROOT / "deploy" / "nats-auth.conf", tmp_path / "nats")  # includes are relative to the config
    server = local_stack.start_nats(tmp_path / "nats", extra_config="include ./nats-auth.conf\n")
    yield server
    server.stop()


def projected(settings: Settings, order_id: str) -> bool:
    with psycopg.connect(libpq_url(settings.read_database_url)) as conn:
        return conn.execute("SELECT 1 FROM order_summaries WHERE order_id = %s", (order_id,)).fetchone() is not None


def as_user(settings: Settings, user: str, password: str) -> Settings:
    return replace(settings, nats_user=user, nats_password=password, stream="ORDERS_EVENTS")


def test_each_service_can_do_its_part_and_nothing_else(
    infra: Infra, guarded_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    base = isolated_settings(infra, nats_url=guarded_nats.url)
    asyncio.run(migrate(base))
    command = as_user(base, "orders-command", PASSWORDS["ORDERS_NATS_COMMAND_PASSWORD"])
    projector = as_user(base, "orders-projector", PASSWORDS["ORDERS_NATS_PROJECTOR_PASSWORD"])
    procs = [start_serving("command_service", command, tmp_path / "command")]
    try:
        procs.append(start_serving("projector", projector, tmp_path / "projector"))
        with grpc.insecure_channel(command.command_addr) as channel:
            stub = commands_pb2_grpc.CommandServiceStub(channel)
            sku = new_sku("N")
            add_product(stub, sku, stock=2)
            order = place(stub, "guarded", (sku, 1))
        eventually(lambda: projected(projector, order.order_id), 15, "the order projected")

        async def attempts() -> dict[str, bool]:
            outcome = {}
            nc = await jetstream.connect(projector, "intruder", retry_forever=False)
            try:
                js = nc.jetstream(timeout=2)
                try:
                    await js.publish(f"orders.v1.events.order.{order.order_id}", b"forged")
                    outcome["projector publishes an event"] = True
                except Exception:
                    outcome["projector publishes an event"] = False
                try:
                    await nc.jsm().delete_stream("ORDERS_EVENTS")
                    outcome["projector deletes the stream"] = True
                except Exception:
                    outcome["projector deletes the stream"] = False
                outcome["stream still holds 4 events"] = (
                    await nc.jsm().stream_info("ORDERS_EVENTS")
                ).state.messages == 4
                reports: asyncio.Queue[OutboxReport] = asyncio.Queue()

                async def hear(msg: Msg) -> None:
                    await reports.put(OutboxReport.decode(msg.data))

                await nc.subscribe(outbox_report.SUBJECT, cb=hear)
                forged = OutboxReport(12345, 1.0, None, time.time())
                await nc.publish(outbox_report.SUBJECT, forged.encode())
                heard = [await asyncio.wait_for(reports.get(), 10) for _ in range(2)]  # reports come every 2 s
                outcome["projector hears the relay's outbox reports"] = all(r.backlog < 100 for r in heard)
            finally:
                await jetstream.close(nc)
            nc = await jetstream.connect(command, "snoop", retry_forever=False)
            intruder = await jetstream.connect(projector, "intruder", retry_forever=False)
            try:
                wakes: asyncio.Queue[bytes] = asyncio.Queue()

                async def woken(msg: Msg) -> None:
                    await wakes.put(msg.data)

                await nc.subscribe(WAKE_SUBJECT, cb=woken)
                await nc.flush()
                await intruder.publish(WAKE_SUBJECT, b"projector")
                await intruder.flush()
                await nc.publish(WAKE_SUBJECT, b"command")
                await nc.flush()
                heard_wakes = [await asyncio.wait_for(wakes.get(), 5)]
                with contextlib.suppress(TimeoutError):
                    heard_wakes.append(await asyncio.wait_for(wakes.get(), 1))
                outcome["command processes wake each other's relay"] = b"command" in heard_wakes
                outcome["projector wakes the relay"] = b"projector" in heard_wakes
                try:
                    await nc.jetstream(timeout=2).pull_subscribe("orders.v1.events.>", durable="snoop")
                    outcome["command creates a consumer"] = True
                except Exception:
                    outcome["command creates a consumer"] = False
            finally:
                await jetstream.close(nc)
                await jetstream.close(intruder)
            query = await jetstream.connect(
                as_user(base, "orders-query", PASSWORDS["ORDERS_NATS_QUERY_PASSWORD"]), "query", retry_forever=False
            )
            try:
                announcements: asyncio.Queue[Announcement] = asyncio.Queue()

                async def announced(msg: Msg) -> None:
                    await announcements.put(Announcement.decode(msg.data))

                await query.subscribe(read_changes.subject("ORDERS_EVENTS"), cb=announced)
                await query.flush()
                fake = Announcement(1 << 62, [["order", order.order_id, 99, 99, "guarded"]])
                await query.publish(read_changes.subject("ORDERS_EVENTS"), fake.encode())
                await query.flush()
                heard_announcements = [await asyncio.wait_for(announcements.get(), 10) for _ in range(2)]  # 1 a second
                outcome["query hears the projector's announcements"] = all(
                    a.lsn < fake.lsn for a in heard_announcements
                )
                try:
                    await query.jetstream(timeout=2).pull_subscribe("orders.v1.events.>", durable="query-snoop")
                    outcome["query creates a consumer"] = True
                except Exception:
                    outcome["query creates a consumer"] = False
            finally:
                await jetstream.close(query)
            try:
                await nats.connect(
                    guarded_nats.url,
                    user="orders-projector",
                    password="wrong",
                    allow_reconnect=False,
                    connect_timeout=2,
                )
                outcome["wrong password connects"] = True
            except Exception:
                outcome["wrong password connects"] = False
            return outcome

        assert asyncio.run(attempts()) == {
            "projector publishes an event": False,
            "projector deletes the stream": False,
            "stream still holds 4 events": True,  # product upsert, stock, order, stock change
            "projector hears the relay's outbox reports": True,  # and not its own forged one
            "command processes wake each other's relay": True,
            "projector wakes the relay": False,
            "command creates a consumer": False,
            "query hears the projector's announcements": True,  # and not its own forged one
            "query creates a consumer": False,
            "wrong password connects": False,
        }
    finally:
        for proc in procs:
            proc.stop()
