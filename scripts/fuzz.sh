#!/usr/bin/env bash
# Coverage-guided fuzzing of wsd's server-side read path: a real worker loop (accept, handshake
# and admission, frames, hook dispatch, closing) serving each input as one client over loopback.
# The cargo-fuzz target fuzz/fuzz_targets/read_path.rs calls wsd::fuzzing::feed.
#
#   [TARGET=read_path_tls] scripts/fuzz.sh [SECONDS]   # default 60; not in CI or scripts/test.sh
#
# Installs cargo-fuzz if it is missing. Single process (-jobs/-workers are not used: the
# machine has 2 cores shared with other work).
#
# Corpus: libFuzzer writes new inputs into the FIRST corpus directory it is given and only reads
# the others. The scratch dir fuzz/target/corpus-new (gitignored) goes first, the committed seeds
# fuzz/corpus/read_path second, so a run never grows the committed corpus. To keep an input
# that a run found, copy it into fuzz/corpus/read_path by hand (or better, add a seed to
# fuzz/make_corpus.py). Crashes are written to fuzz/artifacts/read_path/ (gitignored); one that
# reproduces a bug belongs in fuzz/regressions/, which tests/fuzz_corpus.rs replays.
set -euo pipefail
cd "$(dirname "$0")/.."

SECONDS_TO_RUN="${1:-60}"
case "$SECONDS_TO_RUN" in
    '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

# cargo-fuzz builds with nightly-only rustc flags (-Zsanitizer=address, -Zsanitizer-coverage...,
# -Cllvm-args=... for libFuzzer's coverage instrumentation). This machine has only a stable
# toolchain, which refuses `-Z` options ("the option `Z` is only accepted on the nightly
# compiler"). RUSTC_BOOTSTRAP=1 tells stable rustc to accept unstable options anyway (it is how
# rustc builds itself); the sanitizer and coverage code is the same in stable and nightly
# builds, so this works. It applies only to this script's cargo, never to wsd's normal build.
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

# read_path (plain) or read_path_tls (the same inputs as a TLS client's plaintext); both share
# the seed corpus, since their inputs mean the same.
TARGET=${TARGET:-read_path}
case "$TARGET" in
    read_path | read_path_tls) ;;
    *) echo "fuzz.sh: TARGET is read_path or read_path_tls, not $TARGET" >&2; exit 2 ;;
esac
SEEDS=fuzz/corpus/read_path
SCRATCH=fuzz/target/corpus-new-$TARGET
ARTIFACTS=fuzz/artifacts/$TARGET
mkdir -p "$SCRATCH" "$ARTIFACTS"

echo "fuzz.sh: target $TARGET for ${SECONDS_TO_RUN}s"
echo "fuzz.sh: seeds (read only): $SEEDS ($(ls "$SEEDS" | wc -l) files)"
echo "fuzz.sh: new corpus entries: $SCRATCH"
echo "fuzz.sh: crashes and leaks go to: $ARTIFACTS/"

status=0
# The corpus dirs are passed to libFuzzer as given, relative to the repository root (the current
# directory); cargo fuzz itself sets -artifact_prefix to fuzz/artifacts/$TARGET/.
cargo fuzz run "$TARGET" "$SCRATCH" "$SEEDS" -- \
    -max_total_time="$SECONDS_TO_RUN" \
    -rss_limit_mb=2048 \
    -max_len=65536 \
    -timeout=10 \
    -print_final_stats=1 || status=$?

echo "fuzz.sh: corpus found this run: $(ls "$SCRATCH" | wc -l) files in $SCRATCH"
if [ "$status" -ne 0 ]; then
    echo "fuzz.sh: the fuzzer stopped with status $status; its input is in $ARTIFACTS/:" >&2
    ls -l "$ARTIFACTS" >&2 || true
    echo "fuzz.sh: reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run $TARGET <file>" >&2
fi
exit "$status"
