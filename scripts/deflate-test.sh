#!/usr/bin/env bash
# permessage-deflate with a real client: starts wsd with three `echo` groups of one worker each
# (compression "shared", "dedicated" and off) on free ports, and runs tests/deflate/clients.py
# against the shared and the dedicated one: negotiation and round trips with the `websockets`
# library, compressed frames on the wire, the close codes (1007, 1002), and decompression bombs
# sent while other clients of the same worker keep echoing.
# Installs what it needs: Debian's python3-venv if missing, and websockets (pinned) from PyPI
# into target/deflate-venv.
#   WSD_BIN   use this wsd binary instead of building one
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
WEBSOCKETS_VERSION=15.0.1

# 1. websockets in a venv, installed once.
VENV="$ROOT/target/deflate-venv"
PY="$VENV/bin/python"
make_venv() { rm -rf "$VENV"; python3 -m venv "$VENV"; }
if ! "$PY" -c '' 2>/dev/null && ! make_venv; then
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    make_venv
fi
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('websockets') != '$WEBSOCKETS_VERSION')" 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check "websockets==$WEBSOCKETS_VERSION"
fi

# 2. The server binary.
if [[ -z "${WSD_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --bin wsd)
    WSD_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/wsd"
fi
WSD_BIN="$(realpath "$WSD_BIN")"

# Whatever happens, wsd does not outlive this script, nor does its temp dir.
WSD_PID="" TMP=""
cleanup() {
    local rc=$?
    if [[ -n "$WSD_PID" ]] && kill -0 "$WSD_PID" 2>/dev/null; then
        kill -TERM "$WSD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$WSD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$WSD_PID" 2>/dev/null || true   # its workers die with it (parent-death signal)
    fi
    wait 2>/dev/null || true
    [[ -z "$TMP" ]] || rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# 3. A config of its own in a temp dir; port 0 lets the OS pick free ports. One worker per
# group, so the bombs and the echoing clients meet in the same worker.
TMP="$(mktemp -d)"
CONF="$TMP/deflate.toml"
cat >"$CONF" <<'CONF'
[server]
stop_timeout = "5s"

[[worker]]
name = "shared"
listen = "websocket://127.0.0.1:0"
app = "echo"
count = 1
compression = "shared"

[[worker]]
name = "dedicated"
listen = "websocket://127.0.0.1:0"
app = "echo"
count = 1
compression = "dedicated"

[[worker]]
name = "plain"
listen = "websocket://127.0.0.1:0"
app = "echo"
count = 1
CONF
"$WSD_BIN" -c "$CONF" start </dev/null >"$TMP/wsd.log" 2>&1 &
WSD_PID=$!

# "name port pid" per group, once all three workers are up.
workers() {
    "$WSD_BIN" -c "$CONF" status --json 2>/dev/null | "$PY" -c '
import json, sys
w = json.load(sys.stdin)["workers"]
assert len(w) == 3 and all(x["pid"] > 0 and x["status"] == "idle" for x in w)
for x in w:
    print(x["name"], x["listen"].rsplit(":", 1)[1], x["pid"])' 2>/dev/null
}
LIST=""
deadline=$((SECONDS + 30))
while ((SECONDS < deadline)); do
    LIST="$(workers)" && break
    kill -0 "$WSD_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$LIST" ]]; then
    echo "deflate test: wsd did not become ready; its log:" >&2
    tail -n 30 "$TMP/wsd.log" >&2
    exit 1
fi
declare -A PORT PID
while read -r name port pid; do PORT[$name]=$port PID[$name]=$pid; done <<<"$LIST"

# 4. The clients, one mode after the other.
for mode in shared dedicated; do
    if ! timeout 120 "$PY" "$ROOT/tests/deflate/clients.py" "$mode" "${PORT[$mode]}" "${PID[$mode]}" \
        "${PORT[plain]}"; then
        echo "deflate test: FAILED; wsd's log:" >&2
        tail -n 30 "$TMP/wsd.log" >&2
        exit 1
    fi
done

# The workers came through whole: none died and was respawned.
crashes="$("$WSD_BIN" -c "$CONF" status --json | "$PY" -c '
import json, sys
print(sum(n for g in json.load(sys.stdin)["groups"] for n in g["exits"].values()))')"
if ((crashes > 0)); then
    echo "deflate test: $crashes wsd worker(s) died during the run; its log:" >&2
    tail -n 30 "$TMP/wsd.log" >&2
    exit 1
fi

# 5. Graceful stop; the trap only has to clean up if this fails.
if "$WSD_BIN" -c "$CONF" stop >/dev/null; then
    wait "$WSD_PID" || true
    WSD_PID=""
fi
echo "deflate test: ok, $((SECONDS - START)) s"
