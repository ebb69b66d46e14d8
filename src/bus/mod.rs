//! The bus: how a hook reaches clients that other workers hold.
//!
//! Each group is one bus. Its workers on this host are wired to each other by the master
//! (`mesh.rs`) and exchange [`wire`] messages directly, never through the master's loop. With
//! `[server] bus = "redis://..."` the same messages also go through Redis pub/sub
//! (`cluster.rs`), so groups of the same name on several hosts form one bus. A message names
//! what the receiving worker should do — send to all its clients, to one, to a topic's
//! subscribers, or hand it to the app — and each receiving worker encodes the WebSocket frame
//! once for all of its clients.

pub mod bridges;
#[cfg(feature = "cluster")]
pub mod cluster;
pub(crate) mod crossing;
pub mod directory;
mod global_id;
pub mod mesh;
pub mod wire;

use crate::control::BusState;
#[cfg(feature = "cluster")]
use cluster::{Cluster, ClusterSettings, Interest, Target};
use crossing::{Crossings, ToLine};
pub use global_id::{BadGlobalId, GlobalId};
use std::io;
use std::os::fd::OwnedFd;
use wire::{BusMessage, Origin};

/// What the bus has done, for `status`.
#[derive(Debug, Default, Clone, Copy)]
pub struct BusStats {
    pub sent: u64,
    pub received: u64,
    /// Messages a full or gone peer could not take, or Redis could not (down, or behind).
    pub dropped: u64,
}

/// A worker's way to the other hosts, if the server has `[server] bus`.
enum Remote {
    None,
    /// Set up in the master; started by the worker's loop ([`Bus::start_cluster`]).
    #[cfg(feature = "cluster")]
    Configured(ClusterSettings),
    #[cfg(feature = "cluster")]
    Running(Cluster),
}

/// Whose turn it is to read a worker's ends when they are shared with the worker of the same
/// slot in the other generation (a reload or an upgrade that keeps `count`). Every message on
/// them is read by exactly one of the two: the old worker up to the moment it has handed its
/// connections over (what it did with a message travels in their send queues), the new one
/// from then on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Turn {
    /// Ours.
    #[default]
    Reading,
    /// Still the worker this one replaces: its handoff ends the wait.
    Awaiting,
    /// The new worker's: this one has handed its connections over.
    Given,
}

/// Group messages a worker may hold while it awaits its turn; more are dropped (and counted).
const MAX_HELD: usize = 65_536;

/// A worker's side of its group's bus.
pub(crate) struct Bus {
    pub origin: Origin,
    /// The end to each other worker of the group on this host, by slot.
    peers: Vec<Option<OwnedFd>>,
    remote: Remote,
    pub stats: BusStats,
    turn: Turn,
    /// Every group message is held until the master says to resume: a reload that lowers
    /// `count` is moving a retiring worker's clients to another slot (`ToWorker::Hold`).
    holding: bool,
    /// Group messages made while the turn was awaited or the group held, to send later.
    held: Vec<BusMessage>,
    /// The slots this worker sends to: those below `view` (the group's count, or, while a
    /// reload changes it, the larger of the two counts).
    view: usize,
    /// While this worker hands its clients to the next worker of its slot and still reads the
    /// slot's ends, what it delivers is copied here for that worker (`forward`).
    forwarding: Copies,
    /// While a worker at the other end of a handoff line still serves some of this slot's
    /// clients (`wss://` ones drained after a handoff), what this worker delivers is copied
    /// here for it too (`forward`).
    copies: Copies,
    /// Messages from other hosts for the clients of a handoff (`crossing.rs`).
    crossings: Crossings,
}

/// Copies of the messages a worker delivers, kept while on, for another worker.
#[derive(Default)]
struct Copies(Option<Vec<BusMessage>>);

impl Copies {
    /// Starts copying, or stops and drops the copies not taken.
    fn set(&mut self, on: bool) {
        match on {
            true => drop(self.0.get_or_insert_with(Vec::new)),
            false => self.0 = None,
        }
    }

    /// The copies made since the last call.
    fn take(&mut self) -> Vec<BusMessage> {
        self.0.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn push(&mut self, msg: &BusMessage) {
        if let Some(copies) = &mut self.0 {
            copies.push(msg.clone());
        }
    }
}

impl Bus {
    pub fn new(origin: Origin, peers: Vec<Option<OwnedFd>>) -> Bus {
        Bus {
            origin,
            peers,
            remote: Remote::None,
            stats: BusStats::default(),
            turn: Turn::Reading,
            holding: false,
            held: Vec::new(),
            view: usize::MAX,
            forwarding: Copies::default(),
            copies: Copies::default(),
            crossings: Crossings::default(),
        }
    }

