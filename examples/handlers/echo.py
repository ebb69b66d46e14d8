#!/usr/bin/env python3
"""A wsd exec handler in Python, standard library only: every message goes back to its sender.

Run by wsd with `app = "exec"` and `command = ["python3", "examples/handlers/echo.py"]`. The
protocol is one JSON object per line each way (docs/handlers.md). This reads whatever stdin
has, carries out every line, and answers in one write: a busy handler costs one read and one
write per batch, not per message.
"""
import json
import os
import sys


def handle(event, out):
    if event.get("event") == "message":
        out.append({"cmd": "send", "conn": event["conn"], "data": event["data"]})


def main():
    pending = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return  # wsd closed our stdin: the worker is stopping
        *lines, pending = (pending + chunk).split(b"\n")
        out = []
        for line in lines:
            if line.strip():
                handle(json.loads(line), out)
        if out:
            os.write(1, "".join(json.dumps(c) + "\n" for c in out).encode())


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
