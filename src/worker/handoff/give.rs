//! The giving side: a worker being replaced hands its open connections over, inside its stop.
//!
//! Once the worker has stopped accepting and run `on_worker_stop`, every connection that can
//! go is queued for the line, and goes as the window opens, served here until its turn;
//! `wss://` ones are kept for the drain; the rest are closed as any stop closes them. A
//! connection that completes its upgrade during the stop goes the same way. Bus messages
//! travel on the line too, between the connections: those this worker delivered while a
//! connection was already gone (`Carried::Delivered`), and those the group held here
//! (`Carried::Held`). The worker exits once every record has been acknowledged. If the line
//! breaks first, the records not acknowledged come back here, whole, in order, and the
//! connections are served until the master sends another handoff (to the slot's next worker).

use super::{HANDOFF_OUT, Outgoing, Sent};
use crate::ConnId;
use crate::bus::bridges::Peer;
use crate::bus::crossing::ToLine;
use crate::bus::wire::{self, BusMessage};
use crate::handoff::Carried;
use crate::handoff::line::{Line, LineError};
use crate::proto::close;
use crate::worker::event_loop::Loop;
use crate::worker::handler::Told;
use mio::Interest;
use mio::unix::SourceFd;
use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

/// Bytes of bus messages in one record on the line, at most (unless one message is larger).
const CARRIED_BYTES: usize = 256 << 10;

/// What became of a connection put forward for the line.
enum Gave {
    /// It is on the line.
    Yes,
    /// It stays (it cannot go, or the app's hook panicked).
    No,
    /// Not now: no descriptor to spare until the taker acknowledges some.
    Later,
    /// Not yet: the webhook has requests of its in flight; it goes once they are answered.
    Parked,
}

impl Loop {
    /// The master's word to hand this worker's connections to `to` over the line `fd`, and
    /// stop (or, stopping already after a handoff that broke, to hand them over again).
    /// Without a usable line, this is a plain stop that closes the clients.
    ///
    /// `returnable`: the line is kept once all is taken, for the connections to come back if
    /// the taker's master dies before the upgrade is done. While connections are still coming
    /// back here, or a crossing of messages from other hosts this worker takes has not ended
    /// (its clients are still owed some, or are to skip some: `bus::crossing`), the handoff
    /// waits until they all have.
    pub(in crate::worker) fn hand_off_and_stop(
        &mut self,
        to: Peer,
        fd: Option<OwnedFd>,
        returnable: bool,
        times: (Duration, Duration),
    ) {
        if self.handoff_waits() {
            log::info!("handing over once the handoff under way is over");
            let (spread, drain) = times;
            self.handoffs.deferred = Some(super::Deferred {
                to,
                fd,
                returnable,
                spread,
                drain,
            });
            return;
        }
        let line = match fd.map(Line::new) {
            Some(Ok(line)) => Some(line),
            Some(Err(e)) => {
                log::warn!("cannot use the handoff line ({e}); closing clients");
                None
            }
            None => {
                log::warn!("the master sent a handoff without its line; closing clients");
                None
            }
        };
        self.hand_off_on(to, line, returnable, times);
    }

    /// Whether a handoff the master asks for waits for the one under way.
    fn handoff_waits(&self) -> bool {
        let h = &self.handoffs;
        h.giving() || h.returning() || self.ctx.bus.crossings().is_taking()
    }

    /// Begins the handoff put off while another was under way, if the master asked for one.
    pub(in crate::worker) fn hand_off_deferred(&mut self) {
        if self.handoff_waits() {
            return;
        }
        if let Some(d) = self.handoffs.deferred.take() {
            self.hand_off_and_stop(d.to, d.fd, d.returnable, (d.spread, d.drain));
        }
    }

