//! Both sides of a connection handoff (`crate::handoff`): the retiring worker that gives its
//! open connections away (`give.rs`), and the new worker that takes them (`take.rs`).
//!
//! A handoff is acknowledged record by record. The giver keeps each record and its own copy of
//! the socket until the taker says it has registered the connection, which it does before it
//! ever reads the socket. So if the taker dies halfway, every connection it had not taken is
//! still whole in the giver, which takes it back and serves it until the master names the
//! slot's next worker: a failed handoff loses no connection.
//!
//! When the two workers share their slot's bus ends, exactly one of them reads them at a time
//! (`bus::Turn`): the giver until it has put its last connection on the line (an empty record
//! says so), the taker from then on; the giver reads them again if the line breaks first.
//!
//! In `wsd upgrade` the line outlives the handoff, until the upgrade is done
//! (`ToWorker::Commit`): if the new master dies first, its worker hands every connection back
//! over it, the same way, and the old worker serves them until its own master names the slot's
//! next worker. So a new master killed mid-upgrade loses no connection either.

mod cross;
mod give;
mod take;

use crate::ConnId;
use crate::bus::bridges::Peer;
use crate::handoff::line::Line;
use mio::Token;
use slab::Slab;
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

/// The line to the worker this one hands its connections to.
pub(super) const HANDOFF_OUT: Token = Token(9);
/// Lines from the workers this one takes connections from: `ADOPT_BASE + index`.
pub(super) const ADOPT_BASE: usize = 1 << 38;
/// The key a crossing on the outgoing line goes by (connections coming back on it before it
/// has turned round into an incoming one); no incoming line's key is ever this.
const OUT_LINE: usize = usize::MAX;
/// Records on the line not yet acknowledged, at most. The giver holds a second descriptor for
/// each until then, so a worker near its file limit (`RLIMIT_NOFILE`) must not hold one per
/// connection at once; and records are built as the window opens, not all up front.
const WINDOW: usize = 256;

/// The handoff state of a worker: at most one line out (it is being replaced), any number in
/// (it replaces one worker, or several when a reload lowered `count`).
#[derive(Default)]
pub(super) struct Handoffs {
    out: Option<Outgoing>,
    incoming: Slab<Incoming>,
    /// Connections waiting for their turn on the line, in order; served here meanwhile.
    queue: VecDeque<(usize, ConnId)>,
    /// Queued connections whose webhook requests are still in flight, until answered.
    parked: Vec<(usize, ConnId)>,
    /// Where the queued and parked connections are kept.
    waiting: std::collections::HashSet<usize>,
    /// Connections a broken handoff gave back, served here until the next handoff.
    taken_back: std::collections::HashSet<ConnId>,
    /// `wss://` clients, whose TLS session cannot travel, served here until `drain_until`.
    draining: Vec<ConnId>,
    drain_until: Option<Instant>,
    drain: Duration,
    /// The upgrade this worker takes part in is done: lines kept for a hand-back say so
    /// (`Carried::Committed`).
    committed: bool,
    /// The master died mid-upgrade: everything goes back over the returnable line (once all
    /// on it is taken, and the crossings this worker takes have ended), and no master will
    /// name another taker.
    orphaned: bool,
    /// The master this worker does not die with while it keeps a line for a hand-back
    /// (`sys::outlive_parent`); it is tied to it again when the upgrade is done.
    outlived: Option<nix::unistd::Pid>,
    /// A handoff the master asked for while connections were still coming back, or a crossing
    /// this worker takes had not ended: it begins once they all have.
    deferred: Option<Deferred>,
}

/// A [`ToWorker::HandOff`](crate::control::ToWorker::HandOff) put off.
struct Deferred {
    to: Peer,
    fd: Option<OwnedFd>,
    returnable: bool,
    spread: Duration,
    drain: Duration,
}

/// A line to the worker taking this one's connections.
struct Outgoing {
    line: Line,
    to: Peer,
    /// Every record put on the line and not yet acknowledged, in order.
    unacked: VecDeque<Sent>,
    /// Records acknowledged so far.
    acked: u32,
    handed: usize,
    /// The closing empty record is on the line.
    ended: bool,
    /// Once all is taken, the line is kept for the connections to come back
    /// ([`Way::Back`]) until the upgrade is done.
    returnable: bool,
}

impl Outgoing {
    /// Puts a record of bus messages (`handoff::Carried`) on the line, kept until it is
    /// acknowledged.
    fn push_carried(&mut self, record: Vec<u8>) {
        self.line.push(&record, None);
        self.unacked.push_back(Sent::Carried(record));
    }
}

/// A record on the line, kept until the taker acknowledges it.
enum Sent {
    /// A connection's record, and this worker's copy of its socket (none if no descriptor
    /// could be spared).
    Conn(Vec<u8>, Option<OwnedFd>),
    /// Bus messages (`handoff::Carried`).
    Carried(Vec<u8>),
    /// The closing empty record.
    End,
}

/// A line from a worker giving this one its connections.
struct Incoming {
    line: Line,
    from: Peer,
    way: Way,
    adopted: usize,
    /// The giver's closing record came, or the line ended.
    done: bool,
}

/// Which way a line brings connections.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    /// From the worker this one replaces; `returnable`: kept, once all is taken, until the
    /// upgrade is done, to hand everything back if this worker's master dies first.
    Forth { returnable: bool },
    /// Back from the worker this one handed its connections to, once it has taken them all:
    /// bus messages for the `wss://` clients still served here, and, `returnable` (`wsd
    /// upgrade`), the connections themselves if its master dies before the upgrade is done.
    Back { returnable: bool },
}

impl Incoming {
    fn new(line: Line, from: Peer, way: Way) -> Incoming {
        Incoming {
            line,
            from,
            way,
            adopted: 0,
            done: false,
        }
    }

    /// All taken, and kept for a hand-back.
    fn kept(&self) -> bool {
        self.done && self.way == Way::Forth { returnable: true }
    }

    /// What this worker delivers goes to the worker at the other end too: its clients are
    /// this worker's slot's ([`crate::bus::Bus::start_copying`]).
    fn partner(&self) -> bool {
        match self.way {
            Way::Forth { .. } => self.done && !self.line.is_ended(),
            Way::Back { .. } => !self.line.is_ended(),
        }
    }
}

impl Handoffs {
    /// Nothing handed over waits for the taker, and nothing can come back: the worker may
    /// exit.
    pub(super) fn settled(&self) -> bool {
        self.out.is_none() && self.incoming.is_empty() && self.deferred.is_none()
    }

    /// Connections may still come back over a line this worker handed them on.
    fn returning(&self) -> bool {
        (self.incoming.iter()).any(|(_, i)| i.way == Way::Back { returnable: true })
    }

    /// Connections go out on a line.
    fn giving(&self) -> bool {
        self.out.is_some()
    }

    /// Connection `id`, kept at `idx`, is to be handed over (now, or by the next handoff
    /// after one broke): the stop does not close it.
    pub(super) fn queued(&self, idx: usize, id: ConnId) -> bool {
        self.waiting.contains(&idx) || self.taken_back.contains(&id)
    }

    /// `wss://` clients kept until the drain ends: the stop does not close them before.
    pub(super) fn draining(&self, id: ConnId) -> bool {
        self.draining.contains(&id)
    }

    /// When the kept `wss://` clients are to be closed.
    pub(super) fn drain_due(&self) -> Option<Instant> {
        self.drain_until
    }
}
