#!/usr/bin/env bash
# wsd side by side with its peers, on this box, with the same client (`wsd bench`).
#
# Three families of scenarios, each with the servers that speak it:
#   ws       plain WebSocket: raw, raw-uring, wsd-1, wsd-2, tokio-tungstenite,
#            tungstenite-defaults, fastwebsockets, node-ws, bun
#   wss      WebSocket over TLS (the client adds --insecure to a wss:// URL): raw (raw-tls),
#            wsd-1 (tls_cert/tls_key), nginx (terminating TLS in front of a plain wsd-1),
#            tokio-tungstenite (tokio-rustls), bun (Bun.serve's tls)
#   deflate  permessage-deflate (the client adds --deflate: it offers the extension as a browser
#            does): wsd-1 (compression off: it declines, so its figures are the uncompressed
#            ones to compare with), wsd-shared and wsd-dedicated (wsd-1 with compression =
#            "shared" or "dedicated"; unavailable, with the reason, when this wsd has no such
#            key), bun and node-ws (perMessageDeflate: true). The broadcast publishes 3,000
#            messages a second to 1,000 subscribers, more than any of them delivers: its
#            deliveries per second are each server's capacity.
# Servers, each started fresh for every run in its own temp dir on a free loopback port:
#   raw                a single-threaded epoll byte-echo of frames (benches/peers/raw, raw-epoll):
#                      the physical ceiling (the kernel's TCP path and nothing else); over TLS,
#                      raw-tls: the same with rustls in between (ring, wsd's configuration)
#   raw-uring          the same byte-echo on io_uring (raw-uring: multishot recv, provided
#                      buffers, one io_uring_enter a turn): what batching system calls adds
#   wsd-1              wsd, echo app, count = 1 (the latency scenario runs clock-echo: echo with
#                      the clock's 5 s push to every connection firing; broadcast runs chat)
#   wsd-2              wsd, the same, count = 2 (not pinned: both cores, shared with the client)
#   tokio-tungstenite  tokio-tungstenite 0.30 on a current_thread runtime (benches/peers/),
#                      its read buffer cut from 128 KiB to 4 KiB: tungstenite at its best
#   tungstenite-defaults  the same binary with every WebSocketConfig default (128 KiB read
#                      buffer, zero-filled up to that size each read): as a user gets it
#   fastwebsockets     fastwebsockets 0.10 + hyper upgrade, current_thread (benches/peers/)
#   node-ws            Node `ws` (benches/peers/node/ws-echo.js; --chat for broadcast)
#   bun                Bun.serve websocket, uWebSockets inside (the `bun` npm package)
#   nginx              Debian's nginx (installed with apt-get if missing), one worker process,
#                      terminating TLS and proxying to wsd-1 as Workerman's manual tells its
#                      users to; the server's CPU and memory are nginx's and wsd's together
# Every server but wsd-2 runs on core 0 (taskset; nginx and its wsd both) with the client on
# core 1: per-core figures. TLS certificates: ECDSA P-256, made with openssl in the run's temp
# dir.
#
# Scenarios are the SCENARIOS list below (one line each: edit it to add or drop one); a
# scenario whose `wsd bench` mode or options this build lacks is skipped with a note. For each
# scenario, ROUNDS rounds, each running every server of its family once in the same order
# (A-B-C.., A-B-C..), so drift of the machine spreads over all of them; the figure is the
# median over rounds. Echo and latency runs get a WARMUP-second run of the same load first
# (JIT, allocator, caches), on the same server process, not counted.
#
# The latency scenario measures LATENCY_SECS (20) per run, not SECS: its p99 is set by the few
# times a kernel thread holds the server's or the client's core for milliseconds (kdamond,
# kworkers, rcu_preempt on this VM), some 10-25 of them in 5 s. Over 5 s the same raw epoll
# binary's p99 ranged 109-1778 µs from round to round; over 20 s, 120-594 µs.
#
# Prints markdown: a table per family, each server's figure and its ratio to the family's
# baseline (raw epoll, raw TLS, Bun), then wsd's ratio to each peer; writes the same plus every
# round's figure and the machine to target/bench-peers.md, and each run's JSON to
# target/bench-peers/. Takes ~50 minutes with the defaults. Not for CI.
#
# Usage: [SECS=5] [LATENCY_SECS=20] [ROUNDS=3] [WARMUP=1] [SERVERS=raw,wsd-1,...]
#        [ONLY=echo-32B-d1,...] [FAMILIES=ws,wss,deflate] [WSD_BIN=path/to/wsd]
#        scripts/bench-peers.sh
# Needs cargo and openssl; node and npm for node-ws and bun (npm installs benches/peers/node's
# pinned packages); apt-get for nginx if it is missing. A server that cannot be built or
# installed is reported unavailable, not faked.
set -euo pipefail

