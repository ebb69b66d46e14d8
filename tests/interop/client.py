#!/usr/bin/env python3
"""The Python `websockets` library against a real wsd, for tests/interop.rs.

    python tests/interop/client.py SPEC

SPEC is JSON: {"ca": CA_FILE, "protocols": [OFFERED, ...], "groups": [{"name": NAME,
"url": "wss://localhost:PORT/", "port": PORT}, ...]}. Each group gets two connections: one
offering permessage-deflate (websockets' default) and one offering nothing. Each connects to
127.0.0.1 (the name checked against the certificate stays `localhost`), trusting CA_FILE alone,
offers the subprotocols, echoes text and binary messages (a 100 KB one of each, and a text in
three frames), pings, and closes with 4000. Prints one JSON report on stdout:
{"client": "python websockets VERSION", "runs": [{"group", "offer_deflate", "protocol",
"extensions", "close_code", "echoes", "pong"}, ...]}; the test judges it. Exits 1 on the first
step that fails or takes over 20 s, naming the group and the step.
"""

import asyncio
import json
import random
import ssl
import sys

import websockets
from websockets.asyncio.client import connect

CLIENT = f"python websockets {websockets.__version__}"
STEP_TIMEOUT = 20  # seconds


class StepFailed(Exception):
    pass


async def step(what, awaitable):
    """Awaits `awaitable` within STEP_TIMEOUT; a failure names `what`."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            return await awaitable
    except TimeoutError:
        raise StepFailed(f"{what}: nothing within {STEP_TIMEOUT} s") from None
    except StepFailed:
        raise
    except Exception as e:
        raise StepFailed(f"{what}: {type(e).__name__}: {e}") from None


MESSAGES = [
    ("text", "héllo wss ✓"),
    ("empty text", ""),
    ("100 KB text", "wsd interop, compressible text. " * 3125),
    ("binary", bytes([0, 1, 2, 254, 255])),
    ("100 KB binary", random.Random(7).randbytes(100_000)),
    # Sent as three frames (a list is sent fragmented), echoed as one message.
    ("fragmented text", [f"fragment {i} of a text message. " * 600 for i in range(3)]),
]


async def run(spec, group, offer_deflate, context):
    url = group["url"]
    kwargs = {"ssl": context} if url.startswith("wss:") else {}
    ws = await step(
        f"connecting to {url}",
        connect(
            url,
            host="127.0.0.1",
            subprotocols=spec["protocols"],
            compression="deflate" if offer_deflate else None,
            proxy=None,
            open_timeout=STEP_TIMEOUT,
            close_timeout=STEP_TIMEOUT,
            **kwargs,
        ),
    )
    # The server's answer, and what websockets made of it: the two must agree.
    extensions = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    in_use = [e.name for e in ws.protocol.extensions]
    if in_use != (["permessage-deflate"] if extensions else []):
        raise StepFailed(f"the answer {extensions!r}: websockets uses {in_use}")
    echoes = 0
    for what, sent in MESSAGES:
        await step(f"sending the {what} message", ws.send(sent))
        got = await step(f"echo of the {what} message", ws.recv())
        if got != ("".join(sent) if isinstance(sent, list) else sent):
            raise StepFailed(f"echo of the {what} message: it came back different")
        echoes += 1
    pong = await step("ping", ws.ping(b"interop"))
    await step("pong", pong)
    await step("closing handshake (Close 4000)", ws.close(4000, "bye"))
    return {
        "group": group["name"],
        "offer_deflate": offer_deflate,
        "protocol": ws.subprotocol,
        "extensions": extensions,
        "close_code": ws.close_code,
        "echoes": echoes,
        "pong": True,
    }


async def main(spec):
    context = ssl.create_default_context(cafile=spec["ca"])
    runs = []
    for group in spec["groups"]:
        for offer_deflate in (True, False):
            try:
                runs.append(await run(spec, group, offer_deflate, context))
            except StepFailed as e:
                offer = "offering" if offer_deflate else "not offering"
                sys.exit(f"{CLIENT}: group {group['name']} ({offer} permessage-deflate): {e}")
    print(json.dumps({"client": CLIENT, "runs": runs}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    asyncio.run(main(json.loads(sys.argv[1])))
