//! Messages from the other workers of the group, as the loop carries them out: a broadcast
//! or a publish becomes one encoded frame shared by this worker's clients, a `send_to` is a
//! plain send (skipped if the client has gone), and an app message goes to `on_bus_message`.

use super::event_loop::Loop;
use crate::bus::wire::BusMessage;
use std::panic::{AssertUnwindSafe, catch_unwind};

impl Loop {
    /// The bus end to the worker in `peer` is readable.
    pub(super) fn bus_ready(&mut self, peer: usize) {
        for (from, msg) in self.ctx.bus.receive(peer) {
            match msg {
                BusMessage::Broadcast(m) => {
                    self.ctx.broadcast_local(m);
                }
                BusMessage::SendTo(conn, m) => {
                    let _ = self.ctx.send(conn, m);
                }
                BusMessage::Publish(topic, m) => {
                    self.ctx.publish_local(&topic, m);
                }
                BusMessage::App(data) => {
                    let Some(f) = self.hooks.on_bus_message.as_mut() else {
                        continue;
                    };
                    let ctx = &mut self.ctx;
                    if catch_unwind(AssertUnwindSafe(|| f(ctx, from, data))).is_err() {
                        log::error!("on_bus_message hook panicked; the worker carries on");
                    }
                }
            }
        }
    }
}
