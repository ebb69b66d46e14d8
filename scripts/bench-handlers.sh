#!/usr/bin/env bash
# Handlers in other languages: wsd's `app = "exec"` against websocketd, side by side, with the
# same Python logic and the same client (`wsd bench`), on 127.0.0.1.
#
#   wsd exec       WORKERS workers (default 2), each running ONE long-lived Python handler,
#                  examples/handlers/echo.py, that echoes every message (JSON lines over pipes)
#   websocketd     websocketd 0.4.1 (Debian's, installed with apt-get if missing), which starts
#                  one Python process PER CONNECTION and passes each line as a message; its
#                  handler is the per-connection line echo this script writes into its temp dir
#   wsd built-in   WORKERS workers of wsd's own `app = "echo"`, for the cost of the hop
# Both Pythons are the same interpreter (python3 resolved once, past any pyenv shim).
#
# Runs, each on servers started fresh for the run, in ROUNDS rounds (every run once a round):
#   1. handshakes: `wsd bench connect --conns 1 --slots SLOTS --secs SECS` (connect, upgrade,
#      close, SLOTS at a time): handshakes a second, and the server's CPU per handshake (until
#      every process the handshakes started has ended);
#   2. echo, 32 B, CONNS connections, each of DEPTHS (1 and 16) messages in flight: messages
#      a second and the server's CPU per message in the steady state, over the client's
#      per-second lines WARM+1 to SECS-2 (websocketd's first seconds start its Python
#      processes);
#   3. the hop: wsd built-in at the same depths; `wsd bench --pid` reads the CPU of every
#      server process (wsd exec's handlers included) over the whole window, and the steady
#      state splits it into wsd's and Python's;
#   4. idle memory at each of IDLE (1,000 and 10,000) connections, one echo each, then held
#      until the server is quiet: (after - before) / connections, summed over ALL its
#      processes (wsd: master, workers and handlers; websocketd: itself and every child), Rss
#      and Pss from /proc/PID/smaps_rollup. In the first IDLE_ROUNDS rounds only (websocketd's
#      figures repeat within 0.3 % between rounds, wsd's within 0.5 KiB per connection).
#      websocketd holds one Python process per connection: it is asked for at most what
#      leaves MEM_RESERVE_MIB of memory available and what its descriptor limit holds (both
#      as the round's first websocketd idle run measured them), and the table says how many
#      it held and which limit set that.
# The server's CPU comes from /proc/PID/stat of every process of its tree (utime + stime,
# and cutime + cstime of children that ended and were waited for), sampled by this script.
# Targets (reported, not enforced): wsd ≥ 10× websocketd's handshakes a second, ≥ 3× its echo
# throughput, ≤ 1/50 of its memory per connection; the hop ≤ 4× the built-in echo's CPU per
# message at 16 in flight.
#
# Everything shares this box's cores, unpinned; before each run the script waits (up to 30 s)
# for the machine to be under 15 % busy, and records how busy it was. Every process is started
# by this script and stopped by pid on exit, failure included (websocketd's children too).
# A round of echo and handshake runs takes ~1.5 minutes; the idle runs ~2 minutes more
# (websocketd starts ~55 Python processes a second here, and its capped run takes ~70 s).
# ~7 minutes with the defaults, ~12 with IDLE_ROUNDS=3. Not for CI.
#
# Usage: [ROUNDS=3] [SECS=9] [WARM=3] [CONNS=100] [DEPTHS="1 16"] [SLOTS=100] [WORKERS=2]
#        [IDLE="1000 10000"] [IDLE_ROUNDS=1] [MEM_RESERVE_MIB=4096] [ONLY=connect,echo,hop,idle]
#        [WSD_BIN=path/to/wsd] scripts/bench-handlers.sh
# Prints markdown; each run's figures go to target/bench-handlers/runs.jsonl (its client's
# JSON and progress lines beside it) and the tables to target/bench-handlers/bench-handlers.md.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-9}
WARM=${WARM:-3}
CONNS=${CONNS:-100}
DEPTHS=${DEPTHS:-1 16}
SLOTS=${SLOTS:-100}
WORKERS=${WORKERS:-2}
IDLE=${IDLE:-1000 10000}
MEM_RESERVE_MIB=${MEM_RESERVE_MIB:-4096}
IDLE_ROUNDS=${IDLE_ROUNDS:-1}
ONLY=${ONLY:-connect,echo,hop,idle}
for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"; exit 0 ;;
        *) echo "bench-handlers: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
