#!/usr/bin/env python3
"""A tiny webhook backend for wsd's `app = "webhook"`, Python standard library only.

wsd POSTs each event (the JSON of docs/handlers.md) to this server and reads commands, in the
same JSON, from the answer's body:

- `connect` (before the 101): a client with `?token=letmein` is accepted as user "ada" and
  subscribed to "news"; anyone else gets 403, which wsd sends the client.
- `message`: "hello" is answered with a `send` back to its sender; "news: ..." is published
  to the "news" topic; anything else is echoed.
- `close`: nothing to say (204).

Usage: backend.py [PORT] (0, the default, picks a free port). It prints `listening on PORT`.
The words "fail500", "badjson" and "slow" make it misbehave, for wsd's tests.
"""
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class Events(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wsd's pool expects

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        event = json.loads(body)
        status, answer = self.handle_event(event)
        if isinstance(answer, (list, dict)):
            answer = json.dumps(answer)
        data = answer.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def handle_event(self, event):
        kind, conn = event.get("event"), event.get("conn")
        if kind == "connect":
            token = parse_qs(event.get("query") or "").get("token", [""])[0]
            if token != "letmein":
                return 403, "a valid token is needed"
            return 200, {"cmd": "accept", "conn": conn, "user": "ada", "subscribe": ["news"]}
        if kind == "message":
            data = event["data"]
            if data == "hello":
                return 200, [{"cmd": "send", "conn": conn, "data": "backend says: hello"}]
            if isinstance(data, str) and data.startswith("news: "):
                return 200, [{"cmd": "publish", "topic": "news", "data": data[6:]}]
            if data == "fail500":
                return 500, "something broke"
            if data == "badjson":
                return 200, "this is not json"
            if data == "slow":
                time.sleep(3)
            return 200, [{"cmd": "send", "conn": conn, "data": data}]
        return 204, ""

    def log_message(self, *args):
        pass  # quiet: wsd's tests read stdout


def main():
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    server = ThreadingHTTPServer(("127.0.0.1", port), Events)
    print(f"listening on {server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
