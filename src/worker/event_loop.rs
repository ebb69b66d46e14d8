//! The worker's single-threaded event loop: one `mio::Poll`, no locks, no task per connection.
//!
//! Each turn: wait for readiness or the next timer → accept until the listener would block →
//! drive each ready connection (handshake, then read every frame available and call
//! `on_message` for each) → run due timers → during a stop, send the Closes whose turn has
//! come → remove connections that ended (`on_close`) → flush every connection that has
//! output, once. Batching the flush is what lets pipelined clients get many replies per write
//! syscall.

use super::channel::Channel;
use super::conn::{Conn, Flushed};
use super::context::BufferNotice;
use super::message::{ConnError, ConnId};
use super::stop::CloseSpread;
use super::{Context, Hooks, Worker};
use crate::control::{FromWorker, StopMode, ToWorker};
use crate::proto::handshake::{self, Reject, Request};
use crate::proto::{Limits, Step};
use crate::sys;
use mio::net::{TcpListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const CHANNEL: Token = Token(1);
const SIGNALS: Token = Token(2);
const CONN_BASE: usize = 16;

/// Reads from one connection before others get a turn.
const READ_BUDGET: usize = 16;
/// How often the worker reports its counters and sweeps deadlines.
const TICK: Duration = Duration::from_secs(1);

struct Loop {
    poll: Poll,
    listener: Option<TcpListener>,
    channel: Channel,
    signals: SignalFd,
    hooks: Hooks,
    ctx: Context,
    settings: crate::config::GroupConfig,
    limits: Limits,
    /// The read buffer every connection shares: bytes go from here into the protocol state
    /// at once, so no connection keeps a buffer of its own.
    scratch: Vec<u8>,
    /// What the protocol asked of the loop for the connection being read.
    steps: VecDeque<Step>,
    /// Connections per client address (only when `max_connections_per_ip` is set).
    per_ip: HashMap<IpAddr, usize>,
    next_serial: u32,
    /// Connections whose read budget ran out with data still buffered.
    again: Vec<usize>,
    /// The listener is not being drained: at `max_connections`, or out of descriptors.
    accept_paused: bool,
    accept_retry_at: Option<Instant>,
    next_tick: Instant,
    /// How the worker is stopping, once told to.
    stopping: Option<StopMode>,
    /// The connections still to be sent Close 1001 by a `StopMode::Close` stop.
    spread: Option<CloseSpread>,
}

/// The close reason of every stop.
const SHUTTING_DOWN: &str = "server shutting down";

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
        let limits = Limits {
            max_frame: settings.max_frame_size,
            max_message: settings.max_message_size,
        };
        Ok(Loop {
            poll,
            listener: Some(listener),
            channel: Channel::new(channel),
            signals,
            hooks,
            ctx: Context::new(slot, &settings),
            scratch: vec![0; settings.read_buffer_size],
            settings,
            limits,
            steps: VecDeque::new(),
            per_ip: HashMap::new(),
            next_serial: 0,
            again: Vec::new(),
            accept_paused: false,
            accept_retry_at: None,
            next_tick: Instant::now() + TICK,
            stopping: None,
            spread: None,
        })
    }

    fn run(&mut self) -> i32 {
        self.call_worker_hook("on_worker_start", |h| h.on_worker_start.as_mut());
        self.channel.answer(&FromWorker::Ready);
        self.report();
        let mut events = Events::with_capacity(1024);
        loop {
            if self.finished() {
                return self.exit();
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
                            self.channel.flush();
                        }
                        if ev.is_readable() && !self.read_channel() {
                            log::warn!("master channel closed; stopping");
                            self.stop(StopMode::Close, Duration::ZERO);
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
            // A fast stop does not run the rest of the turn (timers, hooks).
            if self.stopping == Some(StopMode::Fast) {
                return self.exit();
            }
            for idx in std::mem::take(&mut self.again) {
                self.read_conn(idx);
            }
            self.run_timers();
            self.deliver_notices();
            self.close_due();
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
        if !self.again.is_empty()
            || !self.ctx.dirty.is_empty()
            || !self.ctx.gone.is_empty()
            || !self.ctx.notices.is_empty()
        {
            return Duration::ZERO;
        }
        let mut until = self.next_tick;
        if let Some(t) = self.ctx.timers.next_deadline() {
            until = until.min(t);
        }
        if let Some(t) = self.accept_retry_at {
            until = until.min(t);
        }
        if let Some(t) = self.spread.as_ref().and_then(CloseSpread::next_due) {
            until = until.min(t);
        }
        until.saturating_duration_since(Instant::now())
    }

    // ---- accept -------------------------------------------------------------------------

    fn accept(&mut self) {
        loop {
            if self.ctx.conns.len() >= self.settings.max_connections {
                self.accept_paused = true;
                return;
            }
            let Some(listener) = &self.listener else {
                return;
            };
            match listener.accept() {
                Ok((mut stream, peer)) => {
                    let counted_ip = match self.admit_peer(peer) {
                        Ok(counted) => counted,
                        Err(()) => {
                            log::debug!("{peer}: over max_connections_per_ip; dropped");
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    self.next_serial = self.next_serial.wrapping_add(1).max(1);
                    let entry = self.ctx.conns.vacant_entry();
                    let token = Token(CONN_BASE + entry.key());
                    if let Err(e) = self.poll.registry().register(
                        &mut stream,
                        token,
                        Interest::READABLE | Interest::WRITABLE,
                    ) {
                        log::warn!("cannot register connection from {peer}: {e}");
                        release_ip(&mut self.per_ip, counted_ip);
                        continue;
                    }
                    let mut conn = Conn::new(
                        self.next_serial,
                        stream,
                        peer,
                        self.limits,
                        self.settings.max_header_bytes,
                    );
                    conn.counted_ip = counted_ip;
                    entry.insert(conn);
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
                    // Logged once per episode, not on every retry.
                    if !self.accept_paused {
                        log::warn!("accept: {e}; pausing accepts, retrying every 100 ms");
                    }
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

    /// Counts a new peer against `max_connections_per_ip`. `Ok(Some(ip))`: counted;
    /// `Ok(None)`: not counted (no limit, or a trusted proxy whose clients are counted once
    /// their forwarded address is known); `Err`: over the limit.
    fn admit_peer(&mut self, peer: SocketAddr) -> Result<Option<IpAddr>, ()> {
        let ip = peer.ip();
        if self
            .settings
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&ip))
        {
            return Ok(None);
        }
        self.admit_ip(ip)
    }

    fn admit_ip(&mut self, ip: IpAddr) -> Result<Option<IpAddr>, ()> {
        let limit = self.settings.max_connections_per_ip;
        if limit == 0 {
            return Ok(None);
        }
        let n = self.per_ip.entry(ip).or_insert(0);
        if *n >= limit {
            return Err(());
        }
        *n += 1;
        Ok(Some(ip))
    }

    fn conn_ready(&mut self, idx: usize, readable: bool, writable: bool) {
        if writable {
            self.flush_conn(idx);
        }
        if readable {
            self.read_conn(idx);
        }
    }

    /// Reads what the client sent (up to the budget) and acts on each step it yields.
    ///
    /// Back-pressure: while the connection's send queue is at or over half of
    /// `max_send_buffer`, it is not read; the flush that empties the queue resumes reading.
    /// So a client that sends but never reads (echo floods, Ping floods) is held by TCP flow
    /// control instead of by the worker's memory.
    fn read_conn(&mut self, idx: usize) {
        let high_water = super::context::high_water(self.settings.max_send_buffer);
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.ctx.conns.get_mut(idx) else {
                return;
            };
            if conn.session.out.len() >= high_water {
                conn.reads_paused = true;
                return;
            }
            let serial = conn.serial;
            match conn.read(&mut self.scratch) {
                Ok(0) => {
                    self.ctx.mark_gone(idx);
                    return;
                }
                Ok(n) => {
                    conn.last_input = Instant::now();
                    // A failed connection's input is read only to be discarded.
                    conn.session.read(&self.scratch[..n], &mut self.steps);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.ctx.mark_gone(idx);
                    return;
                }
            }
            self.dispatch(idx, serial);
            if let Some(c) = self.ctx.conns.get(idx)
                && c.serial == serial
                && (!c.session.out.is_empty() || c.session.close_received || c.session.failed)
            {
                self.ctx.mark_dirty(idx);
            }
        }
        self.again.push(idx);
    }

    /// Acts on the protocol's steps for one connection, in order.
    fn dispatch(&mut self, idx: usize, serial: u32) {
        let id = ConnId {
            serial,
            idx: idx as u32,
        };
        while let Some(step) = self.steps.pop_front() {
            if self.ctx.conns.get(idx).is_none_or(|c| c.serial != serial) {
                self.steps.clear();
                return;
            }
            if matches!(step, Step::Closed(_) | Step::Failed(_)) {
                self.ctx.conns[idx].session.answer(&step);
            }
            let conn = &self.ctx.conns[idx];
            match step {
                Step::Request(request) => self.upgrade(id, request),
                // The app may have closed the connection while handling an earlier message.
                Step::Message(_) if !conn.session.can_send() => {}
                Step::Message(msg) => {
                    let traffic = &mut self.ctx.conns[idx].traffic;
                    traffic.messages_in += 1;
                    traffic.bytes_in += msg.len() as u64;
                    self.ctx.counters.total_request += 1;
                    self.ctx.counters.bytes_in += msg.len() as u64;
                    self.call_conn_hook(id, "on_message", |h, ctx| {
                        if let Some(f) = h.on_message.as_mut() {
                            f(ctx, id, msg)
                        }
                    });
                }
                Step::Closed(frame) => {
                    log::debug!("connection {id} closed by the client: {frame:?}")
                }
                Step::Failed(e) => {
                    let err = ConnError::from(e);
                    log::debug!("connection {id} from {}: {err}", conn.remote);
                    self.call_error_hook(id, &err);
                }
                Step::Rejected(r) => {
                    log::debug!(
                        "refused upgrade from {}: {} {}",
                        conn.remote,
                        r.status,
                        r.why
                    )
                }
            }
        }
    }

    /// Decides on a valid upgrade request: origin, per-address limit, then `101` and
    /// `on_connect`.
    fn upgrade(&mut self, id: ConnId, request: Request) {
        let idx = id.idx as usize;
        let peer = self.ctx.conns[idx].remote.ip();
        let ip = handshake::client_ip(peer, &request, &self.settings.trusted_proxies);
        let mut refusal = None;
        if !handshake::origin_allowed(request.origin.as_deref(), &self.settings.allowed_origins) {
            refusal = Some(Reject {
                status: 403,
                why: "origin not allowed",
            });
        } else if self.ctx.conns[idx].counted_ip.is_none() && ip != peer {
            // Through a trusted proxy: count the forwarded client now.
            match self.admit_ip(ip) {
                Ok(counted) => self.ctx.conns[idx].counted_ip = counted,
                Err(()) => {
                    refusal = Some(Reject {
                        status: 429,
                        why: "too many connections from this address",
                    })
                }
            }
        }
        let conn = &mut self.ctx.conns[idx];
        if ip != peer {
            conn.remote = SocketAddr::new(ip, 0);
        }
        if let Some(r) = refusal {
            log::debug!(
                "refused upgrade from {}: {} {}",
                conn.remote,
                r.status,
                r.why
            );
            conn.session.reject(r);
            self.ctx.mark_dirty(idx);
            return;
        }
        conn.session.accept(&request, &mut self.steps);
        conn.path = request.path;
        self.ctx.counters.connections += 1;
        self.ctx.mark_dirty(idx);
        self.call_conn_hook(id, "on_connect", |h, ctx| {
            if let Some(f) = h.on_connect.as_mut() {
                f(ctx, id)
            }
        });
        // Upgraded during a stop that closes clients: the app met it like any other, and it
        // is closed like the others.
        if self.stopping >= Some(StopMode::Close) {
            self.close_when_due(id);
        }
    }

    /// A hook panicked on `id`: close it with 1011 and tell `on_error`.
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
        conn.session.fail(err.close_code(), "internal error");
        self.ctx.mark_dirty(idx);
        self.call_error_hook(id, &err);
    }

    fn call_error_hook(&mut self, id: ConnId, err: &ConnError) {
        self.call_conn_hook(id, "on_error", |h, ctx| {
            if let Some(f) = h.on_error.as_mut() {
                f(ctx, id, err)
            }
        });
    }

    fn flush_conn(&mut self, idx: usize) {
        let Some(conn) = self.ctx.conns.get_mut(idx) else {
            return;
        };
        let flushed = conn.flush();
        if matches!(flushed, Flushed::All) && std::mem::take(&mut conn.reads_paused) {
            self.again.push(idx);
        }
        match flushed {
            Flushed::Done => self.ctx.mark_gone(idx),
            Flushed::Partly => {}
            Flushed::All if conn.buffer_full => {
                conn.buffer_full = false;
                let id = ConnId {
                    serial: conn.serial,
                    idx: idx as u32,
                };
                self.call_conn_hook(id, "on_buffer_drain", |h, ctx| {
                    if let Some(f) = h.on_buffer_drain.as_mut() {
                        f(ctx, id)
                    }
                });
            }
            Flushed::All => {}
        }
    }

    /// Tells the app about send queues that filled up during the hooks that just ran.
    fn deliver_notices(&mut self) {
        while !self.ctx.notices.is_empty() {
            for notice in std::mem::take(&mut self.ctx.notices) {
                let BufferNotice::Full(id) = notice;
                if self.ctx.buffered_amount(id).is_some() {
                    self.call_conn_hook(id, "on_buffer_full", |h, ctx| {
                        if let Some(f) = h.on_buffer_full.as_mut() {
                            f(ctx, id)
                        }
                    });
                }
            }
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
                release_ip(&mut self.per_ip, conn.counted_ip);
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

    /// Once a second: drop handshakes and closes that overran their deadlines, ping quiet
    /// clients, and close the ones that stayed silent past `idle_timeout`.
    fn sweep(&mut self, now: Instant) {
        let s = &self.settings;
        let (handshake, close) = (s.handshake_timeout, s.close_timeout);
        let (ping, idle) = (s.ping_interval, s.idle_timeout);
        for (idx, c) in self.ctx.conns.iter_mut() {
            if c.session.close_sent && c.closing_since.is_none() {
                c.closing_since = Some(now);
            }
            let late = match c.closing_since {
                Some(t) => now.duration_since(t) >= close,
                None => !c.is_open() && now.duration_since(c.since) >= handshake,
            };
            if late {
                self.ctx.gone.push((idx, c.serial));
                continue;
            }
            if !c.session.can_send() {
                continue;
            }
            let quiet = now.duration_since(c.last_input);
            if !idle.is_zero() && quiet >= idle {
                log::debug!("connection {} from {}: idle timeout", c.serial, c.remote);
                c.session.close(1001, "idle timeout");
            } else if !ping.is_zero()
                && quiet >= ping
                && c.pinged_at
                    .is_none_or(|t| t < c.last_input || now.duration_since(t) >= ping)
            {
                c.session.ping();
                c.pinged_at = Some(now);
            } else {
                continue;
            }
            if !c.dirty {
                c.dirty = true;
                self.ctx.dirty.push(idx);
            }
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

    /// Stops the worker, or makes a stop under way stronger (Drain → Close → Fast); a stop no
    /// stronger than the current one is ignored.
    ///
    /// The first stop stops accepting and calls `on_worker_stop`. Then `Drain` waits for the
    /// clients to leave, `Close` sends them Close 1001 spread over `spread` and waits for the
    /// closing handshakes (each bounded by `close_timeout`), and `Fast` sends Close 1001, writes
    /// once what each socket takes, and the loop exits without waiting for answers.
    fn stop(&mut self, mode: StopMode, spread: Duration) {
        if let Some(current) = self.stopping
            && current >= mode
        {
            log::debug!("already stopping ({current:?}); {mode:?} ignored");
            return;
        }
        let clients = self.ctx.connections().len();
        match mode {
            StopMode::Drain => {
                log::info!("stopping (waiting for clients to leave; {clients} connected)")
            }
            StopMode::Close => log::info!(
                "stopping (closing {clients} clients over {} ms)",
                spread.as_millis()
            ),
            StopMode::Fast => log::info!("stopping fast (closing {clients} clients, no waiting)"),
        }
        let first = self.stopping.is_none();
        self.stopping = Some(mode);
        if first {
            // Only our copy of the listening socket goes, and it is not shut down: the master
            // keeps the socket, and in a rolling reload the new worker accepts from it.
            if let Some(mut listener) = self.listener.take() {
                let _ = self.poll.registry().deregister(&mut listener);
            }
            self.call_worker_hook("on_worker_stop", |h| h.on_worker_stop.as_mut());
        }
        // Connections still in their upgrade are left to finish it (see `upgrade`): a client
        // caught mid-handshake by a reload gets a Close, not a reset.
        let open = self.ctx.connections();
        match mode {
            StopMode::Drain => {}
            StopMode::Close => {
                self.spread = Some(CloseSpread::new(Instant::now(), spread, open));
                self.close_due();
            }
            StopMode::Fast => {
                self.spread = None;
                for id in open {
                    self.ctx.close_with(id, 1001, SHUTTING_DOWN);
                }
                for (_, conn) in self.ctx.conns.iter_mut() {
                    let _ = conn.flush();
                }
            }
        }
    }

    /// Sends Close 1001 to the connections whose turn in the stop's spread has come.
    fn close_due(&mut self) {
        let Some(spread) = &mut self.spread else {
            return;
        };
        for id in spread.take_due(Instant::now()) {
            self.ctx.close_with(id, 1001, SHUTTING_DOWN);
        }
    }

    /// Closes a connection that completed its upgrade during a stop that closes clients: in
    /// its turn of the spread, or at once.
    fn close_when_due(&mut self, id: ConnId) {
        match &mut self.spread {
            Some(spread) => {
                spread.join(id);
                self.close_due();
            }
            None => self.ctx.close_with(id, 1001, SHUTTING_DOWN),
        }
    }

    /// Whether the loop is done: a fast stop at once, the others when no connection is left.
    fn finished(&self) -> bool {
        match self.stopping {
            None => false,
            Some(StopMode::Fast) => true,
            Some(StopMode::Drain | StopMode::Close) => self.ctx.conns.is_empty(),
        }
    }

    /// Leaves the loop: a last report, written if the channel takes it now.
    fn exit(&mut self) -> i32 {
        match self.ctx.conns.len() {
            0 => log::info!("no connections left; exiting"),
            n => log::info!("exiting with {n} connections not closed yet (fast stop)"),
        }
        self.report();
        self.channel.flush();
        0
    }

    fn read_signals(&mut self) {
        while let Ok(Some(info)) = self.signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                // Someone signalled this worker directly (the master tells it over the channel).
                Ok(Signal::SIGTERM) => self.stop(StopMode::Close, Duration::ZERO),
                // Ctrl-C reaches the whole process group; the master decides what happens.
                Ok(sig) => log::debug!("ignoring {sig}"),
                Err(_) => {}
            }
        }
    }

    /// Reads commands from the master. False when the master has gone.
    fn read_channel(&mut self) -> bool {
        let (commands, open) = self.channel.read();
        for (command, fd) in commands {
            match command {
                ToWorker::Stop { mode, spread_ms } => {
                    self.stop(mode, Duration::from_millis(spread_ms))
                }
                ToWorker::ListConnections { query } => self.list_connections(query),
                ToWorker::ReopenLogs => reopen_logs(fd),
            }
        }
        open
    }

    /// Every connection in the slab, handshaking and closing ones included.
    fn list_connections(&mut self, query: u64) {
        let now = Instant::now();
        let rows = self.ctx.conns.iter().map(|(idx, c)| {
            let id = ConnId {
                serial: c.serial,
                idx: idx as u32,
            };
            c.info(id, now)
        });
        self.channel.answer_connections(query, rows);
    }

    fn report(&mut self) {
        self.ctx.counters.timers = self.ctx.timers.len() as u64;
        self.ctx.counters.memory = sys::rss_bytes();
        self.ctx.counters.send_queue = self
            .ctx
            .conns
            .iter()
            .map(|(_, c)| c.session.out.len() as u64)
            .sum();
        self.channel
            .report(&FromWorker::Report(self.ctx.counters.clone()));
    }
}

/// Points stdout and stderr (where the log goes) at the log file the master reopened; the
/// worker may no longer have the right to open it itself. Our copy of the descriptor is
/// closed once duplicated.
fn reopen_logs(fd: Option<OwnedFd>) {
    let Some(fd) = fd else {
        log::warn!("reopen_logs came without a descriptor; logging on to the old file");
        return;
    };
    match sys::redirect_output(fd.as_raw_fd()) {
        Ok(()) => log::info!("reopened log file"),
        Err(e) => log::warn!("cannot reopen log file: {e}"),
    }
}

/// Gives back a connection's place in `max_connections_per_ip`.
fn release_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: Option<IpAddr>) {
    if let Some(ip) = ip
        && let Some(n) = per_ip.get_mut(&ip)
    {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}
