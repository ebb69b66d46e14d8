//! The backend HTTP API: how a backend that is not wsd's code (PHP, Python, Node, Go) reaches
//! the clients of a group — publish to a topic, broadcast, send to a user or a connection,
//! disconnect them, and ask who is there.
//!
//! It rides the data path rather than forking a second one. The master binds one
//! SO_REUSEPORT socket per worker slot of the served group, as it does for WebSocket
//! listeners, so supervision, reload and privileges apply unchanged and API load spreads over
//! the cores without passing through the master. The worker that accepts a request reads it
//! here (`http.rs`, sans-I/O), understands it (`call.rs`), and carries it out over the bus
//! exactly as a hook's `publish` or `send_to` would be (`worker/api.rs`): its own clients at
//! once, the other workers of the host over the mesh, other hosts through Redis.

pub mod call;
pub mod http;
