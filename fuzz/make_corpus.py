#!/usr/bin/env python3
"""Writes the seed corpus of the `read_path` fuzz target into fuzz/corpus/read_path/.

Each file is the raw byte stream one client sends to the server: an HTTP/1.1 upgrade request,
then WebSocket frames (masked, as RFC 6455 requires of clients, unless the seed is about an
unmasked one). The seeds reach each branch of the read path once, so the fuzzer starts from
there instead of having to discover the handshake by itself. Deterministic (masking keys are
hashed from each frame), stdlib only, and every file stays under 4 KiB so the committed corpus
remains small.

    python3 fuzz/make_corpus.py        # rewrites the corpus; `git diff` shows any change

`tests/fuzz_corpus.rs` replays these files (and fuzz/regressions/) on every `cargo test`, and
checks that at least as many seeds exist as this script writes (raise its SEEDS when adding).
"""

import hashlib
import os
import struct
import sys
import zlib

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "read_path")
MAX_SIZE = 4096

CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

def mask_key(head, payload):
    """A reproducible 4-byte masking key that depends only on the frame itself, so adding a seed
    never changes the bytes of the others."""
    return hashlib.sha256(head + payload).digest()[:4]


def frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length_form=None, claimed_len=None):
    """One client frame. `length_form` forces the 7/16/64-bit length encoding (7, 16 or 64);
    `claimed_len` writes a length other than the payload's real one (a lying header)."""
    if isinstance(payload, str):
        payload = payload.encode()
    n = len(payload) if claimed_len is None else claimed_len
    if length_form is None:
        length_form = 7 if n < 126 else 16 if n < 65536 else 64
    b0 = (0x80 if fin else 0) | ((rsv & 0x7) << 4) | (opcode & 0xF)
    m = 0x80 if mask else 0
    if length_form == 7:
        head = bytes([b0, m | n])
    elif length_form == 16:
        head = bytes([b0, m | 126]) + struct.pack(">H", n)
    else:
        head = bytes([b0, m | 127]) + struct.pack(">Q", n)
    if not mask:
        return head + payload
    key = mask_key(head, payload)
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def close_payload(code, reason=b""):
    return struct.pack(">H", code) + reason


def request_headers():
    """The RFC 6455 example upgrade request's headers."""
    return [
        ("Host", "server.example.com"),
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ("Sec-WebSocket-Version", "13"),
    ]


