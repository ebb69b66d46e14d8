//! The data path: a worker process and the application hooks it calls.
//!
//! [`Worker`] is a group definition — settings plus hooks — built by a library program or by a
//! built-in app from `workers.toml`. The master forks one process per slot; the child's copy of
//! the definition becomes that process's hooks (closures need not be `Send` or `Clone`: fork
//! copies them). `event_loop.rs` then runs accept → handshake → frames → hook → send.

mod admission;
mod alarm;
mod api;
mod asking;
mod bus_events;
mod channel;
mod commands;
mod conn;
mod context;
mod decisions;
mod errors;
mod event_loop;
mod flush;
#[doc(hidden)]
pub mod fuzz;
mod gather;
mod handler;
mod handoff;
mod hooks;
// Its clients read the server with the load generator's wire reader.
#[cfg(all(test, feature = "bench"))]
mod loop_tests;
mod moment;
mod presence;
mod reach;
mod read_buffers;
mod relay;
mod static_files;
mod stop;
mod sweep;
mod timers;
#[cfg(feature = "tls")]
mod tls;
mod tokens;
mod topics;
mod upgrade;
mod webhook;

pub use context::Context;
pub use errors::{ConnError, SendError};
pub use reach::WorkerAddr;
pub use timers::TimerId;
pub use upgrade::{Decision, UpgradeRequest};

pub(crate) use api::ApiSocket;
pub(crate) use event_loop::run;
pub(crate) use tokens::Grant;
#[cfg(feature = "jwt")]
pub(crate) use tokens::unix_now;

use crate::config::{GroupConfig, Listen, ValueError};
use crate::{ConnId, Message};
use bytes::Bytes;
use std::ops::{Deref, DerefMut};

