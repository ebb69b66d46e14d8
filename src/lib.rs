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
//! `cli/` → `master/` is the control path, `config.rs` the `workers.toml` schema, `sys.rs` the
//! only `unsafe`.

#![deny(unsafe_code)]

pub mod apps;
mod backoff;
mod bench;
mod bus;
mod cli;
pub mod config;
mod conn_id;
mod control;
#[doc(hidden)]
pub mod fuzzing;
mod logging;
mod master;
mod message;
mod proto;
mod sys;
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
pub use worker::{ConnError, Context, SendError, TimerId, Worker, WorkerAddr};

/// This build's version, shown in the banner and `status`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A program built on wsd: the apps `workers.toml` may name, and groups defined in code.
pub struct Runner {
    apps: master::Apps,
    workers: Vec<Worker>,
}

impl Default for Runner {
    fn default() -> Self {
        Runner::new()
    }
}

impl Runner {
    /// A runner that knows the built-in apps (`echo`, `hello`, `clock`).
    pub fn new() -> Runner {
        let mut r = Runner {
            apps: master::Apps::new(),
            workers: Vec::new(),
        };
        for (name, install) in apps::builtin() {
            r = r.app(name, install);
        }
        r
    }

    /// Registers an app that `workers.toml` can select with `app = "name"`.
    pub fn app(mut self, name: &str, install: impl Fn(&mut Worker) + 'static) -> Runner {
        self.apps.insert(name.to_string(), Box::new(install));
        self
    }

    /// Adds a group defined in code; it runs beside any groups of the config file.
    pub fn worker(mut self, worker: Worker) -> Runner {
        self.workers.push(worker);
        self
    }

    /// Parses the process's command line, runs the command and exits with its status.
    pub fn run(self) -> ! {
        let code = cli::main(self, std::env::args().collect());
        std::process::exit(code)
    }

    fn app_names(&self) -> Vec<&str> {
        self.apps.keys().map(String::as_str).collect()
    }
}

/// Runs `workers` under wsd's command line (Workerman's `Worker::runAll()`). Never returns.
pub fn run_all(workers: Vec<Worker>) -> ! {
    workers
        .into_iter()
        .fold(Runner::new(), Runner::worker)
        .run()
}
