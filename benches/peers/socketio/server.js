// A socket.io 4 server on the Redis adapter, one of the "hosts" of scripts/bench-api.sh.
//
// Usage: node server.js PORT REDIS_URL
//
// WebSocket transport only (clients skip long-polling, as `transports: ["websocket"]` does).
// A client emits `join` with a room's name; it is put in the room and answered with `joined`.
// What a backend emits to a room through the Redis emitter (@socket.io/redis-emitter) reaches
// the room's clients on every server sharing the Redis: the Redis adapter subscribes to the
// emitter's channels. Prints "ready PORT" once it listens and both Redis clients are up.
"use strict";
const { createServer } = require("http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");

const [port, redisUrl] = process.argv.slice(2);
if (!port || !redisUrl) {
  console.error("usage: node server.js PORT REDIS_URL");
  process.exit(2);
}

async function main() {
  const pub = createClient({ url: redisUrl });
  const sub = pub.duplicate();
  for (const c of [pub, sub]) c.on("error", (e) => console.error("redis:", e.message));
  await Promise.all([pub.connect(), sub.connect()]);
  const http = createServer();
  const io = new Server(http, { transports: ["websocket"], serveClient: false });
  io.adapter(createAdapter(pub, sub));
  io.on("connection", (socket) => {
    socket.on("join", (room) => {
      if (typeof room !== "string") return;
      socket.join(room);
      socket.emit("joined", room);
    });
  });
  http.listen({ port: Number(port), host: "127.0.0.1", backlog: 4096 }, () => {
    console.log(`ready ${port}`);
  });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
