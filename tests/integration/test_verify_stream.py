"""`orders verify --stream`: every event in the stream once, read in batches however long the stream."""

from __future__ import annotations

import asyncio
import uuid

from orders import jetstream, local_stack
from orders.config import Settings
from tests.support import Infra, isolated_settings, migrate, publish_events, synthetic_history, verify_cli


def publish_raw(settings: Settings, subject: str, payload: bytes) -> None:
    async def send() -> None:
        nc = await jetstream.connect(settings.nats_url, "test", retry_forever=False)
        try:
            await nc.jetstream().publish(subject, payload, headers={"Nats-Msg-Id": str(uuid.uuid4())})
        finally:
            await jetstream.close(nc)

    asyncio.run(send())


def test_stream_check_finds_events_published_twice(infra: Infra, own_nats: local_stack.LocalNats) -> None:
    settings = isolated_settings(infra, nats_url=own_nats.url)
    asyncio.run(migrate(settings))
    history = synthetic_history(2500, 100, 10, seed=3, prefix=f"V{uuid.uuid4().hex[:6]}")
    asyncio.run(publish_events(settings, history.events))  # more than one fetch batch
    code, report = verify_cli(settings)
    assert code == 0, report
    assert report["stream"] == {"messages": 2500, "undecodable": []}

    publish_raw(settings, "orders.v1.events.order.junk", b"\xff not an envelope")
    copy = history.events[1200]
    publish_raw(settings, copy.subject, copy.payload)  # the same event under a new message id
    code, report = verify_cli(settings)
    assert code == 1
    assert report["stream"] == {"messages": 2502, "undecodable": [2501]}
    differences = report["differences"]
    assert isinstance(differences, list) and len(differences) == 3, differences
    assert differences[0].startswith("stream sequence 2502: Nats-Msg-Id")  # the copy's new message id
    assert differences[1] == f"stream sequence 2502: event {copy.event_id} is also at sequence 1201"
    assert differences[2].endswith("is also at sequence 1201")  # the same aggregate and version
