"""The projector SIGKILLed five times during 2,000 PlaceOrder/CancelOrder calls, restarted each time."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, eventually, isolated_settings

KILLS = 5


def applied_versions(system: harness.System) -> int:
    """Sum of the versions in the read model's product rows: grows with every applied product event."""
    return sum(harness._versions(system.settings.read_database_url, "SELECT sku, version FROM product_views").values())


def test_projector_sigkilled_five_times_during_load(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    started = time.monotonic()
    # Small batches and a short ack_wait: kills land between fetch and ack, and redeliveries come soon.
    settings = isolated_settings(infra, nats_url=own_nats.url, projector_batch=16, ack_wait=2.0)
    with harness.loaded_system(settings, tmp_path, "k", total=2000) as (system, client, load):
        exit_codes = []
        with load.running():
            for kill in range(KILLS):  # at commands 200, 400, ... 1,000 of 2,000, however slow the machine
                harness.wait_for_count(load, 200 * (kill + 1))
                before = applied_versions(system)
                eventually(lambda: applied_versions(system) > before, 30, "the projector applying events")  # noqa: B023
                victim = system.processes["projector"]
                system.restart_killed("projector")
                exit_codes.append(victim.proc.returncode)
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end)
        harness.finish("projector SIGKILL x5", system, client, caught_up, started)

        assert exit_codes == [-signal.SIGKILL] * KILLS
        delivered = harness.consumer_info(settings).delivered
        # Each delivery, redeliveries included, takes a consumer sequence: more of them than stream
        # messages means events delivered to a killed projector were delivered again.
        assert delivered.consumer_seq > delivered.stream_seq, delivered
