#!/usr/bin/env bash
# The chat page (static/) in a real browser: starts wsd serving the `chat` app with 4 workers,
# static_dir = static/ and compression = "shared" on a free port, then tests/browser/chat.mjs
# drives Debian's Chromium through playwright-core: two clients, both of which must have agreed
# to permessage-deflate (Chromium offers it), a message typed in one appears in the other, and
# a screenshot of the second is saved as the artifact.
# Installs what it needs: Debian's `chromium` if missing, and playwright-core (pinned) from npm
# into target/browser-node. playwright-core never downloads a browser; it drives /usr/bin/chromium.
#   BROWSER_SHOT  screenshot path (default target/browser/chat.png)
#   WSD_BIN       use this wsd binary instead of building one
#   CHROMIUM      the browser (default /usr/bin/chromium)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
START=$SECONDS
PLAYWRIGHT_VERSION=1.64.1
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export BROWSER_NODE_DIR="$ROOT/target/browser-node"
SHOT="${BROWSER_SHOT:-$ROOT/target/browser/chat.png}"

# 1. Chromium, Node.js, and playwright-core, each installed only when missing.
apt_install() {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
[[ -x "$CHROMIUM" ]] || apt_install chromium
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
installed="$(node -p "require('$BROWSER_NODE_DIR/node_modules/playwright-core/package.json').version" 2>/dev/null || true)"
if [[ "$installed" != "$PLAYWRIGHT_VERSION" ]]; then
    mkdir -p "$BROWSER_NODE_DIR"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$BROWSER_NODE_DIR" \
        --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION"
fi

# 2. The server binary.
if [[ -z "${WSD_BIN:-}" ]]; then
    (cd "$ROOT" && cargo build --release --bin wsd)
    WSD_BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/wsd"
fi
WSD_BIN="$(realpath "$WSD_BIN")"

# Whatever happens, wsd does not outlive this script, nor does its temp dir.
WSD_PID="" TMP=""
cleanup() {
    local rc=$?
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

# 3. A config of its own in a temp dir (pid file, control socket, log beside it); port 0 lets
# the OS pick a free port, read back from `wsd status --json`.
TMP="$(mktemp -d)"
CONF="$TMP/browser.toml"
cat >"$CONF" <<CONF
[server]
stop_timeout = "5s"

[[worker]]
name = "chat"
listen = "websocket://127.0.0.1:0"
app = "chat"
count = 4
static_dir = "$ROOT/static"
compression = "shared"
CONF
"$WSD_BIN" -c "$CONF" start </dev/null >"$TMP/wsd.log" 2>&1 &
WSD_PID=$!

ready_port() {
    "$WSD_BIN" -c "$CONF" status --json 2>/dev/null | node -e '
let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
  const w = JSON.parse(s).workers;
  if (w.length !== 4 || !w.every((x) => x.pid > 0 && x.status === "idle")) process.exit(1);
  console.log(w[0].listen.split(":").pop());
});' 2>/dev/null
}
PORT=""
deadline=$((SECONDS + 30))
while ((SECONDS < deadline)); do
    PORT="$(ready_port)" && break
    kill -0 "$WSD_PID" 2>/dev/null || break
    sleep 0.1
done
if [[ -z "$PORT" ]]; then
    echo "browser test: wsd did not become ready; its log:" >&2
    tail -n 30 "$TMP/wsd.log" >&2
    exit 1
fi

# 4. The browser.
rm -f "$SHOT" "$(dirname "$SHOT")"/failure-*.png
if ! timeout 90 node "$ROOT/tests/browser/chat.mjs" "http://127.0.0.1:$PORT/" "$SHOT"; then
    echo "browser test: FAILED; wsd's log:" >&2
    tail -n 30 "$TMP/wsd.log" >&2
    exit 1
fi

# Informational: which workers took the two messages (two different ones is the better test;
# SO_REUSEPORT's hash decides, so it is not required). Workers report about once a second.
per_worker() {
    "$WSD_BIN" -c "$CONF" status --json 2>/dev/null | node -e '
let s = ""; process.stdin.on("data", (d) => (s += d)).on("end", () => {
  const n = JSON.parse(s).workers.map((w) => w.total_request);
  if (n.reduce((a, b) => a + b, 0) < 2) process.exit(1);
  console.log(n.join(" "));
});' 2>/dev/null
}
for _ in $(seq 30); do
    if counts="$(per_worker)"; then
        echo "browser test: messages received per worker: $counts"
        break
    fi
    sleep 0.1
done

# 5. Graceful stop; the trap only has to clean up if this fails.
if "$WSD_BIN" -c "$CONF" stop >/dev/null; then
    wait "$WSD_PID" || true
    WSD_PID=""
fi
echo "browser test: $((SECONDS - START)) s"
echo "browser test: ok, screenshot ${SHOT#"$ROOT"/}"
