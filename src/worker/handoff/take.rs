//! The taking side: a new worker registers the connections its predecessor hands over.
//!
//! It reads records as they come and makes each socket one of its own connections: subscribed
//! to its topics, bound to its user, its send queue ready to flush. It acknowledges them before
//! it reads any of their sockets (the giver keeps its copy until then); a client whose next
//! bytes are already waiting is read in the next turn, as its registration reports it ready.

use super::{ADOPT_BASE, Incoming, Way};
use crate::ConnId;
use crate::bus::bridges::Peer;
use crate::bus::wire::{self, BusMessage};
use crate::handoff::line::{Line, LineError};
use crate::handoff::{self, Carried, Handed};
use crate::proto::Session;
use crate::proto::deflate::{Codec, Settings, Stream};
use crate::worker::conn::Conn;
use crate::worker::errors::ConnError;
use crate::worker::event_loop::{CONN_BASE, Loop};
use crate::worker::handler::Told;
use mio::net::TcpStream;
use mio::unix::SourceFd;
use mio::{Interest, Token};
use std::os::fd::OwnedFd;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Duration;

impl Loop {
    /// The master's word that `from` will hand its connections over the line `fd`; `None`:
    /// the worker this one replaces is gone, and its bus ends are this one's to read.
    /// `returnable` (`wsd upgrade`): the line is kept until the upgrade is done, and this
    /// worker no longer dies with its master: if the master dies first, everything goes back,
    /// in `protocol`, the one `from` speaks.
    pub(in crate::worker) fn adopt_from(
        &mut self,
        from: Option<Peer>,
        fd: Option<OwnedFd>,
        returnable: bool,
        protocol: u16,
    ) {
        let Some(from) = from else {
            self.take_the_bus();
            return;
        };
        let returnable = returnable && !self.handoffs.committed && self.outlive_master();
        // Connections from another slot's worker, taken while the group holds its messages:
        // what waits on this worker's ends was sent before the hold, and is for the clients
        // here now, not for those coming (their worker reads theirs before it hands them).
        self.drain_bus();
        let line = fd.map(Line::new).transpose().ok().flatten();
        let Some(line) = line.map(|l| l.speaking(protocol)) else {
            log::warn!(
                "cannot take the handoff line from {}#{}",
                from.group,
                from.slot
            );
            self.take_the_bus();
            return;
        };
        if self
            .watch_line(line, from, Way::Forth { returnable })
            .is_none()
        {
            self.take_the_bus();
        }
    }

    /// Reads `line` from now on; its key, or `None` if the poll cannot watch it.
    fn watch_line(&mut self, line: Line, from: Peer, way: Way) -> Option<usize> {
        let entry = self.handoffs.incoming.vacant_entry();
        let key = entry.key();
        let fd = line.fd();
        let registry = self.poll.registry();
        match registry.register(
            &mut SourceFd(&fd),
            Token(ADOPT_BASE + key),
            Interest::READABLE,
        ) {
            Ok(()) => {
                entry.insert(Incoming::new(line, from, way));
                Some(key)
            }
            Err(e) => {
                log::warn!(
                    "cannot watch the handoff line with {}#{}: {e}",
                    from.group,
                    from.slot
                );
                None
            }
        }
    }

    /// This worker stops dying with its master (`PR_SET_PDEATHSIG`), so that it can hand its
    /// connections back if the master dies mid-upgrade; false if it cannot.
    fn outlive_master(&mut self) -> bool {
        if self.handoffs.outlived.is_some() {
            return true;
        }
        let master = nix::unistd::getppid();
        match crate::sys::outlive_parent() {
            Ok(()) => {
                self.handoffs.outlived = Some(master);
                true
            }
            Err(e) => {
                log::warn!("cannot outlive the master ({e}); the upgrade's lines are not kept");
                false
            }
        }
    }

