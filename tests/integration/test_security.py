"""TLS and mTLS on the gRPC servers, bearer tokens with scopes, and per-connection and per-call limits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from orders import local_stack, security
from orders.config import ConfigError, Settings
from orders.db import libpq_url
from orders.v1 import commands_pb2, commands_pb2_grpc, common_pb2, queries_pb2, queries_pb2_grpc
from tests.pki import Pki, make_pki
from tests.support import Stack, eventually, new_id, new_sku, scrape_metrics

READER, WRITER, STOCKIST = (f"{role}-{uuid.uuid4().hex}" for role in ("reader", "writer", "stockist"))
TOKENS = f"reader orders:read {READER}; writer orders:write {WRITER}; stockist inventory:write,orders:read {STOCKIST}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def credentials(pki: Pki, *, client: tuple[Path, Path] | None = None) -> grpc.ChannelCredentials:
    key, cert = (client[1].read_bytes(), client[0].read_bytes()) if client else (None, None)
    return grpc.ssl_channel_credentials(pki.ca.read_bytes(), private_key=key, certificate_chain=cert)


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def serving_over(address: str, creds: grpc.ChannelCredentials) -> bool:
    with grpc.secure_channel(address, creds) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def start_secured(
    module: str, settings: Settings, creds: grpc.ChannelCredentials, log_dir: Path
) -> local_stack.ManagedProcess:
    proc = local_stack.start_service(module, settings.to_env(), log_dir)
    address = settings.command_addr if module == "command_service" else settings.query_addr
    try:
        local_stack.wait_until(lambda: proc.alive() and serving_over(address, creds), 60, f"{module} over TLS")
    except BaseException:
        proc.stop()
        raise
    return proc


@pytest.fixture
def secured_query(stack: Stack, pki: Pki, tmp_path: Path) -> Iterator[tuple[Settings, local_stack.ManagedProcess]]:
    settings = replace(
        stack.settings,
        **local_stack.free_addresses(),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        auth="on",
        auth_tokens=TOKENS,
        max_watches_per_connection=2,
        max_call_seconds=1.0,
    )
    proc = start_secured("query_service", settings, credentials(pki), tmp_path)
    yield settings, proc
    proc.stop()


def code_of(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    try:
        result = call(*args, **kwargs)  # type: ignore[operator]
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            next(iter(result))
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_tls_and_tokens_on_the_query_service(
    secured_query: tuple[Settings, local_stack.ManagedProcess], pki: Pki
) -> None:
    settings, proc = secured_query
    request = queries_pb2.ListProductsRequest(page_size=1)
    with grpc.secure_channel(settings.query_addr, credentials(pki)) as channel:
        queries = queries_pb2_grpc.QueryServiceStub(channel)
        assert code_of(queries.ListProducts, request, metadata=bearer(READER), timeout=5) == grpc.StatusCode.OK
        assert code_of(queries.ListProducts, request, timeout=5) == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(queries.ListProducts, request, metadata=bearer("x" * 40), timeout=5) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert code_of(queries.ListProducts, request, metadata=bearer(WRITER), timeout=5) == (
            grpc.StatusCode.PERMISSION_DENIED
        )
        watch = queries_pb2.WatchOrderSummariesRequest(customer_id="nobody")
        assert code_of(queries.WatchOrderSummaries, watch, timeout=5) == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # open without a token
        assert "orders.v1.QueryService" in ProtoReflectionDescriptorDatabase(channel).get_services()  # open too
    with grpc.insecure_channel(settings.query_addr) as plaintext:
        assert code_of(queries_pb2_grpc.QueryServiceStub(plaintext).ListProducts, request, timeout=5) == (
            grpc.StatusCode.UNAVAILABLE
        )

    env = {**os.environ, **settings.to_env(), "ORDERS_CLIENT_CA_FILE": str(pki.ca), "ORDERS_CLIENT_TOKEN": READER}
    cli = subprocess.run(
        [sys.executable, "-m", "orders.cli", "list-products", "--page-size", "1", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert cli.returncode == 0, cli.stderr
    assert "products" in json.loads(cli.stdout)
    log = proc.log_path.read_text()
    assert "refused /orders.v1.QueryService/ListProducts" in log
    assert all(secret not in log for secret in (READER, WRITER, STOCKIST, "x" * 40))


def test_watches_per_connection_and_the_server_side_call_deadline(
    stack: Stack, secured_query: tuple[Settings, local_stack.ManagedProcess], pki: Pki
) -> None:
    settings, _ = secured_query
    watch = queries_pb2.WatchOrderSummariesRequest(customer_id=f"limits-{new_id()}")
    with grpc.secure_channel(settings.query_addr, credentials(pki)) as channel:
        queries = queries_pb2_grpc.QueryServiceStub(channel)
        open_streams = [queries.WatchOrderSummaries(watch, metadata=bearer(READER), timeout=30) for _ in range(2)]
        streams = "orders_query_watch_streams"
        eventually(lambda: scrape_metrics(settings.query_metrics_addr)[streams] == 2, 10, "two watches open")
        third = code_of(queries.WatchOrderSummaries, watch, metadata=bearer(READER), timeout=5)
        assert third == grpc.StatusCode.RESOURCE_EXHAUSTED
        with grpc.secure_channel(
            settings.query_addr, credentials(pki), options=[("grpc.use_local_subchannel_pool", 1)]
        ) as another:
            extra = queries_pb2_grpc.QueryServiceStub(another).WatchOrderSummaries(
                watch, metadata=bearer(READER), timeout=2
            )
            with pytest.raises(grpc.RpcError) as idle:
                next(extra)
            assert idle.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # accepted; nothing to send
        for stream in open_streams:
            stream.cancel()

        order_id = str(uuid.uuid4())
        with psycopg.connect(libpq_url(settings.read_database_url)) as blocker:
            blocker.execute("LOCK TABLE order_summaries IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(grpc.RpcError) as late:  # no client deadline: the server's 1 s applies
                queries.GetOrderSummary(queries_pb2.GetOrderSummaryRequest(order_id=order_id), metadata=bearer(READER))
            blocker.rollback()
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "server's limit of 1s" in (late.value.details() or "")


def test_mtls_and_scopes_on_the_command_service(stack: Stack, pki: Pki, tmp_path: Path) -> None:
    settings = replace(
        stack.settings,
        **local_stack.free_addresses(),
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca),
        auth="on",
        auth_tokens=TOKENS,
    )
    trusted = credentials(pki, client=(pki.client_cert, pki.client_key))
    proc = start_secured("command_service", settings, trusted, tmp_path)
    sku = new_sku("S")
    try:
        with grpc.secure_channel(settings.command_addr, trusted) as channel:
            commands = commands_pb2_grpc.CommandServiceStub(channel)
            upsert = commands_pb2.UpsertProductRequest(
                request_id=new_id(), sku=sku, name="secured", unit_price=common_pb2.Money(currency_code="EUR")
            )
            assert code_of(commands.UpsertProduct, upsert, metadata=bearer(WRITER), timeout=5) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            assert code_of(commands.UpsertProduct, upsert, metadata=bearer(STOCKIST), timeout=5) == grpc.StatusCode.OK
            place = commands_pb2.PlaceOrderRequest(
                request_id=new_id(), customer_id="c", lines=[commands_pb2.PlaceOrderLine(sku=sku, quantity=1)]
            )
            assert code_of(commands.PlaceOrder, place, metadata=bearer(READER), timeout=5) == (
                grpc.StatusCode.PERMISSION_DENIED
            )
            assert code_of(commands.PlaceOrder, place, timeout=5) == grpc.StatusCode.UNAUTHENTICATED
        with psycopg.connect(libpq_url(settings.write_database_url)) as conn:
            refused = conn.execute("SELECT count(*) FROM idempotency_keys WHERE request_id = %s", (place.request_id,))
            assert refused.fetchone() == (0,)  # the refused command wrote nothing
        for creds in (credentials(pki), credentials(pki, client=(pki.stranger_cert, pki.stranger_key))):
            with grpc.secure_channel(settings.command_addr, creds) as channel:
                stub = commands_pb2_grpc.CommandServiceStub(channel)
                assert code_of(stub.UpsertProduct, upsert, metadata=bearer(STOCKIST), timeout=5) == (
                    grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no (trusted) client certificate
                )
    finally:
        proc.stop()


def test_token_configuration_is_checked(stack: Stack, tmp_path: Path) -> None:
    base = replace(stack.settings, auth="on")
    with pytest.raises(ConfigError, match="no tokens are configured"):
        security.load_tokens(base)
    with pytest.raises(ConfigError, match="unknown scope"):
        security.load_tokens(replace(base, auth_tokens=f"x orders:delete {READER}"))
    with pytest.raises(ConfigError, match="at least 24 characters"):
        security.load_tokens(replace(base, auth_tokens="x orders:read short"))
    with pytest.raises(ConfigError, match="the same token appears twice"):
        security.load_tokens(replace(base, auth_tokens=f"a orders:read {READER}; b admin {READER}"))
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# name scopes token\nops admin,orders:read {'o' * 30}\n")
    tokens = security.load_tokens(replace(base, auth_tokens=TOKENS, auth_tokens_file=str(token_file)))
    assert tokens is not None and [t.name for t in tokens] == ["reader", "writer", "stockist", "ops"]
    assert tokens[3].scopes == {"admin", "orders:read"} and "o" * 30 not in repr(tokens)
    assert security.required_scope("/orders.v1.AdminService/ListDeadLetters") == "admin"
    assert security.required_scope("/grpc.health.v1.Health/Check") is None
    assert "authentication is OFF" in (stack.log_dir / "command_service.log").read_text()
