"""Composition root of the projector: read-database engine and the consumer loop."""

from __future__ import annotations

import asyncio
import logging

from orders import db
from orders.config import Settings
from orders.read_model import metadata
from orders.runtime import configure_logging, stop_event
from projector.consumer import Projector

log = logging.getLogger("projector")


async def serve(settings: Settings) -> None:
    stop = stop_event()
    engine = db.create_engine(settings.read_database_url, settings.db_pool_size, "orders-projector")
    projector = Projector(settings, engine)
    log.info("projector consuming %s as %s", settings.stream, settings.consumer)
    try:
        await projector.run(stop)
    finally:
        await engine.dispose()
        log.info("projector stopped after applying %d events", projector.applied_total)


async def migrate(settings: Settings) -> None:
    await db.create_schema(settings.read_database_url, metadata)


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
