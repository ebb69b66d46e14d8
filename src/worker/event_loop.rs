//! The worker's single-threaded event loop: one `mio::Poll`, no locks, no task per connection.
//!
//! Each turn: wait for readiness or the next deadline (a timerfd, `alarm.rs`) → accept until
//! the listener would block, `ACCEPT_BATCH` at most (the rest after the next turn's events,
//! so a connect storm cannot hold up everyone else) → drive each ready connection
//! (handshake, then read every frame available and call `on_message` for each) → run due
//! timers → during a stop, send the Closes whose turn has come → remove connections that
//! ended (`on_close`) → flush every connection that has output, once (a budget a turn, this
//! turn's first; a backlog waits for the next turns: `flush.rs`). Batching the flush is what
//! lets pipelined clients get many replies per write syscall.
//!
//! This file is the loop and the data path through it. What the loop consults on the way
//! lives beside it: who may connect (`admission.rs`), what is written when (`flush.rs`), how
//! a hook is called (`hooks.rs`), the once-a-second deadlines and pings (`sweep.rs`), stopping
//! (`stop.rs`), and the master's commands and the counters sent back (`commands.rs`).

use super::admission::{Accepted, Acceptor, IpSlot};
use super::alarm::Alarm;
use super::api::{API_BASE, API_LISTENER, Api, ApiSocket};
use super::channel::Channel;
use super::conn::{Conn, Flushed, Received};
use super::context::{BufferNotice, Leaving};
use super::decisions::Decisions;
use super::errors::ConnError;
use super::flush::{FlushSchedule, recycle};
use super::gather::Gatherings;
use super::handler::{HANDLER_ERR, HANDLER_IN, HANDLER_OUT, Handler, Told};
use super::handoff::{ADOPT_BASE, HANDOFF_OUT, Handoffs};
use super::hooks::{Hook, WorkerHook};
use super::moment::Moment;
use super::read_buffers::ReadBuffers;
use super::stop::Stopping;
#[cfg(feature = "tls")]
use super::tls::TlsConn;
use super::upgrade::{self, Decision, UpgradeRequest, Verdict};
use super::webhook::{WEBHOOK_WAKE, Webhook};
use super::{Context, Hooks, Worker};
use crate::ConnId;
use crate::bus::Bus;
use crate::bus::bridges::{Bridges, Peer};
use crate::control::FromWorker;
use crate::proto::handshake::{self, Reject, Request};
use crate::proto::{Limits, Step};
use crate::sys;
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signalfd::SignalFd;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(0);
const CHANNEL: Token = Token(1);
const SIGNALS: Token = Token(2);
const ALARM: Token = Token(3);
pub(super) const CONN_BASE: usize = 16;
/// Tokens of the bus ends to the other workers: `BUS_BASE + peer slot`, above any connection.
pub(super) const BUS_BASE: usize = 1 << 40;
/// The cluster bus's waker: messages from other hosts are waiting (`bus_events.rs`).
const CLUSTER: Token = Token(BUS_BASE - 1);
/// Tokens of the bridges to other groups' workers: `BRIDGE_BASE + index`, between API
/// connections and the bus.
const BRIDGE_BASE: usize = 1 << 39 | 1 << 38;

/// Reads from one connection before others get a turn.
const READ_BUDGET: usize = 16;
/// How often the worker reports its counters and sweeps deadlines.
const TICK: Duration = Duration::from_secs(1);
/// Clients accepted per turn at most. In a connect storm the rest wait in the listen queue
/// while this turn's events (the upgrades of those just accepted, the messages of everyone
/// else) are handled, so answers start going out at once instead of after the whole queue.
pub(super) const ACCEPT_BATCH: usize = 64;

