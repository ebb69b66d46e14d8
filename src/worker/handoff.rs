//! Both sides of a connection handoff (`crate::handoff`): the retiring worker that gives its
//! open connections away, and the new worker that takes them.
//!
//! The giving side runs inside the stop: once the worker has stopped accepting and run
//! `on_worker_stop`, every connection that can go is moved onto the line, and the rest are
//! closed as any stop closes them. A connection that completes its upgrade during the stop
//! goes the same way. The worker exits once the line has taken every record. If the taking
//! worker goes away first, the records it had not started to read come back here, and those
//! clients are closed with 1001 like the others: a failed handoff costs the connections in
//! flight on the line, not the rest.
//!
//! The taking side reads records as they come and registers each socket as one of its own
//! connections: subscribed to its topics, bound to its user, its send queue ready to flush,
//! and read at once in case the client's next bytes are already waiting.

use super::conn::Conn;
use super::errors::ConnError;
use super::event_loop::{CONN_BASE, Loop};
use super::handler::Told;
use crate::ConnId;
use crate::bus::bridges::Peer;
use crate::handoff::line::{Line, LineError};
use crate::handoff::{self, Handed};
use crate::proto::deflate::{Codec, Settings, Stream};
use crate::proto::{Session, close};
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use slab::Slab;
use std::os::fd::{AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// The line to the worker this one hands its connections to.
pub(super) const HANDOFF_OUT: Token = Token(9);
/// Lines from the workers this one takes connections from: `ADOPT_BASE + index`.
pub(super) const ADOPT_BASE: usize = 1 << 38;

/// The handoff lines of a worker: at most one out (it is being replaced), any number in (it
/// replaces one worker, or several when a reload lowered `count`).
#[derive(Default)]
pub(super) struct Handoffs {
    out: Option<Outgoing>,
    incoming: Slab<Incoming>,
    bus: BusTurn,
}

/// Whose turn it is to read this worker's bus ends, when they are shared with the worker
/// of the same slot in the other generation (`bus::Bus::is_inherited`). Every message on them
/// is read by exactly one of the two: the old worker up to the moment it hands its connections
/// over (what it did with a message travels in their send queues), the new one from then on.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BusTurn {
    /// Ours.
    #[default]
    Reading,
    /// Still the worker this one replaces: its handoff ends the wait.
    Awaiting,
    /// The new worker's: this one has handed its connections over.
    Given,
}

struct Outgoing {
    line: Line,
    to: Peer,
    handed: usize,
    /// The line broke: nothing more goes on it.
    broken: bool,
    /// How long `wss://` clients, whose TLS session cannot travel, are served on here.
    drain: Duration,
    /// Those clients, and when they are sent Close 1012.
    draining: Vec<ConnId>,
    drain_until: Option<Instant>,
}

struct Incoming {
    line: Line,
    from: Peer,
    adopted: usize,
}

impl Handoffs {
    /// Nothing waits to go out on a line (the worker may exit).
    pub(super) fn is_flushed(&self) -> bool {
        self.out
            .as_ref()
            .is_none_or(|o| o.broken || o.line.is_flushed())
    }

    /// Connections go out on a line that works.
    fn giving(&self) -> bool {
        self.out.as_ref().is_some_and(|o| !o.broken)
    }

    /// Whether this worker reads its bus ends now.
    pub(super) fn reads_bus(&self) -> bool {
        self.bus == BusTurn::Reading
    }

    /// The ends were the previous worker's: they wait for its handoff.
    pub(super) fn await_predecessor(&mut self) {
        self.bus = BusTurn::Awaiting;
    }

    /// `wss://` clients kept until the drain ends: the stop does not close them before.
    pub(super) fn draining(&self, id: ConnId) -> bool {
        self.out.as_ref().is_some_and(|o| o.draining.contains(&id))
    }

    /// When the kept `wss://` clients are to be closed.
    pub(super) fn drain_due(&self) -> Option<Instant> {
        self.out.as_ref()?.drain_until
    }
}

impl Loop {
    /// The master's word to hand this worker's connections to `to` over the line `fd`, and
    /// stop. Without a usable line, this is a plain stop that closes the clients.
    pub(super) fn hand_off_and_stop(
        &mut self,
        to: Peer,
        fd: Option<OwnedFd>,
        spread: Duration,
        drain: Duration,
    ) {
        match fd.map(Line::new) {
            Some(Ok(line)) => {
                let fd = line.fd();
                let interest = Interest::READABLE | Interest::WRITABLE;
                match (self.poll.registry()).register(&mut SourceFd(&fd), HANDOFF_OUT, interest) {
                    Ok(()) => {
                        log::info!(
                            "handing connections to {}#{} (pid {})",
                            to.group,
                            to.slot,
                            to.pid
                        );
                        self.handoffs.out = Some(Outgoing {
                            line,
                            to,
                            handed: 0,
                            broken: false,
                            drain,
                            draining: Vec::new(),
                            drain_until: None,
                        });
                    }
                    Err(e) => log::warn!("cannot watch the handoff line ({e}); closing clients"),
                }
            }
            Some(Err(e)) => log::warn!("cannot use the handoff line ({e}); closing clients"),
            None => log::warn!("the master sent a handoff without its line; closing clients"),
        }
        self.stop(crate::control::StopMode::Close, spread);
    }

