//! What the workloads send (`--payload`), framed once for every connection to copy.
//!
//! - `text`: the letters a–z over and over, `--size` bytes: cheap to make and to check, and
//!   compressible beyond anything real (which matters only with `--deflate`).
//! - `json`: chat events as a chat or game server would push them: an object per event
//!   with the same keys every time (ids, a user object, text, reactions), values varying.
//!   Echo, idle and latency send [`VARIANTS`] different documents of exactly `--size` bytes in
//!   turn, so a server that compresses with context takeover meets what a real stream
//!   gives it (repeated keys, new values), not one message over and over, which it would
//!   squeeze to a few bytes.
//!
//! [`Messages`] holds each payload's frame, masked, and with `--deflate` its compressed
//! frame for each window size a server may allow, made the first time a connection needs
//! it; a connection copies whichever its handshake agreed on.

use super::deflate;
use super::wire;
use crate::proto::frame::TEXT;
use std::cell::OnceCell;

/// Distinct JSON documents a run sends in turn: 128 × 2 KiB is four times a 32 KiB window.
pub const VARIANTS: usize = 128;

/// The smallest `--size` a JSON payload can be made to.
pub const MIN_JSON: usize = 160;

/// `--payload`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// a–z repeated
    Text,
    /// chat events in JSON, 128 variants
    Json,
}

/// The payloads of one run, for a given `--size`.
pub fn payloads(kind: Kind, size: usize) -> Vec<Vec<u8>> {
    match kind {
        Kind::Text => vec![(0..size).map(|i| b'a' + (i % 26) as u8).collect()],
        Kind::Json => (0..VARIANTS as u64).map(|v| json(v, size)).collect(),
    }
}

const USERS: [&str; 12] = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory",
    "oscar",
];
const WORDS: [&str; 48] = [
    "the", "deploy", "is", "done", "did", "anyone", "see", "build", "logs", "for", "staging",
    "looks", "good", "to", "me", "let's", "ship", "it", "after", "lunch", "can", "you", "review",
    "my", "pull", "request", "tests", "are", "green", "again", "thanks", "meeting", "moved", "3pm",
    "coffee", "anyone", "latency", "dropped", "nice", "work", "on", "cache", "fix", "rollback",
    "plan", "ready", "ok", "great",
];
const EMOJI: [&str; 6] = ["thumbsup", "tada", "eyes", "heart", "rocket", "laughing"];

/// xorshift64*: the same documents on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
        from[(self.next() % from.len() as u64) as usize]
    }
}

/// One chat event.
fn event(rng: &mut Rng, seq: u64, i: u64, out: &mut String) {
    use std::fmt::Write;
    let user = rng.next() % USERS.len() as u64;
    let words = 4 + rng.next() % 12;
    let mut text = String::new();
    for w in 0..words {
        if w > 0 {
            text.push(' ');
        }
        text.push_str(rng.pick(&WORDS));
    }
    let _ = write!(
        out,
        r#"{{"id":"m_{seq}_{i}","ts":{},"user":{{"id":{},"name":"{}","status":"online"}},"kind":"text","text":"{text}","reactions":{{"{}":{}}},"edited":{}}}"#,
        1_718_035_200_000 + seq * 1000 + i * 37,
        4700 + user,
        USERS[user as usize],
        rng.pick(&EMOJI),
        rng.next() % 5,
        rng.next().is_multiple_of(7),
    );
}

/// Variant `v` of the JSON document: `{"type":"messages","room":...,"events":[...],"pad":"..."}`,
/// exactly `size` bytes (at least [`MIN_JSON`]).
pub fn json(v: u64, size: usize) -> Vec<u8> {
    json_with(v, size, "")
}

