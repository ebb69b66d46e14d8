#!/usr/bin/env bash
# Autobahn TestSuite against `wsd` serving the echo app: sections 1-10, and 12-13
# (permessage-deflate) in both compression modes. Two groups of 4 workers each: `shared`
# (compression = "shared") runs the whole suite, `dedicated` (compression = "dedicated") runs
# 12 and 13; the two runs go side by side. Installs kosoku (a Python runner of the Autobahn case
# files) into target/autobahn-venv, starts wsd on a throwaway config in a temp dir, runs the
# suite and fails on any FAILED case or failed close behaviour. NON-STRICT and INFORMATIONAL
# are accepted.
#   AUTOBAHN_OUT  report dir (default target/autobahn/report): index.json is the shared group's
#                 run (the CI artifact), dedicated/index.json the dedicated group's
#   WSD_BIN       use this wsd binary instead of building one
#   AUTOBAHN_TIMEOUT  seconds the suite may take (default 900; a run takes about 3 minutes).
#                 kosoku has no deadline for an echo that never comes, so a stuck case would
#                 hang forever.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS

# 1. kosoku in a venv, installed once.
VENV="$ROOT/target/autobahn-venv"
PY="$VENV/bin/python"
make_venv() { rm -rf "$VENV"; python3 -m venv "$VENV"; }
if ! "$PY" -c '' 2>/dev/null && ! make_venv; then
    # Debian's python3 splits venv out; a bare machine gets it here.
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    make_venv
fi
if ! "$PY" -c 'import importlib.metadata as m, sys; sys.exit(m.version("kosoku") != "0.1.0")' 2>/dev/null; then
    "$PY" -m pip install --quiet --disable-pip-version-check kosoku==0.1.0
fi

