#!/usr/bin/env python3
"""A wsd exec handler in Python, standard library only: every message goes back to its sender.

Run by wsd with `app = "exec"` and `command = ["python3", "examples/handlers/echo.py"]`. The
protocol is one JSON object per line each way (docs/handlers.md).

It is written for throughput, as a busy handler should be: it reads whatever stdin has, parses
all of those lines with one `json.loads` (CPython spends more on a call than on a short line),
writes each command from its fields, quoting strings with the function `json.dumps` itself uses
for them (encoding a whole dict costs several times more), and writes every answer with one
`os.write`.
"""
import json
import os
import sys
from json.encoder import encode_basestring_ascii as quote


def events(lines):
    """The events in a batch of lines: all at once, or one by one if one is not JSON."""
    try:
        return json.loads(b"[" + b",".join(lines) + b"]")
    except ValueError:
        good = []
        for line in lines:
            try:
                good.append(json.loads(line))
            except ValueError:
                sys.stderr.write("echo.py: skipped a line that is not JSON\n")
        return good


def handle(event, out):
    """Appends the command lines answering `event`: a message goes back to its sender."""
    if event.get("event") == "message":
        data = event["data"]  # text, or {"b64": "..."} for binary
        data = quote(data) if type(data) is str else json.dumps(data)
        out.append('{"cmd":"send","conn":%s,"data":%s}' % (quote(event["conn"]), data))


def main():
    pending = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            return  # wsd closed our stdin: the worker is stopping
        *lines, pending = (pending + chunk).split(b"\n")
        out = []
        for event in events([line for line in lines if line]):
            handle(event, out)
        if out:
            data = ("\n".join(out) + "\n").encode()
            while data:
                data = data[os.write(1, data):]


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
