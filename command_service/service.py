"""CommandService servicer: turns gRPC calls into handler calls; errors are mapped by orders.grpc_server.rpc."""

from __future__ import annotations

import logging

import grpc

from command_service.handlers import CommandContext, CommandHandlers
from orders.correlation import CORRELATION_ID, TRACEPARENT
from orders.grpc_server import rpc
from orders.v1 import commands_pb2, commands_pb2_grpc


def _context(request_id: str, context: grpc.aio.ServicerContext) -> CommandContext:
    return CommandContext(request_id=request_id, correlation_id=CORRELATION_ID.get(), traceparent=TRACEPARENT.get())


class CommandService(commands_pb2_grpc.CommandServiceServicer):
    def __init__(self, handlers: CommandHandlers) -> None:
        self._handlers = handlers

    @rpc(access_log=logging.INFO)
    async def PlaceOrder(
        self, request: commands_pb2.PlaceOrderRequest, context: grpc.aio.ServicerContext
    ) -> commands_pb2.PlaceOrderResponse:
        return await self._handlers.place_order(request, _context(request.request_id, context))

    @rpc(access_log=logging.INFO)
    async def CancelOrder(
        self, request: commands_pb2.CancelOrderRequest, context: grpc.aio.ServicerContext
    ) -> commands_pb2.CancelOrderResponse:
        return await self._handlers.cancel_order(request, _context(request.request_id, context))

    @rpc(access_log=logging.INFO)
    async def UpdateInventory(
        self, request: commands_pb2.UpdateInventoryRequest, context: grpc.aio.ServicerContext
    ) -> commands_pb2.UpdateInventoryResponse:
        return await self._handlers.update_inventory(request, _context(request.request_id, context))

    @rpc(access_log=logging.INFO)
    async def UpsertProduct(
        self, request: commands_pb2.UpsertProductRequest, context: grpc.aio.ServicerContext
    ) -> commands_pb2.UpsertProductResponse:
        return await self._handlers.upsert_product(request, _context(request.request_id, context))
