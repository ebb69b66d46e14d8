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
NAME="deflate test"
START=$SECONDS
WEBSOCKETS_VERSION=15.0.1
# WSD_BIN, TMP, start_wsd, until_ready, ready_workers, worker_exits, stop_wsd, python_venv and
# the exit trap.
# shellcheck source=scripts/test-lib.sh
source "$ROOT/scripts/test-lib.sh"

# 1. websockets in a venv, installed once.
python_venv "$ROOT/target/deflate-venv" websockets "$WEBSOCKETS_VERSION"

# 2. A config of its own in a temp dir; port 0 lets the OS pick free ports. One worker per
# group, so the bombs and the echoing clients meet in the same worker.
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
start_wsd "$CONF" "$TMP/wsd.log"

LIST="$(until_ready 30 "$TMP/wsd.log" ready_workers "$CONF" 3)" || exit 1
declare -A PORT PID
while read -r name port pid; do PORT[$name]=$port PID[$name]=$pid; done <<<"$LIST"

# 3. The clients, one mode after the other.
for mode in shared dedicated; do
    if ! timeout 120 "$PY" "$ROOT/tests/deflate/clients.py" "$mode" "${PORT[$mode]}" "${PID[$mode]}" \
        "${PORT[plain]}"; then
        echo "deflate test: FAILED; wsd's log:" >&2
        tail -n 30 "$TMP/wsd.log" >&2
        exit 1
    fi
done

# The workers came through whole: none died and was respawned.
crashes="$(worker_exits "$CONF")"
if ((crashes > 0)); then
    echo "deflate test: $crashes wsd worker(s) died during the run; its log:" >&2
    tail -n 30 "$TMP/wsd.log" >&2
    exit 1
fi
stop_wsd "$CONF"
echo "deflate test: ok, $((SECONDS - START)) s"
