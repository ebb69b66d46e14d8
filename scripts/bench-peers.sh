#!/usr/bin/env bash
# wsd side by side with its peers, on this box, with the same client (`wsd bench`).
#
# Servers, each started fresh for every run in its own temp dir on a free loopback port:
#   raw                a single-threaded epoll byte-echo of frames (benches/peers/raw, raw-epoll):
#                      the physical ceiling (the kernel's TCP path and nothing else)
#   raw-uring          the same byte-echo on io_uring (raw-uring: multishot recv, provided
#                      buffers, one io_uring_enter a turn): what batching system calls adds
#   wsd-1              wsd, echo app, count = 1 (the latency scenario runs clock-echo: echo with
#                      the clock's 5 s push to every connection firing)
#   wsd-2              wsd, the same, count = 2 (not pinned: both cores, shared with the client)
#   tokio-tungstenite  tokio-tungstenite 0.30 on a current_thread runtime (benches/peers/),
#                      its read buffer cut from 128 KiB to 4 KiB: tungstenite at its best
#   tungstenite-defaults  the same binary with every WebSocketConfig default (128 KiB read
#                      buffer, zero-filled up to that size each read): as a user gets it
#   fastwebsockets     fastwebsockets 0.10 + hyper upgrade, current_thread (benches/peers/)
#   node-ws            Node `ws` (benches/peers/node/ws-echo.js)
#   bun                Bun.serve websocket, uWebSockets inside (the `bun` npm package)
# Every server but wsd-2 runs on core 0 (taskset) with the client on core 1: per-core figures.
#
# Scenarios are the SCENARIOS list below (one line each: edit it to add or drop one); a
# scenario whose `wsd bench` mode this build lacks is skipped with a note. For each scenario,
# ROUNDS rounds, each running every server once in the same order (A-B-C.., A-B-C..), so drift
# of the machine spreads over all of them; the figure is the median over rounds. Echo and
# latency runs get a WARMUP-second run of the same load first (JIT, allocator, caches), on the
# same server process, not counted.
#
# The latency scenario measures LATENCY_SECS (20) per run, not SECS: its p99 is set by the few
# times a kernel thread holds the server's or the client's core for milliseconds (kdamond,
# kworkers, rcu_preempt on this VM), some 10-25 of them in 5 s. Over 5 s the same raw epoll
# binary's p99 ranged 109-1778 µs from round to round; over 20 s, 120-594 µs.
#
# Prints markdown: per scenario each server's figure and its ratio to raw, then wsd's ratio to
# each peer; writes the same plus every round's figure and the machine to target/bench-peers.md,
# and each run's JSON to target/bench-peers/. Takes ~35 minutes with the defaults. Not for CI.
#
# Usage: [SECS=5] [LATENCY_SECS=20] [ROUNDS=3] [WARMUP=1] [SERVERS=raw,wsd-1,...]
#        [ONLY=echo-32B-d1,...] [WSD_BIN=path/to/wsd] scripts/bench-peers.sh
# Needs cargo; node and npm for node-ws and bun (npm installs benches/peers/node's pinned
# packages); a server that cannot be built or installed is reported unavailable, not faked.
set -euo pipefail

# name           | wsd bench arguments ({SECS}, {LATENCY_SECS} replaced)   | warmup first ('' none)                              | wsd's app
SCENARIOS=(
    "echo-32B-d1      | echo --conns 100 --size 32 --depth 1 --secs {SECS}    | echo --conns 100 --size 32 --depth 1 --secs {WARMUP}    | echo"
    "echo-4KiB-d1     | echo --conns 100 --size 4096 --depth 1 --secs {SECS}  | echo --conns 100 --size 4096 --depth 1 --secs {WARMUP}  | echo"
    "echo-32B-d16     | echo --conns 100 --size 32 --depth 16 --secs {SECS}   | echo --conns 100 --size 32 --depth 16 --secs {WARMUP}   | echo"
    "idle-15000       | idle --conns 15000 --hold 1                           |                                                         | echo"
    "connect-10000    | connect --conns 10000 --secs {SECS}                   | connect --conns 1000 --secs 0                           | echo"
    "latency-20k-1000 | latency --conns 1000 --rate 20000 --secs {LATENCY_SECS} | latency --conns 1000 --rate 20000 --secs {WARMUP}       | clock-echo"
)
ALL_SERVERS=(raw raw-uring wsd-1 wsd-2 tokio-tungstenite tungstenite-defaults fastwebsockets node-ws bun)
SERVER_CPU=0 # where pinned servers run
CLIENT_CPU=1 # where their client runs

