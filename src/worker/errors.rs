//! Why a send or a connection failed, as hooks see it.

use crate::proto::ProtoError;
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

/// Why a connection failed, as `on_error` sees it. Each maps to the close code sent.
#[derive(Debug)]
pub enum ConnError {
    /// The client broke RFC 6455 (close 1002).
    Protocol(String),
    /// A text message was not valid UTF-8 (close 1007).
    InvalidUtf8,
    /// A message or frame exceeded `max_message_size` / `max_frame_size` (close 1009).
    TooBig(String),
    /// A hook panicked while handling this connection (close 1011).
    HookPanicked,
    /// The socket failed (no close frame can be sent).
    Io(std::io::Error),
}

impl ConnError {
    /// The close code the client was sent.
    pub fn close_code(&self) -> u16 {
        match self {
            ConnError::Protocol(_) => 1002,
            ConnError::InvalidUtf8 => 1007,
            ConnError::TooBig(_) => 1009,
            ConnError::HookPanicked | ConnError::Io(_) => 1011,
        }
    }
}

impl From<ProtoError> for ConnError {
    fn from(e: ProtoError) -> ConnError {
        match e {
            ProtoError::Protocol(why) => ConnError::Protocol(why.to_string()),
            ProtoError::InvalidUtf8 => ConnError::InvalidUtf8,
            e @ ProtoError::TooBig { .. } => ConnError::TooBig(e.to_string()),
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Protocol(p) => write!(f, "protocol error: {p}"),
            ConnError::InvalidUtf8 => f.write_str("invalid UTF-8 in a text message"),
            ConnError::TooBig(what) => write!(f, "too big: {what}"),
            ConnError::HookPanicked => f.write_str("a hook panicked"),
            ConnError::Io(e) => write!(f, "socket error: {e}"),
        }
    }
}

impl std::error::Error for ConnError {}
