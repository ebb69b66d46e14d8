//! The values hooks see: [`Message`], [`ConnId`], and the errors of a connection or a send.

use crate::proto::{ProtoError, frame};
use std::fmt;
pub use tungstenite::{Bytes, Utf8Bytes};

/// A complete WebSocket data message. Control frames (ping, pong, close) never reach hooks.
///
/// Payloads are reference-counted, so echoing or broadcasting a message does not copy it.
/// A received payload of 1 KiB or more is a view into the worker's read buffer (64 KiB by
/// default), which stays allocated while the message lives: to keep such a message for long,
/// keep a copy (`Bytes::copy_from_slice`). The worker lends at most 1 MiB of buffers this way
/// and copies payloads beyond that, so kept messages cannot make it grow without bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Text(Utf8Bytes),
    Binary(Bytes),
}

impl Message {
    /// The text of a text message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Message::Text(t) => Some(t.as_str()),
            Message::Binary(_) => None,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_text(&self) -> bool {
        matches!(self, Message::Text(_))
    }

    /// The frame opcode and the payload.
    pub(crate) fn into_parts(self) -> (u8, Bytes) {
        match self {
            Message::Text(t) => (frame::TEXT, t.into()),
            Message::Binary(b) => (frame::BINARY, b),
        }
    }
}

/// Text as is; binary as lossy UTF-8, so `format!("hello {msg}")` works for both.
impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Message::Text(t) => f.write_str(t),
            Message::Binary(b) => f.write_str(&String::from_utf8_lossy(b)),
        }
    }
}

impl From<String> for Message {
    fn from(s: String) -> Self {
        Message::Text(s.into())
    }
}
impl From<&str> for Message {
    fn from(s: &str) -> Self {
        Message::Text(s.into())
    }
}
impl From<Utf8Bytes> for Message {
    fn from(s: Utf8Bytes) -> Self {
        Message::Text(s)
    }
}
impl From<Vec<u8>> for Message {
    fn from(b: Vec<u8>) -> Self {
        Message::Binary(b.into())
    }
}
impl From<&[u8]> for Message {
    fn from(b: &[u8]) -> Self {
        Message::Binary(Bytes::copy_from_slice(b))
    }
}
impl From<Bytes> for Message {
    fn from(b: Bytes) -> Self {
        Message::Binary(b)
    }
}

/// A connection of this worker, as hooks name it (Workerman's `$connection->id`).
///
/// It stays unique for the worker's life: an id of a closed connection never names a new one,
/// so a late `send` to it fails instead of reaching a stranger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    pub(crate) serial: u32,
    pub(crate) idx: u32,
}

impl ConnId {
    /// The number shown in logs and `Display`: 1 for the worker's first connection, and so on.
    pub fn number(self) -> u32 {
        self.serial
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.serial)
    }
}

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
