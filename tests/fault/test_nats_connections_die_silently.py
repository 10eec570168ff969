"""The relay's and the projector's NATS connections die without a word (black hole, half-open) under load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from orders import local_stack
from orders.config import Settings
from tests.fault import harness
from tests.fault.proxy import proxy_to
from tests.support import Infra, eventually, isolated_settings

LOAD_RATE = 20.0  # commands per second per load worker (4 workers): the backlog a fault leaves behind,
# and so the time to catch up after it, must not grow with the speed of the machine or of the pipeline


def recovery_bound(settings: Settings) -> float:
    """Seconds from the fault's start until the read model has caught up again, from what the scenario
    waits for: the dead connections noticed (a PING every interval, given up after the allowed
    outstanding ones: at most interval x (outstanding + 1)), events delivered into them coming back
    after ack_wait, a relay publish timing out once, and 5 s of slack for a busy machine."""
    noticed = settings.nats_ping_interval * (settings.nats_max_outstanding_pings + 1)
    return noticed + settings.ack_wait + settings.publish_timeout + 5.0


@pytest.mark.parametrize("how", ["black-hole", "half-open"])
def test_a_silently_dead_nats_connection_is_noticed_and_replaced_within_seconds(
    infra: Infra, own_nats: local_stack.LocalNats, tmp_path: Path, how: str
) -> None:
    """Every NATS connection of the command service (relay) and the projector runs through a proxy,
    which breaks them all at once without closing them. Both services notice by their PINGs going
    unanswered, report NOT_SERVING meanwhile, reconnect (new connections get through), and the read
    model catches up with everything committed, within recovery_bound() of the fault. The load
    is paced: what is measured is how soon the dead connections are noticed, not how long a backlog
    takes to drain."""
    started = time.monotonic()
    with proxy_to(own_nats.port) as proxy:
        settings = isolated_settings(infra, nats_url=proxy.url)
        with harness.loaded_system(settings, tmp_path, "h", rate=LOAD_RATE) as (system, client, load):
            with load.running():
                harness.wait_for_commands(load, 200)
                fault_start = time.monotonic()
                assert proxy.break_connections(how) >= 2  # the relay's and the projector's, at least
                unhealthy = eventually(
                    lambda: (
                        {
                            name: status
                            for name, (address, service) in {
                                "relay": (settings.command_addr, "relay"),
                                "projector": (settings.admin_addr, ""),
                            }.items()
                            if (status := harness.health(address, service)) != "SERVING"
                        }
                        or None
                    ),
                    10,
                    "a health status turning NOT_SERVING",
                )
                caught_up = harness.caught_up_after(settings, fault_start, timeout=60)
                harness.wait_for_commands(load, 100)
            harness.finish(f"NATS connections {how}", system, client, caught_up, started)

            bound = recovery_bound(settings)
            assert caught_up < bound, f"caught up {caught_up:.1f} s after the fault started (bound {bound:.0f} s)"
            assert set(unhealthy.values()) == {"NOT_SERVING"}, unhealthy
            eventually(lambda: harness.outbox_backlog(settings) == 0, 30, "outbox backlog drained")
            for address, service in ((settings.command_addr, "relay"), (settings.admin_addr, "")):
                eventually(lambda: harness.health(address, service) == "SERVING", 30, service)  # noqa: B023
