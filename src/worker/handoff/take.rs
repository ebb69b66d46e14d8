//! The taking side: a new worker registers the connections its predecessor hands over.
//!
//! It reads records as they come and makes each socket one of its own connections: subscribed
//! to its topics, bound to its user, its send queue ready to flush. It acknowledges them before
//! it reads any of their sockets (the giver keeps its copy until then); a client whose next
//! bytes are already waiting is read in the next turn, as its registration reports it ready.

use super::{ADOPT_BASE, Incoming};
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

impl Loop {
    /// The master's word that `from` will hand its connections over the line `fd`; `None`:
    /// the worker this one replaces is gone, and its bus ends are this one's to read.
    pub(in crate::worker) fn adopt_from(&mut self, from: Option<Peer>, fd: Option<OwnedFd>) {
        let Some(from) = from else {
            self.take_the_bus();
            return;
        };
        // Connections from another slot's worker, taken while the group holds its messages:
        // what waits on this worker's ends was sent before the hold, and is for the clients
        // here now, not for those coming (their worker reads theirs before it hands them).
        self.drain_bus();
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
            taken: 0,
            adopted: 0,
            told: false,
        });
    }

    /// Records arrived on incoming line `key` (or it closed).
    pub(in crate::worker) fn adopt_ready(&mut self, key: usize) {
        let max = handoff::max_record(self.settings.max_send_buffer, self.limits.max_message);
        let Some(incoming) = self.handoffs.incoming.get_mut(key) else {
            return;
        };
        let received = incoming.line.receive(max);
        let ended = incoming.line.is_ended();
        let records = match received {
            Ok(records) => records,
            Err(e) => {
                // However the line ended, its sender reads the bus no more.
                self.taken_all(key);
                let incoming = self.handoffs.incoming.remove(key);
                let _ = (self.poll.registry()).deregister(&mut SourceFd(&incoming.line.fd()));
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
        let count = records.len() as u32;
        let mut adopted = 0;
        let mut last = false;
        for (record, fd) in records {
            if record.is_empty() {
                last = true;
                continue;
            }
            adopted += usize::from(self.take_record(&record, fd).is_some());
        }
        if let Some(incoming) = self.handoffs.incoming.get_mut(key) {
            // Registered, not yet read: the giver may let its copies go.
            incoming.taken += count;
            incoming.adopted += adopted;
            incoming.line.acknowledge(incoming.taken);
            let _ = incoming.line.flush();
        }
        if last {
            self.taken_all(key);
        }
        if ended {
            // Its end was read with these records: no event will say so again.
            self.adopt_ready(key);
        }
    }

    /// The giver on line `key` has put its last record on it, or the line ended: it reads the
    /// bus ends it shared with this worker no more, and the master may begin the next
    /// handoff. Said once per line, whichever comes first: a second `Taken`, from a line
    /// that closes late, would end the master's wait for the next handoff to this worker
    /// before it has taken anything.
    fn taken_all(&mut self, key: usize) {
        let Some(incoming) = self.handoffs.incoming.get_mut(key) else {
            return;
        };
        if std::mem::replace(&mut incoming.told, true) {
            return;
        }
        self.take_the_bus();
        self.channel.answer(&crate::control::FromWorker::Taken);
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
            Carried::Delivered => {
                for msg in messages {
                    self.ctx.deliver_only(msg, returned);
                }
            }
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
fn carried_in(record: &[u8]) -> Option<(Carried, Vec<BusMessage>)> {
    let (kind, carried) = Carried::decode(record)?;
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
