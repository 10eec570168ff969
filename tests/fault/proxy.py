"""A TCP proxy of the tests' own on loopback, between the services and NATS, that can kill connections silently.

`break_connections("black-hole")` stops forwarding on every connection it carries, in both directions,
and keeps both sockets open: neither side gets a FIN or RST, as when a network path silently drops
packets. `break_connections("half-open")` closes the proxy's side towards NATS (the server sees the
client leave) and keeps the client's socket open and silent (the client still thinks it is connected).
Connections made afterwards are forwarded as usual: a client that notices and reconnects gets through.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from orders import local_stack


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter
    pumps: list[asyncio.Task[None]] = field(default_factory=list)


class Proxy:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = local_stack.free_port()
        self._connections: set[_Connection] = set()
        self._broken: list[_Connection] = []  # kept, so that their sockets stay open
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> Proxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        server.close()
        self._loop.run_until_complete(server.wait_closed())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        connection = _Connection(writer, up_writer)
        connection.pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._connections.add(connection)
        await asyncio.gather(*connection.pumps, return_exceptions=True)
        if connection in self._connections:  # ended by one side, not broken by the test
            self._connections.discard(connection)
            for end in (writer, up_writer):
                end.close()

    @staticmethod
    async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            target.write(data)
            await target.drain()

    def break_connections(self, how: str) -> int:
        """Break every connection carried now ("black-hole" or "half-open"); returns how many."""
        assert how in ("black-hole", "half-open"), how

        def breaking() -> int:
            broken = list(self._connections)
            self._connections.clear()
            for connection in broken:
                for pump in connection.pumps:
                    pump.cancel()
                if how == "half-open":
                    connection.upstream.close()
            self._broken += broken
            return len(broken)

        return asyncio.run_coroutine_threadsafe(_call(breaking), self._loop).result(10)

    def stop(self) -> None:
        def closing() -> None:
            for connection in [*self._connections, *self._broken]:
                for end in (connection.client, connection.upstream):
                    end.close()
            self._loop.stop()

        self._loop.call_soon_threadsafe(closing)
        self._thread.join(10)


async def _call(function):  # type: ignore[no-untyped-def]
    return function()


@contextlib.contextmanager
def proxy_to(upstream_port: int) -> Iterator[Proxy]:
    running = Proxy(upstream_port).start()
    try:
        yield running
    finally:
        running.stop()
