//! `echo`: every message comes back as it was sent (text stays text, binary stays binary).

use crate::Worker;

/// Installs the echo on `worker`.
pub fn echo(worker: &mut Worker) {
    worker.on_message(|ctx, conn, msg| {
        let _ = ctx.send(conn, msg);
    });
}
