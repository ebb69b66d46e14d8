//! permessage-deflate (RFC 7692) from the client's side, for `--deflate`.
//!
//! The offer is a browser's: `permessage-deflate; client_max_window_bits`. What the server
//! agrees to is read from its `Sec-WebSocket-Extensions` answer ([`agree`]) and kept per
//! connection.
//!
//! Sending: the client compresses each message on its own, with a fresh compressor and no
//! context from earlier messages. RFC 7692 lets a sender always do that (context takeover is
//! what a sender *may* use, never what it must), and it lets a payload that never changes be
//! compressed and masked once, up front, like every other client frame of `wsd bench`: the
//! client pays nothing per message for compressing, so it stays cheaper than the server it
//! measures. Frames are compressed at zlib's default level (6, what browsers use) and within
//! the window the server allows (`client_max_window_bits`).
//!
//! Receiving: what the server compresses is inflated with the context the server keeps
//! (unless it said `server_no_context_takeover`), as a browser would, and handed on as the
//! plain message. The bytes before and after are counted, for the compression ratio.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::fmt;

/// What the client offers, as a request header line.
pub const OFFER: &str = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n";

/// The 4 bytes a sync flush ends with, which RFC 7692 §7.2.1 leaves out of each message.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// zlib's smallest raw-deflate window: it refuses 8, which RFC 7692 allows.
const MIN_ZLIB_BITS: u8 = 9;

/// The parameters the server agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The server compresses each message on its own: its messages need no kept context.
    pub server_no_context_takeover: bool,
    /// The client must not use context across messages (it never does).
    pub client_no_context_takeover: bool,
    /// The window the client's compressor may use at most (8–15).
    pub client_max_window_bits: u8,
    /// The server's window (8–15); a 15-bit inflater reads any.
    pub server_max_window_bits: u8,
}

impl Agreed {
    /// The window to compress with, or `None` when zlib cannot stay within the allowed one
    /// (8 bits): then messages go uncompressed, which a sender may always do.
    pub fn send_bits(&self) -> Option<u8> {
        (self.client_max_window_bits >= MIN_ZLIB_BITS).then_some(self.client_max_window_bits)
    }
}

/// Why the server's extension answer cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadAnswer(pub String);

impl fmt::Display for BadAnswer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad Sec-WebSocket-Extensions answer: {}", self.0)
    }
}

/// The server's `Sec-WebSocket-Extensions` answer (`None`: no such header) against what the
/// client `offered`: `Ok(None)` when no extension is in use.
pub fn agree(answer: Option<&[u8]>, offered: bool) -> Result<Option<Agreed>, BadAnswer> {
    let Some(answer) = answer else {
        return Ok(None);
    };
    let text = std::str::from_utf8(answer).map_err(|_| BadAnswer("not UTF-8".into()))?;
    let bad = |why: &str| BadAnswer(format!("{why} in {text:?}"));
    if text.contains(',') {
        return Err(bad("more than one extension"));
    }
    let params = match crate::proto::deflate::parse_element(text) {
        None => return Err(bad("an extension that was not offered")),
        Some(params) => params.map_err(|why| bad(&why.to_string()))?,
    };
    if !offered {
        return Err(bad("an extension answered to a request that offered none"));
    }
    // An answer's client_max_window_bits carries the window the server allows (§7.1.2.2).
    let client_max_window_bits = match params.client_max_window_bits {
        None => 15,
        Some(Some(bits)) => bits,
        Some(None) => return Err(bad("client_max_window_bits without a value")),
    };
    Ok(Some(Agreed {
        server_no_context_takeover: params.server_no_context_takeover,
        client_no_context_takeover: params.client_no_context_takeover,
        client_max_window_bits,
        server_max_window_bits: params.server_max_window_bits.unwrap_or(15),
    }))
}

/// `payload` compressed as one message on its own (no earlier context), with a window of
/// `bits`: the deflate stream, sync-flushed, without its 4-byte tail.
pub fn compress(payload: &[u8], bits: u8) -> Vec<u8> {
    let mut c = Compress::new_with_window_bits(Compression::default(), false, bits);
    let mut out = Vec::with_capacity(payload.len() / 2 + 64);
    loop {
        let consumed = c.total_in() as usize;
        let status = c
            .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
            .expect("compressing into a vector cannot fail");
        let done = c.total_in() as usize == payload.len() && out.len() < out.capacity();
        if done || status == Status::StreamEnd {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    out
}

/// Why a compressed message from the server cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum InflateError {
    #[error("bad deflate data: {0}")]
    Corrupt(#[from] flate2::DecompressError),
    #[error("a message inflating past {0} bytes")]
    TooBig(usize),
    #[error("deflate data that inflates to nothing")]
    Stalled,
    #[error("RSV1 set on a frame that does not begin a message")]
    Misplaced,
}

/// The receiving side of one connection: the server's messages, inflated.
pub struct Inflater(Decompress);

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater::new()
    }
}

