"""Composition root of the query service: read engine, change feed and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from orders import db
from orders.config import Settings
from orders.grpc_server import create_server, set_serving
from orders.runtime import configure_logging, stop_event
from orders.v1 import queries_pb2
from query_service.changes import ChangeFeed
from query_service.service import QueryService
from query_service.views import ReadModel

log = logging.getLogger("query_service")
SERVICE = queries_pb2.DESCRIPTOR.services_by_name["QueryService"]


async def serve(settings: Settings) -> None:
    stop = stop_event()
    engine = db.create_engine(settings.read_database_url, settings.db_pool_size, "orders-query")
    read_model = ReadModel(engine)
    feed = ChangeFeed(settings.read_database_url, read_model)
    servicer = QueryService(read_model, feed, settings.read_wait_max, settings.watch_queue_size)
    server, port, health = create_server(
        settings.query_addr,
        SERVICE,
        servicer,
    )
    feed_task = asyncio.create_task(feed.run(), name="change-feed")
    await server.start()
    await set_serving(health, [SERVICE.full_name], True)
    host = settings.query_addr.rpartition(":")[0]
    log.info("QueryService listening on %s:%d", host, port)
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new calls, finishing in-flight ones")
        await set_serving(health, [SERVICE.full_name], False)
        await server.stop(grace=2)
        feed_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await feed_task
        await engine.dispose()


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