    /// A handoff this worker made is all taken, and `line` is kept: what goes on it now is bus
    /// messages for the clients each side serves of this slot (the `wss://` ones drained
    /// here, those it took), and, if `returnable`, the taker's connections coming back; its
    /// end says the drain or the upgrade is over. A crossing of connections already coming
    /// back goes by the line's new key.
    pub(in crate::worker) fn keep_for_return(&mut self, line: Line, to: Peer, returnable: bool) {
        match self.watch_line(line, to, Way::Back { returnable }) {
            Some(key) => {
                self.ctx.bus.crossings_mut().rekey(super::OUT_LINE, key);
                self.update_copying();
                // What came with the last acknowledgement raises no event of its own.
                self.adopt_ready(key);
            }
            None => self.crossing_line_gone(super::OUT_LINE),
        }
    }

    /// Copies what this worker delivers for the workers at the other end of its lines while
    /// any of them serves clients of this slot ([`Incoming::partner`]), and only then.
    /// So while this worker's last record is on its way to its taker, with `wss://` clients
    /// kept here: the taker serves the rest of the slot.
    pub(in crate::worker) fn update_copying(&mut self) {
        let h = &self.handoffs;
        let ended = h.out.as_ref().is_some_and(|o| o.ended) && !h.draining.is_empty();
        let any = ended || (h.incoming.iter()).any(|(_, i)| i.partner());
        self.ctx.bus.copy_for_partners(any);
    }

    /// At the end of each turn: what this worker delivered goes to the workers at the other
    /// end of its lines that serve clients of its slot; and a line kept only for the drain of
    /// `wss://` clients here closes once they have all gone.
    pub(in crate::worker) fn copy_to_partners(&mut self) {
        let copies = self.ctx.bus.take_copies();
        if !copies.is_empty() {
            let records = self.carried(Carried::Delivered, &copies);
            for (_, incoming) in self.handoffs.incoming.iter_mut() {
                if incoming.partner() {
                    for record in &records {
                        incoming.line.push(record, None);
                    }
                    let _ = incoming.line.flush();
                }
            }
            // After the closing record: the taker reads them as its partner's.
            if self.handoffs.out.as_ref().is_some_and(|o| o.ended) {
                self.put_carried(Carried::Delivered, &copies);
                if let Some(out) = self.handoffs.out.as_mut() {
                    // A line that failed is found so when it is next ready.
                    let _ = out.line.flush();
                }
            }
        }
        if !self.ctx.conns.is_empty() {
            return;
        }
        let drained: Vec<usize> = (self.handoffs.incoming.iter())
            .filter(|(_, i)| i.way == Way::Back { returnable: false })
            .map(|(key, _)| key)
            .collect();
        for key in drained {
            self.close_line(key);
        }
    }

    /// The master has gone with the upgrade not done: every connection goes back to the
    /// worker that handed this one its clients, over the line kept for that, once all it
    /// sent is taken and the crossings this worker takes have ended (the clients have had
    /// every message from other hosts once; `bus::crossing`). False if no line is kept for it.
    pub(in crate::worker) fn hand_back(&mut self) -> bool {
        let returnable = Way::Forth { returnable: true };
        let line = (self.handoffs.incoming.iter()).find(|(_, i)| i.way == returnable);
        let Some((key, done)) = line.map(|(key, i)| (key, i.done)) else {
            return false;
        };
        self.handoffs.orphaned = true;
        if !done || self.ctx.bus.crossings().is_taking() {
            return true;
        }
        // What was delivered here this turn goes to the old worker first.
        self.copy_to_partners();
        let incoming = self.handoffs.incoming.remove(key);
        let _ = (self.poll.registry()).deregister(&mut SourceFd(&incoming.line.fd()));
        self.update_copying();
        self.crossing_line_gone(key);
        let from = incoming.from;
        // `from` names the worker's master (the new master knows no more of the old worker).
        log::warn!(
            "the master has gone before the upgrade was done: handing every connection back to \
             {}#{} of the master with pid {}",
            from.group,
            from.slot,
            from.pid
        );
        let times = (Duration::ZERO, Duration::ZERO);
        self.hand_off_on(from, Some(incoming.line), false, times);
        true
    }

