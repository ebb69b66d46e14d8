//! wsd: a multi-process WebSocket server in the mould of PHP's Workerman.
//!
//! A master process binds one SO_REUSEPORT listener per worker slot and forks the workers; each
//! worker runs a single-threaded event loop and calls your hooks. Write the hooks, hand the
//! workers to [`run_all`], and your program gets wsd's whole command line — `start [-d]`,
//! `stop [-g]`, `restart`, `status [--json] [-w]`, `check` — like `php start.php start`.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! let mut worker = wsd::Worker::new("websocket://0.0.0.0:2346");
//! worker.count = 4;
//! worker.on_worker_start(|ctx| {
//!     ctx.add_timer(Duration::from_secs(5), |ctx| {
//!         ctx.broadcast_local("tick");
//!     });
//! });
//! worker.on_message(|ctx, conn, msg| {
//!     let _ = ctx.send(conn, format!("hello {msg}"));
//! });
//! wsd::run_all(vec![worker]);
//! ```
//!
//! Where things live: `worker/` is the data path (accept → handshake → frames → hook → send),
//! `cli/` → `master/` is the control path, `config/` the `workers.toml` schema, `sys.rs` the
//! only `unsafe`.

mod api;
pub mod apps;
#[cfg(feature = "jwt")]
pub mod auth;
mod backoff;
#[cfg(feature = "bench")]
mod bench;
mod bus;
#[cfg(feature = "cli")]
mod cli;
pub mod config;
mod conn_id;
mod control;
mod exec;
#[doc(hidden)]
pub mod fuzzing;
mod handoff;
mod json_data;
mod logging;
mod master;
mod message;
mod metrics;
mod proto;
mod runner;
mod sys;
#[cfg(feature = "tls")]
pub mod tls;
/// Client frame builders for wsd's integration tests.
#[doc(hidden)]
pub mod testing {
    pub use crate::proto::frame::{client_frame, put_client_header};
}
mod worker;

pub use bus::{BadGlobalId, GlobalId};
/// Binary payloads: the `bytes` crate's reference-counted buffer.
pub use bytes::Bytes;
pub use conn_id::ConnId;
pub use logging::{Escaped, escaped};
pub use message::{Message, NotUtf8, Utf8Bytes};
pub use proto::{ProtocolError, close};
pub use worker::{
    ConnError, Context, Decision, SendError, TimerId, UpgradeRequest, Worker, WorkerAddr,
};

/// This build's version, shown by `--version`, in the banner and in `status`: the crate's,
/// unless the build set `WSD_VERSION` (a packager's `0.1.0-3`, a commit, a test's second
/// build), so two builds of one release can be told apart during an upgrade.
pub const VERSION: &str = match option_env!("WSD_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

#[cfg(feature = "cli")]
pub use runner::run_all;
pub use runner::{RunError, Runner};
