"""The command service SIGKILLed mid-load: clients retry with the same request_id, and each logical
command takes effect exactly once."""

from __future__ import annotations

import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, isolated_settings

KILLS = 2


def test_command_service_sigkilled_mid_load(infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path) -> None:
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url)
    with harness.loaded_system(settings, tmp_path, "c", workers=6) as (system, client, load):
        with load.running():
            for _ in range(KILLS):
                harness.wait_for_commands(load, 300)
                system.restart_killed("command")  # SIGKILL, then start on the same port
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
            harness.wait_for_commands(load, 100)
        harness.finish("command service SIGKILL x2", system, client, caught_up, started)

        retried = [c for c in client.ledger if c.retried]
        assert retried, "no call failed: the kills never hit a command"
        assert {a.code for a in client.failed_attempts()} <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
        assert all(c.ok for c in retried)
