#!/usr/bin/env bash
# The whole test suite: unit tests, integration tests with real processes and sockets, and a
# build of the examples. Installs nothing beyond the Rust toolchain (later suites add their
# own installs here, so that a bare machine and CI run exactly this).
set -euo pipefail
cd "$(dirname "$0")/.."
# The chaos tests open many sockets.
ulimit -n 8192 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true
cargo build --release --all-targets
cargo test --release --all-targets -- --test-threads=2
