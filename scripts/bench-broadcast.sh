#!/usr/bin/env bash
# Broadcast fan-out of wsd's `chat` app: the local bus (workers of one server) against the
# Redis bus, side by side.
#
# Starts wsd in the foreground (chat app, 4 workers, a port the OS picks, its own temp dir
# and config) and runs `wsd bench broadcast` against it: CONNS subscribers, one publisher
# sending RATE messages a second for SECS seconds, delivery latency of every message at every
# subscriber. Then, if redis-server is installed (or installable with apt-get), starts one on
# a free loopback port in the temp dir and runs the same with `[server] bus = "redis://..."`.
# Prints a markdown table: deliveries/s, latency p50/p99/p99.9, missing deliveries.
#
# Usage: [CONNS=10000] [SECS=10] [RATE=20] [WORKERS=4] [WSD_BIN=path/to/wsd] scripts/bench-broadcast.sh [--no-redis]
# Prints figures only; exits non-zero if a run could not be made at all.
set -euo pipefail

CONNS=${CONNS:-10000}
SECS=${SECS:-10}
RATE=${RATE:-20}
WORKERS=${WORKERS:-4}
use_redis=1
for arg in "$@"; do
    case $arg in
        --no-redis) use_redis=0 ;;
        -h | --help) sed -n '2,13s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-broadcast: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for v in CONNS SECS RATE WORKERS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-broadcast: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
NAME=bench-broadcast
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

# Commands the Redis server on $rport has processed so far (INFO stats).
redis_commands() {
    python3 - "$rport" <<'EOF'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
s.sendall(b"INFO stats\r\n")
data = b""
while b"\r\n" not in data:
    data += s.recv(65536)
head, _, body = data.partition(b"\r\n")
size = int(head[1:])  # a bulk string: $<size>\r\n<body>\r\n
while len(body) < size:
    body += s.recv(65536)
for line in body.decode().splitlines():
    if line.startswith("total_commands_processed:"):
        print(line.split(":")[1])
EOF
}

# start_chat NAME BUS: a chat master with its own config in $tmp/NAME (see start_wsd).
start_chat() {
    local server=()
    [[ -n $2 ]] && server=("bus = \"$2\"")
    write_config "$tmp/$1" chat "$WORKERS" $((CONNS + 1000)) "${server[@]}"
    start_wsd "$tmp/$1"
}

# run_bench NAME: the broadcast run against $port; its JSON goes to $tmp/NAME.json.
run_bench() {
    local name=$1
    say "$name: $CONNS subscribers, $RATE msgs/s for $SECS s on port $port"
    "$WSD_BIN" bench broadcast --url "ws://127.0.0.1:$port/" --app chat \
        --conns "$CONNS" --secs "$SECS" --rate "$RATE" --json >"$tmp/$name.json" ||
        say "$name: the run counted errors (see the table)"
    [[ -s $tmp/$name.json ]] || { say "$name: no result"; rm -f "$tmp/$name.json"; }
}

# 1. Local bus.
start_chat local "" || die "wsd did not start (chat app, local bus)"
run_bench local
stop_wsd

# 2. Redis bus.
redis_note=
if ((use_redis)); then
    if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && ((EUID == 0)); then
        say "installing redis-server with apt-get"
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
            >"$tmp/apt.log" 2>&1 || say "apt-get could not install redis-server (see above)"
    fi
    if command -v redis-server >/dev/null; then
        rport=$(free_port)
        redis-server --port "$rport" --bind 127.0.0.1 --dir "$tmp" --save '' --appendonly no \
            --daemonize no >"$tmp/redis.log" 2>&1 &
        pids+=("$!")
        # A subshell, so a refused connection cannot take the script's descriptors with it.
        redis_up() { (exec 3<>"/dev/tcp/127.0.0.1/$rport" && printf 'PING\r\n' >&3 && read -r -t 1 pong <&3 && [[ $pong == +PONG* ]]); }
        deadline=$((SECONDS + 10))
        until redis_up 2>/dev/null; do
            ((SECONDS < deadline)) || { redis_note="redis-server did not answer on port $rport"; break; }
            sleep 0.2
        done
        if [[ -z $redis_note ]]; then
            if start_chat redis "redis://127.0.0.1:$rport/0"; then
                before=$(redis_commands)
                run_bench redis
                after=$(redis_commands)
                stop_wsd
                # A build that accepts `bus` but does not use it yet measures the local bus
                # twice; Redis's own command counter tells.
                if ((after - before < 2)); then
                    redis_note="Redis saw no traffic during the run: this wsd does not use the Redis bus yet, so that column measured the local bus"
                fi
            else
                redis_note="wsd did not start with bus = \"redis://127.0.0.1:$rport/0\" (is the Redis bus in this build?)"
            fi
        fi
    else
        redis_note="no redis-server (not installed, and apt-get could not install it)"
    fi
else
    redis_note="skipped (--no-redis)"
fi
[[ -z $redis_note ]] || say "Redis bus: $redis_note"

# 3. The table.
echo
echo "wsd broadcast, chat app, $WORKERS workers: $CONNS subscribers, 1 publisher at $RATE msgs/s for $SECS s"
echo
python3 - "$tmp/local.json" "$tmp/redis.json" "$redis_note" <<'EOF'
import json, sys
def load(p):
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
runs = [load(sys.argv[1]), load(sys.argv[2])]
def ms(v): return f"{v / 1000:.2f} ms"
rows = [
    ("deliveries/s", lambda r: f"{r['deliveries_per_sec']:.0f}"),
    ("delivered / expected", lambda r: f"{r['delivered']} / {r['expected']}"),
    ("missing", lambda r: str(r["missing"])),
    ("latency p50", lambda r: ms(r["latency_us"]["p50"])),
    ("latency p99", lambda r: ms(r["latency_us"]["p99"])),
    ("latency p99.9", lambda r: ms(r["latency_us"]["p999"])),
    ("errors", lambda r: str(r["errors"]["total"])),
]
print("| | local bus | Redis bus |")
print("|---|---:|---:|")
for name, f in rows:
    print(f"| {name} | " + " | ".join(f(r) if r else "n/a" for r in runs) + " |")
if sys.argv[3]:
    print(f"\nRedis bus: {sys.argv[3]}")
for r in runs:
    for s in (r or {}).get("errors", {}).get("samples", []):
        print(f"  e.g. {s}")
EOF
[[ -s $tmp/local.json ]] || die "the local-bus run produced no result"