    /// Copies what this worker delivers from now on, for the worker taking its clients.
    pub fn start_forwarding(&mut self) {
        self.forwarding.set(true);
    }

    /// Stops copying, and drops the copies not taken.
    pub fn stop_forwarding(&mut self) {
        self.forwarding.set(false);
    }

    /// The copies made since the last call.
    pub fn take_forwarded(&mut self) -> Vec<BusMessage> {
        self.forwarding.take()
    }

    /// Copies what this worker delivers from now on for the workers that still serve some of
    /// its slot's clients at the other end of a handoff line; `false` stops, dropping the
    /// copies not taken.
    pub fn copy_for_partners(&mut self, on: bool) {
        self.copies.set(on);
    }

    /// The copies for partners made since the last call.
    pub fn take_copies(&mut self) -> Vec<BusMessage> {
        self.copies.take()
    }

    /// Copies a message this worker delivers to its own clients (a broadcast, a publish, a
    /// user's, a `send_to`), if it is forwarding or copying for partners.
    pub fn forward(&mut self, msg: &BusMessage) {
        if msg.is_for_clients() {
            self.forwarding.push(msg);
            self.copies.push(msg);
        }
    }

    /// Sends only to the slots below `view`.
    pub fn with_view(mut self, view: usize) -> Bus {
        self.view = view;
        self
    }

    /// Marks the ends as taken over from the slot's previous worker, which still reads them
    /// until it has handed its connections over: this worker reads them only from then on.
    pub fn inherited(mut self) -> Bus {
        self.turn = Turn::Awaiting;
        self
    }

    /// Whether this worker reads its ends now.
    pub fn reads(&self) -> bool {
        self.turn == Turn::Reading
    }

    /// This worker has handed its connections over: the ends are its successor's to read.
    /// False if it was not reading them.
    pub fn give_turn(&mut self) -> bool {
        let mine = self.turn == Turn::Reading;
        if mine {
            self.turn = Turn::Given;
        }
        mine
    }

    /// The handoff broke: the ends are this worker's again. False if it had not given them.
    pub fn take_back_turn(&mut self) -> bool {
        let given = self.turn == Turn::Given;
        if given {
            self.turn = Turn::Reading;
        }
        given
    }

    /// The worker this one handed its connections to is handing them back (its master died
    /// mid-upgrade): the ends are this worker's again once it has. False if it had not given
    /// them.
    pub fn await_turn_back(&mut self) -> bool {
        let given = self.turn == Turn::Given;
        if given {
            self.turn = Turn::Awaiting;
        }
        given
    }

    /// The previous worker has stopped reading the ends: they are this worker's from now on.
    /// Returns the group messages held meanwhile (none while the group is held), or `None` if
    /// the turn was not awaited.
    pub fn take_turn(&mut self) -> Option<Vec<BusMessage>> {
        if self.turn != Turn::Awaiting {
            return None;
        }
        self.turn = Turn::Reading;
        Some(self.release())
    }

    /// Holds every group message from now on (`ToWorker::Hold`).
    pub fn hold_all(&mut self) {
        self.holding = true;
    }

    /// Ends a hold, sending to the slots below `view` from now on; returns the messages held
    /// (none while the turn is still awaited).
    pub fn resume(&mut self, view: usize) -> Vec<BusMessage> {
        self.holding = false;
        self.view = view;
        self.release()
    }

    /// Sends to the slots below `view` from now on (a reload raising `count`).
    pub fn set_view(&mut self, view: usize) {
        self.view = view;
    }

    fn release(&mut self) -> Vec<BusMessage> {
        match self.holds() {
            true => Vec::new(),
            false => std::mem::take(&mut self.held),
        }
    }

    /// The group messages held, taken away: a retiring worker gives them to the worker that
    /// takes its clients, which sends them when the hold ends.
    pub fn take_held(&mut self) -> Vec<BusMessage> {
        std::mem::take(&mut self.held)
    }

    /// Group messages are held now: the turn is awaited, or the group is held.
    fn holds(&self) -> bool {
        self.turn == Turn::Awaiting || self.holding
    }

