//! [`Message`], what a hook receives and sends, and [`Utf8Bytes`], the text it carries.
//!
//! These live below both the protocol (`proto/`, which makes them from frames) and the worker
//! and bus (which hand them to hooks and to other workers), so neither depends on the other
//! for them. Payloads are `bytes::Bytes`: reference-counted, so echoing or broadcasting a
//! message never copies it.

use crate::proto::frame;
use crate::sys::Utf8;
use bytes::Bytes;
use std::fmt;
use std::ops::Deref;

/// A complete WebSocket data message. Control frames (ping, pong, close) never reach hooks.
///
/// Payloads are reference-counted, so echoing or broadcasting a message does not copy it.
/// A received payload of 1 KiB or more is a view into the worker's read buffer (64 KiB by
/// default), which stays allocated while the message lives: to keep such a message for long,
/// keep a copy (`Bytes::copy_from_slice`). The worker lends at most 1 MiB of buffers this way
/// and copies payloads beyond that, so kept messages cannot make it grow without bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// A text message: its payload is valid UTF-8.
    Text(Utf8Bytes),
    /// A binary message.
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

    /// The payload, text or binary.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Message::Text(t) => t.as_bytes(),
            Message::Binary(b) => b,
        }
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// The payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// This is a text message.
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

/// Reference-counted text: `bytes::Bytes` known to be UTF-8, checked once when it is made.
/// It reads as a `str` (`Deref`), and turns into its `Bytes` without a copy.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Utf8Bytes(Utf8);

/// The bytes given to [`Utf8Bytes::try_from`] are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotUtf8;

impl fmt::Display for NotUtf8 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not valid UTF-8")
    }
}

impl std::error::Error for NotUtf8 {}

impl Utf8Bytes {
    /// Text from a static string, without a copy.
    pub const fn from_static(s: &'static str) -> Utf8Bytes {
        Utf8Bytes(Utf8::from_static(s))
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Text from `bytes` if they are UTF-8 (checked with SIMD).
    pub(crate) fn validate(bytes: Bytes) -> Option<Utf8Bytes> {
        Utf8::new(bytes).map(Utf8Bytes)
    }
}

impl Deref for Utf8Bytes {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for Utf8Bytes {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<[u8]> for Utf8Bytes {
    fn as_ref(&self) -> &[u8] {
        self.as_str().as_bytes()
    }
}

impl fmt::Display for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Utf8Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl PartialEq<str> for Utf8Bytes {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Utf8Bytes {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl From<String> for Utf8Bytes {
    fn from(s: String) -> Self {
        Utf8Bytes(Utf8::from_string(s))
    }
}

impl From<&str> for Utf8Bytes {
    fn from(s: &str) -> Self {
        Utf8Bytes(Utf8::from_string(s.to_owned()))
    }
}

impl TryFrom<Bytes> for Utf8Bytes {
    type Error = NotUtf8;
    fn try_from(bytes: Bytes) -> Result<Self, NotUtf8> {
        Utf8Bytes::validate(bytes).ok_or(NotUtf8)
    }
}

impl TryFrom<Vec<u8>> for Utf8Bytes {
    type Error = NotUtf8;
    fn try_from(bytes: Vec<u8>) -> Result<Self, NotUtf8> {
        Utf8Bytes::try_from(Bytes::from(bytes))
    }
}

impl From<Utf8Bytes> for Bytes {
    fn from(s: Utf8Bytes) -> Bytes {
        s.0.into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_checked_once_and_reads_as_str() {
        let t = Utf8Bytes::try_from(Bytes::from_static("héllo".as_bytes())).unwrap();
        assert_eq!(t, "héllo");
        assert_eq!(t.len(), 6);
        assert_eq!(
            Bytes::from(t.clone()),
            Bytes::from_static("héllo".as_bytes())
        );
        assert_eq!(Utf8Bytes::try_from(vec![0xff, b'a']), Err(NotUtf8));
        assert_eq!(format!("{:?}", Utf8Bytes::from_static("a\n")), "\"a\\n\"");
        assert_eq!(Message::from("x").as_text(), Some("x"));
        assert_eq!(Message::from(&b"\xff"[..]).to_string(), "\u{fffd}");
    }
}
