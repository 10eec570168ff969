"""Health statuses that follow what a service depends on, and the schema check that gates serving.

A probe returns None while its dependency is usable, or a short reason why not. `follow` runs the
probes every few seconds and sets each named health status to SERVING only while all of its probes
pass, so load balancers and `orders health` see an outage within one interval, and see the recovery
without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import sqlalchemy as sa
from grpc_health.v1 import health
from sqlalchemy.ext.asyncio import AsyncEngine

from orders import migrations
from orders.db import is_unavailable
from orders.grpc_server import set_serving

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[str | None]]
INTERVAL = 2.0
RECHECK_WHILE_DOWN = 0.25


class DatabaseProbe:
    """Usable while the database answers. The first time it answers, it must be usable (UTF8) and its
    schema at the head revision: otherwise NotMigrated is raised, which stops the service (nothing can
    work until `orders migrate` runs); so is any other failure of that first check that is not a
    connection failure."""

    def __init__(self, engine: AsyncEngine, url: str, location: str, what: str) -> None:
        self._engine, self._url, self._location, self._what = engine, url, location, what
        self._schema_checked = False

    async def __call__(self) -> str | None:
        try:
            if not self._schema_checked:
                await asyncio.to_thread(migrations.require_current, self._url, self._location, self._what)
                self._schema_checked = True
            async with self._engine.connect() as conn:
                await conn.execute(sa.text("SELECT 1"))
        except migrations.NotMigrated:
            raise
        except Exception as exc:
            if not self._schema_checked and not is_unavailable(exc):  # it answers, but not as a usable database
                raise migrations.NotMigrated(
                    f"cannot check the schema of the {self._what} database ({type(exc).__name__}: {exc})"
                ) from exc
            return f"{self._what} database unreachable ({type(exc).__name__})"
        return None


async def follow(
    health_servicer: health.aio.HealthServicer,
    statuses: Mapping[str, Sequence[Probe]],
    interval: float = INTERVAL,
) -> asyncio.Task[None]:
    """Run the probes once (raising what a probe raises, such as NotMigrated), set every named status,
    and return a task that repeats this every interval: each status is SERVING exactly while all of its
    probes pass (re-checked every RECHECK_WHILE_DOWN seconds while one does not). Call it before the
    server starts, so that no call sees a status nobody checked."""
    current: dict[str, bool] = {}

    async def check() -> None:
        reasons: dict[Probe, str | None] = {}
        for probes in statuses.values():
            for probe in probes:
                if probe not in reasons:
                    reasons[probe] = await probe()
        for name, probes in statuses.items():
            failing = [reason for probe in probes if (reason := reasons[probe])]
            ok = not failing
            if current.get(name) != ok:
                if ok:
                    log.info("health %r: SERVING", name or "(server)")
                else:
                    log.warning("health %r: NOT_SERVING: %s", name or "(server)", "; ".join(failing))
                await set_serving(health_servicer, [name], ok, overall=False)
                current[name] = ok

    async def repeat() -> None:
        while True:  # while something is down, look again soon, so that a recovery shows at once
            await asyncio.sleep(interval if all(current.values()) else RECHECK_WHILE_DOWN)
            await check()

    await check()
    return asyncio.create_task(repeat(), name="health")


async def until_stopped(stop: asyncio.Event, *tasks: asyncio.Task[None]) -> None:
    """Wait for stop, or re-raise what ended one of tasks first (a fatal error such as NotMigrated)."""
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({waiter, *tasks}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    for task in done:
        if task is not waiter:
            task.result()
