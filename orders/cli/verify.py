"""`orders verify`: the read model against the write database (and with --stream, the event stream)."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from orders import jetstream
from orders.cli.reach import hint, origin, refuse, unreachable_database
from orders.config import Settings, masked
from orders.verification import StreamUnreadable, verify, verify_stream

EXIT_DIFFERENCES = 1


VERIFY_EXIT_STATUS = (
    "exit status: 0 when nothing differs, 1 when differences were found, 2 on a usage or configuration error, "
    "3 when a database or NATS could not be reached (one line on stderr names what was tried)"
)


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Compare the databases directly (works with the projector stopped); with --stream, also read the
    event stream and check that every event is in it once."""
    problem = unreachable_database(args, settings)
    if problem:
        return refuse(problem)
    report = asyncio.run(verify(settings.write_database_url, settings.read_database_url))
    stream = None
    if args.stream:
        try:
            stream = asyncio.run(_verify_stream(settings))
        except _NatsUnreachable as exc:
            return refuse(
                f"cannot reach NATS at {masked('nats_url', settings.nats_url)} ({origin(args, 'nats_url')}): "
                f"{exc}{hint(args)}"
            )
    differences = report.differences + (stream.differences if stream else [])
    if args.json:
        result: dict[str, Any] = {
            "orders_checked": report.orders_checked,
            "products_checked": report.products_checked,
            "differences": differences,
        }
        if stream:
            result["stream"] = {"messages": stream.messages, "undecodable": stream.undecodable}
        print(json.dumps(result))
    else:
        for line in differences[:100]:
            print(line)
        if stream:
            print(f"stream {settings.stream}: {stream.messages} messages, {len(stream.undecodable)} undecodable")
        print(
            f"checked {report.orders_checked} orders and {report.products_checked} products: "
            f"{len(differences)} differences"
        )
    return 0 if not differences else EXIT_DIFFERENCES


class _NatsUnreachable(Exception):
    """The first connection to NATS failed (the message says how)."""


async def _verify_stream(settings: Settings) -> Any:
    try:
        nc = await jetstream.connect(settings, "orders-verify", retry_forever=False)
    except Exception as exc:  # nats-py raises several unrelated types for an unreachable server
        raise _NatsUnreachable(f"{type(exc).__name__}: {exc}") from None
    try:
        return await verify_stream(nc, settings.stream)
    except StreamUnreadable as exc:
        raise _NatsUnreachable(str(exc)) from None
    finally:
        await jetstream.close(nc)
