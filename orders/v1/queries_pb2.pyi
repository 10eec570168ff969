import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orders.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SortOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SORT_ORDER_UNSPECIFIED: _ClassVar[SortOrder]
    SORT_ORDER_NEWEST_FIRST: _ClassVar[SortOrder]
    SORT_ORDER_OLDEST_FIRST: _ClassVar[SortOrder]
SORT_ORDER_UNSPECIFIED: SortOrder
SORT_ORDER_NEWEST_FIRST: SortOrder
SORT_ORDER_OLDEST_FIRST: SortOrder

class OrderSummaryLine(_message.Message):
    __slots__ = ("sku", "name", "quantity", "unit_price", "line_total")
    SKU_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    LINE_TOTAL_FIELD_NUMBER: _ClassVar[int]
    sku: str
    name: str
    quantity: int
    unit_price: _common_pb2.Money
    line_total: _common_pb2.Money
    def __init__(self, sku: _Optional[str] = ..., name: _Optional[str] = ..., quantity: _Optional[int] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., line_total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ...) -> None: ...

class OrderSummary(_message.Message):
    __slots__ = ("order_id", "customer_id", "status", "lines", "item_count", "total", "placed_at", "updated_at", "cancel_reason", "version", "stream_sequence")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PLACED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    customer_id: str
    status: _common_pb2.OrderStatus
    lines: _containers.RepeatedCompositeFieldContainer[OrderSummaryLine]
    item_count: int
    total: _common_pb2.Money
    placed_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    cancel_reason: str
    version: int
    stream_sequence: int
    def __init__(self, order_id: _Optional[str] = ..., customer_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.OrderStatus, str]] = ..., lines: _Optional[_Iterable[_Union[OrderSummaryLine, _Mapping]]] = ..., item_count: _Optional[int] = ..., total: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., placed_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_reason: _Optional[str] = ..., version: _Optional[int] = ..., stream_sequence: _Optional[int] = ...) -> None: ...

class ProductView(_message.Message):
    __slots__ = ("sku", "name", "unit_price", "stock", "version", "updated_at")
    SKU_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNIT_PRICE_FIELD_NUMBER: _ClassVar[int]
    STOCK_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    sku: str
    name: str
    unit_price: _common_pb2.Money
    stock: int
    version: int
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, sku: _Optional[str] = ..., name: _Optional[str] = ..., unit_price: _Optional[_Union[_common_pb2.Money, _Mapping]] = ..., stock: _Optional[int] = ..., version: _Optional[int] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class OrderFilter(_message.Message):
    __slots__ = ("customer_id", "status", "placed_after", "placed_before")
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    PLACED_AFTER_FIELD_NUMBER: _ClassVar[int]
    PLACED_BEFORE_FIELD_NUMBER: _ClassVar[int]
    customer_id: str
    status: _common_pb2.OrderStatus
    placed_after: _timestamp_pb2.Timestamp
    placed_before: _timestamp_pb2.Timestamp
    def __init__(self, customer_id: _Optional[str] = ..., status: _Optional[_Union[_common_pb2.OrderStatus, str]] = ..., placed_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., placed_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetOrderSummaryRequest(_message.Message):
    __slots__ = ("order_id", "consistency_token")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    consistency_token: str
    def __init__(self, order_id: _Optional[str] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class GetOrderSummaryResponse(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: OrderSummary
    def __init__(self, summary: _Optional[_Union[OrderSummary, _Mapping]] = ...) -> None: ...

class ListOrderSummariesRequest(_message.Message):
    __slots__ = ("filter", "sort_order", "consistency_token")
    FILTER_FIELD_NUMBER: _ClassVar[int]
    SORT_ORDER_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    filter: OrderFilter
    sort_order: SortOrder
    consistency_token: str
    def __init__(self, filter: _Optional[_Union[OrderFilter, _Mapping]] = ..., sort_order: _Optional[_Union[SortOrder, str]] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class ListOrderSummariesResponse(_message.Message):
    __slots__ = ("summary",)
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    summary: OrderSummary
    def __init__(self, summary: _Optional[_Union[OrderSummary, _Mapping]] = ...) -> None: ...

class SearchOrdersRequest(_message.Message):
    __slots__ = ("query", "filter", "page_size", "page_token", "consistency_token")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    query: str
    filter: OrderFilter
    page_size: int
    page_token: str
    consistency_token: str
    def __init__(self, query: _Optional[str] = ..., filter: _Optional[_Union[OrderFilter, _Mapping]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class SearchOrdersResponse(_message.Message):
    __slots__ = ("summaries", "next_page_token")
    SUMMARIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    summaries: _containers.RepeatedCompositeFieldContainer[OrderSummary]
    next_page_token: str
    def __init__(self, summaries: _Optional[_Iterable[_Union[OrderSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ListProductsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "in_stock_only", "name_prefix")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    IN_STOCK_ONLY_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    in_stock_only: bool
    name_prefix: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., in_stock_only: _Optional[bool] = ..., name_prefix: _Optional[str] = ...) -> None: ...

class ListProductsResponse(_message.Message):
    __slots__ = ("products", "next_page_token")
    PRODUCTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    products: _containers.RepeatedCompositeFieldContainer[ProductView]
    next_page_token: str
    def __init__(self, products: _Optional[_Iterable[_Union[ProductView, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchOrderSummariesRequest(_message.Message):
    __slots__ = ("order_ids", "customer_id", "include_snapshot", "after_sequence", "consistency_token")
    ORDER_IDS_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CONSISTENCY_TOKEN_FIELD_NUMBER: _ClassVar[int]
    order_ids: _containers.RepeatedScalarFieldContainer[str]
    customer_id: str
    include_snapshot: bool
    after_sequence: int
    consistency_token: str
    def __init__(self, order_ids: _Optional[_Iterable[str]] = ..., customer_id: _Optional[str] = ..., include_snapshot: _Optional[bool] = ..., after_sequence: _Optional[int] = ..., consistency_token: _Optional[str] = ...) -> None: ...

class WatchOrderSummariesResponse(_message.Message):
    __slots__ = ("summary", "snapshot")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    summary: OrderSummary
    snapshot: bool
    def __init__(self, summary: _Optional[_Union[OrderSummary, _Mapping]] = ..., snapshot: _Optional[bool] = ...) -> None: ...