    /// [`Loop::hand_off_and_stop`] on a line ready for use (or none: a plain stop).
    pub(in crate::worker) fn hand_off_on(
        &mut self,
        to: Peer,
        line: Option<Line>,
        returnable: bool,
        (spread, drain): (Duration, Duration),
    ) {
        self.handoffs.drain = drain;
        if let Some(line) = line {
            let fd = line.fd();
            let interest = Interest::READABLE | Interest::WRITABLE;
            match (self.poll.registry()).register(&mut SourceFd(&fd), HANDOFF_OUT, interest) {
                Ok(()) => {
                    let (group, slot, pid) = (&to.group, to.slot, to.pid);
                    log::info!("handing connections to {group}#{slot} (pid {pid})");
                    // A line that turns round has carried records this way already.
                    let acked = line.pushed();
                    self.handoffs.out = Some(Outgoing {
                        line,
                        to,
                        unacked: VecDeque::new(),
                        acked,
                        handed: 0,
                        ended: false,
                        returnable,
                    });
                }
                Err(e) => log::warn!("cannot watch the handoff line ({e}); closing clients"),
            }
        }
        if self.stopping.mode().is_some() {
            // A second attempt: the stop has run; only the handing over is left to do.
            self.hand_off_all();
            return;
        }
        // The stop hands over what it can before it closes the rest (`hand_off_all`).
        self.stop(crate::control::StopMode::Close, spread);
    }

    /// Queues every connection that can go for the line (called by the stop, before it closes
    /// the rest); they go as the window opens ([`Loop::handoff_pump`]), and an empty record
    /// ends them. Until its turn, a queued client is served here as before.
    ///
    /// To the next worker of this slot, this worker goes on reading the slot's bus ends until
    /// its last client has gone, and puts what it delivers on the line too, between the
    /// clients: the taker delivers it to those it has already (and its own), so each client
    /// gets each message once, wherever it is. To another slot's worker (the group holding its
    /// messages), the ends are left at once, once what waits on them is carried out.
    pub(in crate::worker) fn hand_off_all(&mut self) {
        if !self.handoffs.giving() {
            return;
        }
        let same_slot = self.hands_within_slot();
        let all: Vec<usize> = self.ctx.conns.iter().map(|(idx, _)| idx).collect();
        self.handoffs.taken_back.clear();
        for idx in all {
            if !self.queue_for_handoff(idx) {
                self.keep_tls(idx);
            }
        }
        self.begin_crossing();
        if same_slot && self.ctx.bus.reads() {
            self.ctx.bus.start_forwarding();
        } else {
            self.give_bus_turn();
        }
        let h = &mut self.handoffs;
        log::info!("handing {} connections over", h.queue.len());
        if !h.draining.is_empty() && h.drain_until.is_none() {
            h.drain_until = Some(Instant::now() + h.drain);
            let (n, ms) = (h.draining.len(), h.drain.as_millis());
            log::info!("serving {n} wss:// clients for up to {ms} ms, then Close 1012");
        }
        self.handoff_pump();
    }

    /// Queues connection `idx` for the line if it can go: it is open and plain, and the app can
    /// give its state (`on_handoff`, or an exec handler's `handoff` and `adopt` events).
    fn queue_for_handoff(&mut self, idx: usize) -> bool {
        let app_hands_off = self.app_hands_off();
        let Some(conn) = self.ctx.conns.get(idx) else {
            return false;
        };
        if !app_hands_off || conn.is_tls() || !conn.session.can_hand_off() {
            return false;
        }
        let id = conn.id;
        self.handoffs.queue.push_back((idx, id));
        self.handoffs.waiting.insert(idx);
        true
    }

    /// Carries out what waits on the bus ends (for the clients still here, and, forwarded, for
    /// those gone), then leaves the ends to the taker (or, in another slot, to nobody) and
    /// puts the messages the group held here on the line, for the taker to send when the
    /// hold ends.
    fn give_bus_turn(&mut self) {
        self.drain_bus();
        self.put_forwarded();
        self.ctx.bus.stop_forwarding();
        if self.ctx.bus.give_turn() {
            for (_, end) in self.ctx.bus.ends() {
                let _ = (self.poll.registry()).deregister(&mut SourceFd(&end.as_raw_fd()));
            }
            self.bus_again.clear();
        }
        self.put_held();
    }

