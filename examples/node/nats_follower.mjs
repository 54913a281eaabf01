// Follow the public part of a collabbus network's log over NATS from Node.js, as a partner's own
// client does: the `nats` package and nothing of collabbus (the same steps as nats_follower.py).
//
//     npm ci     (in this directory: installs `nats` as package-lock.json pins it)
//     node nats_follower.mjs nats://127.0.0.1:4222 mersin.creds tr-mersin-bb [SUBJECT ...] [--count N]
//
// - Connect with the .creds file the operator issued (`collabbus institutions creds`) and the
//   inbox prefix `_INBOX.<your id>`.
// - Subscribe to the live subjects, `collab.live.<institution>.<domain>.<event>.<subject>`, where
//   the log's server republishes every event it stores, of the events every member may see
//   (`collabbus institutions creds ID --json` lists them under `live_subjects`; any narrower
//   subject works too). By default: new calls and every project event.
// - Each message is one event as the log stored it, in the log's order: the structured CloudEvent
//   as JSON, its id in the `Nats-Msg-Id` header and its place in the log in `Nats-Sequence`. It is
//   printed as one JSON line on standard output: {"seq": …, "event": {…}}.
// - Live, at most once: what is logged while this is not connected does not come again; a follower
//   that must miss nothing keeps the last seq it handled and, once connected again, reads what came
//   after over HTTP (`GET /events?after_seq={seq}`), dropping what it then also receives live by seq.
// - A subject the credentials do not allow is refused by the server: said on standard error, exit 2.
//
// Runs until interrupted, or until --count events were printed (exit 0). A place to start from,
// not a library.

import { readFileSync } from "node:fs";
import { connect, credsAuthenticator } from "nats";

const DEFAULT_SUBJECTS = ["collab.live.*.call.published.*", "collab.live.*.project.>"];

async function follow(url, creds, institution, subjects, count) {
  const nc = await connect({
    servers: url,
    authenticator: credsAuthenticator(readFileSync(creds)),
    inboxPrefix: `_INBOX.${institution}`,
    // A connection the network cut without closing it is found out within ~30 s, not minutes.
    pingInterval: 10_000,
    maxPingOut: 2,
  });
  const decoder = new TextDecoder();
  let printed = 0;
  let refused = null;
  let finish;
  const finished = new Promise((resolve) => (finish = resolve));
  for (const subject of subjects) {
    nc.subscribe(subject, {
      callback: (err, msg) => {
        if (err) {
          refused ??= err.message; // the server's refusal of this subscription
          finish();
          return;
        }
        const seq = Number.parseInt(msg.headers?.get("Nats-Sequence") || "0", 10);
        console.log(JSON.stringify({ seq, event: JSON.parse(decoder.decode(msg.data)) }));
        printed += 1;
        if (count !== null && printed >= count) finish();
      },
    });
  }
  await nc.flush(); // the server has taken (or refused) every subscription when its answer comes
  await new Promise((resolve) => setTimeout(resolve, 200));
  if (refused === null) {
    console.error(`following ${subjects.join(", ")}`);
    await finished;
  }
  await nc.close();
  if (refused !== null) {
    console.error(`the server refused a subscription: ${refused} (only the public live subjects are allowed; ` +
      "`collabbus institutions creds ID --json` lists them)");
    return 2;
  }
  return 0;
}

async function main(argv) {
  const args = [...argv];
  let count = null;
  const at = args.indexOf("--count");
  if (at !== -1) {
    count = Number.parseInt(args[at + 1], 10);
    args.splice(at, 2);
  }
  if (args.length < 3) {
    console.error("usage: node nats_follower.mjs NATS_URL CREDS INSTITUTION [SUBJECT ...] [--count N]");
    return 2;
  }
  const [url, creds, institution, ...subjects] = args;
  return follow(url, creds, institution, subjects.length ? subjects : DEFAULT_SUBJECTS, count);
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err) => {
    console.error(`error: ${err.message}`);
    process.exit(2);
  },
);
