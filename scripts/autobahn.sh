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
NAME=autobahn
START=$SECONDS
# WSD_BIN, TMP, start_wsd, until_ready, ready_workers, worker_exits, stop_wsd, python_venv and
# the exit trap, which stops the kosoku runs (PIDS) and wsd, whatever happens.
# shellcheck source=scripts/test-lib.sh
source "$ROOT/scripts/test-lib.sh"

# 1. kosoku in a venv, installed once.
VENV="$ROOT/target/autobahn-venv"
python_venv "$VENV" kosoku 0.1.0

# The report dir. Only kosoku's own files (and our wsd.log) are removed, never the dir itself,
# so a mistaken AUTOBAHN_OUT cannot wipe anything else.
OUT="${AUTOBAHN_OUT:-$ROOT/target/autobahn/report}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
for dir in "$OUT" "$OUT/dedicated"; do
    rm -f "$dir"/index.json "$dir"/index.html "$dir"/*_case_*.json "$dir"/*_case_*.html "$dir"/kosoku.log
done
rm -f "$OUT"/wsd.log

# 2. A config of its own in a temp dir: pid file, control socket and log resolve next to it.
# Limits must admit the 9.x cases' 16 MiB messages and frames. max_send_buffer stays at its
# default: a reply larger than it is still queued when nothing else is waiting.
# compression_min_size = 0: every echo is compressed, whatever its size. kosoku 0.1.0 errs
# on an uncompressed message over a connection that negotiated permessage-deflate (its cases
# hash it as a str), though RFC 7692 allows one; the default minimum (64 bytes) would send the
# 16-byte cases plain.
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

# 3. Start wsd in the foreground mode as our own child.
start_wsd "$CONF" "$OUT/wsd.log"

# Ready: 8 idle workers. The shared group's port, then the dedicated group's.
LIST="$(until_ready 60 "$OUT/wsd.log" ready_workers "$CONF" 8)" || exit 1
PORT="$(awk '$1 == "shared" {print $2; exit}' <<<"$LIST")"
DEDICATED_PORT="$(awk '$1 == "dedicated" {print $2; exit}' <<<"$LIST")"
echo "autobahn: wsd pid $WSD_PID listening on 127.0.0.1:$PORT (shared) and :$DEDICATED_PORT (dedicated)"

# 4. The suite: both runs side by side (a case is one client at a time, so two runs share the
# cores better than one). kosoku exits 1 when any case did not pass; index.json is judged
# below instead. They run in the background so that a signal to this script is handled at
# once, not after them.
mkdir -p "$OUT/dedicated"
timeout "${AUTOBAHN_TIMEOUT:-900}" "$VENV/bin/kosoku" -p 4 -o "$OUT" "127.0.0.1:$PORT" \
    >"$OUT/kosoku.log" 2>&1 &
PIDS+=($!)
timeout "${AUTOBAHN_TIMEOUT:-900}" "$VENV/bin/kosoku" -p 4 -i '12.*' -i '13.*' \
    -o "$OUT/dedicated" "127.0.0.1:$DEDICATED_PORT" >"$OUT/dedicated/kosoku.log" 2>&1 &
PIDS+=($!)
for dir in "$OUT" "$OUT/dedicated"; do
    krc=0
    wait "${PIDS[0]}" || krc=$?
    PIDS=("${PIDS[@]:1}")
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
    crashes="$(worker_exits "$CONF")"
    if ((crashes > 0)); then
        echo "autobahn: $crashes wsd worker(s) died during the run; see $OUT/wsd.log" >&2
        vrc=1
    fi
fi

# 5. The verdict, per run.
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

# 6. Graceful stop.
stop_wsd "$CONF"
echo "autobahn: $((SECONDS - START)) s"
echo "autobahn reports: $OUT/index.json, $OUT/dedicated/index.json"
exit "$vrc"