    /// The upgrade is done (`ToWorker::Commit`): the lines kept for a hand-back say so (their
    /// givers close them once their last clients have gone, and exit), and this worker dies
    /// with its master again.
    pub(in crate::worker) fn commit_upgrade(&mut self) {
        self.handoffs.committed = true;
        let kept: Vec<usize> = (self.handoffs.incoming.iter())
            .filter(|(_, i)| i.kept())
            .map(|(key, _)| key)
            .collect();
        for key in kept {
            self.say_committed(key);
        }
        if let Some(master) = self.handoffs.outlived.take()
            && let Err(e) = crate::sys::die_with_parent(master)
        {
            log::warn!("cannot tie this worker to its master again: {e}");
        }
    }

    /// Tells the giver on kept line `key` that nothing will come back. It may still serve
    /// `wss://` clients: it closes the line once they have gone, and until then the two go
    /// on sending each other what they deliver.
    fn say_committed(&mut self, key: usize) {
        let incoming = &mut self.handoffs.incoming[key];
        incoming.line.push(&Carried::Committed.encode(&[]), None);
        let _ = incoming.line.flush();
        incoming.way = Way::Forth { returnable: false };
    }

    /// Stops reading incoming line `key` and closes it.
    fn close_line(&mut self, key: usize) {
        let mut incoming = self.handoffs.incoming.remove(key);
        let _ = incoming.line.flush();
        let _ = (self.poll.registry()).deregister(&mut SourceFd(&incoming.line.fd()));
        self.update_copying();
        self.crossing_line_gone(key);
    }

    /// Records arrived on incoming line `key` (or it closed).
    pub(in crate::worker) fn adopt_ready(&mut self, key: usize) {
        let max = handoff::max_record(self.settings.max_send_buffer, self.limits.max_message);
        let Some(incoming) = self.handoffs.incoming.get_mut(key) else {
            return;
        };
        let received = incoming.line.receive(max);
        let ended = incoming.line.is_ended();
        let back = matches!(incoming.way, Way::Back { .. });
        if back && received.as_ref().is_ok_and(|r| Carried::committed_in(r)) {
            // Nothing will come back: the line stays for the drain only.
            incoming.way = Way::Back { returnable: false };
        }
        let records = match received {
            Ok(records) => records,
            Err(e) => {
                let finished = incoming.done;
                // However the line ended, its sender reads the bus no more.
                self.taken_all(key);
                let Some(incoming) = self.handoffs.incoming.try_remove(key) else {
                    return;
                };
                let _ = (self.poll.registry()).deregister(&mut SourceFd(&incoming.line.fd()));
                self.update_copying();
                self.crossing_line_gone(key);
                let from = &incoming.from;
                let took = incoming.adopted;
                match e {
                    // After its closing record: the drain or the upgrade is over.
                    LineError::Closed if finished => {}
                    LineError::Closed => log::warn!(
                        "the handoff line with {}#{} (pid {}) ended after {took} connections",
                        from.group,
                        from.slot,
                        from.pid
                    ),
                    e => log::error!(
                        "handoff with {}#{} broken after {took} connections: {e}",
                        from.group,
                        from.slot
                    ),
                }
                if back && self.ctx.take_bus_turn() {
                    // It ended while handing connections back: the bus ends are this
                    // worker's again.
                    self.watch_bus_again();
                }
                self.hand_off_deferred();
                if self.handoffs.orphaned && !back {
                    // No master, and the worker to hand back to has gone too.
                    self.stop(crate::control::StopMode::Close, Duration::ZERO);
                }
                return;
            }
        };
        self.took(key, records, back);
        if ended {
            // Its end was read with these records: no event will say so again.
            self.adopt_ready(key);
        }
    }

