"""The operator console in a real browser (headless Chromium from Debian's package, driven by Playwright)
against a running system behind the gateway: an order placed in the page shows "processing" until the
read model has it, a cancellation made with the CLI appears on the live list, and a dead letter
appears and is gone after its replay. A screenshot of each state is saved under
test-artifacts/console/ (ORDERS_TEST_ARTIFACTS overrides the directory).

Skipped, with the reason, where Chromium is not installed and cannot be (apt-get as root).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orders.events import OutgoingEvent
from tests.e2e.gateway_harness import OPS, Gateway, add_product, gateway_system
from tests.support import Infra, product_event, publish_events

ROOT = Path(__file__).resolve().parent.parent.parent
ARTIFACTS = Path(os.environ.get("ORDERS_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "console"
WAIT_MS = 30_000


def chromium() -> str:
    """Debian's chromium, installed now if it is missing and this process may (root, apt-get)."""
    found = shutil.which("chromium")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "chromium"],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
            capture_output=True,
            timeout=900,
        )
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("no chromium (Debian package chromium) and it could not be installed here")
    return found


@pytest.fixture(scope="module")
def console(infra: Infra, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, object]]:
    from playwright.sync_api import expect, sync_playwright

    executable = chromium()
    expect.set_options(timeout=WAIT_MS)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log_dir = tmp_path_factory.mktemp("console")
    with gateway_system(infra, log_dir, max_deliver=3, retry_backoff=(0.2,)) as gateway, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(WAIT_MS)
            page.goto(gateway.url + "/")
            page.fill("#token", OPS)
            page.dispatch_event("#token", "change")
            page.reload()  # the token is kept for the session
            yield gateway, page
        finally:
            browser.close()


def publish(gateway: Gateway, *events: OutgoingEvent) -> None:
    """Publish events straight to the stream (on a thread: Playwright's loop runs on this one)."""
    with ThreadPoolExecutor(1) as thread:
        thread.submit(asyncio.run, publish_events(gateway.settings, list(events))).result(timeout=60)


def shot(page: object, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)  # type: ignore[attr-defined]


def test_health_of_each_service(console: tuple[Gateway, object]) -> None:
    from playwright.sync_api import expect

    _, page = console
    for service in ("command", "query", "admin"):
        expect(page.locator(f'#health li[data-service="{service}"]')).to_have_text(f"{service}: SERVING")  # type: ignore[attr-defined]


def test_an_order_is_processing_until_the_read_model_has_it(console: tuple[Gateway, object]) -> None:
    from playwright.sync_api import expect

    gateway, page = console
    sku = f"C-{uuid.uuid4().hex[:6]}"
    add_product(gateway, sku, stock=50)
    customer = f"console-{uuid.uuid4().hex[:6]}"
    page.fill("#watch-form input[name=customer]", customer)  # type: ignore[attr-defined]
    page.click("#watch-form button")  # type: ignore[attr-defined]
    projector = gateway.processes["projector"].proc.pid
    os.kill(projector, signal.SIGSTOP)  # the read model stands still: the order stays "processing"
    try:
        page.fill("#place-form input[name=customer]", customer)  # type: ignore[attr-defined]
        page.fill("#place-form textarea[name=lines]", f"{sku}:2")  # type: ignore[attr-defined]
        page.click("#place-form button")  # type: ignore[attr-defined]
        expect(page.locator("#placed .status")).to_have_text("processing")  # type: ignore[attr-defined]
        shot(page, "1-processing")
    finally:
        os.kill(projector, signal.SIGCONT)
    expect(page.locator("#placed .status")).to_have_text("placed")  # type: ignore[attr-defined]
    order_id = page.locator("#placed").get_attribute("data-order-id")  # type: ignore[attr-defined]
    expect(page.locator("#placed")).to_contain_text("2 items")  # type: ignore[attr-defined]
    expect(page.locator(f'#live-orders tr[data-order-id="{order_id}"] .status')).to_have_text("placed")  # type: ignore[attr-defined]
    shot(page, "2-placed")

    cancelled = subprocess.run(
        [sys.executable, "-m", "orders.cli", "cancel-order", order_id, "--reason", "from the CLI"],
        env={**os.environ, **gateway.settings.to_env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cancelled.returncode == 0, cancelled.stderr
    expect(page.locator(f'#live-orders tr[data-order-id="{order_id}"] .status')).to_have_text("cancelled")  # type: ignore[attr-defined]
    page.click("#products-refresh")  # type: ignore[attr-defined]
    expect(page.locator("#product-rows")).to_contain_text(sku)  # type: ignore[attr-defined]
    shot(page, "3-cancelled-from-the-cli")


def test_a_dead_letter_appears_and_is_gone_after_its_replay(console: tuple[Gateway, object]) -> None:
    from playwright.sync_api import expect

    gateway, page = console
    sku = f"D-{uuid.uuid4().hex[:6]}"
    # Version 3 without version 2: dead-lettered after 3 deliveries (its predecessor is missing).
    publish(gateway, product_event(sku, 1, 10), product_event(sku, 3, 30))
    row = page.locator("#dead-letter-rows tr", has_text=sku)  # type: ignore[attr-defined]
    expect(row).to_have_count(1)
    row.get_by_role("button", name="show").click()
    expect(page.locator("#dead-letter-detail")).to_contain_text(sku)  # type: ignore[attr-defined]
    expect(page.locator("#lag-events")).to_have_attribute("points", re.compile(r"\d"))  # type: ignore[attr-defined]
    shot(page, "4-dead-letter")
    publish(gateway, product_event(sku, 2, 20))  # the lost predecessor arrives
    row.get_by_role("button", name="replay").click()
    expect(row).to_have_count(0)
    shot(page, "5-replayed")

    junk = f"J-{uuid.uuid4().hex[:6]}"  # an event that can never be read: dead at once; discarded
    publish(gateway, OutgoingEvent(str(uuid.uuid4()), f"orders.v1.events.product.{junk}", {}, b"\xff\x00 not protobuf"))
    row = page.locator("#dead-letter-rows tr", has_text=junk)  # type: ignore[attr-defined]
    expect(row).to_contain_text("permanent")
    row.get_by_role("button", name="discard").click()
    expect(row).to_have_count(0)
