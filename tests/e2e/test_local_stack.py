"""`orders up` and the CLI client: start the whole system, use it, stop it with Ctrl-C, start it again."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from orders import local_stack, workers
from tests.support import Stack, add_product, children, eventually, live_processes, new_id, new_sku, place


class Up:
    """One `orders up` process, started in a directory of its own (data in its default .orders-data there)."""

    def __init__(self, cwd: Path, env: dict[str, str], wait: bool = True, args: tuple[str, ...] = ()) -> None:
        self.output = cwd / f"up-{len(list(cwd.glob('up-*')))}.out"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orders.cli", "up", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        if wait:
            local_stack.wait_until(self._ready, 90, "orders up to print the QueryService address")

    def text(self) -> str:
        return self.output.read_text()

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"orders up exited early:\n{self.text()}")
        return "Ctrl-C stops everything" in self.text()

    def infra_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"\(pid (\d+)", self.text())]

    def interrupt(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(60)
        finally:
            local_stack.stop_process(self.proc)  # no-op when it already exited


def skip_unless_embedded() -> None:
    if os.environ.get("ORDERS_TEST_BACKEND", "embedded") != "embedded":
        pytest.skip("orders up starts the embedded servers; this backend provides its own")


def without_orders_variables() -> dict[str, str]:
    """The environment of a second terminal: no ORDERS_* variable at all."""
    return {name: value for name, value in os.environ.items() if not name.startswith("ORDERS_")}


def run_cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orders.cli", *args],
        env={**without_orders_variables(), **(env or {})},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def cli(cwd: Path, *args: str, env: dict[str, str] | None = None) -> dict:  # type: ignore[type-arg]
    result = run_cli(cwd, *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_serves_a_second_terminal_stops_on_ctrl_c_and_keeps_data(tmp_path: Path) -> None:
    """As the README has it: `orders up` in one terminal, every other command in another one, in the same
    directory and with no ORDERS_* variable set: they find the stack through its endpoints file."""
    skip_unless_embedded()
    addresses = {f"ORDERS_{name.upper()}": address for name, address in local_stack.free_addresses().items()}
    env = {**without_orders_variables(), **addresses}  # free ports instead of the defaults, for `up` alone

    first = Up(tmp_path, env)
    try:
        assert addresses["ORDERS_COMMAND_ADDR"] in first.text() and addresses["ORDERS_QUERY_ADDR"] in first.text()
        gateway = f"http://{addresses['ORDERS_GATEWAY_ADDR']}"
        assert f"Gateway         {gateway}/" in first.text()
        with urllib.request.urlopen(f"{gateway}/api/health", timeout=10) as answer:  # the console's health
            assert set(json.load(answer).values()) == {"SERVING"}
        cli(tmp_path, "upsert-product", "LAMP-1", "--name", "Desk lamp", "--price-minor", "2599", "--currency", "EUR")
        cli(tmp_path, "update-inventory", "LAMP-1", "--set", "5")
        placed = cli(tmp_path, "place-order", "--customer", "carol", "--line", "LAMP-1:1")
        shown = cli(tmp_path, "get-order", placed["order_id"], "--token", placed["consistency_token"])
        assert shown["summary"]["status"] == "ORDER_STATUS_PLACED"
        verified = eventually(lambda: (v := cli(tmp_path, "verify", "--stream"))["differences"] == [] and v, 30)
        assert verified["orders_checked"] == 1 and verified["stream"]["messages"] >= 4
        settings = run_cli(tmp_path, "settings").stdout
        endpoints_file = str((tmp_path / ".orders-data" / "endpoints.json").resolve())
        assert re.search(rf"ORDERS_WRITE_DATABASE_URL +postgresql://\S+ +endpoints file {endpoints_file}", settings)
        assert re.search(r"ORDERS_LOG_LEVEL +INFO +default", settings)
        pids = first.infra_pids()
        assert len(pids) == 2
        if workers.available_cores() > 1:  # the default: command and query services as one worker per core
            assert f"({workers.available_cores()} worker processes)" in first.text()
        below = children(first.proc.pid, all_levels=True)  # PostgreSQL, NATS, services, their workers
        assert len(below) >= 2 + 3 + (2 * workers.available_cores() if workers.available_cores() > 1 else 0)

        again = Up(tmp_path, env, wait=False)  # a second `orders up` in the same directory
        assert again.proc.wait(60) == 1
        refusal = again.text()
        assert "already runs" in refusal and f"pid {first.proc.pid}" in refusal, refusal
        assert len(refusal.strip().splitlines()) == 1 and "FATAL" not in refusal
    finally:
        code = first.interrupt()
    assert code == 0, first.text()
    assert not [pid for pid in pids if pid_alive(pid)], "PostgreSQL or NATS outlived orders up"
    assert not below & set(live_processes()), "a service or worker outlived orders up"
    assert not (tmp_path / ".orders-data" / "endpoints.json").exists()
    down = run_cli(tmp_path, "verify")
    assert down.returncode == 3 and "Traceback" not in down.stderr, down.stderr
    assert (
        down.stderr.startswith("error: cannot reach the write database at postgresql://")
        and len(down.stderr.strip().splitlines()) == 1
    )

    second = Up(tmp_path, env)
    try:
        found = cli(tmp_path, "get-order", placed["order_id"])
        assert found["summary"]["order_id"] == placed["order_id"]
        products = cli(tmp_path, "list-products")["products"]
        assert [(p["sku"], p["stock"]) for p in products] == [("LAMP-1", "4")]
        cancelled = cli(tmp_path, "cancel-order", placed["order_id"], "--reason", "restart test")
        assert cancelled["version"] == "2"
        found = cli(tmp_path, "get-order", placed["order_id"], "--token", cancelled["consistency_token"])
        assert found["summary"]["status"] == "ORDER_STATUS_CANCELLED"
    finally:
        assert second.interrupt() == 0, second.text()


def test_up_runs_query_services_on_read_replicas_and_partitioned_projectors(tmp_path: Path) -> None:
    skip_unless_embedded()
    addresses = {f"ORDERS_{name.upper()}": address for name, address in local_stack.free_addresses().items()}
    env = {**without_orders_variables(), **addresses, "ORDERS_WORKERS": "1"}
    for run in (1, 2):  # the second run finds the replicas' data and the primary on another port
        up = Up(tmp_path, env, args=("--read-replicas", "2", "--projectors", "2"))
        try:
            replicas = re.findall(r"QueryService +(\S+) +\(on read replica (\d)\)", up.text())
            assert [n for _, n in replicas] == ["1", "2"], up.text()
            projectors = re.findall(r"AdminService +\S+ +\(projector of partition (\d)\)", up.text())
            assert projectors == ["0", "1"], up.text()
            assert len(up.infra_pids()) == 4, up.text()  # primary, NATS, two replicas
            if run == 1:
                cli(tmp_path, "upsert-product", "LAMP-2", "--name", "Lamp", "--price-minor", "999", "--currency", "EUR")
                cli(tmp_path, "update-inventory", "LAMP-2", "--set", "5")
            placed = cli(tmp_path, "place-order", "--customer", "dave", "--line", "LAMP-2:1")
            for address, _ in replicas:
                shown = cli(
                    tmp_path,
                    "get-order",
                    placed["order_id"],
                    "--token",
                    placed["consistency_token"],
                    env={"ORDERS_QUERY_ADDR": address},
                )
                assert shown["summary"]["order_id"] == placed["order_id"]
            lag = eventually(lambda: (found := cli(tmp_path, "lag"))["lag_events"] == "0" and found, 30, "lag 0")
            partitions = [(p.get("partition", 0), p["consumer"]) for p in lag["partitions"]]
            assert partitions == [(0, "orders-projector-p0"), (1, "orders-projector-p1")], lag
            for address in (addresses["ORDERS_QUERY_ADDR"], *(a for a, _ in replicas)):  # both partitions' reports
                eventually(lambda: local_stack.grpc_health(address, "projection") == "SERVING", 30)  # noqa: B023
        finally:
            code = up.interrupt()
        assert code == 0, up.text()


def test_cli_seeds_demo_data_with_progress_and_prints_tables(stack: Stack) -> None:
    env = {**os.environ, **stack.settings.to_env()}

    def run(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "orders.cli", *args], env=env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    seeded = run("seed", "--products", "4", "--orders", "30", "--concurrency", "4", "--random-seed", "7")
    assert "4 products with stock" in seeded and "placed 30/30 orders (100%" in seeded
    products = run("list-products", "--prefix", "Anvil").splitlines()
    assert products[0].split() == ["SKU", "NAME", "PRICE", "STOCK", "VERSION"]
    assert any(line.startswith("DEMO-0000") for line in products[1:])
    orders = run("search-orders", "DEMO-0001", "--page-size", "5").splitlines()
    assert orders[0].split()[:3] == ["ORDER", "CUSTOMER", "STATUS"]
    rows = [line for line in orders[1:] if not line.startswith("next page")]
    assert 1 <= len(rows) <= 5 and all(line.split()[2] in ("placed", "cancelled") for line in rows)
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run(
            [sys.executable, "-m", "orders.cli", "seed", "--orders", "0"], env=env, check=True, capture_output=True
        )


def test_the_cli_stops_quietly_when_the_reader_of_its_output_goes_away(stack: Stack) -> None:
    """`orders list-products --in-stock | head -8`, with head gone before the first line is written."""
    sku, customer = new_sku("P"), f"pipe-{new_id()}"
    add_product(stack.commands, sku, stock=3)
    place(stack.commands, customer, (sku, 1))
    env = {**os.environ, **stack.settings.to_env()}
    for command in (["list-products", "--in-stock"], ["watch", "--customer", customer, "--snapshot"]):
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone
        try:
            done = subprocess.run(
                [sys.executable, "-m", "orders.cli", *command],
                stdout=write_end,
                stderr=subprocess.PIPE,
                env=env,
                timeout=30,
            )
        finally:
            os.close(write_end)
        assert (done.returncode, done.stderr.decode()) == (128 + signal.SIGPIPE, ""), command


def test_unknown_dead_letters_are_not_found_for_every_cli_action(stack: Stack) -> None:
    env = {**os.environ, **stack.settings.to_env()}
    for action in ("show", "replay", "discard"):
        done = subprocess.run(
            [sys.executable, "-m", "orders.cli", "dead-letters", action, "987654321"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 1 and "NOT_FOUND" in done.stderr and "987654321" in done.stderr, (action, done)
