"""docker-compose.yml started for real: images built from Debian's packages, every container on the host's
network (deploy/host-network.yml), mutual TLS on, the services on their least-privilege roles.

Skipped, with the reason, where podman cannot run containers (no podman, debootstrap or docker-compose,
not root). `.ci/run` installs them from Debian's packages.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
import pytest

from orders.config import Settings
from orders.db import libpq_url
from orders.local_stack import free_port
from orders.v1 import queries_pb2, queries_pb2_grpc
from tests.containers import images
from tests.containers.compose_podman import ComposeOnPodman, LocalImage, normalized, podman
from tests.e2e.gateway_harness import Gateway
from tests.fault.harness import INITIAL_STOCK, Client, Load, check_ledger, health, wait_for_commands, wait_verified
from tests.pki import Pki, make_pki
from tests.support import add_product, eventually, new_sku, verify_cli

pytestmark = pytest.mark.timeout(1800)

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
SERVICES = {  # long-running service -> (host port variable of deploy/host-network.yml, its gRPC service)
    "command-service": "HOST_PORT_COMMAND",
    "query-service": "HOST_PORT_QUERY",
    "query-service-replica": "HOST_PORT_QUERY_REPLICA",
    "projector": "HOST_PORT_PROJECTOR",
    "projector-p1": "HOST_PORT_PROJECTOR_P1",
}
DATABASES = ("postgres-write", "postgres-read", "postgres-read-replica")
GATEWAY_PORT = "HOST_PORT_GATEWAY"
PORT_VARIABLES = (
    *(f"HOST_PORT_{name}" for name in ("POSTGRES_WRITE", "POSTGRES_READ", "POSTGRES_REPLICA", "NATS", "NATS_MONITOR")),
    GATEWAY_PORT,
    *(variable for port in SERVICES.values() for variable in (port, f"{port}_METRICS")),
)


def cannot_run() -> str | None:
    """Why podman cannot run the stack here (with CONTAINERS_CONF set), or None."""
    for tool in ("podman", "runc", "debootstrap", "docker-compose"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (Debian package {tool}; .ci/run installs it as root)"
    if os.geteuid() != 0:
        return "debootstrap and rootful podman need root"
    info = subprocess.run(["podman", "info"], capture_output=True, text=True, timeout=60)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-300:]}"
    return None


@dataclass
class Deployment:
    runner: ComposeOnPodman
    env: dict[str, str]  # the env file
    settings: Settings  # admin URLs, NATS as the projector, the CA and the ops token: for the host's checks
    credentials: grpc.ChannelCredentials
    client: Client  # every command of the module, in one ledger (the checks expect no other orders)
    built: list[str]  # images

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.env[SERVICES[service]]}"

    @property
    def gateway(self) -> Gateway:
        return Gateway(self.settings, f"http://127.0.0.1:{self.env[GATEWAY_PORT]}", {})

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.client.metadata


def write_env_file(path: Path, tls_dir: Path) -> dict[str, str]:
    """The env file: deploy/make-env.sh's random secrets, free host ports, mutual TLS on (the probes
    verify the servers with the CA and present the client certificate)."""
    subprocess.run(["sh", str(ROOT / "deploy" / "make-env.sh"), str(path)], check=True, capture_output=True)
    extra = {name: str(free_port()) for name in PORT_VARIABLES}
    extra |= {
        "ORDERS_TLS_DIR": str(tls_dir),
        "ORDERS_TLS_CERT_FILE": "/etc/orders/tls/server.pem",
        "ORDERS_TLS_KEY_FILE": "/etc/orders/tls/server.key",
        "ORDERS_TLS_CLIENT_CA_FILE": "/etc/orders/tls/ca.pem",
        "ORDERS_CLIENT_CA_FILE": "/etc/orders/tls/ca.pem",
        "ORDERS_CLIENT_CERT_FILE": "/etc/orders/tls/client.pem",
        "ORDERS_CLIENT_KEY_FILE": "/etc/orders/tls/client.key",
    }
    with path.open("a") as out:
        out.writelines(f"{name}={value}\n" for name, value in extra.items())
    env = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def tls_files(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, readable by the containers' users."""
    pki = make_pki(directory)
    directory.chmod(0o755)
    for file in directory.iterdir():
        file.chmod(0o644)
    return pki


