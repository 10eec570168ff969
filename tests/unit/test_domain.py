"""Validation and pricing rules of the write side, with no servers."""

from __future__ import annotations

import pytest

from command_service import domain
from command_service.handlers import request_hash
from orders.errors import InvalidArgument
from orders.v1 import commands_pb2, common_pb2


def violations(check, request) -> set[str]:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidArgument) as err:
        check(request)
    return {v.field for v in err.value.violations}


def order(*lines: tuple[str, int], customer: str = "c-1", request_id: str = "r-1") -> commands_pb2.PlaceOrderRequest:
    return commands_pb2.PlaceOrderRequest(
        request_id=request_id,
        customer_id=customer,
        lines=[commands_pb2.PlaceOrderLine(sku=s, quantity=q) for s, q in lines],
    )


def test_a_good_order_passes() -> None:
    domain.validate_place_order(order(("SKU-1", 1), ("sku_2", 10_000)))


def test_every_bad_field_of_an_order_is_reported_at_once() -> None:
    bad = order(("", 1), ("-starts-with-dash", 0), ("OK", 10_001), ("OK", 1), customer="", request_id="")
    assert violations(domain.validate_place_order, bad) == {
        "request_id",
        "customer_id",
        "lines[0].sku",
        "lines[1].sku",
        "lines[1].quantity",
        "lines[2].quantity",
        "lines[3].sku",  # duplicate SKU
    }


def test_order_line_count_limits() -> None:
    assert violations(domain.validate_place_order, order()) == {"lines"}
    too_many = order(*[(f"S{i}", 1) for i in range(domain.MAX_LINES + 1)])
    assert violations(domain.validate_place_order, too_many) == {"lines"}


def test_sku_syntax() -> None:
    for good in ("a", "A-1_b", "9" * 64):
        domain.validate_place_order(order((good, 1)))
    for bad in ("_a", "a b", "a.b", "a" * 65, "ä"):
        assert violations(domain.validate_place_order, order((bad, 1))) == {"lines[0].sku"}


def test_cancel_needs_a_uuid_and_bounded_reason() -> None:
    bad = commands_pb2.CancelOrderRequest(request_id="r", order_id="nope", reason="x" * 501, expected_version=0)
    assert violations(domain.validate_cancel_order, bad) == {"order_id", "reason", "expected_version"}


def test_inventory_change_needs_exactly_one_sensible_value() -> None:
    assert violations(
        domain.validate_update_inventory, commands_pb2.UpdateInventoryRequest(request_id="r", sku="S")
    ) == {"change"}
    assert violations(
        domain.validate_update_inventory, commands_pb2.UpdateInventoryRequest(request_id="r", sku="S", delta=0)
    ) == {"delta"}
    assert violations(
        domain.validate_update_inventory, commands_pb2.UpdateInventoryRequest(request_id="r", sku="S", set_level=-1)
    ) == {"set_level"}
    domain.validate_update_inventory(commands_pb2.UpdateInventoryRequest(request_id="r", sku="S", delta=-3))


def test_product_price_and_currency() -> None:
    bad = commands_pb2.UpsertProductRequest(
        request_id="r", sku="S", name="\x00", unit_price=common_pb2.Money(currency_code="eur", minor_units=-1)
    )
    assert violations(domain.validate_upsert_product, bad) == {
        "name",
        "unit_price.currency_code",
        "unit_price.minor_units",
    }
    missing = commands_pb2.UpsertProductRequest(request_id="r", sku="S", name="n")
    assert violations(domain.validate_upsert_product, missing) == {"unit_price"}


def test_order_total_requires_one_currency() -> None:
    eur = domain.PricedLine("A", "a", 2, 150, "EUR")
    assert domain.order_total([eur, domain.PricedLine("B", "b", 1, 100, "EUR")]) == (400, "EUR")
    assert domain.order_total([eur, domain.PricedLine("B", "b", 1, 100, "USD")]) == (0, None)


def test_request_hash_ignores_request_id_only() -> None:
    assert request_hash(order(("A", 1), request_id="x")) == request_hash(order(("A", 1), request_id="y"))
    assert request_hash(order(("A", 1))) != request_hash(order(("A", 2)))