    /// Hands over every connection that can go (called by the stop, before it closes the rest).
    pub(super) fn hand_off_all(&mut self) {
        if !self.handoffs.giving() {
            return;
        }
        let all: Vec<usize> = self.ctx.conns.iter().map(|(idx, _)| idx).collect();
        for idx in all {
            if !self.hand_off(idx) {
                self.keep_tls(idx);
            }
        }
        // From here on the bus ends are the new worker's: the end of the records says so.
        if self.handoffs.bus == BusTurn::Reading {
            self.handoffs.bus = BusTurn::Given;
            for (_, end) in self.ctx.bus.ends() {
                let _ = (self.poll.registry()).deregister(&mut SourceFd(&end.as_raw_fd()));
            }
            self.bus_again.clear();
        }
        if let Some(o) = &mut self.handoffs.out {
            o.line.push(&[], None);
        }
        if let Some(o) = &mut self.handoffs.out {
            log::info!("{} connections handed over", o.handed);
            if !o.draining.is_empty() {
                o.drain_until = Some(Instant::now() + o.drain);
                log::info!(
                    "serving {} wss:// clients for up to {} ms, then Close 1012",
                    o.draining.len(),
                    o.drain.as_millis()
                );
            }
        }
        self.handoff_flush();
    }

    /// Keeps an open `wss://` connection of an app that hands its connections over: its TLS
    /// session cannot travel, so it is served here until the drain ends (or it closes), and
    /// then told 1012 (Service Restart) to reconnect. True if it is kept.
    fn keep_tls(&mut self, idx: usize) -> bool {
        let Some(conn) = self.ctx.conns.get(idx) else {
            return false;
        };
        let keep = conn.is_tls() && conn.session.can_hand_off() && self.hooks.on_handoff.is_some();
        let id = ConnId {
            serial: conn.serial,
            idx: idx as u32,
        };
        match self.handoffs.out.as_mut() {
            Some(o) if keep => {
                o.draining.push(id);
                true
            }
            _ => false,
        }
    }

    /// Closes the kept `wss://` clients with 1012 once their drain has ended.
    pub(super) fn drain_ended(&mut self, now: Instant) {
        let Some(o) = self.handoffs.out.as_mut() else {
            return;
        };
        if o.drain_until.is_none_or(|at| now < at) {
            return;
        }
        o.drain_until = None;
        for id in std::mem::take(&mut o.draining) {
            self.ctx
                .close_with(id, close::SERVICE_RESTART, "service restart: reconnect");
        }
    }

    /// Hands connection `idx` over if it can go: it is open and plain, its protocol state can
    /// travel, and the app gave its state (`on_handoff`). False if it stays.
    pub(super) fn hand_off(&mut self, idx: usize) -> bool {
        // An app hands its connections over if it can give its state: with `on_handoff`, or
        // through its exec handler's `handoff` and `adopt` events.
        if !self.handoffs.giving() || (self.hooks.on_handoff.is_none() && self.handler.is_none()) {
            return false;
        }
        let Some(conn) = self.ctx.conns.get(idx) else {
            return false;
        };
        if conn.is_tls() || !conn.session.can_hand_off() {
            return false;
        }
        let id = ConnId {
            serial: conn.serial,
            idx: idx as u32,
        };
        let app = match self.hooks.on_handoff.is_some() {
            true => match self.call_handoff_hook(id) {
                Some(bytes) => Some(bytes),
                None => return false,
            },
            false => None,
        };
        // The hook may have closed it, or queued a last message (which travels).
        let Some(session) = self.ctx.conns[idx].session.hand_off() else {
            return false;
        };
        let from = self.named(id).to_string();
        let user = self.ctx.user_of(id).map(str::to_string);
        let topics = self.ctx.topics_of(id);
        let mut conn = self.ctx.conns.remove(idx);
        self.handshaking.remove(&idx);
        self.ctx.counters.connections -= 1;
        let _ = self.poll.registry().deregister(&mut conn.socket);
        // Its topics and user leave this worker; the new one takes them up.
        self.ctx.forget_conn(id);
        let listed = &self.ctx.subprotocols;
        let (handed, socket) = conn.into_handed(session, listed, (from, user, topics), app);
        let out = self.handoffs.out.as_mut().expect("giving, checked above");
        out.line.push(&handed.encode(), Some(OwnedFd::from(socket)));
        out.handed += 1;
        if self.handler.is_some() {
            self.handler_tell(id, Told::Handoff);
        }
        true
    }

