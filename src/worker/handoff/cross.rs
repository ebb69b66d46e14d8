//! Both sides of a crossing of messages from other hosts (`bus::crossing`) on a handoff
//! line: the giver's token, copies and cut, the taker's mark, and what each owes its clients
//! when a crossing ends.

use crate::bus::crossing::{Owed, ToLine};
use crate::handoff::Carried;
use crate::worker::event_loop::Loop;
use std::time::Instant;

impl Loop {
    /// Names the crossing of the clients about to go on the line, if messages come from
    /// other hosts, there are clients to hand over, and the taker takes crossings (a build
    /// before them, taking its clients back, does not): the token goes on the line before
    /// them. A crossing this worker still takes ends first: its clients are on their way
    /// again (a handoff waits for those crossings, so only a client going after the closing
    /// record can find one).
    /// Called as the handoff begins, and again for a client that goes after the closing
    /// record (the taker then marks again).
    pub(in crate::worker) fn begin_crossing(&mut self) {
        for owed in self.ctx.bus.crossings_mut().end_taking() {
            self.pay(owed);
        }
        let h = &self.handoffs;
        let Some(out) = h.out.as_ref() else {
            return;
        };
        if !out.line.takes_crossings() || h.queue.is_empty() && h.parked.is_empty() {
            return;
        }
        // A cut still to go belongs to the crossing before.
        self.put_remote();
        let Some(token) = self.ctx.bus.give_crossing() else {
            return;
        };
        let out = self.handoffs.out.as_mut().expect("checked above");
        out.push_carried(Carried::crossing(token));
    }

    /// Puts the giver's copies of messages from other hosts on the line, and the cut once
    /// the mark has come.
    pub(in crate::worker) fn put_remote(&mut self) {
        match self.ctx.bus.crossing_for_line() {
            None => {}
            Some(ToLine::Copies(copies)) => self.put_carried(Carried::Remote, &copies),
            Some(ToLine::Cut { copies, .. }) => {
                self.put_carried(Carried::Remote, &copies);
                if let Some(out) = self.handoffs.out.as_mut() {
                    out.push_carried(Carried::Cut.encode(&[]));
                }
            }
        }
    }

    /// Mark `token` came from Redis, in its place among the messages from other hosts.
    pub(in crate::worker) fn crossing_marked(&mut self, token: u64) {
        if let Some(owed) = self.ctx.bus.crossings_mut().marked(token) {
            self.pay(owed);
            self.crossing_ended();
        }
        if self.ctx.bus.crossings().giving() == Some(token) {
            self.put_remote();
            self.handoff_flush();
        }
    }

    /// The giver on incoming line `key` has put its last connection on it: this worker
    /// marks the place in Redis's order from which the clients it took are its own.
    pub(in crate::worker) fn ask_mark(&mut self, key: usize) {
        let ask = self.ctx.bus.crossings_mut().ask_mark(key, Instant::now());
        if let Some(token) = ask {
            self.ctx.bus.mark(token);
        }
    }

    /// A record of a crossing on incoming line `key`: its token, the giver's copies, or its
    /// cut.
    pub(in crate::worker) fn take_crossing(&mut self, kind: Carried, record: &[u8], key: usize) {
        match kind {
            Carried::Crossing => {
                let Some(token) = Carried::token_in(record) else {
                    log::error!("a crossing record without its token");
                    return;
                };
                let here = self.ctx.bus.origin.slot as usize;
                let from = match key {
                    super::OUT_LINE => self.handoffs.out.as_ref().map(|o| &o.to),
                    key => self.handoffs.incoming.get(key).map(|i| &i.from),
                };
                let same_slot = from.is_some_and(|p| p.slot == here);
                self.ctx.bus.crossings_mut().take(key, token, same_slot);
            }
            Carried::Remote => {
                let messages = super::take::carried_in(record).map(|(_, m)| m);
                for msg in messages.unwrap_or_default() {
                    self.ctx.deliver_copy(key, msg);
                }
            }
            Carried::Cut => {
                if let Some(owed) = self.ctx.bus.crossings_mut().cut(key) {
                    self.pay(owed);
                }
            }
            Carried::Held | Carried::Delivered | Carried::Committed => {}
        }
    }

    /// Incoming line `key` is gone: the crossing under way on it ends.
    pub(in crate::worker) fn crossing_line_gone(&mut self, key: usize) {
        if let Some(owed) = self.ctx.bus.crossings_mut().line_gone(key) {
            self.pay(owed);
        }
    }

    /// Ends the waits for a mark that are past their time.
    pub(in crate::worker) fn crossings_due(&mut self, now: Instant) {
        if self.ctx.bus.crossings().due().is_none_or(|at| now < at) {
            return;
        }
        let (cut, owed) = self.ctx.bus.crossings_mut().overdue(now);
        for owed in owed {
            self.pay(owed);
        }
        self.crossing_ended();
        if cut {
            self.put_remote();
            self.handoff_flush();
        }
    }

    /// A crossing this worker took may have ended: a hand-back or a handoff that waited for
    /// it begins.
    pub(super) fn crossing_ended(&mut self) {
        if self.handoffs.orphaned {
            self.hand_back();
        }
        self.hand_off_deferred();
    }

    /// Delivers what an ended crossing owes its clients.
    fn pay(&mut self, (conns, later): Owed) {
        for msg in later {
            self.ctx.deliver_only(msg, &conns);
        }
    }
}
