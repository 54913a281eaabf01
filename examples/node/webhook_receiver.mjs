// Receive a collabbus network's events as webhooks in Node.js: node:http and node:crypto alone
// (the same receiver as webhook_receiver.py).
//
//     COLLABBUS_WEBHOOK_SECRET=whsec_… node webhook_receiver.mjs 9000
//
// Register the endpoint with POST /webhooks (its answer shows the secret, once). Each delivery is
// a structured CloudEvent signed as Standard Webhooks prescribe: `webhook-signature` holds
// `v1,<base64 HMAC-SHA256>` of `<webhook-id>.<webhook-timestamp>.<body>`, keyed with the base64
// after `whsec_`. This receiver
//
// - checks the signature and the timestamp (within 5 minutes), and answers 400 to anything that fails;
// - keeps the event, then answers 204 (a 2xx tells the bus the receiver has it: it is not sent
//   again; anything else is tried again, and the bus waits for no one);
// - drops repeats: a retry carries the same webhook-id, the event's id;
// - keeps, of the events about one thing (type domain and subject), the latest in the log: the bus
//   sends those in log order, but a resend or a recovery brings older ones again, and each carries
//   its place in the log as `collabbus-sequence`;
//
// and prints every new event as one JSON line ("stale": true for one older than what it holds
// already). A place to start from, not a product: a real receiver keeps `seen` and `latest` in its
// database, stores the event (or queues its work) before answering, and does the work after.

import { createHmac, timingSafeEqual } from "node:crypto";
import { createServer } from "node:http";
import { pathToFileURL } from "node:url";

const TOLERANCE_SECONDS = 5 * 60;
const secret = process.env.COLLABBUS_WEBHOOK_SECRET ?? "";
const key = Buffer.from(secret.replace(/^whsec_/, ""), "base64");
const seen = new Set(); // webhook-ids handled
const latest = new Map(); // "<domain> <subject>" -> the highest collabbus-sequence handled

/** The event, if the delivery is signed with this endpoint's secret and recent; else why not. */
export function verify(body, headers, now = Date.now() / 1000) {
  const id = headers["webhook-id"], timestamp = headers["webhook-timestamp"], signatures = headers["webhook-signature"];
  if (!id || !timestamp || !signatures) return { error: "missing webhook-id, webhook-timestamp or webhook-signature" };
  if (!/^\d+$/.test(timestamp) || Math.abs(now - Number(timestamp)) > TOLERANCE_SECONDS) return { error: "timestamp too old or too new" };
  const expected = createHmac("sha256", key).update(`${id}.${timestamp}.`).update(body).digest();
  const valid = signatures.split(" ").some((entry) => {
    const [version, signature] = entry.split(",", 2);
    const given = Buffer.from(signature ?? "", "base64");
    return version === "v1" && given.length === expected.length && timingSafeEqual(given, expected);
  });
  if (!valid) return { error: "no matching signature" };
  return { event: JSON.parse(body.toString("utf8")) };
}

function handle(request, response) {
  const chunks = [];
  request.on("data", (chunk) => chunks.push(chunk));
  request.on("end", () => {
    const body = Buffer.concat(chunks);
    const { event, error } = verify(body, request.headers);
    if (error !== undefined) {
      response.writeHead(400, { "Content-Type": "text/plain" }).end(`not a delivery of this endpoint: ${error}`);
      return;
    }
    const id = request.headers["webhook-id"];
    if (!seen.has(id)) { // (else a retry of a delivery handled already)
      seen.add(id);
      const sequence = Number(request.headers["collabbus-sequence"] ?? 0);
      const thing = `${event.type.split(".")[0]} ${event.subject ?? ""}`;
      const stale = sequence < (latest.get(thing) ?? 0);
      if (!stale) latest.set(thing, sequence);
      console.log(JSON.stringify({ id: event.id, type: event.type, subject: event.subject ?? null, sequence, source: event.source, stale }));
    }
    response.writeHead(204).end(); // kept: now the bus may take it as delivered
  });
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  const port = Number(process.argv[2] ?? 9000);
  createServer(handle).listen(port, "127.0.0.1", () => console.error(`listening on http://127.0.0.1:${port}/`));
}
