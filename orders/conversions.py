"""Python values as the protobuf types every service's messages share: Money and Timestamp."""

from __future__ import annotations

from datetime import datetime

from google.protobuf import timestamp_pb2

from orders.v1 import common_pb2


def money(minor: int, currency: str) -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, minor_units=minor)


def timestamp(moment: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(moment)
    return ts
