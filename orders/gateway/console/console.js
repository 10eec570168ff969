// The operator console: plain JavaScript over the gateway's Connect protocol (JSON bodies; server streams
// as enveloped JSON messages). Nothing here is polled except the health badges and the lag chart: an
// order's "processing" ends when a read with its consistency token answers, and the live list follows
// WatchOrderSummaries.
"use strict";

const $ = (selector) => document.querySelector(selector);
const tokenInput = $("#token");
tokenInput.value = sessionStorage.getItem("orders-token") || "";
tokenInput.addEventListener("change", () => sessionStorage.setItem("orders-token", tokenInput.value.trim()));

class RpcError extends Error {
  constructor(code, message, details) {
    super(`${code}: ${message}`);
    this.code = code;
    this.details = details || [];
  }
}

function headers(contentType, timeoutMs) {
  const result = { "Content-Type": contentType, "Connect-Protocol-Version": "1" };
  const token = tokenInput.value.trim();
  if (token) result.Authorization = `Bearer ${token}`;
  if (timeoutMs) result["Connect-Timeout-Ms"] = String(timeoutMs);
  return result;
}

async function call(service, method, body, timeoutMs = 10000) {
  const response = await fetch(`/orders.v1.${service}/${method}`, {
    method: "POST", headers: headers("application/json", timeoutMs), body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) throw new RpcError(data.code || "unknown", data.message || response.statusText, data.details);
  return data;
}

// A server stream: yields each message; throws the stream's error; ends at the end-of-stream message.
async function* stream(service, method, body, signal) {
  const json = new TextEncoder().encode(JSON.stringify(body));
  const frame = new Uint8Array(5 + json.length);
  new DataView(frame.buffer).setUint32(1, json.length);
  frame.set(json, 5);
  const response = await fetch(`/orders.v1.${service}/${method}`, {
    method: "POST", headers: headers("application/connect+json"), body: frame, signal,
  });
  if (!response.ok) {
    const data = await response.json().catch(() => ({}));
    throw new RpcError(data.code || "unknown", data.message || response.statusText, data.details);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = new Uint8Array(0);
  for (;;) {
    while (buffer.length >= 5) {
      const size = new DataView(buffer.buffer, buffer.byteOffset).getUint32(1);
      if (buffer.length < 5 + size) break;
      const flags = buffer[0];
      const message = JSON.parse(decoder.decode(buffer.subarray(5, 5 + size)) || "{}");
      buffer = buffer.slice(5 + size);
      if (flags & 2) {
        if (message.error) throw new RpcError(message.error.code, message.error.message, message.error.details);
        return;
      }
      yield message;
    }
    const { value, done } = await reader.read();
    if (done) throw new RpcError("unavailable", "the stream ended without its end message");
    const joined = new Uint8Array(buffer.length + value.length);
    joined.set(buffer);
    joined.set(value, buffer.length);
    buffer = joined;
  }
}

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function badge(text, className) {
  const span = document.createElement("span");
  span.className = `status ${className}`;
  span.textContent = text;
  return span;
}

const money = (m) => (m ? `${(Number(m.minorUnits || 0) / 100).toFixed(2)} ${m.currencyCode}` : "");
const statusName = (s) => (s || "").replace("ORDER_STATUS_", "").toLowerCase();
const newId = () => (crypto.randomUUID ? crypto.randomUUID()
  : Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join(""));

// ---- place an order: processing until the read model shows it -------------------------------------

$("#place-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = event.target;
  const out = $("#placed");
  out.replaceChildren(badge("sending", "processing"));
  const lines = form.lines.value.split(/\n/).map((l) => l.trim()).filter(Boolean).map((l) => {
    const [sku, quantity] = l.split(":");
    return { sku: sku.trim(), quantity: Number(quantity) };
  });
  try {
    const placed = await call("CommandService", "PlaceOrder", { requestId: newId(), customerId: form.customer.value.trim(), lines });
    out.replaceChildren(badge("processing", "processing"), ` order ${placed.orderId}: accepted, waiting for the read model`);
    out.dataset.orderId = placed.orderId;
    for (;;) {
      try {  // the query service waits (up to its limit) until the read model reflects the token
        const { summary } = await call("QueryService", "GetOrderSummary",
          { orderId: placed.orderId, consistencyToken: placed.consistencyToken }, 15000);
        out.replaceChildren(badge("placed", "placed"),
          ` order ${summary.orderId}: ${statusName(summary.status)}, ${summary.itemCount} items, ${money(summary.total)}`);
        return;
      } catch (error) {
        if (!(error instanceof RpcError) || !["unavailable", "deadline_exceeded"].includes(error.code)) throw error;
      }
    }
  } catch (error) {
    out.replaceChildren(badge("error", "error"), ` ${error.message}`);
  }
});

// ---- live orders of a customer ---------------------------------------------------------------------

let watching = null;
$("#watch-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (watching) watching.abort();
  watching = new AbortController();
  $("#live-orders").replaceChildren();
  watch(event.target.customer.value.trim(), watching.signal);
});

