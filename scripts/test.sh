#!/usr/bin/env bash
# The whole test suite: the lints (rustfmt, clippy with warnings as errors, as a contributor's
# change is checked), the library without its optional parts (no CLI, bench or Redis), unit
# tests, integration tests with real processes and sockets (chaos and abuse tests included),
# the fuzz corpus replay, a build of the examples, the Autobahn TestSuite against the release
# binary, permessage-deflate with a real client (Python websockets), and the chat page in a real
# Chromium. Installs what it needs (kosoku, the Autobahn runner, and websockets into venvs under
# target/; the interop tests' clients under target/ too), so a bare machine and CI run exactly
# this.
set -euo pipefail
cd "$(dirname "$0")/.."
# The chaos tests open many sockets.
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
# The systemd unit is checked with systemd-analyze.
command -v systemd-analyze >/dev/null || { apt-get update -qq && apt-get install -y -qq systemd >/dev/null; }
# The chat page is tested in Debian's Chromium (scripts/browser-test.sh; it also installs playwright-core).
[[ -x /usr/bin/chromium ]] || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }
# tests/cluster.rs runs a real Redis on loopback for the cluster bus.
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
# tests/handler_examples.rs runs examples/handlers/chat.php in Debian's php-cli.
command -v php >/dev/null || { apt-get update -qq && apt-get install -y -qq php-cli >/dev/null; }
cargo fmt --check
cargo clippy --all-targets -- -D warnings
# A library user's build: `default-features = false` leaves out clap, hdrhistogram and redis.
cargo build --no-default-features --lib
cargo test --no-default-features --lib -- --test-threads=2
cargo build --release --all-targets
# tests/interop.rs runs real third-party clients (Python websockets, Node ws, Chromium, curl),
# pinned and installed under target/ when missing; installed here, before the tests run.
scripts/interop-deps.sh
cargo test --release --all-targets -- --test-threads=2
# The examples in the API docs compile (and run, unless marked no_run).
cargo test --release --doc
WSD_BIN=target/release/wsd scripts/autobahn.sh
WSD_BIN=target/release/wsd scripts/deflate-test.sh
WSD_BIN=target/release/wsd scripts/browser-test.sh
