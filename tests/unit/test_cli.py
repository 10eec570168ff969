"""The CLI's own behaviour that needs no server: version, effective settings and where they come from."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import timestamp_pb2

from orders.cli import printing
from orders.v1 import admin_pb2


def orders(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("ORDERS_")}
    return subprocess.run(
        [sys.executable, "-m", "orders.cli", *args],
        env={**clean, **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def setting_line(output: str, name: str) -> str:
    (line,) = [line for line in output.splitlines() if line.split()[0] == name]
    return line


def test_version() -> None:
    done = orders("--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"orders {importlib.metadata.version('orders-cqrs')}")


def test_settings_show_effective_values_their_sources_and_mask_secrets(tmp_path: Path) -> None:
    data_dir = tmp_path / ".orders-data"
    data_dir.mkdir()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "orders", "up"])
    try:
        check_settings(tmp_path, data_dir, stand_in.pid)
    finally:
        stand_in.kill()
        stand_in.wait()


def check_settings(tmp_path: Path, data_dir: Path, up_pid: int) -> None:
    """With an endpoints file whose pid runs `orders up` (a stand-in with that command line)."""
    (data_dir / "endpoints.json").write_text(
        json.dumps(
            {
                "pid": up_pid,
                "variables": {
                    "ORDERS_READ_DATABASE_URL": "postgresql://postgres@127.0.0.1:5999/orders_read",
                    "ORDERS_NATS_URL": "nats://127.0.0.1:4999",
                },
            }
        )
    )
    env = {
        "ORDERS_WRITE_DATABASE_URL": "postgresql://orders:hunter2@db.example:5432/orders_write",
        "ORDERS_NATS_PASSWORD": "hunter2",
        "ORDERS_NATS_URL": "nats://127.0.0.1:4222",  # set explicitly: wins over the endpoints file
    }
    done = orders("settings", env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "hunter2" not in done.stdout
    assert re.fullmatch(
        r"ORDERS_WRITE_DATABASE_URL +postgresql://orders:\*\*\*\*@db\.example:5432/orders_write +environment",
        setting_line(done.stdout, "ORDERS_WRITE_DATABASE_URL"),
    )
    assert re.fullmatch(r"ORDERS_NATS_PASSWORD +\*{8} +environment", setting_line(done.stdout, "ORDERS_NATS_PASSWORD"))
    assert re.fullmatch(
        r"ORDERS_NATS_URL +nats://127\.0\.0\.1:4222 +environment", setting_line(done.stdout, "ORDERS_NATS_URL")
    )
    endpoints = str((data_dir / "endpoints.json").resolve())
    assert re.fullmatch(
        rf"ORDERS_READ_DATABASE_URL +postgresql://postgres@127\.0\.0\.1:5999/orders_read"
        rf" +endpoints file {re.escape(endpoints)}",
        setting_line(done.stdout, "ORDERS_READ_DATABASE_URL"),
    )
    assert re.fullmatch(
        r"ORDERS_QUERY_ADDR +127\.0\.0\.1:50052 +default", setting_line(done.stdout, "ORDERS_QUERY_ADDR")
    )

    for stale_pid in (2**22 + 12345, os.getpid()):  # gone, or alive but not `orders up` (a reused pid)
        (data_dir / "endpoints.json").write_text(json.dumps({"pid": stale_pid, "variables": {}}))
        assert "endpoints file" not in orders("settings", cwd=tmp_path).stdout

    defaults = orders("settings", "--defaults", env=env).stdout
    assert re.search(r"ORDERS_NATS_PASSWORD +NATS password\.", defaults)


def printed(capsys: pytest.CaptureFixture[str], *messages: object) -> list[str]:
    args = argparse.Namespace(json=False)
    for message in messages:
        printing.output(args, message)
    return capsys.readouterr().out.splitlines()


def test_fields_print_in_the_order_the_proto_declares_whatever_their_values(capsys: pytest.CaptureFixture[str]) -> None:
    declared = [field.name for field in admin_pb2.GetProjectionLagResponse.DESCRIPTOR.fields]
    for lag in (
        admin_pb2.GetProjectionLagResponse(stream_last_sequence=9, ack_floor_sequence=9),
        admin_pb2.GetProjectionLagResponse(lag_events=4, lag_seconds=1.5, ack_pending=4, dead_letters=2),
    ):
        assert [line.split(":")[0] for line in printed(capsys, lag)] == declared


def test_partitions_print_as_items_or_none(capsys: pytest.CaptureFixture[str]) -> None:
    lines = printed(capsys, admin_pb2.GetProjectionLagResponse())
    assert lines[-1] == "partitions: (none)"
    partitioned = admin_pb2.GetProjectionLagResponse(
        partitions=[
            admin_pb2.PartitionLag(partition=0, consumer="orders-projector-p0", lag_events=3, lag_seconds=0.5),
            admin_pb2.PartitionLag(partition=1, consumer="orders-projector-p1"),
        ]
    )
    assert printed(capsys, partitioned)[-11:] == [
        "partitions:",
        "  - partition: 0",
        "    consumer: orders-projector-p0",
        "    lag_events: 3",
        "    lag_seconds: 0.5",
        "    ack_pending: 0",
        "  - partition: 1",
        "    consumer: orders-projector-p1",
        "    lag_events: 0",
        "    lag_seconds: 0.0",
        "    ack_pending: 0",
    ]


def test_rebuild_progress_is_one_line_per_step(capsys: pytest.CaptureFixture[str]) -> None:
    steps = [
        admin_pb2.RebuildReadModelResponse(replayed=256, target_sequence=600),
        admin_pb2.RebuildReadModelResponse(replayed=600, target_sequence=600),
        admin_pb2.RebuildReadModelResponse(replayed=612, target_sequence=600, swapped=True),
    ]
    assert printed(capsys, *steps) == [
        "replayed 256 of 600 events",
        "replayed 600 of 600 events",
        "swapped in: the read model now holds all 612 events replayed",
    ]


def test_dead_letters_list_as_a_table_and_show_with_their_payload(capsys: pytest.CaptureFixture[str]) -> None:
    created = timestamp_pb2.Timestamp(seconds=1_790_000_000)
    letters = admin_pb2.ListDeadLettersResponse(
        dead_letters=[
            admin_pb2.DeadLetter(
                id=3,
                stream_sequence=41,
                aggregate_type="product",
                aggregate_id="LAMP-1",
                status=admin_pb2.DEAD_LETTER_STATUS_DEAD,
                reason="permanent: not an EventEnvelope",
                deliveries=1,
                created_at=created,
            ),
            admin_pb2.DeadLetter(
                id=4,
                stream_sequence=42,
                aggregate_type="product",
                aggregate_id="LAMP-1",
                aggregate_version=7,
                status=admin_pb2.DEAD_LETTER_STATUS_PARKED,
                reason="parked behind a dead letter",
                deliveries=1,
                created_at=created,
            ),
        ]
    )
    header, dead, parked = printed(capsys, letters)
    assert header.split() == ["ID", "SEQUENCE", "STATUS", "AGGREGATE", "VERSION", "DELIVERIES", "CREATED", "REASON"]
    assert dead.split()[:6] == ["3", "41", "dead", "product/LAMP-1", "-", "1"]
    assert parked.split()[:5] == ["4", "42", "parked", "product/LAMP-1", "7"] and parked.endswith("dead letter")
    assert printed(capsys, admin_pb2.ListDeadLettersResponse()) == ["no dead letters"]

    shown = printed(
        capsys, admin_pb2.GetDeadLetterResponse(dead_letter=admin_pb2.DeadLetter(id=3, payload=b"\xff\x00junk"))
    )
    assert "  payload: /wBqdW5r (base64)" in shown and not [line for line in shown if "event" in line]
    listed = printed(capsys, admin_pb2.GetDeadLetterResponse(dead_letter=admin_pb2.DeadLetter(id=3)))
    assert not [line for line in listed if "payload" in line]  # an empty payload is not printed
