//! The worker's single-threaded event loop: one `mio::Poll`, no locks, no task per connection.
//!
//! Each turn: wait for readiness or the next deadline (a timerfd, `alarm.rs`) → accept until
//! the listener would block, `ACCEPT_BATCH` at most (the rest after the next turn's events,
//! so a connect storm cannot hold up everyone else) → drive each ready connection
//! (handshake, then read every frame available and call `on_message` for each) → run due
//! timers → during a stop, send the Closes whose turn has come → remove connections that
//! ended (`on_close`) → flush every connection that has output, once (up to `FLUSH_BUDGET` a
//! turn, this turn's first; a backlog waits for the next turns). Batching the flush is what
//! lets pipelined clients get many replies per write syscall.
//!
//! This file is the loop and the data path through it. What the loop consults on the way
//! lives beside it, as more `impl Loop` blocks: who may connect (`admission.rs`), how a hook
//! is called (`hooks.rs`), the once-a-second deadlines and pings (`sweep.rs`), stopping
//! (`stop.rs`), and the master's commands and the counters sent back (`commands.rs`).

use super::admission::release_ip;
use super::alarm::Alarm;
use super::channel::Channel;
use super::conn::{Conn, Flushed};
use super::context::BufferNotice;
use super::errors::ConnError;
use super::read_buffers::ReadBuffers;
use super::stop::CloseSpread;
use super::{Context, Hooks, Worker};
use crate::ConnId;
use crate::bus::Bus;
use crate::control::{FromWorker, StopMode};
use crate::proto::handshake::{self, Request};
use crate::proto::{Limits, Step};
use crate::sys;
use mio::net::{TcpListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signalfd::SignalFd;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const CHANNEL: Token = Token(1);
const SIGNALS: Token = Token(2);
const ALARM: Token = Token(3);
const CONN_BASE: usize = 16;
/// Tokens of the bus ends to the other workers: `BUS_BASE + peer slot`, above any connection.
pub(super) const BUS_BASE: usize = 1 << 40;
/// The cluster bus's waker: messages from other hosts are waiting (`bus_events.rs`).
const CLUSTER: Token = Token(BUS_BASE - 1);

/// Reads from one connection before others get a turn.
const READ_BUDGET: usize = 16;
/// Connections written per turn. A broadcast to 10,000 local connections is ~10,000 writes
/// (tens of ms). Written this many a turn, with the connections listed this turn (replies to
/// what was just read) ahead of the backlog, the worker keeps reading and answering its
/// clients while a fan-out drains, instead of holding every reply back until it is done.
const FLUSH_BUDGET: usize = 256;
/// How often the worker reports its counters and sweeps deadlines.
const TICK: Duration = Duration::from_secs(1);
/// Clients accepted per turn at most. In a connect storm the rest wait in the listen queue
/// while this turn's events (the upgrades of those just accepted, the messages of everyone
/// else) are handled, so answers start going out at once instead of after the whole queue.
pub(super) const ACCEPT_BATCH: usize = 64;

pub(super) struct Loop {
    pub(super) poll: Poll,
    pub(super) listener: Option<TcpListener>,
    pub(super) channel: Channel,
    pub(super) signals: SignalFd,
    alarm: Alarm,
    pub(super) hooks: Hooks,
    pub(super) ctx: Context,
    pub(super) settings: crate::config::GroupConfig,
    limits: Limits,
    /// The read buffers every connection shares: bytes go from here into the protocol state
    /// at once, so no connection keeps a buffer of its own.
    pub(super) inbox: ReadBuffers,
    /// What the protocol asked of the loop for the connection being read.
    steps: VecDeque<Step>,
    /// Connections per client address (only when `max_connections_per_ip` is set).
    pub(super) per_ip: HashMap<IpAddr, usize>,
    next_serial: u32,
    /// Connections whose read budget ran out with data still buffered.
    again: Vec<usize>,
    /// An empty list with capacity, swapped with `again` or the dirty list while one is
    /// worked through: lists grown once are reused, not regrown from nothing every turn.
    spare: Vec<usize>,
    /// Connections listed with output in earlier turns and not written yet (over
    /// `FLUSH_BUDGET`), oldest first.
    backlog: VecDeque<usize>,
    /// Bus peers whose messages did not all fit in one turn's budget.
    pub(super) bus_again: Vec<usize>,
    /// The listener is not being drained: at `max_connections`, or out of descriptors.
    pub(super) accept_paused: bool,
    pub(super) accept_retry_at: Option<Instant>,
    /// The last accept stopped at `ACCEPT_BATCH` with clients still queued: the next turn
    /// accepts more once it has handled its events.
    accept_more: bool,
    next_tick: Instant,
    /// When this turn's poll returned: input is stamped with it, where a clock read per read
    /// would cost a vDSO call per message.
    turn_start: Instant,
    /// How the worker is stopping, once told to.
    pub(super) stopping: Option<StopMode>,
    /// When a stop that closes clients (`Close` or `Fast`) came.
    pub(super) closing_stop_at: Option<Instant>,
    /// The connections still to be sent Close 1001 by a `StopMode::Close` stop.
    pub(super) spread: Option<CloseSpread>,
}

/// Runs worker `slot` of `worker` until it is told to stop. Returns the exit code.
pub(crate) fn run(
    worker: Worker,
    slot: usize,
    listener: std::net::TcpListener,
    channel: std::os::unix::net::UnixStream,
    bus: Bus,
) -> i32 {
    match Loop::new(worker, slot, listener, channel, bus) {
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
        mut bus: Bus,
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
        let alarm = Alarm::new()?;
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
        poll.registry()
            .register(&mut SourceFd(&alarm.raw_fd()), ALARM, Interest::READABLE)?;
        for (peer, end) in bus.ends() {
            poll.registry().register(
                &mut SourceFd(&end.as_raw_fd()),
                Token(BUS_BASE + peer),
                Interest::READABLE,
            )?;
        }
        bus.start_cluster(poll.registry(), CLUSTER)?;
        let limits = Limits {
            max_frame: settings.max_frame_size,
            max_message: settings.max_message_size,
        };
        Ok(Loop {
            poll,
            listener: Some(listener),
            channel: Channel::new(channel),
            signals,
            alarm,
            hooks,
            ctx: Context::new(slot, &settings, bus),
            inbox: ReadBuffers::new(settings.read_buffer_size),
            settings,
            limits,
            steps: VecDeque::new(),
            per_ip: HashMap::new(),
            next_serial: 0,
            again: Vec::new(),
            spare: Vec::new(),
            backlog: VecDeque::new(),
            bus_again: Vec::new(),
            accept_paused: false,
            accept_retry_at: None,
            accept_more: false,
            next_tick: Instant::now() + TICK,
            turn_start: Instant::now(),
            stopping: None,
            closing_stop_at: None,
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
            if let Err(e) = self.poll.poll(&mut events, timeout)
                && e.kind() != io::ErrorKind::Interrupted
            {
                log::error!("poll failed: {e}");
                return 1;
            }
            self.turn_start = Instant::now();
            let accept_due = std::mem::take(&mut self.accept_more);
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    CHANNEL => self.channel_ready(ev.is_readable(), ev.is_writable()),
                    SIGNALS => self.read_signals(),
                    ALARM => self.alarm.fired(),
                    CLUSTER => self.cluster_ready(),
                    Token(t) if t >= BUS_BASE => self.bus_ready(t - BUS_BASE),
                    Token(t) => self.conn_ready(
                        t - CONN_BASE,
                        ev.is_readable(),
                        ev.is_read_closed() || ev.is_error(),
                        ev.is_writable(),
                    ),
                }
            }
            // A fast stop does not run the rest of the turn (timers, hooks).
            if self.stopping == Some(StopMode::Fast) {
                return self.exit();
            }
            if accept_due && !self.accept_more {
                self.accept();
            }
            for peer in std::mem::take(&mut self.bus_again) {
                self.bus_ready(peer);
            }
            let again = std::mem::replace(&mut self.again, std::mem::take(&mut self.spare));
            for &idx in &again {
                self.read_conn(idx);
            }
            self.spare = recycle(again);
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

    /// How long `poll` may sleep: not at all while work is pending; otherwise until an event,
    /// with the alarm set for the next deadline.
    fn poll_timeout(&mut self) -> Option<Duration> {
        if self.accept_more
            || !self.again.is_empty()
            || !self.bus_again.is_empty()
            || !self.ctx.dirty.is_empty()
            || !self.backlog.is_empty()
            || !self.ctx.gone.is_empty()
            || !self.ctx.notices.is_empty()
        {
            return Some(Duration::ZERO);
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
        match self.alarm.set(until) {
            Ok(()) => None,
            Err(e) => {
                log::warn!("cannot set the worker's timerfd ({e}); polling with a timeout");
                Some(until.saturating_duration_since(Instant::now()))
            }
        }
    }

    // ---- accept -------------------------------------------------------------------------

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
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
                Err(e) => {
                    if self.accept_error(e).is_break() {
                        return;
                    }
                }
            }
        }
        // The listener is edge-triggered: with the batch used up, no new event comes for the
        // clients still queued, so the next turn must come back for them.
        self.accept_more = true;
    }

    // ---- connections --------------------------------------------------------------------

    /// `ended`: the client half-closed or the socket failed. That may come in the same event
    /// as the last data, and no event follows it, so it is remembered until read.
    fn conn_ready(&mut self, idx: usize, readable: bool, ended: bool, writable: bool) {
        if writable {
            self.flush_conn(idx);
        }
        if ended && let Some(conn) = self.ctx.conns.get_mut(idx) {
            conn.input_ended = true;
        }
        if readable || ended {
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
            if conn.session.queued() >= high_water {
                conn.reads_paused = true;
                return;
            }
            let serial = conn.serial;
            let (buf, lend) = self.inbox.next();
            let room = buf.capacity();
            let drained = match conn.read(buf) {
                Ok(0) => {
                    // What this read's data asked for (an echo, the answer to a Close) is
                    // still queued: the client may only have shut its sending side, so it
                    // gets what the socket takes now.
                    let _ = conn.session.write_to(&mut conn.socket);
                    self.ctx.mark_gone(idx);
                    return;
                }
                Ok(n) => {
                    conn.last_input = self.turn_start;
                    // A failed connection's input is read only to be discarded.
                    conn.session.read_buffer(buf, lend, &mut self.steps);
                    // A short read emptied the socket's queue. With edge-triggered polling,
                    // anything that arrives later raises a new event, so the read that would
                    // only say "would block" is skipped: a third of the syscalls of a small
                    // echo. Not so once the input has ended: its end (read as 0) raises no
                    // event of its own.
                    n < room && !conn.input_ended
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    self.socket_failed(idx, e);
                    return;
                }
            };
            self.dispatch(idx, serial);
            if let Some(c) = self.ctx.conns.get(idx)
                && c.serial == serial
                && c.session.wants_flush()
            {
                self.ctx.mark_dirty(idx);
            }
            if drained {
                return;
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
                Step::Request(request) => self.upgrade(id, *request),
                // A plain GET/HEAD: a file from static_dir, or the 426 without one.
                Step::Fetch(request) => self.serve_file(idx, *request),
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
        let refusal = self.refuse_upgrade(idx, peer, ip, &request);
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
        self.call_plain_hook(id, "on_connect", |h| h.on_connect.as_mut());
        // Upgraded during a stop that closes clients: the app met it like any other, and it
        // is closed like the others.
        if self.stopping >= Some(StopMode::Close) {
            self.close_when_due(id);
        }
    }

    // ---- send and reap ------------------------------------------------------------------

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
            Flushed::Failed(e) => self.socket_failed(idx, e),
            Flushed::Partly => {}
            Flushed::All if conn.buffer_full => {
                conn.buffer_full = false;
                let id = ConnId {
                    serial: conn.serial,
                    idx: idx as u32,
                };
                // Filled and drained before the app was told it was full: it hears of neither,
                // rather than of the drain first.
                let notices = &mut self.ctx.notices;
                let told = notices.len();
                notices.retain(|&BufferNotice::Full(n)| n != id);
                if notices.len() == told {
                    self.call_plain_hook(id, "on_buffer_drain", |h| h.on_buffer_drain.as_mut());
                }
            }
            Flushed::All => {}
        }
    }

    fn flush_dirty(&mut self) {
        let fresh = std::mem::replace(&mut self.ctx.dirty, std::mem::take(&mut self.spare));
        // Every connection listed this turn leaves the dirty list now, written or not: one
        // that is sent more while it waits in the backlog is listed afresh, and goes first.
        for &idx in &fresh {
            if let Some(conn) = self.ctx.conns.get_mut(idx) {
                conn.dirty = false;
            }
        }
        let for_backlog = if self.backlog.is_empty() {
            0
        } else {
            FLUSH_BUDGET / 4
        };
        let now = fresh.len().min(FLUSH_BUDGET - for_backlog);
        for &idx in &fresh[..now] {
            self.flush_conn(idx);
        }
        for &idx in &fresh[now..] {
            // Once in the backlog is enough: a fan-out each turn must not list it again.
            if let Some(conn) = self.ctx.conns.get_mut(idx)
                && !std::mem::replace(&mut conn.backlogged, true)
            {
                self.backlog.push_back(idx);
            }
        }
        for _ in now..FLUSH_BUDGET {
            let Some(idx) = self.backlog.pop_front() else {
                break;
            };
            if let Some(conn) = self.ctx.conns.get_mut(idx) {
                conn.backlogged = false;
            }
            // Already written since it was listed, if it has nothing queued: no syscall.
            self.flush_conn(idx);
        }
        if self.backlog.is_empty() && self.backlog.capacity() > LIST_KEEP {
            self.backlog = VecDeque::new();
        }
        self.spare = recycle(fresh);
    }

    /// Reading or writing `idx` failed: it goes, and `on_error` hears why if it was an open
    /// connection that had not failed already (a reset after our Close is no news to the app).
    fn socket_failed(&mut self, idx: usize, e: io::Error) {
        let Some(conn) = self.ctx.conns.get_mut(idx) else {
            return;
        };
        let id = ConnId {
            serial: conn.serial,
            idx: idx as u32,
        };
        let tell = conn.session.abort();
        log::debug!("connection {id} from {}: socket error: {e}", conn.remote);
        self.ctx.mark_gone(idx);
        if tell {
            self.call_error_hook(id, &ConnError::Io(e));
        }
    }

    /// Removes connections that ended this turn and tells the app.
    pub(super) fn reap(&mut self) {
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
                    self.call_plain_hook(id, "on_close", |h| h.on_close.as_mut());
                    self.ctx.topics.forget(id);
                }
            }
            if self.accept_paused && self.accept_retry_at.is_none() {
                self.accept();
            }
        }
    }
}

/// Entries a connection list keeps room for once empty; beyond that (64 KiB), a list grown by
/// a rare burst is let go.
const LIST_KEEP: usize = 8192;

/// `list` emptied for reuse, unless a burst grew it over `LIST_KEEP`.
fn recycle(mut list: Vec<usize>) -> Vec<usize> {
    list.clear();
    if list.capacity() > LIST_KEEP {
        list = Vec::new();
    }
    list
}
