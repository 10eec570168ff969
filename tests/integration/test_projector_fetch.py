"""The projector's fetch against a real JetStream consumer: an empty fetch is not a failure."""

from __future__ import annotations

import asyncio
import logging

import pytest
from nats.aio.msg import Msg

from orders import jetstream, local_stack
from projector.consumer import Projector
from tests.support import Infra, isolated_settings, publish_events

TIMEOUTS = [0.0002 + step * 0.0001 for step in range(40)]  # around one loopback round trip, and beyond


def test_every_way_nats_py_reports_an_empty_fetch_counts_as_empty(
    infra: Infra, own_nats: local_stack.LocalNats, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py ends an empty fetch with its own TimeoutError, or with a bare TimeoutError when the deadline
    runs out between its two pull requests. The projector logged the latter as "fetch failed ()" and
    paused half a second each time. Short fetch timeouts make both happen here; none may be a failure."""
    settings = isolated_settings(infra, nats_url=own_nats.url)

    async def scenario() -> tuple[set[str], list[list[Msg]]]:
        await publish_events(settings, [])  # the stream, empty
        nc = await jetstream.connect(settings.nats_url, "fetch-test", retry_forever=False)
        try:
            await jetstream.ensure_consumer(nc, settings)
            sub = await nc.jetstream().pull_subscribe_bind(durable=settings.consumer, stream=settings.stream)
            raised: set[str] = set()
            for attempt in range(2000):  # the library's own reports, until both kinds have been seen
                try:
                    await sub.fetch(settings.projector_batch, timeout=TIMEOUTS[attempt % len(TIMEOUTS)])
                except TimeoutError as exc:
                    raised.add(f"{type(exc).__module__}.{type(exc).__name__}")
                if len(raised) == 2:
                    break
            projector = Projector(settings, engine=None)  # type: ignore[arg-type]  # fetching needs no database
            batches = [await projector.next_batch(sub, timeout) for timeout in TIMEOUTS * 10]
            return raised, batches
        finally:
            await jetstream.close(nc)

    with caplog.at_level(logging.WARNING, logger="projector.consumer"):
        raised, batches = asyncio.run(scenario())
    assert raised == {"nats.errors.TimeoutError", "builtins.TimeoutError"}  # both paths are exercised here
    assert batches == [[]] * len(batches)
    assert not [r for r in caplog.records if "fetch failed" in r.getMessage()]
