//! Both sides of a crossing of messages from other hosts (`bus::crossing`) on a handoff
//! line: the giver's copies and cut, the taker's mark, and what each owes its clients when a
//! crossing ends.

use super::Sent;
use crate::bus::crossing::Owed;
use crate::handoff::Carried;
use crate::worker::event_loop::Loop;
use std::time::Instant;

impl Loop {
    /// Begins the crossing of this worker's handoff, if messages come from other hosts and
    /// there are clients to hand over: its token goes on the line before the first
    /// connection. A crossing this worker takes ends first: its clients are on their way
    /// again.
    pub(in crate::worker) fn begin_crossing(&mut self) {
        for owed in self.ctx.bus.crossings().end_taking() {
            self.pay(owed);
        }
        let h = &self.handoffs;
        if h.out.is_none() || h.orphaned || h.queue.is_empty() && h.parked.is_empty() {
            return;
        }
        let Some(token) = self.ctx.bus.give_crossing() else {
            return;
        };
        let record = Carried::crossing(token);
        let out = self.handoffs.out.as_mut().expect("checked above");
        out.line.push(&record, None);
        out.unacked.push_back(Sent::Carried(record));
    }

    /// Puts the giver's copies of messages from other hosts on the line, and the cut once
    /// the mark has come.
    pub(in crate::worker) fn put_remote(&mut self) {
        if self.ctx.bus.crossings().giving().is_none() {
            return;
        }
        let (copies, cut) = self.ctx.bus.crossing_copies();
        self.put_carried(Carried::Remote, &copies);
        if cut && let Some(out) = self.handoffs.out.as_mut() {
            let record = Carried::Cut.encode(&[]);
            out.line.push(&record, None);
            out.unacked.push_back(Sent::Carried(record));
        }
    }

    /// Mark `token` came from Redis, in its place among the messages from other hosts.
    pub(in crate::worker) fn crossing_marked(&mut self, token: u64) {
        if let Some(owed) = self.ctx.bus.crossings().marked(token) {
            self.pay(owed);
        }
        if self.ctx.bus.crossings().giving() == Some(token) {
            self.put_remote();
            self.handoff_flush();
        }
    }

    /// The giver on incoming line `key` has put its last connection on it: this worker
    /// marks the place in Redis's order from which the clients it took are its own.
    pub(in crate::worker) fn ask_mark(&mut self, key: usize) {
        if let Some(token) = self.ctx.bus.crossings().ask_mark(key, Instant::now()) {
            self.ctx.bus.mark(token);
        }
    }

    /// A record of a crossing on incoming line `key`: its token, the giver's copies, or its
    /// cut.
    pub(in crate::worker) fn take_crossing(&mut self, kind: Carried, record: &[u8], key: usize) {
        match kind {
            Carried::Crossing => match Carried::token_in(record) {
                Some(token) => self.ctx.bus.crossings().take(key, token),
                None => log::error!("a crossing record without its token"),
            },
            Carried::Remote => {
                let Some(only) = self.ctx.bus.crossings().copies_for(key).cloned() else {
                    return;
                };
                for msg in super::take::carried_in(record)
                    .map(|(_, m)| m)
                    .unwrap_or_default()
                {
                    self.ctx.deliver_only(msg, &only);
                }
            }
            Carried::Cut => {
                if let Some(owed) = self.ctx.bus.crossings().cut(key) {
                    self.pay(owed);
                }
            }
            Carried::Held | Carried::Delivered | Carried::Committed => {}
        }
    }

    /// Incoming line `key` is gone: its crossing ends.
    pub(in crate::worker) fn crossing_line_gone(&mut self, key: usize) {
        if let Some(owed) = self.ctx.bus.crossings().line_gone(key) {
            self.pay(owed);
        }
    }

    /// Ends the waits for a mark that are past their time.
    pub(in crate::worker) fn crossings_due(&mut self, now: Instant) {
        if self.ctx.bus.crossings().due().is_none_or(|at| now < at) {
            return;
        }
        let (cut, owed) = self.ctx.bus.crossings().overdue(now);
        for owed in owed {
            self.pay(owed);
        }
        if cut {
            self.put_remote();
            self.handoff_flush();
        }
    }

    /// Delivers what an ended crossing owes its clients.
    fn pay(&mut self, (conns, later): Owed) {
        for msg in later {
            self.ctx.deliver_only(msg, &conns);
        }
    }
}
