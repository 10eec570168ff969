"""Composition root of the projector: read-database engine, the consumer loop, and the admin server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from orders import db, migrations
from orders.config import Settings
from orders.grpc_server import create_server, set_serving
from orders.metrics import PROJECTION_LAG_EVENTS, PROJECTION_LAG_SECONDS, serve_metrics
from orders.runtime import run_service, stop_event
from orders.v1 import admin_pb2
from projector import lag
from projector.admin import AdminService
from projector.consumer import PROJECTION_NAME, Projector, transaction

log = logging.getLogger("projector")
SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
MONITOR_INTERVAL = 2.0


async def monitor(projector: Projector, settings: Settings, engine: db.AsyncEngine, health: object) -> None:
    """Every few seconds: health from NATS and database reachability; lag measured and recorded."""
    serving: bool | None = None
    while True:
        ok = projector.nc is not None and projector.nc.is_connected
        try:
            async with transaction(engine) as conn:
                await conn.execute("SELECT 1")
                if ok and projector.nc is not None:
                    measured = await lag.measure(projector.nc, settings)
                    await lag.record(conn, PROJECTION_NAME, measured)
                    PROJECTION_LAG_EVENTS.set(measured.events)
                    PROJECTION_LAG_SECONDS.set(measured.seconds)
                await prune_changes(conn, settings.change_retention)
        except Exception as exc:
            if serving is not False:
                log.warning("projector unhealthy: %s", exc)
            ok = False
        if ok != serving:
            await set_serving(health, [SERVICE.full_name], ok)  # type: ignore[arg-type]
            serving = ok
        await asyncio.sleep(MONITOR_INTERVAL)


PRUNE_BATCH = 10_000


async def prune_changes(conn: psycopg.AsyncConnection[Any], retention: float) -> None:
    """Drop order changes older than retention, and record from which sequence the log is complete."""
    await conn.execute(
        "WITH gone AS (DELETE FROM order_changes WHERE stream_seq IN (SELECT stream_seq FROM order_changes"
        " WHERE updated_at < now() - make_interval(secs => %s) ORDER BY stream_seq LIMIT %s) RETURNING stream_seq)"
        " UPDATE projection_checkpoints SET changes_kept_from = GREATEST(changes_kept_from,"
        " (SELECT max(stream_seq) + 1 FROM gone)) WHERE projection = %s AND EXISTS (SELECT 1 FROM gone)",
        (retention, PRUNE_BATCH, PROJECTION_NAME),
    )


async def serve(settings: Settings) -> None:
    await asyncio.to_thread(migrations.require_current, settings.read_database_url, migrations.READ, "read")
    stop = stop_event()
    engine = db.create_engine(settings.read_database_url, settings.db_pool_size, "orders-projector")
    projector = Projector(settings, engine)
    server, port, health = create_server(settings.admin_addr, SERVICE, AdminService(settings, engine, projector))
    await server.start()
    metrics_port = serve_metrics(settings.projector_metrics_addr)
    consumer = asyncio.create_task(projector.run(stop), name="consumer")
    await set_serving(health, [SERVICE.full_name], False)
    watcher = asyncio.create_task(monitor(projector, settings, engine, health), name="monitor")
    log.info(
        "projector consuming %s as %s; AdminService on %s:%d; metrics on port %d",
        settings.stream,
        settings.consumer,
        settings.admin_addr.rpartition(":")[0],
        port,
        metrics_port,
    )
    try:
        await consumer
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await server.stop(grace=2)
        await engine.dispose()
        log.info("projector stopped after applying %d events", projector.applied_total)


def main() -> None:
    run_service(serve)


if __name__ == "__main__":
    main()
