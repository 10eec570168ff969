"""The read database's own PostgreSQL stopped for 5 s under load, while the write side keeps going."""

from __future__ import annotations

import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings

OUTAGE_SECONDS = 5.0


def test_read_database_stopped_for_five_seconds(infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path) -> None:
    """Commands need only the write database: none fails. The projector's batches are nak'ed with their
    back-off (nothing is dead-lettered), projector and query service report NOT_SERVING, and once the
    server is back the same processes catch up."""
    started = time.monotonic()
    pg = local_stack.start_postgres(tmp_path / "read-db", durable=False)
    settings = isolated_settings(infra, nats_url=own_nats.url, read_database_url=pg.url("orders_read"))
    with harness.loaded_system(settings, tmp_path, "r", adopt={"read-postgres": pg.process}) as (system, client, load):
        system.start("query", "query_service")
        before = dict(system.processes)
        with load.running():
            harness.wait_for_commands(load, 200)
            pg.stop()
            down_at = time.monotonic()
            for address in (settings.admin_addr, settings.query_addr):
                eventually(lambda: harness.health(address) == "NOT_SERVING", OUTAGE_SECONDS, address)  # noqa: B023
            during = load.count()
            time.sleep(max(0.0, down_at + OUTAGE_SECONDS - time.monotonic()))  # the rest of the outage
            during = load.count() - during
            pg = local_stack.start_postgres(tmp_path / "read-db", port=pg.port, durable=False)
            system.adopt("read-postgres", pg.process)
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
            for address in (settings.admin_addr, settings.query_addr):
                eventually(lambda: harness.health(address) == "SERVING", 30, f"{address} SERVING again")  # noqa: B023
            harness.wait_for_commands(load, 100)
        harness.finish("read PostgreSQL down 5 s", system, client, caught_up, started)

        assert client.failed_attempts() == [] and during > 50  # the write side never noticed
        assert all(
            system.processes[name] is proc and proc.alive() for name, proc in before.items() if name != "read-postgres"
        )
