"""The endpoints file of a running `orders up`: where its databases, NATS and services listen.

`orders up` starts PostgreSQL and NATS on free ports, so other terminals cannot guess them. Once its
services serve, it writes `<data dir>/endpoints.json` (its own pid and the ORDERS_* values of every
address), and removes the file when it stops. CLI commands run in the same directory read it, under
whatever ORDERS_* variables say explicitly. A file left behind by an `orders up` that was killed names
a dead pid and is ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from orders.config import PREFIX, Settings
from orders.local_stack import pid_alive

FILE_NAME = "endpoints.json"
FIELDS = (
    "write_database_url",
    "read_database_url",
    "nats_url",
    "command_addr",
    "query_addr",
    "admin_addr",
    "gateway_addr",
    "command_metrics_addr",
    "query_metrics_addr",
    "projector_metrics_addr",
    "stream",
    "consumer",
)


@dataclass(frozen=True)
class Endpoints:
    path: Path
    pid: int
    variables: dict[str, str]  # ORDERS_* name → value

    def describe(self) -> str:
        """One line for people: the pid and the service addresses."""
        v = self.variables
        return (
            f"pid {self.pid}; CommandService {v.get(PREFIX + 'COMMAND_ADDR')}, QueryService "
            f"{v.get(PREFIX + 'QUERY_ADDR')}, AdminService {v.get(PREFIX + 'ADMIN_ADDR')}, "
            f"NATS {v.get(PREFIX + 'NATS_URL')}"
        )


def write(data_dir: Path, settings: Settings) -> Path:
    """Record settings' endpoints for this process (atomically: readers never see half a file)."""
    env = settings.to_env()
    variables = {PREFIX + name.upper(): env[PREFIX + name.upper()] for name in FIELDS}
    path = data_dir / FILE_NAME
    scratch = path.with_suffix(".tmp")
    scratch.write_text(json.dumps({"pid": os.getpid(), "variables": variables}, indent=2) + "\n")
    scratch.replace(path)
    return path


def remove(data_dir: Path) -> None:
    """Remove the endpoints file if it is this process's own."""
    found = read(data_dir)
    if found is not None and found.pid == os.getpid():
        found.path.unlink(missing_ok=True)


def read(data_dir: Path) -> Endpoints | None:
    """The endpoints file in data_dir, whoever wrote it and whether or not it still runs; None when absent."""
    path = data_dir / FILE_NAME
    try:
        data = json.loads(path.read_text())
        return Endpoints(path.resolve(), int(data["pid"]), {str(k): str(v) for k, v in data["variables"].items()})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def running(data_dir: Path) -> Endpoints | None:
    """The endpoints of the `orders up` that runs in data_dir now; None when none does."""
    found = read(data_dir)
    return found if found is not None and _is_orders_up(found.pid) else None


def _is_orders_up(pid: int) -> bool:
    """Whether pid is alive and, where /proc tells (Linux), an `orders … up` process: after a crash and a
    reboot, the pid of a file left behind may belong to something else."""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return True  # no /proc here: the pid alone must do
    return b"up" in argv and any(b"orders" in arg for arg in argv)