type WorkerHook = Box<dyn FnMut(&mut Context)>;
type ConnHook = Box<dyn FnMut(&mut Context, ConnId)>;
type MessageHook = Box<dyn FnMut(&mut Context, ConnId, Message)>;
type ErrorHook = Box<dyn FnMut(&mut Context, ConnId, &ConnError)>;
type BusHook = Box<dyn FnMut(&mut Context, WorkerAddr, Bytes)>;
type UpgradeHook = Box<dyn FnMut(&mut Context, &UpgradeRequest<'_>) -> Decision>;
type HandoffHook = Box<dyn FnMut(&mut Context, ConnId) -> Vec<u8>>;
type AdoptHook = Box<dyn FnMut(&mut Context, ConnId, &[u8])>;

#[derive(Default)]
pub(crate) struct Hooks {
    pub on_worker_start: Option<WorkerHook>,
    pub on_connect: Option<ConnHook>,
    pub on_message: Option<MessageHook>,
    pub on_close: Option<ConnHook>,
    pub on_error: Option<ErrorHook>,
    pub on_buffer_full: Option<ConnHook>,
    pub on_buffer_drain: Option<ConnHook>,
    pub on_worker_stop: Option<WorkerHook>,
    pub on_bus_message: Option<BusHook>,
    pub on_upgrade: Option<UpgradeHook>,
    pub on_handoff: Option<HandoffHook>,
    pub on_adopt: Option<AdoptHook>,
}

/// A group of worker processes: where they listen, how many, their limits, and the hooks
/// they run. Settings are the [`GroupConfig`] fields, reachable directly:
///
/// ```no_run
/// let mut worker = wsd::Worker::new("websocket://0.0.0.0:2346");
/// worker.count = 4;
/// worker.on_message(|ctx, conn, msg| {
///     let _ = ctx.send(conn, format!("hello {msg}"));
/// });
/// wsd::run_all(vec![worker]);
/// ```
pub struct Worker {
    config: GroupConfig,
    pub(crate) hooks: Hooks,
}

impl Worker {
    /// A group listening on `listen` (`websocket://HOST:PORT`), with default settings.
    ///
    /// Panics with the reason if the address does not parse; see [`Worker::try_new`].
    pub fn new(listen: &str) -> Worker {
        Worker::try_new(listen).unwrap_or_else(|e| panic!("wsd::Worker::new: {e}"))
    }

    /// A group listening on `listen`, or why the address does not parse.
    pub fn try_new(listen: &str) -> Result<Worker, ValueError> {
        Ok(Worker::from_config(GroupConfig::new(Listen::parse(
            listen,
        )?)))
    }

    /// A group from a `[[worker]]` table, with no hooks yet.
    pub fn from_config(config: GroupConfig) -> Worker {
        Worker {
            config,
            hooks: Hooks::default(),
        }
    }

    /// Runs in each worker process before it accepts (Workerman's `onWorkerStart`).
    pub fn on_worker_start(&mut self, f: impl FnMut(&mut Context) + 'static) -> &mut Self {
        self.hooks.on_worker_start = Some(Box::new(f));
        self
    }

    /// Decides on a valid upgrade request, after wsd's own checks (`allowed_origins`,
    /// `max_connections_per_ip`, `require_subprotocol`) and before the `101` and `on_connect`:
    /// accept it, with response headers, a subprotocol and the connection's state, or reject
    /// it with an HTTP status. See [`UpgradeRequest`] and [`Decision`].
    ///
    /// ```no_run
    /// struct User(String);
    /// let mut worker = wsd::Worker::new("websocket://0.0.0.0:2346");
    /// worker.on_upgrade(|_ctx, req| match req.query("token").as_deref() {
    ///     Some("s3cret") => wsd::Decision::accept().with_state(User("ada".into())),
    ///     _ => wsd::Decision::reject(401, "missing or unknown token"),
    /// });
    /// worker.on_message(|ctx, conn, msg| {
    ///     let name = ctx.state::<User>(conn).map_or("?", |u| u.0.as_str()).to_string();
    ///     ctx.broadcast(format!("{name}: {msg}"));
    /// });
    /// ```
    ///
    /// A panic in it refuses that upgrade with 500 and is logged; the worker carries on.
    pub fn on_upgrade(
        &mut self,
        f: impl FnMut(&mut Context, &UpgradeRequest<'_>) -> Decision + 'static,
    ) -> &mut Self {
        self.hooks.on_upgrade = Some(Box::new(f));
        self
    }

    /// A client completed the WebSocket upgrade.
    pub fn on_connect(&mut self, f: impl FnMut(&mut Context, ConnId) + 'static) -> &mut Self {
        self.hooks.on_connect = Some(Box::new(f));
        self
    }

    /// A client sent a complete text or binary message.
    pub fn on_message(
        &mut self,
        f: impl FnMut(&mut Context, ConnId, Message) + 'static,
    ) -> &mut Self {
        self.hooks.on_message = Some(Box::new(f));
        self
    }

    /// A connection that had been opened is gone (closed by either side, or failed).
    pub fn on_close(&mut self, f: impl FnMut(&mut Context, ConnId) + 'static) -> &mut Self {
        self.hooks.on_close = Some(Box::new(f));
        self
    }

    /// A connection failed: protocol violation, bad UTF-8, oversize, socket error or a hook
    /// panic. `on_close` follows.
    pub fn on_error(
        &mut self,
        f: impl FnMut(&mut Context, ConnId, &ConnError) + 'static,
    ) -> &mut Self {
        self.hooks.on_error = Some(Box::new(f));
        self
    }

    /// A connection's send queue reached half of `max_send_buffer`: the client reads slower
    /// than the app writes. Pause producing for it until `on_buffer_drain`, and nothing is
    /// lost (Workerman's `onBufferFull`).
    pub fn on_buffer_full(&mut self, f: impl FnMut(&mut Context, ConnId) + 'static) -> &mut Self {
        self.hooks.on_buffer_full = Some(Box::new(f));
        self
    }

    /// The send queue of a connection that was full is empty again (`onBufferDrain`).
    pub fn on_buffer_drain(&mut self, f: impl FnMut(&mut Context, ConnId) + 'static) -> &mut Self {
        self.hooks.on_buffer_drain = Some(Box::new(f));
        self
    }

    /// Another worker of the group sent this worker `data` with [`Context::bus_send`] or
    /// [`Context::bus_send_all`]; `from` names it.
    pub fn on_bus_message(
        &mut self,
        f: impl FnMut(&mut Context, WorkerAddr, Bytes) + 'static,
    ) -> &mut Self {
        self.hooks.on_bus_message = Some(Box::new(f));
        self
    }

    /// Runs when the worker is told to stop, before clients are closed.
    pub fn on_worker_stop(&mut self, f: impl FnMut(&mut Context) + 'static) -> &mut Self {
        self.hooks.on_worker_stop = Some(Box::new(f));
        self
    }

    /// Lets a reload (or a binary upgrade) move this group's open connections to the new
    /// workers instead of closing them: the socket, its protocol state, its user and topics
    /// travel, and this hook gives the bytes that stand for the app's own state of `conn`
    /// (empty when it keeps none). The new worker's [`Worker::on_adopt`] gets them back. A group
    /// without this hook closes its clients with 1001 on a reload, as Workerman does.
    ///
    /// ```no_run
    /// struct Name(String);
    /// let mut worker = wsd::Worker::new("websocket://0.0.0.0:2346");
    /// worker.on_handoff(|ctx, conn| {
    ///     ctx.state::<Name>(conn).map(|n| n.0.clone().into_bytes()).unwrap_or_default()
    /// });
    /// worker.on_adopt(|ctx, conn, bytes| {
    ///     ctx.set_state(conn, Name(String::from_utf8_lossy(bytes).into_owned()));
    /// });
    /// ```
    ///
    /// It runs between two loop turns, after the connection's last message here. A panic in it
    /// keeps the connection in this worker, closed with 1001 like the others.
    pub fn on_handoff(
        &mut self,
        f: impl FnMut(&mut Context, ConnId) -> Vec<u8> + 'static,
    ) -> &mut Self {
        self.hooks.on_handoff = Some(Box::new(f));
        self
    }

    /// A connection handed over by the worker this one replaces, with the bytes its
    /// [`Worker::on_handoff`] gave. Called instead of `on_connect`, before the connection's
    /// next message; `conn` is its id in this worker.
    pub fn on_adopt(&mut self, f: impl FnMut(&mut Context, ConnId, &[u8]) + 'static) -> &mut Self {
        self.hooks.on_adopt = Some(Box::new(f));
        self
    }

    /// The group's settings.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }
}

/// `worker.count = 4`, `worker.name = ...`: the settings read like Workerman's properties.
impl Deref for Worker {
    type Target = GroupConfig;
    fn deref(&self) -> &GroupConfig {
        &self.config
    }
}

impl DerefMut for Worker {
    fn deref_mut(&mut self) -> &mut GroupConfig {
        &mut self.config
    }
}