    /// Puts the messages the group held here (its clients moving to another slot) on the
    /// line, for the taker to send when the hold ends: before each client, so that a client's
    /// messages held here come before those it makes there.
    fn put_held(&mut self) {
        let held = self.ctx.bus.take_held();
        self.put_carried(Carried::Held, &held);
    }

    /// At the end of each turn while handing over: what this worker delivered goes to the
    /// taker now, not only before the next client, so that the clients there get it soon.
    pub(in crate::worker) fn handoff_forward(&mut self) {
        if self.handoffs.out.as_ref().is_some_and(|o| !o.ended) {
            self.put_forwarded();
            self.handoff_flush();
        } else if self.ctx.bus.crossings().giving().is_some() {
            self.put_remote();
            self.handoff_flush();
        }
        self.copy_to_partners();
    }

    /// Puts what this worker delivered since the last time on the line, before the next
    /// client: the taker delivers it to those it has, which left before it was delivered here.
    fn put_forwarded(&mut self) {
        let forwarded = self.ctx.bus.take_forwarded();
        self.put_carried(Carried::Delivered, &forwarded);
        self.put_remote();
    }

    /// Puts bus messages on the outgoing line ([`Loop::carried`]).
    pub(in crate::worker) fn put_carried(&mut self, kind: Carried, messages: &[BusMessage]) {
        if self.handoffs.out.is_none() || messages.is_empty() {
            return;
        }
        let records = self.carried(kind, messages);
        let out = self.handoffs.out.as_mut().expect("checked above");
        for record in records {
            out.push_carried(record);
        }
    }

    /// Records of bus messages (`handoff::Carried`), as this worker's: up to
    /// [`CARRIED_BYTES`] of messages each (or one message), well under what a taker reads
    /// ([`crate::handoff::max_record`]).
    pub(in crate::worker) fn carried(
        &self,
        kind: Carried,
        messages: &[BusMessage],
    ) -> Vec<Vec<u8>> {
        let origin = self.ctx.bus.origin;
        let encoded: Vec<Vec<u8>> = messages.iter().map(|m| wire::encode(origin, m)).collect();
        let mut records = Vec::new();
        let mut rest = &encoded[..];
        while !rest.is_empty() {
            let mut bytes = 0;
            let n = (rest.iter())
                .take_while(|m| {
                    bytes += m.len();
                    bytes <= CARRIED_BYTES
                })
                .count()
                .max(1);
            records.push(kind.encode(&rest[..n]));
            rest = &rest[n..];
        }
        records
    }

