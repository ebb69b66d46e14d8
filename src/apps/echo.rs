//! `echo`: every message comes back as it was sent (text stays text, binary stays binary).

use crate::Worker;

/// Installs the echo on `worker`.
pub fn echo(worker: &mut Worker) {
    // Nothing of its own per connection: a reload moves its clients as they are.
    worker.on_handoff(|_, _| Vec::new());
    worker.on_message(|ctx, conn, msg| {
        let _ = ctx.send(conn, msg);
    });
}
