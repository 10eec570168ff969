"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader, loading only the .proto files) drives the services."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from google.rpc import status_pb2

from tests.support import Stack, add_product, new_id, new_sku

CLIENT = Path(__file__).resolve().parents[1] / "polyglot"
PROTOS = Path(__file__).resolve().parents[2] / "protos"
# google/rpc/status.proto and error_details.proto, as PyPI's googleapis-common-protos (a dependency of
# grpcio-status) ships them next to their generated modules: the README sends clients there.
GOOGLEAPIS_PROTOS = Path(status_pb2.__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def node_client() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    installed = CLIENT / "node_modules" / ".package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < (CLIENT / "package-lock.json").stat().st_mtime:
        result = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"], cwd=CLIENT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout + result.stderr
    return CLIENT / "client.js"


def test_a_node_client_places_reads_and_watches_an_order(stack: Stack, node_client: Path) -> None:
    sku, customer = new_sku("N"), f"node-{new_id()}"
    add_product(stack.commands, sku, stock=5, price=150, name="From Node")
    result = subprocess.run(
        [
            "node",
            str(node_client),
            stack.settings.command_addr,
            stack.settings.query_addr,
            str(PROTOS),
            sku,
            customer,
            str(GOOGLEAPIS_PROTOS),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    seen = json.loads(result.stdout)
    read = seen["read"]
    assert (read["orderId"], read["customerId"], read["status"]) == (seen["placed"], customer, "ORDER_STATUS_PLACED")
    assert read["total"] == {"currencyCode": "EUR", "minorUnits": "300"}
    assert read["lines"][0]["name"] == "From Node"
    watched = [(m["summary"]["orderId"], m["summary"]["version"], m["snapshot"]) for m in seen["watched"]]
    assert watched == [(seen["placed"], "1", True), (seen["placed"], "2", False)]
    assert seen["watched"][1]["summary"]["status"] == "ORDER_STATUS_CANCELLED"
    assert seen["refused"] == "INVALID_ARGUMENT"
    assert set(seen["refusedFields"]) == {"customer_id", "lines"}  # BadRequest decoded with googleapis' protos
