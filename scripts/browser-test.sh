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
NAME="browser test"
START=$SECONDS
PLAYWRIGHT_VERSION=1.64.1
export CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
export BROWSER_NODE_DIR="$ROOT/target/browser-node"
SHOT="${BROWSER_SHOT:-$ROOT/target/browser/chat.png}"

# WSD_BIN, TMP, start_wsd, until_ready, ready_workers, stop_wsd, apt_install and the exit trap.
# shellcheck source=scripts/test-lib.sh
source "$ROOT/scripts/test-lib.sh"

# 1. Chromium, Node.js, and playwright-core, each installed only when missing.
[[ -x "$CHROMIUM" ]] || apt_install chromium
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
installed="$(node -p "require('$BROWSER_NODE_DIR/node_modules/playwright-core/package.json').version" 2>/dev/null || true)"
if [[ "$installed" != "$PLAYWRIGHT_VERSION" ]]; then
    mkdir -p "$BROWSER_NODE_DIR"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$BROWSER_NODE_DIR" \
        --no-audit --no-fund --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION"
fi

# 2. A config of its own in a temp dir (pid file, control socket, log beside it); port 0 lets
# the OS pick a free port, read back from `wsd status --json`.
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
start_wsd "$CONF" "$TMP/wsd.log"

LIST="$(until_ready 30 "$TMP/wsd.log" ready_workers "$CONF" 4)" || exit 1
PORT="$(awk 'NR == 1 {print $2}' <<<"$LIST")"

# 3. The browser.
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

# 4. Graceful stop.
stop_wsd "$CONF"
echo "browser test: $((SECONDS - START)) s"
echo "browser test: ok, screenshot ${SHOT#"$ROOT"/}"
