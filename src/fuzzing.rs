//! The entry point of the fuzz target (`fuzz/`) and of the corpus replay test: a real worker
//! loop serving one client per input over loopback (see the harness in `worker/fuzz.rs`).

pub use crate::worker::fuzz::feed;
#[cfg(feature = "tls")]
pub use crate::worker::fuzz::feed_tls;
