// Bun.serve websocket echo server (uWebSockets inside) for scripts/bench-peers.sh: text and
// binary messages sent back as they came (Bun answers pings and the close handshake itself).
// No permessage-deflate, and no idle timeout, so that a held connection is not closed mid-run.
//
// Usage: bun bun-echo.js PORT   (listens on 127.0.0.1:PORT)
const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: bun bun-echo.js PORT');
  process.exit(2);
}
Bun.serve({
  hostname: '127.0.0.1',
  port,
  fetch(req, server) {
    if (server.upgrade(req)) return undefined;
    return new Response('WebSocket only', { status: 426 });
  },
  websocket: {
    perMessageDeflate: false,
    idleTimeout: 0,
    message(ws, message) {
      ws.send(message);
    },
  },
});
console.log(`bun ${Bun.version} listening on 127.0.0.1:${port}`);