for v in ROUNDS SECS CONNS SLOTS WORKERS MEM_RESERVE_MIB IDLE_ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-handlers: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
if ! [[ $WARM =~ ^[0-9]+$ ]] || ((SECS < WARM + 3)); then
    echo "bench-handlers: need SECS >= WARM + 3 (got SECS=$SECS WARM=$WARM)" >&2
    exit 2
fi
read -r -a depths <<<"$DEPTHS"
read -r -a idle_ns <<<"$IDLE"
for n in "${depths[@]}" "${idle_ns[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-handlers: DEPTHS and IDLE must be positive integers" >&2; exit 2; }
done
command -v python3 >/dev/null || { echo "bench-handlers: needs python3" >&2; exit 1; }

# The fd limit raised to the hard one, wsd built unless WSD_BIN is given, pids/tmp/cleanup,
# free_port, write_config and start_wsd: all from bench-lib.sh.
NAME=bench-handlers
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"
# The client runs from a copy of the binary: a server's Pss would otherwise fall when the
# client starts, as the client shares the same file's pages.
client_bin=$tmp/wsd-client
cp "$WSD_BIN" "$client_bin"
out=${CARGO_TARGET_DIR:-$root/target}/bench-handlers
mkdir -p "$out"
rm -f "$out"/*.json "$out"/*.err "$out/runs.jsonl"
runs=$out/runs.jsonl

# starttime PID: sets st to PID's start time (field 22 of /proc/PID/stat), with builtins only
# (it runs for each of thousands of processes); fails if PID is gone.
starttime() {
    local line f
    read -r line 2>/dev/null <"/proc/$1/stat" || return 1
    read -r -a f <<<"${line##*) }"
    st=${f[19]}
}
# The descendants of every started process ("PID STARTTIME" lines), for the exit trap:
# websocketd's children outlive it (they end at EOF on stdin, but are stopped by pid here).
descendants() {
    ps -e -o pid=,ppid= | awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) want[r[i]] = 1 }
        { kids[$2] = kids[$2] " " $1 }
        END {
            for (p in want) stack[++top] = p
            while (top > 0) {
                p = stack[top--]
                m = split(kids[p], k, " ")
                for (i = 1; i <= m; i++) { print k[i]; stack[++top] = k[i] }
            }
        }' | while read -r p; do
        if starttime "$p"; then echo "$p $st"; fi
    done
}
# kill_listed FILE: TERM, then KILL after 5 s, every "PID STARTTIME" of FILE still that process.
kill_listed() {
    local p s st left deadline=$((SECONDS + 5))
    [[ -s $1 ]] || return 0
    while read -r p s; do
        if starttime "$p" && [[ $st == "$s" ]]; then kill -TERM "$p" 2>/dev/null || true; fi
    done <"$1"
    while :; do
        left=0
        while read -r p s; do
            if ! starttime "$p" || [[ $st != "$s" ]]; then continue; fi
            left=1
            ((SECONDS < deadline)) || kill -KILL "$p" 2>/dev/null || true
        done <"$1"
        if ((!left || SECONDS >= deadline + 2)); then break; fi
        sleep 0.2
    done
}
on_exit() {
    local list
    list=$(mktemp)
    ((${#pids[@]} == 0)) || descendants "${pids[@]}" >"$list" 2>/dev/null || true
    cleanup
    kill_listed "$list"
    rm -f "$list"
}
trap on_exit EXIT

# forget PID: PID has been waited for; the exit trap must not signal it (it may be reused).
forget() {
    local p kept=()
    for p in "${pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
    pids=("${kept[@]}")
}

# --- The peers -----------------------------------------------------------------------------
if ! command -v websocketd >/dev/null && command -v apt-get >/dev/null && ((EUID == 0)); then
    say "installing websocketd with apt-get"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq websocketd; } \
        >"$out/apt.log" 2>&1 || say "apt-get could not install websocketd (see $out/apt.log)"
fi
command -v websocketd >/dev/null || die "no websocketd (not installed, and apt-get could not install it)"
# One interpreter for both, past any pyenv-style shim (websocketd would run the shim per
# connection otherwise).
py=$(python3 -c 'import sys; print(sys.executable)')
[[ -x $py ]] || die "cannot resolve python3's interpreter"
cat >"$tmp/line_echo.py" <<'EOF'
import sys
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
EOF

# tree.py cpu|mem ROOT: the CPU or memory of ROOT and every descendant, as one JSON line.
cat >"$tmp/tree.py" <<'EOF'
import json, os, sys, time

def table():
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        r = s.rindex(")")
        comm = s[s.index("(") + 1:r]
        f = s[r + 2:].split()
        # ppid, comm, utime + stime, cutime + cstime
        procs[int(d)] = (int(f[1]), comm, int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    return procs

def tree(root, procs):
    kids = {}
    for p, (pp, *_) in procs.items():
        kids.setdefault(pp, []).append(p)
    seen, stack = [], [root] if root in procs else []
    while stack:
        p = stack.pop()
        seen.append(p)
        stack.extend(kids.get(p, []))
    return seen

def avail_kib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1])

what, root = sys.argv[1], int(sys.argv[2])
t = time.monotonic()
procs = table()
members = tree(root, procs)
res = {"t": t, "procs": len(members)}
if what == "cpu":
    by = {}
    for p in members:
        _, comm, own, waited = procs[p]
        by[comm] = by.get(comm, 0) + own + waited
    res.update(ticks=sum(by.values()), by=by, hz=os.sysconf("SC_CLK_TCK"))
else:
    rss = pss = 0
    for p in members:
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                if line.startswith("Rss:"):
                    rss += int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss += int(line.split()[1])
        except OSError:
            pass
    try:
        fds = len(os.listdir(f"/proc/{root}/fd"))
    except OSError:
        fds = None
    res.update(rss_kib=rss, pss_kib=pss, avail_kib=avail_kib(), root_fds=fds)
print(json.dumps(res))
EOF
sample() { python3 "$tmp/tree.py" "$@"; }

# --- Servers -------------------------------------------------------------------------------
# start_server KIND: a fresh server (wsd-exec, wsd-echo or websocketd) on a free port; sets
# srv_pid (the tree's root) and port, and waits until every process it should have is up.
start_server() {
    local kind=$1 dir=$tmp/$1 deadline=$((SECONDS + 30)) want
    rm -rf "$dir"
    mkdir -p "$dir"
    case $kind in
        wsd-exec | wsd-echo)
            if [[ $kind == wsd-exec ]]; then
                write_config "$dir" exec "$WORKERS" 20000
                printf 'command = ["%s", "%s"]\n' "$py" "$root/examples/handlers/echo.py" >>"$dir/workers.toml"
                want=$((1 + 2 * WORKERS))
            else
                write_config "$dir" echo "$WORKERS" 20000
                want=$((1 + WORKERS))
            fi
            local started=0
            start_wsd "$dir" || started=$?
            srv_pid=$master
            ((started == 0)) || return 1
            ;;
        websocketd)
            port=$(free_port)
            websocketd --address 127.0.0.1 --port "$port" --loglevel fatal "$py" "$tmp/line_echo.py" \
                >"$dir/websocketd.log" 2>&1 &
            srv_pid=$!
            pids+=("$srv_pid")
            want=1
            until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
                if ! kill -0 "$srv_pid" 2>/dev/null || ((SECONDS >= deadline)); then
                    say "websocketd did not start: $(tail -n 3 "$dir/websocketd.log" | tr '\n' ' ')"
                    return 1
                fi
                sleep 0.1
            done
            ;;
    esac
    # wsd exec: every worker's handler running, not just the workers.
    until (($(sample cpu "$srv_pid" | python3 -c 'import json, sys; print(json.load(sys.stdin)["procs"])') >= want)); do
        ((SECONDS < deadline)) || { say "$kind: not every process came up"; return 1; }
        sleep 0.1
    done
    sleep 0.5
}
# stop_server: the server's root by pid, then any descendant left (websocketd's children).
stop_server() {
    local list=$tmp/stop.list deadline=$((SECONDS + 15))
    descendants "$srv_pid" >"$list" 2>/dev/null || true
    kill -TERM "$srv_pid" 2>/dev/null || true
    while kill -0 "$srv_pid" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill -KILL "$srv_pid" 2>/dev/null || true; break; }
        sleep 0.05
    done
    wait "$srv_pid" 2>/dev/null || true
    forget "$srv_pid"
    kill_listed "$list"
}

# machine_busy: how busy the machine's cores were over half a second, in %, once under 15 %
# or after 30 s of waiting for it (the previous run's processes ending, or someone else's
# work). Sets busy.
machine_busy() {
    local a b deadline=$((SECONDS + 30))
    while :; do
        a=$(head -n 1 /proc/stat)
        sleep 0.5
        b=$(head -n 1 /proc/stat)
        busy=$(awk -v a="$a" -v b="$b" 'BEGIN {
            split(a, x, " "); split(b, y, " ")
            for (i = 2; i <= 9; i++) { t += y[i] - x[i]; if (i == 5 || i == 6) idle += y[i] - x[i] }
            printf "%.0f", t ? 100 * (t - idle) / t : 0 }')
        ((busy < 15 || SECONDS >= deadline)) && break
    done
}
# record JSON: one run's figures, with the round and how busy the machine was before it.
record() {
    python3 -c 'import json, sys
r = json.loads(sys.argv[1]); r.update(round=int(sys.argv[2]), busy_before=float(sys.argv[3]))
print(json.dumps(r))' "$1" "$round" "$busy" >>"$runs"
}
# client ARGS...: `wsd bench ARGS --json` in the background; sets client, cjson and cerr.
client() {
    local name=$1
    shift
    cjson=$out/$name.$round.json cerr=$out/$name.$round.err
    "$client_bin" bench "$@" --json >"$cjson" 2>"$cerr" &
    client=$!
    pids+=("$client")
}
# until_line PATTERN TIMEOUT: waits until the client's stderr has a line matching PATTERN.
until_line() {
    local deadline=$((SECONDS + $2))
    until grep -q -- "$1" "$cerr" 2>/dev/null; do
        kill -0 "$client" 2>/dev/null && ((SECONDS < deadline)) || return 1
        sleep 0.05
    done
}
finish_client() {
    wait "$client" || say "$1: the client reported errors or failed: $(tail -n 2 "$cerr" | tr '\n' ' ')"
    forget "$client"
}

# --- The runs ------------------------------------------------------------------------------
# connect_run KIND
connect_run() {
    local kind=$1 name=connect-$1 a b deadline
    machine_busy
    say "$name, round $round/$ROUNDS: connect/upgrade/close, $SLOTS at a time, $SECS s (machine $busy % busy before)"
    start_server "$kind" || { stop_server; return; }
    a=$(sample cpu "$srv_pid")
    client "$name" connect --url "ws://127.0.0.1:$port/" --conns 1 --slots "$SLOTS" --secs "$SECS"
    finish_client "$name"
    # Until every process the handshakes started has ended (websocketd's), at most 10 s.
    deadline=$((SECONDS + 10))
    while b=$(sample cpu "$srv_pid"); (($(jq_ "$b" procs) > $(jq_ "$a" procs))) && ((SECONDS < deadline)); do
        sleep 0.2
    done
    stop_server
    record "$(python3 -c 'import json, sys
a, b = json.loads(sys.argv[2]), json.loads(sys.argv[3])
r = {"run": "connect", "server": sys.argv[4]}
try:
    j = json.load(open(sys.argv[1]))
except (OSError, ValueError):
    j = None
if j:
    hs = j["sustained"]["handshakes"] + j["burst"]["upgrades"]
    r.update(handshakes_per_sec=j["sustained"]["handshakes_per_sec"], errors=j["errors"]["total"],
             cpu_us_per_handshake=(b["ticks"] - a["ticks"]) / a["hz"] * 1e6 / hs if hs else None,
             client_cpu_secs=j["client"]["cpu_secs"])
print(json.dumps(r))' "$cjson" "$a" "$b" "$kind")"
}
jq_() { python3 -c 'import json, sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

# echo_run KIND DEPTH [--pid]: the steady state from the client's per-second lines; with
# --pid, `wsd bench` also reads every server process's CPU over its whole window.
echo_run() {
    local kind=$1 depth=$2 name=echo-d$2-$1 a b pidarg=()
    machine_busy
    say "$name, round $round/$ROUNDS: echo 32 B, $CONNS conns, $depth in flight, $SECS s (machine $busy % busy before)"
    start_server "$kind" || { stop_server; return; }
    if [[ ${3:-} == --pid ]]; then
        pidarg=(--pid "$(descendants "$srv_pid" | awk -v r="$srv_pid" 'BEGIN { s = r } { s = s "," $1 } END { print s }')")
    fi
    client "$name" echo --url "ws://127.0.0.1:$port/" --conns "$CONNS" --size 32 --depth "$depth" \
        --secs "$SECS" "${pidarg[@]}"
    if until_line "^\[${WARM}s\]" $((SECS + 60)); then
        a=$(sample cpu "$srv_pid")
        # The window ends a second before the client stops, so its last sample is never late.
        sleep "$((SECS - 3 - WARM)).5"
        until_line "^\[$((SECS - 2))s\]" 10 && b=$(sample cpu "$srv_pid") || b=''
    else
        a='' b=''
    fi
    finish_client "$name"
    stop_server
    record "$(python3 -c 'import json, re, sys
path, err, a, b, kind, depth, warm, secs = sys.argv[1:9]
warm, secs = int(warm), int(secs)
r = {"run": "echo", "server": kind, "depth": int(depth)}
try:
    j = json.load(open(path))
    r.update(full_msgs_per_sec=j["msgs_per_sec"], errors=j["errors"]["total"],
             client_cpu_secs=j["client"]["cpu_secs"], window_secs=j["client"]["cpu_window_secs"])
    if j.get("server"):
        r["full_cpu_us_per_msg"] = j["server"]["cpu_secs_per_million"]
except (OSError, ValueError):
    pass
lines = {int(m[1]): int(m[2]) for m in re.finditer(r"^\[(\d+)s\] (\d+) msgs/s", open(err).read(), re.M)}
msgs = sum(lines.get(s, 0) for s in range(warm + 1, secs - 1))
r["msgs_per_sec"] = msgs / (secs - 2 - warm)
if a and b and msgs:
    a, b = json.loads(a), json.loads(b)
    r["cpu_us_per_msg"] = (b["ticks"] - a["ticks"]) / a["hz"] * 1e6 / msgs
    group = lambda by: {n: sum(v for k, v in by.items() if k.startswith(n)) for n in ("wsd", "python", "websocketd")}
    ga, gb = group(a["by"]), group(b["by"])
    r["cpu_us_per_msg_by"] = {k: (gb[k] - ga[k]) / a["hz"] * 1e6 / msgs for k in gb}
    r["procs"] = b["procs"]
print(json.dumps(r))' "$cjson" "$cerr" "$a" "$b" "$kind" "$depth" "$WARM" "$SECS")"
}

# idle_run KIND N: N connections echo once each and are held; the tree's memory before and
# once they are all held and the server is quiet. websocketd gets at most ws_cap connections.
ws_cap='' ws_cap_why=''
idle_run() {
    local kind=$1 n=$2 name=idle-$2-$1 want=$2 before after held floor quiet prev cur reason=
    if [[ $kind == websocketd && -n $ws_cap ]] && ((ws_cap < n)); then
        want=$ws_cap
        reason=$ws_cap_why
    fi
    machine_busy
    say "$name, round $round/$ROUNDS: $want idle connections (machine $busy % busy before)"
    start_server "$kind" || { stop_server; return; }
    before=$(sample mem "$srv_pid")
    # Stop connecting if the machine's available memory falls below half the reserve.
    floor=$((MEM_RESERVE_MIB * 1024 / 2))
    client "$name" idle --url "ws://127.0.0.1:$port/" --conns "$want" --hold 3600
    local deadline=$((SECONDS + 300))
    until grep -q 'holding' "$cerr" 2>/dev/null; do
        if (($(awk '/^MemAvailable:/ { print $2 }' /proc/meminfo) < floor)); then
            reason="stopped connecting: less than $((floor / 1024)) MiB of memory available"
            say "$name: $reason"
            break
        fi
        if ! kill -0 "$client" 2>/dev/null || ((SECONDS >= deadline)); then
            reason="the client ended or timed out while connecting"
            break
        fi
        sleep 0.25
    done
    # Quiet: the tree spent under 10 % of a core over the last second (websocketd's last Python
    # processes have started and answered their echo) and its process count stands still.
    quiet=0 prev=$(sample cpu "$srv_pid")
    for _ in $(seq 60); do
        sleep 1
        cur=$(sample cpu "$srv_pid")
        if python3 -c 'import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
sys.exit(0 if b["procs"] == a["procs"] and (b["ticks"] - a["ticks"]) / a["hz"] / (b["t"] - a["t"]) < 0.1 else 1)' "$prev" "$cur"; then
            quiet=$((quiet + 1))
            ((quiet >= 2)) && break
        else
            quiet=0
        fi
        prev=$cur
    done
    after=$(sample mem "$srv_pid")
    held=$(grep -o 'holding [0-9]* open' "$cerr" | tail -n 1 | grep -o '[0-9]*' || true)
    if [[ -z $held ]]; then
        # Stopped before the client held them: websocketd's count is its children.
        held=0
        [[ $kind != websocketd ]] || held=$(($(jq_ "$after" procs) - $(jq_ "$before" procs)))
    fi
    kill -TERM "$client" 2>/dev/null || true
    finish_client "$name" 2>/dev/null || true
    stop_server
    record "$(python3 -c 'import json, sys
b, a = json.loads(sys.argv[1]), json.loads(sys.argv[2])
kind, n, want, held, reason = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]), sys.argv[7]
r = {"run": "idle", "server": kind, "n": n, "asked": want, "held": held, "why": reason or None,
     "procs_before": b["procs"], "procs_after": a["procs"],
     "rss_kib_before": b["rss_kib"], "rss_kib_after": a["rss_kib"],
     "pss_kib_before": b["pss_kib"], "pss_kib_after": a["pss_kib"],
     "avail_drop_kib": b["avail_kib"] - a["avail_kib"], "avail_kib_after": a["avail_kib"],
     "fds_before": b["root_fds"], "fds_after": a["root_fds"]}
if held:
    r.update(rss_kib_per_conn=(a["rss_kib"] - b["rss_kib"]) / held,
             pss_kib_per_conn=(a["pss_kib"] - b["pss_kib"]) / held,
             avail_kib_per_conn=(b["avail_kib"] - a["avail_kib"]) / held,
             fds_per_conn=(a["root_fds"] - b["root_fds"]) / held if a["root_fds"] and b["root_fds"] else None)
print(json.dumps(r))' "$before" "$after" "$kind" "$n" "$want" "$held" "$reason")"
    # The first websocketd run sets how many connections the next may ask for: what leaves
    # MEM_RESERVE_MIB available (at its measured cost per connection, plus 10 %), and what
    # its descriptor limit holds (at its measured descriptors per connection).
    if [[ $kind == websocketd && -z $ws_cap ]]; then
        read -r ws_cap ws_cap_why < <(tail -n 1 "$runs" | python3 -c 'import json, sys
r = json.loads(sys.stdin.read())
avail = int(open("/proc/meminfo").read().split("MemAvailable:")[1].split()[0])
limit = int([l for l in open("/proc/%s/limits" % sys.argv[2]).read().splitlines() if l.startswith("Max open files")][0].split()[3])
per_kib = max(r.get("avail_kib_per_conn") or 0, r.get("pss_kib_per_conn") or 0) * 1.1
mem_cap = int((avail - int(sys.argv[1]) * 1024) / per_kib) if per_kib else 10**9
fds = r.get("fds_per_conn") or 0
fd_cap = int((limit - r["fds_before"] - 64) / fds) if fds else 10**9
mem = f"memory, {per_kib / 1.1 / 1024:.1f} MiB per connection with {avail // 1024} MiB available and {sys.argv[1]} MiB kept free, allows {mem_cap}"
fd = f"descriptors, {fds:.0f} per connection with {limit} per process, allow {fd_cap}"
print(min(mem_cap, fd_cap), f"{mem}; {fd}" if mem_cap <= fd_cap else f"{fd}; {mem}")' "$MEM_RESERVE_MIB" "$$")
        say "websocketd: at most $ws_cap connections ($ws_cap_why)"
    fi
}

want() { [[ ,$ONLY, == *,$1,* ]]; }
for ((round = 1; round <= ROUNDS; round++)); do
    ws_cap='' ws_cap_why=''
    if want connect; then
        for kind in wsd-exec websocketd; do connect_run "$kind"; done
    fi
    if want echo; then
        for d in "${depths[@]}"; do
            echo_run wsd-exec "$d" --pid
            echo_run websocketd "$d"
        done
    fi
    if want hop; then
        # The built-in echo at every depth (exec's own runs are the echo runs').
        for d in "${depths[@]}"; do
            want echo || echo_run wsd-exec "$d" --pid
            echo_run wsd-echo "$d" --pid
        done
    fi
    if want idle && ((round <= IDLE_ROUNDS)); then
        for n in "${idle_ns[@]}"; do
            for kind in wsd-exec websocketd; do idle_run "$kind" "$n"; done
        done
    fi
done

# --- The table -----------------------------------------------------------------------------
{
    echo
    echo "wsd exec ($WORKERS workers, $WORKERS Python handlers) against websocketd (one Python per connection);" \
        "medians of $ROUNDS round(s), the range in parentheses; $(nproc) cores, $SECS s a run"
    echo "wsd $(cd "$root" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$root" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo '+changes'), websocketd" \
        "$(dpkg-query -W -f='${Version}' websocketd 2>/dev/null || echo '?'), $("$py" --version 2>&1), $(uname -r)"
    echo
    python3 - "$runs" "$ROUNDS" "$CONNS" "$SLOTS" "$WORKERS" <<'EOF'
import json, statistics, sys
path, rounds, conns, slots, workers = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
runs = [json.loads(l) for l in open(path)]

def vals(pred, key):
    return [r[key] for r in runs if pred(r) and r.get(key) is not None]

def med(v):
    return statistics.median(v) if v else None

def fmt(x, unit=""):
    if x is None:
        return "n/a"
    if abs(x) >= 100:
        s = f"{x:,.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return s + unit

def cell(v):
    if not v:
        return "n/a"
    m = med(v)
    if len(v) > 1 and max(v) != min(v):
        return f"{fmt(m)} ({fmt(min(v))}–{fmt(max(v))})"
    return fmt(m)

def ratio(a, b):
    a, b = med(a), med(b)
    return a / b if a is not None and b else None

def rfmt(x):
    if x is None or x <= 0:
        return "n/a"
    return f"1/{1 / x:,.0f}" if x < 0.1 else f"{x:.2f}"

rows, targets = [], []
def row(label, a, b, target=None, ok=None):
    x = ratio(a, b)
    met = "" if target is None or x is None else ("met" if ok(x) else "**not met**")
    rows.append(f"| {label} | {cell(a)} | {cell(b)} | {rfmt(x)} | {target or ''} {met} |".replace("  |", " |"))
    if target:
        targets.append((label, x, target, met))

W, D = "wsd-exec", "websocketd"
of = lambda run, srv, **kw: (lambda r: r["run"] == run and r["server"] == srv and all(r.get(k) == v for k, v in kw.items()))
print(f"| {conns} conns unless said; ↑ higher is better, ↓ lower | wsd exec | websocketd | wsd ÷ websocketd | target |")
print("|---|---:|---:|---:|---|")
row(f"handshakes/s (connect, upgrade, close; {slots} at a time) ↑",
    vals(of("connect", W), "handshakes_per_sec"), vals(of("connect", D), "handshakes_per_sec"),
    "≥ 10×", lambda x: x >= 10)
row("server CPU µs per handshake ↓",
    vals(of("connect", W), "cpu_us_per_handshake"), vals(of("connect", D), "cpu_us_per_handshake"))
depths = sorted({r["depth"] for r in runs if r["run"] == "echo"})
for d in depths:
    row(f"echo 32 B, {d} in flight: msgs/s ↑", vals(of("echo", W, depth=d), "msgs_per_sec"),
        vals(of("echo", D, depth=d), "msgs_per_sec"), "≥ 3×", lambda x: x >= 3)
    row(f"echo 32 B, {d} in flight: server CPU µs per message ↓", vals(of("echo", W, depth=d), "cpu_us_per_msg"),
        vals(of("echo", D, depth=d), "cpu_us_per_msg"))
for n in sorted({r["n"] for r in runs if r["run"] == "idle"}):
    held = vals(of("idle", D, n=n), "held")
    reached = f" (websocketd: {fmt(med(held))} held)" if held and med(held) < n else ""
    row(f"idle {n:,}{reached}: KiB Rss per connection, all server processes ↓",
        vals(of("idle", W, n=n), "rss_kib_per_conn"), vals(of("idle", D, n=n), "rss_kib_per_conn"),
        "≤ 1/50", lambda x: x <= 1 / 50)
    row(f"idle {n:,}: KiB Pss per connection ↓",
        vals(of("idle", W, n=n), "pss_kib_per_conn"), vals(of("idle", D, n=n), "pss_kib_per_conn"))
    row(f"idle {n:,}: MiB Rss of all server processes, held ↓",
        [x / 1024 for x in vals(of("idle", W, n=n), "rss_kib_after")],
        [x / 1024 for x in vals(of("idle", D, n=n), "rss_kib_after")])
    row(f"idle {n:,}: server processes",
        vals(of("idle", W, n=n), "procs_after"), vals(of("idle", D, n=n), "procs_after"))
print("\n".join(rows))
whys = [(r["round"], r["n"], r["why"]) for r in runs if r["run"] == "idle" and r.get("why")]
if whys:
    print("\nwebsocketd's connections were capped:")
    for rnd, n, w in whys:
        print(f"- round {rnd}, {n:,} asked: {w}")

rows = []
print(f"\n| the hop: echo 32 B, {conns} conns | wsd exec | wsd built-in echo | exec ÷ built-in | target |")
print("|---|---:|---:|---:|---|")
E = "wsd-echo"
for d in depths:
    row(f"{d} in flight: msgs/s ↑", vals(of("echo", W, depth=d), "full_msgs_per_sec"), vals(of("echo", E, depth=d), "full_msgs_per_sec"))
    row(f"{d} in flight: server CPU µs per message, every server process ↓", vals(of("echo", W, depth=d), "full_cpu_us_per_msg"),
        vals(of("echo", E, depth=d), "full_cpu_us_per_msg"), "≤ 4×" if d == 16 else None, lambda x: x <= 4)
    for comm in ("wsd", "python"):
        a = [r["cpu_us_per_msg_by"][comm] for r in runs if of("echo", W, depth=d)(r) and "cpu_us_per_msg_by" in r]
        b = [r["cpu_us_per_msg_by"][comm] for r in runs if of("echo", E, depth=d)(r) and "cpu_us_per_msg_by" in r]
        row(f"{d} in flight: of which {'wsd' if comm == 'wsd' else 'the Python handlers'} (steady state) ↓", a, b)
print("\n".join(rows))
odd = [r for r in runs if r["run"] == "echo" and r["server"] == D and r.get("procs", 0) < int(conns) + 1]
for r in odd:
    print(f"\n⚠ round {r['round']}, websocketd echo at {r['depth']} in flight: {r.get('procs', 0)} processes at the"
          f" window's end, not {int(conns) + 1} ({r['msgs_per_sec']:.0f} msgs/s)")
errs = [r for r in runs if r.get("errors")]
for r in errs:
    print(f"\n⚠ round {r['round']}, {r['run']} on {r['server']}: {r['errors']} errors counted by the client")

print("\nAgainst the targets:")
for label, x, target, met in targets:
    print(f"- {label}: {rfmt(x)}, target {target}: {met or 'n/a'}")
busy = [r["busy_before"] for r in runs]
print(f"\nBoth cores' busy share over the half second before each run: median {statistics.median(busy):.0f} %, max {max(busy):.0f} %")
EOF
} | tee "$out/bench-handlers.md"
