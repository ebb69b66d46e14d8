// Bun.serve websocket server (uWebSockets inside) for scripts/bench-peers.sh: text and binary
// messages sent back as they came (Bun answers pings and the close handshake itself), or with
// --chat sent to every client, the sender included (uWS's pub/sub: one topic everyone is
// subscribed to, published once). No idle timeout, so that a held connection is not closed
// mid-run.
//
// --tls CERT KEY  serves wss:// with that PEM certificate and key (BoringSSL inside)
// --deflate       permessage-deflate as Bun's docs set it up (`perMessageDeflate: true`), and
//                 every message sent asks for compression (`send(message, true)`)
//
// Usage: bun bun-echo.js PORT [--chat] [--deflate] [--tls CERT KEY]   (listens on 127.0.0.1:PORT)
const args = process.argv.slice(2);
const port = Number(args[0]);
const flag = (name) => args.includes(name);
const tlsAt = args.indexOf('--tls');
if (!Number.isInteger(port) || port <= 0 || (tlsAt > 0 && args.length < tlsAt + 3)) {
  console.error('usage: bun bun-echo.js PORT [--chat] [--deflate] [--tls CERT KEY]');
  process.exit(2);
}
const chat = flag('--chat');
const deflate = flag('--deflate');
const tls = tlsAt > 0 ? { cert: Bun.file(args[tlsAt + 1]), key: Bun.file(args[tlsAt + 2]) } : undefined;
const server = Bun.serve({
  hostname: '127.0.0.1',
  port,
  tls,
  fetch(req, server) {
    if (server.upgrade(req)) return undefined;
    return new Response('WebSocket only', { status: 426 });
  },
  websocket: {
    perMessageDeflate: deflate,
    idleTimeout: 0,
    open(ws) {
      if (chat) ws.subscribe('room');
    },
    message(ws, message) {
      if (chat) {
        server.publish('room', message, deflate);
      } else {
        ws.send(message, deflate);
      }
    },
  },
});
console.log(`bun ${Bun.version} listening on ${tls ? 'wss' : 'ws'}://127.0.0.1:${port}${chat ? ' (chat)' : ''}${deflate ? ' (deflate)' : ''}`);
