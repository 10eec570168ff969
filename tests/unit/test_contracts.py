"""The contracts and the code layout: generated code is current, protos lint clean, services stay apart."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scripts.gen_protos", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def buf(*args: str, cwd: Path = ROOT / "protos") -> subprocess.CompletedProcess[str]:
    binary = Path(sysconfig.get_path("scripts")) / "buf"
    if not binary.exists():
        pytest.fail("buf not installed: pip install -e '.[dev]' (buf-bin)")
    return subprocess.run([str(binary), *args], cwd=cwd, capture_output=True, text=True)


def test_buf_lint_passes_with_default_rules() -> None:
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


RELEASED = ROOT / "protos" / "released.binpb"  # image of the last released contract, replaced only on purpose


def test_no_breaking_change_since_the_released_contract() -> None:
    result = buf("breaking", "--against", str(RELEASED))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "old", "new", "complaint"),
    [
        ("commands.proto", "  string customer_id = 2;\n", "", 'Previously present field "2" with name "customer_id"'),
        ("events.proto", "int64 aggregate_version = 4;", "int32 aggregate_version = 4;", "changed type"),
    ],
    ids=["field-removed", "event-field-type-changed"],
)
def test_a_breaking_change_would_fail_the_check(tmp_path: Path, path: str, old: str, new: str, complaint: str) -> None:
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    proto = tmp_path / "protos" / "orders" / "v1" / path
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new, 1))
    result = buf("breaking", "--against", str(RELEASED), cwd=tmp_path / "protos")
    assert result.returncode != 0 and complaint in result.stdout, result.stdout + result.stderr


SERVICES = {"command_service", "query_service", "projector"}


@pytest.mark.parametrize("package", ["orders", *sorted(SERVICES)])
def test_imports_run_one_way_from_each_service_to_the_shared_package(package: str) -> None:
    """A service imports the shared package `orders` and no other service; `orders` imports no service
    (the CLI starts a service by its module name, `python -m`-style, not by an import)."""
    others = SERVICES - {package}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in others, f"{path.relative_to(ROOT)} imports {name}"


def test_compose_runs_real_cli_commands_and_nats_config_is_valid() -> None:
    from orders.cli import build_parser
    from orders.local_stack import nats_server_binary

    compose = (ROOT / "docker-compose.yml").read_text()
    commands = re.findall(r'command: \["([a-z-]+)"\]', compose)
    assert set(commands) == {"migrate", "create-roles", "command-service", "query-service", "projector", "gateway"}
    for command in commands:
        build_parser().parse_args([command])
    health_checks = re.findall(r'"orders", "health", "([0-9.:]+)"', compose)
    assert len(health_checks) == 5
    for address in health_checks:
        build_parser().parse_args(["health", address])
    result = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(ROOT / "deploy" / "nats-server.conf")],
        capture_output=True,
        text=True,
        env={**os.environ, **COMPOSE_SECRETS},
    )
    assert result.returncode == 0, result.stdout + result.stderr


COMPOSE_SECRETS = {
    "ORDERS_POSTGRES_PASSWORD": "postgres-secret",
    "ORDERS_COMMAND_DB_PASSWORD": "command-db-secret",
    "ORDERS_PROJECTOR_DB_PASSWORD": "projector-db-secret",
    "ORDERS_QUERY_DB_PASSWORD": "query-db-secret",
    "ORDERS_NATS_COMMAND_PASSWORD": "command-secret",
    "ORDERS_NATS_PROJECTOR_PASSWORD": "projector-secret",
    "ORDERS_NATS_QUERY_PASSWORD": "query-secret",
    "ORDERS_AUTH_TOKENS": "ops admin,orders:read,orders:write,inventory:write " + "t" * 32,
}


def test_docker_compose_accepts_the_compose_file_and_the_image_runs_the_cli() -> None:
    import tomllib

    import yaml

    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.skip("docker-compose not installed (Debian package docker-compose; .ci/run installs it)")
    compose = ROOT / "docker-compose.yml"
    env = {**os.environ, **COMPOSE_SECRETS}
    for override in ([], ["-f", str(ROOT / "deploy" / "host-network.yml")]):
        checked = subprocess.run(
            [docker_compose, "-f", str(compose), *override, "config", "-q"], capture_output=True, text=True, env=env
        )
        assert checked.returncode == 0, checked.stderr
    listed = subprocess.run(
        [docker_compose, "-f", str(compose), "config", "--services"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    rendered = subprocess.run(
        [docker_compose, "-f", str(compose), "config"], capture_output=True, text=True, check=True, env=env
    )
    gateway = yaml.safe_load(rendered.stdout)["services"]["gateway"]["environment"]
    assert "ORDERS_CLIENT_CA_FILE" in gateway and not [  # the probes' TLS files, and not one secret
        name for name, value in gateway.items() if any(secret in str(value) for secret in COMPOSE_SECRETS.values())
    ]
    missing = subprocess.run(
        [docker_compose, "-f", str(compose), "config", "-q"],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in COMPOSE_SECRETS},
    )
    assert missing.returncode != 0 and "set it" in missing.stderr  # no default passwords or tokens
    assert set(listed.stdout.split()) == {
        "postgres-write",
        "postgres-read",
        "postgres-read-replica",
        "nats",
        "migrate",
        "create-roles",
        "command-service",
        "query-service",
        "query-service-replica",
        "projector",
        "projector-p1",
        "gateway",
    }
    dockerfile = (ROOT / "Dockerfile").read_text()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert 'ENTRYPOINT ["orders"]' in dockerfile and scripts["orders"] == "orders.cli:main"
    assert "\nUSER orders" in dockerfile  # not root
    assert "pip install --no-deps -r requirements.lock" in dockerfile  # exact versions, nothing resolved
    exposed = {int(port) for port in re.findall(r"^EXPOSE (.+)$", dockerfile, re.M)[0].split()}
    for setting in ("COMMAND_ADDR", "QUERY_ADDR", "ADMIN_ADDR", "COMMAND_METRICS_ADDR", "QUERY_METRICS_ADDR",
                    "PROJECTOR_METRICS_ADDR", "GATEWAY_ADDR"):  # fmt: skip
        port = re.search(rf"ORDERS_{setting}: 0\.0\.0\.0:(\d+)", compose.read_text())
        assert port and int(port.group(1)) in exposed, setting


def test_lock_file_pins_every_runtime_dependency_within_its_bounds() -> None:
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    from scripts.lock import IMAGE_EXTRAS

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not an exact pin"
            pins[canonicalize_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"] + project["optional-dependencies"][IMAGE_EXTRAS]:
        requirement = Requirement(spec)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{name} is not in requirements.lock: run python -m scripts.lock"
        assert requirement.specifier.contains(pins[name]), f"requirements.lock pins {name} {pins[name]}, needs {spec}"


@pytest.mark.parametrize(
    "tool",
    [
        ["ruff", "check", "."],
        ["ruff", "format", "--check", "."],
        ["mypy", "orders", "command_service", "query_service", "projector", "tests", "scripts"],
    ],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_code_is_lint_and_type_clean(tool: list[str]) -> None:
    executable = Path(sysconfig.get_path("scripts")) / tool[0]
    result = subprocess.run([str(executable), *tool[1:]], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_documents_every_setting() -> None:
    from orders.config import describe

    readme = (ROOT / "README.md").read_text()
    assert [name for name, _, _ in describe() if f"`{name}`" not in readme] == []
