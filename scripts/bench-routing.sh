#!/usr/bin/env bash
# What a topic publish costs Redis, with 4 hosts and the topic's subscribers on 1 of them:
# Redis's bytes out (and in) per publish, read from INFO stats around P publishes made through
# the API of a host without subscribers. With interest-based routing only the subscribed host's
# workers receive the publish; without it every worker of every host does.
#
#   scripts/bench-routing.sh                      this build
#   BEFORE_BIN=/path/to/older/wsd scripts/bench-routing.sh   an older build first, for the ratio
#   P=2000 SUBS=100 COUNT=2 PAYLOAD=100           the knobs (defaults shown)
#
# Needs redis-server and redis-cli (apt-get install redis-server). Everything runs on
# 127.0.0.1 and is stopped on exit.
set -euo pipefail
NAME=bench-routing
root="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

P=${P:-2000}
SUBS=${SUBS:-100}
COUNT=${COUNT:-2}
PAYLOAD=${PAYLOAD:-100}
HOSTS=4
KEY=bench-routing-key-0123456789

command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }

rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --dir "$tmp" \
    >"$tmp/redis.log" 2>&1 &
pids+=("$!")
for _ in $(seq 100); do redis-cli -p "$rport" ping >/dev/null 2>&1 && break; sleep 0.1; done
redis-cli -p "$rport" ping >/dev/null || die "redis did not start"

# host BIN N: starts host N (pubsub × COUNT with the API) on BIN; sets api_N and ws_N.
host() {
    local bin=$1 n=$2 dir=$tmp/host-$2-$RANDOM
    write_config "$dir" pubsub "$COUNT" 10000 "bus = \"redis://127.0.0.1:$rport/0\""
    printf '\n[api]\nlisten = "127.0.0.1:0"\nkeys = ["%s"]\n' "$KEY" >>"$dir/workers.toml"
    WSD_BIN=$bin start_wsd "$dir" || die "host $n did not start"
    eval "ws_$n=$port"
    eval "api_$n=$("$bin" -c "$config" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["api"]["listen"].rsplit(":",1)[1])')"
    eval "master_$n=$master"
}

run() {
    local bin=$1 label=$2
    local masters=()
    for n in $(seq 0 $((HOSTS - 1))); do
        host "$bin" "$n"
        masters+=("$(eval echo "\$master_$n")")
    done
    # SUBS subscribers on host 0, held open by one Python process until told to stop.
    python3 - "$ws_0" "$SUBS" >"$tmp/subs.out" 2>&1 <<'PY' &
import base64, os, socket, sys, time
port, n = int(sys.argv[1]), int(sys.argv[2])
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    payload = b'{"subscribe":"t"}'
    mask = os.urandom(4)
    s.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
    s.setblocking(False)
    socks.append(s)
print("ready", flush=True)
while True:
    for s in socks:
        try:
            while s.recv(1 << 16):
                pass
        except BlockingIOError:
            pass
    time.sleep(0.01)
PY
    local subs=$!
    pids+=("$subs")
    # Subscribed everywhere they will be: presence on host 0 counts them all.
    for _ in $(seq 300); do
        got=$(curl -s -H "Authorization: Bearer $KEY" "http://127.0.0.1:$api_0/api/presence?topic=t" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["count"])' 2>/dev/null || echo 0)
        [[ $got == "$SUBS" ]] && break
        sleep 0.1
    done
    [[ $got == "$SUBS" ]] || die "$label: only $got of $SUBS subscribers"
    sleep 0.5 # the subscriber threads take new topics every 20 ms
    redis-cli -p "$rport" config resetstat >/dev/null
    python3 - "$api_1" "$P" "$PAYLOAD" "$KEY" <<'PY'
import http.client, json, sys
port, p, size, key = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
c = http.client.HTTPConnection("127.0.0.1", port)
body = json.dumps({"topic": "t", "data": "x" * size})
for _ in range(p):
    c.request("POST", "/api/publish", body, {"Authorization": f"Bearer {key}"})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY
    sleep 0.5
    local stats out in
    stats=$(redis-cli -p "$rport" info stats | tr -d '\r')
    out=$(sed -n 's/^total_net_output_bytes://p' <<<"$stats")
    in=$(sed -n 's/^total_net_input_bytes://p' <<<"$stats")
    printf '%-10s %6d publishes  Redis out %8.0f B/publish  in %6.0f B/publish  (%d-byte payload, %d hosts x %d workers, subscribers on host 0)\n' \
        "$label" "$P" "$(bc -l <<<"$out / $P")" "$(bc -l <<<"$in / $P")" "$PAYLOAD" "$HOSTS" "$COUNT"
    echo "$label $(bc -l <<<"$out / $P")" >>"$tmp/results"
    kill "$subs" 2>/dev/null || true
    for m in "${masters[@]}"; do kill -TERM "$m" 2>/dev/null || true; done
    for m in "${masters[@]}"; do wait "$m" 2>/dev/null || true; done
}

command -v bc >/dev/null || { apt-get update -qq && apt-get install -y -qq bc >/dev/null; }
if [[ -n ${BEFORE_BIN:-} ]]; then
    run "$BEFORE_BIN" before
fi
run "$WSD_BIN" this
if [[ -n ${BEFORE_BIN:-} ]]; then
    awk '{v[$1]=$2} END {printf "bytes out per publish, this / before: %.3f\n", v["this"] / v["before"]}' "$tmp/results"
fi
