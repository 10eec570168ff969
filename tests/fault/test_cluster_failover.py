"""A three-node JetStream cluster, the stream at three replicas, two command services and two
projectors: the stream's leader node is SIGKILLed during load and restarted on its store."""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

import nats.errors

from orders.config import Settings
from tests.fault import cluster, harness
from tests.support import Infra, eventually, isolated_settings

DOWN_SECONDS = 5.0


def cluster_info(settings: Settings) -> Any:
    """The stream's cluster info; None while the cluster cannot answer (a leader election)."""
    try:
        return harness.stream_info(settings).cluster
    except (nats.errors.Error, TimeoutError):
        return None


def stream_leader(settings: Settings) -> str | None:
    cluster = cluster_info(settings)
    return cluster.leader if cluster else None


def replicas_current(settings: Settings) -> bool:
    """A leader and two followers, all caught up."""
    cluster = cluster_info(settings)
    return bool(cluster and cluster.leader and len(cluster.replicas or []) == 2) and all(
        r.current for r in cluster.replicas or []
    )


def test_stream_leader_sigkilled_in_a_three_node_cluster(infra: Infra, tmp_path: Path) -> None:
    started = time.monotonic()
    nodes = {n.server_name: n for n in cluster.start_nats_cluster(tmp_path / "nats")}
    # Events the dying consumer leader had delivered come back only after ack_wait; later events of the
    # same (hot) products wait for them as gaps (never dead-lettered: their predecessors are in the
    # stream), and such a chain resolves one version per redelivery. With the defaults (ack_wait 30 s,
    # gap waits up to 2 s) that takes a minute or more after a failover (see the README's limitations),
    # so this scenario, which checks loss and duplication across the failover, shortens the waits.
    settings = isolated_settings(
        infra,
        nats_url=",".join(n.url for n in nodes.values()),
        stream_replicas=3,
        ack_wait=5.0,
        retry_backoff=(0.2, 0.5),
    )
    second = harness.with_addresses(settings)
    client = harness.Client([settings.command_addr, second.command_addr])
    with harness.system(settings, tmp_path) as system, contextlib.closing(client):
        for name, node in nodes.items():
            system.adopt(name, node.process)
        system.start("command-a", "command_service", settings)
        system.start("command-b", "command_service", second)
        system.start("projector-a", "projector", settings)
        system.start("projector-b", "projector", second)
        skus = system.seed_catalog(client)
        assert harness.stream_info(settings).config.num_replicas == 3
        load = harness.Load(client, skus, [f"r{i}" for i in range(50)])
        with load.running():
            harness.wait_for_commands(load, 300)
            leader = stream_leader(settings)
            assert leader in nodes, leader
            victim = nodes[leader]
            victim.process.kill()
            down_at = time.monotonic()
            new_leader = eventually(lambda: (s := stream_leader(settings)) != leader and s, 30, "a new stream leader")
            time.sleep(max(0.0, down_at + DOWN_SECONDS - time.monotonic()))  # the rest of the node's downtime
            system.adopt(leader, victim.restart().process)
            fault_end = time.monotonic()
            load.stop()  # the gap chains left by the failover drain faster without new events behind them
        eventually(lambda: replicas_current(settings), 60, "the restarted node caught up")
        caught_up = harness.caught_up_after(settings, fault_end, timeout=180)
        harness.finish("JetStream R3 leader SIGKILL", system, client, caught_up, started)

        assert victim.process.proc.returncode == -signal.SIGKILL
        assert new_leader in nodes and new_leader != leader
