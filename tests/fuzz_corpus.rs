//! Replays the fuzz corpus through the fuzz target's entry point, `wsd::fuzzing::feed`, on every
//! `cargo test`: the seeds in fuzz/corpus/read_path/ (written by fuzz/make_corpus.py) and every
//! input that once crashed the fuzzer, in fuzz/regressions/. Each file is also fed cut short at
//! a few points, as a client that stops mid-request or mid-frame would; and each goes through
//! `wsd::fuzzing::feed_tls` too, as the plaintext of a TLS client's records. The fuzzing
//! itself (`scripts/fuzz.sh`) is not part of the tests; this keeps its findings from coming
//! back.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How many seeds fuzz/make_corpus.py writes. A missing or emptied corpus fails the test
/// instead of passing on nothing.
const SEEDS: usize = 65;

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            // fuzz/regressions/README.md and dotfiles are not inputs.
            !name.starts_with('.') && !name.ends_with(".md")
        })
        .collect();
    files.sort();
    files
}

/// Where to cut `data`: a few fractions of it, one byte short, and around the end of the HTTP
/// request (just before the blank line, right after it, and one and two bytes into the first
/// frame header).
fn cuts(data: &[u8]) -> Vec<usize> {
    let n = data.len();
    let mut at = vec![0, 1, n / 4, n / 2, 3 * n / 4, n.saturating_sub(1)];
    if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
        at.extend([end, end + 4, end + 5, end + 6]);
    }
    at.retain(|&i| i < n);
    at.sort_unstable();
    at.dedup();
    at
}

#[test]
fn corpus_and_regressions_replay_without_panicking() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let seeds = files_in(&root.join("corpus/read_path"));
    let regressions = files_in(&root.join("regressions"));
    assert!(
        seeds.len() >= SEEDS,
        "found {} seed files in fuzz/corpus/read_path, expected at least {SEEDS} \
         (run python3 fuzz/make_corpus.py)",
        seeds.len()
    );

    // A certificate for the TLS replay, made here, never committed.
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    let (chain, key) = (params.self_signed(&key).unwrap().pem(), key.serialize_pem());

    let started = Instant::now();
    let mut fed = 0;
    let mut failures = Vec::new();
    for path in seeds.iter().chain(&regressions) {
        let data = std::fs::read(path).unwrap();
        let whole = std::iter::once(data.len());
        for len in cuts(&data).into_iter().chain(whole) {
            fed += 1;
            let input = &data[..len];
            if catch_unwind(AssertUnwindSafe(|| wsd::fuzzing::feed(input))).is_err() {
                failures.push(format!(
                    "{} (first {len} of {} bytes)",
                    path.display(),
                    data.len()
                ));
            }
            let over_tls = || wsd::fuzzing::feed_tls(&chain, &key, input);
            if catch_unwind(AssertUnwindSafe(over_tls)).is_err() {
                failures.push(format!(
                    "{} over TLS (first {len} of {} bytes)",
                    path.display(),
                    data.len()
                ));
            }
        }
    }
    eprintln!(
        "fed {fed} inputs from {} seeds and {} regressions in {:?}",
        seeds.len(),
        regressions.len(),
        started.elapsed()
    );
    assert!(
        failures.is_empty(),
        "wsd::fuzzing::feed panicked on:\n  {}",
        failures.join("\n  ")
    );
}
