from orders.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PlaceOrderLine(_message.Message):
    __slots__ = ("sku", "quantity")
    SKU_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sku: str
    quantity: int
    def __init__(self, sku: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class PlaceOrderRequest(_message.Message):
    __slots__ = ("request_id", "customer_id", "lines")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    customer_id: str
    lines: _containers.RepeatedCompositeFieldContainer[PlaceOrderLine]
    def __init__(self, request_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[PlaceOrderLine, _Mapping]]] = ...) -> None: ...

class PlaceOrderResponse(_message.Message):
    __slots__ = ("order_id", "version", "consistency_token", "total")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    version: int
    consistency_token: str
    total: _common_pb2.Money
    def __init__(self, order_id: _Optional[str] = ..., version: _Optional[int] = ..., consistency_token: _Optional[str] = ..., total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class CancelOrderRequest(_message.Message):
    __slots__ = ("request_id", "order_id", "expected_version", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    order_id: str
    expected_version: int
    reason: str
    def __init__(self, request_id: _Optional[str] = ..., order_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelOrderResponse(_message.Message):
    __slots__ = ("order_id", "version", "consistency_token")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    version: int
    consistency_token: str
    def __init__(self, order_id: _Optional[str] = ..., version: _Optional[int] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class UpdateInventoryRequest(_message.Message):
    __slots__ = ("request_id", "sku", "delta", "set_level", "expected_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SET_LEVEL_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sku: str
    delta: int
    set_level: int
    expected_version: int
    def __init__(self, request_id: _Optional[str] = ..., sku: _Optional[str] = ..., delta: _Optional[int] = ..., set_level: _Optional[int] = ..., expected_version: _Optional[int] = ...) -> None: ...

class UpdateInventoryResponse(_message.Message):
    __slots__ = ("sku", "version", "consistency_token", "stock")
    SKU_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    sku: str
    version: int
    consistency_token: str
    stock: int
    def __init__(self, sku: _Optional[str] = ..., version: _Optional[int] = ..., consistency_token: _Optional[str] = ..., stock: _Optional[int] = ...) -> None: ...

class UpsertProductRequest(_message.Message):
    __slots__ = ("request_id", "sku", "name", "unit_price", "expected_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sku: str
    name: str
    unit_price: _common_pb2.Money
    expected_version: int
    def __init__(self, request_id: _Optional[str] = ..., sku: _Optional[str] = ..., name: _Optional[str] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class UpsertProductResponse(_message.Message):
    __slots__ = ("sku", "version", "consistency_token")
    SKU_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sku: str
    version: int
    consistency_token: str
    def __init__(self, sku: _Optional[str] = ..., version: _Optional[int] = ..., consistency_token: _Optional[str] = ...) -> None: ...
