//! RFC 6455 from the client's side, reduced to what a load generator needs.
//!
//! The upgrade request is the same bytes for every connection (one constant key, so the
//! expected `Sec-WebSocket-Accept` is a constant too and no SHA-1 runs per handshake). Client
//! frames must be masked; a frame whose payload never changes is built and masked once and
//! copied into each send buffer. Server frames are scanned, not decoded: header, length and a
//! borrowed payload slice, with no unmasking (servers do not mask), no UTF-8 check and no copy.
//! With `--deflate` the request offers permessage-deflate (see [`super::deflate`]), and a
//! server frame may have RSV1 set: the client's loop inflates it.

use crate::proto::frame::{self, CLOSE, CONTINUATION, PING, PONG, TEXT};
use std::fmt;

/// The key of RFC 6455 §1.3's example, and the accept value a server must answer with.
const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
const ACCEPT: &[u8] = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The mask of every client frame. RFC 6455 wants masks that intermediaries cannot predict;
/// a benchmark on loopback has no intermediaries, and one mask lets frames be masked once.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Close 1000 (normal closure) with no reason, masked: what `connect` cycles end with.
pub const CLOSE_FRAME: [u8; 8] = {
    let code = 1000u16.to_be_bytes();
    [
        0x80 | CLOSE,
        0x80 | 2,
        MASK[0],
        MASK[1],
        MASK[2],
        MASK[3],
        code[0] ^ MASK[0],
        code[1] ^ MASK[1],
    ]
};

/// An upgrade answer longer than this is refused (a real one is ~130 bytes).
pub const MAX_RESPONSE_HEAD: usize = 8 << 10;

/// A server frame longer than this is treated as a protocol error rather than buffered.
pub const MAX_FRAME: u64 = 64 << 20;

/// The upgrade request for `host:port` and `path`; with `deflate`, offering
/// permessage-deflate as a browser does.
pub fn upgrade_request(host: &str, port: u16, path: &str, deflate: bool) -> Vec<u8> {
    let offer = if deflate { super::deflate::OFFER } else { "" };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\
         {offer}\r\n"
    )
    .into_bytes()
}

/// What was wrong with the server's side of the conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The upgrade answer was not `101` with the right accept value (its first line).
    Refused(String),
    /// The upgrade answer did not end within [`MAX_RESPONSE_HEAD`] bytes.
    HeadTooLong,
    /// A frame no server may send: masked, reserved bits or opcode, a bad control frame.
    BadFrame(&'static str),
    /// A frame longer than [`MAX_FRAME`].
    TooLong(u64),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Refused(line) => write!(f, "upgrade refused: {line}"),
            WireError::HeadTooLong => write!(f, "upgrade answer longer than {MAX_RESPONSE_HEAD}"),
            WireError::BadFrame(why) => write!(f, "bad frame from the server: {why}"),
            WireError::TooLong(n) => write!(f, "frame of {n} bytes from the server"),
        }
    }
}

/// An upgrade answer that said yes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upgraded {
    /// Where its head ends (the first frame's byte, if any).
    pub end: usize,
    /// Where the value of its `Sec-WebSocket-Extensions` header is, if it has one.
    pub extensions: Option<std::ops::Range<usize>>,
}

/// Checks an upgrade answer in `buf`: `Ok(Some(n))` when its head ends at byte `n` and says
/// yes, `Ok(None)` when more bytes are needed. (The worker's loop tests read answers with it.)
#[cfg(test)]
pub fn check_response(buf: &[u8]) -> Result<Option<usize>, WireError> {
    Ok(upgraded(buf)?.map(|up| up.end))
}

/// [`check_response`], with where the answer's extensions are.
pub fn upgraded(buf: &[u8]) -> Result<Option<Upgraded>, WireError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() > MAX_RESPONSE_HEAD {
            Err(WireError::HeadTooLong)
        } else {
            Ok(None)
        };
    };
    let head = &buf[..end];
    let first = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let accepted = head.windows(ACCEPT.len()).any(|w| w == ACCEPT);
    if !first.starts_with(b"HTTP/1.1 101") || !accepted {
        return Err(WireError::Refused(
            String::from_utf8_lossy(first).into_owned(),
        ));
    }
    Ok(Some(Upgraded {
        end: end + 4,
        extensions: header(head, b"sec-websocket-extensions"),
    }))
}

