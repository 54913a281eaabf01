// Offer an event to a collabbus network over NATS from Node.js, as a partner's own client does:
// the `nats` package and nothing of collabbus (the same steps as nats_partner.py).
//
//     npm ci     (in this directory: installs `nats` as package-lock.json pins it)
//     node nats_partner.mjs nats://127.0.0.1:4222 mersin.creds tr-mersin-bb event.json [--binary]
//
// - Connect with the .creds file the operator issued (`collabbus institutions creds`) and the
//   inbox prefix `_INBOX.<your id>`: the verdict comes back on your own inboxes.
// - Send the event as a request to `collab.ingress.<your id>.<domain>.<event>`:
//   - structured mode: the whole CloudEvent as the JSON body,
//     `Content-Type: application/cloudevents+json`;
//   - binary mode (--binary): each attribute in a `ce-<name>` header, percent-encoded UTF-8 as the
//     CloudEvents NATS binding has it, and `data` as the JSON body (`Content-Type: application/json`).
// - The reply is the verdict: {"status": "accepted", "id", "seq", "duplicate"}, or
//   {"status": "rejected", "id", "errors": [{"loc", "msg", "type"}]}. Sending the same event again
//   is safe: it answers duplicate: true with the same seq.
// - So an offer the network cannot take just now — "reason": "unavailable" (the log electing a
//   leader after a server was lost, your institution over its rate: then retry_after says how
//   long), no verdict in time, no gatekeeper listening — is sent again, the same event, for up to
//   30 seconds. Any other rejection is final: the event needs mending.
//
// Exit code: 0 accepted, 1 rejected, 2 for anything else. A place to start from, not a library.

import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { connect, credsAuthenticator, ErrorCode, headers as natsHeaders } from "nats";

/** Milliseconds an offer the network cannot take just now is sent again. */
const RETRY_FOR_MS = 30_000;

const utf8 = new TextEncoder();

/** A header value as the CloudEvents bindings write it: UTF-8, with space, `"`, `%` and everything
 * outside printable ASCII as %XX. */
export function percentEncoded(value) {
  let encoded = "";
  for (const byte of utf8.encode(String(value))) {
    const plain = byte >= 0x21 && byte <= 0x7e && byte !== 0x22 && byte !== 0x25;
    encoded += plain ? String.fromCharCode(byte) : "%" + byte.toString(16).toUpperCase().padStart(2, "0");
  }
  return encoded;
}

/** The event in binary mode: its attributes as ce- headers, its data as the body. */
export function binary(event) {
  const headers = natsHeaders();
  for (const [name, value] of Object.entries(event)) {
    if (name !== "data" && name !== "datacontenttype") headers.set(`ce-${name}`, percentEncoded(value));
  }
  headers.set("Content-Type", "application/json");
  return { headers, body: utf8.encode(JSON.stringify(event.data)) };
}

async function offer(url, creds, institution, event, binaryMode) {
  const nc = await connect({
    servers: url,
    authenticator: credsAuthenticator(readFileSync(creds)),
    inboxPrefix: `_INBOX.${institution}`,
  });
  let verdict;
  try {
    const subject = `collab.ingress.${institution}.${event.type}`; // the type is <domain>.<event>
    let message;
    if (binaryMode) {
      message = binary(event);
    } else {
      const headers = natsHeaders();
      headers.set("Content-Type", "application/cloudevents+json");
      message = { headers, body: utf8.encode(JSON.stringify(event)) };
    }
    const giveUpAt = Date.now() + RETRY_FOR_MS;
    for (;;) {
      let wait;
      let why;
      verdict = undefined;
      try {
        const reply = await nc.request(subject, message.body, { headers: message.headers, timeout: 10_000 });
        verdict = JSON.parse(new TextDecoder().decode(reply.data));
        if (verdict.status === "accepted" || verdict.reason !== "unavailable") break;
        [wait, why] = [1000 * (verdict.retry_after ?? 1), verdict.errors[0].msg];
      } catch (error) {
        if (error.code === ErrorCode.NoResponders) [wait, why] = [1000, "no gatekeeper is listening"];
        else if (error.code === ErrorCode.Timeout) [wait, why] = [1000, "no verdict within 10 s"];
        else throw error;
      }
      if (Date.now() + wait > giveUpAt) {
        if (verdict === undefined) {
          console.log(`not offered: ${why}`);
          return 2;
        }
        break;
      }
      console.error(`not taken just now (${why}); sending it again in ${wait / 1000} s`);
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  } finally {
    await nc.close();
  }
  if (verdict.status === "accepted") {
    console.log(`accepted as #${verdict.seq}` + (verdict.duplicate ? " (sent before: the same event)" : ""));
    return 0;
  }
  console.log(`rejected (${verdict.reason ?? "invalid"}):`);
  for (const error of verdict.errors) console.log(`  ${error.loc.join(".")}: ${error.msg} [${error.type}]`);
  return 1;
}

async function main(argv) {
  const args = argv.filter((arg) => arg !== "--binary");
  if (args.length !== 4) {
    console.log("usage: node nats_partner.mjs NATS_URL CREDS INSTITUTION EVENT.json [--binary]");
    return 2;
  }
  const [url, creds, institution, path] = args;
  const event = JSON.parse(readFileSync(path, "utf8"));
  return offer(url, creds, institution, event, argv.includes("--binary"));
}

if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (error) => {
      console.error(`error: ${error.message}`);
      process.exit(2);
    },
  );
}
