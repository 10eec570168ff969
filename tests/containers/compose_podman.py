"""docker-compose.yml started by podman, every container on the host's network, the way compose would.

Why not a compose implementation: Debian's docker-compose needs a Docker engine's API, and podman
(4.3) runs health checks from systemd timers, which a machine without systemd lacks, so `depends_on:
condition: service_healthy` would never be met. The file is therefore normalized by `docker-compose
config` (interpolation from the env file, merges, the deploy/host-network.yml override) and each
service started with `podman run`, in the order its `depends_on` conditions give, waiting as compose
does: `service_started` (running), `service_healthy` (the service's healthcheck, run in the container
with `podman exec` until it passes; failures count after its start_period, up to interval x retries),
`service_completed_successfully` (exited 0, after the restarts its policy allows).

Images compose would pull are replaced by local ones (`images`: compose image -> local image, and the
entry point and command that image would have had).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orders import local_stack
from tests.support import eventually

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def seconds(duration: str | None, default: float) -> float:
    """A compose duration ('1m30s', '500ms') in seconds."""
    if not duration:
        return default
    return sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(str(duration)))


def podman(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} ... failed ({done.returncode}): {done.stderr.strip()}")
    return done


def normalized(files: list[Path], env_file: Path, project_dir: Path) -> dict[str, Any]:
    """`docker-compose config` of the files: what compose itself would run."""
    args = ["docker-compose", "--project-directory", str(project_dir), "--env-file", str(env_file)]
    for path in files:
        args += ["-f", str(path)]
    done = subprocess.run([*args, "config"], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"docker-compose config failed: {done.stderr.strip()}")
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


@dataclass(frozen=True)
class LocalImage:
    """What runs in place of a compose image: a local image, and the image's own entry point and command."""

    image: str
    entrypoint: tuple[str, ...] = ()
    command: tuple[str, ...] = ()


@dataclass
class ComposeOnPodman:
    project: str  # prefix of container and volume names
    config: dict[str, Any]
    images: dict[str, LocalImage]
    started: list[str] = field(default_factory=list)

    # ---- names ----------------------------------------------------------------------------------

    def container(self, service: str) -> str:
        return f"{self.project}-{service}"

    def volume(self, name: str) -> str:
        return f"{self.project}_{name}"

    def spec(self, service: str) -> dict[str, Any]:
        spec: dict[str, Any] = self.config["services"][service]
        return spec

    # ---- up and down ----------------------------------------------------------------------------

    def order(self) -> list[str]:
        """The services, each after everything it depends on."""
        done: list[str] = []

        def visit(name: str, path: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in path:
                raise ValueError(f"depends_on cycle: {' -> '.join((*path, name))}")
            for dependency in self.spec(name).get("depends_on", {}):
                visit(dependency, (*path, name))
            done.append(name)

        for name in sorted(self.config["services"]):
            visit(name, ())
        return done

    def up(self) -> None:
        for name in self.config.get("volumes", {}):
            podman("volume", "create", self.volume(name))
        for service in self.order():
            for dependency, wanted in self.spec(service).get("depends_on", {}).items():
                self.wait(dependency, wanted.get("condition", "service_started"))
            self.run(service)

    def run(self, service: str) -> None:
        spec = self.spec(service)
        if spec.get("network_mode") != "host":
            raise ValueError(f"{service}: only network_mode host is run here (no bridge networks)")
        image = self.images.get(spec["image"], LocalImage(spec["image"]))
        args = ["run", "--detach", "--name", self.container(service), "--network", "host"]
        args += ["--restart", spec.get("restart", "no")]
        if "user" in spec:
            args += ["--user", str(spec["user"])]
        entrypoint = spec.get("entrypoint", image.entrypoint)
        if entrypoint:
            args += ["--entrypoint", json.dumps(list(entrypoint))]
        for key, value in (spec.get("environment") or {}).items():
            if value is not None:
                args += ["--env", f"{key}={value}"]
        for mount in spec.get("volumes", []):
            source, _, target = mount.partition(":")
            args += ["--volume", f"{source if source.startswith('/') else self.volume(source)}:{target}"]
        command = spec.get("command", image.command if "entrypoint" not in spec else ())
        podman(*args, image.image, *command)
        self.started.append(service)

    def down(self) -> list[str]:
        """Remove every container and volume of the project; what could not be removed."""
        left = []
        for service in reversed(self.started):
            if podman("rm", "--force", "--time", "5", self.container(service), check=False).returncode != 0:
                left.append(self.container(service))
        for name in self.config.get("volumes", {}):
            if podman("volume", "rm", "--force", self.volume(name), check=False).returncode != 0:
                left.append(self.volume(name))
        return left

    # ---- state ----------------------------------------------------------------------------------

    def inspect(self, service: str) -> dict[str, Any]:
        found: dict[str, Any] = json.loads(podman("inspect", self.container(service)).stdout)[0]
        return found

    def state(self, service: str) -> dict[str, Any]:
        state: dict[str, Any] = self.inspect(service)["State"]
        return state

    def pid(self, service: str) -> int:
        return int(self.state(service)["Pid"])

    def restarts(self, service: str) -> int:
        return int(self.inspect(service).get("RestartCount", 0))

    def logs(self, service: str, tail: int = 40) -> str:
        done = podman("logs", "--tail", str(tail), self.container(service), check=False)
        return f"--- {service} ---\n{done.stdout}{done.stderr}"

    def healthy(self, service: str) -> bool:
        """The service's healthcheck, run once in its container."""
        check = self.spec(service)["healthcheck"]
        test = list(check["test"])
        argv = test[1:] if test[0] == "CMD" else ["sh", "-c", test[1]]
        timeout = seconds(check.get("timeout"), 30.0)
        try:
            done = podman("exec", self.container(service), *argv, check=False, timeout=timeout + 5)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def wait(self, service: str, condition: str) -> None:
        if condition == "service_started":
            eventually(lambda: self.state(service)["Running"], timeout=30, what=f"{service} running")
        elif condition == "service_healthy":
            self.wait_healthy(service)
        elif condition == "service_completed_successfully":
            self.wait_completed(service)
        else:
            raise ValueError(f"{service}: unknown depends_on condition {condition}")

    def wait_healthy(self, service: str) -> None:
        check = self.spec(service)["healthcheck"]
        start_period = seconds(check.get("start_period"), 0.0)
        give_up = start_period + seconds(check.get("interval"), 30.0) * int(check.get("retries", 3))
        self._wait(lambda: self.healthy(service), give_up, f"{service} healthy", service)

    def wait_completed(self, service: str, timeout: float = 300) -> None:
        def exited_0() -> bool:
            state = self.state(service)
            return bool(state["Status"] == "exited" and state["ExitCode"] == 0)

        self._wait(exited_0, timeout, f"{service} completed successfully", service)

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str, service: str) -> None:
        try:
            local_stack.wait_until(condition, timeout, what, interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.logs(service)}") from None
