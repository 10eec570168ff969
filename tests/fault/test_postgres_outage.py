"""The write database's PostgreSQL stopped for 5 s during load: commands fail fast with UNAVAILABLE,
health turns NOT_SERVING, and everything recovers without restarting a service."""

from __future__ import annotations

import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings

OUTAGE_SECONDS = 5.0


def test_write_database_stopped_for_five_seconds(infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path) -> None:
    started = time.monotonic()
    pg = local_stack.start_postgres(tmp_path / "write-db", durable=False)
    settings = isolated_settings(infra, nats_url=own_nats.url, write_database_url=pg.url("orders_write"))
    with harness.loaded_system(settings, tmp_path, "p", adopt={"postgres": pg.process}) as (system, client, load):
        command, projector = system.processes["command"], system.processes["projector"]
        with load.running():
            harness.wait_for_commands(load, 200)
            pg.stop()
            down_at = time.monotonic()
            eventually(lambda: harness.health(settings.command_addr) == "NOT_SERVING", OUTAGE_SECONDS, "NOT_SERVING")
            time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))  # the rest of the outage
            failed_during_outage = len(client.failed_attempts())
            pg = local_stack.start_postgres(tmp_path / "write-db", port=pg.port, durable=False)
            system.adopt("postgres", pg.process)
            fault_end = time.monotonic()
            eventually(lambda: harness.health(settings.command_addr) == "SERVING", 30, "SERVING again")
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 100)
        harness.finish("write PostgreSQL down 5 s", system, client, caught_up, started)

        failed = client.failed_attempts()
        assert failed_during_outage > 0 and {a.code for a in failed} == {"UNAVAILABLE"}
        slowest = max(a.seconds for a in failed)
        assert slowest < harness.CALL_DEADLINE / 2, f"a failed call took {slowest:.1f}s"
        assert command.alive() and projector.alive()  # recovered without a restart
        assert system.processes["command"] is command and system.processes["projector"] is projector