    /// While the turn is awaited, keeps a group message (a broadcast, a publish, a user's)
    /// to send when it comes, and returns `None`: the previous worker still holds some of the
    /// slot's clients, which a message sent now would miss, since no end leads from a slot to
    /// itself. So while the group is held. Otherwise gives the message back, to send now.
    pub fn hold(&mut self, msg: BusMessage) -> Option<BusMessage> {
        if !self.holds() {
            return Some(msg);
        }
        if self.held.len() < MAX_HELD {
            self.held.push(msg);
        } else {
            self.stats.dropped += 1;
        }
        None
    }

    /// Joins the cluster bus too, once [`Bus::start_cluster`] runs in the worker.
    #[cfg(feature = "cluster")]
    pub fn with_cluster(mut self, settings: Option<ClusterSettings>) -> Bus {
        self.remote = settings.map_or(Remote::None, Remote::Configured);
        self
    }

    /// Starts the cluster bus's helper threads, if the server has one: in the worker process,
    /// never in the master (it forks). What they receive wakes the loop with `token`.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub fn start_cluster(&mut self, registry: &mio::Registry, token: mio::Token) -> io::Result<()> {
        #[cfg(feature = "cluster")]
        if let Remote::Configured(settings) = &self.remote {
            let cluster = Cluster::start(settings.clone(), self.origin, registry, token)?;
            self.remote = Remote::Running(cluster);
        }
        Ok(())
    }

    /// `local`, or the Redis link's state (`redis up`, ...), for the worker's reports.
    pub fn state(&self) -> BusState {
        match &self.remote {
            Remote::None => BusState::Local,
            #[cfg(feature = "cluster")]
            Remote::Configured(_) => BusState::Connecting,
            #[cfg(feature = "cluster")]
            Remote::Running(c) => c.state().into(),
        }
    }

    /// Topic channels this worker listens to in Redis (0 without a cluster bus).
    pub fn routed_topics(&self) -> usize {
        match &self.remote {
            #[cfg(feature = "cluster")]
            Remote::Running(c) => c.routed_topics(),
            _ => 0,
        }
    }

    /// The counts of both the mesh and Redis.
    pub fn totals(&self) -> BusStats {
        let (sent, dropped) = match &self.remote {
            #[cfg(feature = "cluster")]
            Remote::Running(c) => c.counts(),
            _ => (0, 0),
        };
        BusStats {
            sent: self.stats.sent + sent,
            received: self.stats.received,
            dropped: self.stats.dropped + dropped,
        }
    }

    /// The crossings of messages from other hosts this worker takes part in.
    pub fn crossings(&self) -> &Crossings {
        &self.crossings
    }

    pub fn crossings_mut(&mut self) -> &mut Crossings {
        &mut self.crossings
    }

    /// Begins a crossing as the giver (or names the one under way anew), if messages come
    /// from other hosts: its token, for the taker to mark.
    pub fn give_crossing(&mut self) -> Option<u64> {
        #[cfg(feature = "cluster")]
        if let Remote::Running(_) = &self.remote {
            let token = self.crossings.name();
            self.crossings.give(token);
            return Some(token);
        }
        None
    }