# name               | family  | wsd bench arguments ({SECS}, {LATENCY_SECS} replaced)                           | warmup first ('' none)                                              | wsd's app
SCENARIOS=(
    "echo-32B-d1        | ws      | echo --conns 100 --size 32 --depth 1 --secs {SECS}                              | echo --conns 100 --size 32 --depth 1 --secs {WARMUP}                | echo"
    "echo-4KiB-d1       | ws      | echo --conns 100 --size 4096 --depth 1 --secs {SECS}                            | echo --conns 100 --size 4096 --depth 1 --secs {WARMUP}              | echo"
    "echo-32B-d16       | ws      | echo --conns 100 --size 32 --depth 16 --secs {SECS}                             | echo --conns 100 --size 32 --depth 16 --secs {WARMUP}               | echo"
    "idle-15000         | ws      | idle --conns 15000 --hold 1                                                     |                                                                     | echo"
    "connect-10000      | ws      | connect --conns 10000 --secs {SECS}                                             | connect --conns 1000 --secs 0                                       | echo"
    "latency-20k-1000   | ws      | latency --conns 1000 --rate 20000 --secs {LATENCY_SECS}                         | latency --conns 1000 --rate 20000 --secs {WARMUP}                   | clock-echo"
    "wss-echo-32B-d1    | wss     | echo --conns 100 --size 32 --depth 1 --secs {SECS}                              | echo --conns 100 --size 32 --depth 1 --secs {WARMUP}                | echo"
    "wss-echo-4KiB-d1   | wss     | echo --conns 100 --size 4096 --depth 1 --secs {SECS}                            | echo --conns 100 --size 4096 --depth 1 --secs {WARMUP}              | echo"
    "wss-echo-32B-d16   | wss     | echo --conns 100 --size 32 --depth 16 --secs {SECS}                             | echo --conns 100 --size 32 --depth 16 --secs {WARMUP}               | echo"
    "wss-echo-4KiB-d16  | wss     | echo --conns 100 --size 4096 --depth 16 --secs {SECS}                           | echo --conns 100 --size 4096 --depth 16 --secs {WARMUP}             | echo"
    "wss-idle-15000     | wss     | idle --conns 15000 --hold 1                                                     |                                                                     | echo"
    "wss-connect-5000   | wss     | connect --conns 5000 --secs {SECS}                                              | connect --conns 500 --secs 0                                        | echo"
    "deflate-echo-2KiB  | deflate | echo --conns 100 --payload json --size 2048 --depth 1 --secs {SECS}             | echo --conns 100 --payload json --size 2048 --depth 1 --secs {WARMUP} | echo"
    "deflate-bcast-2KiB | deflate | broadcast --conns 1000 --rate 3000 --payload json --size 2048 --secs {SECS}     |                                                                     | chat"
    "deflate-idle-5000  | deflate | idle --conns 5000 --hold 1 --payload json --size 2048                           |                                                                     | echo"
)
ALL_SERVERS=(raw raw-uring wsd-1 wsd-2 tokio-tungstenite tungstenite-defaults fastwebsockets node-ws bun
    nginx wsd-shared wsd-dedicated)
# The servers that speak each family, in table order.
declare -A FAMILY_SERVERS=(
    [ws]="raw raw-uring wsd-1 wsd-2 tokio-tungstenite tungstenite-defaults fastwebsockets node-ws bun"
    [wss]="raw wsd-1 nginx tokio-tungstenite bun"
    [deflate]="wsd-1 wsd-shared wsd-dedicated bun node-ws"
)
SERVER_CPU=0 # where pinned servers run
CLIENT_CPU=1 # where their client runs

SECS=${SECS:-5}
LATENCY_SECS=${LATENCY_SECS:-20}
ROUNDS=${ROUNDS:-3}
WARMUP=${WARMUP:-1}
for arg in "$@"; do
    case $arg in
        -h | --help) sed -n '2,61s/^# \{0,1\}//p' "$0"; exit 0 ;;
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
IFS=, read -r -a families <<<"${FAMILIES:-ws,wss,deflate}"
for f in "${families[@]}"; do
    [[ -n ${FAMILY_SERVERS[$f]:-} ]] || die "unknown family '$f' (known: ws, wss, deflate)"
done