def host_settings(env: dict[str, str], pki: Pki) -> Settings:
    password = env["ORDERS_POSTGRES_PASSWORD"]
    return Settings.from_env(
        {
            "ORDERS_WRITE_DATABASE_URL": f"postgresql://orders:{password}@127.0.0.1:{env['HOST_PORT_POSTGRES_WRITE']}/orders_write",
            "ORDERS_READ_DATABASE_URL": f"postgresql://orders:{password}@127.0.0.1:{env['HOST_PORT_POSTGRES_READ']}/orders_read",
            "ORDERS_NATS_URL": f"nats://127.0.0.1:{env['HOST_PORT_NATS']}",
            "ORDERS_NATS_USER": "orders-projector",
            "ORDERS_NATS_PASSWORD": env["ORDERS_NATS_PROJECTOR_PASSWORD"],
            "ORDERS_PARTITIONS": "2",
            "ORDERS_CLIENT_CA_FILE": str(pki.ca),
            "ORDERS_CLIENT_CERT_FILE": str(pki.client_cert),
            "ORDERS_CLIENT_KEY_FILE": str(pki.client_key),
            "ORDERS_CLIENT_TOKEN": env["ORDERS_AUTH_TOKENS"].split()[-1],
        }
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    work = tmp_path_factory.mktemp("compose")
    project = f"orders-test-{uuid.uuid4().hex[:8]}"
    base, app, stand_ins = (f"localhost/{project}-{name}:latest" for name in ("base", "app", "stand-ins"))
    built: list[str] = []
    runner = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CONTAINERS_CONF", str(HERE / "containers.conf"))
        reason = cannot_run()
        if reason:
            pytest.skip(reason)
        try:
            for tag, build in (
                (base, lambda: images.build_base(base)),
                (app, lambda: images.build_project(app, base)),
                (stand_ins, lambda: images.build_stand_ins(stand_ins, base)),
            ):
                built.append(tag)
                build()
            pki = tls_files(work / "tls")
            env = write_env_file(work / "env", work / "tls")
            config = normalized([ROOT / "docker-compose.yml", ROOT / "deploy" / "host-network.yml"], work / "env", ROOT)
            runner = ComposeOnPodman(
                project,
                config,
                {
                    "orders-cqrs:local": LocalImage(app),
                    "postgres:18": LocalImage(stand_ins, ("docker-entrypoint.sh",), ("postgres",)),
                    "nats:2.12-alpine": LocalImage(stand_ins, ("nats-server",)),
                },
            )
            runner.up()
            credentials = grpc.ssl_channel_credentials(
                pki.ca.read_bytes(), pki.client_key.read_bytes(), pki.client_cert.read_bytes()
            )
            settings = host_settings(env, pki)
            token = (("authorization", f"Bearer {settings.client_token}"),)
            address = f"127.0.0.1:{env[SERVICES['command-service']]}"
            with contextlib.closing(Client([address], token, credentials=credentials)) as client:
                yield Deployment(runner, env, settings, credentials, client, built)
        finally:
            if runner is not None:
                runner.down()
            for tag in reversed(built):
                podman("rmi", "--force", tag, check=False)


def test_every_service_healthy_over_tls_on_its_own_database_role(deployment: Deployment) -> None:
    runner = deployment.runner
    checked = {name for name, spec in runner.config["services"].items() if "healthcheck" in spec}
    assert checked == {*SERVICES, *DATABASES, "nats", "gateway"}
    for service in sorted(checked):
        assert runner.healthy(service), runner.logs(service)  # the compose file's own probe, in the container
    for job in ("migrate", "create-roles"):
        state = runner.state(job)
        assert (state["Status"], state["ExitCode"]) == ("exited", 0), runner.logs(job)
    # The probes passed over mutual TLS: a plaintext client gets no answer.
    assert health(deployment.address("command-service")) is None
    # Each service connects as its least-privilege role, never as the superuser.
    settings = deployment.settings
    for url, roles in (
        (settings.write_database_url, {"orders_command"}),
        (settings.read_database_url, {"orders_projector", "orders_query"}),
    ):
        with psycopg.connect(libpq_url(url)) as conn:
            rows = conn.execute(
                "SELECT DISTINCT usename FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
            ).fetchall()
        assert {name for (name,) in rows} == roles


def test_place_order_token_read_on_primary_and_replica_then_verify(deployment: Deployment) -> None:
    metadata = deployment.metadata
    sku = new_sku("K")
    add_product(deployment.client.stubs[0], sku, stock=5, metadata=metadata)
    placed = deployment.client.place("container-customer", [(sku, 2)])
    assert placed.ok, placed.attempts
    for service in ("query-service", "query-service-replica"):
        with grpc.secure_channel(deployment.address(service), deployment.credentials) as channel:
            request = queries_pb2.GetOrderSummaryRequest(
                order_id=placed.order_id, consistency_token=placed.consistency_token
            )
            summary = queries_pb2_grpc.QueryServiceStub(channel).GetOrderSummary(request, metadata=metadata, timeout=10)
        assert (summary.summary.order_id, summary.summary.customer_id) == (placed.order_id, "container-customer")
    # The same read through the gateway's HTTP/JSON, which reaches the services over mutual TLS; a bad
    # command through it is refused with its field details.
    gateway, token = deployment.gateway, deployment.settings.client_token
    with urllib.request.urlopen(f"{gateway.url}/api/health", timeout=10) as response:
        assert json.load(response) == {"command": "SERVING", "query": "SERVING", "admin": "SERVING"}
    status, answer = gateway.rpc(
        "QueryService/GetOrderSummary",
        {"orderId": placed.order_id, "consistencyToken": placed.consistency_token},
        token=token,
    )
    assert (status, answer["summary"]["customerId"]) == (200, "container-customer"), answer
    status, answer = gateway.rpc(
        "CommandService/PlaceOrder", {"requestId": str(uuid.uuid4()), "customerId": "", "lines": []}, token=token
    )
    assert (status, answer["code"]) == (400, "invalid_argument"), answer
    code, report = verify_cli(deployment.settings)
    assert (code, report["differences"]) == (0, []), report
    assert report["stream"]["messages"] >= 2 and not report["stream"]["undecodable"]


def test_killed_containers_restart_and_nothing_is_lost(deployment: Deployment) -> None:
    runner = deployment.runner
    client = deployment.client
    skus = [new_sku("L") for _ in range(5)]
    for sku in skus:
        add_product(client.stubs[0], sku, stock=INITIAL_STOCK, metadata=deployment.metadata)
    load = Load(client, skus, [f"container-load-{i}" for i in range(20)], workers=3)
    with load.running():
        wait_for_commands(load, 30, timeout=120)
        for service in ("command-service", "projector"):
            restarts, killed = runner.restarts(service), time.monotonic()
            os.kill(runner.pid(service), signal.SIGKILL)  # a crash, not a stop: the restart policy applies

            def restarted(service: str = service, before: int = restarts) -> bool:
                found = runner.inspect(service)
                return int(found.get("RestartCount", 0)) > before and bool(found["State"]["Running"])

            eventually(restarted, timeout=60, what=f"{service} restarted by its restart policy")
            runner.wait_healthy(service)
            print(f"{service}: SIGKILL -> healthy again in {time.monotonic() - killed:.1f} s")
            wait_for_commands(load, 30, timeout=120)
    assert not client.unexpected(), client.unexpected()[:5]
    assert any(command.retried for command in client.ledger)  # the kill was felt
    wait_verified(deployment.settings)
    check = check_ledger(deployment.settings, client.ledger, skus)
    assert (check.lost, check.duplicated) == ([], [])
    retried = sum(command.retried for command in client.ledger)
    print(
        f"{len(client.ledger)} commands, {sum(c.ok for c in client.ledger)} OK, {retried} retried, 0 lost, 0 duplicated"
    )


def test_down_removes_every_container_volume_and_image(deployment: Deployment) -> None:
    runner = deployment.runner
    assert runner.down() == []
    for tag in deployment.built:
        podman("rmi", "--force", tag)
    prefix = runner.project
    containers = podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    volumes = podman("volume", "ls", "--format", "{{.Name}}").stdout.split()
    listed = podman("images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert [name for name in containers + volumes + listed if prefix in name] == []