impl Inflater {
    pub fn new() -> Inflater {
        Inflater(Decompress::new_with_window_bits(false, 15))
    }

    /// Inflates one frame's `data` of a compressed message, appending to `out`; `last` is the
    /// message's final frame. The message may not inflate to more than `limit` bytes.
    pub fn inflate(
        &mut self,
        data: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        self.feed(data, out, limit)?;
        if last {
            self.feed(&TAIL, out, limit)?;
        }
        Ok(())
    }

    fn feed(
        &mut self,
        mut data: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let (before, had) = (self.0.total_in(), out.len());
            let status = self.0.decompress_vec(data, out, FlushDecompress::Sync)?;
            let used = (self.0.total_in() - before) as usize;
            data = &data[used..];
            if out.len() > limit {
                return Err(InflateError::TooBig(limit));
            }
            if status == Status::StreamEnd {
                // A final block (BFINAL) ends the stream: what follows starts a new one.
                self.0.reset(false);
            } else if used == 0 && out.len() == had && out.len() < out.capacity() {
                return Err(InflateError::Stalled);
            }
            // Done once the input is used up with room to spare: nothing is held back.
            if data.is_empty() && out.len() < out.capacity() {
                return Ok(());
            }
        }
    }

    /// Forgets the context: for a server that compresses each message on its own.
    pub fn reset(&mut self) {
        self.0.reset(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_browser_offer_is_answered_in_several_ways() {
        let plain = agree(Some(b"permessage-deflate"), true).unwrap().unwrap();
        assert_eq!(plain.client_max_window_bits, 15);
        assert!(!plain.server_no_context_takeover);
        let tight = agree(
            Some(b"permessage-deflate; server_no_context_takeover; client_max_window_bits=10"),
            true,
        )
        .unwrap()
        .unwrap();
        assert!(tight.server_no_context_takeover && !tight.client_no_context_takeover);
        assert_eq!(tight.send_bits(), Some(10));
        let eight = agree(Some(b"permessage-deflate; client_max_window_bits=8"), true);
        assert_eq!(eight.unwrap().unwrap().send_bits(), None);
        assert_eq!(agree(None, true), Ok(None));
        for bad in [
            &b"permessage-deflate; client_max_window_bits"[..],
            b"permessage-deflate; server_max_window_bits=16",
            b"permessage-deflate; x=1",
            b"permessage-deflate; server_no_context_takeover; server_no_context_takeover",
            b"x-webkit-deflate-frame",
            b"permessage-deflate, permessage-deflate",
        ] {
            assert!(
                agree(Some(bad), true).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            agree(Some(b"permessage-deflate"), false).is_err(),
            "not offered"
        );
    }

    #[test]
    fn messages_compress_on_their_own_and_inflate_back() {
        let text: Vec<u8> = br#"{"user":"alice","text":"hello"},"#.repeat(40);
        let packed = compress(&text, 15);
        assert!(packed.len() < text.len() / 4, "{}", packed.len());
        assert!(!packed.ends_with(&TAIL));
        // A server keeping context reads message after message with one inflater.
        let mut inflater = Inflater::new();
        for _ in 0..3 {
            let mut out = Vec::new();
            inflater.inflate(&packed, true, &mut out, 1 << 20).unwrap();
            assert_eq!(out, text);
        }
        // Split over frames anywhere.
        let mut out = Vec::new();
        let (a, b) = packed.split_at(packed.len() / 3);
        inflater.inflate(a, false, &mut out, 1 << 20).unwrap();
        inflater.inflate(b, true, &mut out, 1 << 20).unwrap();
        assert_eq!(out, text);
        let mut small = Vec::new();
        assert!(inflater.inflate(&packed, true, &mut small, 100).is_err());
        assert!(
            Inflater::new()
                .inflate(b"\xff\xff\xff", true, &mut out, 1 << 20)
                .is_err()
        );
    }
}