    /// Takes the records that came on incoming line `key`, and acknowledges them.
    fn took(&mut self, key: usize, records: Vec<handoff::line::Record>, back: bool) {
        let came = !records.is_empty();
        let (adopted, last) = self.take_records(records, back, key);
        if let Some(incoming) = self.handoffs.incoming.get_mut(key).filter(|_| came) {
            // Registered, not yet read: the giver may let its copies go.
            incoming.adopted += adopted;
            incoming.line.acknowledge();
            let _ = incoming.line.flush();
        }
        if last {
            if let Some(i) = self.handoffs.incoming.get(key) {
                let (from, took) = (&i.from, i.adopted);
                let (group, slot, pid) = (&from.group, from.slot, from.pid);
                match back {
                    false => log::info!("took {took} connections from {group}#{slot} (pid {pid})"),
                    true => {
                        log::info!("took {took} connections back from {group}#{slot} (pid {pid})")
                    }
                }
            }
            self.taken_all(key);
        }
        // The giver's cut may have ended the crossing a hand-back or a handoff waits for: it
        // begins now that what came on the line is acknowledged.
        self.crossing_ended();
    }

    /// Takes records that came on a line, in order: connections ([`Loop::adopt`]) and bus
    /// messages ([`Loop::take_record`]). `back`: from the worker this one handed its
    /// connections to; those are served here until the master names the slot's next worker,
    /// and the bus ends are that worker's until its closing record. `line`: the key a
    /// crossing on the line goes by. Returns how many connections were adopted, and whether
    /// the closing record came.
    pub(in crate::worker) fn take_records(
        &mut self,
        records: Vec<handoff::line::Record>,
        back: bool,
        line: usize,
    ) -> (usize, bool) {
        let returning = records.iter().any(|(r, _)| Carried::of(r).is_none());
        if back && returning {
            self.ctx.bus.await_turn_back();
        }
        let (mut adopted, mut last) = (0, false);
        for (record, fd) in records {
            if record.is_empty() {
                last = true;
                self.ask_mark(line);
                continue;
            }
            if let Some(kind @ (Carried::Crossing | Carried::Remote | Carried::Cut)) =
                Carried::of(&record)
            {
                self.take_crossing(kind, &record, line);
                continue;
            }
            if let Some(id) = self.take_record(&record, fd) {
                adopted += 1;
                if back {
                    self.handoffs.taken_back.insert(id);
                }
                let topics = self.ctx.topics_of(id);
                self.ctx.bus.crossings_mut().adopted(line, id, topics);
            }
        }
        if back && last && self.ctx.take_bus_turn() {
            self.watch_bus_again();
        }
        (adopted, last)
    }

    /// The giver on line `key` has put its last record on it, or the line ended: it reads the
    /// bus ends it shared with this worker no more, and the master may begin the next
    /// handoff. Said once per line, whichever comes first: a second `Taken`, from a line
    /// that closes late, would end the master's wait for the next handoff to this worker
    /// before it has taken anything.
    ///
    /// From then on what this worker delivers is copied to the giver, for the clients of
    /// this slot it still serves. A line kept for a hand-back closes now if the upgrade is
    /// done, or turns round if the master has gone meanwhile.
    fn taken_all(&mut self, key: usize) {
        let Some(incoming) = self.handoffs.incoming.get_mut(key) else {
            return;
        };
        if std::mem::replace(&mut incoming.done, true) {
            return;
        }
        let Way::Forth { returnable } = incoming.way else {
            return; // Connections came back to a retiring worker: no master waits on it.
        };
        // Before the bus: the messages held until now go to the giver's clients too.
        self.update_copying();
        self.take_the_bus();
        self.channel.answer(&crate::control::FromWorker::Taken);
        let open = (self.handoffs.incoming.get(key)).is_some_and(|i| !i.line.is_ended());
        if open && returnable {
            if self.handoffs.committed {
                self.say_committed(key);
            } else if self.handoffs.orphaned {
                self.hand_back();
            }
        }
    }

    /// Starts reading the bus ends taken over from the previous worker, which has stopped:
    /// what waits on them now is read here, and applied to the connections it handed over,
    /// after the group messages this worker held until then have gone out to all of them.
    fn take_the_bus(&mut self) {
        if !self.ctx.take_bus_turn() {
            return;
        }
        let peers: Vec<usize> = self.ctx.bus.ends().map(|(peer, _)| peer).collect();
        log::debug!("reading the bus ends of the worker replaced");
        for peer in peers {
            self.bus_ready(peer);
        }
    }

