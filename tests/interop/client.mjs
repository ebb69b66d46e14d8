// The Node `ws` library against a real wsd, for tests/interop.rs.
//
//   node tests/interop/client.mjs SPEC
//   INTEROP_NODE_DIR=dir   where ws is installed (default target/interop-node)
//
// SPEC is JSON: {"ca": CA_FILE, "protocols": [OFFERED, ...], "groups": [{"name": NAME, "url":
// "wss://localhost:PORT/", "port": PORT}, ...]}. Each group gets two connections: one with
// perMessageDeflate: true (ws offers permessage-deflate) and one with false (no offer). Each
// connects to 127.0.0.1 (the name checked against the certificate stays `localhost`), trusting
// CA_FILE alone, offers the subprotocols, echoes text and binary messages (a 100 KB one of
// each, and a text in three frames), pings, and closes with 4000. Prints one JSON report on
// stdout: {"client": "node ws VERSION", "runs": [{"group", "offer_deflate", "protocol",
// "extensions", "close_code", "echoes", "pong"}, ...]}; the test judges it. Exits 1 on the
// first step that fails or takes over 20 s, naming the group and the step.
import { createRequire } from "node:module";
import { readFileSync } from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const nodeDir = process.env.INTEROP_NODE_DIR || path.join(root, "target/interop-node");
const require = createRequire(path.join(nodeDir, "package.json"));
const WebSocket = require("ws");
const CLIENT = `node ws ${require("ws/package.json").version}`;
const STEP_TIMEOUT = 20_000; // ms

if (process.argv.length !== 3) {
  console.error("usage: node tests/interop/client.mjs SPEC");
  process.exit(2);
}
const spec = JSON.parse(process.argv[2]);
const ca = readFileSync(spec.ca);

/** Resolves every name to 127.0.0.1, in both of the forms net.connect may ask for. */
function loopback(host, options, callback) {
  if (options.all) callback(null, [{ address: "127.0.0.1", family: 4 }]);
  else callback(null, "127.0.0.1", 4);
}

let x = 0x2545f491;
const random = Buffer.alloc(100_000, 0).map(() => {
  x ^= x << 13;
  x ^= x >>> 17;
  x ^= x << 5;
  return x & 0xff;
});
const MESSAGES = [
  ["text", "héllo wss ✓"],
  ["empty text", ""],
  ["100 KB text", "wsd interop, compressible text. ".repeat(3125)],
  ["binary", Buffer.from([0, 1, 2, 254, 255])],
  ["100 KB binary", random],
  // Sent as three frames (fin: false, false, true), echoed as one message.
  ["fragmented text", [0, 1, 2].map((i) => `fragment ${i} of a text message. `.repeat(600))],
];

/** A connection whose events are read in order, each within STEP_TIMEOUT. */
class Conn {
  constructor(url, offerDeflate) {
    this.events = [];
    this.wake = () => {};
    this.upgrade = null;
    this.ws = new WebSocket(url, spec.protocols, {
      ca,
      lookup: loopback,
      perMessageDeflate: offerDeflate,
      handshakeTimeout: STEP_TIMEOUT,
    });
    const push = (event) => {
      this.events.push(event);
      this.wake();
    };
    this.ws.on("upgrade", (response) => (this.upgrade = response));
    this.ws.on("open", () => push({ type: "open" }));
    this.ws.on("message", (data, binary) => push({ type: "message", data, binary }));
    this.ws.on("pong", (data) => push({ type: "pong", data }));
    this.ws.on("error", (error) => push({ type: "error", error }));
    this.ws.on("close", (code, reason) => push({ type: "close", code, reason: reason.toString() }));
  }

  /** The next event, which must be of `type`; `step` names the wait in the error. */
  async next(type, step) {
    const deadline = Date.now() + STEP_TIMEOUT;
    while (!this.events.length) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${step}: nothing within ${STEP_TIMEOUT / 1000} s`);
      await new Promise((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, left).unref();
      });
    }
    const event = this.events.shift();
    if (event.type !== type) {
      const detail = event.error?.message ?? event.code ?? "";
      throw new Error(`${step}: got ${event.type} ${detail}`);
    }
    return event;
  }
}

async function run(group, offerDeflate) {
  const conn = new Conn(group.url, offerDeflate);
  await conn.next("open", `connecting to ${group.url}`);
  // The server's answer, and what ws made of it: the two must agree.
  const extensions = conn.upgrade?.headers["sec-websocket-extensions"] ?? "";
  if (conn.ws.extensions !== (extensions ? "permessage-deflate" : "")) {
    throw new Error(`the answer ${JSON.stringify(extensions)}: ws uses "${conn.ws.extensions}"`);
  }
  let echoes = 0;
  for (const [what, sent] of MESSAGES) {
    if (Array.isArray(sent)) {
      sent.forEach((piece, i) => conn.ws.send(piece, { fin: i === sent.length - 1 }));
    } else {
      conn.ws.send(sent);
    }
    const { data, binary } = await conn.next("message", `echo of the ${what} message`);
    const same = Buffer.isBuffer(sent)
      ? binary && sent.equals(data)
      : !binary && data.toString() === [sent].flat().join("");
    if (!same) throw new Error(`echo of the ${what} message: it came back different`);
    echoes++;
  }
  conn.ws.ping("interop");
  const pong = await conn.next("pong", "ping");
  if (pong.data.toString() !== "interop") throw new Error(`ping: the pong said ${pong.data}`);
  conn.ws.close(4000, "bye");
  const closed = await conn.next("close", "closing handshake (Close 4000)");
  return {
    group: group.name,
    offer_deflate: offerDeflate,
    protocol: conn.ws.protocol,
    extensions,
    close_code: closed.code,
    echoes,
    pong: true,
  };
}

const runs = [];
for (const group of spec.groups) {
  for (const offerDeflate of [true, false]) {
    try {
      runs.push(await run(group, offerDeflate));
    } catch (err) {
      const offer = offerDeflate ? "perMessageDeflate: true" : "perMessageDeflate: false";
      console.error(`${CLIENT}: group ${group.name} (${offer}): ${err.message}`);
      process.exit(1);
    }
  }
}
console.log(JSON.stringify({ client: CLIENT, runs }));