/// The worker's state, in parts each owned by the file that works on it: who may connect
/// (`accepting`, `admission.rs`), what is written when (`flushing`, `flush.rs`), and how the
/// worker stops (`stopping`, `stop.rs`). The connections themselves are in `ctx`, where hooks
/// reach them.
pub(super) struct Loop {
    pub(super) poll: Poll,
    pub(super) accepting: Acceptor,
    pub(super) channel: Channel,
    pub(super) signals: SignalFd,
    alarm: Alarm,
    pub(super) hooks: Hooks,
    pub(super) ctx: Context,
    pub(super) settings: crate::config::GroupConfig,
    pub(super) limits: Limits,
    /// The read buffers every connection shares: bytes go from here into the protocol state
    /// at once, so no connection keeps a buffer of its own.
    pub(super) inbox: ReadBuffers,
    /// What the protocol asked of the loop for the connection being read.
    steps: VecDeque<Step>,
    /// Connections whose read budget ran out with data still buffered.
    pub(super) again: Vec<usize>,
    /// An empty list with capacity, swapped with `again` while it is worked through.
    again_spare: Vec<usize>,
    flushing: FlushSchedule,
    /// Bus peers whose messages did not all fit in one turn's budget.
    pub(super) bus_again: Vec<usize>,
    pub(super) stopping: Stopping,
    /// The backend API, if this worker's group serves it (`[api]`).
    pub(super) api: Option<Api>,
    /// The bridges between the API's workers and the other groups' (`bus::bridges`).
    pub(super) bridges: Bridges,
    /// Bridges whose messages did not all fit in one turn's budget.
    pub(super) bridges_again: Vec<usize>,
    /// The handler process, with `app = "exec"` (`handler.rs`).
    pub(super) handler: Option<Handler>,
    /// The backend events are POSTed to, with `app = "webhook"` (`webhook.rs`).
    pub(super) webhook: Option<Webhook>,
    /// Upgrades waiting for the handler's or the webhook's decision (`decisions.rs`).
    pub(super) decisions: Decisions,
    /// Connections handed to the worker replacing this one, or from the one it replaces.
    pub(super) handoffs: Handoffs,
    /// Answers waiting for other workers or Redis.
    pub(super) gatherings: Gatherings,
    /// When this worker's presence and user records are refreshed in Redis next.
    pub(super) refresh: super::presence::Refresh,
    next_tick: Instant,
    /// When this turn's poll returned: input is stamped with it, where a clock read per read
    /// would cost a vDSO call per message.
    turn_start: Moment,
    /// When each connection still in its handshake was accepted (slab index: serial and
    /// instant), for the handshake duration metric; only handshakes are here.
    pub(super) handshaking: HashMap<usize, (u64, Instant)>,
}

/// A valid upgrade request, checked up to the app's (or handler's) decision.
pub(super) struct Upgrade {
    pub request: Request,
    /// The signed token's user and grant, with `auth = "jwt"`.
    pub token: Option<(String, super::tokens::Grant)>,
    /// The subprotocol chosen from `subprotocols`, by index.
    pub chosen: Option<usize>,
}

/// Runs worker `slot` of `worker` until it is told to stop. Returns the exit code.
pub(crate) fn run(
    worker: Worker,
    slot: usize,
    listener: std::net::TcpListener,
    channel: std::os::unix::net::UnixStream,
    bus: Bus,
    api: Option<ApiSocket>,
    bridges: Vec<(Peer, OwnedFd)>,
) -> i32 {
    match Loop::new(worker, slot, listener, channel, bus, api, bridges) {
        Ok(mut l) => l.run(),
        Err(e) => {
            log::error!("worker setup failed: {e}");
            2
        }
    }
}

impl Loop {
    pub(super) fn new(
        worker: Worker,
        slot: usize,
        listener: std::net::TcpListener,
        channel: std::os::unix::net::UnixStream,
        mut bus: Bus,
        api: Option<ApiSocket>,
        inherited: Vec<(Peer, OwnedFd)>,
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
        let handoffs = Handoffs::default();
        let api = match api {
            Some(socket) => Some(Api::new(socket, settings.name(), poll.registry())?),
            None => None,
        };
        let handler = (settings.app == crate::config::EXEC_APP).then(|| Handler::new(&settings));
        let webhook = match settings.app == crate::config::WEBHOOK_APP {
            true => Some(Webhook::start(&settings, poll.registry())?),
            false => None,
        };
        let decisions = Decisions::new(settings.connect_timeout);
        let mut bridges = Bridges::new(BRIDGE_BASE);
        for (peer, end) in inherited {
            bridges.add(peer, end, poll.registry())?;
        }
        let limits = Limits {
            max_frame: settings.max_frame_size,
            max_message: settings.max_message_size,
        };
        Ok(Loop {
            poll,
            accepting: Acceptor::new(listener),
            channel: Channel::new(channel),
            signals,
            alarm,
            hooks,
            ctx: Context::new(slot, &settings, bus),
            inbox: ReadBuffers::new(settings.read_buffer_size),
            settings,
            limits,
            steps: VecDeque::new(),
            again: Vec::new(),
            again_spare: Vec::new(),
            flushing: FlushSchedule::default(),
            bus_again: Vec::new(),
            stopping: Stopping::No,
            api,
            bridges,
            bridges_again: Vec::new(),
            handler,
            webhook,
            decisions,
            handoffs,
            gatherings: Gatherings::default(),
            refresh: Default::default(),
            next_tick: Instant::now() + TICK,
            turn_start: Moment::at(Instant::now()),
            handshaking: HashMap::new(),
        })
    }