SECS=${SECS:-5}
LATENCY_SECS=${LATENCY_SECS:-20}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,40s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-peers: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
die() { echo "bench-peers: $*" >&2; exit 1; }
for v in SECS LATENCY_SECS ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ $WARMUP =~ ^[0-9]+$ ]] || die "WARMUP must be a whole number of seconds, got '$WARMUP'"
command -v python3 >/dev/null || die "needs python3"
IFS=, read -r -a servers <<<"${SERVERS:-$(IFS=,; echo "${ALL_SERVERS[*]}")}"
for s in "${servers[@]}"; do
    [[ " ${ALL_SERVERS[*]} " == *" $s "* ]] || die "unknown server '$s' (known: ${ALL_SERVERS[*]})"
done

# The fd limit raised (a server holds up to 15,000 sockets), wsd built unless WSD_BIN is
# given, and pids, tmp, the cleanup trap and free_port: all from bench-lib.sh.
NAME=bench-peers
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

pin_server=() pin_client=()
if (($(nproc) >= 2)) && command -v taskset >/dev/null; then
    pin_server=(taskset -c "$SERVER_CPU") pin_client=(taskset -c "$CLIENT_CPU")
else
    say "fewer than 2 cores or no taskset: nothing is pinned"
fi

out=${CARGO_TARGET_DIR:-$root/target}
runs=$out/bench-peers
mkdir -p "$runs"
rm -f "$runs"/*.json "$runs"/unavailable.txt "$runs"/skipped.txt
declare -A unavailable=()
mark_unavailable() { unavailable[$1]=$2; say "$1 unavailable: $2"; printf '%s\t%s\n' "$1" "$2" >>"$runs/unavailable.txt"; }
wants() { [[ " ${servers[*]} " == *" $1 "* ]]; }

# --- Build and install -------------------------------------------------------------------
peers_target=${CARGO_TARGET_DIR:-$root/benches/peers/target}
if wants raw || wants raw-uring || wants tokio-tungstenite || wants tungstenite-defaults || wants fastwebsockets; then
    say "building the Rust peers (release, benches/peers/Cargo.lock)"
    if ! (cd "$root/benches/peers" && cargo build --release --locked); then
        for s in raw raw-uring tokio-tungstenite tungstenite-defaults fastwebsockets; do mark_unavailable "$s" "cargo build failed"; done
    fi
fi
node_dir=$root/benches/peers/node
BUN=
if wants node-ws || wants bun; then
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        mark_unavailable node-ws "no node/npm on this machine"
        mark_unavailable bun "no npm on this machine"
    else
        # npm ci only when the lock file changed since the last install (it wipes node_modules).
        if [[ ! -f $node_dir/node_modules/.package-lock.json ||
            $node_dir/package-lock.json -nt $node_dir/node_modules/.package-lock.json ]]; then
            say "installing benches/peers/node (npm ci: ws, bun)"
            (cd "$node_dir" && npm ci --no-audit --no-fund) >"$runs/npm.log" 2>&1 ||
                say "npm ci failed (see $runs/npm.log)"
        fi
        [[ -f $node_dir/node_modules/ws/package.json ]] || mark_unavailable node-ws "npm could not install ws (see $runs/npm.log)"
        # The bun package's postinstall puts the binary at bin/bun.exe; without it (scripts
        # off), the platform package still holds it.
        for b in "$node_dir"/node_modules/bun/bin/bun.exe "$node_dir"/node_modules/@oven/bun-linux-*/bin/bun; do
            if [[ -x $b ]] && "$b" --version >/dev/null 2>&1; then BUN=$b; break; fi
        done
        [[ -n $BUN ]] || mark_unavailable bun "the bun npm package left no runnable binary (its postinstall must run; npm output in $runs/npm.log)"
    fi