    /// Publishes the mark of crossing `token` (`crossing.rs`), after the topics asked for.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub fn mark(&mut self, token: u64) {
        #[cfg(feature = "cluster")]
        if let Remote::Running(c) = &self.remote {
            c.mark(token);
        }
    }

    /// What this worker's crossing puts on the line now; with the cut, the topic channels
    /// kept for it are left.
    pub fn crossing_for_line(&mut self) -> Option<ToLine> {
        let next = self.crossings.take_for_line()?;
        if let ToLine::Cut { leave, .. } = &next {
            for topic in leave.clone() {
                self.interest(&topic, false);
            }
        }
        Some(next)
    }

    /// Messages from other hosts, handed over by the cluster bus's subscriber.
    pub fn receive_cluster(&mut self) -> Vec<(Origin, BusMessage)> {
        match &self.remote {
            #[cfg(feature = "cluster")]
            Remote::Running(c) => {
                let got = c.receive();
                self.stats.received += got.len() as u64;
                got
            }
            _ => Vec::new(),
        }
    }

    /// Hands encoded bytes to the cluster bus for `to`, if the server has one.
    #[cfg(feature = "cluster")]
    fn send_remote(&mut self, to: Target, bytes: Vec<u8>) {
        let Remote::Running(c) = &self.remote else {
            return;
        };
        if !c.send(to, bytes) {
            self.stats.dropped += 1;
        }
    }

    /// The ends to register with the event loop, by peer slot.
    pub fn ends(&self) -> impl Iterator<Item = (usize, &OwnedFd)> {
        self.peers
            .iter()
            .enumerate()
            .filter_map(|(slot, end)| end.as_ref().map(|e| (slot, e)))
    }

    /// Sends to the worker in `slot` on this host; false if it could not take it.
    pub fn send_to_slot(&mut self, slot: usize, msg: &BusMessage) -> bool {
        let bytes = wire::encode(self.origin, msg);
        self.send_bytes(slot, &bytes)
    }

    /// A bus that reaches no other worker (a worker run outside a master, in tests).
    #[cfg(all(test, feature = "bench"))]
    pub fn detached() -> Bus {
        Bus::new(Origin { host: 0, slot: 0 }, Vec::new())
    }

    /// Sends to a worker of another host: only a cluster bus can.
    pub fn send_to_host(&mut self, host: u64, slot: u16, msg: &BusMessage) {
        #[cfg(feature = "cluster")]
        if matches!(self.remote, Remote::Running(_)) {
            let bytes = wire::encode(self.origin, msg);
            self.send_remote(Target::Worker { host, slot }, bytes);
            return;
        }
        let _ = msg;
        self.stats.dropped += 1;
        log::debug!("bus: no cluster bus to reach host {host:016x} slot {slot}");
    }

    /// Sends to every other worker of the group on this host; returns how many took it.
    pub fn send_to_peers(&mut self, msg: &BusMessage) -> usize {
        let bytes = wire::encode(self.origin, msg);
        self.send_bytes_to_peers(&bytes)
    }

    /// Sends to every worker of the group on the other hosts of a cluster bus, if there is one.
    pub fn send_to_other_hosts(&mut self, msg: &BusMessage) {
        #[cfg(feature = "cluster")]
        if matches!(self.remote, Remote::Running(_)) {
            self.send_remote(Target::All, wire::encode(self.origin, msg));
        }
        #[cfg(not(feature = "cluster"))]
        let _ = msg;
    }

    /// Sends to every other worker of the group: on this host over the mesh, and on the other
    /// hosts of a cluster bus through Redis (the same bytes, encoded once): a topic's publish
    /// to the workers with subscribers to it, anything else to all.
    pub fn send_to_group(&mut self, msg: &BusMessage) {
        let bytes = wire::encode(self.origin, msg);
        self.send_bytes_to_peers(&bytes);
        #[cfg(feature = "cluster")]
        {
            let to = match msg {
                BusMessage::Publish(topic, _) => Target::Topic(topic.clone()),
                _ => Target::All,
            };
            self.send_remote(to, bytes);
        }
    }

    /// The server has a cluster bus (`[server] bus`), up or not: records are kept in Redis.
    pub fn has_cluster(&self) -> bool {
        !matches!(self.remote, Remote::None)
    }

    /// Queues a change to this worker's presence and user records in Redis, with a cluster
    /// bus (without one, presence is asked of the host's workers instead).
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub fn record(&mut self, rec: directory::Record) {
        #[cfg(feature = "cluster")]
        if let Remote::Running(c) = &self.remote {
            c.record(rec);
        }
    }

    /// Asks Redis for every live worker's entries for a topic or user; the answer comes as an
    /// `Answer` to `id`. False without a cluster bus, or while Redis is unreachable.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub fn lookup(&mut self, id: u32, kind: directory::Kind, name: &str) -> bool {
        #[cfg(feature = "cluster")]
        if let Remote::Running(c) = &self.remote {
            return c.lookup(id, kind, name);
        }
        false
    }

    /// Asks for an `Answer` to `id` once Redis has taken everything this worker sent it so
    /// far: then a message any worker sends reaches Redis after those. False when no answer
    /// will come: no cluster bus, or Redis is unreachable (what was sent is dropped anyway).
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub fn flush(&mut self, id: u32) -> bool {
        #[cfg(feature = "cluster")]
        if let Remote::Running(c) = &self.remote {
            return c.flush(id);
        }
        false
    }

    /// This worker now has subscribers to `topic` (`true`), or has none left: with a cluster
    /// bus, it listens to the topic's Redis channel only meanwhile.
    /// While a crossing waits for its mark, a topic's channel stays: the clients that took
    /// the topic away may still be owed its messages from here.
    #[cfg_attr(not(feature = "cluster"), allow(unused_variables))]
    pub fn interest(&mut self, topic: &str, wanted: bool) {
        let later = !wanted && self.crossings.defer_leave(topic);
        if wanted {
            self.crossings.cancel_leave(topic);
        }
        #[cfg(feature = "cluster")]
        if let Remote::Running(c) = &self.remote
            && !later
        {
            c.interest(if wanted {
                Interest::Join(topic.to_string())
            } else {
                Interest::Leave(topic.to_string())
            });
        }
    }

    fn send_bytes_to_peers(&mut self, bytes: &[u8]) -> usize {
        (0..self.peers.len().min(self.view))
            .filter(|&slot| self.send_bytes(slot, bytes))
            .count()
    }

    /// Whether the worker in `slot` has the message waiting for it.
    fn send_bytes(&mut self, slot: usize, bytes: &[u8]) -> bool {
        let Some(end) = self.peers.get(slot).and_then(Option::as_ref) else {
            return false;
        };
        match mesh::send_on(end, bytes) {
            mesh::Sent::Ok => {
                self.stats.sent += 1;
                return true;
            }
            mesh::Sent::Full => {
                self.stats.dropped += 1;
                log::debug!("bus: worker slot {slot} is not keeping up; a message is dropped");
            }
            mesh::Sent::TooBig => {
                self.stats.dropped += 1;
                log::warn!(
                    "bus: a {}-byte message is larger than the bus carries ({} bytes); dropped",
                    bytes.len(),
                    mesh::SEND_BUFFER
                );
            }
            mesh::Sent::Broken => self.stats.dropped += 1,
        }
        false
    }

    /// Every message waiting from the worker in `slot`. A peer end that is closed for good
    /// (its pair was dropped by a reload that shrank the group) is forgotten.
    ///
    /// At most `budget` messages at a time, so one busy peer cannot starve the worker's
    /// clients; the second value says more may be waiting.
    pub fn receive(&mut self, slot: usize, budget: usize) -> (Vec<(Origin, BusMessage)>, bool) {
        let mut out = Vec::new();
        loop {
            if out.len() >= budget {
                return (out, true);
            }
            let Some(end) = self.peers.get(slot).and_then(Option::as_ref) else {
                return (out, false);
            };
            match mesh::recv_on(end) {
                Ok(Some(bytes)) => match wire::decode(&bytes) {
                    Ok(m) => {
                        self.stats.received += 1;
                        out.push(m);
                    }
                    Err(e) => log::warn!("bus: from worker slot {slot}: {e}"),
                },
                Ok(None) => return (out, false),
                Err(_) => {
                    self.peers[slot] = None;
                    return (out, false);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_exchange_messages_over_the_mesh() {
        use crate::Message;
        let mut mesh = mesh::Mesh::new(3).unwrap();
        let mut buses: Vec<Bus> = (0..3)
            .map(|s| {
                Bus::new(
                    Origin {
                        host: 9,
                        slot: s as u16,
                    },
                    mesh.take_ends(s),
                )
            })
            .collect();
        let hello = BusMessage::Broadcast(Message::from("hello all"));
        buses[0].send_to_peers(&hello);
        buses[2].send_to_slot(1, &BusMessage::App(bytes::Bytes::from_static(b"psst")));
        assert_eq!(buses[0].stats.sent, 2);
        let got: Vec<_> = buses[1].receive(0, 64).0;
        assert_eq!(got, vec![(Origin { host: 9, slot: 0 }, hello.clone())]);
        assert_eq!(buses[2].receive(0, 64).0.len(), 1);
        assert_eq!(buses[1].receive(2, 64).0.len(), 1);
        assert!(buses[1].receive(2, 64).0.is_empty());
        assert_eq!(buses[1].stats.received, 2);
    }

    #[test]
    fn a_busy_peer_is_read_a_budget_at_a_time() {
        use crate::Message;
        let mut mesh = mesh::Mesh::new(2).unwrap();
        let mut a = Bus::new(Origin { host: 1, slot: 0 }, mesh.take_ends(0));
        let mut b = Bus::new(Origin { host: 1, slot: 1 }, mesh.take_ends(1));
        for n in 0..100 {
            a.send_to_slot(1, &BusMessage::Broadcast(Message::from(format!("{n}"))));
        }
        let (first, more) = b.receive(0, 64);
        assert_eq!((first.len(), more), (64, true));
        let (rest, more) = b.receive(0, 64);
        assert_eq!((rest.len(), more), (36, false));
        assert_eq!(
            rest.last().map(|(_, m)| m.clone()),
            Some(BusMessage::Broadcast(Message::from("99")))
        );
    }
}
