#!/usr/bin/env bash
# `wsd reload` (or, with ACTION=upgrade, `wsd upgrade`: a new master on the same binary) with
# connections open: each retiring worker hands its plain ws:// connections to its slot's new
# worker. For each N of CONNS, on wsd's echo app with count = WORKERS:
#   reload time  the wall time of `wsd reload` with N idle connections open (and what wsd
#                prints, and reloading → done in the master's log)
#   survived     how many of the N are still open after the reload and echo once more
#                (`wsd bench idle --again-when`), with the workers' handoff log lines
#   stall        open-loop `wsd bench latency` (RATE msgs/s over LAT_CONNS more connections,
#                WINDOW s) across the reload, against the same run without a reload
#   memory       RSS and Pss summed over the master and every worker, old and new, every
#                50 ms from just before the reload until it is done: peak against before
# Each N gets a wsd of its own (temp dir, config, a port the OS picks, 127.0.0.1 only). Not
# part of CI: each N takes the time to open its connections and 2 × WINDOW s more.
#
# Usage: [ACTION=reload|upgrade] [CONNS="10000 100000"] [WORKERS=8] [RATE=1000] [LAT_CONNS=100]
#        [WINDOW=10] [PSS=1] [LAT_RT=1] [WSD_BIN=path/to/wsd] scripts/bench-handoff.sh [--json]
#   PSS=0 reads only RSS while sampling (Pss walks the page tables: /proc/PID/smaps_rollup).
#   LAT_RT=1 (the default) runs the latency client at real-time priority (`chrt -f 1`): it
#   shares the cores with the server, and what it measures is then the server's pause, not its
#   own wait for a core while two workers hand connections over at full speed (as a client on
#   another machine would not wait). LAT_RT=0 runs it as any process.
# Exits non-zero if a run could not be made, or if any connection was lost or did not echo.
set -euo pipefail

ACTION=${ACTION:-reload}
LAT_RT=${LAT_RT:-1}
lat_prio=()
if ((LAT_RT)); then
    if chrt -f 1 true 2>/dev/null; then
        lat_prio=(chrt -f 1)
    else
        echo "bench-handoff: cannot run at real-time priority here (needs CAP_SYS_NICE); LAT_RT=0" >&2
    fi
fi
[[ $ACTION == reload || $ACTION == upgrade ]] || { echo "bench-handoff: ACTION is reload or upgrade, got '$ACTION'" >&2; exit 2; }
CONNS=${CONNS:-10000 100000}
WORKERS=${WORKERS:-8}
RATE=${RATE:-1000}
LAT_CONNS=${LAT_CONNS:-100}
WINDOW=${WINDOW:-10}
PSS=${PSS:-1}
json=0
for arg in "$@"; do
    case $arg in
        --json) json=1 ;;
        -h | --help) sed -n '2,18s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "bench-handoff: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done
