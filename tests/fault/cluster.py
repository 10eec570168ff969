"""A nats-server cluster on loopback for the failover scenario: three JetStream nodes with routes."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

from orders import local_stack


def cluster_config(name: str, listen_port: int, route_ports: list[int]) -> str:
    """The nats-server `cluster` block of one node: its route listener and the routes to every node."""
    routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in route_ports)
    return f"cluster {{\n  name: {name}\n  listen: 127.0.0.1:{listen_port}\n  routes: [{routes}]\n}}\n"


def start_nats_cluster(base_dir: Path, size: int = 3, name: str = "orders") -> list[local_stack.LocalNats]:
    """Run `size` clustered nats-server nodes with JetStream on loopback (stores in base_dir/n<i>),
    and wait until JetStream has elected a meta leader, so streams with replicas can be created."""
    route_ports = [local_stack.free_port() for _ in range(size)]
    nodes: list[local_stack.LocalNats] = []
    try:
        for i, listen_port in enumerate(route_ports):
            config = cluster_config(name, listen_port, route_ports)
            nodes.append(local_stack.start_nats(base_dir / f"n{i}", extra_config=config, server_name=f"{name}_n{i}"))
        local_stack.wait_until(lambda: all(jetstream_meta_leader(n) for n in nodes), 60, "a JetStream meta leader")
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def jetstream_meta_leader(nats: local_stack.LocalNats) -> str | None:
    """The server name of the JetStream meta leader as `nats` sees it (None when unknown)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{nats.monitor_port}/jsz", timeout=1) as r:
            leader = json.load(r).get("meta_cluster", {}).get("leader")
    except OSError:
        return None
    return str(leader) if leader else None
