"""Settings of every process, read from ORDERS_* environment variables and validated at start-up."""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


class ConfigError(ValueError):
    """A setting is missing or malformed; the message names the variable."""


PREFIX = "ORDERS_"


def _parse_address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("expected HOST:PORT")
    return value


def _parse_url(*schemes: str):  # type: ignore[no-untyped-def]
    def parse(value: str) -> str:
        if not value.startswith(tuple(f"{s}://" for s in schemes)):
            raise ValueError(f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return value

    return parse


def _parse_urls(*schemes: str):  # type: ignore[no-untyped-def]
    parse_one = _parse_url(*schemes)
    return lambda value: ",".join(parse_one(part.strip()) for part in value.split(","))


def _parse_bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_positive_float(value: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def _parse_positive_int(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise ValueError("must be greater than zero")
    return number


def _parse_non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must be zero or more")
    return number


def _parse_schedule(value: str) -> tuple[float, ...]:
    delays = tuple(float(part) for part in value.split(","))
    if not delays or any(d < 0 for d in delays):
        raise ValueError("expected comma-separated non-negative seconds, e.g. 0.5,1,2,5")
    return delays


def _parse_choice(*choices: str):  # type: ignore[no-untyped-def]
    def parse(value: str) -> str:
        for choice in choices:
            if value.lower() == choice.lower():
                return choice
        raise ValueError(f"expected one of {', '.join(choices)}")

    return parse


def _parse_origins(value: str) -> tuple[str, ...]:
    origins = tuple(part.strip().rstrip("/") for part in value.split(",") if part.strip())
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], or *)")
    return origins


def _setting(default: Any, parse: Any, doc: str, *, secret: bool = False) -> Any:
    return field(default=default, metadata={"parse": parse, "doc": doc, "secret": secret})


@dataclass(frozen=True)
class Settings:
    """Every setting of every process; each field is read from ORDERS_<FIELD NAME IN UPPER CASE>."""

    write_database_url: str = _setting(
        "postgresql://postgres@127.0.0.1:5432/orders_write",
        _parse_url("postgresql", "postgres"),
        "Write database (source of truth) used by the command service.",
    )
    read_database_url: str = _setting(
        "postgresql://postgres@127.0.0.1:5432/orders_read",
        _parse_url("postgresql", "postgres"),
        "Read database written by the projector and read by the query service.",
    )
    query_database_url: str = _setting(
        "",
        _parse_url("postgresql", "postgres"),
        "Read database as the query service connects to it (a role that may only SELECT); empty: the read URL.",
    )
    nats_url: str = _setting(
        "nats://127.0.0.1:4222",
        _parse_urls("nats", "tls"),
        "NATS server URL, or comma-separated URLs of several cluster nodes (tried in turn).",
    )
    command_db_password: str = _setting(
        "", str, "`orders create-roles`: password of the orders_command role.", secret=True
    )
    projector_db_password: str = _setting(
        "", str, "`orders create-roles`: password of the orders_projector role.", secret=True
    )
    query_db_password: str = _setting("", str, "`orders create-roles`: password of the orders_query role.", secret=True)
    nats_ping_interval: float = _setting(
        3.0,
        _parse_positive_float,
        "Seconds between the NATS client's PINGs to its server (liveness of the connection).",
    )
    nats_max_outstanding_pings: int = _setting(
        2, _parse_positive_int, "Unanswered NATS PINGs after which the connection counts as dead and is replaced."
    )
    nats_user: str = _setting("", str, "NATS user name (with ORDERS_NATS_PASSWORD).")
    nats_password: str = _setting("", str, "NATS password.", secret=True)
    nats_creds_file: str = _setting("", str, "NATS credentials file (JWT and nkey seed), instead of user/password.")
    command_addr: str = _setting("127.0.0.1:50051", _parse_address, "CommandService listen address.")
    query_addr: str = _setting("127.0.0.1:50052", _parse_address, "QueryService listen address.")
    command_metrics_addr: str = _setting(
        "127.0.0.1:9101", _parse_address, "Command service Prometheus metrics (HTTP /metrics) listen address."
    )
    query_metrics_addr: str = _setting(
        "127.0.0.1:9102", _parse_address, "Query service Prometheus metrics (HTTP /metrics) listen address."
    )
    projector_metrics_addr: str = _setting(
        "127.0.0.1:9103", _parse_address, "Projector Prometheus metrics (HTTP /metrics) listen address."
    )
    admin_addr: str = _setting(
        "127.0.0.1:50053", _parse_address, "AdminService (projector operations and health) listen address."
    )
    gateway_addr: str = _setting(
        "127.0.0.1:8080", _parse_address, "HTTP listen address of the gateway (Connect/JSON API and console)."
    )
    gateway_cors_origins: tuple[str, ...] = _setting(
        (),
        _parse_origins,
        "Comma-separated browser origins allowed to call the gateway (CORS), e.g. https://shop.example; "
        "empty: none (same origin only).",
    )
    stream: str = _setting("ORDERS_EVENTS", str, "JetStream stream holding the events.")
    stream_replicas: int = _setting(1, _parse_positive_int, "Replicas of the stream (3 in a cluster).")
    duplicate_window: float = _setting(
        120.0, _parse_positive_float, "Stream deduplication window in seconds (Nats-Msg-Id)."
    )
    consumer: str = _setting(
        "orders-projector",
        str,
        "Durable consumer name of the projector (of partition i: <name>-p<i>, with ORDERS_PARTITIONS).",
    )
    partitions: int = _setting(
        0,
        _parse_non_negative_int,
        "Partitions of the event stream, each consumed by one projector: 0 = none (every projector shares "
        "one consumer). All services must agree; see the README on changing it.",
    )
    partition: int = _setting(0, _parse_non_negative_int, "The partition this projector consumes (0 to PARTITIONS-1).")
    place_order_group_max: int = _setting(
        64,
        _parse_positive_int,
        "Most PlaceOrders that share one transaction (those arriving while one is in flight; 1: each alone).",
    )
    relay_batch: int = _setting(256, _parse_positive_int, "Outbox rows published per relay round.")
    relay_atomic_min: int = _setting(
        16,
        _parse_positive_int,
        "Rows from which a relay round goes out as one atomic batch (fewer: event by event, lower latency).",
    )
    relay_poll_interval: float = _setting(
        1.0, _parse_positive_float, "Seconds between outbox polls when no commit wakes the relay."
    )
    projector_batch: int = _setting(256, _parse_positive_int, "Events fetched and applied per transaction.")
    ack_wait: float = _setting(
        5.0, _parse_positive_float, "Seconds before an unacked event is redelivered (a batch still applying renews it)."
    )
    publish_timeout: float = _setting(
        2.0, _parse_positive_float, "Seconds the relay waits for a PubAck; then the publish counts as failed, retried."
    )
    max_deliver: int = _setting(
        20,
        _parse_positive_int,
        "Deliveries after which a failing event, or one missing a predecessor the stream lacks, is dead-lettered.",
    )
    retry_backoff: tuple[float, ...] = _setting(
        (0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
        _parse_schedule,
        "Comma-separated delays (s) before retry N of an event (nak with delay); the last one repeats.",
    )
    change_retention: float = _setting(
        86400.0, _parse_positive_float, "Seconds order changes are kept for watch streams that resume."
    )
    lag_alert_events: int = _setting(
        1000, _parse_positive_int, "Projection lag (events) above which the query side reports it as lagging."
    )
    lag_alert_seconds: float = _setting(
        30.0, _parse_positive_float, "Projection lag (s), or age of the last lag report, that counts as lagging."
    )
    read_wait_max: float = _setting(
        5.0, _parse_positive_float, "Longest a query waits for a consistency token to be projected (s)."
    )
    watch_queue_size: int = _setting(
        1000, _parse_positive_int, "Changes buffered per watch stream before a slow watcher is cut off."
    )
    watch_write_timeout: float = _setting(
        10.0,
        _parse_positive_float,
        "Seconds one watch message may wait on a client that does not read before its stream is cut off.",
    )
    keepalive_time: float = _setting(
        30.0, _parse_positive_float, "Seconds between the HTTP/2 keepalive pings each gRPC server sends a client."
    )
    keepalive_timeout: float = _setting(
        10.0, _parse_positive_float, "Seconds a client has to answer a keepalive ping before it is disconnected."
    )
    db_pool_size: int = _setting(10, _parse_positive_int, "Database connections per process (per worker).")
    workers: int = _setting(
        0,
        _parse_non_negative_int,
        "Worker processes of the command and query services, sharing each service's port; 0: one per core.",
    )
    tls_cert_file: str = _setting("", str, "PEM certificate chain of the gRPC servers; set with the key to serve TLS.")
    tls_key_file: str = _setting("", str, "PEM private key of the gRPC servers.")
    tls_client_ca_file: str = _setting(
        "", str, "PEM CA certificates; when set, the servers require client certificates signed by them (mTLS)."
    )
    auth: str = _setting(
        "on", _parse_choice("on", "off"), "Bearer-token authentication; off only for local use (a warning is logged)."
    )
    auth_tokens_file: str = _setting(
        "", str, "File of tokens, one per line: NAME SCOPE[,SCOPE...] TOKEN (scopes: see README)."
    )
    auth_tokens: str = _setting("", str, "Tokens inline, same format as the file, lines separated by ';'.", secret=True)
    auth_open_health: bool = _setting(True, _parse_bool, "Health and reflection answer without a token.")
    client_ca_file: str = _setting("", str, "CLI: PEM CA certificates to verify the servers (turns TLS on).")
    client_cert_file: str = _setting("", str, "CLI: PEM client certificate for mTLS.")
    client_key_file: str = _setting("", str, "CLI: PEM client key for mTLS.")
    client_token: str = _setting("", str, "CLI: bearer token sent with every call.", secret=True)
    max_watches_per_connection: int = _setting(
        100, _parse_positive_int, "Open WatchOrderSummaries streams allowed per client connection."
    )
    max_call_seconds: float = _setting(
        30.0, _parse_positive_float, "Server-side deadline of unary calls (a shorter client deadline wins)."
    )
    log_level: str = _setting(
        "INFO", _parse_choice("DEBUG", "INFO", "WARNING", "ERROR"), "Log level: DEBUG, INFO, WARNING or ERROR."
    )
    log_format: str = _setting(
        "auto", _parse_choice("auto", "json", "text"), "Log lines as json, text, or auto (text on a terminal)."
    )
    data_dir: str = _setting(
        ".orders-data",
        str,
        "Directory of `orders up` (data, logs, endpoints file); CLI commands find a stack running there.",
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from the environment; raise ConfigError naming the first bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            name = PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw)
            except ValueError as exc:
                raise ConfigError(f"{name}={raw!r} is invalid: {exc}") from None
        settings = cls(**values)
        if bool(settings.tls_cert_file) != bool(settings.tls_key_file):
            raise ConfigError(f"{PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE must be set together")
        if settings.tls_client_ca_file and not settings.tls_cert_file:
            raise ConfigError(f"{PREFIX}TLS_CLIENT_CA_FILE (mTLS) needs {PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE")
        if settings.partitions and settings.partition >= settings.partitions:
            raise ConfigError(f"{PREFIX}PARTITION must be below {PREFIX}PARTITIONS ({settings.partitions})")
        if bool(settings.client_cert_file) != bool(settings.client_key_file):
            raise ConfigError(f"{PREFIX}CLIENT_CERT_FILE and {PREFIX}CLIENT_KEY_FILE must be set together")
        return settings

    @property
    def query_database(self) -> str:
        """The URL the query service reads with."""
        return self.query_database_url or self.read_database_url

    def to_env(self) -> dict[str, str]:
        """The ORDERS_* variables that reproduce these settings in a child process."""
        return {PREFIX + f.name.upper(): _render(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _render(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def variable(name: str) -> str:
    """The environment variable of a settings field."""
    return PREFIX + name.upper()


def load(
    environ: Mapping[str, str] | None = None, fallbacks: Sequence[tuple[str, Mapping[str, str]]] = ()
) -> tuple[Settings, dict[str, str]]:
    """Settings from environ (default: os.environ), else from each fallback (a label and ORDERS_* values)
    in turn, else the defaults; and for each field where its value came from ("environment", the
    fallback's label, or "default"). Raises ConfigError like Settings.from_env."""
    env = os.environ if environ is None else environ
    chosen: dict[str, str] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(Settings):
        name = variable(f.name)
        for label, values in (("environment", env), *fallbacks):
            if values.get(name):
                chosen[name], sources[f.name] = values[name], label
                break
        else:
            sources[f.name] = "default"
    return Settings.from_env(chosen), sources


_URL_PASSWORD = re.compile(r"(://[^:/@\s,]+:)[^@/\s,]+@")


def masked(name: str, value: Any) -> str:
    """A field's value as it may be shown: secrets as ********, passwords in URLs as ****."""
    rendered = _render(value)
    if rendered and Settings.__dataclass_fields__[name].metadata["secret"]:
        return "********"
    return _URL_PASSWORD.sub(r"\1****@", rendered)


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, meaning) for every setting, for the CLI and the README."""
    return [(variable(f.name), _render(f.default), f.metadata["doc"]) for f in dataclasses.fields(Settings)]
