# Shared by the test scripts that start a wsd of their own (sourced, not run): autobahn.sh,
# browser-test.sh and deflate-test.sh. The sourcing script sets NAME (its name in messages) and
# ROOT (the repo) first. It then has:
#
# - WSD_BIN: the wsd binary as an absolute path, built in release mode unless WSD_BIN was set;
# - TMP: a temp dir for its config (and so the pid file, control socket and log beside it);
# - start_wsd CONF LOG: starts wsd in the foreground mode as a child (WSD_PID);
# - until_ready SECONDS LOG CMD...: waits for wsd to be ready;
# - ready_workers CONF COUNT: "name port pid" per worker, once COUNT workers are up;
# - worker_exits CONF: how many workers exited (died and were respawned) so far;
# - stop_wsd CONF: a graceful stop;
# - python_venv DIR PACKAGE VERSION: a venv at DIR with PACKAGE==VERSION in it (PY, its python);
# - apt_install PACKAGE...: Debian packages, for what is missing;
# - an exit trap that, whatever happens, stops what was started (the PIDS the script added,
#   then wsd: TERM, and KILL after 10 s) and removes TMP.

apt_install() {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

python_venv() {
    local venv=$1 package=$2 version=$3
    PY="$venv/bin/python"
    if ! "$PY" -c '' 2>/dev/null; then
        rm -rf "$venv"
        # Debian's python3 splits venv out; a bare machine gets it here.
        python3 -m venv "$venv" 2>/dev/null || { apt_install python3-venv && rm -rf "$venv" && python3 -m venv "$venv"; }
    fi
    if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$package') != '$version')" 2>/dev/null; then
        "$PY" -m pip install --quiet --disable-pip-version-check "$package==$version"
    fi
}

if [[ -z "${WSD_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --bin wsd)
    WSD_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/wsd"
fi
WSD_BIN="$(realpath "$WSD_BIN")"

WSD_PID="" PIDS=() TMP="$(mktemp -d)"
cleanup() {
    local rc=$? pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    if [[ -n "$WSD_PID" ]] && kill -0 "$WSD_PID" 2>/dev/null; then
        kill -TERM "$WSD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$WSD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$WSD_PID" 2>/dev/null || true   # its workers die with it (parent-death signal)
    fi
    wait 2>/dev/null || true
    rm -rf "$TMP"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

start_wsd() {
    "$WSD_BIN" -c "$1" start </dev/null >"$2" 2>&1 &
    WSD_PID=$!
}

# Runs CMD every 0.1 s until it succeeds, and prints its output. Fails, with the tail of LOG,
# if wsd exits first or SECONDS pass.
until_ready() {
    local deadline=$((SECONDS + $1)) log=$2 out
    shift 2
    while ((SECONDS < deadline)); do
        out="$("$@" 2>/dev/null)" && { echo "$out"; return 0; }
        kill -0 "$WSD_PID" 2>/dev/null || break
        sleep 0.1
    done
    echo "$NAME: wsd did not become ready; its log:" >&2
    tail -n 30 "$log" >&2
    return 1
}

# Prints "name port pid", a line per worker, once COUNT workers are up and idle; fails before.
ready_workers() {
    "$WSD_BIN" -c "$1" status --json | python3 -c '
import json, sys
w = json.load(sys.stdin)["workers"]
assert len(w) == int(sys.argv[1]) and all(x["pid"] > 0 and x["status"] == "idle" for x in w)
for x in w:
    print(x["name"], x["listen"].rsplit(":", 1)[1], x["pid"])' "$2"
}

worker_exits() {
    "$WSD_BIN" -c "$1" status --json | python3 -c '
import json, sys
print(sum(n for g in json.load(sys.stdin)["groups"] for n in g["exits"].values()))'
}

# The trap only has to clean up if this fails.
stop_wsd() {
    if "$WSD_BIN" -c "$1" stop >/dev/null; then
        wait "$WSD_PID" || true
        WSD_PID=""
    fi
}