    /// Calls `on_handoff` for `id`: the app's state of it, or `None` if the hook panicked
    /// (the connection then stays, and is closed like those that cannot go).
    fn call_handoff_hook(&mut self, id: ConnId) -> Option<Vec<u8>> {
        let f = self.hooks.on_handoff.as_mut()?;
        let ctx = &mut self.ctx;
        match catch_unwind(AssertUnwindSafe(|| f(ctx, id))) {
            Ok(bytes) => Some(bytes),
            Err(_) => {
                log::error!("on_handoff hook panicked on connection {id}; it is closed instead");
                None
            }
        }
    }

    /// Sends what the outgoing line takes; a broken line gives its unsent connections back.
    pub(super) fn handoff_flush(&mut self) {
        let Some(out) = self.handoffs.out.as_mut().filter(|o| !o.broken) else {
            return;
        };
        let err = match out.line.flush() {
            Ok(_) => return,
            Err(e) => e,
        };
        out.broken = true;
        let unsent = out.line.take_unsent();
        let to = format!("{}#{} (pid {})", out.to.group, out.to.slot, out.to.pid);
        let _ = (self.poll.registry()).deregister(&mut SourceFd(&out.line.fd()));
        log::error!(
            "handoff to {to} failed ({err}); keeping {} connections not yet handed, closing them",
            unsent.len()
        );
        for (record, fd) in unsent.into_iter().filter(|(r, _)| !r.is_empty()) {
            if let Some(id) = self.adopt(&record, fd) {
                self.close_if_stopping(id);
            }
        }
    }

    /// The outgoing line became writable, or its other end went (the taking worker sends
    /// nothing): a flush finds out which.
    pub(super) fn handoff_out_ready(&mut self) {
        self.handoff_flush();
    }

    // ---- the taking side ----------------------------------------------------------------

    /// The master's word that `from` will hand its connections over the line `fd`; `None`:
    /// the worker this one replaces is gone, and its bus ends are this one's to read.
    pub(super) fn adopt_from(&mut self, from: Option<Peer>, fd: Option<OwnedFd>) {
        let Some(from) = from else {
            self.take_the_bus();
            return;
        };
        let Some(line) = fd.map(Line::new).transpose().ok().flatten() else {
            log::warn!(
                "cannot take the handoff line from {}#{}",
                from.group,
                from.slot
            );
            self.take_the_bus();
            return;
        };
        let entry = self.handoffs.incoming.vacant_entry();
        let token = Token(ADOPT_BASE + entry.key());
        let fd = line.fd();
        if let Err(e) =
            (self.poll.registry()).register(&mut SourceFd(&fd), token, Interest::READABLE)
        {
            log::warn!(
                "cannot watch the handoff line from {}#{}: {e}",
                from.group,
                from.slot
            );
            self.take_the_bus();
            return;
        }
        entry.insert(Incoming {
            line,
            from,
            adopted: 0,
        });
    }

    /// Records arrived on incoming line `key` (or it closed).
    pub(super) fn adopt_ready(&mut self, key: usize) {
        let max = handoff::max_record(self.settings.max_send_buffer, self.limits.max_message);
        let Some(incoming) = self.handoffs.incoming.get_mut(key) else {
            return;
        };
        let received = incoming.line.receive(max);
        let ended = incoming.line.is_ended();
        let records = match received {
            Ok(records) => records,
            Err(e) => {
                let incoming = self.handoffs.incoming.remove(key);
                let _ = (self.poll.registry()).deregister(&mut SourceFd(&incoming.line.fd()));
                // However the line ended, its sender reads the bus no more.
                self.take_the_bus();
                let from = &incoming.from;
                let took = incoming.adopted;
                match e {
                    LineError::Closed => log::info!(
                        "took {took} connections from {}#{} (pid {})",
                        from.group,
                        from.slot,
                        from.pid
                    ),
                    e => log::error!(
                        "handoff from {}#{} broken after {took} connections: {e}",
                        from.group,
                        from.slot
                    ),
                }
                return;
            }
        };
        for (record, fd) in records {
            if record.is_empty() {
                // The last record: the sender has stopped reading the bus ends.
                self.take_the_bus();
                continue;
            }
            if self.adopt(&record, fd).is_some()
                && let Some(incoming) = self.handoffs.incoming.get_mut(key)
            {
                incoming.adopted += 1;
            }
        }
        if ended {
            // Its end was read with these records: no event will say so again.
            self.adopt_ready(key);
        }
    }