    /// Takes one record of the line: a connection ([`Loop::adopt`]), or bus messages: those
    /// the giver delivered to its clients meanwhile, delivered here to the clients it already
    /// handed over (and this worker's own); or those it held, held here until the hold ends
    /// (or sent now, if it has).
    pub(in crate::worker) fn take_record(
        &mut self,
        record: &[u8],
        fd: Option<OwnedFd>,
    ) -> Option<ConnId> {
        let Some((kind, messages)) = carried_in(record) else {
            return self.adopt(record, fd);
        };
        match kind {
            Carried::Held => self.ctx.release_group(messages),
            Carried::Delivered => {
                for msg in messages {
                    self.ctx.deliver_local(msg);
                }
            }
            Carried::Committed | Carried::Crossing | Carried::Remote | Carried::Cut => {}
        }
        None
    }

    /// A record of bus messages that came back from a broken line, in order after the clients
    /// that came back before it: those held are held here (or sent), and those delivered go
    /// to the returned clients only, which had left before they were delivered here.
    pub(in crate::worker) fn take_back_carried(
        &mut self,
        record: &[u8],
        returned: &std::collections::HashSet<ConnId>,
    ) {
        let Some((kind, messages)) = carried_in(record) else {
            return;
        };
        match kind {
            Carried::Held => self.ctx.release_group(messages),
            // Delivered here, from this host or another, once they had gone.
            Carried::Delivered | Carried::Remote => {
                for msg in messages {
                    self.ctx.deliver_only(msg, returned);
                }
            }
            Carried::Committed | Carried::Crossing | Carried::Cut => {}
        }
    }

    /// Takes one handed connection into this worker. `None` if the record cannot be read (the
    /// socket is then closed: that client reconnects).
    pub(in crate::worker) fn adopt(
        &mut self,
        record: &[u8],
        fd: Option<OwnedFd>,
    ) -> Option<ConnId> {
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
        let ip_slot = self.accepting.adopt(&self.settings, handed.remote.ip());
        let listed = &self.ctx.subprotocols;
        let id = handed.id;
        if self.ctx.conn(id).is_some() {
            log::error!(
                "a handed connection from {} is lost: its id {id} is taken here",
                handed.remote
            );
            return None;
        }
        let conn = Conn::adopted(id, socket, ip_slot, session, &mut handed, listed);
        let idx = self.ctx.conns.vacant_key();
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
        self.ctx.insert_conn(conn);
        self.ctx.counters.connections += 1;
        let here = self.named(id).to_string();
        let same_slot = handed.from == here;
        self.ctx
            .take_over_conn(id, handed.user.as_deref(), &handed.topics, same_slot);
        self.call_adopt_hook(id, handed.app.as_deref().unwrap_or_default());
        // A webhook's backend hears of it only if its id changed (another slot's worker).
        if self.handler.is_some() || (self.webhook.is_some() && !same_slot) {
            let told = Told::Adopt {
                from: &handed.from,
                topics: &handed.topics,
            };
            self.handler_tell(id, told);
        }
        if queued {
            self.ctx.mark_dirty(idx);
        }
        // No read now: registering a socket whose client has already sent something raises
        // its readiness event at once (epoll checks at `EPOLL_CTL_ADD`), and an idle one would
        // cost a read that only says "would block".
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
}

/// The bus messages in `record`, if it is a record of them (`handoff::Carried`); those that
/// cannot be read are logged and lost.
pub(super) fn carried_in(record: &[u8]) -> Option<(Carried, Vec<BusMessage>)> {
    let (kind, carried) = Carried::decode(record)?;
    if kind == Carried::Crossing {
        return Some((kind, Vec::new())); // A token, not messages.
    }
    let messages = carried.unwrap_or_else(|e| {
        log::error!("bus messages from a handoff are lost: {e}");
        Vec::new()
    });
    let messages = (messages.iter())
        .filter_map(|m| match wire::decode(m) {
            Ok((_, msg)) => Some(msg),
            Err(e) => {
                log::error!("a bus message from a handoff is lost: {e}");
                None
            }
        })
        .collect();
    Some((kind, messages))
}
