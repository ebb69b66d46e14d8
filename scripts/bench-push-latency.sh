#!/usr/bin/env bash
# Echo latency while a worker pushes to many other connections: what a client of a busy
# server meets when the app broadcasts. One `clock-echo` worker (count = 1) holds IDLE extra
# connections (default 10,000, opened by `wsd bench idle`); every 5 s it pushes the time to
# all of them and to the latency clients; meanwhile `wsd bench latency --spin` sends RATE
# messages a second over CONNS connections for SECS seconds (default 11: two pushes).
#
# The worker writes at most 256 connections a turn, this turn's replies first, so the
# latency clients keep being answered while a push drains; the p99/max below is the figure
# that shows it. Server on core 0, clients on core 1 (taskset), when there are two cores.
#
# Usage: [IDLE=10000] [CONNS=1000] [RATE=20000] [SECS=11] [WSD_BIN=path/to/wsd] scripts/bench-push-latency.sh
set -euo pipefail

IDLE=${IDLE:-10000}
CONNS=${CONNS:-1000}
RATE=${RATE:-20000}
SECS=${SECS:-11}
for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-push-latency: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
for v in IDLE CONNS RATE SECS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-push-latency: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=bench-push-latency
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

pin_server=() pin_client=()
if (($(nproc) >= 2)) && command -v taskset >/dev/null; then
    pin_server=(taskset -c 0) pin_client=(taskset -c 1)
fi
write_config "$tmp/wsd" clock-echo 1 $((IDLE + CONNS + 100))
start_wsd "$tmp/wsd" || die "wsd did not start"
if ((${#pin_server[@]})); then
    for p in "$master" $(pgrep -P "$master"); do taskset -a -p -c 0 "$p" >/dev/null; done
fi
say "$IDLE idle connections on port $port, then $RATE msgs/s over $CONNS more for $SECS s"
"${pin_client[@]}" "$WSD_BIN" bench idle --url "ws://127.0.0.1:$port/" --conns "$IDLE" \
    --hold $((SECS + 10)) >"$tmp/idle.out" 2>&1 &
idle=$!
pids+=("$idle")
deadline=$((SECONDS + 60))
until "$WSD_BIN" -c "$config" status --json 2>/dev/null | python3 -c "
import json, sys
sys.exit(0 if sum(w['connections'] for w in json.load(sys.stdin)['workers']) >= $IDLE else 1)"; do
    ((SECONDS < deadline)) || die "the $IDLE idle connections did not all open: $(tail -n 3 "$tmp/idle.out" | tr '\n' ' ')"
    sleep 0.2
done
"${pin_client[@]}" "$WSD_BIN" bench latency --url "ws://127.0.0.1:$port/" --conns "$CONNS" \
    --rate "$RATE" --secs "$SECS" --spin --config "$config"
