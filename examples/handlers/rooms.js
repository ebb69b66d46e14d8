#!/usr/bin/env node
/**
 * Chat rooms as a wsd exec handler, in Node with the standard library only.
 *
 * Run by wsd with `app = "exec"` and `command = ["node", "examples/handlers/rooms.js"]`. The
 * protocol is one JSON object per line each way (docs/handlers.md): wsd writes events to our
 * stdin, we write commands to our stdout, and what we print to stderr goes to wsd's log.
 *
 * What a client sends (text, JSON):
 *
 * - `{"join":"lobby"}`: subscribes it to the topic `lobby` and answers `{"joined":"lobby"}`.
 * - `{"say":"lobby","text":"hi"}`: publishes `{"room":"lobby","text":"hi","from":CONN}` to the
 *   topic `lobby`, which reaches its subscribers on every worker, not only this one's.
 * - anything else: answers `{"error":"..."}`.
 *
 * Rooms are wsd topics, so wsd does the fan-out; this process only keeps, for the connections of
 * its worker, which rooms each joined (from `connect` and `close` events). After a restart the
 * map is rebuilt from the replayed connects; their rooms start empty here, while their
 * subscriptions stay in wsd. A reload hands open connections to the new workers: this handler
 * forgets those it is told of with `handoff`, and the new one learns them, rooms included, from
 * `adopt`.
 *
 * Each chunk read from stdin is handled whole and answered in one write: a busy handler costs
 * one read and one write per batch, not per message. It exits when stdin ends (the worker is
 * stopping).
 */
'use strict';

/** A longer topic is refused by wsd. */
const MAX_ROOM = 256;

/** conn id -> Set of the rooms it joined, for this worker's open connections. */
const rooms = new Map();

function send(out, conn, value) {
  out.push({ cmd: 'send', conn, data: JSON.stringify(value) });
}

function isRoom(name) {
  return typeof name === 'string' && name.length > 0 && Buffer.byteLength(name) <= MAX_ROOM;
}

/** Pushes to `out` the commands that a client's message `data` calls for. */
function onMessage(conn, data, out) {
  if (typeof data !== 'string') {
    send(out, conn, { error: 'binary messages are not understood' });
    return;
  }
  let msg;
  try {
    msg = JSON.parse(data);
  } catch {
    send(out, conn, { error: 'not JSON' });
    return;
  }
  if (msg !== null && typeof msg === 'object' && isRoom(msg.join)) {
    const joined = rooms.get(conn) || new Set();
    rooms.set(conn, joined);
    if (!joined.has(msg.join)) {
      joined.add(msg.join);
      out.push({ cmd: 'subscribe', conn, topic: msg.join });
    }
    send(out, conn, { joined: msg.join });
  } else if (msg !== null && typeof msg === 'object' && isRoom(msg.say) && typeof msg.text === 'string') {
    const said = { room: msg.say, text: msg.text, from: conn };
    out.push({ cmd: 'publish', topic: msg.say, data: JSON.stringify(said) });
  } else {
    send(out, conn, { error: 'expected {"join":ROOM} or {"say":ROOM,"text":TEXT}' });
  }
}

function handle(event, out) {
  switch (event.event) {
    case 'connect':
      rooms.set(event.conn, new Set());
      break;
    case 'adopt':
      rooms.set(event.conn, new Set(event.topics));
      break;
    case 'close':
    case 'handoff':
      rooms.delete(event.conn);
      break;
    case 'message':
      onMessage(event.conn, event.data, out);
      break;
    default:
      break; // worker_start, timers, and answers to commands (none of ours carry an id)
  }
}

let pending = '';
process.stdin.setEncoding('utf8'); // a character cut between two chunks is kept whole
process.stdin.on('data', (chunk) => {
  const lines = (pending + chunk).split('\n');
  pending = lines.pop();
  const out = [];
  for (const line of lines) {
    if (!line.trim()) continue;
    let event;
    try {
      event = JSON.parse(line);
    } catch {
      process.stderr.write(`rooms.js: not JSON: ${line.slice(0, 200)}\n`);
      continue;
    }
    handle(event, out);
  }
  if (out.length) {
    process.stdout.write(out.map((c) => JSON.stringify(c) + '\n').join(''));
  }
});
// wsd closed our stdin: the worker is stopping.
process.stdin.on('end', () => process.exit(0));
