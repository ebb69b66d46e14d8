#!/usr/bin/env python3
"""permessage-deflate against a running wsd, with a real client (the `websockets` library) and
raw sockets for what a library will not send (bombs, broken streams, RSV1 out of place).

    python tests/deflate/clients.py MODE PORT WORKER_PID [PLAIN_PORT]

MODE is the group's `compression` ("shared" or "dedicated"); the group runs the `echo` app
with one worker (WORKER_PID) and the default limits (max_message_size 1 MiB). PLAIN_PORT,
if given, is an echo group with compression off. Run by scripts/deflate-test.sh, which
installs `websockets` into target/deflate-venv and starts wsd. Exits 1 with the first
failed check.
"""

import asyncio
import base64
import os
import struct
import sys
import time
import zlib

import websockets
from websockets.asyncio.client import connect

MODE, PORT, WORKER_PID = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
PLAIN_PORT = int(sys.argv[4]) if len(sys.argv) > 4 else None
URL = f"ws://127.0.0.1:{PORT}/"
MAX_MESSAGE = 1 << 20
DEADLINE = 20  # seconds any single wait may take


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def deflated(data, compressor=None):
    """`data` as a client compresses it (RFC 7692 §7.2.1): raw deflate, sync flush, tail off."""
    c = compressor or zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    check(out.endswith(b"\x00\x00\xff\xff"), "a sync flush ends with 00 00 ff ff")
    return out[:-4]


def client_frame(first, payload):
    """A masked client frame; `first` is FIN, RSV and opcode."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = bytes([first, 0x80 | n])
    elif n < 65536:
        head = bytes([first, 0x80 | 126]) + struct.pack(">H", n)
    else:
        head = bytes([first, 0x80 | 127]) + struct.pack(">Q", n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


class Raw:
    """A hand-made client over a plain socket: the upgrade, then frames as given."""

    async def open(self, port=PORT, offer="permessage-deflate; client_max_window_bits"):
        self.r, self.w = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        ext = f"Sec-WebSocket-Extensions: {offer}\r\n" if offer else ""
        self.w.write(
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n".encode()
        )
        head = await asyncio.wait_for(self.r.readuntil(b"\r\n\r\n"), DEADLINE)
        lines = head.decode("latin-1").split("\r\n")
        check(lines[0].startswith("HTTP/1.1 101"), f"upgrade: {lines[0]}")
        self.headers = {k.lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:] if l)}
        return self

    async def frame(self):
        """(first byte, payload) of the next server frame."""
        b0, b1 = await asyncio.wait_for(self.r.readexactly(2), DEADLINE)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack(">H", await self.r.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await self.r.readexactly(8))[0]
        return b0, await asyncio.wait_for(self.r.readexactly(n), DEADLINE)

    async def close_code(self):
        """Reads frames until the server's Close; its code."""
        while True:
            b0, payload = await self.frame()
            if b0 & 0x0F == 0x8:
                return struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None

    def close(self):
        self.w.close()


