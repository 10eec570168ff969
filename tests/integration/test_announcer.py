"""The projector's commit announcements (orders.read_changes), against real PostgreSQL and NATS."""

from __future__ import annotations

import asyncio

import psycopg
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from orders import jetstream, read_changes
from orders.db import libpq_url
from orders.read_changes import Announcement
from projector.announcer import Announcer
from tests.support import Infra, isolated_settings, migrate


def test_announcements_carry_a_position_past_the_commit_and_resync_after_a_lost_one(infra: Infra) -> None:
    settings = isolated_settings(infra)
    asyncio.run(migrate(settings))

    async def scenario() -> None:
        nc = await jetstream.connect(settings, "test", retry_forever=False)
        heard: asyncio.Queue[Announcement] = asyncio.Queue()

        async def hear(msg: Msg) -> None:
            await heard.put(Announcement.decode(msg.data))

        await nc.subscribe(read_changes.subject(settings.stream), cb=hear)
        await nc.flush()
        client: list[NATS | None] = [nc]
        announcer = Announcer(settings, lambda: client[0])
        try:
            with psycopg.connect(libpq_url(settings.read_database_url), autocommit=True) as conn:
                conn.execute("CREATE TABLE IF NOT EXISTS announced (n int)")
                conn.execute("INSERT INTO announced VALUES (1)")  # a commit
                row = conn.execute("SELECT pg_current_wal_lsn()::text").fetchone()
                assert row is not None
                committed = read_changes.parse_lsn(row[0])
            entry = ["order", "o-1", 1, 7, "c-1"]
            await announcer.announce([entry])
            first = await asyncio.wait_for(heard.get(), 5)
            assert first.changes == [entry] and not first.resync and first.lsn >= committed

            client[0] = None  # NATS gone: this one is lost
            await announcer.announce([["order", "o-2", 1, 8, "c-2"]])
            client[0] = nc
            await announcer.announce([])
            second = await asyncio.wait_for(heard.get(), 5)
            assert second.resync and second.lsn >= first.lsn  # everyone re-reads at this position
            await announcer.announce([])
            assert not (await asyncio.wait_for(heard.get(), 5)).resync
            assert heard.empty()
        finally:
            await jetstream.close(nc)

    asyncio.run(scenario())
