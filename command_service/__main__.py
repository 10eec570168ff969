"""Composition root of the command service: engine, handlers, relay and gRPC server."""

from __future__ import annotations

import asyncio
import logging

from command_service.handlers import CommandHandlers
from command_service.outbox import OutboxRelay
from command_service.service import CommandService
from orders import db, migrations, readiness, workers
from orders.config import Settings
from orders.grpc_server import create_server, set_serving
from orders.metrics import serve_metrics
from orders.runtime import Workers, run_service, stop_event
from orders.v1 import commands_pb2
from orders.waits import cancel_and_wait

log = logging.getLogger("command_service")
SERVICE = commands_pb2.DESCRIPTOR.services_by_name["CommandService"]
RELAY_HEALTH = "relay"  # health service name: NOT_SERVING while the relay cannot reach NATS


async def serve(settings: Settings) -> None:
    stop = stop_event()
    engine = db.create_engine(settings.write_database_url, settings.db_pool_size, "orders-command")
    database = readiness.DatabaseProbe(engine, settings.write_database_url, migrations.WRITE, "write")
    relay = OutboxRelay(settings)
    handlers = CommandHandlers(engine, on_commit=relay.wake, group_max=settings.place_order_group_max)
    server, port, health = create_server(
        settings.command_addr,
        SERVICE,
        CommandService(handlers),
        settings,
    )
    # Commands need only the write database; the relay (NATS) has a status of its own, because
    # commands keep succeeding through a NATS outage (the outbox holds their events).
    statuses: dict[str, list[readiness.Probe]] = {
        "": [database],
        SERVICE.full_name: [database],
        RELAY_HEALTH: [relay.probe],
    }
    health_task = await readiness.follow(health, statuses)  # raises NotMigrated before serving
    relay_task = asyncio.create_task(relay.run(), name="outbox-relay")
    await server.start()
    metrics_port = serve_metrics(settings.command_metrics_addr)
    host = settings.command_addr.rpartition(":")[0]
    log.info("CommandService listening on %s:%d; metrics on port %d", host, port, metrics_port)
    workers.report_serving(metrics_port)  # to the supervisor, when this is one of its workers
    try:
        await readiness.until_stopped(stop, health_task)
    finally:
        log.info("stopping: no new calls, finishing in-flight ones")
        health_task.cancel()
        await set_serving(health, [SERVICE.full_name], False)
        await server.stop(grace=5)
        await cancel_and_wait(relay_task)
        await engine.dispose()


def main() -> None:
    run_service(serve, "orders-command", Workers("command_service", "command_addr", "command_metrics_addr"))


if __name__ == "__main__":
    main()