async function watch(customerId, signal) {
  const state = $("#watch-state");
  const rows = new Map();
  let after = 0;  // the highest stream sequence seen: a resumed watch starts after it
  while (!signal.aborted) {
    const request = after ? { customerId, afterSequence: String(after) } : { customerId, includeSnapshot: true };
    try {
      state.textContent = "live";
      for await (const { summary } of stream("QueryService", "WatchOrderSummaries", request, signal)) {
        after = Math.max(after, Number(summary.streamSequence || 0));
        let row = rows.get(summary.orderId);
        if (!row) {
          row = $("#live-orders").insertRow(0);
          row.dataset.orderId = summary.orderId;
          rows.set(summary.orderId, row);
        }
        row.replaceChildren();
        cell(row, summary.orderId, "id");
        row.insertCell().append(badge(statusName(summary.status), summary.status));
        cell(row, summary.itemCount || "0");
        cell(row, money(summary.total));
        cell(row, summary.updatedAt || "");
      }
    } catch (error) {
      if (signal.aborted) return;
      state.textContent = `reconnecting (${error.message})`;
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }
}

// ---- products ----------------------------------------------------------------------------------------

// Fill a table body with one row per item that load() returns; a failure shows as one row saying why.
async function fillTable(body, columns, load, render) {
  try {
    const items = await load();
    body.replaceChildren();
    for (const item of items) render(body.insertRow(), item);
  } catch (error) {
    body.replaceChildren();
    cell(body.insertRow(), error.message).colSpan = columns;
  }
}

const loadProducts = () => fillTable($("#product-rows"), 4,
  async () => (await call("QueryService", "ListProducts", { pageSize: 100 })).products || [],
  (row, p) => { for (const text of [p.sku, p.name, money(p.unitPrice), p.stock || "0"]) cell(row, text); });
$("#products-refresh").addEventListener("click", loadProducts);

// ---- projection lag chart, dead letters ----------------------------------------------------------------

const WINDOW_MS = 5 * 60 * 1000;
const samples = [];
let deadLetterCount = null;

async function sampleLag() {
  try {
    const lag = await call("AdminService", "GetProjectionLag", {});
    samples.push({ at: Date.now(), events: Number(lag.lagEvents || 0) });
    $("#lag-now").textContent = `${lag.lagEvents || 0} events, ${(lag.lagSeconds || 0).toFixed(1)} s behind; `
      + `${lag.unpublishedEvents || 0} not yet published; ${lag.deadLetters || 0} dead letters`;
    const dead = Number(lag.deadLetters || 0);
    if (dead !== deadLetterCount) {
      deadLetterCount = dead;
      loadDeadLetters();
    }
  } catch (error) {
    $("#lag-now").textContent = error.message;
  }
  while (samples.length && samples[0].at < Date.now() - WINDOW_MS) samples.shift();
  const top = Math.max(1, ...samples.map((s) => s.events));
  const now = Date.now();
  $("#lag-events").setAttribute("points", samples.map((s) =>
    `${(600 * (1 - (now - s.at) / WINDOW_MS)).toFixed(1)},${(155 - 150 * s.events / top).toFixed(1)}`).join(" "));
}

const loadDeadLetters = () => fillTable($("#dead-letter-rows"), 6,
  async () => (await call("AdminService", "ListDeadLetters", { pageSize: 100 })).deadLetters || [],
  (row, d) => {
    row.dataset.id = d.id;
    cell(row, d.id, "id");
    cell(row, `${d.aggregateType} ${d.aggregateId}`);
    cell(row, d.aggregateVersion);
    cell(row, d.reason);
    cell(row, d.deliveries);
    const actions = row.insertCell();
    for (const [label, action] of [
      ["show", () => showDeadLetter(d.id)],
      ["replay", () => settleDeadLetter("ReplayDeadLetters", d.id)],
      ["discard", () => settleDeadLetter("DiscardDeadLetters", d.id)],
    ]) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.addEventListener("click", () => action().catch((error) => alert(error.message)));
      actions.append(button);
    }
  });

async function showDeadLetter(id) {
  const { deadLetter } = await call("AdminService", "GetDeadLetter", { id: String(id) });
  const detail = $("#dead-letter-detail");
  detail.textContent = JSON.stringify(deadLetter, null, 2);
  detail.hidden = false;
}

// Replay or discard one dead letter, then show the list as it is now.
async function settleDeadLetter(method, id) {
  await call("AdminService", method, { ids: [String(id)] });
  $("#dead-letter-detail").hidden = true;
  deadLetterCount = null;  // the next lag sample reloads the list whatever the count is then
  await loadDeadLetters();
}
$("#dead-letters-refresh").addEventListener("click", loadDeadLetters);

// ---- health --------------------------------------------------------------------------------------------

async function loadHealth() {
  const list = $("#health");
  try {
    const report = await (await fetch("/api/health", { cache: "no-store" })).json();
    list.replaceChildren(...Object.entries(report).map(([name, status]) => {
      const item = document.createElement("li");
      item.className = status;
      item.dataset.service = name;
      item.textContent = `${name}: ${status}`;
      return item;
    }));
  } catch (error) {
    const item = document.createElement("li");
    item.className = "down";
    item.textContent = "gateway: no answer";
    list.replaceChildren(item);
  }
}

loadHealth();
loadProducts();
sampleLag();
setInterval(loadHealth, 5000);
setInterval(sampleLag, 2000);
