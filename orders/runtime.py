"""Process life cycle shared by the three services: logging set-up and graceful shutdown on signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def stop_event() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so a service can stop accepting and finish in-flight work."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