# The fd limit raised (a server holds up to 15,000 sockets), wsd built unless WSD_BIN is
# given, and pids, tmp, hard, the cleanup trap and free_port: all from bench-lib.sh.
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
rm -f "$runs"/*.json "$runs"/unavailable.txt "$runs"/skipped.txt "$runs"/load.txt
# A server unavailable everywhere (KEY = its name), or in one family or scenario only
# (KEY = family/name or scenario/name): its figures there are "n/a", with the reason.
declare -A unavailable=()
mark_unavailable() {
    unavailable[$1]=$2
    if [[ $1 == */* ]]; then say "${1#*/} unavailable for ${1%%/*}: $2"; else say "$1 unavailable: $2"; fi
    printf '%s\t%s\n' "$1" "$2" >>"$runs/unavailable.txt"
}
wants_family() { [[ " ${families[*]} " == *" $1 "* ]]; }
wants() {
    local f
    [[ " ${servers[*]} " == *" $1 "* ]] || return 1
    for f in "${families[@]}"; do [[ " ${FAMILY_SERVERS[$f]} " == *" $1 "* ]] && return 0; done
    return 1
}

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
NGINX=
if wants nginx; then
    NGINX=$(command -v nginx || true)
    if [[ -z $NGINX && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        say "installing nginx (apt-get)"
        apt() { DEBIAN_FRONTEND=noninteractive apt-get "$@" >>"$runs/apt.log" 2>&1; }
        if apt install -y --no-install-recommends nginx || { apt update && apt install -y --no-install-recommends nginx; }; then
            # The package starts its own service: not ours to run.
            { systemctl stop nginx || service nginx stop || true; } >/dev/null 2>&1
        fi
        NGINX=$(command -v nginx || true)
    fi
    [[ -n $NGINX ]] || mark_unavailable nginx "no nginx, and apt-get could not install it (see $runs/apt.log)"
fi
if wants_family wss; then
    # A throwaway ECDSA P-256 certificate for localhost and 127.0.0.1, gone with tmp.
    if ! openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -days 2 -subj /CN=localhost \
        -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$runs/openssl.log" 2>&1; then
        for s in ${FAMILY_SERVERS[wss]}; do mark_unavailable "wss/$s" "openssl could not make a certificate"; done
    fi
fi
for mode in shared dedicated; do
    wants "wsd-$mode" || continue
    # This wsd's config knows `compression`, or it has no permessage-deflate to measure.
    mkdir -p "$tmp/probe"
    printf '[[worker]]\nlisten = "websocket://127.0.0.1:1"\napp = "echo"\ncompression = "%s"\n' "$mode" >"$tmp/probe/workers.toml"
    if ! why=$("$WSD_BIN" -c "$tmp/probe/workers.toml" check 2>&1); then
        why=$(tail -n 1 <<<"$why" | sed 's/^.*workers.toml:[0-9:]* //; s/, expected .*//')
        mark_unavailable "wsd-$mode" "this wsd has no permessage-deflate yet (\`wsd check\` of compression = \"$mode\": $why)"
    fi
done

# --- Processes ---------------------------------------------------------------------------
# wsd_config DIR PORT COUNT APP [LINE...]: DIR/workers.toml, one group on 127.0.0.1:PORT,
# with the LINEs added to the group.
wsd_config() {
    local dir=$1 port=$2 count=$3 app=$4 line
    shift 4
    {
        printf '[server]\nstop_timeout = "3s"\nclose_spread = "0.2s"\nlog_level = "warn"\n\n'
        printf '[[worker]]\nname = "echo"\nlisten = "websocket://127.0.0.1:%s"\n' "$port"
        printf 'count = %s\napp = "%s"\nmax_connections = 20000\nmax_connections_per_ip = 0\n' "$count" "$app"
        for line in "$@"; do echo "$line"; done
    } >"$dir/workers.toml"
}

# wsd_pids CONFIG: the master's and workers' pids, once every worker is up (or the first
# would take all connections); nothing before.
wsd_pids() {
    "$WSD_BIN" -c "$1" status --json 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
ws = s["workers"]
if ws and all(w["status"] == "idle" and w["pid"] > 0 for w in ws):
    print(s["master"]["pid"], *[w["pid"] for w in ws])' 2>/dev/null || true
}

# nginx_config DIR PORT UPSTREAM: nginx terminating TLS on PORT for the wsd on UPSTREAM, as
# Workerman's manual sets it up, with one worker process and every file in DIR.
nginx_config() {
    local dir=$1 port=$2 upstream=$3
    mkdir -p "$dir/nginx-tmp"
    cat >"$dir/nginx.conf" <<CONF
worker_processes 1;
daemon off;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log warn;
worker_rlimit_nofile $hard;
events { worker_connections $hard; }
http {
    access_log off;
    client_body_temp_path $dir/nginx-tmp/body;
    proxy_temp_path $dir/nginx-tmp/proxy;
    fastcgi_temp_path $dir/nginx-tmp/fastcgi;
    uwsgi_temp_path $dir/nginx-tmp/uwsgi;
    scgi_temp_path $dir/nginx-tmp/scgi;
    server {
        listen 127.0.0.1:$port ssl backlog=4096;
        ssl_certificate $tmp/cert.pem;
        ssl_certificate_key $tmp/key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {
            proxy_pass http://127.0.0.1:$upstream;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "Upgrade";
            proxy_set_header X-Real-IP \$remote_addr;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
CONF
}

# start_server NAME DIR: starts NAME for the current scenario's family in DIR on a free port;
# sets port, server_pid (what stop_server stops first), extra_pids (stopped after it: nginx's
# wsd), scheme and server_args (how the client finds the server's processes). Returns 1 (after
# saying why) if it does not accept connections within 30 s.
start_server() {
    local name=$1 dir=$2 deadline=$((SECONDS + 30)) cmd pin=("${pin_server[@]}") st upstream
    local cert=$tmp/cert.pem key=$tmp/key.pem flags=()
    port=$(free_port)
    server_args=() extra_pids=() scheme=ws
    [[ $family == wss ]] && scheme=wss
    [[ $wsd_app == chat ]] && flags+=(--chat)
    [[ $family == deflate ]] && flags+=(--deflate)
    case $name in
        raw)
            cmd=("$peers_target/release/raw-epoll" "$port")
            [[ $family == wss ]] && cmd=("$peers_target/release/raw-tls" "$port" "$cert" "$key")
            ;;
        raw-uring) cmd=("$peers_target/release/raw-uring" "$port") ;;
        tokio-tungstenite)
            cmd=("$peers_target/release/peer-tokio-tungstenite" "$port")
            [[ $family == wss ]] && cmd+=("$cert" "$key")
            ;;
        tungstenite-defaults)
            cmd=(env TUNGSTENITE_READ_BUFFER=131072 "$peers_target/release/peer-tokio-tungstenite" "$port") ;;
        fastwebsockets) cmd=("$peers_target/release/peer-fastwebsockets" "$port") ;;
        node-ws) cmd=(node "$node_dir/ws-echo.js" "$port" "${flags[@]}") ;;
        bun)
            cmd=("$BUN" "$node_dir/bun-echo.js" "$port" "${flags[@]}")
            [[ $family == wss ]] && cmd+=(--tls "$cert" "$key")
            ;;
        wsd-1 | wsd-2)
            if [[ $family == wss ]]; then
                wsd_config "$dir" "$port" "${name#wsd-}" "$wsd_app" "tls_cert = \"$cert\"" "tls_key = \"$key\""
            else
                wsd_config "$dir" "$port" "${name#wsd-}" "$wsd_app"
            fi
            cmd=("$WSD_BIN" -c "$dir/workers.toml" start)
            [[ $name == wsd-2 ]] && pin=()
            ;;
        wsd-shared | wsd-dedicated)
            wsd_config "$dir" "$port" 1 "$wsd_app" "compression = \"${name#wsd-}\""
            cmd=("$WSD_BIN" -c "$dir/workers.toml" start)
            ;;
        nginx)
            # The plain wsd-1 behind it first, on a port of its own.
            upstream=$(free_port)
            wsd_config "$dir" "$upstream" 1 "$wsd_app"
            (cd "$dir" && exec "${pin[@]}" "$WSD_BIN" -c "$dir/workers.toml" start) >"$dir/wsd.log" 2>&1 &
            extra_pids=($!)
            pids+=($!)
            until [[ -n $(wsd_pids "$dir/workers.toml") ]]; do
                if ((SECONDS >= deadline)) || ! kill -0 "${extra_pids[0]}" 2>/dev/null; then
                    say "nginx's wsd did not start: $(tail -n 3 "$dir/wsd.log" | tr '\n' ' ')"
                    return 1
                fi
                sleep 0.1
            done
            nginx_config "$dir" "$port" "$upstream"
            cmd=("$NGINX" -p "$dir" -e "$dir/nginx-error.log" -c "$dir/nginx.conf")
            ;;
    esac
    (cd "$dir" && exec "${pin[@]}" "${cmd[@]}") >"$dir/server.log" 2>&1 &
    server_pid=$!
    pids+=("$server_pid")
    while ((SECONDS < deadline)); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            say "$name exited at start: $(tail -n 3 "$dir/server.log" | tr '\n' ' ')"
            return 1
        fi
        case $name in
            wsd-*) st=$(wsd_pids "$dir/workers.toml") && server_args=(--config "$dir/workers.toml") ;;
            nginx)
                # nginx's master and worker, and the wsd master and worker behind them.
                st=$(pgrep -P "$server_pid" | head -n 1 || true)
                [[ -n $st ]] && server_args=(--pid "$server_pid,$st,$(wsd_pids "$dir/workers.toml" | tr ' ' ,)")
                ;;
            *) st=ok server_args=(--pid "$server_pid") ;;
        esac
        # A subshell, so that the probe's descriptor goes with it.
        if [[ -n $st ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    say "$name did not accept connections within 30 s: $(tail -n 3 "$dir/server.log" | tr '\n' ' ')"
    return 1
}

stop_server() {
    local deadline=$((SECONDS + 10)) p
    for p in "$server_pid" "${extra_pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
        while kill -0 "$p" 2>/dev/null; do
            ((SECONDS < deadline)) || { kill -KILL "$p" 2>/dev/null || true; break; }
            sleep 0.05
        done
        wait "$p" 2>/dev/null || true
    done
}

# client ARGS... : wsd bench against the current server, pinned like it (or not), in the
# scenario's family. A pinned latency client spins between sends (--spin): it has its core to
# itself, and sleeping costs it hypervisor traps that would count as latency.
client() {
    local limit=$(((SECS > LATENCY_SECS ? SECS : LATENCY_SECS) * 3 + 120)) pin=("${pin_client[@]}") extra=()
    [[ $current == wsd-2 ]] && pin=()
    [[ $1 == latency && ${#pin[@]} -gt 0 ]] && extra+=(--spin)
    [[ $family == wss ]] && extra+=(--insecure)
    [[ $family == deflate ]] && extra+=(--deflate)
    # shellcheck disable=SC2086 # the scenario's arguments are words
    timeout -k 10 "$limit" "${pin[@]}" "$WSD_BIN" bench "$@" "${extra[@]}" --url "$scheme://127.0.0.1:$port/" --json
}

# agreed FILE: the run in FILE agreed on permessage-deflate on its connections.
agreed() {
    python3 -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1])).get("deflate", {}).get("connections") else 1)' "$1"
}