    fn run(&mut self) -> i32 {
        self.call_worker_hook(WorkerHook::Start);
        self.channel.answer(&FromWorker::Ready);
        self.report();
        let mut events = Events::with_capacity(1024);
        loop {
            if self.finished() {
                return self.exit();
            }
            let timeout = self.poll_timeout();
            if let Some(code) = self.turn(&mut events, timeout) {
                return code;
            }
        }
    }

    /// One turn of the loop: waits up to `timeout` (`None`: until an event) and does what
    /// came. `Some(exit code)` when the loop must end at once.
    pub(super) fn turn(&mut self, events: &mut Events, timeout: Option<Duration>) -> Option<i32> {
        if let Err(e) = self.poll.poll(events, timeout)
            && e.kind() != io::ErrorKind::Interrupted
        {
            log::error!("poll failed: {e}");
            return Some(1);
        }
        self.turn_start = Moment::at(Instant::now());
        let accept_due = self.accepting.take_more();
        for ev in events.iter() {
            match ev.token() {
                LISTENER => self.accept(),
                CHANNEL => self.channel_ready(ev.is_readable(), ev.is_writable()),
                SIGNALS => self.read_signals(),
                ALARM => self.alarm.fired(),
                CLUSTER => self.cluster_ready(),
                API_LISTENER => self.api_accept(),
                HANDLER_OUT => self.handler_readable(),
                HANDLER_ERR => self.handler_stderr(),
                HANDLER_IN => {}
                WEBHOOK_WAKE => self.webhook_ready(),
                HANDOFF_OUT => self.handoff_out_ready(),
                Token(t) if t >= BUS_BASE => self.bus_ready(t - BUS_BASE),
                Token(t) if t >= BRIDGE_BASE => self.bridge_ready(t - BRIDGE_BASE),
                Token(t) if t >= API_BASE => self.api_ready(t - API_BASE),
                Token(t) if t >= ADOPT_BASE => self.adopt_ready(t - ADOPT_BASE),
                Token(t) => self.conn_ready(
                    t - CONN_BASE,
                    ev.is_readable(),
                    ev.is_read_closed() || ev.is_error(),
                    ev.is_writable(),
                ),
            }
        }
        // A fast stop does not run the rest of the turn (timers, hooks).
        if matches!(self.stopping, Stopping::Fast) {
            return Some(self.exit());
        }
        if accept_due && !self.accepting.has_more() {
            self.accept();
        }
        for peer in std::mem::take(&mut self.bus_again) {
            self.bus_ready(peer);
        }
        for idx in std::mem::take(&mut self.bridges_again) {
            self.bridge_ready(idx);
        }
        if self.handler.as_ref().is_some_and(|h| h.again) {
            self.handler_readable();
        }
        self.api_resume();
        let again = std::mem::replace(&mut self.again, std::mem::take(&mut self.again_spare));
        for &idx in &again {
            self.read_conn(idx);
        }
        self.again_spare = recycle(again);
        self.run_timers();
        self.handler_timers_fired();
        self.deliver_notices();
        self.start_asks();
        self.close_due();
        self.drain_ended(Instant::now());
        self.crossings_due(Instant::now());
        self.handoff_forward();
        self.reap();
        self.flush_dirty();
        self.reap();
        self.handler_flush();
        let now = Instant::now();
        self.handler_due(now);
        if now >= self.next_tick {
            self.next_tick = now + TICK;
            self.sweep(now);
            self.report();
        }
        if self.gatherings.next_deadline().is_some_and(|at| now >= at) {
            self.gather_sweep(now);
        }
        if self.accepting.retry_at().is_some_and(|at| now >= at) {
            self.accept();
        }
        None
    }

