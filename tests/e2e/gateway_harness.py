"""A system with authentication on and the HTTP/JSON gateway in front of it, and a plain HTTP client for
it (urllib: what curl would send)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orders import local_stack
from orders.config import Settings
from tests.support import Infra, isolated_settings, migrate, start_serving

OPS, SHOP, READER = (f"{name}-{uuid.uuid4().hex}" for name in ("ops", "shop", "reader"))
TOKENS = (
    f"ops admin,orders:read,orders:write,inventory:write {OPS}; shop orders:read,orders:write {SHOP}; "
    f"reader orders:read {READER}"
)


@dataclass
class Gateway:
    settings: Settings
    url: str
    processes: dict[str, local_stack.ManagedProcess]

    def post(
        self, path: str, body: bytes, *, token: str | None = OPS, content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        request = urllib.request.Request(self.url + path, data=body, method="POST")
        request.add_header("Content-Type", content_type)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        for key, value in (headers or {}).items():
            request.add_header(key, value)
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def rpc(self, method: str, message: dict[str, Any], **options: Any) -> tuple[int, dict[str, Any]]:
        """A unary Connect call with a JSON body: HTTP status and the decoded JSON answer."""
        status, _, body = self.post(f"/orders.v1.{method}", json.dumps(message).encode(), **options)
        return status, json.loads(body or b"{}")


def start_gateway(settings: Settings, log_dir: Path) -> local_stack.ManagedProcess:
    proc = local_stack.start_service("orders.gateway", settings.to_env(), log_dir)

    def answers() -> bool:
        if not proc.alive():
            raise RuntimeError(f"gateway died:\n{proc.log_tail()}")
        return local_stack.http_ok(f"http://{settings.gateway_addr}/api/health")

    try:
        local_stack.wait_until(answers, 30, "gateway answering")
    except BaseException:
        proc.stop()
        raise
    return proc


@contextlib.contextmanager
def gateway_system(infra: Infra, log_dir: Path, **overrides: Any) -> Iterator[Gateway]:
    """A system of its own with tokens required (the CLI's token is OPS), and the gateway in front of it;
    on a nats-server of its own (its stream takes the event subjects, which the session's stream holds on
    the shared one)."""
    nats = local_stack.start_nats(log_dir / "nats")
    processes: dict[str, local_stack.ManagedProcess] = {}
    try:
        settings = isolated_settings(
            infra, nats_url=nats.url, auth="on", auth_tokens=TOKENS, client_token=OPS, **overrides
        )
        asyncio.run(migrate(settings))
        for module in local_stack.SERVICES:
            processes[module] = start_serving(module, settings, log_dir)
        processes["gateway"] = start_gateway(settings, log_dir)
        yield Gateway(settings, f"http://{settings.gateway_addr}", processes)
    finally:
        for proc in reversed(processes.values()):
            proc.stop()
        nats.stop()


def add_product(gateway: Gateway, sku: str, stock: int = 100) -> None:
    status, answer = gateway.rpc(
        "CommandService/UpsertProduct",
        {
            "requestId": str(uuid.uuid4()),
            "sku": sku,
            "name": f"Product {sku}",
            "unitPrice": {"currencyCode": "EUR", "minorUnits": "250"},
        },
    )
    assert status == 200, answer
    status, answer = gateway.rpc(
        "CommandService/UpdateInventory", {"requestId": str(uuid.uuid4()), "sku": sku, "setLevel": str(stock)}
    )
    assert status == 200, answer
