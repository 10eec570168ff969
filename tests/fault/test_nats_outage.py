"""nats-server stopped for 5 s during load and started again on the same store."""

from __future__ import annotations

import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings

OUTAGE_SECONDS = 5.0


def test_commands_succeed_while_nats_is_down_and_the_backlog_drains(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url)
    with harness.loaded_system(settings, tmp_path, "n") as (system, client, load):
        with load.running():
            harness.wait_for_commands(load, 200)
            own_nats.stop()
            down_from = load.count()
            time.sleep(OUTAGE_SECONDS)  # the outage: load keeps running
            relay_health = harness.health(settings.command_addr, "relay")
            backlog = harness.outbox_backlog(settings)
            system.adopt("nats", own_nats.restart().process)
            during_outage = load.count() - down_from
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 100)
        harness.finish("nats-server down 5 s", system, client, caught_up, started)

        assert client.failed_attempts() == []  # every command answered OK, also during the outage
        assert during_outage > 50 and backlog > 50, (during_outage, backlog)
        assert relay_health == "NOT_SERVING"
        eventually(lambda: harness.outbox_backlog(settings) == 0, 30, "outbox backlog drained")
