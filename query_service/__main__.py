"""Composition root of the query service: read engine, change feed and gRPC server."""

from __future__ import annotations

import asyncio
import logging

import sqlalchemy as sa
from prometheus_client import Gauge
from psycopg_pool import AsyncConnectionPool

from orders import db, migrations, readiness, workers
from orders.config import Settings
from orders.grpc_server import create_server, set_serving
from orders.metrics import serve_metrics, set_projection_lag
from orders.read_model import projection_checkpoints, projection_names
from orders.runtime import Workers, run_service, stop_event
from orders.v1 import queries_pb2
from orders.waits import cancel_and_wait
from query_service.changes import ChangeFeed
from query_service.service import QueryService
from query_service.views import ReadModel, create_pool

log = logging.getLogger("query_service")
SERVICE = queries_pb2.DESCRIPTOR.services_by_name["QueryService"]


POOL_WAIT_SECONDS = 5.0  # a call waits this long at most for a read connection, then UNAVAILABLE
PROJECTION_HEALTH = "projection"  # health service name: NOT_SERVING while the projection lags


LAGGING = Gauge("orders_projection_lagging", "1 while the projection counts as lagging")


class ProjectionProbe:
    """Lagging when the projector's last lag report is too high or too old, or when this query service's
    read replica has not replayed what the projector announced for longer than the alert threshold;
    also updates the gauges."""

    def __init__(self, engine: db.AsyncEngine, settings: Settings, feed: ChangeFeed) -> None:
        self._engine, self._settings, self._feed = engine, settings, feed

    async def __call__(self) -> str | None:
        replica = self._feed.replica_lag_seconds
        if replica > self._settings.lag_alert_seconds:
            LAGGING.set(1)
            return f"the read replica lags {self._feed.replica_lag_bytes} bytes / {replica:.1f}s behind the projector"
        expected = projection_names(self._settings.partitions)
        try:
            async with self._engine.connect() as conn:
                rows = (
                    await conn.execute(
                        sa.select(
                            projection_checkpoints.c.lag_events,
                            projection_checkpoints.c.lag_seconds,
                            sa.func.extract("epoch", sa.func.now() - projection_checkpoints.c.lag_measured_at),
                            sa.func.coalesce(projection_checkpoints.c.outbox_backlog, 0),
                        ).where(projection_checkpoints.c.projection.in_(expected))
                    )
                ).all()
        except Exception as exc:
            LAGGING.set(1)
            return f"projection status unavailable ({type(exc).__name__})"
        if len(rows) < len(expected) or any(row[0] is None for row in rows):
            LAGGING.set(1)
            if len(expected) == 1:
                return "the projector has not reported its lag yet"
            return f"not every one of the {len(expected)} partitions' projectors has reported its lag yet"
        # The whole projection: the partitions' events add up (each report counts the outbox's once), the
        # oldest waiting event is the oldest of all, the stalest report counts.
        outbox = max(int(r[3]) for r in rows)
        events = sum(int(r[0]) - int(r[3]) for r in rows) + outbox
        seconds = max(float(r[1] or 0.0) for r in rows)
        age = max(float(r[2]) for r in rows)
        set_projection_lag(events, seconds)
        settings = self._settings
        lagging = events > settings.lag_alert_events or seconds > settings.lag_alert_seconds
        stale = age > settings.lag_alert_seconds
        LAGGING.set(1 if lagging or stale else 0)
        if lagging:
            return f"projection lags {events} events / {seconds:.1f}s"
        if stale:
            return f"the projector's last lag report is {age:.0f}s old"
        return None


async def serve(settings: Settings) -> None:
    engine = db.create_engine(settings.query_database, 2, "orders-query-health")  # the health probes only
    try:
        # The pool connects in the background (the database probe gates serving) and is closed however
        # serving ends, a refused start (NotMigrated) included.
        async with create_pool(settings.query_database, settings.db_pool_size, timeout=POOL_WAIT_SECONDS) as pool:
            await _serve(settings, engine, pool)
    finally:
        await engine.dispose()


async def _serve(settings: Settings, engine: db.AsyncEngine, pool: AsyncConnectionPool) -> None:
    stop = stop_event()
    database = readiness.DatabaseProbe(engine, settings.query_database, migrations.READ, "read")
    read_model = ReadModel(pool)
    feed = ChangeFeed(settings, read_model)
    servicer = QueryService(read_model, feed, settings)
    server, port, health = create_server(settings.query_addr, SERVICE, servicer, settings)
    feed_task = asyncio.create_task(feed.run(), name="change-feed")
    metrics_port = serve_metrics(settings.query_metrics_addr)
    Gauge("orders_query_watch_streams", "Open WatchOrderSummaries streams").set_function(lambda: feed.active_watches)
    Gauge("orders_query_on_replica", "1 while the read database is a hot standby").set_function(
        lambda: int(feed.standby)
    )
    Gauge(
        "orders_read_replica_lag_bytes", "WAL the projector announced that this service's replica has not replayed"
    ).set_function(lambda: feed.replica_lag_bytes)
    Gauge(
        "orders_read_replica_lag_seconds", "How long the oldest announcement not yet replayed by the replica has waited"
    ).set_function(lambda: feed.replica_lag_seconds)
    statuses: dict[str, list[readiness.Probe]] = {
        "": [database, feed.probe],
        SERVICE.full_name: [database, feed.probe],
        PROJECTION_HEALTH: [ProjectionProbe(engine, settings, feed)],
    }
    try:
        health_task = await readiness.follow(health, statuses)  # raises NotMigrated before serving
    except BaseException:
        feed_task.cancel()
        raise
    await server.start()
    host = settings.query_addr.rpartition(":")[0]
    log.info("QueryService listening on %s:%d; metrics on port %d", host, port, metrics_port)
    workers.report_serving(metrics_port)  # to the supervisor, when this is one of its workers
    try:
        await readiness.until_stopped(stop, health_task)
    finally:
        log.info("stopping: no new calls, finishing in-flight ones")
        health_task.cancel()
        await set_serving(health, [SERVICE.full_name], False)
        await server.stop(grace=2)
        for task in (feed_task, health_task):
            await cancel_and_wait(task)


def main() -> None:
    run_service(serve, "orders-query", Workers("query_service", "query_addr", "query_metrics_addr"))


if __name__ == "__main__":
    main()
