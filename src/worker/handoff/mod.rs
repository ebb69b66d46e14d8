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
    /// Records taken so far (the count acknowledged).
    taken: u32,
    adopted: usize,
    /// The master has been told that everything on it is taken (`FromWorker::Taken`).
    told: bool,
}

impl Handoffs {
    /// Nothing handed over waits for the taker: the worker may exit.
    pub(super) fn settled(&self) -> bool {
        self.out.is_none()
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
