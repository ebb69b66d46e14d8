//! The worker's single-threaded event loop: one `mio::Poll`, no locks, no task per connection.
//!
//! Each turn: wait for readiness or the next timer → accept until the listener would block →
//! drive each ready connection (handshake, then read every frame available and call
//! `on_message` for each) → run due timers → remove connections that ended (`on_close`) →
//! flush every connection that has output, once. Batching the flush is what lets pipelined
//! clients get many replies per write syscall.

use super::conn::{Conn, HandshakeStep};
use super::message::{ConnError, ConnId, Message};
use super::{Context, Hooks, Worker};
use crate::control::{self, FromWorker, LineReader, ToWorker};
use crate::sys;
use mio::net::{TcpListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use std::cell::RefCell;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::protocol::frame::coding::CloseCode;

const LISTENER: Token = Token(0);
const CHANNEL: Token = Token(1);
const SIGNALS: Token = Token(2);
const CONN_BASE: usize = 16;

/// Frames read from one connection before others get a turn.
const READ_BUDGET: usize = 256;
/// How often the worker reports its counters and sweeps deadlines.
const TICK: Duration = Duration::from_secs(1);

struct Loop {
    poll: Poll,
    listener: Option<TcpListener>,
    channel: UnixStream,
    channel_in: LineReader,
    channel_out: Vec<u8>,
    signals: SignalFd,
    hooks: Hooks,
    ctx: Context,
    settings: crate::config::GroupConfig,
    ws_config: WebSocketConfig,
    /// Upgrade request path, handed from the handshake callback to the connection.
    seen_path: Rc<RefCell<String>>,
    next_serial: u32,
    /// Connections whose read budget ran out with data still buffered.
    again: Vec<usize>,
    /// The listener is not being drained: at `max_connections`, or out of descriptors.
    accept_paused: bool,
    accept_retry_at: Option<Instant>,
    next_tick: Instant,
    stopping: Option<Stop>,
}

#[derive(Clone, Copy, PartialEq)]
enum Stop {
    /// Clients were sent Close 1001.
    Closing,
    /// Waiting for clients to leave by themselves (`stop -g`).
    Draining,
}

/// Runs worker `slot` of `worker` until it is told to stop. Returns the exit code.
pub(crate) fn run(
    worker: Worker,
    slot: usize,
    listener: std::net::TcpListener,
    channel: std::os::unix::net::UnixStream,
) -> i32 {
    match Loop::new(worker, slot, listener, channel) {
        Ok(mut l) => l.run(),
        Err(e) => {
            log::error!("worker setup failed: {e}");
            2
        }
    }
}

impl Loop {
    fn new(
        worker: Worker,
        slot: usize,
        listener: std::net::TcpListener,
        channel: std::os::unix::net::UnixStream,
    ) -> io::Result<Loop> {
        let Worker {
            config: settings,
            hooks,
        } = worker;
        listener.set_nonblocking(true)?;
        channel.set_nonblocking(true)?;
        let poll = Poll::new()?;
        let mut listener = TcpListener::from_std(listener);
        let mut channel = UnixStream::from_std(channel);
        let signals = sys::signal_fd()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry().register(
            &mut channel,
            CHANNEL,
            Interest::READABLE | Interest::WRITABLE,
        )?;
        poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        let ws_config = WebSocketConfig::default()
            .read_buffer_size(settings.read_buffer_size)
            .write_buffer_size(settings.write_buffer_size)
            .max_write_buffer_size(settings.max_send_buffer)
            .max_message_size(Some(settings.max_message_size))
            .max_frame_size(Some(settings.max_frame_size));
        Ok(Loop {
            poll,
            listener: Some(listener),
            channel,
            channel_in: LineReader::default(),
            channel_out: Vec::new(),
            signals,
            hooks,
            ctx: Context::new(slot, settings.name().to_string()),
            settings,
            ws_config,
            seen_path: Rc::default(),
            next_serial: 0,
            again: Vec::new(),
            accept_paused: false,
            accept_retry_at: None,
            next_tick: Instant::now() + TICK,
            stopping: None,
        })
    }

    fn run(&mut self) -> i32 {
        self.call_worker_hook("on_worker_start", |h| h.on_worker_start.as_mut());
        self.tell_master(&FromWorker::Ready);
        self.report();
        let mut events = Events::with_capacity(1024);
        loop {
            if self.stopping.is_some() && self.ctx.conns.is_empty() {
                self.report();
                self.flush_channel();
                return 0;
            }
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("poll failed: {e}");
                return 1;
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    CHANNEL => {
                        if ev.is_writable() {
                            self.flush_channel();
                        }
                        if ev.is_readable() && !self.read_channel() {
                            log::warn!("master channel closed; stopping");
                            self.stop(false);
                        }
                    }
                    SIGNALS => self.read_signals(),
                    Token(t) => self.conn_ready(
                        t - CONN_BASE,
                        ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                        ev.is_writable(),
                    ),
                }
            }
            for idx in std::mem::take(&mut self.again) {
                self.read_conn(idx);
            }
            self.run_timers();
            self.reap();
            self.flush_dirty();
            self.reap();
            let now = Instant::now();
            if now >= self.next_tick {
                self.next_tick = now + TICK;
                self.sweep(now);
                self.report();
            }
            if self.accept_retry_at.is_some_and(|at| now >= at) {
                self.accept_retry_at = None;
                self.accept();
            }
        }
    }

    fn poll_timeout(&self) -> Duration {
        if !self.again.is_empty() || !self.ctx.dirty.is_empty() || !self.ctx.gone.is_empty() {
            return Duration::ZERO;
        }
        let mut until = self.next_tick;
        if let Some(t) = self.ctx.timers.next_deadline() {
            until = until.min(t);
        }
        if let Some(t) = self.accept_retry_at {
            until = until.min(t);
        }
        until.saturating_duration_since(Instant::now())
    }

    // ---- accept -------------------------------------------------------------------------

    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            if self.ctx.conns.len() >= self.settings.max_connections {
                self.accept_paused = true;
                return;
            }
            match listener.accept() {
                Ok((stream, remote)) => {
                    let _ = stream.set_nodelay(true);
                    self.next_serial = self.next_serial.wrapping_add(1).max(1);
                    let entry = self.ctx.conns.vacant_entry();
                    let mut stream = stream;
                    let token = Token(CONN_BASE + entry.key());
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register connection from {remote}: {e}");
                        continue;
                    }
                    entry.insert(Conn::new(
                        self.next_serial,
                        stream,
                        remote,
                        self.ws_config,
                        &self.seen_path,
                    ));
                    self.ctx.counters.accepted += 1;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_paused = false;
                    return;
                }
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    // Out of descriptors: the pending client stays queued; retry shortly
                    // instead of spinning on a listener that stays readable.
                    log::warn!("accept: {e}; pausing accepts for 100 ms");
                    self.accept_paused = true;
                    self.accept_retry_at = Some(Instant::now() + Duration::from_millis(100));
                    return;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    log::warn!("accept: {e}");
                    return;
                }
            }
        }
    }

    // ---- connections --------------------------------------------------------------------

    fn conn_ready(&mut self, idx: usize, readable: bool, writable: bool) {
        let Some(conn) = self.ctx.conns.get_mut(idx) else {
            return;
        };
        if !conn.is_open() {
            match conn.drive_handshake(&self.seen_path) {
                HandshakeStep::Pending => return,
                HandshakeStep::Failed(why) => {
                    log::debug!("handshake from {} failed: {why}", conn.remote);
                    self.ctx.mark_gone(idx);
                    return;
                }
                HandshakeStep::Done => {
                    let id = ConnId {
                        serial: conn.serial,
                        idx: idx as u32,
                    };
                    self.ctx.counters.connections += 1;
                    if self.stopping == Some(Stop::Closing) {
                        self.ctx.close_with(id, 1001, "server shutting down");
                        return;
                    }
                    self.call_conn_hook(id, "on_connect", |h, ctx| {
                        if let Some(f) = h.on_connect.as_mut() {
                            f(ctx, id)
                        }
                    });
                    // Frames may have arrived with the upgrade request.
                    self.read_conn(idx);
                    return;
                }
            }
        }
        if writable {
            self.flush_conn(idx);
        }
        if readable {
            self.read_conn(idx);
        }
    }

    /// Reads every frame available (up to the budget) and hands messages to `on_message`.
    fn read_conn(&mut self, idx: usize) {
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.ctx.conns.get_mut(idx) else {
                return;
            };
            let serial = conn.serial;
            if conn.failed {
                if conn.drain() {
                    self.ctx.mark_gone(idx);
                }
                return;
            }
            let Some(ws) = conn.ws() else { return };
            let msg = match ws.read() {
                Ok(tungstenite::Message::Text(t)) => Message::Text(t),
                Ok(tungstenite::Message::Binary(b)) => Message::Binary(b),
                Ok(_) => {
                    // Ping, pong or close: tungstenite queued any reply; flush it this turn.
                    self.ctx.mark_dirty(idx);
                    continue;
                }
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    let id = ConnId {
                        serial,
                        idx: idx as u32,
                    };
                    match ConnError::from_read(e) {
                        None => self.ctx.mark_gone(idx),
                        Some(err) => self.fail(id, err),
                    }
                    return;
                }
            };
            if conn.closing_since.is_some() {
                continue; // We are closing: late messages are dropped.
            }
            self.ctx.counters.total_request += 1;
            self.ctx.counters.bytes_in += msg.len() as u64;
            let id = ConnId {
                serial,
                idx: idx as u32,
            };
            self.call_conn_hook(id, "on_message", |h, ctx| {
                if let Some(f) = h.on_message.as_mut() {
                    f(ctx, id, msg)
                }
            });
        }
        self.again.push(idx);
    }

    /// Fails a connection: `on_error`, our close code out, then wait for the client to go.
    fn fail(&mut self, id: ConnId, err: ConnError) {
        let idx = id.idx as usize;
        let Some(conn) = self
            .ctx
            .conns
            .get_mut(idx)
            .filter(|c| c.serial == id.serial)
        else {
            return;
        };
        log::debug!("connection {id} from {}: {err}", conn.remote);
        let alive = conn.fail(&err);
        if alive {
            self.ctx.mark_dirty(idx)
        } else {
            self.ctx.mark_gone(idx)
        }
        self.call_conn_hook(id, "on_error", |h, ctx| {
            if let Some(f) = h.on_error.as_mut() {
                f(ctx, id, &err)
            }
        });
    }

    fn flush_conn(&mut self, idx: usize) {
        let Some(conn) = self.ctx.conns.get_mut(idx) else {
            return;
        };
        if conn.flush().is_err() {
            self.ctx.mark_gone(idx);
        }
    }

    fn flush_dirty(&mut self) {
        for idx in std::mem::take(&mut self.ctx.dirty) {
            if let Some(conn) = self.ctx.conns.get_mut(idx) {
                conn.dirty = false;
                self.flush_conn(idx);
            }
        }
    }

    /// Removes connections that ended this turn and tells the app.
    fn reap(&mut self) {
        while !self.ctx.gone.is_empty() {
            for (idx, serial) in std::mem::take(&mut self.ctx.gone) {
                if self.ctx.conns.get(idx).is_none_or(|c| c.serial != serial) {
                    continue; // Already removed (listed twice).
                }
                let conn = self.ctx.conns.remove(idx);
                if conn.is_open() {
                    self.ctx.counters.connections -= 1;
                    let id = ConnId {
                        serial,
                        idx: idx as u32,
                    };
                    drop(conn); // Close the socket before the app hears of it.
                    self.call_conn_hook(id, "on_close", |h, ctx| {
                        if let Some(f) = h.on_close.as_mut() {
                            f(ctx, id)
                        }
                    });
                }
            }
            if self.accept_paused && self.accept_retry_at.is_none() {
                self.accept();
            }
        }
    }

    /// Once a second: drop handshakes and closes that overran their deadlines.
    fn sweep(&mut self, now: Instant) {
        let handshake = self.settings.handshake_timeout;
        let close = self.settings.close_timeout;
        let late: Vec<usize> = self
            .ctx
            .conns
            .iter()
            .filter(|(_, c)| match c.closing_since {
                Some(t) => now.duration_since(t) >= close,
                None => !c.is_open() && now.duration_since(c.since) >= handshake,
            })
            .map(|(idx, _)| idx)
            .collect();
        for idx in late {
            self.ctx.mark_gone(idx);
        }
        self.reap();
    }

    // ---- hooks and timers ---------------------------------------------------------------

    /// Calls a connection hook; a panic is logged and fails that connection only.
    fn call_conn_hook(&mut self, id: ConnId, name: &str, f: impl FnOnce(&mut Hooks, &mut Context)) {
        let (hooks, ctx) = (&mut self.hooks, &mut self.ctx);
        if catch_unwind(AssertUnwindSafe(|| f(hooks, ctx))).is_err() {
            log::error!("{name} hook panicked on connection {id}; closing it with 1011");
            if name != "on_close" {
                self.fail(id, ConnError::HookPanicked);
            }
        }
    }

    fn call_worker_hook(
        &mut self,
        name: &str,
        pick: impl FnOnce(&mut Hooks) -> Option<&mut super::WorkerHook>,
    ) {
        let Some(f) = pick(&mut self.hooks) else {
            return;
        };
        let ctx = &mut self.ctx;
        if catch_unwind(AssertUnwindSafe(|| f(ctx))).is_err() {
            log::error!("{name} hook panicked; the worker carries on");
        }
    }

    fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some((id, due, mut callback)) = self.ctx.timers.pop_due(now) {
            let ctx = &mut self.ctx;
            if catch_unwind(AssertUnwindSafe(|| callback(ctx))).is_err() {
                log::error!("timer {id:?} panicked; the worker carries on");
            }
            self.ctx.timers.finish(id, due, callback, now);
        }
    }

    // ---- stop, signals, master channel --------------------------------------------------

    /// Stops accepting and calls `on_worker_stop`; then either closes every client with 1001
    /// or (graceful) waits for them to leave.
    fn stop(&mut self, graceful: bool) {
        let mode = if graceful {
            Stop::Draining
        } else {
            Stop::Closing
        };
        if self.stopping.is_none() {
            log::info!(
                "stopping ({})",
                if graceful {
                    "waiting for clients to leave"
                } else {
                    "closing clients"
                }
            );
            if let Some(mut l) = self.listener.take() {
                let _ = self.poll.registry().deregister(&mut l);
            }
            self.call_worker_hook("on_worker_stop", |h| h.on_worker_stop.as_mut());
        }
        if self.stopping == Some(Stop::Closing) {
            return;
        }
        self.stopping = Some(mode);
        if mode == Stop::Closing {
            let idxs: Vec<usize> = self.ctx.conns.iter().map(|(i, _)| i).collect();
            for idx in idxs {
                let conn = &mut self.ctx.conns[idx];
                if !conn.is_open() {
                    self.ctx.mark_gone(idx);
                } else if conn.closing_since.is_none() {
                    if conn.start_close(CloseCode::Away, "server shutting down") {
                        self.ctx.mark_dirty(idx);
                    } else {
                        self.ctx.mark_gone(idx);
                    }
                }
            }
        }
    }

    fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGTERM) => self.stop(false),
                // Ctrl-C reaches the whole process group; the master decides what happens.
                Ok(sig) => log::debug!("ignoring {sig}"),
                Err(_) => {}
            }
        }
    }

    /// Reads commands from the master. False when the master has gone.
    fn read_channel(&mut self) -> bool {
        let (lines, closed) = self.channel_in.read_from(&mut self.channel);
        for line in lines {
            match serde_json::from_str::<ToWorker>(&line) {
                Ok(ToWorker::Stop { graceful }) => self.stop(graceful),
                Err(e) => log::warn!("bad command from master: {e}"),
            }
        }
        !closed
    }

    fn report(&mut self) {
        self.ctx.counters.timers = self.ctx.timers.len() as u64;
        self.ctx.counters.memory = sys::rss_bytes();
        let report = FromWorker::Report(self.ctx.counters.clone());
        self.tell_master(&report);
    }

    fn tell_master(&mut self, msg: &FromWorker) {
        // A stuck master must not stall the data path: past 64 KiB of backlog, reports drop.
        if self.channel_out.len() < 64 << 10 {
            self.channel_out.extend_from_slice(&control::line(msg));
        }
        self.flush_channel();
    }

    fn flush_channel(&mut self) {
        while !self.channel_out.is_empty() {
            match self.channel.write(&self.channel_out) {
                Ok(n) => {
                    self.channel_out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}