fi

# --- Processes ---------------------------------------------------------------------------
# start_server NAME DIR: starts NAME in DIR on a free port; sets server_pid, port and
# server_args (how the client finds its processes). Returns 1 (after saying why) if it does
# not accept connections within 30 s.
start_server() {
    local name=$1 dir=$2 deadline=$((SECONDS + 30)) cmd pin=("${pin_server[@]}") st
    port=$(free_port)
    server_args=()
    case $name in
        raw) cmd=("$peers_target/release/raw-epoll" "$port") ;;
        raw-uring) cmd=("$peers_target/release/raw-uring" "$port") ;;
        tokio-tungstenite) cmd=("$peers_target/release/peer-tokio-tungstenite" "$port") ;;
        tungstenite-defaults)
            cmd=(env TUNGSTENITE_READ_BUFFER=131072 "$peers_target/release/peer-tokio-tungstenite" "$port") ;;
        fastwebsockets) cmd=("$peers_target/release/peer-fastwebsockets" "$port") ;;
        node-ws) cmd=(node "$node_dir/ws-echo.js" "$port") ;;
        bun) cmd=("$BUN" "$node_dir/bun-echo.js" "$port") ;;
        wsd-1 | wsd-2)
            cat >"$dir/workers.toml" <<EOF
[server]
stop_timeout = "3s"
close_spread = "0.2s"
log_level = "warn"

