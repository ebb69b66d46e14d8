//! `chat`: a chat room, as in Workerman's chat example. Every text message a client sends is relayed, unchanged, to
//! every client of the group — on every worker, and on every server of a cluster bus — the
//! sender included, so A's message reaches B on whatever worker B landed.

use crate::Worker;

/// Installs the chat room on `worker`.
pub fn chat(worker: &mut Worker) {
    // Nothing of its own per connection: a reload moves its clients as they are.
    worker.on_handoff(|_, _| Vec::new());
    worker.on_message(|ctx, _conn, msg| {
        if msg.is_text() {
            ctx.broadcast(msg);
        }
    });
}
