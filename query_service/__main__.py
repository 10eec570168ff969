"""Composition root of the query service: read engine, change feed and gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import sqlalchemy as sa
from prometheus_client import Gauge

from orders import db, migrations
from orders.config import Settings
from orders.grpc_server import create_server, set_serving
from orders.metrics import PROJECTION_LAG_EVENTS, PROJECTION_LAG_SECONDS, serve_metrics
from orders.read_model import projection_checkpoints
from orders.runtime import run_service, stop_event
from orders.v1 import queries_pb2
from query_service.changes import ChangeFeed
from query_service.service import QueryService
from query_service.views import ReadModel

log = logging.getLogger("query_service")
SERVICE = queries_pb2.DESCRIPTOR.services_by_name["QueryService"]


PROJECTION_HEALTH = "projection"  # health service name: NOT_SERVING while the projection lags
PROJECTION_CHECK_INTERVAL = 2.0


LAGGING = Gauge("orders_projection_lagging", "1 while the projection counts as lagging")


async def watch_projection(engine: db.AsyncEngine, settings: Settings, health: object) -> None:
    """Report the projection as lagging when the projector's last lag report is too high or too old."""
    serving: bool | None = None
    while True:
        row = None
        try:
            async with engine.connect() as conn:
                row = (
                    await conn.execute(
                        sa.select(
                            projection_checkpoints.c.lag_events,
                            projection_checkpoints.c.lag_seconds,
                            sa.func.extract("epoch", sa.func.now() - projection_checkpoints.c.lag_measured_at),
                        )
                    )
                ).first()
            ok = (
                row is not None
                and row[0] is not None
                and row[0] <= settings.lag_alert_events
                and row[1] <= settings.lag_alert_seconds
                and float(row[2]) <= settings.lag_alert_seconds
            )
        except Exception as exc:
            log.debug("projection status unavailable: %s", exc)
            ok = False
        if row is not None and row[0] is not None:
            PROJECTION_LAG_EVENTS.set(row[0])
            PROJECTION_LAG_SECONDS.set(row[1] or 0.0)
        LAGGING.set(0 if ok else 1)
        if ok != serving:
            if not ok:
                log.warning("projection is lagging or not reporting (lag events, seconds, report age: %s)", row)
            await set_serving(health, [PROJECTION_HEALTH], ok, overall=False)  # type: ignore[arg-type]
            serving = ok
        await asyncio.sleep(PROJECTION_CHECK_INTERVAL)


async def serve(settings: Settings) -> None:
    await asyncio.to_thread(migrations.require_current, settings.read_database_url, migrations.READ, "read")
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
    metrics_port = serve_metrics(settings.query_metrics_addr)
    Gauge("orders_query_watch_streams", "Open WatchOrderSummaries streams").set_function(lambda: feed.active_watches)
    projection_task = asyncio.create_task(watch_projection(engine, settings, health), name="projection-health")
    await server.start()
    await set_serving(health, [SERVICE.full_name], True)
    host = settings.query_addr.rpartition(":")[0]
    log.info("QueryService listening on %s:%d; metrics on port %d", host, port, metrics_port)
    try:
        await stop.wait()
    finally:
        log.info("stopping: no new calls, finishing in-flight ones")
        await set_serving(health, [SERVICE.full_name], False)
        await server.stop(grace=2)
        for task in (feed_task, projection_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await engine.dispose()


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