# 2. The server binary.
if [[ -z "${WSD_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --bin wsd)
    WSD_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/wsd"
fi
WSD_BIN="$(realpath "$WSD_BIN")"

# The report dir. Only kosoku's own files (and our wsd.log) are removed, never the dir itself,
# so a mistaken AUTOBAHN_OUT cannot wipe anything else.
OUT="${AUTOBAHN_OUT:-$ROOT/target/autobahn/report}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for dir in "$OUT" "$OUT/dedicated"; do
    rm -f "$dir"/index.json "$dir"/index.html "$dir"/*_case_*.json "$dir"/*_case_*.html "$dir"/kosoku.log
done
rm -f "$OUT"/wsd.log

# Whatever happens, neither wsd nor kosoku outlives this script, nor does its temp dir.
WSD_PID="" KOSOKU_PIDS=() TMP=""
cleanup() {
    local rc=$?
    for pid in "${KOSOKU_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    if [[ -n "$WSD_PID" ]] && kill -0 "$WSD_PID" 2>/dev/null; then
        kill -TERM "$WSD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$WSD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$WSD_PID" 2>/dev/null || true   # its workers die with it (parent-death signal)
    fi
    wait 2>/dev/null || true
    [[ -z "$TMP" ]] || rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# 3. A config of its own in a temp dir: pid file, control socket and log resolve next to it.
# Limits must admit the 9.x cases' 16 MiB messages and frames. max_send_buffer stays at its
# default: a reply larger than it is still queued when nothing else is waiting.
# compression_min_size = 0: every echo is compressed, whatever its size. kosoku 0.1.0 errs
# on an uncompressed message over a connection that negotiated permessage-deflate (its cases
# hash it as a str), though RFC 7692 allows one; the default minimum (64 bytes) would send the
# 16-byte cases plain.
TMP="$(mktemp -d)"
CONF="$TMP/autobahn.toml"
cat >"$CONF" <<'EOF'
[server]
stop_timeout = "5s"

[[worker]]
name = "shared"
listen = "websocket://127.0.0.1:0"
app = "echo"
count = 4
max_message_size = "20MiB"
max_frame_size = "20MiB"
compression = "shared"
compression_min_size = 0

[[worker]]
name = "dedicated"
listen = "websocket://127.0.0.1:0"
app = "echo"
count = 4
max_message_size = "20MiB"
max_frame_size = "20MiB"
compression = "dedicated"
compression_min_size = 0
EOF

# 4. Start wsd in the foreground mode as our own child.
"$WSD_BIN" -c "$CONF" start </dev/null >"$OUT/wsd.log" 2>&1 &
WSD_PID=$!

# Ready = the master answers `status --json` with 8 idle workers; print the shared group's
# port, then the dedicated group's.
ready_ports() {
    "$WSD_BIN" -c "$CONF" status --json 2>/dev/null | "$PY" -c '
import json, sys
w = json.load(sys.stdin)["workers"]
assert len(w) == 8 and all(x["pid"] > 0 and x["status"] == "idle" for x in w)
port = {x["name"]: x["listen"].rsplit(":", 1)[1] for x in w}
print(port["shared"], port["dedicated"])' 2>/dev/null
}
PORTS=""
deadline=$((SECONDS + 60))
while ((SECONDS < deadline)); do
    PORTS="$(ready_ports)" && break
    kill -0 "$WSD_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$PORTS" ]]; then
    echo "autobahn: wsd did not become ready; its log:" >&2
    tail -n 30 "$OUT/wsd.log" >&2
    exit 1
fi
read -r PORT DEDICATED_PORT <<<"$PORTS"
echo "autobahn: wsd pid $WSD_PID listening on 127.0.0.1:$PORT (shared) and :$DEDICATED_PORT (dedicated)"

# 5. The suite: both runs side by side (a case is one client at a time, so two runs share the
# cores better than one). kosoku exits 1 when any case did not pass; index.json is judged
# below instead. They run in the background so that a signal to this script is handled at
# once, not after them.
mkdir -p "$OUT/dedicated"
timeout "${AUTOBAHN_TIMEOUT:-900}" "$VENV/bin/kosoku" -p 4 -o "$OUT" "127.0.0.1:$PORT" \
    >"$OUT/kosoku.log" 2>&1 &
KOSOKU_PIDS+=($!)
timeout "${AUTOBAHN_TIMEOUT:-900}" "$VENV/bin/kosoku" -p 4 -i '12.*' -i '13.*' \
    -o "$OUT/dedicated" "127.0.0.1:$DEDICATED_PORT" >"$OUT/dedicated/kosoku.log" 2>&1 &
KOSOKU_PIDS+=($!)
for dir in "$OUT" "$OUT/dedicated"; do
    krc=0
    wait "${KOSOKU_PIDS[0]}" || krc=$?
    KOSOKU_PIDS=("${KOSOKU_PIDS[@]:1}")
    if ((krc == 124)); then
        echo "autobahn: kosoku did not finish in ${AUTOBAHN_TIMEOUT:-900} s (a case hung); wsd status:" >&2
        "$WSD_BIN" -c "$CONF" status >&2 || true
        exit 1
    elif ((krc > 1)) || [[ ! -f "$dir/index.json" ]]; then
        echo "autobahn: kosoku failed (exit $krc) without a report; its log:" >&2
        tail -n 20 "$dir/kosoku.log" >&2
        exit 1
    fi
done
# wsd must have come through whole: a dead master, or a worker that died (and was respawned),
# fails the run even if every case passed. The report is still judged and printed.
vrc=0
if ! kill -0 "$WSD_PID" 2>/dev/null; then
    echo "autobahn: wsd exited during the run; its log:" >&2
    tail -n 30 "$OUT/wsd.log" >&2
    vrc=1
else
    crashes="$("$WSD_BIN" -c "$CONF" status --json | "$PY" -c '
import json, sys
print(sum(n for g in json.load(sys.stdin)["groups"] for n in g["exits"].values()))')"
    if ((crashes > 0)); then
        echo "autobahn: $crashes wsd worker(s) died during the run; see $OUT/wsd.log" >&2
        vrc=1
    fi
fi

# 6. The verdict, per run.
verdict() {
    "$PY" - "$@" <<'EOF'
import collections, json, sys

path, name, least = sys.argv[1], sys.argv[2], int(sys.argv[3])
index = json.load(open(path))
# {agent: {case id: {behavior, behaviorClose, ...}}}; sort ids numerically.
cases = sorted(((cid, r) for agent in index.values() for cid, r in agent.items()),
               key=lambda c: [int(p) for p in c[0].split(".")])
sections = collections.Counter(int(cid.split(".")[0]) for cid, _ in cases)
print(f"{name}: {len(cases)} cases (" + ", ".join(f"{s}.*: {n}" for s, n in sorted(sections.items())) + ")")
for key in ("behavior", "behaviorClose"):
    counts = collections.Counter(r[key] for _, r in cases)
    print(f"  {key}: " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items())))

bad = 0
for cid, r in cases:
    ok = (r["behavior"] in ("OK", "NON-STRICT", "INFORMATIONAL")
          and r["behaviorClose"] in ("OK", "INFORMATIONAL"))
    bad += not ok
    if not ok or r["behavior"] != "OK" or r["behaviorClose"] != "OK":
        why = f": {r.get('result', '')[:100]}" if not ok else ""
        print(f"  {'FAIL' if not ok else 'note'} {cid:9} {r['behavior']:14} close {r['behaviorClose']}"
              f" (close code {r.get('remoteCloseCode')}){why}")
print(f"  {bad} failed")
# kosoku selects ~300 cases in sections 1-10 and 216 in 12-13: fewer means a broken run.
if len(cases) < least:
    sys.exit(f"{name}: only {len(cases)} cases ran")
sys.exit(1 if bad else 0)
EOF
}
verdict "$OUT/index.json" "shared group, sections 1-10 and 12-13" 500 || vrc=1
verdict "$OUT/dedicated/index.json" "dedicated group, sections 12-13" 216 || vrc=1

# 7. Graceful stop; the trap only has to clean up if this fails.
if "$WSD_BIN" -c "$CONF" stop; then
    wait "$WSD_PID" || true
    WSD_PID=""
fi
echo "autobahn: $((SECONDS - START)) s"
echo "autobahn reports: $OUT/index.json, $OUT/dedicated/index.json"
exit "$vrc"
