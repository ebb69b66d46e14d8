#!/usr/bin/env bash
# 100,000 concurrent connections on this one box: wsd's echo app with count = 8
# holds CONNS connections (default 100,000), every one of which answers an echo, and the
# server's memory is reported from /proc/PID/smaps_rollup of each worker.
#
# Starts wsd in the foreground (its own temp dir, config and port), runs
# `wsd bench idle --conns CONNS --config ...` against it (client processes of ~19,700 sockets
# each over source addresses 127.0.0.1-250, sized from the file limit), prints
# its table and stops wsd. Exits non-zero unless every connection was up and echoed.
#
# Usage: [CONNS=100000] [WORKERS=8] [HOLD=2] [WSD_BIN=path/to/wsd] scripts/bench-100k.sh [--json]
set -euo pipefail

CONNS=${CONNS:-100000}
WORKERS=${WORKERS:-8}
HOLD=${HOLD:-2}
json=()
for arg in "$@"; do
    case $arg in
        --json) json=(--json) ;;
        -h | --help) sed -n '2,11s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-100k: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
for v in CONNS WORKERS HOLD; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-100k: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=bench-100k
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

# Each worker takes its share and some slack (the kernel spreads over SO_REUSEPORT sockets
# by hash, not evenly); it must stay under the files a process may hold (the hard limit).
per_worker=$((CONNS / WORKERS * 5 / 4 + 100))
((per_worker < hard - 100)) || per_worker=$((hard - 100))
write_config "$tmp/wsd" echo "$WORKERS" "$per_worker"
start_wsd "$tmp/wsd" || die "wsd did not start"
say "$CONNS connections over $WORKERS workers (at most $per_worker each) on port $port"
status=0
"$WSD_BIN" bench idle --url "ws://127.0.0.1:$port/" --conns "$CONNS" --hold "$HOLD" \
    --config "$config" "${json[@]}" || status=$?
stop_wsd
exit "$status"
