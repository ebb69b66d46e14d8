// Node `ws` server for scripts/bench-peers.sh: text and binary messages sent back as they came
// (ws answers pings and the close handshake itself), or with --chat sent to every client, the
// sender included (ws's broadcast example: a loop over `wss.clients`).
//
// --deflate  permessage-deflate as ws's README enables it (`perMessageDeflate: true`: zlib's
//            default level, context takeover, messages of 1 KiB or more compressed, on
//            libuv's thread pool)
// Without it, no permessage-deflate (ws's server default).
//
// Usage: node ws-echo.js PORT [--chat] [--deflate]   (listens on 127.0.0.1:PORT)
'use strict';
const { WebSocketServer, WebSocket } = require('ws');

const args = process.argv.slice(2);
const port = Number(args[0]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node ws-echo.js PORT [--chat] [--deflate]');
  process.exit(2);
}
const chat = args.includes('--chat');
const perMessageDeflate = args.includes('--deflate');
const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096, perMessageDeflate });
wss.on('connection', (ws) => {
  if (chat) {
    ws.on('message', (data, isBinary) => {
      for (const client of wss.clients) {
        if (client.readyState === WebSocket.OPEN) client.send(data, { binary: isBinary });
      }
    });
  } else {
    ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  }
  ws.on('error', () => {});
});
wss.on('listening', () =>
  console.log(`node ws ${require('ws/package.json').version} listening on 127.0.0.1:${port}${chat ? ' (chat)' : ''}${perMessageDeflate ? ' (deflate)' : ''}`),
);