    /// Puts queued connections on the line while the window has room, and the closing empty
    /// record after the last. One that cannot go after all is closed as the stop closes the
    /// rest.
    pub(in crate::worker) fn handoff_pump(&mut self) {
        if !self.handoffs.parked.is_empty() {
            // Parked connections whose webhook requests have all been answered go first.
            let webhook = self.webhook.as_ref();
            let (ready, still): (Vec<_>, Vec<_>) = (self.handoffs.parked.drain(..))
                .partition(|&(_, id)| !webhook.is_some_and(|w| w.busy(id)));
            self.handoffs.parked = still;
            for entry in ready.into_iter().rev() {
                self.handoffs.queue.push_front(entry);
            }
        }
        loop {
            let Some(out) = &mut self.handoffs.out else {
                return;
            };
            if out.unacked.len() >= super::WINDOW {
                break;
            }
            let Some((idx, id)) = self.handoffs.queue.pop_front() else {
                if !out.ended && self.handoffs.parked.is_empty() {
                    self.give_bus_turn();
                    let out = self.handoffs.out.as_mut().expect("checked above");
                    out.ended = true;
                    out.line.push(&[], None);
                    out.unacked.push_back(Sent::End);
                    log::info!("{} connections handed over", out.handed);
                    self.ctx.bus.crossings_mut().given(Instant::now());
                    self.update_copying();
                }
                break;
            };
            if self.ctx.conns.get(idx).is_none_or(|c| c.id != id) {
                self.handoffs.waiting.remove(&idx);
                continue; // Gone meanwhile.
            }
            self.put_forwarded();
            self.put_held();
            match self.hand_off(idx) {
                Gave::Yes => {
                    self.handoffs.waiting.remove(&idx);
                }
                Gave::Later => {
                    // No descriptor to spare: acknowledgements will free some.
                    self.handoffs.queue.push_front((idx, id));
                    break;
                }
                Gave::Parked => self.handoffs.parked.push((idx, id)),
                Gave::No => {
                    self.handoffs.waiting.remove(&idx);
                    self.ctx
                        .close_with(id, close::GOING_AWAY, "server shutting down");
                }
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
        let app_hands_off = self.app_hands_off();
        if !(conn.is_tls() && conn.session.can_hand_off() && app_hands_off) {
            return false;
        }
        let id = conn.id;
        if !self.handoffs.draining.contains(&id) {
            self.handoffs.draining.push(id);
        }
        true
    }

    /// Closes the kept `wss://` clients with 1012 once their drain has ended.
    pub(in crate::worker) fn drain_ended(&mut self, now: Instant) {
        let h = &mut self.handoffs;
        if h.drain_until.is_none_or(|at| now < at) {
            return;
        }
        h.drain_until = None;
        for id in std::mem::take(&mut h.draining) {
            self.ctx
                .close_with(id, close::SERVICE_RESTART, "service restart: reconnect");
        }
    }

    /// The connections go to the next worker of this slot (a reload keeping it, an upgrade),
    /// not to another slot's (a reload lowering `count`).
    fn hands_within_slot(&self) -> bool {
        let slot = self.ctx.bus.origin.slot as usize;
        self.handoffs
            .out
            .as_ref()
            .is_some_and(|o| o.to.slot == slot)
    }

    /// Whether the app lets its connections go to another worker: a library app with
    /// `on_handoff`, an exec handler (told with `handoff` and `adopt` events), or a webhook
    /// (whose backend keeps its state, and the connection its id).
    fn app_hands_off(&self) -> bool {
        self.hooks.on_handoff.is_some() || self.handler.is_some() || self.webhook.is_some()
    }

    /// Puts connection `idx` on the line if it can go: it is open and plain, and the app can
    /// give its state.
    fn hand_off(&mut self, idx: usize) -> Gave {
        if !self.handoffs.giving() || !self.app_hands_off() {
            return Gave::No;
        }
        let Some(conn) = self.ctx.conns.get(idx) else {
            return Gave::No;
        };
        if conn.is_tls() || !conn.session.can_hand_off() {
            return Gave::No;
        }
        let id = conn.id;
        if self.webhook.as_ref().is_some_and(|w| w.busy(id)) {
            return Gave::Parked;
        }
        // Our copy of the socket, kept until the taker acknowledges it. At the file limit,
        // wait for acknowledgements to free some; with none to wait for, go without it.
        let kept = match conn.socket.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(fd),
            Err(_) if self.copies_held() => return Gave::Later,
            Err(e) => {
                log::warn!("connection {id} goes without a spare descriptor ({e})");
                None
            }
        };
        let app = match self.hooks.on_handoff.is_some() {
            true => match self.call_handoff_hook(id) {
                Some(bytes) => Some(bytes),
                None => return Gave::No,
            },
            false => None,
        };
        // The hook may have closed it, or queued a last message (which travels).
        let Some(session) = self.ctx.conns[idx].session.hand_off() else {
            return Gave::No;
        };
        let from = self.named(id).to_string();
        let user = self.ctx.user_of(id).map(str::to_string);
        let topics = self.ctx.topics_of(id);
        let mut conn = self.ctx.remove_conn(idx);
        self.handshaking.remove(&idx);
        self.ctx.counters.connections -= 1;
        let _ = self.poll.registry().deregister(&mut conn.socket);
        // Its topics and user leave this worker; the taker takes them up.
        let same_slot = self.hands_within_slot();
        self.ctx.hand_over_conn(id, same_slot);
        let listed = &self.ctx.subprotocols;
        let (handed, socket) = conn.into_handed(session, listed, (from, user, topics), app);
        let record = handed.encode();
        let out = self.handoffs.out.as_mut().expect("giving, checked above");
        out.line.push(&record, Some(OwnedFd::from(socket)));
        out.unacked.push_back(Sent::Conn(record, kept));
        out.handed += 1;
        if self.handler.is_some() {
            self.handler_tell(id, Told::Handoff);
        }
        Gave::Yes
    }

    /// Copies of sockets are held for records not yet acknowledged.
    fn copies_held(&self) -> bool {
        (self.handoffs.out.as_ref())
            .is_some_and(|o| (o.unacked.iter()).any(|s| matches!(s, Sent::Conn(_, Some(_)))))
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

    /// Sends what the outgoing line takes.
    pub(in crate::worker) fn handoff_flush(&mut self) {
        let Some(out) = self.handoffs.out.as_mut() else {
            return;
        };
        if let Err(e) = out.line.flush() {
            self.handoff_broke(e);
        }
    }

    /// The outgoing line became writable, or readable: the taker acknowledged records, sent
    /// some of its own (bus messages for the clients still here, or connections coming back),
    /// or went.
    pub(in crate::worker) fn handoff_out_ready(&mut self) {
        let max =
            crate::handoff::max_record(self.settings.max_send_buffer, self.limits.max_message);
        let Some(out) = self.handoffs.out.as_mut() else {
            return;
        };
        let received = out.line.receive(max);
        if let Some(n) = out.line.acknowledged().filter(|&n| n > out.acked) {
            let done = n - out.acked;
            out.acked = n;
            for _ in 0..done {
                // The taker holds it now: our copy of the socket goes.
                out.unacked.pop_front();
            }
        }
        let failure = match received {
            Ok(records) => {
                if Carried::committed_in(&records) {
                    // The taker's upgrade is done: nothing will come back.
                    out.returnable = false;
                }
                if !records.is_empty() {
                    // Bus messages for the clients here, or connections coming back, in a
                    // crossing of their own that goes by the line's key once it turns round.
                    self.take_records(records, true, super::OUT_LINE);
                    if let Some(out) = self.handoffs.out.as_mut() {
                        out.line.acknowledge();
                    }
                }
                None
            }
            Err(e) => Some(e),
        };
        let Some(out) = self.handoffs.out.as_mut() else {
            return;
        };
        // A taker closes the line only once it has read the closing record: if its
        // acknowledgement of that record did not make it, it still took everything.
        let closed = failure.is_some();
        let only_end = (out.unacked.iter()).all(|s| matches!(s, Sent::End));
        let _ = out.line.flush();
        // A crossing's cut is still to go: the line stays until it has.
        let crossing = self.ctx.bus.crossings().giving().is_some() && !closed;
        let all_taken = out.ended
            && !crossing
            && out.line.is_flushed()
            && (out.unacked.is_empty() || closed && only_end);
        if all_taken && self.handoffs.queue.is_empty() && self.handoffs.parked.is_empty() {
            let _ = (self.poll.registry()).deregister(&mut SourceFd(&out.line.fd()));
            let out = self.handoffs.out.take().expect("checked above");
            let taker = format!("{}#{} (pid {})", out.to.group, out.to.slot, out.to.pid);
            log::info!("{taker} took all {} connections", out.handed);
            // This worker may live on (the drain, an upgrade's commit): what the connections
            // took goes back to the system.
            self.handoffs.queue.shrink_to_fit();
            self.handoffs.waiting.shrink_to_fit();
            self.ctx.shrink();
            crate::sys::trim_heap();
            // Kept for what still goes between the two: bus messages for the `wss://` clients
            // drained here, and, in an upgrade, the connections if they come back.
            let draining = !self.handoffs.draining.is_empty();
            if !closed && (out.returnable || draining) {
                self.keep_for_return(out.line, out.to, out.returnable);
            } else {
                self.crossing_line_gone(super::OUT_LINE);
            }
            self.hand_off_deferred();
            return;
        }
        match failure {
            Some(e) => self.handoff_broke(e),
            None => self.handoff_pump(),
        }
    }

    /// The taker went (or the line failed) before acknowledging everything: the connections
    /// it had not taken come back, whole (it never read their sockets), and are served here
    /// until the master names another taker; the bus ends are read here again.
    fn handoff_broke(&mut self, why: LineError) {
        let Some(out) = self.handoffs.out.take() else {
            return;
        };
        let _ = (self.poll.registry()).deregister(&mut SourceFd(&out.line.fd()));
        self.update_copying();
        self.crossing_line_gone(super::OUT_LINE);
        let lost = (out.unacked.iter())
            .filter(|s| matches!(s, Sent::Conn(_, None)))
            .count();
        if lost > 0 {
            log::error!("{lost} connections handed without a spare descriptor are lost");
        }
        let back = (out.unacked.iter())
            .filter(|s| matches!(s, Sent::Conn(_, Some(_))))
            .count();
        let to = format!("{}#{} (pid {})", out.to.group, out.to.slot, out.to.pid);
        log::error!(
            "handoff to {to} broke ({why}); {back} connections it had not taken are served here"
        );
        self.ctx.bus.stop_forwarding();
        // In order: what was delivered here after a client left goes to that client now.
        let mut returned = std::collections::HashSet::new();
        for sent in out.unacked {
            match sent {
                Sent::Conn(record, Some(fd)) => {
                    if let Some(id) = self.take_record(&record, Some(fd)) {
                        self.handoffs.taken_back.insert(id);
                        returned.insert(id);
                    }
                }
                Sent::Carried(record) => self.take_back_carried(&record, &returned),
                Sent::Conn(_, None) | Sent::End => {}
            }
        }
        // The crossing ends: what was delivered here from other hosts since the copies last
        // went is owed to the clients that came back too.
        self.ctx.bus.crossings_mut().cut_now();
        if let Some(ToLine::Cut { copies, .. }) = self.ctx.bus.crossing_for_line() {
            for msg in copies {
                self.ctx.deliver_only(msg, &returned);
            }
        }
        // Those still waiting for their turn never left: they are read here again.
        self.handoffs.waiting.clear();
        let parked = std::mem::take(&mut self.handoffs.parked);
        for (idx, id) in std::mem::take(&mut self.handoffs.queue)
            .into_iter()
            .chain(parked)
        {
            self.handoffs.taken_back.insert(id);
            self.again.push(idx);
        }
        if self.ctx.bus.take_back_turn() {
            self.watch_bus_again();
        }
        if self.handoffs.orphaned {
            // Handing back, with no master to name another taker: they are closed as a stop
            // closes its clients.
            for id in std::mem::take(&mut self.handoffs.taken_back) {
                self.ctx
                    .close_with(id, close::GOING_AWAY, "server shutting down");
            }
        }
        self.hand_off_deferred();
    }

    /// The bus ends this worker left to its taker are its own again: watched, and read.
    pub(in crate::worker) fn watch_bus_again(&mut self) {
        let ends: Vec<(usize, i32)> = (self.ctx.bus.ends())
            .map(|(peer, end)| (peer, end.as_raw_fd()))
            .collect();
        for (peer, fd) in ends {
            let token = mio::Token(crate::worker::event_loop::BUS_BASE + peer);
            let registry = self.poll.registry();
            let _ = registry.register(&mut SourceFd(&fd), token, Interest::READABLE);
            self.bus_ready(peer);
        }
    }

    /// Whether a connection that just completed its upgrade during the stop went to the new
    /// worker, or is kept until the drain ends (instead of being closed now).
    pub(in crate::worker) fn handed_when_stopping(&mut self, id: ConnId) -> bool {
        if !self.handoffs.giving() {
            return false;
        }
        let Some(idx) = self.ctx.index_of(id) else {
            return false;
        };
        if self.queue_for_handoff(idx) {
            if let Some(out) = self.handoffs.out.as_mut().filter(|o| o.ended) {
                // The empty record went already: this one follows it, in a crossing of its
                // own.
                out.ended = false;
                self.begin_crossing();
            }
            self.handoff_pump();
            return true;
        }
        if self.keep_tls(idx) {
            let h = &mut self.handoffs;
            h.drain_until
                .get_or_insert_with(|| Instant::now() + h.drain);
            return true;
        }
        false
    }
}
