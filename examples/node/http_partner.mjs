// Offer an event to a collabbus network over HTTP and learn what became of it, in Node.js with its
// built-in fetch alone (the same steps as http_partner.py).
//
//     COLLABBUS_URL=http://127.0.0.1:8080 COLLABBUS_TOKEN=… node http_partner.mjs event.json
//
// event.json is a structured CloudEvent (`collabbus schemas list` names the types; `source` is
// `/institutions/<your id>`). The gateway's 202 means the event is in the log; the network applies
// it moments later, and a workflow rule may still refuse it then: the refusal is an event of its
// own, found under the event's id at GET /events/{id}. Exit code: 0 applied, 1 refused by the
// gateway or a workflow, 3 logged but waiting for the network's operator (the bus could not apply
// it), 2 for anything else. A place to start from, not a library.

import { readFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";

const base = process.env.COLLABBUS_URL ?? "http://127.0.0.1:8080";
const auth = { Authorization: `Bearer ${process.env.COLLABBUS_TOKEN}` };

async function post(event) {
  return fetch(`${base}/events`, {
    method: "POST",
    headers: { ...auth, "Content-Type": "application/json" },
    body: JSON.stringify(event),
    signal: AbortSignal.timeout(10_000),
  });
}

async function offer(event) {
  // Over the member's rate (429), or the log cannot take it just now (503: electing a leader after
  // a server was lost): wait as told and send the same event again — safe, it is one event — for
  // up to 30 seconds.
  const giveUpAt = Date.now() + 30_000;
  let answer = await post(event);
  while (answer.status === 429 || answer.status === 503) {
    const wait = 1000 * Number(answer.headers.get("Retry-After") ?? "1");
    if (Date.now() + wait > giveUpAt) break;
    await sleep(wait);
    answer = await post(event);
  }
  const body = await answer.json();
  if (answer.status !== 202) {
    // A problem (RFC 9457): `errors` says where, as [{"loc": [...], "msg": ..., "type": ...}]
    const errors = body.errors ?? []; // (the detail joins them: each is printed on its own line instead)
    console.log(`refused by the gateway (${answer.status} ${body.title})` + (errors.length ? "" : `: ${body.detail}`));
    for (const error of errors) console.log(`  ${error.loc.join(".")}: ${error.msg} [${error.type}]`);
    return 1;
  }
  console.log(`accepted as #${body.seq}` + (body.duplicate ? " (a repeat of an event already logged)" : ""));

  const deadline = Date.now() + 30_000;
  while (Date.now() < deadline) { // 404 until the network has applied it
    const found = await fetch(`${base}/events/${encodeURIComponent(body.id)}`, { headers: auth, signal: AbortSignal.timeout(10_000) });
    if (found.status === 200) {
      const outcome = await found.json();
      if (outcome.outcome === "applied") {
        const derived = outcome.derived.map((item) => item.event.type).join(", ");
        console.log("applied" + (derived ? `; it led to ${derived}` : ""));
        return 0;
      }
      if (outcome.outcome === "waiting") { // the network's operator has it in hand
        console.log(`logged, not applied yet: ${outcome.waiting}`);
        return 3;
      }
      if (outcome.refusal !== null) { // (else its refusal is decided and on its way to the log)
        const reason = outcome.refusal.event.data.reason;
        const message = reason.message.en ?? Object.values(reason.message)[0]; // a LocalizedText: English when it has it
        console.log(`refused by the workflow: ${reason.code} — ${message}`);
        return 1;
      }
    } else if (found.status !== 404) {
      throw new Error(`GET /events/${body.id} answered ${found.status}`);
    }
    await sleep(200);
  }
  console.log("not applied within 30 s: is the bus holding its events (collabbus status)?");
  return 2;
}

if (process.argv.length !== 3) {
  console.log("usage: COLLABBUS_URL=… COLLABBUS_TOKEN=… node http_partner.mjs EVENT.json");
  process.exit(2);
}
offer(JSON.parse(readFileSync(process.argv[2], "utf8"))).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`error: ${error.message}`);
    process.exit(2);
  },
);
