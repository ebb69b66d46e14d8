//! RFC 6455, server side, as pure state machines: bytes in, events and bytes out, no sockets.
//!
//! The worker's event loop owns the sockets and feeds these. Keeping the protocol free of I/O
//! is what makes it testable byte by byte and lets the worker share one read buffer across
//! all of its connections.

pub mod close;
pub(crate) mod decoder;
pub(crate) mod deflate;
mod error;
pub(crate) mod frame;
pub(crate) mod handshake;
pub(crate) mod query;
pub(crate) mod send_queue;
pub(crate) mod session;

pub(crate) use decoder::Limits;
pub use error::ProtocolError;
pub(crate) use session::{Session, Stage, Step};
