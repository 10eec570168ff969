"""Who may call what: TLS for the gRPC servers, bearer tokens with scopes, and the client side of both.

Tokens come from ORDERS_AUTH_TOKENS_FILE and/or ORDERS_AUTH_TOKENS, one per line (';' also separates
lines inline): `NAME SCOPE[,SCOPE...] TOKEN`. Only SHA-256 digests of the tokens are kept, compared
in constant time against every known token; tokens never reach a log line. Each RPC needs one scope
(REQUIRED_SCOPES); health and reflection stay open unless ORDERS_AUTH_OPEN_HEALTH=false.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from orders import metrics
from orders.config import PREFIX, ConfigError, Settings
from orders.runtime import Throttle

log = logging.getLogger(__name__)

SCOPES = ("orders:read", "orders:write", "inventory:write", "admin")
REQUIRED_SCOPES = {
    "orders.v1.CommandService/PlaceOrder": "orders:write",
    "orders.v1.CommandService/CancelOrder": "orders:write",
    "orders.v1.CommandService/UpdateInventory": "inventory:write",
    "orders.v1.CommandService/UpsertProduct": "inventory:write",
    "orders.v1.QueryService": "orders:read",  # every method of the service
    "orders.v1.AdminService": "admin",
}
OPEN_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
MIN_TOKEN_LENGTH = 24
REFUSAL_LOG_INTERVAL = 10.0  # seconds between log lines about refused calls (the rest are counted)


@dataclass(frozen=True)
class Token:
    name: str
    scopes: frozenset[str]
    digest: bytes  # SHA-256 of the token


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_tokens(text: str, source: str) -> list[Token]:
    """Tokens from NAME SCOPES TOKEN lines; ConfigError naming source and line for anything malformed."""
    tokens: list[Token] = []
    for number, raw in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise ConfigError(f"{source} line {number}: expected NAME SCOPE[,SCOPE...] TOKEN")
        name, scopes, secret = parts
        unknown = set(scopes.split(",")) - set(SCOPES)
        if unknown:
            raise ConfigError(f"{source} line {number}: unknown scope(s) {', '.join(sorted(unknown))}")
        if len(secret) < MIN_TOKEN_LENGTH:
            raise ConfigError(
                f"{source} line {number} ({name}): tokens must have at least {MIN_TOKEN_LENGTH} characters"
            )
        tokens.append(Token(name, frozenset(scopes.split(",")), _digest(secret)))
    if len({t.digest for t in tokens}) != len(tokens):
        raise ConfigError(f"{source}: the same token appears twice")
    return tokens


def load_tokens(settings: Settings) -> list[Token] | None:
    """The configured tokens, or None when authentication is off (logged as a warning)."""
    if settings.auth == "off":
        log.warning("authentication is OFF (%sAUTH=off): every caller may call every RPC; use only locally", PREFIX)
        return None
    tokens = parse_tokens(settings.auth_tokens, f"{PREFIX}AUTH_TOKENS")
    if settings.auth_tokens_file:
        try:
            text = Path(settings.auth_tokens_file).read_text()
        except OSError as exc:
            raise ConfigError(f"{PREFIX}AUTH_TOKENS_FILE={settings.auth_tokens_file!r} cannot be read: {exc}") from None
        tokens += parse_tokens(text, settings.auth_tokens_file)
    if not tokens:
        raise ConfigError(
            f"{PREFIX}AUTH is on but no tokens are configured: set {PREFIX}AUTH_TOKENS_FILE or {PREFIX}AUTH_TOKENS "
            f"(or {PREFIX}AUTH=off for local use)"
        )
    return tokens


def required_scope(method: str) -> str | None:
    """The scope a full method name (/package.Service/Method) needs; None for the open services."""
    path = method.lstrip("/")
    service = path.partition("/")[0]
    if service in OPEN_SERVICES:
        return None
    return REQUIRED_SCOPES.get(path) or REQUIRED_SCOPES.get(service) or "admin"


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks `authorization: Bearer <token>` before any handler runs, so a refused call changes nothing."""

    def __init__(self, tokens: Sequence[Token], open_health: bool) -> None:
        self._tokens = list(tokens)
        self._open_health = open_health
        self._refusals_logged = Throttle(REFUSAL_LOG_INTERVAL)

    def _find(self, presented: str) -> Token | None:
        digest = _digest(presented)
        found = None
        for token in self._tokens:  # no early exit: the time taken does not depend on which token matched
            if hmac.compare_digest(token.digest, digest):
                found = token
        return found

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        scope = required_scope(details.method)
        if scope is None and self._open_health:
            return await continuation(details)
        presented = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str) and value[:7].lower() == "bearer ":
                presented = value[7:].strip()
        token = self._find(presented) if presented else None
        handler = await continuation(details)
        if token is None:
            return self._refuse(
                handler, details.method, grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token"
            )
        if scope is not None and scope not in token.scopes:
            reason = f"the token {token.name!r} lacks the scope {scope!r}"
            return self._refuse(handler, details.method, grpc.StatusCode.PERMISSION_DENIED, reason)
        return handler

    def _refuse(self, handler: Any, method: str, code: grpc.StatusCode, reason: str) -> Any:
        """Count and (at most every REFUSAL_LOG_INTERVAL seconds) log a refusal; the refusing handler.

        The method name is the caller's choice: only methods the server has become a metric label
        (the rest share "unknown"), and log lines are throttled, so that a flood of refused calls
        costs neither memory nor disk beyond a constant.
        """
        service, _, name = method.lstrip("/").rpartition("/")
        if handler is None:
            service, name = "unknown", "unknown"
        metrics.RPCS.labels(service.rpartition(".")[2], name, code.name).inc()
        skipped = self._refusals_logged.allow()
        if skipped is not None:
            also = f" ({skipped} more refused since the last such line)" if skipped else ""
            shown = "".join(c if c.isprintable() else "?" for c in method[:200])
            log.warning("refused %s: %s%s", shown, reason, also)
        return _refusal(handler, code, reason)


