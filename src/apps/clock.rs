//! `clock`: Workerman's `onWorkerStart` + `Timer::add(5.0, ...)` program. Every 5 seconds each
//! worker pushes `Hello Client! Now is HH:MM:SS` to all of its connections, and it logs what
//! clients send (`echo 'Message From client: ', $data`), escaped so that it stays one line.
//! `clock-echo` pushes the same and echoes what clients send.

use crate::Worker;
use crate::escaped;
use std::time::Duration;

pub const INTERVAL: Duration = Duration::from_secs(5);

/// Installs the clock on `worker`: the push every [`INTERVAL`], and the log of what clients say.
pub fn clock(worker: &mut Worker) {
    push_the_time(worker);
    worker.on_message(|_ctx, _conn, msg| {
        log::info!("Message From client: {}", escaped(msg.as_bytes()));
    });
}

/// `clock-echo`: the clock's push, and every message echoed. What `wsd bench latency` measures
/// echo latency against while the 5-second timer fires (an open-loop target).
pub fn clock_echo(worker: &mut Worker) {
    push_the_time(worker);
    worker.on_message(|ctx, conn, msg| {
        let _ = ctx.send(conn, msg);
    });
}

fn push_the_time(worker: &mut Worker) {
    // Nothing of its own per connection: a reload moves its clients as they are.
    worker.on_handoff(|_, _| Vec::new());
    worker.on_worker_start(|ctx| {
        ctx.add_timer(INTERVAL, |ctx| {
            let now = chrono::Local::now().format("%H:%M:%S");
            ctx.broadcast_local(format!("Hello Client! Now is {now}"));
        });
    });
}
