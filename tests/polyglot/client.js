// A Node.js client of the orders services that knows only the .proto files:
// places an order, reads it back with its consistency token, and receives it on a watch stream; then
// decodes the google.rpc.BadRequest details of a refused command, from google/rpc/status.proto and
// error_details.proto (found under <googleapis protos dir>).
// Usage: node client.js <command host:port> <query host:port> <protos dir> <sku> <customer> <googleapis protos dir>
// Prints one JSON object with what it saw; exits non-zero on any error.
"use strict";

const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");
const protobuf = require("protobufjs");
const crypto = require("node:crypto");
const path = require("node:path");

const [commandAddr, queryAddr, protosDir, sku, customer, googleDir] = process.argv.slice(2);
const definition = protoLoader.loadSync(
  ["orders/v1/commands.proto", "orders/v1/queries.proto"].map((file) => path.join(protosDir, file)),
  { includeDirs: [protosDir], keepCase: false, longs: String, enums: String, defaults: true },
);
const v1 = grpc.loadPackageDefinition(definition).orders.v1;
const commands = new v1.CommandService(commandAddr, grpc.credentials.createInsecure());
const queries = new v1.QueryService(queryAddr, grpc.credentials.createInsecure());

// The rich error model: a google.rpc.Status in the grpc-status-details-bin trailer, its details as Any.
const rpcTypes = protobuf.loadSync(
  ["google/rpc/status.proto", "google/rpc/error_details.proto"].map((file) => path.join(googleDir, file)),
);

function fieldViolations(error) {
  const [bytes] = error.metadata.get("grpc-status-details-bin");
  const status = rpcTypes.lookupType("google.rpc.Status").decode(bytes);
  const badRequest = rpcTypes.lookupType("google.rpc.BadRequest");
  return status.details
    .filter((detail) => detail.type_url === "type.googleapis.com/google.rpc.BadRequest")
    .flatMap((detail) => badRequest.decode(detail.value).fieldViolations.map((v) => v.field));
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

function call(client, method, request) {
  return new Promise((resolve, reject) => {
    client[method](request, new grpc.Metadata(), deadline(10), (error, reply) => (error ? reject(error) : resolve(reply)));
  });
}

function nextMessages(stream, count) {
  return new Promise((resolve, reject) => {
    const messages = [];
    stream.on("data", (message) => {
      messages.push(message);
      if (messages.length === count) resolve(messages);
    });
    stream.on("error", (error) => {
      if (error.code !== grpc.status.CANCELLED) reject(error);
    });
  });
}

async function main() {
  const placed = await call(commands, "PlaceOrder", {
    requestId: crypto.randomUUID(),
    customerId: customer,
    lines: [{ sku, quantity: 2 }],
  });
  const read = await call(queries, "GetOrderSummary", {
    orderId: placed.orderId,
    consistencyToken: placed.consistencyToken,
  });
  // Snapshot first (the order as placed), then the live change made after the snapshot arrived.
  const watch = queries.WatchOrderSummaries(
    { customerId: customer, includeSnapshot: true, consistencyToken: placed.consistencyToken },
    deadline(30),
  );
  const watched = nextMessages(watch, 2);
  await new Promise((resolve) => watch.once("data", resolve));
  await call(commands, "CancelOrder", { requestId: crypto.randomUUID(), orderId: placed.orderId, reason: "node" });
  const messages = await watched;
  watch.cancel();
  let refused = null;
  let refusedFields = null;
  try {
    await call(commands, "PlaceOrder", { requestId: crypto.randomUUID(), customerId: "", lines: [] });
  } catch (error) {
    refused = grpc.status[error.code];
    refusedFields = fieldViolations(error);
  }
  console.log(JSON.stringify({ placed: placed.orderId, read: read.summary, watched: messages, refused, refusedFields }));
  commands.close();
  queries.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