# --- Runs --------------------------------------------------------------------------------
scenario_names=() scenario_families=()
for line in "${SCENARIOS[@]}"; do
    IFS='|' read -r name family args warm wsd_app <<<"$line"
    name=$(xargs <<<"$name") family=$(xargs <<<"$family") args=$(xargs <<<"$args") # trim
    warm=$(xargs <<<"$warm") wsd_app=$(xargs <<<"$wsd_app")
    [[ -z ${ONLY:-} || ",$ONLY," == *",$name,"* ]] || continue
    wants_family "$family" || continue
    here=()
    for s in ${FAMILY_SERVERS[$family]}; do [[ " ${servers[*]} " == *" $s "* ]] && here+=("$s"); done
    ((${#here[@]})) || continue
    mode=${args%% *}
    # shellcheck disable=SC2086 # the scenario's arguments are words
    if ! "$WSD_BIN" bench ${args//\{*\}/1} --help >/dev/null 2>&1; then
        say "skipping $name: this wsd bench has no '$mode' mode, or not all of its options"
        printf '%s\t%s\n' "$name" "this wsd bench has no '$mode' mode, or not all of its options" >>"$runs/skipped.txt"
        continue
    fi
    scenario_names+=("$name") scenario_families+=("$family")
    # nginx holds two descriptors per client (the client's and the upstream's) in one worker.
    if [[ " ${here[*]} " == *" nginx "* && $args =~ --conns\ ([0-9]+) ]] && ((BASH_REMATCH[1] * 2 + 256 > hard)); then
        mark_unavailable "$name/nginx" "its worker would hold $((BASH_REMATCH[1] * 2)) sockets, over the $hard files a process may hold"
    fi
    args=${args//\{SECS\}/$SECS}
    args=${args//\{LATENCY_SECS\}/$LATENCY_SECS}
    warm=${warm//\{WARMUP\}/$WARMUP}
    ((WARMUP > 0)) || warm=
    for ((round = 1; round <= ROUNDS; round++)); do
        for current in "${here[@]}"; do
            [[ -z ${unavailable[$current]:-}${unavailable[$family/$current]:-}${unavailable[$name/$current]:-} ]] || continue
            dir=$tmp/$name.$current.$round
            mkdir -p "$dir"
            say "$name, round $round/$ROUNDS: $current (load $(cut -d' ' -f1 /proc/loadavg))"
            printf '%s\t%s\t%s\t%s\n' "$name" "$current" "$round" "$(cut -d' ' -f1 /proc/loadavg)" >>"$runs/load.txt"
            start_server "$current" "$dir" || { stop_server; continue; }
            if [[ -n $warm ]]; then
                # shellcheck disable=SC2086
                client $warm >/dev/null 2>"$dir/warmup.err" || true
            fi
            # shellcheck disable=SC2086
            client $args "${server_args[@]}" >"$dir/run.json" 2>"$dir/run.err" || true
            stop_server
            if ! [[ -s $dir/run.json ]] || ! python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$dir/run.json" 2>/dev/null; then
                say "$name/$current round $round: no result ($(tail -n 2 "$dir/run.err" | tr '\n' ' '))"
            elif [[ $family == deflate && $current == wsd-[sd]* ]] && ! agreed "$dir/run.json"; then
                # A compressing wsd that answers without the extension has nothing to show here
                # (wsd-1, compression off, is meant to decline).
                mark_unavailable "deflate/$current" "this wsd did not agree on permessage-deflate"
            else
                cp "$dir/run.json" "$runs/$name.$current.$round.json"
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
rustls $(crate_version rustls) (tokio-rustls $(crate_version tokio-rustls)), \
node $(node --version 2>/dev/null || echo '-') with ws $(node -p 'require(process.argv[1]).version' \
"$node_dir/node_modules/ws/package.json" 2>/dev/null || echo '-'), bun $([[ -n $BUN ]] && "$BUN" --version || echo '-'), \
nginx $([[ -n $NGINX ]] && "$NGINX" -v 2>&1 | sed 's|.*/||' || echo '-') with $(openssl version 2>/dev/null | cut -d' ' -f1-2)"
family_servers=()
for f in ws wss deflate; do
    here=()
    for s in ${FAMILY_SERVERS[$f]}; do [[ " ${servers[*]} " == *" $s "* ]] && here+=("$s"); done
    family_servers+=("$f:$(IFS=,; echo "${here[*]}")")
done
scenarios_arg=()
for i in "${!scenario_names[@]}"; do scenarios_arg+=("${scenario_names[$i]}:${scenario_families[$i]}"); done
python3 - "$runs" "$out/bench-peers.md" "$ROUNDS" "$SECS" "$WARMUP" "$machine" "$versions" \
    "$((${#pin_server[@]} > 0))" "$(IFS=' '; echo "${family_servers[*]}")" "$(IFS=,; echo "${scenarios_arg[*]}")" \
    "$LATENCY_SECS" "$(uptime | sed 's/.*load average: //')" <<'EOF'
import glob, json, os, statistics, sys

runs, md_path, rounds, secs, warmup, machine, versions, pinned = sys.argv[1:9]
family_servers = {f: [s for s in ss.split(",") if s]
                  for f, _, ss in (x.partition(":") for x in sys.argv[9].split())}
scenarios = [tuple(x.split(":")) for x in sys.argv[10].split(",")]
latency_secs, load = sys.argv[11], sys.argv[12]
timing = f"{secs} s each" + (f", latency {latency_secs} s" if any(n.startswith("latency") for n, _ in scenarios) else "")
LABEL = {"raw": "raw epoll", "raw-uring": "raw io_uring", "wsd-1": "wsd ×1", "wsd-2": "wsd ×2",
         "tokio-tungstenite": "tokio-tungstenite", "tungstenite-defaults": "tokio-tungstenite, defaults",
         "fastwebsockets": "fastwebsockets", "node-ws": "Node ws", "bun": "Bun",
         "nginx": "nginx + wsd ×1", "wsd-shared": "wsd ×1, shared", "wsd-dedicated": "wsd ×1, dedicated"}
FAMILY = {
    # title, the baseline each figure is divided by (in parentheses), its label there
    "ws": ("Plain WebSocket (ws://)", "raw", {}),
    "wss": ("WebSocket over TLS (wss://)", "raw",
            {"raw": "raw TLS", "tokio-tungstenite": "tokio-tungstenite + tokio-rustls"}),
    "deflate": ("permessage-deflate, 2 KiB JSON chat events (ws://)", "bun",
                {"bun": "Bun", "node-ws": "Node ws", "wsd-1": "wsd ×1, compression off"}),
}
WSD = ("wsd-1", "wsd-2", "wsd-shared", "wsd-dedicated")

def label(family, s):
    return FAMILY[family][2].get(s, LABEL[s])

def get(d, path):
    for k in path.split("."):
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d if isinstance(d, (int, float)) else None

# (label, JSON path, higher is better) per mode; the families that are not plain also show the
# client's own CPU and (deflate) the compression ratio.
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
    # The burst's rate is bound by the client's core: on loopback the kernel runs both ends
    # of each TCP handshake in the connecting process. Its CPU per upgrade shows that limit.
    "connect": [("burst upgrades/s", "burst.upgrades_per_sec", True),
                ("burst: server CPU µs per upgrade", "server.burst_cpu_us_per_upgrade", False),
                ("burst: client CPU µs per upgrade", "client.burst_cpu_us_per_upgrade", False),
                ("burst: client core busy %", "client.burst_busy_pct", False),
                ("sustained handshakes/s", "sustained.handshakes_per_sec", True),
                ("server CPU µs per handshake", "server.cpu_us_per_handshake", False)],
    "broadcast": [("deliveries/s", "deliveries_per_sec", True),
                  ("latency p99 µs", "latency_us.p99", False),
                  ("server CPU µs per delivery", "server.cpu_secs_per_million", False)],
}
EXTRA = {
    "echo": [("client CPU µs per message", "client.cpu_secs_per_million", False)],
    "connect": [("client CPU µs per handshake", "client.cpu_us_per_handshake", False)],
}
RATIO = [("compression ratio of what the server sent", "deflate.received_ratio", True)]

def metrics(family, mode):
    m = list(METRICS.get(mode, []))
    if family != "ws":
        m += EXTRA.get(mode, [])
    if family == "deflate" and mode in ("echo", "broadcast"):
        m += RATIO
    return m

def describe(family, r):
    n = f"{r['conns']:,} conns"
    m = r["mode"]
    pre = {"ws": "", "wss": "wss ", "deflate": "deflate "}[family]
    if m == "echo":
        size = f"{r['size'] // 1024} KiB" if r["size"] % 1024 == 0 else f"{r['size']} B"
        if r.get("payload") == "json":
            size += " JSON"
        return f"{pre}echo {size}, {r['depth']} in flight, {n}"
    if m == "latency":
        return f"{pre}latency, {r['rate']:,} msg/s open loop, {n} (wsd: clock-echo, 5 s push on)"
    if m == "idle":
        return f"{pre}idle, {n}" + (", one 2 KiB JSON echo each" if r.get("payload") == "json" else "")
    if m == "connect":
        return f"{pre}connect, burst of {r['conns']:,}" + (f" then {r['secs']} s of cycles" if r.get("secs") else "")
    if m == "broadcast":
        return f"{pre}broadcast (chat), {r['rate']} msgs/s to {n}"
    return f"{pre}{m}, {n}"

def trouble(r, s):
    """Why server s's run's figure is suspect, or None."""
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
    if r["mode"] == "broadcast" and r.get("missing"):
        why.append(f"{r['missing']:,} of {r['expected']:,} deliveries missing")
    d = r.get("deflate")
    # wsd-1 is the deflate family's uncompressed baseline: it declines by design.
    if d and s != "wsd-1" and d.get("connections", 0) < d.get("of", 0):
        why.append(f"permessage-deflate on {d['connections']} of {d['of']} connections")
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

def why_not(sc, family, s):
    return unavailable.get(s) or unavailable.get(f"{family}/{s}") or unavailable.get(f"{sc}/{s}")

out, notes, details = [], [], []
for family in ("ws", "wss", "deflate"):
    servers = family_servers.get(family, [])
    mine = [sc for sc, f in scenarios if f == family]
    if not mine or not servers:
        continue
    title, base, _ = FAMILY[family]
    base = base if base in servers else None
    rows = []
    for sc in mine:
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
            if not why_not(sc, family, s) and got < int(rounds):
                notes.append(f"{sc} / {label(family, s)}: {int(rounds) - got} of {rounds} round(s) gave no result")
            for r in results[s]:
                t = trouble(r, s)
                if t:
                    notes.append(f"{sc} / {label(family, s)}, a round: {t}")
        for name, path, higher in metrics(family, any_run["mode"]):
            med, each, flagged = {}, {}, {}
            for s in servers:
                vals = [get(r, path) for r in results[s]]
                vals = [v for v in vals if v is not None]
                each[s] = vals
                med[s] = statistics.median(vals) if vals else None
                flagged[s] = any(trouble(r, s) for r in results[s])
            if all(v is None for v in med.values()):
                continue
            rows.append((sc, f"{describe(family, any_run)}: {name} {'↑' if higher else '↓'}", med, flagged))
            details.append((family, f"{sc}: {name}", each))

    def cell(sc, s, med, flagged):
        if why_not(sc, family, s):
            return "n/a"
        v = med[s]
        if v is None:
            return "fail"
        mark = " ⚠" if flagged[s] else ""
        if base is None or s == base:
            return fmt(v) + mark
        return f"{fmt(v)} ({ratio(v, med[base])}){mark}"

    head = f"scenario ({'median of ' + rounds if int(rounds) > 1 else '1 round'}, {timing})"
    lines = [f"### {title}", "",
             f"| {head} | " + " | ".join(label(family, s) for s in servers) + " |",
             "|---|" + "---:|" * len(servers)]
    for sc, row, med, flagged in rows:
        lines.append(f"| {row} | " + " | ".join(cell(sc, s, med, flagged) for s in servers) + " |")
    if base:
        lines += ["", f"In parentheses: the ratio to {label(family, base)}."]
    wsd = [s for s in servers if s in WSD]
    # The raw echoes are ceilings, not choices: wsd is not divided by them.
    peers = [s for s in servers if s not in WSD and s != "raw" and s != "raw-uring"]
    if wsd and peers:
        lines += ["", "wsd's figure divided by each peer's (read it with the scenario's arrow):", "",
                  "| scenario | wsd | " + " | ".join(f"÷ {label(family, p)}" for p in peers) + " |",
                  "|---|---|" + "---:|" * len(peers)]
        for sc, row, med, flagged in rows:
            for w in wsd:
                if why_not(sc, family, w):
                    continue
                lines.append(f"| {row} | {label(family, w)} | "
                             + " | ".join("n/a" if why_not(sc, family, p) else ratio(med[w], med[p]) for p in peers) + " |")
    out += lines + [""]

legend = ("Figures: the median over the rounds. ↑ higher is better, ↓ lower is better. "
          "⚠: a round had errors or missed its load (see notes). n/a: not available (see notes). "
          "wsd ×1 is `count = 1`, wsd ×2 `count = 2`.")
out.append(legend)
notes += [f"{k.replace('/', ' / ')}: unavailable, {v}" for k, v in unavailable.items()]
if os.path.exists(f"{runs}/skipped.txt"):
    notes += [f"{k}: skipped, {v}" for k, v in (l.rstrip("\n").split("\t", 1) for l in open(f"{runs}/skipped.txt"))]
if notes:
    out += ["", "Notes:", ""] + [f"- {n}" for n in notes]
print("\n".join(out))

pin_note = ("every server but wsd ×2 pinned to core 0 (taskset), its client to core 1; "
            "wsd ×2 and its client unpinned (2 workers and the client share both cores)"
            if pinned == "1" else "nothing pinned")
with open(md_path, "w") as f:
    f.write("# wsd and its peers (scripts/bench-peers.sh)\n\n")
    loads = sorted(float(l.split("\t")[3]) for l in open(f"{runs}/load.txt")) if os.path.exists(f"{runs}/load.txt") else []
    spread = (f"1-minute load average as each run began: median {statistics.median(loads):.2f}, "
              f"highest {loads[-1]:.2f}; at the end {load}") if loads else f"load average at the end {load}"
    f.write(f"Machine: {machine}; {spread}. Versions: {versions}.\n")
    f.write(f"Client: `wsd bench` for every server; {pin_note}. {timing.replace(' each', '')} measured per run, "
            f"{warmup} s warmup run first (echo, latency, connect), a fresh server process per run.\n\n")
    f.write("\n".join(out) + "\n\nEvery round (in run order):\n")
    for family in ("ws", "wss", "deflate"):
        servers = family_servers.get(family, [])
        mine = [d for d in details if d[0] == family]
        if not mine:
            continue
        f.write(f"\n| {FAMILY[family][0]} | " + " | ".join(label(family, s) for s in servers) + " |\n")
        f.write("|---|" + "---|" * len(servers) + "\n")
        for _, title, each in mine:
            f.write(f"| {title} | " + " | ".join(", ".join(fmt(v) for v in each[s]) or "–" for s in servers) + " |\n")
print(f"\n(written to {md_path}; each run's JSON in {runs}/)", file=sys.stderr)
EOF
