// Follow a collabbus network's event log over HTTP, in Node.js with its built-in fetch alone (the
// same steps as http_follower.py): for a member that cannot take webhooks (behind a firewall that
// lets no request in, say).
//
//     COLLABBUS_URL=http://127.0.0.1:8080 COLLABBUS_TOKEN=… node http_follower.mjs [TYPE]...
//
// Prints every event the token's institution may see (of the TYPEs, types or domains such as
// `call`, if given) as one JSON line {"seq": …, "event": {…}}, in log order, as it is logged. It asks
// GET /events?after_seq=N&wait=30: the gateway answers as soon as there is an event after N, or
// with an empty page after 30 seconds. Where it got to is kept in a file (COLLABBUS_POSITION_FILE,
// default collabbus-follower.position: the seq of the last event handled), written after each
// page, so a restart goes on from there: nothing is skipped, and at most the page under way when it
// stopped comes again (an event's id tells a repeat). Network trouble and a busy gateway are waited
// out. Exit code 2 when the gateway refuses the request itself (a wrong token, say). A place to
// start from, not a library.

import { existsSync, readFileSync, renameSync, writeFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";

const WAIT = 30; // seconds the gateway holds a request while there is nothing new (at most 60)
const base = process.env.COLLABBUS_URL ?? "http://127.0.0.1:8080";
const auth = { Authorization: `Bearer ${process.env.COLLABBUS_TOKEN}` };
const positionFile = process.env.COLLABBUS_POSITION_FILE ?? "collabbus-follower.position";

function handle(item) { // what to do with one event: here, print it
  process.stdout.write(JSON.stringify(item) + "\n");
}

async function follow(eventTypes) {
  const kept = (existsSync(positionFile) ? readFileSync(positionFile, "utf8").trim() : "") || "0";
  if (!/^[0-9]+$/.test(kept)) {
    console.error(`${positionFile} holds no log sequence (${JSON.stringify(kept.slice(0, 40))}): correct it, or remove it to start from the beginning`);
    return 2;
  }
  let after = Number(kept);
  let pause = 1;
  for (;;) {
    const params = new URLSearchParams([["after_seq", String(after)], ["wait", String(WAIT)], ...eventTypes.map((type) => ["type", type])]);
    let answer;
    try {
      answer = await fetch(`${base}/events?${params}`, { headers: auth, signal: AbortSignal.timeout((WAIT + 15) * 1000) });
    } catch (error) {
      console.error(`cannot reach the gateway (${error.cause?.code ?? error.message}); again in ${pause} s`);
      await sleep(pause * 1000);
      pause = Math.min(pause * 2, 60);
      continue;
    }
    if (answer.status === 429 || answer.status >= 500) {
      const wait = Number(answer.headers.get("Retry-After") ?? pause);
      console.error(`the gateway answered ${answer.status}; again in ${wait} s`);
      await answer.body?.cancel();
      await sleep(wait * 1000);
      pause = Math.min(pause * 2, 60);
      continue;
    }
    const text = await answer.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch { // not the gateway's answer (a proxy's page, say)
      body = { title: answer.statusText, detail: text.slice(0, 200) };
    }
    if (answer.status !== 200) { // a problem (RFC 9457): retrying the same request cannot help
      console.error(`refused by the gateway (${answer.status} ${body.title}): ${body.detail}`);
      return 2;
    }
    pause = 1;
    for (const item of body.items) handle(item);
    if (body.items.length) {
      after = body.items[body.items.length - 1].seq;
      writeFileSync(`${positionFile}.new`, String(after));
      renameSync(`${positionFile}.new`, positionFile); // whole or not at all, even when stopped midway
    }
  }
}

if (!process.env.COLLABBUS_TOKEN) {
  console.error("set COLLABBUS_TOKEN (collabbus institutions token <your id>)");
  process.exit(2);
}
follow(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (error) => {
    console.error(`error: ${error.message}`);
    process.exit(2);
  },
);