    /// Work is pending that the next turn must do without waiting for an event.
    pub(super) fn has_pending_work(&self) -> bool {
        self.accepting.has_more()
            || !self.again.is_empty()
            || !self.bus_again.is_empty()
            || !self.bridges_again.is_empty()
            || self.handler.as_ref().is_some_and(|h| h.again)
            || !self.ctx.dirty.is_empty()
            || self.flushing.has_backlog()
            || !self.ctx.gone.is_empty()
            || !self.ctx.notices.is_empty()
            || !self.ctx.asks.is_empty()
            || self.api_has_work()
    }

    /// How long `poll` may sleep: not at all while work is pending; otherwise until an event,
    /// with the alarm set for the next deadline.
    fn poll_timeout(&mut self) -> Option<Duration> {
        if self.has_pending_work() {
            return Some(Duration::ZERO);
        }
        let deadlines = [
            self.ctx.timers.next_deadline(),
            self.accepting.retry_at(),
            self.stopping.next_due(),
            self.gatherings.next_deadline(),
            self.handler.as_ref().and_then(|h| h.restart_at()),
            self.decisions.next_deadline(),
            self.handoffs.drain_due(),
            self.ctx.bus.crossings().due(),
        ];
        let until = deadlines
            .into_iter()
            .flatten()
            .fold(self.next_tick, Instant::min);
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
            match self.accepting.next(&self.settings, self.ctx.conns.len()) {
                Accepted::Client {
                    stream,
                    peer,
                    serial,
                    ip_slot,
                } => self.admit(stream, peer, serial, ip_slot),
                Accepted::Dropped => {}
                Accepted::Stop => return,
            }
        }
        self.accepting.batch_used();
    }

    /// Takes an accepted client into the loop. A client that cannot be registered is dropped
    /// (its place in `max_connections_per_ip` with it).
    fn admit(&mut self, mut stream: TcpStream, peer: SocketAddr, serial: u64, ip: Option<IpSlot>) {
        let _ = stream.set_nodelay(true);
        let id = self.ctx.next_id(serial);
        let token = Token(CONN_BASE + id.idx as usize);
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            token,
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("cannot register connection from {peer}: {e}");
            return;
        }
        #[cfg(feature = "tls")]
        let tls = match self
            .settings
            .tls
            .as_ref()
            .map(|id| TlsConn::new(id.server_config()))
        {
            None => None,
            Some(Ok(tls)) => Some(Box::new(tls)),
            Some(Err(e)) => {
                log::warn!("cannot start TLS for {peer}: {e}");
                let _ = self.poll.registry().deregister(&mut stream);
                return;
            }
        };
        let conn = Conn::new(
            id,
            stream,
            peer,
            ip,
            #[cfg(feature = "tls")]
            tls,
            self.limits,
            self.settings.max_header_bytes,
        );
        self.handshaking
            .insert(id.idx as usize, (serial, Instant::now()));
        self.ctx.insert_conn(conn);
        self.ctx.counters.accepted += 1;
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
        if self.backend_holds(idx) {
            return;
        }
        let high_water = super::context::high_water(self.settings.max_send_buffer);
        for _ in 0..READ_BUDGET {
            let Some(conn) = self.ctx.conns.get_mut(idx) else {
                return;
            };
            if conn.session.queued() >= high_water {
                conn.reads_paused = true;
                return;
            }
            let id = conn.id;
            let (buf, lend) = self.inbox.next();
            let mut ended = false;
            let drained = match conn.receive(buf, lend, &mut self.steps) {
                Received::Gone => {
                    self.steps.clear();
                    // What this read's data asked for (an echo, the answer to a Close) is
                    // still queued: the client may only have shut its sending side, so it
                    // gets what the socket takes now.
                    let _ = conn.write_out();
                    self.ctx.mark_gone(idx);
                    return;
                }
                Received::Data { short, last } => {
                    conn.last_input = self.turn_start;
                    if last {
                        ended = true;
                    }
                    // A short read emptied the socket's queue. With edge-triggered polling,
                    // anything that arrives later raises a new event, so the read that would
                    // only say "would block" is skipped: a third of the syscalls of a small
                    // echo. Not so once the input has ended: its end (read as 0) raises no
                    // event of its own.
                    short && !conn.input_ended
                }
                Received::Nothing => return,
                Received::Failed(e) => {
                    // Records before a broken one may have made steps; they die with it.
                    self.steps.clear();
                    self.socket_failed(idx, e);
                    return;
                }
            };
            self.dispatch(idx, id);
            if let Some(c) = self.ctx.conns.get_mut(idx)
                && c.id == id
            {
                if ended {
                    // The client said close_notify: answer what it asked, then let it go.
                    let _ = c.write_out();
                    self.ctx.mark_gone(idx);
                    return;
                }
                if c.wants_flush() {
                    self.ctx.mark_dirty(idx);
                }
            }
            if drained {
                return;
            }
        }
        self.again.push(idx);
    }

    /// Acts on the protocol's steps for one connection, in order.
    fn dispatch(&mut self, idx: usize, id: ConnId) {
        while let Some(step) = self.steps.pop_front() {
            if self.ctx.conns.get(idx).is_none_or(|c| c.id != id) {
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
                    // A renewed token is wsd's business, not the app's.
                    if !self.renew_token(id, &msg) {
                        self.call_hook(id, Hook::Message(msg));
                    }
                }
                Step::Closed(frame) => {
                    log::debug!("connection {id} closed by the client: {frame:?}")
                }
                Step::Failed(e) => {
                    let err = ConnError::from(e);
                    log::debug!("connection {id} from {}: {err}", conn.remote);
                    self.call_hook(id, Hook::Error(&err));
                }
                Step::Rejected(r) => {
                    log::debug!(
                        "refused upgrade from {}: {} {}",
                        conn.remote,
                        r.status,
                        r.why
                    );
                    self.handshake_ended(id, Some(r.status));
                }
            }
        }
    }

    /// Decides on a valid upgrade request: origin, per-address limit, subprotocol, the app's
    /// `on_upgrade`, then `101` and `on_connect`.
    fn upgrade(&mut self, id: ConnId, request: Request) {
        let Some(idx) = self.ctx.index_of(id) else {
            return;
        };
        let peer = self.ctx.conns[idx].remote.ip();
        let ip = handshake::client_ip(peer, &request, &self.settings.trusted_proxies);
        let conn = &mut self.ctx.conns[idx];
        let refusal =
            self.accepting
                .refuse_upgrade(&self.settings, conn.ip_counted(), peer, ip, &request);
        if ip != peer {
            conn.remote = SocketAddr::new(ip, 0);
        }
        let remote = conn.remote;
        let negotiated = refusal.and_then(|slot| {
            conn.count_ip(slot);
            upgrade::negotiate(&self.settings, &request)
        });
        let chosen = match negotiated {
            Ok(chosen) => chosen,
            Err(r) => return self.refuse(idx, &r, &[]),
        };
        let token = match self.check_token(&request, remote) {
            Ok(token) => token,
            Err(r) => {
                let challenge = [("WWW-Authenticate".to_string(), "Bearer".to_string())];
                return self.refuse(idx, &r, &challenge);
            }
        };
        let upgrade = Upgrade {
            request,
            token,
            chosen,
        };
        if self.backend_decides() {
            return self.ask_handler(id, upgrade);
        }
        let decision = self.call_upgrade_hook(&UpgradeRequest::new(&upgrade.request, remote));
        self.settle_upgrade(id, upgrade, decision);
    }

    /// Upgrades `id` or refuses it, as `decision` (the app's, or its handler's) says.
    pub(super) fn settle_upgrade(&mut self, id: ConnId, upgrade: Upgrade, decision: Decision) {
        // The hook cannot end this connection (it has no id for it), but it ran app code; and
        // a client may leave while its handler decides.
        let Some(idx) = self.ctx.index_of(id) else {
            return;
        };
        let Upgrade {
            request,
            token,
            chosen,
        } = upgrade;
        let listed = &self.settings.subprotocols;
        let (mut answer, agreed, extra) = match decision.settle(id, &request, listed, chosen) {
            Verdict::Accept {
                answer,
                agreed,
                extra,
            } => (answer, agreed, extra),
            Verdict::Reject { reject, headers } => return self.refuse(idx, &reject, &headers),
        };
        // permessage-deflate, agreed before `accept`, which may read compressed frames already.
        answer.extensions = self.ctx.agree_deflate(idx, &request.extensions);
        let conn = &mut self.ctx.conns[idx];
        conn.session.accept(&request, &answer, &mut self.steps);
        let path = match token {
            Some(_) => super::tokens::redact_token(request.path),
            None => request.path,
        };
        let headers = request.headers;
        conn.opened(path, agreed, extra);
        self.ctx.counters.connections += 1;
        self.handshake_ended(id, None);
        if let Some((user, grant)) = token {
            self.keep_grant(id, &user, grant);
        }
        self.ctx.mark_dirty(idx);
        if self.handler.is_some() {
            self.handler_tell(id, Told::Connect(&headers));
        }
        self.call_hook(id, Hook::Connect);
        // Upgraded during a stop that closes clients: the app met it like any other, and it
        // is closed like the others.
        self.close_if_stopping(id);
    }

    /// Refuses the upgrade of `idx` with an HTTP error (and `headers`, checked already). The
    /// reason is logged escaped: an app's may quote what the client sent.
    fn refuse(&mut self, idx: usize, r: &Reject, headers: &[(String, String)]) {
        let conn = &mut self.ctx.conns[idx];
        log::debug!(
            "refused upgrade from {}: {} {}",
            conn.remote,
            r.status,
            crate::escaped(r.why.as_bytes())
        );
        conn.session.respond(&r.response_with(headers));
        let id = conn.id;
        self.ctx.mark_dirty(idx);
        self.handshake_ended(id, Some(r.status));
    }

    /// A handshake ended: upgraded (`None`), or refused with `status`. Counted, and timed
    /// from the accept.
    pub(super) fn handshake_ended(&mut self, id: ConnId, refused: Option<u16>) {
        let counters = &mut self.ctx.counters;
        match refused {
            None => counters.upgraded += 1,
            Some(status) => *counters.rejected.entry(status.to_string()).or_default() += 1,
        }
        let idx = id.idx as usize;
        if let Some(&(serial, at)) = self.handshaking.get(&idx)
            && serial == id.serial
        {
            self.handshaking.remove(&idx);
            let bounds = &crate::metrics::HANDSHAKE_BOUNDS;
            counters.handshake_seconds.observe(bounds, at.elapsed());
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
                let id = conn.id;
                // Filled and drained before the app was told it was full: it hears of neither,
                // rather than of the drain first.
                let notices = &mut self.ctx.notices;
                let told = notices.len();
                notices.retain(|&BufferNotice::Full(n)| n != id);
                if notices.len() == told {
                    self.call_hook(id, Hook::BufferDrain);
                }
            }
            Flushed::All => {}
        }
    }

    /// Writes the connections the flush schedule picks for this turn.
    fn flush_dirty(&mut self) {
        let dirty = std::mem::replace(&mut self.ctx.dirty, self.flushing.fresh_list());
        let now = self.flushing.plan(dirty, &mut self.ctx.conns);
        for &idx in &now {
            self.flush_conn(idx);
        }
        self.flushing.done(now);
    }

    /// Reading or writing `idx` failed: it goes, and `on_error` hears why if it was an open
    /// connection that had not failed already (a reset after our Close is no news to the app).
    fn socket_failed(&mut self, idx: usize, e: io::Error) {
        let Some(conn) = self.ctx.conns.get_mut(idx) else {
            return;
        };
        let id = conn.id;
        let tell = conn.session.abort();
        log::debug!("connection {id} from {}: socket error: {e}", conn.remote);
        self.ctx.mark_gone(idx);
        if tell {
            self.call_hook(id, Hook::Error(&ConnError::Io(e)));
        }
    }

    /// Removes connections that ended this turn and tells the app.
    pub(super) fn reap(&mut self) {
        while !self.ctx.gone.is_empty() {
            for (idx, id) in std::mem::take(&mut self.ctx.gone) {
                if self.ctx.conns.get(idx).is_none_or(|c| c.id != id) {
                    continue; // Already removed (listed twice).
                }
                let mut conn = self.ctx.remove_conn(idx);
                self.handshaking.remove(&idx);
                if conn.is_open() {
                    self.ctx.counters.connections -= 1;
                    // Close the socket before the app hears of it; what the connection
                    // carried stays readable in on_close, and goes after it.
                    self.ctx.leaving = Some(Leaving {
                        id,
                        agreed: conn.agreed,
                        extra: conn.extra.take(),
                    });
                    drop(conn);
                    self.call_hook(id, Hook::Close);
                    self.ctx.forget_conn(id);
                    self.forget_leaving();
                }
            }
            if self.accepting.is_full() {
                self.accept();
            }
        }
    }
}
