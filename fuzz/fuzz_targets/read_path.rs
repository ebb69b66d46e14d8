//! The server-side read path, fed from bytes: `data` is everything a client sends (an HTTP/1.1
//! upgrade request, then masked WebSocket frames). `wsd::fuzzing::feed` serves it with a real
//! worker loop (echo app) over a loopback connection; any panic is a bug.
//! Run with `scripts/fuzz.sh [SECONDS]`; `tests/fuzz_corpus.rs` replays the corpus in the tests.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    wsd::fuzzing::feed(data);
});
