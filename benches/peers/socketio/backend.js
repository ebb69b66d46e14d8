// The backend that publishes for the socket.io servers of scripts/bench-api.sh: an HTTP
// endpoint taking the same requests as wsd's API, each emitted to its room with the Redis
// emitter (@socket.io/redis-emitter), the usual way for a backend that is not a socket.io
// server to reach the clients of every node.
//
// Usage: node backend.js PORT REDIS_URL
//
// POST /api/publish with {"topic": ROOM, "data": TEXT} (or an array of them) emits event "m"
// with TEXT to ROOM, and answers {"published": N} once Redis has taken the PUBLISH: like
// wsd's answer, it comes after the message has left for every host. Keep-alive, pipelining
// as Node's http server allows it. Prints "ready PORT" once it listens and Redis is up.
"use strict";
const { createServer } = require("http");
const { Emitter } = require("@socket.io/redis-emitter");
const { createClient } = require("redis");

const [port, redisUrl] = process.argv.slice(2);
if (!port || !redisUrl) {
  console.error("usage: node backend.js PORT REDIS_URL");
  process.exit(2);
}

function answer(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    "Content-Type": "application/json",
    "Content-Length": Buffer.byteLength(text),
  });
  res.end(text);
}

async function main() {
  const redis = createClient({ url: redisUrl });
  redis.on("error", (e) => console.error("redis:", e.message));
  await redis.connect();
  const emitter = new Emitter(redis);
  const http = createServer((req, res) => {
    if (req.method !== "POST" || req.url !== "/api/publish") {
      return answer(res, 404, { error: "no such endpoint" });
    }
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      let items;
      try {
        items = JSON.parse(Buffer.concat(chunks).toString("utf8"));
      } catch (e) {
        return answer(res, 400, { error: `bad JSON body: ${e.message}` });
      }
      if (!Array.isArray(items)) items = [items];
      if (items.some((m) => typeof m?.topic !== "string" || typeof m?.data !== "string")) {
        return answer(res, 422, { error: "each message needs a topic and a data string" });
      }
      for (const m of items) emitter.to(m.topic).emit("m", m.data);
      // node-redis pipelines what one tick sends; a PING queued after the PUBLISHes comes
      // back once Redis has taken them.
      redis.ping().then(
        () => answer(res, 200, { published: items.length }),
        (e) => answer(res, 503, { error: `redis: ${e.message}` }),
      );
    });
  });
  http.keepAliveTimeout = 60_000;
  http.listen({ port: Number(port), host: "127.0.0.1" }, () => {
    console.log(`ready ${port}`);
  });
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
