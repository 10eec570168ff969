"""Process life cycle shared by the three services: logging set-up and graceful shutdown on signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

from orders import tracing
from orders import workers as orders_workers
from orders.config import ConfigError, Settings, variable
from orders.correlation import CORRELATION_ID, TRACEPARENT
from orders.migrations import NotMigrated

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(correlation_id)s]: %(message)s"


class ContextFilter(logging.Filter):
    """Give every record the current correlation id and traceparent (unless the call passed its own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "correlation_id", ""):
            record.correlation_id = CORRELATION_ID.get() or "-"
        if not getattr(record, "traceparent", ""):
            record.traceparent = TRACEPARENT.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, correlation_id, traceparent, exception, and
    correlation_ids on lines about many calls' work (the projector's applied batches)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", "-"),
        }
        traceparent = getattr(record, "traceparent", "")
        if traceparent:
            entry["traceparent"] = traceparent
        correlation_ids = getattr(record, "correlation_ids", None)
        if correlation_ids is not None:
            entry["correlation_ids"] = correlation_ids
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class Throttle:
    """Let one event through per interval (a log line, say), and count those held back meanwhile."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._next = -math.inf
        self._held = 0

    def allow(self) -> int | None:
        """None when this one is held back; otherwise how many were held back since the last one allowed."""
        now = self._clock()
        if now < self._next:
            self._held += 1
            return None
        self._next = now + self._interval
        held, self._held = self._held, 0
        return held


def configure_logging(level: str, log_format: str = "auto", stream: TextIO | None = None) -> None:
    """Log to stderr: JSON lines ("json"), or readable text ("text"); "auto" picks text on a terminal."""
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if log_format == "text" or (log_format == "auto" and stream.isatty()):
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


@dataclass(frozen=True)
class Workers:
    """How a service runs as several worker processes: its module and the settings naming its addresses."""

    module: str
    address: str  # the Settings field of the gRPC address the workers share
    metrics_address: str  # the Settings field of the metrics address (the supervisor's)


def run_service(
    serve: Callable[[Settings], Coroutine[Any, Any, None]], name: str, workers: Workers | None = None
) -> None:
    """A service's main(): settings from the environment (exit 2 naming a bad variable), logging,
    tracing (when configured), run; name is the service name in traces. A service that can run as
    workers does so (as their supervisor, see orders.workers) when ORDERS_WORKERS asks for more than one."""
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    count = settings.workers or orders_workers.available_cores()
    if workers is not None and count > 1 and orders_workers.worker_index() is None:
        if getattr(settings, workers.address).endswith(":0"):
            print(f"configuration error: {count} workers need a fixed port in {variable(workers.address)}")
            raise SystemExit(2)
        code = orders_workers.supervise(
            workers.module, count, variable(workers.metrics_address), getattr(settings, workers.metrics_address)
        )
        raise SystemExit(code)
    raise_open_files_limit()
    tracing.setup(name)
    try:
        asyncio.run(serve(settings))
    except NotMigrated as exc:
        logging.getLogger("orders").error("not starting: %s", exc)
        raise SystemExit(1) from None
    except ConfigError as exc:
        logging.getLogger("orders").error("configuration error: %s", exc)
        raise SystemExit(2) from None
    finally:
        tracing.shutdown()


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (every client connection holds one;
    container runtimes often start processes at a soft 1024); returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    if soft < 4096:
        logging.getLogger("orders").warning("at most %d open files: as many client connections at the most", soft)
    return soft


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so a service can stop accepting and finish in-flight work; in a
    supervised worker also once its supervisor is gone."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    if orders_workers.worker_index() is not None:
        parent = os.getppid()

        async def watch_parent() -> None:
            while not orders_workers.supervisor_gone(parent):
                await asyncio.sleep(orders_workers.PARENT_CHECK_SECONDS)
            logging.getLogger("orders").warning("the supervisor (pid %d) is gone; stopping", parent)
            event.set()

        _background.add(loop.create_task(watch_parent(), name="watch-supervisor"))
    return event


_background: set[asyncio.Task[None]] = set()  # tasks kept alive for the process's life
