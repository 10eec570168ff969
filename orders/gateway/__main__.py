"""Composition root of the gateway: a gRPC channel to each service, the ASGI application, uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from orders import security
from orders.config import Settings
from orders.gateway.app import create_app
from orders.runtime import run_service

log = logging.getLogger("orders.gateway")
SHUTDOWN_GRACE = 5  # seconds open streams (watches) get to end when the gateway stops


async def serve(settings: Settings) -> None:
    upstreams = {"command": settings.command_addr, "query": settings.query_addr, "admin": settings.admin_addr}
    channels = {name: security.client_channel(address, settings, aio=True) for name, address in upstreams.items()}
    host, _, port = settings.gateway_addr.rpartition(":")
    config = uvicorn.Config(
        create_app(channels, settings.gateway_cors_origins),
        host=host.strip("[]"),
        port=int(port),
        lifespan="off",
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=SHUTDOWN_GRACE,
    )
    log.info("gateway on http://%s (console at /), forwarding to %s", settings.gateway_addr, upstreams)
    try:
        await uvicorn.Server(config).serve()
    finally:
        for channel in channels.values():
            await channel.close()


def main() -> None:
    run_service(serve, "gateway")


if __name__ == "__main__":
    main()
