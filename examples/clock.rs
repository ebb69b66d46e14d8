//! The seed's Workerman program written with the wsd library: every 5 seconds each worker
//! pushes the time to all of its clients, and what clients send is printed.
//!
//! `cargo run --release --example clock -- start` (takes every wsd command: stop, status, ...)

use std::time::Duration;

fn main() {
    let mut worker = wsd::Worker::new("websocket://0.0.0.0:2346");
    worker.name = "clock".into();
    worker.count = 4;
    worker.on_worker_start(|ctx| {
        ctx.add_timer(Duration::from_secs(5), |ctx| {
            let now = chrono::Local::now().format("%H:%M:%S");
            ctx.broadcast_local(format!("Hello Client! Now is {now}"));
        });
    });
    worker.on_message(|_ctx, conn, msg| {
        println!("Message From client {conn}: {msg}");
    });
    wsd::run_all(vec![worker]);
}
