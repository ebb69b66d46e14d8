# Shared by the bench scripts (sourced, not run): messages,
# the descriptor limit, the wsd binary, a temp dir and every started process stopped on exit,
# and a wsd master started from a config the script writes.
#
# The sourcing script sets NAME (its name in messages) and root (the repo) first.

die() { echo "$NAME: $*" >&2; exit 1; }
say() { echo "$NAME: $*" >&2; }

# Every server worker and every client process needs its sockets: soft limit up to the hard one.
hard=$(ulimit -Hn)
[[ $hard == unlimited ]] && hard=$(cat /proc/sys/fs/nr_open)
ulimit -Sn "$hard" || die "cannot raise the fd soft limit to $hard"

if [[ -z ${WSD_BIN:-} ]]; then
    (cd "$root" && cargo build --release --bin wsd) || die "cargo build failed"
    WSD_BIN=${CARGO_TARGET_DIR:-$root/target}/release/wsd
fi
[[ -x $WSD_BIN ]] || die "no wsd binary at $WSD_BIN"

# Everything started goes in pids; the trap stops each (TERM, then KILL) and removes tmp.
pids=()
tmp=$(mktemp -d)
cleanup() {
    local p deadline=$((SECONDS + 15))
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        while kill -0 "$p" 2>/dev/null; do
            ((SECONDS < deadline)) || { kill -KILL "$p" 2>/dev/null || true; break; }
            sleep 0.1
        done
        wait "$p" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# write_config DIR APP COUNT MAX_CONNECTIONS [SERVER_LINE...]: DIR/workers.toml with one group
# of COUNT workers running APP on a port the OS picks; any SERVER_LINEs (bus = "...", say)
# go in [server].
write_config() {
    local dir=$1 app=$2 count=$3 max=$4 line
    shift 4
    mkdir -p "$dir"
    {
        echo '[server]'
        echo 'stop_timeout = "10s"'
        echo 'log_level = "warn"'
        for line in "$@"; do echo "$line"; done
        echo
        echo '[[worker]]'
        echo "name = \"$app\""
        echo 'listen = "websocket://127.0.0.1:0"'
        echo "count = $count"
        echo "app = \"$app\""
        echo "max_connections = $max"
        echo 'max_connections_per_ip = 0'
        echo 'backlog = 4096'
    } >"$dir/workers.toml"
}

# start_wsd DIR: starts a master on DIR/workers.toml (which the caller wrote; its one group
# listens on port 0); sets master, config and port. Returns 1 (after saying why) if not every
# worker is up within 60 s.
start_wsd() {
    local dir=$1 deadline=$((SECONDS + 60)) st
    config=$dir/workers.toml
    "$WSD_BIN" -c "$config" start >"$dir/wsd.log" 2>&1 &
    master=$!
    pids+=("$master")
    port=
    while ((SECONDS < deadline)); do
        if ! kill -0 "$master" 2>/dev/null; then
            say "wsd exited at start: $(tail -n 3 "$dir/wsd.log" | tr '\n' ' ')"
            return 1
        fi
        # "PORT" once every worker is up and idle.
        st=$("$WSD_BIN" -c "$config" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
ws = s["workers"]
if ws and all(w["status"] == "idle" and w["pid"] > 0 for w in ws):
    print(s["groups"][0]["listen"].rsplit(":", 1)[1])' 2>/dev/null) || true
        [[ -n $st ]] && { port=$st; return 0; }
        sleep 0.2
    done
    say "wsd did not get every worker ready within 60 s: $(tail -n 3 "$dir/wsd.log" | tr '\n' ' ')"
    return 1
}

stop_wsd() {
    kill -TERM "$master" 2>/dev/null || true
    wait "$master" 2>/dev/null || true
}
