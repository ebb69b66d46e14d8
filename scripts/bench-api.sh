#!/usr/bin/env bash
# Publishing from a backend to subscribers on two hosts: wsd's HTTP API and Redis bus against
# socket.io 4 with the Redis adapter and the Redis emitter, side by side, with the same client.
#
# Both systems get two "hosts" on this box, joined by one redis-server on a free loopback port:
#   wsd        two masters (WORKERS workers each, pubsub app, [api] on), [server] bus = Redis;
#              the publisher calls host 1's POST /api/publish
#   socket.io  two Node socket.io servers (benches/peers/socketio/server.js) on the Redis
#              adapter; the publisher calls a Node backend (backend.js) that emits each
#              publish to its room with @socket.io/redis-emitter
# `wsd bench api` opens CONNS subscribers split evenly over the two hosts (for socket.io it
# speaks Engine.IO v4 over WebSocket itself, see src/bench/socketio.rs), subscriber i in
# topic/room i % T, and publishes on HTTP_CONNS keep-alive connections. Scenarios, each run
# for wsd, then for socket.io, on servers started fresh for the run, in ROUNDS rounds (every
# run once per round, so the machine's drift spreads over all of them):
#   - for each T in RATE_TOPICS: RATE publishes a second for SECS s, open loop (each publish
#     reaches CONNS/T subscribers);
#   - flat out for FLAT_SECS s with T = FLAT_TOPICS, DEPTH requests in flight per connection;
#     wsd with FLAT_WORKERS workers per host.
# For each run it prints publishes/s, deliveries/s, publish→delivery latency p50/p99/p99.9,
# missing deliveries, the servers' CPU seconds (wsd: both masters and their workers;
# socket.io: both Node servers), deliveries per server-CPU-second, the CPU of Redis and of
# socket.io's emitting backend apart, and wsd's ratio to socket.io: each the median over the
# rounds, with the rounds' range where it matters. Targets (reported, not enforced): wsd's p99 at most 10 ms at 1,000 publishes/s, and wsd's deliveries per
# server-CPU-second at least 5× socket.io's.
#
# SERVER_BIN runs the wsd servers with another build than the client's (WSD_BIN), to compare
# builds; GROUP_EXTRA adds lines to their [[worker]] table (`presence = true`, say).
#
# Everything runs on this box's cores, unpinned: servers, Redis and client share them, and
# the client's own CPU is shown. Every process is started by this script and stopped by pid
# on exit, failure included. Takes ~90 s a round, ~5 minutes with the defaults (plus an npm
# install the first time). Not for CI.
#
# Usage: [CONNS=10000] [RATE=1000] [SECS=10] [RATE_TOPICS="1000 100"] [FLAT_SECS=5]
#        [FLAT_TOPICS=100] [WORKERS=1] [FLAT_WORKERS=WORKERS] [HTTP_CONNS=2] [DEPTH=16]
#        [ROUNDS=3] [WSD_BIN=path/to/wsd] [SERVER_BIN=path/to/wsd] [GROUP_EXTRA=lines]
#        scripts/bench-api.sh [--wsd-only]
# Needs python3; redis-server (installed with apt-get if missing and root); node and npm for
# socket.io (npm ci of benches/peers/socketio's lock into target/bench-api/node).
set -euo pipefail

CONNS=${CONNS:-10000}
RATE=${RATE:-1000}
SECS=${SECS:-10}
RATE_TOPICS=${RATE_TOPICS:-1000 100}
FLAT_SECS=${FLAT_SECS:-5}
FLAT_TOPICS=${FLAT_TOPICS:-100}
WORKERS=${WORKERS:-1}
FLAT_WORKERS=${FLAT_WORKERS:-$WORKERS}
HTTP_CONNS=${HTTP_CONNS:-2}
DEPTH=${DEPTH:-16}
ROUNDS=${ROUNDS:-3}
KEY=bench-api-key-0123456789
wsd_only=0
for arg in "$@"; do
    case $arg in
        --wsd-only) wsd_only=1 ;;
        -h | --help) sed -n '2,40s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-api: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for v in CONNS RATE SECS FLAT_SECS FLAT_TOPICS WORKERS FLAT_WORKERS HTTP_CONNS DEPTH ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-api: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
