import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from orders.v1 import events_pb2 as _events_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DeadLetterStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEAD_LETTER_STATUS_UNSPECIFIED: _ClassVar[DeadLetterStatus]
    DEAD_LETTER_STATUS_DEAD: _ClassVar[DeadLetterStatus]
    DEAD_LETTER_STATUS_PARKED: _ClassVar[DeadLetterStatus]
DEAD_LETTER_STATUS_UNSPECIFIED: DeadLetterStatus
DEAD_LETTER_STATUS_DEAD: DeadLetterStatus
DEAD_LETTER_STATUS_PARKED: DeadLetterStatus

class GetProjectionLagRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetProjectionLagResponse(_message.Message):
    __slots__ = ("stream_last_sequence", "ack_floor_sequence", "lag_events", "lag_seconds", "ack_pending", "dead_letters", "unpublished_events", "oldest_unpublished_seconds", "partitions")
    STREAM_LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACK_FLOOR_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACK_PENDING_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    UNPUBLISHED_EVENTS_FIELD_NUMBER: _ClassVar[int]
    OLDEST_UNPUBLISHED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PARTITIONS_FIELD_NUMBER: _ClassVar[int]
    stream_last_sequence: int
    ack_floor_sequence: int
    lag_events: int
    lag_seconds: float
    ack_pending: int
    dead_letters: int
    unpublished_events: int
    oldest_unpublished_seconds: float
    partitions: _containers.RepeatedCompositeFieldContainer[PartitionLag]
    def __init__(self, stream_last_sequence: _Optional[int] = ..., ack_floor_sequence: _Optional[int] = ..., lag_events: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., ack_pending: _Optional[int] = ..., dead_letters: _Optional[int] = ..., unpublished_events: _Optional[int] = ..., oldest_unpublished_seconds: _Optional[float] = ..., partitions: _Optional[_Iterable[_Union[PartitionLag, _Mapping]]] = ...) -> None: ...

class PartitionLag(_message.Message):
    __slots__ = ("partition", "consumer", "lag_events", "lag_seconds", "ack_pending")
    PARTITION_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    LAG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    LAG_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACK_PENDING_FIELD_NUMBER: _ClassVar[int]
    partition: int
    consumer: str
    lag_events: int
    lag_seconds: float
    ack_pending: int
    def __init__(self, partition: _Optional[int] = ..., consumer: _Optional[str] = ..., lag_events: _Optional[int] = ..., lag_seconds: _Optional[float] = ..., ack_pending: _Optional[int] = ...) -> None: ...

class DeadLetter(_message.Message):
    __slots__ = ("id", "stream_sequence", "subject", "aggregate_type", "aggregate_id", "aggregate_version", "status", "reason", "deliveries", "created_at", "payload", "event")
    ID_FIELD_NUMBER: _ClassVar[int]
    STREAM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_TYPE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    id: int
    stream_sequence: int
    subject: str
    aggregate_type: str
    aggregate_id: str
    aggregate_version: int
    status: DeadLetterStatus
    reason: str
    deliveries: int
    created_at: _timestamp_pb2.Timestamp
    payload: bytes
    event: _events_pb2.EventEnvelope
    def __init__(self, id: _Optional[int] = ..., stream_sequence: _Optional[int] = ..., subject: _Optional[str] = ..., aggregate_type: _Optional[str] = ..., aggregate_id: _Optional[str] = ..., aggregate_version: _Optional[int] = ..., status: _Optional[_Union[DeadLetterStatus, str]] = ..., reason: _Optional[str] = ..., deliveries: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., payload: _Optional[bytes] = ..., event: _Optional[_Union[_events_pb2.EventEnvelope, _Mapping]] = ...) -> None: ...

class ListDeadLettersRequest(_message.Message):
    __slots__ = ("page_size",)
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    def __init__(self, page_size: _Optional[int] = ...) -> None: ...

class ListDeadLettersResponse(_message.Message):
    __slots__ = ("dead_letters",)
    DEAD_LETTERS_FIELD_NUMBER: _ClassVar[int]
    dead_letters: _containers.RepeatedCompositeFieldContainer[DeadLetter]
    def __init__(self, dead_letters: _Optional[_Iterable[_Union[DeadLetter, _Mapping]]] = ...) -> None: ...

class GetDeadLetterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: int
    def __init__(self, id: _Optional[int] = ...) -> None: ...

class GetDeadLetterResponse(_message.Message):
    __slots__ = ("dead_letter",)
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    dead_letter: DeadLetter
    def __init__(self, dead_letter: _Optional[_Union[DeadLetter, _Mapping]] = ...) -> None: ...

class ReplayDeadLettersRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReplayDeadLettersResponse(_message.Message):
    __slots__ = ("applied", "still_open")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    STILL_OPEN_FIELD_NUMBER: _ClassVar[int]
    applied: int
    still_open: int
    def __init__(self, applied: _Optional[int] = ..., still_open: _Optional[int] = ...) -> None: ...

class DiscardDeadLettersRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DiscardDeadLettersResponse(_message.Message):
    __slots__ = ("discarded",)
    DISCARDED_FIELD_NUMBER: _ClassVar[int]
    discarded: int
    def __init__(self, discarded: _Optional[int] = ...) -> None: ...

class RebuildReadModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RebuildReadModelResponse(_message.Message):
    __slots__ = ("replayed", "target_sequence", "swapped")
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    TARGET_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SWAPPED_FIELD_NUMBER: _ClassVar[int]
    replayed: int
    target_sequence: int
    swapped: bool
    def __init__(self, replayed: _Optional[int] = ..., target_sequence: _Optional[int] = ..., swapped: _Optional[bool] = ...) -> None: ...

class VerifyReadModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class VerifyReadModelResponse(_message.Message):
    __slots__ = ("orders_checked", "products_checked", "differences", "difference_count")
    ORDERS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    PRODUCTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCES_FIELD_NUMBER: _ClassVar[int]
    DIFFERENCE_COUNT_FIELD_NUMBER: _ClassVar[int]
    orders_checked: int
    products_checked: int
    differences: _containers.RepeatedScalarFieldContainer[str]
    difference_count: int
    def __init__(self, orders_checked: _Optional[int] = ..., products_checked: _Optional[int] = ..., differences: _Optional[_Iterable[str]] = ..., difference_count: _Optional[int] = ...) -> None: ...
