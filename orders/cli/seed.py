"""`orders seed`: demo products and orders through the CommandService, with progress lines."""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid

import grpc

from orders import security
from orders.cli.printing import print_error
from orders.config import Settings
from orders.v1 import commands_pb2, commands_pb2_grpc, common_pb2


def cmd_seed(args: argparse.Namespace, settings: Settings) -> int:
    """Demo data through the CommandService: products with stock, then orders, with progress lines."""
    try:
        asyncio.run(_seed(args, settings))
    except grpc.RpcError as err:
        return print_error(err)
    except KeyboardInterrupt:
        return 130
    return 0


async def _seed(args: argparse.Namespace, settings: Settings) -> None:
    rng = random.Random(args.random_seed)
    names = ["Anvil", "Bolt", "Cable", "Drill", "Easel", "Funnel", "Gasket", "Hinge", "Ink", "Jack", "Kettle"]
    skus = [f"DEMO-{i:04d}" for i in range(args.products)]
    metadata = security.call_metadata(settings)
    async with security.client_channel(args.command_addr or settings.command_addr, settings, aio=True) as channel:
        stub = commands_pb2_grpc.CommandServiceStub(channel)
        for i, sku in enumerate(skus):
            price = common_pb2.Money(currency_code="EUR", minor_units=rng.randrange(100, 20_000))
            name = f"{names[i % len(names)]} {sku[-4:]}"
            await stub.UpsertProduct(
                commands_pb2.UpsertProductRequest(request_id=str(uuid.uuid4()), sku=sku, name=name, unit_price=price),
                timeout=args.timeout,
                metadata=metadata,
            )
            await stub.UpdateInventory(
                commands_pb2.UpdateInventoryRequest(request_id=str(uuid.uuid4()), sku=sku, delta=args.orders * 3),
                timeout=args.timeout,
                metadata=metadata,
            )
        print(f"{len(skus)} products with stock", flush=True)
        started, done, next_report = time.monotonic(), 0, 0.0
        queue: asyncio.Queue[int] = asyncio.Queue()
        for n in range(args.orders):
            queue.put_nowait(n)

        async def worker() -> None:
            nonlocal done, next_report
            while not queue.empty():
                queue.get_nowait()
                lines = [
                    commands_pb2.PlaceOrderLine(sku=sku, quantity=rng.randint(1, 3))
                    for sku in sorted(rng.sample(skus, k=min(len(skus), rng.randint(1, 4))))
                ]
                await stub.PlaceOrder(
                    commands_pb2.PlaceOrderRequest(
                        request_id=str(uuid.uuid4()), customer_id=f"customer-{rng.randrange(200):03d}", lines=lines
                    ),
                    timeout=args.timeout,
                    metadata=metadata,
                )
                done += 1
                now = time.monotonic()
                if now >= next_report or done == args.orders:
                    next_report = now + 1.0
                    rate = done / max(now - started, 1e-9)
                    print(
                        f"placed {done}/{args.orders} orders ({100 * done // args.orders}%, {rate:.0f}/s)", flush=True
                    )

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