/// Where the value of header `name` (lowercase) is in an HTTP `head`, trimmed.
fn header(head: &[u8], name: &[u8]) -> Option<std::ops::Range<usize>> {
    let mut at = 0;
    for line in head.split(|&b| b == b'\n') {
        let start = at;
        at += line.len() + 1;
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(name) {
            continue;
        }
        let value = &line[colon + 1..];
        let lead = value.len() - value.trim_ascii_start().len();
        let from = start + colon + 1 + lead;
        return Some(from..from + value.trim_ascii().len());
    }
    None
}

/// Appends a masked, final client frame.
pub fn put_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    frame::put_client_frame(out, 0x80 | opcode, payload, MASK);
}

/// A whole masked text frame, for payloads that never change (built once, sent many times).
pub fn text_frame(payload: &[u8]) -> Vec<u8> {
    frame::client_frame(0x80 | TEXT, payload, MASK)
}

/// A whole masked text frame carrying a compressed message (RSV1 set): `packed` is the
/// deflate stream without its tail (see [`super::deflate::compress`]).
pub fn compressed_text_frame(packed: &[u8]) -> Vec<u8> {
    frame::client_frame(0x80 | RSV1 | TEXT, packed, MASK)
}

/// The frame header bit that marks a compressed message (permessage-deflate).
pub const RSV1: u8 = 0x40;

/// One server frame, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    /// RSV1: the first frame of a compressed message (what the client's loop hands a
    /// workload is inflated, with this false).
    pub compressed: bool,
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Checks that this frame can be the echo of a `size`-byte text message; `Ok(true)` when it
    /// completes one (a final frame), `Ok(false)` for a fragment to wait past.
    pub fn echo_of(&self, size: usize) -> Result<bool, BadReply> {
        if self.opcode == frame::BINARY {
            return Err(BadReply::Binary);
        }
        if self.opcode == frame::TEXT && self.fin && self.payload.len() != size {
            return Err(BadReply::Size {
                got: self.payload.len(),
                sent: size,
            });
        }
        Ok(self.fin)
    }
}

/// A reply that a workload did not expect: a protocol error of the server under test.
#[derive(Debug, thiserror::Error)]
pub enum BadReply {
    #[error("a binary reply to a text message")]
    Binary,
    #[error("a reply of {got} bytes to a message of {sent}")]
    Size { got: usize, sent: usize },
    #[error("a second reply to one message")]
    Twice,
    #[error("a reply to no message")]
    Unasked,
    #[error("the server says {0}")]
    ServerError(String),
    #[error("expected {want}, got {got}")]
    Unexpected { want: String, got: String },
    #[error("a delivery without a timestamp: {0}")]
    NoStamp(String),
}

/// The first whole frame in `buf` and the bytes it takes, or `None` if `buf` ends inside it.
pub fn next_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, WireError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    // RSV1 is permessage-deflate's, checked by the caller, who knows what was agreed.
    if b0 & 0x30 != 0 {
        return Err(WireError::BadFrame("reserved bits set"));
    }
    if b1 & 0x80 != 0 {
        return Err(WireError::BadFrame("masked"));
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    if !matches!(opcode, CONTINUATION..=0x2 | CLOSE | PING | PONG) {
        return Err(WireError::BadFrame("reserved opcode"));
    }
    let (len, head) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if opcode & 0x8 != 0 && (!fin || len > 125) {
        return Err(WireError::BadFrame("fragmented or long control frame"));
    }
    if len > MAX_FRAME {
        return Err(WireError::TooLong(len));
    }
    let end = head + len as usize;
    if buf.len() < end {
        return Ok(None);
    }
    let frame = Frame {
        fin,
        opcode,
        compressed: b0 & RSV1 != 0,
        payload: &buf[head..end],
    };
    Ok(Some((frame, end)))
}