read -r -a rate_topics <<<"$RATE_TOPICS"
for t in "${rate_topics[@]}"; do
    [[ $t =~ ^[1-9][0-9]*$ ]] || { echo "bench-api: RATE_TOPICS must be positive integers, got '$RATE_TOPICS'" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "bench-api: needs python3" >&2; exit 1; }

# The fd limit raised, wsd built unless WSD_BIN is given, pids/tmp/cleanup trap, free_port,
# write_config and start_wsd: all from bench-lib.sh.
NAME=bench-api
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
out=${CARGO_TARGET_DIR:-$root/target}/bench-api
mkdir -p "$out"
rm -f "$out"/*.json

# forget PID: PID has been waited for; the exit trap must not signal it (it may be reused).
forget() {
    local p kept=()
    for p in "${pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
    pids=("${kept[@]}")
}

# stop PID...: TERM, then KILL after 10 s; waits for each.
stop() {
    local p deadline=$((SECONDS + 10))
    for p in "$@"; do
        [[ -n $p ]] || continue
        kill -TERM "$p" 2>/dev/null || true
        while kill -0 "$p" 2>/dev/null; do
            ((SECONDS < deadline)) || { kill -KILL "$p" 2>/dev/null || true; break; }
            sleep 0.05
        done
        wait "$p" 2>/dev/null || true
        forget "$p"
    done
}

# --- Redis ---------------------------------------------------------------------------------
if ! command -v redis-server >/dev/null && command -v apt-get >/dev/null && ((EUID == 0)); then
    say "installing redis-server with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
        >"$out/apt.log" 2>&1 || say "apt-get could not install redis-server (see $out/apt.log)"
fi
command -v redis-server >/dev/null || die "no redis-server (not installed, and apt-get could not install it)"
rport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --dir "$tmp" --save '' --appendonly no \
    --daemonize no >"$tmp/redis.log" 2>&1 &
redis_pid=$!
pids+=("$redis_pid")
# A subshell, so a refused connection cannot take the script's descriptors with it.
redis_up() { (exec 3<>"/dev/tcp/127.0.0.1/$rport" && printf 'PING\r\n' >&3 && read -r -t 1 pong <&3 && [[ $pong == +PONG* ]]); }
deadline=$((SECONDS + 10))
until redis_up 2>/dev/null; do
    ((SECONDS < deadline)) || die "redis-server did not answer on port $rport: $(tail -n 3 "$tmp/redis.log")"
    sleep 0.2
done
redis_url=redis://127.0.0.1:$rport/0

# --- The client ----------------------------------------------------------------------------
# bench NAME TOPICS ARGS...: `wsd bench api` with the runs' common arguments, at RATE (flat out
# if NAME ends in -flat); its JSON to $out/NAME.ROUND.json, its progress to $tmp/NAME.err.
bench() {
    local name=$1 topics=$2 secs=$SECS pace=(--rate "$RATE") what="$RATE publishes/s"
    shift 2
    if [[ $name == *-flat ]]; then
        secs=$FLAT_SECS pace=(--flat --depth "$DEPTH") what="flat out"
    fi
    say "$name, round $round/$ROUNDS: $CONNS subscribers over 2 hosts, $topics topics, $what for $secs s (load $(cut -d' ' -f1 /proc/loadavg))"
    # In the background and waited for, so that a signal stops the script (and, through the
    # trap, the client) at once rather than after the run.
    timeout -k 10 $((secs + 120)) "$WSD_BIN" bench api --conns "$CONNS" --topics "$topics" \
        --http-conns "$HTTP_CONNS" --secs "$secs" --redis-pid "$redis_pid" --json "${pace[@]}" "$@" \
        >"$out/$name.$round.json" 2>"$tmp/$name.err" &
    local client=$!
    pids+=("$client")
    wait "$client" || say "$name: the run counted errors or failed ($(tail -n 2 "$tmp/$name.err" | tr '\n' ' '))"
    forget "$client"
    if ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$out/$name.$round.json" 2>/dev/null; then
        say "$name: no result"
        rm -f "$out/$name.$round.json"
    fi
}

# --- wsd -----------------------------------------------------------------------------------
# wsd_host N COUNT: a master with its own config in $tmp/wsd-N (COUNT workers, pubsub, the
# Redis bus, the API on a free port); sets wsd_master[N], wsd_config[N], wsd_port[N] and
# wsd_api[N].
wsd_master=() wsd_config=() wsd_port=() wsd_api=()
wsd_host() {
    local n=$1 dir=$tmp/wsd-$1
    rm -rf "$dir"
    write_config "$dir" pubsub "$2" $((CONNS + 1000)) "bus = \"$redis_url\""
    [[ -z ${GROUP_EXTRA:-} ]] || printf '%s\n' "$GROUP_EXTRA" >>"$dir/workers.toml"
    printf '\n[api]\nlisten = "http://127.0.0.1:0"\nkeys = ["%s"]\n' "$KEY" >>"$dir/workers.toml"
    local started=0
    WSD_BIN=${SERVER_BIN:-$WSD_BIN} start_wsd "$dir" || started=$?
    wsd_master[n]=$master # stopped by wsd_stop even if it did not get ready
    ((started == 0)) || return 1
    wsd_config[n]=$config wsd_port[n]=$port
    wsd_api[n]=$("${SERVER_BIN:-$WSD_BIN}" -c "$config" status --json | python3 -c 'import json, sys; print(json.load(sys.stdin)["api"]["listen"])')
}
wsd_stop() {
    stop "${wsd_master[@]}"
    wsd_master=()
}
# wsd_run NAME TOPICS COUNT: both hosts started fresh with COUNT workers each, one run, both
# stopped.
wsd_run() {
    if wsd_host 1 "$3" && wsd_host 2 "$3"; then
        bench "$1" "$2" --url "ws://127.0.0.1:${wsd_port[1]}/" --url "ws://127.0.0.1:${wsd_port[2]}/" \
            --api "${wsd_api[1]}" --key "$KEY" --config "${wsd_config[1]}" --host-config "${wsd_config[2]}"
    else
        say "$1: wsd did not start (see above)"
    fi
    wsd_stop
}

# --- socket.io -----------------------------------------------------------------------------
node_dir=$out/node
peer=$root/benches/peers/socketio
sio_note=
if ((wsd_only)); then
    sio_note="skipped (--wsd-only)"
elif ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    sio_note="no node/npm on this machine"
else
    # npm ci only when the lock file changed since the last install (it wipes node_modules).
    mkdir -p "$node_dir"
    if [[ ! -f $node_dir/node_modules/.package-lock.json ||
        $peer/package-lock.json -nt $node_dir/node_modules/.package-lock.json ]]; then
        say "installing socket.io, its Redis adapter and emitter (npm ci into $node_dir)"
        cp "$peer/package.json" "$peer/package-lock.json" "$node_dir/"
        (cd "$node_dir" && npm ci --no-audit --no-fund) >"$out/npm.log" 2>&1 ||
            say "npm ci failed (see $out/npm.log)"
    fi
    [[ -f $node_dir/node_modules/socket.io/package.json ]] || sio_note="npm could not install socket.io (see $out/npm.log)"
fi
# node_peer NAME SCRIPT: starts benches/peers/socketio/SCRIPT on a free port; sets node_pid
# and node_port once it says "ready". Returns 1 (after saying why) otherwise.
node_peer() {
    local name=$1 script=$2 deadline=$((SECONDS + 30))
    node_port=$(free_port)
    NODE_PATH=$node_dir/node_modules node "$peer/$script" "$node_port" "$redis_url" >"$tmp/$name.log" 2>&1 &
    node_pid=$!
    pids+=("$node_pid")
    until grep -q '^ready' "$tmp/$name.log" 2>/dev/null; do
        if ! kill -0 "$node_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            say "$name did not start: $(tail -n 3 "$tmp/$name.log" | tr '\n' ' ')"
            stop "$node_pid"
            return 1
        fi
        sleep 0.1
    done
}
# sio_run NAME TOPICS: both socket.io servers and the backend started fresh, one run, all
# stopped.
sio_run() {
    local started=() p1 p2
    if node_peer "$1-server-1" server.js && started+=("$node_pid") && p1=$node_port &&
        node_peer "$1-server-2" server.js && started+=("$node_pid") && p2=$node_port &&
        node_peer "$1-backend" backend.js && started+=("$node_pid"); then
        bench "$1" "$2" --protocol socketio --url "ws://127.0.0.1:$p1/" --url "ws://127.0.0.1:$p2/" \
            --api "http://127.0.0.1:$node_port" --pid "${started[0]},${started[1]}" --backend-pid "${started[2]}"
    else
        say "$1: the socket.io peers did not start (see above)"
    fi
    stop "${started[@]}"
}
[[ -z $sio_note ]] || say "socket.io: $sio_note"

# --- The runs ------------------------------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
    for t in "${rate_topics[@]}"; do wsd_run "wsd-$t" "$t" "$WORKERS"; done
    wsd_run wsd-flat "$FLAT_TOPICS" "$FLAT_WORKERS"
    if [[ -z $sio_note ]]; then
        for t in "${rate_topics[@]}"; do sio_run "sio-$t" "$t"; done
        sio_run sio-flat "$FLAT_TOPICS"
    fi
done

# --- The tables ----------------------------------------------------------------------------
version() { node -p 'require(process.argv[1]).version' "$node_dir/node_modules/$1/package.json" 2>/dev/null || echo '-'; }
echo
echo "Publishing through an API to $CONNS subscribers on 2 hosts; wsd: $WORKERS worker(s) per host" \
    "($FLAT_WORKERS flat out); medians of $ROUNDS round(s); $(nproc) cores, load at the end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "wsd $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?'), Redis" \
    "$(redis-server --version | grep -o 'v=[0-9.]*' | cut -d= -f2), node $(node --version 2>/dev/null || echo '-')," \
    "socket.io $(version socket.io), @socket.io/redis-adapter $(version @socket.io/redis-adapter)," \
    "@socket.io/redis-emitter $(version @socket.io/redis-emitter)"
echo
python3 - "$out" "$RATE" "$SECS" "$FLAT_SECS" "$CONNS" "$FLAT_TOPICS" "$sio_note" "${rate_topics[@]}" <<'EOF'
import glob, json, statistics, sys
out, rate, secs, flat_secs, conns, flat_topics, sio_note = sys.argv[1:8]
rate_topics = sys.argv[8:]

def load(name):
    """Every round's result of run NAME."""
    runs = []
    for p in sorted(glob.glob(f"{out}/{name}.*.json")):
        try:
            with open(p) as f:
                runs.append(json.load(f))
        except (OSError, ValueError):
            pass
    return runs

def get(r, *path):
    for k in path:
        if not isinstance(r, dict) or r.get(k) is None:
            return None
        r = r[k]
    return r

def ms(us): return f"{us / 1000:.2f} ms"
def num(v): return f"{v:,.0f}"
def secs2(v): return f"{v:.2f}"
def pct(v): return f"{v:.0f} %"
def cpu(r): return get(r, "server", "cpu_secs")

def all_cpu(r):
    """Deliveries per CPU-second of the servers, Redis and the emitting backend together."""
    c = cpu(r)
    if not c:
        return None
    c += (get(r, "redis", "cpu_secs") or 0) + (get(r, "backend", "cpu_secs") or 0)
    return r["delivered"] / c

# (label, value, format, show wsd ÷ socket.io)
ROWS = [
    ("publishes/s", lambda r: get(r, "publishes_per_sec"), num, False),
    ("deliveries/s", lambda r: get(r, "deliveries_per_sec"), num, True),
    ("missing deliveries", lambda r: get(r, "missing"), num, False),
    ("latency p50", lambda r: get(r, "latency_us", "p50"), ms, True),
    ("latency p99", lambda r: get(r, "latency_us", "p99"), ms, True),
    ("latency p99.9", lambda r: get(r, "latency_us", "p999"), ms, True),
    ("API answer p99", lambda r: get(r, "answer_latency_us", "p99"), ms, False),
    ("server CPU s", cpu, secs2, True),
    ("  of it in the kernel", lambda r: get(r, "server", "cpu_system_secs") / cpu(r) * 100, pct, False),
    ("deliveries per server-CPU-second", lambda r: get(r, "deliveries_per_cpu_sec"), num, True),
    ("Redis CPU s", lambda r: get(r, "redis", "cpu_secs"), secs2, False),
    ("emitting backend CPU s", lambda r: get(r, "backend", "cpu_secs"), secs2, False),
    ("deliveries per CPU-second, Redis and backend counted", all_cpu, num, True),
    ("client CPU s", lambda r: get(r, "client", "cpu_secs"), secs2, False),
    ("errors", lambda r: get(r, "errors", "total"), num, False),
]

def value(r, f):
    try:
        return f(r)
    except (TypeError, KeyError, ZeroDivisionError):
        return None

def median(runs, f):
    """The median over the rounds, and every round's value."""
    vals = [v for v in (value(r, f) for r in runs) if v is not None]
    return (statistics.median(vals) if vals else None), vals

scenarios = [(t, f"{rate} publishes/s for {secs} s, {int(conns) // int(t):,} subscribers per publish ({t} topics)")
             for t in rate_topics]
scenarios.append(("flat", f"flat out for {flat_secs} s, {int(conns) // int(flat_topics):,} subscribers per publish "
                          f"({flat_topics} topics)"))
for key, title in scenarios:
    w, s = load(f"wsd-{key}"), load(f"sio-{key}")
    print(f"### {title}\n")
    print("| | wsd | socket.io | wsd ÷ socket.io |")
    print("|---|---:|---:|---:|")
    for name, f, fmt, ratio in ROWS:
        (a, aa), (b, bb) = median(w, f), median(s, f)
        def cell(runs, v, each):
            if not runs:
                return "n/a"
            if v is None:
                return "–"
            lo, hi = (fmt(x).replace(" ms", "").replace(" %", "") for x in (min(each), max(each)))
            spread = f" ({lo}–{hi})" if lo != hi else ""
            return fmt(v) + spread
        q = f"{a / b:.2f}" if ratio and a is not None and b else ""
        print(f"| {name} | {cell(w, a, aa)} | {cell(s, b, bb)} | {q} |")
    notes = []
    p99, each = median(w, lambda r: get(r, "latency_us", "p99"))
    if key != "flat" and p99 is not None:
        met = sum(v <= 10_000 for v in each)
        notes.append(f"wsd's p99 at {rate} publishes/s: {p99 / 1000:.2f} ms, at most 10 ms in {met} of {len(each)} "
                     "round(s).")
    (a, _), (b, _) = (median(w, lambda r: get(r, "deliveries_per_cpu_sec")),
                      median(s, lambda r: get(r, "deliveries_per_cpu_sec")))
    if a and b:
        notes.append(f"wsd's deliveries per server-CPU-second: {a / b:.2f}× socket.io's (target at least 5×: "
                     f"{'met' if a >= 5 * b else 'not met'}).")
    print("\n" + " ".join(notes) if notes else "")
    for n, runs in ((f"wsd-{key}", w), (f"sio-{key}", s)):
        for r in runs:
            for e in get(r, "errors", "samples") or []:
                print(f"  {n}: e.g. {e}")
            if get(r, "server", "processes_gone"):
                print(f"  {n}: {r['server']['processes_gone']} server process(es) ended during a run: "
                      "their CPU is not counted")
    print()
if sio_note:
    print(f"socket.io: {sio_note}")
print(f"(each run's JSON in {out}/)", file=sys.stderr)
EOF
compgen -G "$out/wsd-*.json" >/dev/null || die "no wsd run produced a result"
