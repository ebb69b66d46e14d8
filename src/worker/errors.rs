//! Why a send or a connection failed, as hooks see it.

use crate::proto::{ProtocolError, close};
use std::fmt;

/// Why a send did not queue the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// No open connection has this id (it closed, or never completed its handshake).
    NoConnection,
    /// The connection is closing; nothing more can be sent.
    Closing,
    /// The client reads too slowly: `max_send_buffer` bytes are already queued for it.
    BufferFull,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::NoConnection => "no such connection",
            SendError::Closing => "connection is closing",
            SendError::BufferFull => "send buffer full",
        })
    }
}

impl std::error::Error for SendError {}

/// Why a connection failed, as `on_error` sees it.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConnError {
    /// The client broke RFC 6455 or a size limit; it was sent the violation's close code
    /// (1002, 1007 or 1009: [`ProtocolError::close_code`]).
    Protocol(ProtocolError),
    /// A hook panicked while handling this connection; the client was sent 1011.
    HookPanicked,
    /// The socket failed (the client reset the connection, say): no Close could be sent.
    Io(std::io::Error),
}

impl ConnError {
    /// The close code the client was sent; `None` when the socket failed and nothing could be.
    pub fn close_code(&self) -> Option<u16> {
        match self {
            ConnError::Protocol(e) => Some(e.close_code()),
            ConnError::HookPanicked => Some(close::INTERNAL_ERROR),
            ConnError::Io(_) => None,
        }
    }
}

impl From<ProtocolError> for ConnError {
    fn from(e: ProtocolError) -> ConnError {
        ConnError::Protocol(e)
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Protocol(ProtocolError::InvalidUtf8) => {
                f.write_str("invalid UTF-8 in a text message")
            }
            ConnError::Protocol(
                e @ (ProtocolError::FrameTooBig { .. } | ProtocolError::MessageTooBig { .. }),
            ) => write!(f, "too big: {e}"),
            ConnError::Protocol(e) => write!(f, "protocol error: {e}"),
            ConnError::HookPanicked => f.write_str("a hook panicked"),
            ConnError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl std::error::Error for ConnError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConnError::Protocol(e) => Some(e),
            ConnError::HookPanicked => None,
            ConnError::Io(e) => Some(e),
        }
    }
}
