//! Which connections are written this turn: the flush schedule.
//!
//! Sends only queue bytes and list the connection (`Context::mark_dirty`); the loop writes
//! each listed connection once, at the end of the turn, so a hook that answers many messages
//! costs one write, not one per message. A broadcast to 10,000 local connections is ~10,000
//! writes (tens of ms). Written [`FLUSH_BUDGET`] a turn, with the connections listed this turn
//! (replies to what was just read) ahead of the backlog, the worker keeps reading and
//! answering its clients while a fan-out drains, instead of holding every reply back until it
//! is done.

use super::conn::Conn;
use slab::Slab;
use std::collections::VecDeque;

/// Connections written per turn.
const FLUSH_BUDGET: usize = 256;

/// Entries a connection list keeps room for once empty; beyond that (64 KiB), a list grown by
/// a rare burst is let go.
const LIST_KEEP: usize = 8192;

#[derive(Default)]
pub(super) struct FlushSchedule {
    /// Connections listed with output in earlier turns and not written yet (over the
    /// budget), oldest first. Each is in it at most once (`Conn::backlogged`).
    backlog: VecDeque<usize>,
    /// An empty list with capacity, handed out for the next turn's dirty list: lists grown
    /// once are reused, not regrown from nothing every turn.
    spare: Vec<usize>,
}

impl FlushSchedule {
    /// Connections wait from earlier turns.
    pub(super) fn has_backlog(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// An empty list to collect the next turn's dirty connections in.
    pub(super) fn fresh_list(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.spare)
    }

    /// This turn's writes: the connections listed this turn (`dirty`) first, up to the budget
    /// (less a quarter kept for the backlog, if there is one), then the oldest of the backlog.
    /// Those listed this turn that do not fit join the backlog. Every connection listed this
    /// turn leaves the dirty list now, written or not: one that is sent more while it waits in
    /// the backlog is listed afresh, and goes first.
    pub(super) fn plan(&mut self, mut dirty: Vec<usize>, conns: &mut Slab<Conn>) -> Vec<usize> {
        for &idx in &dirty {
            if let Some(conn) = conns.get_mut(idx) {
                conn.dirty = false;
            }
        }
        let for_backlog = if self.backlog.is_empty() {
            0
        } else {
            FLUSH_BUDGET / 4
        };
        let now = dirty.len().min(FLUSH_BUDGET - for_backlog);
        for &idx in &dirty[now..] {
            // Once in the backlog is enough: a fan-out each turn must not list it again.
            if let Some(conn) = conns.get_mut(idx)
                && !std::mem::replace(&mut conn.backlogged, true)
            {
                self.backlog.push_back(idx);
            }
        }
        dirty.truncate(now);
        for _ in now..FLUSH_BUDGET {
            let Some(idx) = self.backlog.pop_front() else {
                break;
            };
            if let Some(conn) = conns.get_mut(idx) {
                conn.backlogged = false;
            }
            // Already written since it was listed, if it has nothing queued: no syscall.
            dirty.push(idx);
        }
        if self.backlog.is_empty() && self.backlog.capacity() > LIST_KEEP {
            self.backlog = VecDeque::new();
        }
        dirty
    }

    /// Takes back a list that has been worked through, to be handed out again.
    pub(super) fn done(&mut self, list: Vec<usize>) {
        self.spare = recycle(list);
    }
}

/// `list` emptied for reuse, unless a burst grew it over `LIST_KEEP`.
pub(super) fn recycle(mut list: Vec<usize>) -> Vec<usize> {
    list.clear();
    if list.capacity() > LIST_KEEP {
        list = Vec::new();
    }
    list
}
