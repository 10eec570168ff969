"""The projection fold on its own: given a read row, when events arrive, then the row and each event's
outcome. No database: `fold_aggregate` is the pure step between reading rows and writing them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from orders.conversions import money, timestamp
from orders.events import ORDER, PRODUCT, EventContext, build_event, parse_event
from orders.v1 import events_pb2
from projector.projections import PROJECTIONS, Item, NeverApplicable, Outcome, check_applicable, fold_aggregate

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ORDER_ID = "6f1c1d0e-3a53-4d7e-9c55-0b8a8f0f7a11"


def event(kind: str, key: str, version: int, minutes: int = 0, **payload: Any) -> events_pb2.EventEnvelope:
    context = EventContext(occurred_at=T0 + timedelta(minutes=minutes), correlation_id="c", causation_id="r")
    return parse_event(build_event(context, kind, key, version, **payload).payload)


def placed(version: int = 1) -> events_pb2.EventEnvelope:
    lines = [
        events_pb2.OrderLine(sku="LAMP-1", name="Lamp", quantity=2, unit_price=money(1500, "EUR")),
        events_pb2.OrderLine(sku="BULB-9", name="Bulb", quantity=3, unit_price=money(200, "EUR")),
    ]
    body = events_pb2.OrderPlaced(customer_id="ada", lines=lines, total=money(3600, "EUR"), placed_at=timestamp(T0))
    return event(ORDER, ORDER_ID, version, order_placed=body)


def cancelled(version: int, minutes: int = 5) -> events_pb2.EventEnvelope:
    return event(ORDER, ORDER_ID, version, minutes, order_cancelled=events_pb2.OrderCancelled(reason="too late"))


def fold(kind: str, current: dict[str, Any] | None, *events: tuple[int, events_pb2.EventEnvelope]) -> Any:
    items = [Item(seq, e) for seq, e in events]
    trail: list[dict[str, Any]] = []
    row = fold_aggregate(PROJECTIONS[kind], current, items, trail)
    return row, [item.outcome for item in items], trail, items


def test_given_no_row_when_an_order_is_placed_then_its_summary_holds_the_lines_and_total() -> None:
    row, outcomes, trail, _ = fold(ORDER, None, (11, placed()))
    assert outcomes == [Outcome.APPLIED]
    assert trail == [row]
    assert {k: row[k] for k in ("order_id", "customer_id", "status", "item_count", "total_minor", "currency")} == {
        "order_id": ORDER_ID,
        "customer_id": "ada",
        "status": "PLACED",
        "item_count": 5,
        "total_minor": 3600,
        "currency": "EUR",
    }
    assert (row["version"], row["stream_seq"], row["placed_at"]) == (1, 11, T0)
    assert row["search_text"] == "ada LAMP-1 Lamp BULB-9 Bulb"


def test_given_a_placed_order_when_it_is_cancelled_and_the_placement_comes_again_then_one_change() -> None:
    current, *_ = fold(ORDER, None, (11, placed()))
    row, outcomes, trail, _ = fold(ORDER, current, (11, placed()), (40, cancelled(2)))
    assert outcomes == [Outcome.DUPLICATE, Outcome.APPLIED]
    assert trail == [row]
    assert (row["status"], row["cancel_reason"], row["version"], row["stream_seq"]) == ("CANCELLED", "too late", 2, 40)
    assert row["updated_at"] == T0 + timedelta(minutes=5) and row["total_minor"] == 3600  # the rest stays


def test_given_events_out_of_order_in_one_batch_then_they_apply_in_version_order() -> None:
    row, outcomes, trail, _ = fold(ORDER, None, (40, cancelled(2)), (11, placed()))
    assert outcomes == [Outcome.APPLIED, Outcome.APPLIED]
    assert [state["version"] for state in trail] == [1, 2] and row["status"] == "CANCELLED"


def test_given_a_missing_version_then_the_later_event_waits_as_a_gap_and_the_row_stays() -> None:
    current, *_ = fold(ORDER, None, (11, placed()))
    row, outcomes, trail, items = fold(ORDER, current, (50, cancelled(3)))
    assert outcomes == [Outcome.GAP]
    assert row == current and trail == []
    assert (items[0].applied_version, items[0].applied_seq) == (1, 11)  # what it waits after


def test_given_a_product_when_stock_moves_then_the_view_takes_the_stock_each_event_carries() -> None:
    upserted = events_pb2.ProductUpserted(name="Lamp", unit_price=money(1500, "EUR"), stock=0)
    reserved = events_pb2.StockReserved(order_id=ORDER_ID, quantity=2, stock=8)
    row, outcomes, trail, _ = fold(
        PRODUCT,
        None,
        (1, event(PRODUCT, "LAMP-1", 1, product_upserted=upserted)),
        (2, event(PRODUCT, "LAMP-1", 2, inventory_adjusted=events_pb2.InventoryAdjusted(delta=10, stock=10))),
        (3, event(PRODUCT, "LAMP-1", 3, stock_reserved=reserved)),
    )
    assert outcomes == [Outcome.APPLIED] * 3 and len(trail) == 3
    view = (row["sku"], row["name"], row["unit_price_minor"], row["stock"], row["version"])
    assert view == ("LAMP-1", "Lamp", 1500, 8, 3)


@pytest.mark.parametrize(
    ("envelope", "why"),
    [
        # (an OrderPlaced of version 2 and an event of the wrong aggregate type: test_plumbing)
        (cancelled(1), "cannot be the first event"),
        (events_pb2.EventEnvelope(aggregate_type=ORDER, aggregate_id=ORDER_ID, aggregate_version=1), "unknown"),
    ],
)
def test_an_event_that_contradicts_its_envelope_is_never_applicable(
    envelope: events_pb2.EventEnvelope, why: str
) -> None:
    with pytest.raises(NeverApplicable, match=why):
        check_applicable(envelope)