    /// Starts reading the bus ends taken over from the previous worker, which has stopped:
    /// what waits on them now is read here, and applied to the connections it handed over.
    fn take_the_bus(&mut self) {
        if self.handoffs.bus != BusTurn::Awaiting {
            return;
        }
        self.handoffs.bus = BusTurn::Reading;
        let peers: Vec<usize> = self.ctx.bus.ends().map(|(peer, _)| peer).collect();
        log::debug!("reading the bus ends of the worker replaced");
        for peer in peers {
            self.bus_ready(peer);
        }
    }

    /// Takes one handed connection into this worker. `None` if the record cannot be read (the
    /// socket is then closed: that client reconnects).
    pub(super) fn adopt(&mut self, record: &[u8], fd: Option<OwnedFd>) -> Option<ConnId> {
        let mut handed = match Handed::decode(record) {
            Ok(handed) => handed,
            Err(e) => {
                log::error!("a handed connection is lost: {e}");
                return None;
            }
        };
        let Some(fd) = fd else {
            log::error!("a handed connection came without its socket");
            return None;
        };
        let socket = TcpStream::from_std(std::net::TcpStream::from(fd));
        let deflate = match handed.session.deflate {
            None => None,
            Some(agreed) => {
                let carried = || Codec::new(Settings::carried_over(&self.settings));
                let codec = self.ctx.deflate.clone().unwrap_or_else(carried);
                let window = handed.session.window.as_deref();
                let Some(stream) = Stream::adopt(agreed, &codec, window) else {
                    log::error!(
                        "a handed connection from {} is lost: bad deflate window",
                        handed.remote
                    );
                    return None;
                };
                Some(stream)
            }
        };
        let state = std::mem::take(&mut handed.session);
        let max_header = self.settings.max_header_bytes;
        let Some(session) = Session::adopt(self.limits, max_header, state, deflate) else {
            log::error!(
                "a handed connection from {} is lost: its state is not valid",
                handed.remote
            );
            return None;
        };
        let (serial, ip_slot) = self.accepting.adopt(&self.settings, handed.remote.ip());
        let listed = &self.ctx.subprotocols;
        let conn = Conn::adopted(serial, socket, ip_slot, session, &mut handed, listed);
        let entry = self.ctx.conns.vacant_entry();
        let idx = entry.key();
        let interest = Interest::READABLE | Interest::WRITABLE;
        let mut conn = conn;
        let token = Token(CONN_BASE + idx);
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut conn.socket, token, interest)
        {
            log::error!(
                "cannot register a handed connection from {}: {e}",
                handed.remote
            );
            return None;
        }
        let queued = conn.wants_flush();
        entry.insert(conn);
        self.ctx.counters.connections += 1;
        let id = ConnId {
            serial,
            idx: idx as u32,
        };
        if let Some(user) = &handed.user {
            self.ctx.bind_user(id, user);
        }
        for topic in &handed.topics {
            self.ctx.subscribe(id, topic);
        }
        self.call_adopt_hook(id, handed.app.as_deref().unwrap_or_default());
        if self.handler.is_some() {
            let told = Told::Adopt {
                from: &handed.from,
                topics: &handed.topics,
            };
            self.handler_tell(id, told);
        }
        if queued {
            self.ctx.mark_dirty(idx);
        }
        self.again.push(idx);
        Some(id)
    }

    /// Calls `on_adopt`; a panic fails that connection only, as in any connection hook.
    fn call_adopt_hook(&mut self, id: ConnId, bytes: &[u8]) {
        let Some(f) = self.hooks.on_adopt.as_mut() else {
            return;
        };
        let ctx = &mut self.ctx;
        if catch_unwind(AssertUnwindSafe(|| f(ctx, id, bytes))).is_err() {
            log::error!("on_adopt hook panicked on connection {id}; closing it with 1011");
            self.fail(id, &ConnError::HookPanicked);
        }
    }

    /// Connections to be handed over remain unsent: the worker must not exit yet.
    pub(super) fn handoff_pending(&self) -> bool {
        !self.handoffs.is_flushed()
    }

    /// Whether a connection that just completed its upgrade during the stop went to the new
    /// worker, or is kept until the drain ends (instead of being closed now).
    pub(super) fn handed_when_stopping(&mut self, id: ConnId) -> bool {
        if !self.handoffs.giving() {
            return false;
        }
        let idx = id.idx as usize;
        if self.hand_off(idx) {
            self.handoff_flush();
            return true;
        }
        if self.keep_tls(idx)
            && let Some(o) = self.handoffs.out.as_mut()
        {
            o.drain_until
                .get_or_insert_with(|| Instant::now() + o.drain);
            return true;
        }
        false
    }
}
