"""The write database's PostgreSQL postmaster SIGKILLed under load and started again on its data directory."""

from __future__ import annotations

import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings


def test_write_database_postmaster_sigkilled_and_restarted(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """A crash, not a shutdown: PostgreSQL recovers from its WAL on the next start (fsync and synchronous
    commit on, as in production: an acknowledged command must survive the crash). Calls fail with
    UNAVAILABLE meanwhile and are retried with their request_id; the services recover without a restart."""
    started = time.monotonic()
    pg = local_stack.start_postgres(tmp_path / "write-db", durable=True)
    settings = isolated_settings(infra, nats_url=own_nats.url, write_database_url=pg.url("orders_write"))
    with harness.loaded_system(settings, tmp_path, "c", adopt={"postgres": pg.process}) as (system, client, load):
        command, projector = system.processes["command"], system.processes["projector"]
        with load.running():
            harness.wait_for_commands(load, 200)
            pg.process.kill()  # SIGKILL of the postmaster; its backends notice and exit
            killed_at = time.monotonic()
            pg = local_stack.start_postgres(tmp_path / "write-db", port=pg.port, durable=True)
            system.adopt("postgres", pg.process)
            restarted_in = time.monotonic() - killed_at
            fault_end = time.monotonic()
            eventually(lambda: harness.health(settings.command_addr) == "SERVING", 30, "SERVING again")
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 100)
        harness.finish("write PostgreSQL SIGKILL", system, client, caught_up, started)

        assert {a.code for a in client.failed_attempts()} <= {"UNAVAILABLE"}
        assert command.alive() and projector.alive() and system.processes["command"] is command
        assert "database system was interrupted" in pg.process.log_tail(200) or "redo" in pg.process.log_tail(200)
        print(f"PostgreSQL restarted and recovered in {restarted_in:.1f} s")