read -r -a conns_list <<<"$CONNS"
((${#conns_list[@]})) || { echo "bench-handoff: CONNS is empty" >&2; exit 2; }
for v in WORKERS RATE LAT_CONNS WINDOW; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-handoff: $v must be a positive integer, got '${!v}'" >&2; exit 2; }
done
for n in "${conns_list[@]}"; do
    [[ $n =~ ^[1-9][0-9]*$ ]] || { echo "bench-handoff: CONNS must be positive integers, got '$n'" >&2; exit 2; }
done
((WINDOW >= 3)) || { echo "bench-handoff: WINDOW must be 3 s or more (the reload starts 1 s in)" >&2; exit 2; }
[[ $PSS == 0 || $PSS == 1 ]] || { echo "bench-handoff: PSS is 0 or 1" >&2; exit 2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NAME=bench-handoff
# shellcheck source=scripts/bench-lib.sh
source "$root/scripts/bench-lib.sh"

# wait_until SECONDS DESCRIPTION COMMAND...: COMMAND every 0.1 s until it succeeds.
wait_until() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        kill -0 "$master" 2>/dev/null || die "wsd exited while waiting for $what: $(tail -n 3 "$dir/wsd.log" | tr '\n' ' ')"
        ((SECONDS < deadline)) || die "timed out waiting for $what"
        sleep 0.1
    done
}
# finish PID SECONDS: waits for a process this script started, killing it after SECONDS;
# sets rc to its exit status.
finish() {
    local pid=$1 deadline=$((SECONDS + $2))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
    kill -TERM "$pid" 2>/dev/null && say "pid $pid did not finish in $2 s: stopped"
    rc=0
    wait "$pid" || rc=$?
}
# status_json FILE: `wsd status --json` into FILE.
status_json() { "$WSD_BIN" -c "$config" status --json >"$1" 2>/dev/null; }
# sum_connections FILE: what the status in FILE says the workers hold.
sum_connections() {
    python3 -c 'import json, sys; print(sum(w["connections"] for w in json.load(open(sys.argv[1]))["workers"]))' "$1"
}

# The memory sampler: every 50 ms, the master and all its descendants (found through
# /proc/*/stat, so that workers appearing and exiting during the reload are counted) summed:
# "EPOCH PROCESSES RSS_KIB PSS_KIB" a line, until STOP exists or LIMIT seconds have passed.
cat >"$tmp/sampler.py" <<'EOF'
import os, sys, time
master, stop, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
limit, want_pss = float(sys.argv[4]), sys.argv[5] == "1"
page_kib = os.sysconf("SC_PAGE_SIZE") // 1024

def tree():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    found, todo = [], [master]
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(kids.get(p, []))
    return found

def memory(pid):
    with open(f"/proc/{pid}/statm") as f:
        rss = int(f.read().split()[1]) * page_kib
    pss = 0
    if want_pss:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                    break
    return rss, pss

end = time.time() + limit
with open(out, "w") as o:
    while time.time() < end:
        t = time.time()
        n = rss = pss = 0
        for pid in tree():
            try:
                r, p = memory(pid)
            except (OSError, ValueError, IndexError):
                continue
            if r:  # a zombie has none
                n, rss, pss = n + 1, rss + r, pss + p
        o.write(f"{t:.3f} {n} {rss} {pss}\n")
        o.flush()
        if os.path.exists(stop):
            break
        time.sleep(max(0.0, 0.05 - (time.time() - t)))
EOF

# run_one N: one wsd, N idle connections, a latency run without and one across a reload, then
# every connection echoes again. Everything lands in $tmp/nN for the report.
run_one() {
    local n=$1 per_worker idle lat sampler t0 t1 reload_rc old
    dir=$tmp/n$n
    # Each worker takes its share and some slack (the kernel spreads over SO_REUSEPORT sockets
    # by hash, not evenly); it must stay under the files a process may hold.
    per_worker=$(((n + LAT_CONNS) * 5 / (4 * WORKERS) + 100))
    ((per_worker < hard - 100)) || per_worker=$((hard - 100))
    write_config "$dir" echo "$WORKERS" "$per_worker"
    # Info, for the workers' "N connections handed over" and "took N connections" lines.
    sed -i 's/^log_level = "warn"$/log_level = "info"/' "$dir/workers.toml"
    start_wsd "$dir" || die "wsd did not start"
    say "N=$n: $n idle connections over $WORKERS workers (at most $per_worker each) on port $port"

    # 1. The idle connections: each echoes once, then all wait for $dir/again.
    "$WSD_BIN" bench idle --url "ws://127.0.0.1:$port/" --conns "$n" --hold 1 \
        --again-when "$dir/again" --json >"$dir/idle.json" 2>"$dir/idle.err" &
    idle=$!
    pids+=("$idle")
    # "[2s] holding": measuring began over 2 s ago, every connection echoed (or failed).
    idle_up() {
        kill -0 "$idle" 2>/dev/null || die "wsd bench idle ended early: $(tail -n 3 "$dir/idle.err" | tr '\n' ' ')"
        grep -q '^\[2s\] holding' "$dir/idle.err"
    }
    wait_until $((60 + n / 500)) "$n idle connections" idle_up
    grep -q '^\[2s\] holding '"$n"' open' "$dir/idle.err" ||
        say "N=$n: not every idle connection is up: $(grep '^\[2s\]' "$dir/idle.err")"

    # 2. Latency in the steady state.
    say "N=$n: steady state: $RATE msgs/s over $LAT_CONNS connections for $WINDOW s"
    rc=0
    timeout $((WINDOW + 120)) "${lat_prio[@]}" "$WSD_BIN" bench latency --url "ws://127.0.0.1:$port/" \
        --conns "$LAT_CONNS" --rate "$RATE" --secs "$WINDOW" --json \
        >"$dir/lat-steady.json" 2>"$dir/lat-steady.err" || rc=$?
    ((rc <= 1)) || die "the steady latency run failed ($rc): $(tail -n 3 "$dir/lat-steady.err" | tr '\n' ' ')"

    # 3. The same across a reload, with the memory sampled from before it to its end.
    status_json "$dir/status-before.json" || die "wsd status failed"
    mapfile -t old < <(python3 -c '
import json, sys
for w in json.load(open(sys.argv[1]))["workers"]:
    print(w["pid"])' "$dir/status-before.json")
    "${lat_prio[@]}" "$WSD_BIN" bench latency --url "ws://127.0.0.1:$port/" --conns "$LAT_CONNS" \
        --rate "$RATE" --secs "$WINDOW" --json >"$dir/lat-reload.json" 2>"$dir/lat-reload.err" &
    lat=$!
    pids+=("$lat")
    python3 "$tmp/sampler.py" "$master" "$dir/sampler.stop" "$dir/memory.txt" 900 "$PSS" &
    sampler=$!
    pids+=("$sampler")
    lat_going() {
        kill -0 "$lat" 2>/dev/null || die "wsd bench latency ended early: $(tail -n 3 "$dir/lat-reload.err" | tr '\n' ' ')"
        grep -q '^\[1s\]' "$dir/lat-reload.err"
    }
    wait_until 60 "the latency run to start" lat_going
    # Its window began 1.1 s before that line.
    lat_from=$(python3 -c "print(round(${EPOCHREALTIME/,/.} - 1.1, 3))")
    say "N=$n: $ACTION of $WORKERS workers with $((n + LAT_CONNS)) connections open"
    reload_rc=0
    t0=$EPOCHREALTIME
    timeout 600 "$WSD_BIN" -c "$config" "$ACTION" >"$dir/reload.out" 2>&1 || reload_rc=$?
    t1=$EPOCHREALTIME
    say "N=$n: $(head -n 1 "$dir/reload.out")"
    # Done means every old worker has exited; make sure of it (bounded), then a few more samples.
    gone() { local p; for p in "${old[@]}"; do ! kill -0 "$p" 2>/dev/null || return 1; done; }
    wait_until 60 "the old workers to exit" gone
    sleep 0.3
    touch "$dir/sampler.stop"
    finish "$sampler" 10
    finish "$lat" $((WINDOW + 60))
    ((rc <= 1)) || die "the latency run across the reload failed ($rc): $(tail -n 3 "$dir/lat-reload.err" | tr '\n' ' ')"

    # 4. What the new workers hold once the latency connections are gone (their counters come
    # about once a second: up to 5 s for them to say N), then one more echo on every idle
    # connection.
    held() { status_json "$dir/status-after.json" && (($(sum_connections "$dir/status-after.json") == n)); }
    local deadline=$((SECONDS + 5))
    until held || ((SECONDS >= deadline)); do sleep 0.2; done
    touch "$dir/again"
    finish "$idle" 60
    ((rc <= 1)) || die "wsd bench idle failed ($rc): $(tail -n 3 "$dir/idle.err" | tr '\n' ' ')"
    if [[ $ACTION == upgrade ]]; then
        # The new master serves now: it is the one to stop, and it is not our child.
        local new
        new=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["master"]["pid"])' \
            "$dir/status-after.json")
        pids+=("$new")
        kill -TERM "$new" 2>/dev/null || true
        wait "$master" 2>/dev/null || true
        local until=$((SECONDS + 30))
        while kill -0 "$new" 2>/dev/null; do
            ((SECONDS < until)) || die "the new master (pid $new) did not stop"
            sleep 0.1
        done
    else
        stop_wsd
    fi
    printf '{"n": %d, "reload_rc": %d, "reload_from": %s, "reload_to": %s, "window_from": %s}\n' \
        "$n" "$reload_rc" "${t0/,/.}" "${t1/,/.}" "$lat_from" >"$dir/times.json"
}

started=$SECONDS
for n in "${conns_list[@]}"; do
    run_one "$n"
done
say "done in $((SECONDS - started)) s"

# The report: a column per N (or one JSON object); the exit status says whether every
# connection came through.
LAT_PRIO=${lat_prio[*]:-} python3 - "$tmp" "$json" "$WORKERS" "$RATE" "$LAT_CONNS" "$WINDOW" "$ACTION" "${conns_list[@]}" <<'EOF'
import json, os, re, sys
from datetime import datetime

tmp, as_json, workers, rate, lat_conns, window, action = sys.argv[1:8]
ns = [int(n) for n in sys.argv[8:]]

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""

LOG = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) (\w+)\s+(\S+) (.*)$")

def log_lines(text):
    for line in text.splitlines():
        m = LOG.match(line)
        if m:
            at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            yield at, m[2], m[3], m[4]

def latency(v):
    if not v:
        return None
    return {k: v["latency_us"][k] for k in ("p50", "p99", "p999", "max")} | {
        "sent": v["sent"], "replies": v["replies"], "unanswered": v["unanswered"],
        "late": v["late"], "closed": v["errors"]["closed"], "errors": v["errors"]["total"],
        "error_samples": v["errors"]["samples"],
    }

def memory(path, start, end):
    rows = []
    for line in read(path).splitlines():
        t, n, rss, pss = line.split()
        rows.append((float(t), int(n), int(rss), int(pss)))
    before = [r for r in rows if r[0] < start]
    during = [r for r in rows if r[0] >= start]
    if not before or not during:
        return None
    b, last = before[-1], rows[-1]
    peak_rss = max(during, key=lambda r: r[2])
    peak_pss = max(during, key=lambda r: r[3])
    return {
        "samples": len(rows),
        "rss_kib": {"before": b[2], "peak": peak_rss[2], "after": last[2]},
        "pss_kib": {"before": b[3], "peak": peak_pss[3], "after": last[3]},
        "peak_rss_at_secs": round(peak_rss[0] - start, 3),
        "processes": {"before": b[1], "peak": max(r[1] for r in during), "after": last[1]},
    }

runs, ok = [], True
for n in ns:
    d = f"{tmp}/n{n}"
    t = load(f"{d}/times.json") or {}
    idle = load(f"{d}/idle.json") or {}
    again = idle.get("again", {})
    log = list(log_lines(read(f"{d}/wsd.log")))
    said = read(f"{d}/reload.out").strip()
    says = re.search(r"(?:reloaded|upgraded) in ([\d.]+)s", said)
    begin, end = {"reload": ("reloading", "reload done"), "upgrade": ("upgrading", "upgraded in")}[action]
    reloading = [at for at, _, who, msg in log if who.startswith("master") and msg.startswith(begin)]
    done = [at for at, _, who, msg in log if who.startswith("master") and msg.startswith(end)]
    handed = [int(x[1]) for x in (re.match(r"(\d+) connections handed over", msg) for _, _, _, msg in log) if x]
    took = [int(x[1]) for x in (re.match(r"took (\d+) connections from", msg) for _, _, _, msg in log) if x]
    # Per slot: the master retires the old worker → the new one has taken everything.
    retiring = {r[1]: at for at, _, who, msg in log
                if (r := re.match(r"(?:retiring worker|worker) (\S+) pid \d+,? hands? ", msg)
                    or re.match(r"retiring worker (\S+) pid", msg))}
    slot_secs = [at - retiring[k[1]] for at, _, _, msg in log
                 if (k := re.match(r"took \d+ connections from (\S+) \(pid", msg)) and k[1] in retiring]
    trouble = [f"{lvl} {who} {msg}" for _, lvl, who, msg in log if lvl in ("WARN", "ERROR")]
    after = load(f"{d}/status-after.json")
    steady, across = latency(load(f"{d}/lat-steady.json")), latency(load(f"{d}/lat-reload.json"))
    mem = memory(f"{d}/memory.txt", t.get("reload_from", 0), t.get("reload_to", 0))
    run = {
        "conns": n,
        "reload": {
            "exit_status": t.get("reload_rc"),
            "wall_secs": round(t["reload_to"] - t["reload_from"], 3) if t else None,
            "wsd_says": said,
            "wsd_secs": float(says[1]) if says else None,
            "log_secs": round(done[-1] - reloading[-1], 3) if done and reloading else None,
            "slowest_slot_secs": round(max(slot_secs), 3) if slot_secs else None,
            "handed_over": sum(handed), "taken": sum(took), "workers_handing": len(handed),
            "in_window": bool(t) and t["reload_to"] <= t["window_from"] + int(window),
        },
        "survived": {
            "connections": n,
            "up_before": idle.get("ready"),
            "open_after": idle.get("open_at_end"),
            "asked_again": again.get("asked"),
            "echoed_again": again.get("echoed"),
            "missing": again.get("missing"),
            "closed": again.get("closed"),
            "new_workers_hold": sum(w["connections"] for w in after["workers"]) if after else None,
            "errors": idle.get("errors", {}).get("samples", []),
        },
        "latency_us": {"steady": steady, "across_reload": across},
        "memory": mem,
        "log_warnings": trouble,
    }
    s = run["survived"]
    lost = (t.get("reload_rc") != 0 or s["up_before"] != n or s["open_after"] != n
            or s["echoed_again"] != n or run["reload"]["handed_over"] != run["reload"]["taken"]
            or not across or across["closed"] or across["unanswered"])
    ok &= not lost
    run["all_came_through"] = not lost
    runs.append(run)

if as_json == "1":
    print(json.dumps({"app": "echo", "workers": int(workers), "latency_rate": int(rate),
                      "latency_conns": int(lat_conns), "latency_secs": int(window),
                      "runs": runs, "all_came_through": ok}))
    sys.exit(0 if ok else 1)

def ms(us):
    return "n/a" if us is None else f"{us / 1000:.2f} ms"

def mib(kib):
    return f"{kib / 1024:.1f} MiB"

def lat_row(key, which):
    return lambda r: ms((r["latency_us"][which] or {}).get(key))

def mem_row(key):
    def f(r):
        m = r["memory"]
        if not m:
            return "n/a"
        v = m[key]
        return (f"{mib(v['before'])} → {mib(v['peak'])} ({(v['peak'] - v['before']) / 1024:+.1f} MiB), "
                f"after {mib(v['after'])}")
    return f

def opt(v, fmt="{}"):
    return "n/a" if v is None else fmt.format(v)

rows = [
    (f"{action}: wall time", lambda r: opt(r["reload"]["wall_secs"], "{:.3f} s")),
    (f"{action}: wsd says", lambda r: r["reload"]["wsd_says"].replace("|", "/") or "nothing"),
    (f"{action}: master log", lambda r: opt(r["reload"]["log_secs"], "{:.3f} s begun → done")),
    ("slowest slot", lambda r: opt(r["reload"]["slowest_slot_secs"], "{:.3f} s retiring → taken")),
    ("handed over / taken", lambda r: f"{r['reload']['handed_over']} / {r['reload']['taken']} "
                                      f"({r['reload']['workers_handing']} workers)"),
    ("idle: up before", lambda r: f"{opt(r['survived']['up_before'])} of {r['conns']}"),
    ("idle: open after", lambda r: opt(r["survived"]["open_after"])),
    ("idle: echoed again", lambda r: f"{opt(r['survived']['echoed_again'])} of {opt(r['survived']['asked_again'])}"),
    ("idle: closed", lambda r: opt(r["survived"]["closed"])),
    ("new workers hold", lambda r: opt(r["survived"]["new_workers_hold"], "{} (status)")),
]
for label, which in (("steady", "steady"), ("reload", "across_reload")):
    for key, name in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")):
        rows.append((f"latency {label} {name}", lat_row(key, which)))
    rows.append((f"latency {label} lost", lambda r, w=which: "n/a" if not r["latency_us"][w] else
                 f"{r['latency_us'][w]['unanswered']} unanswered, {r['latency_us'][w]['closed']} closed, "
                 f"{r['latency_us'][w]['late']} late sends"))
rows += [
    ("memory: RSS", mem_row("rss_kib")),
    ("memory: Pss", mem_row("pss_kib")),
    ("processes", lambda r: "n/a" if not r["memory"] else
     "{before} → {peak} → {after}".format(**r["memory"]["processes"])),
    ("all came through", lambda r: "yes" if r["all_came_through"] else "NO"),
]
print()
client = "at real-time priority" if os.environ.get("LAT_PRIO") else "at normal priority"
print(f"wsd {action} with connections open: echo app, {workers} workers; latency {rate} msgs/s "
      f"over {lat_conns} more connections for {window} s (the client {client}), without and "
      f"across the {action}")
print()
print("| | " + " | ".join(f"{r['conns']:,} conns" for r in runs) + " |")
print("|---|" + "---:|" * len(runs))
for label, f in rows:
    print(f"| {label} | " + " | ".join(f(r) for r in runs) + " |")
for r in runs:
    notes = []
    if not r["reload"]["in_window"]:
        notes.append(f"the reload ended after the latency window: raise WINDOW (now {window} s)")
    if r["memory"]:
        notes.append(f"memory sampled {r['memory']['samples']} times; RSS peak "
                     f"{r['memory']['peak_rss_at_secs']} s after the reload began")
        if action == "upgrade":
            notes.append("memory after: the new master left the old one's process tree when it "
                         "exited, so the samples stop counting it")
        if (r["reload"]["wall_secs"] or 0) < 0.1:
            notes.append("the reload took less than two 50 ms samples: the overlap of old and "
                         "new workers may have been missed")
    for w in ("steady", "across_reload"):
        notes += [f"latency {w}: {e}" for e in (r["latency_us"][w] or {}).get("error_samples", [])]
    notes += [f"idle: {e}" for e in r["survived"]["errors"]]
    notes += [f"wsd log: {line}" for line in r["log_warnings"][:10]]
    if len(r["log_warnings"]) > 10:
        notes.append(f"wsd log: ... {len(r['log_warnings']) - 10} more warnings")
    if notes:
        print(f"\n{r['conns']:,} conns:")
        for note in notes:
            print(f"  {note}")
sys.exit(0 if ok else 1)
EOF