def request(method="GET", path="/chat", version="HTTP/1.1", headers=None, extra=()):
    if headers is None:
        headers = request_headers()
    lines = [f"{method} {path} {version}"]
    lines += [f"{k}: {v}" for k, v in list(headers) + list(extra)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


HS = request()
BYE = frame(CLOSE, close_payload(1000))
RSV1 = 0b100  # permessage-deflate: the message is compressed

# feed()'s worker runs compression = "dedicated" with compression_min_size = 16.
def hs_deflate(offer="permessage-deflate; client_max_window_bits"):
    return request(extra=[("Sec-WebSocket-Extensions", offer)])


def deflated(data, compressor=None, final=False):
    """`data` compressed as a client does (RFC 7692 §7.2.1): raw deflate, flushed, with the
    flush's 00 00 ff ff taken off. Pass the same `compressor` for context takeover; `final`
    ends the stream with a BFINAL block instead of a sync flush."""
    if isinstance(data, str):
        data = data.encode()
    c = compressor or zlib.compressobj(wbits=-15)
    if final:
        return c.compress(data) + c.flush(zlib.Z_FINISH)
    out = c.compress(data) + c.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def takeover(*messages):
    """Compressed text frames sharing one compressor (context takeover)."""
    c = zlib.compressobj(wbits=-15)
    return b"".join(frame(TEXT, deflated(m, c), rsv=RSV1) for m in messages)



def without(name):
    return [(k, v) for k, v in request_headers() if k != name]


def with_value(name, value):
    return [(k, value if k == name else v) for k, v in request_headers()]


SEEDS = {
    # --- handshakes that succeed ---------------------------------------------------------
    "hs_only": HS,
    "hs_query_path_extra_headers": request(
        path="/chat?room=1&user=%C3%A9",
        headers=with_value("Connection", "keep-alive, Upgrade"),
        extra=[("Origin", "https://app.ok.example"), ("Sec-WebSocket-Protocol", "chat, superchat"),
               ("Sec-WebSocket-Extensions", "permessage-deflate; client_max_window_bits")],
    ) + frame(TEXT, "hi") + BYE,
    "hs_3k_header_value": request(extra=[("X-Big", "b" * 3000)]) + frame(TEXT, "big") + BYE,
    "hs_bare_lf_line_endings": HS.replace(b"\r\n", b"\n"),
    "hs_mixed_case_tokens": request(
        headers=[
            ("host", "h"), ("UPGRADE", "WebSocket"), ("connection", "keep-alive,upgrade"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="), ("SEC-WEBSOCKET-VERSION", " 13 "),
        ],
        extra=[("X-Forwarded-For", "203.0.113.7, 10.0.0.1"), ("X-Real-IP", "198.51.100.2")],
    ) + frame(TEXT, "case") + BYE,
    # feed()'s app refuses a path containing "refuse" in on_upgrade, and wsd refuses origins
    # other than *.ok.example
    "hs_refused_by_app": request(path="/refuse") + frame(TEXT, "never read"),
    # feed()'s on_upgrade picks the query's `protocol` and sends the query's `cookie` back as a
    # Set-Cookie; `whoami` answers with the subprotocol and the state it kept
    "hs_app_picks_offered_protocol": request(
        path="/chat?protocol=chat&cookie=a%3Db&x=%zz+y&x=2",
        extra=[("Sec-WebSocket-Protocol", "other, chat, superchat"), ("Cookie", "sid=1; t=\"dark\"")],
    ) + frame(TEXT, "whoami") + BYE,
    "hs_app_picks_unoffered_protocol_and_bad_cookie": request(
        path="/?protocol=nope&cookie=a%0D%0AInjected:%201",
        extra=[("Sec-WebSocket-Protocol", "mine")],
    ) + frame(TEXT, "whoami") + BYE,
    "hs_foreign_origin": request(extra=[("Origin", "https://evil.example")]) + frame(TEXT, "no"),
    "hs_forwarded_ipv6_port": request(
        extra=[("X-Forwarded-For", "[2001:db8::1]:443, 127.0.0.2"), ("Origin", "https://ok.example")],
    ) + frame(TEXT, "v6") + BYE,
    # --- data frames --------------------------------------------------------------------------
    "text_hello": HS + frame(TEXT, "Hello") + BYE,
    "binary_bytes": HS + frame(BINARY, bytes(range(256))[:64]) + BYE,
    "text_empty": HS + frame(TEXT, b"") + frame(BINARY, b"") + BYE,
    "len126_text": HS + frame(TEXT, "x" * 300) + BYE,
    "len127_binary_nonminimal": HS + frame(BINARY, b"\xab" * 200, length_form=64) + BYE,
    "len126_header_truncated_payload": HS + frame(TEXT, "y" * 40, claimed_len=1000),
    "len127_huge_claim": HS + frame(BINARY, b"zz", claimed_len=1 << 40),
    "len127_top_bit_set": HS + frame(BINARY, b"zz", claimed_len=(1 << 63) + 5),
    # feed()'s echo app closes with 4000 when asked by the message "close"
    "text_close_command": HS + frame(TEXT, "before") + frame(TEXT, "close") + frame(TEXT, "after") + BYE,
    "pipelined_messages": HS + b"".join(frame(TEXT, f"msg {i}") for i in range(20)) + BYE,
    "fragmented_text_ping_between": HS
    + frame(TEXT, "Hel", fin=False)
    + frame(PING, "are you there")
    + frame(CONT, "lo, ", fin=False)
    + frame(CONT, "world")
    + BYE,
    "fragmented_binary_three_parts": HS
    + frame(BINARY, b"\x00\x01", fin=False)
    + frame(CONT, b"\x02\x03", fin=False)
    + frame(CONT, b"\x04")
    + BYE,
    "utf8_split_across_fragments": HS
    # "é€😀" with each character cut between two frames
    + frame(TEXT, b"\xc3", fin=False)
    + frame(CONT, b"\xa9\xe2\x82", fin=False)
    + frame(CONT, b"\xac\xf0\x9f\x98", fin=False)
    + frame(CONT, b"\x80")
    + BYE,
    "utf8_truncated_at_final_fragment": HS + frame(TEXT, b"ok\xe2", fin=False) + frame(CONT, b"\x82") + BYE,
    "text_invalid_utf8": HS + frame(TEXT, b"bad \xff\xfe \xc0\xaf") + BYE,
    "continuation_without_start": HS + frame(CONT, "orphan") + BYE,
    "text_while_fragmented": HS + frame(TEXT, "first", fin=False) + frame(TEXT, "second") + BYE,
    # --- control frames -----------------------------------------------------------------------
    "ping": HS + frame(PING, "ping payload") + BYE,
    "pong_unsolicited": HS + frame(PONG, "pong payload") + BYE,
    "close_code_reason": HS + frame(CLOSE, close_payload(1001, "going away".encode())),
    "close_empty_then_data": HS + frame(CLOSE) + frame(TEXT, "after close"),
    "close_bad_code": HS + frame(CLOSE, close_payload(999)) + frame(CLOSE, close_payload(1005)),
    "close_one_byte_payload": HS + frame(CLOSE, b"\x03"),
    "close_invalid_utf8_reason": HS + frame(CLOSE, close_payload(1000, b"\xff\xfe")),
    "control_oversize": HS + frame(PING, b"p" * 126) + BYE,
    "control_fragmented": HS + frame(PING, "half", fin=False) + BYE,
    # --- protocol violations ------------------------------------------------------------------
    "reserved_opcode_data": HS + frame(0x3, "reserved") + BYE,
    "reserved_opcode_control": HS + frame(0xB, "reserved") + BYE,
    "rsv_bits_set": HS + frame(TEXT, "rsv1", rsv=0b100) + frame(TEXT, "rsv3", rsv=0b001) + BYE,
    "unmasked_frame": HS + frame(TEXT, "not masked", mask=False) + BYE,
    # --- permessage-deflate ---------------------------------------------------------------------
    "deflate_text": hs_deflate() + frame(TEXT, deflated("Hello, compressed world! " * 8), rsv=RSV1) + BYE,
    "deflate_binary_and_plain_between": hs_deflate()
    + frame(BINARY, deflated(bytes(range(256)) * 2), rsv=RSV1)
    + frame(TEXT, "plain is allowed too")
    + frame(BINARY, deflated(b"\x00" * 300), rsv=RSV1)
    + BYE,
    "deflate_takeover": hs_deflate() + takeover("first message " * 10, "first message " * 12, "x" * 40) + BYE,
    "deflate_no_takeover_either_way": hs_deflate(
        "permessage-deflate; server_no_context_takeover; client_no_context_takeover; "
        "server_max_window_bits=10; client_max_window_bits=9")
    + frame(TEXT, deflated("no takeover " * 10), rsv=RSV1)
    + frame(TEXT, deflated("no takeover " * 11), rsv=RSV1)
    + BYE,
    "deflate_fragmented_ping_between": hs_deflate()
    + (lambda body: frame(TEXT, body[:7], fin=False, rsv=RSV1)
       + frame(PING, "mid")
       + frame(CONT, body[7:20], fin=False)
       + frame(CONT, body[20:]))(deflated("fragmented and compressed " * 6))
    + BYE,
    "deflate_final_block_then_more": hs_deflate()
    + frame(TEXT, deflated("ends with BFINAL " * 4, final=True), rsv=RSV1)
    + frame(TEXT, deflated("a new stream " * 4), rsv=RSV1)
    + BYE,
    "deflate_empty_message": hs_deflate() + frame(TEXT, b"\x00", rsv=RSV1) + frame(BINARY, b"", rsv=RSV1) + BYE,
    "deflate_close_command": hs_deflate() + frame(TEXT, deflated("close"), rsv=RSV1) + BYE,
    "deflate_offers_messy": hs_deflate(
        'x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=8, '
        'permessage-deflate; x=1, permessage-deflate; client_max_window_bits="10"; '
        'server_max_window_bits="12"')
    + frame(TEXT, deflated("chosen: the third offer " * 3), rsv=RSV1)
    + BYE,
    # Declined (server_max_window_bits=8): RSV1 is then a reserved bit, 1002.
    "deflate_declined_then_rsv1": hs_deflate("permessage-deflate; server_max_window_bits=8")
    + frame(TEXT, deflated("not negotiated " * 3), rsv=RSV1)
    + BYE,
    "deflate_rsv1_on_continuation": hs_deflate()
    + frame(TEXT, deflated("abc " * 10)[:5], fin=False, rsv=RSV1)
    + frame(CONT, deflated("abc " * 10)[5:], rsv=RSV1)
    + BYE,
    "deflate_rsv1_on_ping": hs_deflate() + frame(PING, "compressed?", rsv=RSV1) + BYE,
    "deflate_invalid_stream": hs_deflate() + frame(BINARY, b"\xff\xff\xff\xff", rsv=RSV1) + BYE,
    "deflate_invalid_utf8_inside": hs_deflate() + frame(TEXT, deflated(b"bad \xff\xfe text " * 3), rsv=RSV1) + BYE,
    # About 1 KiB that inflates to 1 MiB, past the harness's 256 KiB max_message_size: 1009.
    "deflate_bomb": hs_deflate() + frame(BINARY, deflated(b"\x00" * (1 << 20)), rsv=RSV1) + BYE,
    # --- handshakes that fail -----------------------------------------------------------------
    "bad_hs_plain_get": b"GET / HTTP/1.1\r\nHost: server.example.com\r\nAccept: */*\r\n\r\n",
    "bad_hs_version_8": request(headers=with_value("Sec-WebSocket-Version", "8")) + frame(TEXT, "x"),
    "bad_hs_missing_key": request(headers=without("Sec-WebSocket-Key")) + frame(TEXT, "x"),
    "bad_hs_malformed_key": request(headers=with_value("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=")),
    "bad_hs_missing_host": request(headers=without("Host")),
    "bad_hs_post": request(method="POST", extra=[("Content-Length", "5")]) + b"hello",
    "bad_hs_http10": request(version="HTTP/1.0"),
    "bad_hs_many_headers": request(extra=[(f"X-H{i}", "v") for i in range(130)]),
    "bad_hs_garbage": bytes((i * 131 + 7) & 0xFF for i in range(200)),
    "bad_hs_no_end": HS[:-2],
}


def main():
    os.makedirs(OUT, exist_ok=True)
    for name in os.listdir(OUT):
        os.remove(os.path.join(OUT, name))
    for name, data in SEEDS.items():
        if len(data) >= MAX_SIZE:
            sys.exit(f"seed {name} is {len(data)} bytes; keep seeds under {MAX_SIZE}")
        with open(os.path.join(OUT, name), "wb") as f:
            f.write(data)
    total = sum(len(d) for d in SEEDS.values())
    print(f"wrote {len(SEEDS)} seeds ({total} bytes) to {os.path.relpath(OUT)}")


if __name__ == "__main__":
    main()