[[worker]]
name = "echo"
listen = "websocket://127.0.0.1:$port"
count = ${name#wsd-}
app = "$wsd_app"
max_connections = 20000
max_connections_per_ip = 0
EOF
            cmd=("$WSD_BIN" -c "$dir/workers.toml" start)
            server_args=(--config "$dir/workers.toml")
            [[ $name == wsd-2 ]] && pin=()
            ;;
    esac
    (cd "$dir" && exec "${pin[@]}" "${cmd[@]}") >"$dir/server.log" 2>&1 &
    server_pid=$!
    pids+=("$server_pid")
    [[ -n ${server_args[*]} ]] || server_args=(--pid "$server_pid")
    while ((SECONDS < deadline)); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            say "$name exited at start: $(tail -n 3 "$dir/server.log" | tr '\n' ' ')"
            return 1
        fi
        st=ok
        if [[ $name == wsd-* ]]; then
            # Every worker up, or the first would take all connections.
            st=$("$WSD_BIN" -c "$dir/workers.toml" status --json 2>/dev/null | python3 -c '
import json, sys
ws = json.load(sys.stdin)["workers"]
print("ok" if ws and all(w["status"] == "idle" and w["pid"] > 0 for w in ws) else "")' 2>/dev/null) || st=
        fi
        # A subshell, so that the probe's descriptor goes with it.
        if [[ $st == ok ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    say "$name did not accept connections within 30 s: $(tail -n 3 "$dir/server.log" | tr '\n' ' ')"
    return 1
}

stop_server() {
    local deadline=$((SECONDS + 10))
    kill -TERM "$server_pid" 2>/dev/null || true
    while kill -0 "$server_pid" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill -KILL "$server_pid" 2>/dev/null || true; break; }
        sleep 0.05
    done
    wait "$server_pid" 2>/dev/null || true
}

# client ARGS... : wsd bench against the current server, pinned like it (or not). A pinned
# latency client spins between sends (--spin): it has its core to itself, and sleeping costs
# it hypervisor traps that would count as latency.
client() {
    local limit=$(((SECS > LATENCY_SECS ? SECS : LATENCY_SECS) * 3 + 120)) pin=("${pin_client[@]}") extra=()
    [[ $current == wsd-2 ]] && pin=()
    [[ $1 == latency && ${#pin[@]} -gt 0 ]] && extra=(--spin)
    # shellcheck disable=SC2086 # the scenario's arguments are words
    timeout -k 10 "$limit" "${pin[@]}" "$WSD_BIN" bench "$@" "${extra[@]}" --url "ws://127.0.0.1:$port/" --json
}

# --- Runs --------------------------------------------------------------------------------
scenario_names=()
for line in "${SCENARIOS[@]}"; do
    IFS='|' read -r name args warm wsd_app <<<"$line"
    name=$(xargs <<<"$name") args=$(xargs <<<"$args") warm=$(xargs <<<"$warm") # trim
    wsd_app=$(xargs <<<"$wsd_app")
    [[ -z ${ONLY:-} || ",$ONLY," == *",$name,"* ]] || continue
    mode=${args%% *}
    if ! "$WSD_BIN" bench "$mode" --help >/dev/null 2>&1; then
        say "skipping $name: this wsd bench has no '$mode' mode"
        printf '%s\t%s\n' "$name" "this wsd bench has no '$mode' mode" >>"$runs/skipped.txt"
        continue
    fi
    scenario_names+=("$name")
    args=${args//\{SECS\}/$SECS}
    args=${args//\{LATENCY_SECS\}/$LATENCY_SECS}
    warm=${warm//\{WARMUP\}/$WARMUP}
    ((WARMUP > 0)) || warm=
    for ((round = 1; round <= ROUNDS; round++)); do
        for current in "${servers[@]}"; do
            [[ -z ${unavailable[$current]:-} ]] || continue
            dir=$tmp/$name.$current.$round
            mkdir -p "$dir"
            say "$name, round $round/$ROUNDS: $current"
            start_server "$current" "$dir" || { stop_server; continue; }
            if [[ -n $warm ]]; then
                # shellcheck disable=SC2086
                client $warm >/dev/null 2>"$dir/warmup.err" || true
            fi
            # shellcheck disable=SC2086
            client $args "${server_args[@]}" >"$dir/run.json" 2>"$dir/run.err" || true
            stop_server
            if [[ -s $dir/run.json ]] && python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$dir/run.json" 2>/dev/null; then
                cp "$dir/run.json" "$runs/$name.$current.$round.json"
            else
                say "$name/$current round $round: no result ($(tail -n 2 "$dir/run.err" | tr '\n' ' '))"
            fi
            sleep 0.5
        done
    done
done
((${#scenario_names[@]})) || die "no scenario to run"

# --- Table -------------------------------------------------------------------------------
machine="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), $(nproc) cores, \
$(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r)"
crate_version() { awk -v n="$1" '$0 == "name = \"" n "\"" {getline; gsub(/[^0-9.]/, ""); print; exit}' \
    "$root/benches/peers/Cargo.lock"; }
versions="wsd $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?'), \
$(rustc --version 2>/dev/null | cut -d' ' -f1-2), tokio-tungstenite $(crate_version tokio-tungstenite), \
fastwebsockets $(crate_version fastwebsockets) (hyper $(crate_version hyper)), tokio $(crate_version tokio), \
node $(node --version 2>/dev/null || echo '-') with ws $(node -p 'require(process.argv[1]).version' \
"$node_dir/node_modules/ws/package.json" 2>/dev/null || echo '-'), bun $([[ -n $BUN ]] && "$BUN" --version || echo '-')"
python3 - "$runs" "$out/bench-peers.md" "$ROUNDS" "$SECS" "$WARMUP" "$machine" "$versions" \
    "$((${#pin_server[@]} > 0))" "$(IFS=,; echo "${servers[*]}")" "$(IFS=,; echo "${scenario_names[*]}")" \
    "$LATENCY_SECS" <<'EOF'
import glob, json, os, statistics, sys

runs, md_path, rounds, secs, warmup, machine, versions, pinned = sys.argv[1:9]
servers, scenarios = sys.argv[9].split(","), sys.argv[10].split(",")
latency_secs = sys.argv[11]
timing = f"{secs} s each" + (f", latency {latency_secs} s" if "latency-20k-1000" in scenarios else "")
LABEL = {"raw": "raw epoll", "raw-uring": "raw io_uring", "wsd-1": "wsd ×1", "wsd-2": "wsd ×2", "tokio-tungstenite": "tokio-tungstenite",
         "tungstenite-defaults": "tokio-tungstenite, defaults",
         "fastwebsockets": "fastwebsockets", "node-ws": "Node ws", "bun": "Bun"}
WSD = [s for s in ("wsd-1", "wsd-2") if s in servers]
# The raw echoes are ceilings, not choices: wsd is not divided by them.
PEERS = [s for s in servers if s not in ("raw", "raw-uring", "wsd-1", "wsd-2")]

def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) else None

# (label, JSON path, higher is better) per mode.
METRICS = {
    # Each pinned server is CPU-bound on its core: its rate is the inverse of this.
    "echo": [("msgs/s", "msgs_per_sec", True),
             ("server CPU µs per message", "server.cpu_secs_per_million", False)],
    # At a fixed rate every server keeps up; what it spends doing so tells them apart.
    "latency": [("p50 µs", "latency_us.p50", False), ("p99 µs", "latency_us.p99", False),
                ("p99.9 µs", "latency_us.p999", False),
                ("server CPU s per million msgs", "server.cpu_secs_per_million", False)],
    "idle": [("KiB Pss per connection", "server.memory.pss_kib_per_conn", False)],
    # Sustained cycles are bound by the client's core, not the server's: the server's CPU per
    # handshake is the comparison there.
    "connect": [("burst upgrades/s", "burst.upgrades_per_sec", True),
                ("sustained handshakes/s", "sustained.handshakes_per_sec", True),
                ("server CPU µs per handshake", "server.cpu_us_per_handshake", False)],
    "broadcast": [("deliveries/s", "deliveries_per_sec", True)],
}

def describe(r):
    n = f"{r['conns']:,} conns"
    m = r["mode"]
    if m == "echo":
        size = f"{r['size'] // 1024} KiB" if r["size"] % 1024 == 0 else f"{r['size']} B"
        return f"echo {size}, {r['depth']} in flight, {n}"
    if m == "latency":
        return f"latency, {r['rate']:,} msg/s open loop, {n} (wsd: clock-echo, 5 s push on)"
    if m == "idle":
        return f"idle, {n}"
    if m == "connect":
        return f"connect, burst of {r['conns']:,}" + (f" then {r['secs']} s of cycles" if r.get("secs") else "")
    return f"{m}, {n}"

def trouble(r):
    """Why a run's figure is suspect, or None."""
    why = []
    if r["errors"]["total"]:
        why.append(f"{r['errors']['total']} errors ({'; '.join(r['errors']['samples'][:2])})")
    if r["mode"] == "latency" and r.get("achieved_rate", 0) < 0.95 * r.get("rate", 0):
        why.append(f"sent {r['achieved_rate']:,.0f} of {r['rate']:,} msg/s")
    # wsd (it has a master) runs clock-echo there: its push must have landed in the window.
    if r["mode"] == "latency" and (r.get("server") or {}).get("master") and not r.get("pushes"):
        why.append("no clock push landed in the measured window")
    if r["mode"] == "idle" and r.get("ready", 0) < r["conns"]:
        why.append(f"{r['ready']:,} of {r['conns']:,} connections up")
    return "; ".join(why) or None

def fmt(v):
    if v is None:
        return "–"
    a = abs(v)
    if a >= 1e6: return f"{v / 1e6:.2f} M"
    if a >= 1e4: return f"{v / 1e3:.0f} k"
    if a >= 100: return f"{v:.0f}"
    if a >= 10: return f"{v:.1f}"
    return f"{v:.2f}"

def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b not in (None, 0) and b > 0 and a >= 0 else "–"

unavailable = {}
if os.path.exists(f"{runs}/unavailable.txt"):
    for line in open(f"{runs}/unavailable.txt"):
        k, _, v = line.rstrip("\n").partition("\t")
        unavailable[k] = v

rows, notes, details = [], [], []
for sc in scenarios:
    results = {}
    for s in servers:
        results[s] = []
        for p in sorted(glob.glob(f"{runs}/{sc}.{s}.*.json")):
            try:
                results[s].append(json.load(open(p)))
            except ValueError:
                pass
    any_run = next((r for rs in results.values() for r in rs), None)
    if any_run is None:
        notes.append(f"{sc}: no server produced a result")
        continue
    for s in servers:
        got = len(results[s])
        if s not in unavailable and got < int(rounds):
            notes.append(f"{sc} / {LABEL[s]}: {int(rounds) - got} of {rounds} round(s) gave no result")
        for r in results[s]:
            t = trouble(r)
            if t:
                notes.append(f"{sc} / {LABEL[s]}, a round: {t}")
    for label, path, higher in METRICS.get(any_run["mode"], []):
        med, each, flagged = {}, {}, {}
        for s in servers:
            vals = [get(r, path) for r in results[s]]
            vals = [v for v in vals if v is not None]
            each[s] = vals
            med[s] = statistics.median(vals) if vals else None
            flagged[s] = any(trouble(r) for r in results[s])
        if all(v is None for v in med.values()):
            continue
        rows.append((f"{describe(any_run)}: {label} {'↑' if higher else '↓'}", med, flagged))
        details.append((f"{sc}: {label}", each))

def cell(s, med, flagged):
    if s in unavailable:
        return "n/a"
    v = med[s]
    if v is None:
        return "fail"
    mark = " ⚠" if flagged[s] else ""
    if s == "raw" or "raw" not in med:
        return fmt(v) + mark
    return f"{fmt(v)} ({ratio(v, med['raw'])}){mark}"

lines = []
lines.append(f"| scenario ({'median of ' + rounds if int(rounds) > 1 else '1 round'}, {timing}) | "
             + " | ".join(LABEL[s] for s in servers) + " |")
lines.append("|---|" + "---:|" * len(servers))
for title, med, flagged in rows:
    lines.append(f"| {title} | " + " | ".join(cell(s, med, flagged) for s in servers) + " |")
table1 = "\n".join(lines)

lines = []
if WSD and PEERS:
    lines.append("| scenario | wsd | " + " | ".join(f"÷ {LABEL[p]}" for p in PEERS) + " |")
    lines.append("|---|---|" + "---:|" * len(PEERS))
    for title, med, flagged in rows:
        for w in WSD:
            lines.append(f"| {title} | {LABEL[w]} | "
                         + " | ".join("n/a" if p in unavailable else ratio(med[w], med[p]) for p in PEERS) + " |")
table2 = "\n".join(lines)

pin_note = ("every server but wsd ×2 pinned to core 0 (taskset), its client to core 1; "
            "wsd ×2 and its client unpinned (2 workers and the client share both cores)"
            if pinned == "1" else "nothing pinned")
legend = (f"Figures: the median over {rounds} round(s); in parentheses the ratio to raw epoll. "
          "↑ higher is better, ↓ lower is better. ⚠: a round had errors or missed its load (see notes). "
          "n/a: not available on this machine. wsd ×1 is `count = 1`, wsd ×2 `count = 2`.")
out = [table1, "", legend]
if table2:
    out += ["", "wsd's figure divided by each peer's (read it with the scenario's arrow):", "", table2]
notes += [f"{k}: unavailable, {v}" for k, v in unavailable.items()]
if os.path.exists(f"{runs}/skipped.txt"):
    notes += [f"{k}: skipped, {v}" for k, v in (l.rstrip("\n").split("\t", 1) for l in open(f"{runs}/skipped.txt"))]
if notes:
    out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
print("\n".join(out))

with open(md_path, "w") as f:
    f.write("# wsd and its peers (scripts/bench-peers.sh)\n\n")
    f.write(f"Machine: {machine}. Versions: {versions}.\n")
    f.write(f"Client: `wsd bench` for every server; {pin_note}. {timing.replace(' each', '')} measured per run, "
            f"{warmup} s warmup run first (echo, latency, connect), a fresh server process per run.\n\n")
    f.write("\n".join(out) + "\n\nEvery round (in run order):\n\n")
    f.write("| scenario | " + " | ".join(LABEL[s] for s in servers) + " |\n")
    f.write("|---|" + "---|" * len(servers) + "\n")
    for title, each in details:
        f.write(f"| {title} | " + " | ".join(", ".join(fmt(v) for v in each[s]) or "–" for s in servers) + " |\n")
print(f"\n(written to {md_path}; each run's JSON in {runs}/)", file=sys.stderr)
EOF