def _refusal(handler: Any, code: grpc.StatusCode, reason: str) -> Any:
    """A handler of the same shape as handler that answers code without running anything."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, reason)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, reason)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:  # unknown method: refuse rather than reveal that it does not exist
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, request_deserializer=handler.request_deserializer)
    return grpc.unary_unary_rpc_method_handler(refuse, request_deserializer=handler.request_deserializer)


def _read(path: str, variable: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{PREFIX}{variable}={path!r} cannot be read: {exc}") from None


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (and with a client CA, mTLS) credentials for the servers; None for plaintext."""
    if not settings.tls_cert_file:
        return None
    key = _read(settings.tls_key_file, "TLS_KEY_FILE")
    chain = _read(settings.tls_cert_file, "TLS_CERT_FILE")
    client_ca = _read(settings.tls_client_ca_file, "TLS_CLIENT_CA_FILE") if settings.tls_client_ca_file else None
    return grpc.ssl_server_credentials([(key, chain)], root_certificates=client_ca, require_client_auth=bool(client_ca))


def client_channel(address: str, settings: Settings, *, aio: bool = False, own_connection: bool = False) -> Any:
    """A channel to one of the servers as the CLI configures it: TLS when a CA or client certificate is set.

    own_connection: a TCP connection of its own (gRPC otherwise shares one among a process's channels to
    the same address), so that several channels reach several workers of a service."""
    options = [("grpc.use_local_subchannel_pool", 1)] if own_connection else None
    if not (settings.client_ca_file or settings.client_cert_file):
        if aio:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.client_ca_file, "CLIENT_CA_FILE") if settings.client_ca_file else None,
        private_key=_read(settings.client_key_file, "CLIENT_KEY_FILE") if settings.client_key_file else None,
        certificate_chain=_read(settings.client_cert_file, "CLIENT_CERT_FILE") if settings.client_cert_file else None,
    )
    if aio:
        return grpc.aio.secure_channel(address, credentials, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def call_metadata(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The metadata every CLI call carries: the bearer token, when one is set."""
    return (("authorization", f"Bearer {settings.client_token}"),) if settings.client_token else ()
