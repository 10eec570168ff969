"""Pure rules of the write side: request validation and order arithmetic. No I/O here."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from orders.errors import FieldViolation, InvalidArgument
from orders.inputs import MAX_ID_LENGTH, MAX_NAME_LENGTH, MAX_REASON_LENGTH, SKU_PATTERN, text_problem
from orders.v1 import commands_pb2

CURRENCY_PATTERN = re.compile(r"[A-Z]{3}")
MAX_LINES = 100
MAX_QUANTITY = 10_000
MAX_STOCK = 1_000_000_000
MAX_PRICE_MINOR = 10**12  # keeps any order total (100 lines x 10,000 units) far inside int64

ORDER_PLACED = "PLACED"
ORDER_CANCELLED = "CANCELLED"


class _Violations:
    """Collects every problem of one request so the client sees them all at once."""

    def __init__(self) -> None:
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def check(self, ok: bool, field: str, description: str) -> None:
        if not ok:
            self.add(field, description)

    def text(self, value: str, field: str, max_length: int, *, required: bool = True) -> None:
        if problem := text_problem(value, max_length, required=required):
            self.add(field, problem)

    def sku(self, value: str, field: str) -> None:
        self.check(bool(SKU_PATTERN.fullmatch(value)), field, f"must match {SKU_PATTERN.pattern}")

    def expected_version(self, has: bool, value: int, field: str, minimum: int) -> None:
        if has:
            self.check(value >= minimum, field, f"must be at least {minimum} when set")

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items)


def _common(request: Any, check_body: Callable[[_Violations], None]) -> None:
    v = _Violations()
    v.text(request.request_id, "request_id", MAX_ID_LENGTH)
    check_body(v)
    v.raise_if_any()


def validate_place_order(request: commands_pb2.PlaceOrderRequest) -> None:
    def body(v: _Violations) -> None:
        v.text(request.customer_id, "customer_id", MAX_ID_LENGTH)
        if not request.lines:
            v.add("lines", "at least one line is required")
        elif len(request.lines) > MAX_LINES:
            v.add("lines", f"at most {MAX_LINES} lines per order")
        seen: set[str] = set()
        for i, line in enumerate(request.lines[:MAX_LINES]):
            v.sku(line.sku, f"lines[{i}].sku")
            v.check(1 <= line.quantity <= MAX_QUANTITY, f"lines[{i}].quantity", f"must be 1 to {MAX_QUANTITY}")
            if line.sku in seen:
                v.add(f"lines[{i}].sku", "appears more than once in the order")
            seen.add(line.sku)

    _common(request, body)


def _is_uuid(value: str) -> bool:
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


def validate_cancel_order(request: commands_pb2.CancelOrderRequest) -> None:
    def body(v: _Violations) -> None:
        v.check(_is_uuid(request.order_id), "order_id", "must be an order id (UUID)")
        v.expected_version(request.HasField("expected_version"), request.expected_version, "expected_version", 1)
        v.text(request.reason, "reason", MAX_REASON_LENGTH, required=False)

    _common(request, body)


def validate_update_inventory(request: commands_pb2.UpdateInventoryRequest) -> None:
    def body(v: _Violations) -> None:
        v.sku(request.sku, "sku")
        change = request.WhichOneof("change")
        if change is None:
            v.add("change", "set exactly one of delta or set_level")
        elif change == "delta":
            v.check(request.delta != 0, "delta", "must not be zero")
            v.check(abs(request.delta) <= MAX_STOCK, "delta", f"must be within ±{MAX_STOCK}")
        else:
            v.check(0 <= request.set_level <= MAX_STOCK, "set_level", f"must be 0 to {MAX_STOCK}")
        v.expected_version(request.HasField("expected_version"), request.expected_version, "expected_version", 1)

    _common(request, body)


def validate_upsert_product(request: commands_pb2.UpsertProductRequest) -> None:
    def body(v: _Violations) -> None:
        v.sku(request.sku, "sku")
        v.text(request.name, "name", MAX_NAME_LENGTH)
        if not request.HasField("unit_price"):
            v.add("unit_price", "is required")
        else:
            v.check(
                bool(CURRENCY_PATTERN.fullmatch(request.unit_price.currency_code)),
                "unit_price.currency_code",
                "must be an ISO 4217 code of three upper-case letters",
            )
            v.check(
                0 <= request.unit_price.minor_units <= MAX_PRICE_MINOR,
                "unit_price.minor_units",
                f"must be 0 to {MAX_PRICE_MINOR}",
            )
        v.expected_version(request.HasField("expected_version"), request.expected_version, "expected_version", 0)

    _common(request, body)


@dataclass(frozen=True)
class PricedLine:
    """An order line with the catalog data it was priced with."""

    sku: str
    name: str
    quantity: int
    unit_price_minor: int
    currency: str

    @property
    def total_minor(self) -> int:
        return self.quantity * self.unit_price_minor


def order_total(lines: list[PricedLine]) -> tuple[int, str | None]:
    """(total in minor units, the one currency) or (0, None) when the lines mix currencies."""
    currencies = {line.currency for line in lines}
    if len(currencies) != 1:
        return 0, None
    return sum(line.total_minor for line in lines), currencies.pop()
