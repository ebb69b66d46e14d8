//! `hello`: replies `hello <message>`, as in Workerman's hello example
//! (`$connection->send('hello ' . $data)`).

use crate::Worker;

/// Installs the greeting on `worker`.
pub fn hello(worker: &mut Worker) {
    // Nothing of its own per connection: a reload moves its clients as they are.
    worker.on_handoff(|_, _| Vec::new());
    worker.on_message(|ctx, conn, msg| {
        let _ = ctx.send(conn, format!("hello {msg}"));
    });
}