/// Like [`json`], with `head` (say `"ts":123,"seq":4,`) first in the object; `size` is then
/// a floor, not exact, when `head` is long.
pub fn json_with(v: u64, size: usize, head: &str) -> Vec<u8> {
    let size = size.max(MIN_JSON);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (v + 1).wrapping_mul(0xff51_afd7_ed55_8ccd));
    let mut doc = format!(r#"{{{head}"type":"messages","room":"general","seq":{v},"events":["#);
    let close = r#"],"pad":""}"#;
    let mut i = 0;
    loop {
        let mut one = String::new();
        event(&mut rng, v, i, &mut one);
        let sep = usize::from(i > 0);
        if doc.len() + sep + one.len() + close.len() > size {
            break;
        }
        if sep == 1 {
            doc.push(',');
        }
        doc.push_str(&one);
        i += 1;
    }
    doc.push_str(r#"],"pad":""#);
    while doc.len() + 2 < size {
        doc.push(b"abcdefghijklmnopqrstuvwxyz"[(rng.next() % 26) as usize] as char);
    }
    doc.push_str("\"}");
    doc.into_bytes()
}

/// A compressed frame, and the size of the compressed payload it carries.
type Packed = (Vec<u8>, usize);

/// The frames of a run's payloads: plain, and compressed per window size.
pub struct Messages {
    payloads: Vec<Vec<u8>>,
    plain: Vec<Vec<u8>>,
    /// Index `bits - 9`: each payload's compressed frame, made the first time it is asked for.
    deflated: [OnceCell<Vec<Packed>>; 7],
}

impl Messages {
    pub fn new(payloads: Vec<Vec<u8>>) -> Messages {
        let plain = payloads.iter().map(|p| wire::text_frame(p)).collect();
        Messages {
            payloads,
            plain,
            deflated: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.payloads.len()
    }

    /// Payload `i`, as sent.
    pub fn payload(&self, i: usize) -> &[u8] {
        &self.payloads[i]
    }

    /// Every payload has this length (a run's payloads are all one size).
    pub fn size(&self) -> usize {
        self.payloads[0].len()
    }

    /// Payload `i`'s frame: plain, or compressed within a window of `bits` (9–15). Gives
    /// the frame and the size of the payload it carries.
    pub fn frame(&self, i: usize, bits: Option<u8>) -> (&[u8], usize) {
        match bits {
            None => (&self.plain[i], self.payloads[i].len()),
            Some(bits) => {
                let all = self.deflated[usize::from(bits - 9)].get_or_init(|| {
                    self.payloads
                        .iter()
                        .map(|p| {
                            let packed = deflate::compress(p, bits);
                            (wire::compressed_text_frame(&packed), packed.len())
                        })
                        .collect()
                });
                let (frame, len) = &all[i];
                (frame, *len)
            }
        }
    }
}

/// A frame of a payload made on the spot (the broadcast publisher's): compressed within
/// `bits` when given. Gives the size of the payload it carries.
pub fn put_text(out: &mut Vec<u8>, payload: &[u8], bits: Option<u8>) -> usize {
    match bits {
        None => {
            wire::put_frame(out, TEXT, payload);
            payload.len()
        }
        Some(bits) => {
            let packed = deflate::compress(payload, bits);
            out.extend_from_slice(&wire::compressed_text_frame(&packed));
            packed.len()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_documents_are_exactly_the_size_asked_and_valid() {
        for size in [MIN_JSON, 512, 2048, 4096] {
            for v in [0, 1, 77] {
                let doc = json(v, size);
                assert_eq!(doc.len(), size, "variant {v}");
                let parsed: serde_json::Value = serde_json::from_slice(&doc).unwrap();
                assert_eq!(parsed["type"], "messages");
                let events = parsed["events"].as_array().unwrap().len();
                assert!(events > 0 || size < 512, "{size}");
            }
        }
        assert_ne!(json(0, 2048), json(1, 2048), "variants differ");
        let stamped = json_with(3, 2048, r#""ts":123,"seq":4,"#);
        assert!(stamped.starts_with(br#"{"ts":123,"seq":4,"type""#));
        serde_json::from_slice::<serde_json::Value>(&stamped).unwrap();
    }

    #[test]
    fn json_compresses_like_json_and_text_like_nothing_real() {
        let doc = json(5, 2048);
        let ratio = doc.len() as f64 / deflate::compress(&doc, 15).len() as f64;
        assert!((2.0..8.0).contains(&ratio), "json ratio {ratio}");
        let text = &payloads(Kind::Text, 2048)[0];
        assert!(deflate::compress(text, 15).len() < 100);
    }

    #[test]
    fn frames_are_made_once_per_window() {
        let m = Messages::new(payloads(Kind::Json, 1024));
        assert_eq!((m.len(), m.size()), (VARIANTS, 1024));
        let (plain, n) = m.frame(3, None);
        assert_eq!((plain.len(), n), (1024 + 8, 1024));
        let (packed, k) = m.frame(3, Some(15));
        assert_eq!(packed[0], 0xc1, "FIN, RSV1, text");
        assert!(k < n && packed.len() < plain.len());
        let again = m.frame(3, Some(15)).0.as_ptr();
        assert_eq!(again, packed.as_ptr(), "made once");
        assert!(m.deflated[0].get().is_none(), "no 9-bit frames until asked");
    }
}