def peak_rss_kib():
    """The worker's peak resident memory (VmHWM), in KiB."""
    with open(f"/proc/{WORKER_PID}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def negotiation_and_round_trips():
    async with connect(URL, max_size=None) as ws:
        agreed = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        check(agreed.startswith("permessage-deflate"), f"deflate agreed: {agreed!r}")
        if MODE == "shared":
            check("server_no_context_takeover" in agreed and "client_no_context_takeover" in agreed,
                  f"shared mode: no takeover either way: {agreed!r}")
        else:
            check("no_context_takeover" not in agreed, f"dedicated mode: takeover: {agreed!r}")
        for i, size in enumerate([1, 63, 64, 1000, 70_000, 300_000, 5, 20_000]):
            msg = (f"message {i} " * (size // 10 + 1))[:size]
            await ws.send(msg)
            got = await asyncio.wait_for(ws.recv(), DEADLINE)
            check(got == msg, f"text echo of {size} bytes")
            data = os.urandom(size)  # incompressible
            await ws.send(data)
            got = await asyncio.wait_for(ws.recv(), DEADLINE)
            check(got == data, f"binary echo of {size} bytes")
        print(f"  websockets {websockets.__version__}: agreed {agreed!r}, 16 echoes intact")


async def compressed_on_the_wire():
    raw = await Raw().open()
    agreed = raw.headers.get("sec-websocket-extensions", "")
    check(agreed.startswith("permessage-deflate"), f"raw client: deflate agreed: {agreed!r}")
    takeover = "server_no_context_takeover" not in agreed
    d = zlib.decompressobj(wbits=-15)
    text = b"the same words again and again " * 400
    sizes = []
    for first in (0x81, 0xC1):  # sent plain, then compressed: the echo is compressed either way
        body = text if first == 0x81 else deflated(text)
        raw.w.write(client_frame(first, body))
        b0, payload = await raw.frame()
        check(b0 == 0xC1, f"the echo has RSV1 set: {b0:#x}")
        check(len(payload) < len(text) // 10, f"and is compressed: {len(payload)} bytes")
        sizes.append(len(payload))
        if not takeover:
            d = zlib.decompressobj(wbits=-15)
        check(d.decompress(payload + b"\x00\x00\xff\xff") == text, "and inflates to the message")
    raw.w.write(client_frame(0x81, b"short"))
    b0, payload = await raw.frame()
    check((b0, payload) == (0x81, b"short"), "under compression_min_size: plain")
    raw.close()
    print(f"  on the wire: echoes of {len(text)} bytes with RSV1 in {sizes} bytes, short ones plain")


async def close_codes():
    cases = [
        ("a payload that is not deflate", client_frame(0xC2, b"\xff\xff\xff\xff"), 1007),
        ("compressed text that is not UTF-8", client_frame(0xC1, deflated(b"ok \xff\xfe")), 1007),
        ("RSV1 on a Ping", client_frame(0xC9, b"p"), 1002),
        ("RSV1 on a continuation",
         client_frame(0x41, deflated(b"abc" * 9)[:3]) + client_frame(0xC0, deflated(b"abc" * 9)[3:]),
         1002),
    ]
    for what, wire, want in cases:
        raw = await Raw().open()
        raw.w.write(wire)
        code = await raw.close_code()
        check(code == want, f"{what}: closed with {code}, not {want}")
        raw.close()
    # A declined offer leaves RSV1 a reserved bit.
    raw = await Raw().open(offer="permessage-deflate; server_max_window_bits=8")
    check("sec-websocket-extensions" not in raw.headers, "server_max_window_bits=8 is declined")
    raw.w.write(client_frame(0xC1, deflated(b"hello")))
    code = await raw.close_code()
    check(code == 1002, f"RSV1 after a declined offer: {code}")
    raw.close()
    if PLAIN_PORT:
        raw = await Raw().open(port=PLAIN_PORT)
        check("sec-websocket-extensions" not in raw.headers, "compression off: not agreed")
        raw.w.write(client_frame(0xC1, deflated(b"hello")))
        code = await raw.close_code()
        check(code == 1002, f"RSV1 where compression is off: {code}")
        raw.close()
    print(f"  close codes: 1007 for bad deflate and bad UTF-8 inside, 1002 for RSV1 out of place")


async def bombs_cost_only_their_connection():
    """Clients echo in a loop while others send bombs: 1 KiB frames that inflate to 64 MiB.
    Each bomb closes with 1009; the echoing clients never miss a message nor wait long, and
    the worker's peak memory does not grow by anything like a bomb's size."""
    bomb_body = deflated(bytes(64 << 20))
    check(len(bomb_body) < 70 << 10, f"the bomb is small: {len(bomb_body)} bytes")
    small_bomb = deflated(bytes(8 << 20))
    check(len(small_bomb) <= 9 << 10, f"and a ~1 KiB one per MiB: {len(small_bomb)} bytes")
    peak_before = peak_rss_kib()
    stop = asyncio.Event()
    worst = [0.0]
    counts = []

    async def echo_loop(n):
        async with connect(URL, max_size=None) as ws:
            i = 0
            while not stop.is_set() or i < 50:
                msg = f"client {n} message {i} " * 20
                t0 = time.monotonic()
                await ws.send(msg)
                got = await asyncio.wait_for(ws.recv(), DEADLINE)
                worst[0] = max(worst[0], time.monotonic() - t0)
                check(got == msg, f"client {n}: echo {i} intact")
                i += 1
            counts.append(i)

    async def bombers():
        codes = []
        for body in [small_bomb, bomb_body] * 10:
            raw = await Raw().open()
            raw.w.write(client_frame(0xC2, body))
            codes.append(await raw.close_code())
            raw.close()
        stop.set()
        return codes

    loops = [asyncio.create_task(echo_loop(n)) for n in range(3)]
    codes = await bombers()
    await asyncio.wait_for(asyncio.gather(*loops), DEADLINE)
    check(codes == [1009] * 20, f"every bomb closed with 1009: {codes}")
    grew = peak_rss_kib() - peak_before
    check(grew < 16 << 10, f"the worker's peak memory grew by {grew} KiB (a bomb is 64 MiB)")
    check(worst[0] < 2.0, f"the slowest echo took {worst[0]:.2f} s")
    print(f"  20 bombs closed with 1009; 3 clients echoed {sum(counts)} messages meanwhile, "
          f"slowest {worst[0] * 1000:.0f} ms; worker peak RSS +{grew} KiB")


async def main():
    print(f"deflate test, compression = {MODE!r}, 127.0.0.1:{PORT}")
    for step in (negotiation_and_round_trips, compressed_on_the_wire, close_codes,
                 bombs_cost_only_their_connection):
        try:
            await step()
        except Exception as e:
            print(f"deflate test FAILED ({MODE}) in {step.__name__}: {type(e).__name__}: {e}",
                  file=sys.stderr)
            sys.exit(1)


asyncio.run(main())