/// Appends `n` in decimal without allocating.
pub fn put_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// The decimal number at the start of `s` (`None` if `s` does not start with a digit).
pub fn leading_decimal(s: &[u8]) -> Option<u64> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    Some(
        s[..digits]
            .iter()
            .fold(0, |n, &d| n * 10 + u64::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::{BINARY, encode};

    #[test]
    fn the_constant_key_gets_the_rfc_accept_value() {
        let ok = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x00";
        assert_eq!(check_response(ok), Ok(Some(ok.len() - 2)));
        assert_eq!(upgraded(ok).unwrap().unwrap().extensions, None);
        let deflating = b"HTTP/1.1 101 Switching Protocols\r\n\
                   Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
                   sec-websocket-extensions:  permessage-deflate; server_no_context_takeover \r\n\r\n";
        let got = upgraded(deflating).unwrap().unwrap();
        assert_eq!(
            &deflating[got.extensions.unwrap()],
            b"permessage-deflate; server_no_context_takeover"
        );
        assert_eq!(check_response(&ok[..20]), Ok(None));
        let no = b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            check_response(no),
            Err(WireError::Refused("HTTP/1.1 403 Forbidden".into()))
        );
        let wrong = b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: x\r\n\r\n";
        assert!(check_response(wrong).is_err());
        assert_eq!(
            check_response(&[b'a'; MAX_RESPONSE_HEAD + 1]),
            Err(WireError::HeadTooLong)
        );
    }

    #[test]
    fn client_frames_are_masked_and_unmask_to_the_payload() {
        for len in [0, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let f = text_frame(&payload);
            assert_eq!(f[0], 0x81);
            assert_ne!(f[1] & 0x80, 0, "mask bit");
            let head = f.len() - len;
            let mut body = f[head..].to_vec();
            frame::unmask(&mut body, f[head - 4..head].try_into().unwrap(), 0);
            assert_eq!(body, payload, "len {len}");
        }
    }

    #[test]
    fn the_constant_close_frame_is_a_masked_close_1000() {
        let mut built = Vec::new();
        put_frame(&mut built, CLOSE, &1000u16.to_be_bytes());
        assert_eq!(built, CLOSE_FRAME);
    }

    #[test]
    fn server_frames_are_scanned_whole_or_not_at_all() {
        let mut buf = encode(TEXT, b"hello").to_vec();
        buf.extend_from_slice(&encode(BINARY, &[7; 300]));
        let (f, n) = next_frame(&buf).unwrap().unwrap();
        assert_eq!((f.fin, f.opcode, f.payload), (true, TEXT, &b"hello"[..]));
        let (g, m) = next_frame(&buf[n..]).unwrap().unwrap();
        assert_eq!((g.opcode, g.payload.len(), n + m), (BINARY, 300, buf.len()));
        for cut in 0..buf.len() - n {
            assert_eq!(next_frame(&buf[n..n + cut]), Ok(None), "cut {cut}");
        }
    }

    #[test]
    fn frames_no_server_sends_are_errors() {
        assert!(next_frame(&[0x81, 0x81, 0, 0, 0, 0, 0]).is_err(), "masked");
        assert!(next_frame(&[0xa1, 0x00]).is_err(), "rsv2");
        assert!(next_frame(&[0x91, 0x00]).is_err(), "rsv3");
        let (f, _) = next_frame(&[0xc1, 0x00]).unwrap().unwrap();
        assert!(f.compressed, "rsv1 is the caller's to judge");
        assert!(next_frame(&[0x83, 0x00]).is_err(), "opcode 3");
        assert!(next_frame(&[0x09, 0x00]).is_err(), "fragmented ping");
        assert!(next_frame(&[0x89, 126, 0, 200]).is_err(), "long ping");
        let huge = [0x82, 127, 0, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(next_frame(&huge), Err(WireError::TooLong(1 << 32)));
    }

    #[test]
    fn decimals_round_trip() {
        for n in [0, 7, 10, 1_234_567_890_123, u64::MAX / 10] {
            let mut out = b"x".to_vec();
            put_decimal(&mut out, n);
            assert_eq!(leading_decimal(&out[1..]), Some(n));
        }
        assert_eq!(leading_decimal(b"12 34"), Some(12));
        assert_eq!(leading_decimal(b" 1"), None);
    }
}
