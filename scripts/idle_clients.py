#!/usr/bin/env python3
"""Open N WebSocket connections to a wsd worker and hold them idle (stdlib only).

Used by scripts/bench-idle-memory.sh. Each connection does a real upgrade (random
Sec-WebSocket-Key, checks 101 and Sec-WebSocket-Accept) and, unless --no-echo, sends one
masked text frame and waits for its echo. Then it idles, answering server Pings with Pongs so
the server's keepalive (if any) does not close it. With --deflate it offers permessage-deflate,
and its message (long enough to be compressed) goes compressed both ways, so the server holds
whatever compression state its mode keeps per connection.

Prints `READY opened=N failed=F` on stdout once every attempt has finished, then holds the
connections until SIGTERM/SIGINT (or until its parent dies).
"""
import argparse, asyncio, base64, hashlib, os, signal, struct, sys, zlib

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PER_SOURCE_IP = 500  # spread clients over 127.0.x.y so per-IP limits and port ranges don't bite


def frame(opcode, payload, rsv1=False):
    """A masked client frame (payloads here are < 126 bytes); `rsv1`: compressed."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | (0x40 if rsv1 else 0) | opcode, 0x80 | len(payload)]) + mask + masked


async def read_frame(r):
    """(opcode, payload) of one server frame (unmasked, as servers send)."""
    b0, b1 = await r.readexactly(2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack(">H", await r.readexactly(2))[0]
    elif n == 127:
        n = struct.unpack(">Q", await r.readexactly(8))[0]
    return b0, await r.readexactly(n)


class Bench:
    def __init__(self, a):
        self.a, self.opened, self.failed, self.dropped, self.first_error = a, 0, 0, 0, None
        self.conns = []

    async def open_one(self, i):
        a = self.a
        k = i // PER_SOURCE_IP
        src = (f"127.0.{1 + k // 254}.{1 + k % 254}", 0) if a.host.startswith("127.") else None
        r, w = await asyncio.open_connection(a.host, a.port, local_addr=src)
        try:
            key = base64.b64encode(os.urandom(16))
            offer = b"Sec-WebSocket-Extensions: permessage-deflate\r\n" if a.deflate else b""
            w.write(b"GET / HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n"
                    % (a.host.encode(), a.port, key, offer))
            head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            if not head[0].startswith("HTTP/1.1 101"):
                raise RuntimeError(f"upgrade refused: {head[0]!r}")
            hdrs = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in head[1:] if l)}
            want = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
            if hdrs.get("sec-websocket-accept") != want:
                raise RuntimeError("bad Sec-WebSocket-Accept")
            deflate = a.deflate and hdrs.get("sec-websocket-extensions", "").startswith("permessage-deflate")
            if a.deflate and not deflate:
                raise RuntimeError("permessage-deflate was not agreed")
            if not a.no_echo:
                msg = (b"hello %d " % i) * (12 if deflate else 1)
                if deflate:
                    c = zlib.compressobj(wbits=-15)
                    w.write(frame(0x1, (c.compress(msg) + c.flush(zlib.Z_SYNC_FLUSH))[:-4], rsv1=True))
                else:
                    w.write(frame(0x1, msg))
                while True:
                    b0, data = await read_frame(r)
                    op = b0 & 0x0F
                    if b0 & 0x40:
                        data = zlib.decompressobj(wbits=-15).decompress(data + b"\x00\x00\xff\xff")
                    if op == 0x9:
                        w.write(frame(0xA, data))
                    elif op == 0x1 and data == msg:
                        break
                    else:
                        raise RuntimeError(f"unexpected frame opcode {op} instead of the echo")
        except BaseException:
            w.close()
            raise
        return r, w

    async def idle(self, r, w):
        """Answer Pings until the server closes the connection."""
        try:
            while True:
                b0, data = await read_frame(r)
                if b0 & 0x0F == 0x9:
                    w.write(frame(0xA, data))
                elif b0 & 0x0F == 0x8:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.dropped += 1
        if self.dropped == 1:  # once: the script checks the server's count anyway
            print("idle_clients: the server closed an idle connection", file=sys.stderr)

    async def worker(self, ids):
        for i in ids:
            try:
                r, w = await asyncio.wait_for(self.open_one(i), self.a.timeout)
            except Exception as e:  # count it, keep the first reason for the report
                self.failed += 1
                self.first_error = self.first_error or f"connection {i}: {e!r}"
                continue
            self.opened += 1
            self.conns.append((w, asyncio.ensure_future(self.idle(r, w))))

    async def run(self):
        a, loop = self.a, asyncio.get_running_loop()
        # Stop at once, even mid-way: exiting closes every socket, no goodbye needed here.
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, os._exit, 0)
        asyncio.ensure_future(self.exit_with_parent(os.getppid()))
        # `concurrency` coroutines share the N ids, so at most that many handshakes are in flight.
        ids = iter(range(a.n))
        await asyncio.gather(*(self.worker(ids) for _ in range(min(a.concurrency, a.n))))
        if self.first_error:
            print(f"idle_clients: {self.failed} failed; first: {self.first_error}", file=sys.stderr)
        print(f"READY opened={self.opened} failed={self.failed}", flush=True)
        await asyncio.Event().wait()  # hold the connections until a signal

    @staticmethod
    async def exit_with_parent(parent):
        """Don't outlive the script, even if it was SIGKILLed and could not clean up."""
        while os.getppid() == parent:
            await asyncio.sleep(1)
        os._exit(1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=10000, help="connections to open")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument("--timeout", type=float, default=30, help="seconds per connection attempt")
    p.add_argument("--no-echo", action="store_true", help="skip the one echo per connection")
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate; compress the echo")
    asyncio.run(Bench(p.parse_args()).run())


if __name__ == "__main__":
    main()
