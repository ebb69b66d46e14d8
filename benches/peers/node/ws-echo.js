// Node `ws` echo server for scripts/bench-peers.sh: text and binary messages sent back as they
// came (ws answers pings and the close handshake itself). No permessage-deflate (ws's server
// default; wsd bench does not offer it anyway).
//
// Usage: node ws-echo.js PORT   (listens on 127.0.0.1:PORT)
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2]);
if (!Number.isInteger(port) || port <= 0) {
  console.error('usage: node ws-echo.js PORT');
  process.exit(2);
}
const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(`node ws ${require('ws/package.json').version} listening on 127.0.0.1:${port}`));
