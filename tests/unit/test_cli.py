"""The CLI's own behaviour that needs no server: version, effective settings and where they come from."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path


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
    (data_dir / "endpoints.json").write_text(
        json.dumps(
            {
                "pid": os.getpid(),  # alive: this test process stands in for a running `orders up`
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

    (data_dir / "endpoints.json").write_text(json.dumps({"pid": 2**22 + 12345, "variables": {}}))  # its up is gone
    stale = orders("settings", cwd=tmp_path)
    assert "endpoints file" not in stale.stdout

    defaults = orders("settings", "--defaults", env=env).stdout
    assert re.search(r"ORDERS_NATS_PASSWORD +NATS password\.", defaults)
