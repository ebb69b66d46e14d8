//! Handlers in any language (`app = "exec"`): each worker runs one long-lived handler process
//! for all of its connections, and speaks to it in JSON lines over its stdin and stdout. wsd
//! keeps the sockets, the protocol, the bus and the operations; the handler keeps the logic,
//! in PHP, Python, Node or anything that reads and writes lines.
//!
//! This module is the part without processes or pipes: the protocol ([`protocol`]) and the
//! bounded line reader ([`lines`]). The worker's loop runs the process (`worker/handler.rs`).

pub mod lines;
pub mod protocol;
