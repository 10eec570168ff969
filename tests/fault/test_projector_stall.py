"""The projector frozen (SIGSTOP) for 20 s under load, then resumed: it catches up at once."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from orders import local_stack
from tests.fault import harness
from tests.support import Infra, isolated_settings

STALL_SECONDS = 20.0


def test_a_projector_frozen_for_20_s_catches_up_without_waiting_for_ack_wait(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path
) -> None:
    """What the projector was sent before and during the freeze is applied as soon as it runs again:
    nothing waits for ORDERS_ACK_WAIT (30 s here, longer than the whole catch-up may take), and no
    event is delivered twice."""
    started = time.monotonic()
    settings = isolated_settings(infra, nats_url=own_nats.url, ack_wait=30.0)
    with harness.loaded_system(settings, tmp_path, "s", workers=1) as (system, client, load):
        projector = system.processes["projector"]
        with load.running():
            harness.wait_for_commands(load, 200)
            projector.proc.send_signal(signal.SIGSTOP)
            try:
                harness.wait_for_commands(load, 1, timeout=30)
                frozen_until = time.monotonic() + STALL_SECONDS
                while time.monotonic() < frozen_until:  # the stall: load goes on, events pile up
                    harness.wait_for_commands(load, 1, timeout=30)
            finally:
                projector.proc.send_signal(signal.SIGCONT)
            fault_end = time.monotonic()
            caught_up = harness.caught_up_after(settings, fault_end, timeout=60)
            harness.wait_for_commands(load, 100)
        harness.finish("projector SIGSTOP 20 s", system, client, caught_up, started)

        assert caught_up < 10.0, f"caught up {caught_up:.1f} s after SIGCONT (ack_wait is 30 s)"
        delivered = harness.consumer_info(settings).delivered
        assert delivered.consumer_seq == delivered.stream_seq, delivered  # no event delivered twice
