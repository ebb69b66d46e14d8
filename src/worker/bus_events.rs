//! Messages from the other workers of the group, as the loop carries them out: a broadcast
//! or a publish becomes one encoded frame shared by this worker's clients, a `send_to` is a
//! plain send (skipped if the client has gone), and an app message goes to `on_bus_message`.
//! They come from this host's workers over the mesh, or from other hosts through the cluster
//! bus's helper thread (`bus::cluster`), which wakes the loop.

use super::event_loop::Loop;
use crate::bus::wire::{BusMessage, Origin};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Bus messages taken from one peer per loop turn.
const BUS_BUDGET: usize = 64;

impl Loop {
    /// The bus end to the worker in `peer` is readable. A peer with more waiting than one
    /// turn's budget is read again next turn, after the clients have had theirs.
    pub(super) fn bus_ready(&mut self, peer: usize) {
        if !self.ctx.bus.reads() {
            return; // Another worker's turn (`handoff.rs`).
        }
        let more = self.read_peer(peer);
        if more && !self.bus_again.contains(&peer) {
            self.bus_again.push(peer);
        }
    }

    /// Reads everything waiting on the bus ends now (this worker's to read), whatever the
    /// budget: a handoff begins, and what was sent before it must be carried out first.
    pub(super) fn drain_bus(&mut self) {
        if !self.ctx.bus.reads() {
            return;
        }
        let peers: Vec<usize> = self.ctx.bus.ends().map(|(peer, _)| peer).collect();
        for peer in peers {
            while self.read_peer(peer) {}
        }
    }

    /// Carries out up to a budget of what the worker in `peer` sent (copied for the worker
    /// taking this one's clients, if it is handing them over); true if more may be waiting.
    fn read_peer(&mut self, peer: usize) -> bool {
        let (messages, more) = self.ctx.bus.receive(peer, BUS_BUDGET);
        for (from, msg) in messages {
            self.ctx.bus.forward(&msg);
            self.carry_out(from, msg);
        }
        more
    }

    /// The cluster bus has handed over messages from other hosts. While this worker hands
    /// its clients over or takes some, they are shared out around a mark (`bus::crossing`):
    /// copied for the clients handed over, held back from those taken.
    pub(super) fn cluster_ready(&mut self) {
        for (from, msg) in self.ctx.bus.receive_cluster() {
            match msg {
                BusMessage::Mark(token) => self.crossing_marked(token),
                BusMessage::Broadcast(_)
                | BusMessage::Publish(..)
                | BusMessage::SendUser(..)
                | BusMessage::SendTo(..) => {
                    let crossings = self.ctx.bus.crossings_mut();
                    crossings.copy(&msg);
                    crossings.read(&msg);
                    self.ctx.deliver_remote(msg);
                }
                _ => self.carry_out(from, msg),
            }
        }
    }

    fn carry_out(&mut self, from: Origin, msg: BusMessage) {
        match msg {
            BusMessage::Broadcast(_)
            | BusMessage::Publish(..)
            | BusMessage::SendUser(..)
            | BusMessage::SendTo(..) => {
                self.ctx.deliver_local(msg);
            }
            BusMessage::Ask(id, question) => self.on_ask(from, id, &question),
            BusMessage::Answer(id, answer) => self.on_answer(id, &answer),
            BusMessage::App(data) => {
                let Some(f) = self.hooks.on_bus_message.as_mut() else {
                    return;
                };
                let ctx = &mut self.ctx;
                if catch_unwind(AssertUnwindSafe(|| f(ctx, from, data))).is_err() {
                    log::error!("on_bus_message hook panicked; the worker carries on");
                }
            }
            BusMessage::Mark(_) => {}
        }
    }
}
