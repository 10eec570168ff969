"""AdminService: the projector's operations over gRPC (lag, dead letters, rebuild, verify)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from nats.aio.client import Client as NATS
from sqlalchemy.ext.asyncio import AsyncEngine

from orders import verification
from orders.config import Settings
from orders.conversions import timestamp
from orders.db import driver_transaction
from orders.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from orders.events import UndecodableEvent, parse_event
from orders.grpc_server import rpc
from orders.v1 import admin_pb2, admin_pb2_grpc
from projector import dead_letters, lag, rebuild
from projector.consumer import Projector, change_entries, signal_changes

_STATUS = {
    dead_letters.DEAD: admin_pb2.DEAD_LETTER_STATUS_DEAD,
    dead_letters.PARKED: admin_pb2.DEAD_LETTER_STATUS_PARKED,
}


def _letter(row: tuple[Any, ...], with_payload: bool) -> admin_pb2.DeadLetter:
    (
        letter_id,
        seq,
        subject,
        kind,
        ident,
        version,
        _event_id,
        status,
        reason,
        deliveries,
        payload,
        _headers,
        created_at,
    ) = row
    message = admin_pb2.DeadLetter(
        id=letter_id,
        stream_sequence=seq,
        subject=subject,
        aggregate_type=kind,
        aggregate_id=ident,
        aggregate_version=version or 0,
        status=_STATUS.get(status, admin_pb2.DEAD_LETTER_STATUS_UNSPECIFIED),
        reason=reason,
        deliveries=deliveries,
        created_at=timestamp(created_at),
    )
    if with_payload:
        message.payload = bytes(payload)
        with contextlib.suppress(UndecodableEvent):
            message.event.CopyFrom(parse_event(bytes(payload)))
    return message


def _ids(values: Any) -> list[int]:
    ids = list(values)
    if not ids or len(ids) > 1000:
        raise InvalidArgument([FieldViolation("ids", "give 1 to 1000 dead letter ids")])
    return ids


async def _existing(conn: Any, values: Any) -> list[int]:
    """The requested dead letter ids, locked for this transaction; NOT_FOUND (nothing done) if any is unknown."""
    ids = _ids(values)
    missing = await dead_letters.lock_existing(conn, ids)
    if missing:
        shown = ", ".join(str(i) for i in missing[:20]) + (" …" if len(missing) > 20 else "")
        raise NotFound(f"no dead letter with id {shown} (see ListDeadLetters); nothing was changed")
    return ids


class AdminService(admin_pb2_grpc.AdminServiceServicer):
    def __init__(self, settings: Settings, engine: AsyncEngine, projector: Projector) -> None:
        self._settings = settings
        self._engine = engine
        self._projector = projector

    def _nats(self) -> NATS:
        """The projector's NATS connection (shared), or UNAVAILABLE while it is not connected."""
        nc = self._projector.nc
        if nc is None or not nc.is_connected:
            raise Unavailable("the projector is not connected to NATS")
        return nc

    @rpc
    async def GetProjectionLag(
        self, request: admin_pb2.GetProjectionLagRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetProjectionLagResponse:
        measured = await lag.measure(self._nats(), self._settings, self._projector.outbox)
        partitions = await lag.measure_partitions(self._nats(), self._settings)
        async with driver_transaction(self._engine) as conn:
            cur = await conn.execute("SELECT count(*) FROM dead_letters")
            count = (await cur.fetchone() or (0,))[0]
        events, seconds = measured.events, measured.seconds
        if partitions:  # the whole projection: every partition (this projector's is one of them)
            events = measured.unpublished + sum(p.lag.events for p in partitions if p.lag)
            seconds = max([measured.unpublished_seconds, *(p.lag.seconds for p in partitions if p.lag)])
        return admin_pb2.GetProjectionLagResponse(
            stream_last_sequence=measured.stream_last_seq,
            ack_floor_sequence=measured.ack_floor_seq,
            lag_events=events,
            lag_seconds=seconds,
            ack_pending=measured.ack_pending,
            dead_letters=count,
            unpublished_events=measured.unpublished,
            oldest_unpublished_seconds=measured.unpublished_seconds,
            partitions=[
                admin_pb2.PartitionLag(
                    partition=p.partition,
                    consumer=p.consumer if p.lag else "",
                    lag_events=p.lag.events if p.lag else 0,
                    lag_seconds=p.lag.seconds if p.lag else 0.0,
                    ack_pending=p.lag.ack_pending if p.lag else 0,
                )
                for p in partitions
            ],
        )

    @rpc
    async def ListDeadLetters(
        self, request: admin_pb2.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListDeadLettersResponse:
        if not 0 <= request.page_size <= 1000:
            raise InvalidArgument([FieldViolation("page_size", "must be 1 to 1000")])
        async with driver_transaction(self._engine) as conn:
            rows = await dead_letters.list_letters(conn, request.page_size or 100)
        return admin_pb2.ListDeadLettersResponse(dead_letters=[_letter(row, False) for row in rows])

    @rpc
    async def GetDeadLetter(
        self, request: admin_pb2.GetDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.GetDeadLetterResponse:
        async with driver_transaction(self._engine) as conn:
            row = await dead_letters.get_letter(conn, request.id)
        if row is None:
            raise NotFound(f"dead letter {request.id} not found")
        return admin_pb2.GetDeadLetterResponse(dead_letter=_letter(row, True))

    @rpc
    async def ReplayDeadLetters(
        self, request: admin_pb2.ReplayDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ReplayDeadLettersResponse:
        async with driver_transaction(self._engine) as conn:
            result = await dead_letters.replay(conn, await _existing(conn, request.ids))
            await signal_changes(conn, self._projector.projection, result.changes)
        await self._projector.announcer.announce(change_entries(result.changes))
        return admin_pb2.ReplayDeadLettersResponse(applied=result.applied, still_open=result.still_open)

    @rpc
    async def DiscardDeadLetters(
        self, request: admin_pb2.DiscardDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.DiscardDeadLettersResponse:
        async with driver_transaction(self._engine) as conn:
            count = await dead_letters.discard(conn, await _existing(conn, request.ids))
        return admin_pb2.DiscardDeadLettersResponse(discarded=count)

    @rpc
    async def RebuildReadModel(
        self, request: admin_pb2.RebuildReadModelRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.RebuildReadModelResponse]:
        async for step in rebuild.rebuild(self._nats(), self._engine, self._settings):
            if step.swapped:  # query services on replicas re-read everything (the primary's were NOTIFYed)
                self._projector.announcer.resync()
            yield admin_pb2.RebuildReadModelResponse(
                replayed=step.replayed, target_sequence=step.target_seq, swapped=step.swapped
            )

    @rpc
    async def VerifyReadModel(
        self, request: admin_pb2.VerifyReadModelRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.VerifyReadModelResponse:
        report = await verification.verify(self._settings.write_database_url, self._settings.read_database_url)
        return admin_pb2.VerifyReadModelResponse(
            orders_checked=report.orders_checked,
            products_checked=report.products_checked,
            differences=report.differences[:100],
            difference_count=len(report.differences),
        )
