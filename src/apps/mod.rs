//! The built-in apps of the `wsd` binary, selected per group with `app = "..."`.
//!
//! Each is written against the public library API only, exactly as a user's program would be.

mod chat;
mod clock;
mod echo;
mod hello;
mod pubsub;

use crate::Worker;

pub use chat::chat;
pub use clock::{clock, clock_echo};
pub use echo::echo;
pub use hello::hello;
pub use pubsub::{MAX_TOPIC_LEN, MAX_TOPICS, pubsub};

/// Installs an app's hooks on a group.
pub type Install = fn(&mut Worker);

/// Name and installer of every built-in app.
pub fn builtin() -> Vec<(&'static str, Install)> {
    vec![
        ("echo", echo),
        ("hello", hello),
        ("clock", clock),
        ("clock-echo", clock_echo),
        ("chat", chat),
        ("pubsub", pubsub),
        // The worker's loop runs the handler, or posts to the webhook, itself
        // (`worker/handler.rs`, `worker/webhook.rs`): no hooks to add.
        (crate::config::EXEC_APP, |_| {}),
        (crate::config::WEBHOOK_APP, |_| {}),
    ]
}
