import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orders.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EventEnvelope(_message.Message):
    __slots__ = ("event_id", "aggregate_type", "aggregate_id", "aggregate_version", "occurred_at", "correlation_id", "causation_id", "order_placed", "order_cancelled", "product_upserted", "inventory_adjusted", "stock_reserved", "stock_released")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_TYPE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    CORRELATION_ID_FIELD_NUMBER: _ClassVar[int]
    CAUSATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_PLACED_FIELD_NUMBER: _ClassVar[int]
    ORDER_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    PRODUCT_UPSERTED_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_ADJUSTED_FIELD_NUMBER: _ClassVar[int]
    STOCK_RESERVED_FIELD_NUMBER: _ClassVar[int]
    STOCK_RELEASED_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    occurred_at: _timestamp_pb2.Timestamp
    correlation_id: str
    causation_id: str
    order_placed: OrderPlaced
    order_cancelled: OrderCancelled
    product_upserted: ProductUpserted
    inventory_adjusted: InventoryAdjusted
    stock_reserved: StockReserved
    stock_released: StockReleased
    def __init__(self, event_id: _Optional[str] = ..., aggregate_type: _Optional[str] = ..., aggregate_id: _Optional[str] = ..., aggregate_version: _Optional[int] = ..., occurred_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., correlation_id: _Optional[str] = ..., causation_id: _Optional[str] = ..., order_placed: _Optional[_Union[OrderPlaced, _Mapping]] = ..., order_cancelled: _Optional[_Union[OrderCancelled, _Mapping]] = ..., product_upserted: _Optional[_Union[ProductUpserted, _Mapping]] = ..., inventory_adjusted: _Optional[_Union[InventoryAdjusted, _Mapping]] = ..., stock_reserved: _Optional[_Union[StockReserved, _Mapping]] = ..., stock_released: _Optional[_Union[StockReleased, _Mapping]] = ...) -> None: ...

class OrderLine(_message.Message):
    __slots__ = ("sku", "name", "quantity", "unit_price")
    SKU_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    sku: str
    name: str
    quantity: int
    unit_price: _common_pb2.Money
    def __init__(self, sku: _Optional[str] = ..., name: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class OrderPlaced(_message.Message):
    __slots__ = ("customer_id", "lines", "total", "placed_at")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PLACED_AT_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    lines: _containers.RepeatedCompositeFieldContainer[OrderLine]
    total: _common_pb2.Money
    placed_at: _timestamp_pb2.Timestamp
    def __init__(self, customer_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[OrderLine, _Mapping]]] = ..., total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., placed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class OrderCancelled(_message.Message):
    __slots__ = ("reason", "cancelled_at")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_AT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    cancelled_at: _timestamp_pb2.Timestamp
    def __init__(self, reason: _Optional[str] = ..., cancelled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ProductUpserted(_message.Message):
    __slots__ = ("name", "unit_price", "stock")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    name: str
    unit_price: _common_pb2.Money
    stock: int
    def __init__(self, name: _Optional[str] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., stock: _Optional[int] = ...) -> None: ...

class InventoryAdjusted(_message.Message):
    __slots__ = ("delta", "stock")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    delta: int
    stock: int
    def __init__(self, delta: _Optional[int] = ..., stock: _Optional[int] = ...) -> None: ...

class StockReserved(_message.Message):
    __slots__ = ("order_id", "quantity", "stock")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    quantity: int
    stock: int
    def __init__(self, order_id: _Optional[str] = ..., quantity: _Optional[int] = ..., stock: _Optional[int] = ...) -> None: ...

class StockReleased(_message.Message):
    __slots__ = ("order_id", "quantity", "stock")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    quantity: int
    stock: int
    def __init__(self, order_id: _Optional[str] = ..., quantity: _Optional[int] = ..., stock: _Optional[int] = ...) -> None: ...
