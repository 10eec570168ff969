"""Composition root of the projector: read-database engine, the consumer loop, and the admin server."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import psycopg

from orders import db, jetstream, migrations, readiness
from orders.config import Settings
from orders.db import driver_transaction
from orders.grpc_server import create_server
from orders.metrics import serve_metrics, set_projection_lag
from orders.runtime import run_service, stop_event
from orders.v1 import admin_pb2
from orders.waits import cancel_and_wait
from projector import lag
from projector.admin import AdminService
from projector.consumer import Projector

log = logging.getLogger("projector")
SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"]
HOUSEKEEPING_INTERVAL = 2.0


async def housekeeping(projector: Projector, settings: Settings, engine: db.AsyncEngine) -> None:
    """Every few seconds: measure and record the lag (for `orders lag` and the query side), prune changes."""
    while True:
        try:
            async with driver_transaction(engine) as conn:
                if projector.nc is not None and projector.nc.is_connected:
                    measured = await lag.measure(projector.nc, settings, projector.outbox)
                    await lag.record(conn, projector.projection, measured)
                    set_projection_lag(measured.events, measured.seconds)
                await prune_changes(conn, settings.change_retention)
        except Exception as exc:
            log.debug("housekeeping skipped: %s", exc)
        await asyncio.sleep(HOUSEKEEPING_INTERVAL)


PRUNE_BATCH = 10_000


async def prune_changes(conn: psycopg.AsyncConnection[Any], retention: float) -> None:
    """Drop order changes older than retention, and record from which sequence the log is complete."""
    await conn.execute(
        "WITH gone AS (DELETE FROM order_changes WHERE stream_seq IN (SELECT stream_seq FROM order_changes"
        " WHERE updated_at < now() - make_interval(secs => %s) ORDER BY stream_seq LIMIT %s) RETURNING stream_seq)"
        " UPDATE projection_checkpoints SET changes_kept_from = GREATEST(changes_kept_from,"
        " (SELECT max(stream_seq) + 1 FROM gone)) WHERE EXISTS (SELECT 1 FROM gone)",
        (retention, PRUNE_BATCH),
    )


async def serve(settings: Settings) -> None:
    stop = stop_event()
    engine = db.create_engine(settings.read_database_url, settings.db_pool_size, "orders-projector")
    projector = Projector(settings, engine)
    server, port, health = create_server(
        settings.admin_addr, SERVICE, AdminService(settings, engine, projector), settings
    )
    database = readiness.DatabaseProbe(engine, settings.read_database_url, migrations.READ, "read")
    statuses: dict[str, list[readiness.Probe]] = {
        "": [database, projector.probe],
        SERVICE.full_name: [database, projector.probe],
    }
    health_task = await readiness.follow(health, statuses)  # raises NotMigrated before consuming
    consumer = asyncio.create_task(projector.run(stop), name="consumer")
    await server.start()
    metrics_port = serve_metrics(settings.projector_metrics_addr)
    chores = asyncio.create_task(housekeeping(projector, settings, engine), name="housekeeping")
    log.info(
        "projector consuming %s as %s; AdminService on %s:%d; metrics on port %d",
        settings.stream,
        jetstream.consumer_name(settings),
        settings.admin_addr.rpartition(":")[0],
        port,
        metrics_port,
    )
    try:
        await readiness.until_stopped(stop, health_task, consumer)
    finally:
        stop.set()
        await consumer
        for task in (health_task, chores):
            await cancel_and_wait(task)
        await server.stop(grace=2)
        await engine.dispose()
        log.info("projector stopped after applying %d events", projector.applied_total)


def main() -> None:
    run_service(serve, "orders-projector")


if __name__ == "__main__":
    main()
