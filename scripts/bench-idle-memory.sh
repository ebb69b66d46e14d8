#!/usr/bin/env bash
# Worker memory per idle WebSocket connection, part of wsd's contract (target: < 10 KiB each).
#
# Starts one echo worker, measures its RSS and private memory (/proc/PID/status, smaps_rollup),
# opens N connections with scripts/idle_clients.py (upgrade + one echo each, then idle),
# waits until `wsd status` counts all N and the RSS has settled, measures again and prints
# (after - before) / N. Kernel socket buffers are not in RSS and are not counted.
#
# Usage: [N=10000] [WSD_BIN=path/to/wsd] [CONCURRENCY=200] scripts/bench-idle-memory.sh [--no-echo]
#        [--compression shared|dedicated]
#   --no-echo   connections only upgrade; by default each also echoes one small message first.
#   --compression MODE   the worker has permessage-deflate in MODE, and each client offers it
#               and echoes one compressed message (~120 bytes) both ways.
# Prints figures only (no timing assertion); exits non-zero if not all N connections open.
set -euo pipefail

N=${N:-10000}
CONCURRENCY=${CONCURRENCY:-200}
TARGET_KIB=10
echo_flag=()
mode="one echo each"
compression=off
while (($#)); do
    case $1 in
        --no-echo) echo_flag+=(--no-echo) mode="upgrade only" ;;
        --compression)
            compression=${2:-}
            [[ $compression == shared || $compression == dedicated ]] ||
                { echo "bench-idle-memory: --compression takes shared or dedicated" >&2; exit 2; }
            echo_flag+=(--deflate) mode="$mode, permessage-deflate ($compression)"
            shift ;;
        -h | --help) sed -n '2,14s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-idle-memory: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "bench-idle-memory: N must be a positive integer, got '$N'" >&2; exit 2; }
started=$SECONDS

# File descriptors: RLIMIT_NOFILE is per process and the worker and the client are separate
# processes, so each needs N sockets plus some headroom: the hard limit first, if it is lower
# (bench-lib.sh then raises the soft limit to it).
want=$((N + 1024))
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=$(cat /proc/sys/fs/nr_open)
if ((hard < want)); then
    ulimit -Hn "$want" 2>/dev/null || {
        echo "bench-idle-memory: fd hard limit is $hard, need $want for N=$N; raise it (root, or nofile in /etc/security/limits.conf)" >&2
        exit 1
    }
fi
# die/say, the soft fd limit, WSD_BIN (built if unset), tmp, pids and the cleanup trap.
NAME=bench-idle-memory
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

# 3. Config: one worker on a port the OS picks; pid file and control socket land in tmp.
cfg=$tmp/workers.toml
cat >"$cfg" <<EOF
[server]
stop_timeout = "5s"
log_level = "warn"

[[worker]]
name = "bench"
listen = "websocket://127.0.0.1:0"
count = 1
app = "echo"
max_connections = $((N > 20000 ? N : 20000))
compression = "$compression"
EOF

# 4. Start the master in the foreground, in the background of this script.
"$WSD_BIN" -c "$cfg" start >"$tmp/wsd.log" 2>&1 &
master=$!
pids+=("$master")

# "PID PORT CONNECTIONS STATUS" of the one worker, from `status --json`.
worker_info() {
    "$WSD_BIN" -c "$cfg" status --json 2>/dev/null | python3 -c '
import json, sys
w = json.load(sys.stdin)["workers"][0]
print(w["pid"], w["listen"].rsplit(":", 1)[1], w["connections"], w["status"])' 2>/dev/null
}
# poll SECONDS DESCRIPTION COMMAND...: run COMMAND every 0.2 s until it succeeds.
poll() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        kill -0 "$master" 2>/dev/null || { cat "$tmp/wsd.log" >&2; die "wsd exited while waiting for $what"; }
        ((SECONDS < deadline)) || { cat "$tmp/wsd.log" >&2; die "timed out waiting for $what"; }
        sleep 0.2
    done
}
worker_up() {
    read -r wpid port conns state < <(worker_info) && ((wpid > 0 && port > 0)) && [[ $state == idle ]]
}
poll 60 "the worker to start" worker_up
pids+=("$wpid") # the master stops it, but make sure

# 5. Memory in KiB: "VmRSS Rss Pss Private".
mem() {
    local vm
    vm=$(awk '/^VmRSS:/ {print $2}' "/proc/$wpid/status")
    awk -v vm="$vm" '/^Rss:/ {r = $2} /^Pss:/ {p = $2} /^Private_/ {q += $2}
        END {print vm, r, p, q}' "/proc/$wpid/smaps_rollup"
}
read -r rss0 _ pss0 priv0 < <(mem) || die "cannot read /proc/$wpid"

# 6. The clients; they print READY once every connection attempt has finished.
echo "opening $N connections to 127.0.0.1:$port (worker pid $wpid, ${CONCURRENCY} in flight)..."
t0=$SECONDS
python3 "$root/scripts/idle_clients.py" --port "$port" -n "$N" --concurrency "$CONCURRENCY" \
    "${echo_flag[@]}" >"$tmp/clients.out" &
client=$!
pids=("$client" "${pids[@]}") # stop the clients first, so the worker has nothing to close
client_ready() {
    kill -0 "$client" 2>/dev/null || die "the client exited early"
    grep -q '^READY' "$tmp/clients.out"
}
poll 600 "the clients to connect" client_ready
read -r _ opened failed < <(sed -n 's/^READY opened=\([0-9]*\) failed=\([0-9]*\)/x \1 \2/p' "$tmp/clients.out")
connect_secs=$((SECONDS - t0))
((opened == N)) || die "only $opened of $N connections opened ($failed failed)"

# 7. The worker reports its counters about once a second: wait for all N, then for RSS to settle.
all_counted() { read -r _ _ conns _ < <(worker_info) && ((conns == N)); }
poll 60 "status to show $N connections" all_counted
prev=-1
for _ in $(seq 30); do
    read -r rss _ < <(mem) || die "cannot read /proc/$wpid"
    ((rss == prev)) && break
    prev=$rss
    sleep 1
done
read -r rss1 _ pss1 priv1 < <(mem) || die "cannot read /proc/$wpid"
read -r _ _ conns_end _ < <(worker_info)

# 8. The table.
awk -v n="$N" -v r0="$rss0" -v r1="$rss1" -v q0="$priv0" -v q1="$priv1" -v p0="$pss0" -v p1="$pss1" \
    -v t="$TARGET_KIB" -v secs="$connect_secs" -v mode="$mode" 'BEGIN {
    printf "\nwsd worker memory, %d idle WebSocket connections (%s, opened in %d s)\n", n, mode, secs
    printf "%-14s %12s %12s %12s %14s\n", "", "before KiB", "after KiB", "delta KiB", "KiB per conn"
    printf "%-14s %12d %12d %12d %14.2f\n", "RSS (VmRSS)", r0, r1, r1 - r0, (r1 - r0) / n
    printf "%-14s %12d %12d %12d %14.2f\n", "Private", q0, q1, q1 - q0, (q1 - q0) / n
    printf "%-14s %12d %12d %12d %14.2f\n", "Pss", p0, p1, p1 - p0, (p1 - p0) / n
    per = (r1 - r0) / n
    printf "%s: %.2f KiB RSS per idle connection (target < %d KiB)\n",
        per < t ? "PASS" : "OVER TARGET", per, t
}'
echo "total run time $((SECONDS - started)) s"
((conns_end == N)) || die "the worker held $conns_end connections at the end, not $N (see above)"
