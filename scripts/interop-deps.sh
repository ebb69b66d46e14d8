#!/usr/bin/env bash
# Installs the third-party clients that tests/interop.rs runs against a real wsd, each only
# when it is missing or not the pinned version, and prints nothing when all are there:
# - Debian's curl, chromium, nodejs/npm and python3-venv, with apt-get;
# - Python `websockets` and `prometheus_client` (pinned; the metrics test parses wsd's
#   /metrics with the latter's text parser) from PyPI into a venv, target/interop-venv;
# - Node `ws` and playwright-core (pinned) from npm into target/interop-node. playwright-core
#   drives Debian's /usr/bin/chromium and never downloads a browser.
# scripts/test.sh runs it before the tests; tests/interop.rs runs it too (once per run), so
# `cargo test --test interop` works on a bare machine. Concurrent runs take turns (flock).
#   INTEROP_VENV, INTEROP_NODE_DIR  other places for the venv and the npm packages
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WEBSOCKETS_VERSION=17.4
PROMETHEUS_CLIENT_VERSION=0.26.0
WS_VERSION=8.23.1
PLAYWRIGHT_VERSION=1.64.1
VENV="${INTEROP_VENV:-$ROOT/target/interop-venv}"
NODE_DIR="${INTEROP_NODE_DIR:-$ROOT/target/interop-node}"
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"

mkdir -p "$ROOT/target"
exec 9>"$ROOT/target/interop-deps.lock"
flock 9

apt_install() {
    echo "interop deps: apt-get install $*" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# 1. Debian's packages.
command -v curl >/dev/null || apt_install curl
[[ -x "$CHROMIUM" ]] || apt_install chromium
command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm

# 2. websockets in a venv. Debian's python3 splits venv out: a bare machine gets it here.
PY="$VENV/bin/python"
if ! "$PY" -c '' 2>/dev/null; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" 2>/dev/null || { apt_install python3-venv && rm -rf "$VENV" && python3 -m venv "$VENV"; }
fi
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('websockets') != '$WEBSOCKETS_VERSION')" 2>/dev/null; then
    echo "interop deps: pip install websockets==$WEBSOCKETS_VERSION into ${VENV#"$ROOT"/}" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "websockets==$WEBSOCKETS_VERSION" >&2
fi
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('prometheus_client') != '$PROMETHEUS_CLIENT_VERSION')" 2>/dev/null; then
    echo "interop deps: pip install prometheus_client==$PROMETHEUS_CLIENT_VERSION into ${VENV#"$ROOT"/}" >&2
    "$PY" -m pip install --quiet --disable-pip-version-check "prometheus_client==$PROMETHEUS_CLIENT_VERSION" >&2
fi

# 3. ws and playwright-core under one npm prefix.
version_of() {
    node -p "require('$NODE_DIR/node_modules/$1/package.json').version" 2>/dev/null || true
}
if [[ "$(version_of ws)" != "$WS_VERSION" || "$(version_of playwright-core)" != "$PLAYWRIGHT_VERSION" ]]; then
    echo "interop deps: npm install ws@$WS_VERSION playwright-core@$PLAYWRIGHT_VERSION into ${NODE_DIR#"$ROOT"/}" >&2
    mkdir -p "$NODE_DIR"
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$NODE_DIR" --no-audit --no-fund \
        --loglevel=error "ws@$WS_VERSION" "playwright-core@$PLAYWRIGHT_VERSION" >&2
fi
