//! permessage-deflate (RFC 7692): choosing from a client's offers, and compressing and
//! decompressing messages.
//!
//! Two modes, set per group (`compression`):
//!
//! - **shared**: neither side keeps its LZ77 window between messages (`server_no_context_takeover`
//!   and `client_no_context_takeover` in every answer). The worker owns the only compressor and
//!   decompressor ([`Codec`]), made on first use and reset for each message, so a connection
//!   holds no zlib state at all, and a broadcast is compressed once for every recipient.
//! - **dedicated**: context takeover. A connection gets its own compressor the first time it
//!   is sent a compressed message, and its own decompressor the first time it sends one,
//!   unless the client asked (or promised) to do without: then it uses the worker's, as in
//!   shared mode. Both go when the connection goes.
//!
//! Decompression is bounded: output grows in steps up to `max_message_size` + 1 bytes and
//! stops there, so a small frame that would inflate to gigabytes costs at most the limit.
//!
//! Sans-I/O like the rest of `proto/`: bytes in, bytes out. The worker-wide [`Codec`] is
//! shared with the connections through an `Rc<RefCell<_>>`; a worker is one thread.

use super::error::ProtocolError;
use super::handshake::is_token;
use crate::config::{Compression, GroupConfig};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;
use std::fmt::Write;
use std::rc::Rc;

/// The extension's registered name.
pub(crate) const NAME: &str = "permessage-deflate";
/// What a sender strips from the end of each compressed message and the receiver puts back
/// (RFC 7692 §7.2.1, §7.2.2): the end of the empty stored block a sync flush writes.
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The largest LZ77 window: 32 KiB, the RFC's default when nothing smaller is agreed.
const MAX_WINDOW_BITS: u8 = 15;
/// The smallest window zlib makes for raw deflate. RFC 7692 allows 8; zlib does not.
const MIN_WINDOW_BITS: u8 = 9;
/// The first output room of a decompression, at least; it then doubles, up to the limit.
const INFLATE_FIRST: usize = 4 << 10;
/// Compressed-output scratch kept between messages; a larger one (after a big message) is freed.
const SCRATCH_KEEP: usize = 256 << 10;

/// A group's compression settings, for groups that have it on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Dedicated (context takeover) rather than shared.
    pub dedicated: bool,
    /// Dedicated mode's server window.
    pub window_bits: u8,
    /// Messages shorter than this go uncompressed.
    pub min_size: usize,
    /// zlib's level.
    pub level: u32,
}

impl Settings {
    /// The group's settings, or `None` when compression is off.
    pub(crate) fn of(group: &GroupConfig) -> Option<Settings> {
        let dedicated = match group.compression {
            Compression::Off => return None,
            Compression::Shared => false,
            Compression::Dedicated => true,
        };
        Some(Settings {
            dedicated,
            window_bits: group
                .compression_window_bits
                .clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            min_size: group.compression_min_size,
            level: group.compression_level.clamp(1, 9),
        })
    }

    /// For connections that agreed to compression in a worker whose group had it on, when
    /// this worker's group has it off (a reload turned it off): they keep it, with the
    /// defaults, until they close.
    pub(crate) fn carried_over(group: &GroupConfig) -> Settings {
        Settings {
            dedicated: true,
            window_bits: MAX_WINDOW_BITS,
            min_size: group.compression_min_size,
            level: group.compression_level.clamp(1, 9),
        }
    }
}

/// A parameter RFC 7692 defines for an offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Param {
    ServerNoContextTakeover,
    ClientNoContextTakeover,
    ServerMaxWindowBits,
    ClientMaxWindowBits,
}

impl Param {
    const ALL: [Param; 4] = [
        Param::ServerNoContextTakeover,
        Param::ClientNoContextTakeover,
        Param::ServerMaxWindowBits,
        Param::ClientMaxWindowBits,
    ];

    /// Its name on the wire.
    fn name(self) -> &'static str {
        match self {
            Param::ServerNoContextTakeover => "server_no_context_takeover",
            Param::ClientNoContextTakeover => "client_no_context_takeover",
            Param::ServerMaxWindowBits => "server_max_window_bits",
            Param::ClientMaxWindowBits => "client_max_window_bits",
        }
    }

    fn parse(name: &str) -> Option<Param> {
        Param::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(name))
    }
}

/// Why an offer was declined (RFC 7692 §7.1: unknown, repeated or invalid parameters, or a
/// configuration the server cannot do). The client then gets an answer without it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Decline {
    /// A parameter RFC 7692 does not define for an offer.
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    /// A parameter given twice.
    #[error("{} given twice", .0.name())]
    Repeated(Param),
    /// A value where none belongs, none where one is required, or not a decimal 8..=15
    /// without leading zeros.
    #[error("{} with an invalid value", .0.name())]
    BadValue(Param),
    /// `server_max_window_bits=8`: the answer may not name a larger window, and zlib cannot
    /// compress raw deflate with a window of 256 bytes.
    #[error("server_max_window_bits=8, smaller than zlib can compress with")]
    WindowTooSmall,
    /// Not `name *( ";" token [ "=" ( token / quoted-string ) ] )`.
    #[error("malformed extension syntax")]
    Malformed,
}

/// The parameters of one permessage-deflate element, parsed and checked: an offer, or (read
/// by `wsd bench`) a server's answer, which has the same grammar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Offer {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: Option<u8>,
    /// Named, with its value if it had one.
    pub client_max_window_bits: Option<Option<u8>>,
}

/// What a connection agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Agreed {
    /// The server resets its compressor for each message.
    pub server_no_context_takeover: bool,
    /// The client resets its compressor for each message, so the server's decompressor
    /// keeps nothing between messages either.
    pub client_no_context_takeover: bool,
    /// The server's window.
    pub server_window_bits: u8,
    /// The answer names `server_max_window_bits`: the client asked, or the window is under
    /// the default 15 (the client may then decompress with less memory).
    announce_window: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` answer.
    pub(crate) fn response(&self) -> String {
        let mut out = String::from(NAME);
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if self.announce_window {
            let _ = write!(out, "; server_max_window_bits={}", self.server_window_bits);
        }
        out
    }
}

/// Takes the first permessage-deflate offer in `headers` (the `Sec-WebSocket-Extensions`
/// values, in order) that can be honoured, or says why each was declined (an empty list:
/// none was made). Other extensions are not wsd's and are passed over.
pub(crate) fn choose(headers: &[String], settings: &Settings) -> Result<Agreed, Vec<Decline>> {
    let mut declined = Vec::new();
    for element in headers.iter().flat_map(|h| split_outside_quotes(h, ',')) {
        match parse_element(element).map(|p| p.and_then(|offer| accept(&offer, settings))) {
            None => {}
            Some(Ok(agreed)) => return Ok(agreed),
            Some(Err(why)) => declined.push(why),
        }
    }
    Err(declined)
}

/// One element of a `Sec-WebSocket-Extensions` list, parsed if it is permessage-deflate
/// (`None`: another extension).
pub(crate) fn parse_element(element: &str) -> Option<Result<Offer, Decline>> {
    let mut parts = split_outside_quotes(element, ';');
    let name = parts.next().unwrap_or("").trim();
    name.eq_ignore_ascii_case(NAME).then(|| parse_offer(parts))
}

/// Agrees on permessage-deflate for one connection, with the first offer in `headers` that
/// can be honoured; or says why each offer was declined (none: nothing was offered).
pub(crate) fn negotiate(codec: &SharedCodec, headers: &[String]) -> Result<Stream, Vec<Decline>> {
    let agreed = choose(headers, &codec.borrow().settings)?;
    Ok(Stream::new(agreed, codec))
}

/// What wsd answers to an offer it can parse (RFC 7692 §7.1.1, §7.1.2).
fn accept(offer: &Offer, settings: &Settings) -> Result<Agreed, Decline> {
    // §7.1.2.1: the answer's window must be the same as offered or smaller.
    if offer.server_max_window_bits == Some(8) {
        return Err(Decline::WindowTooSmall);
    }
    let asked = offer.server_max_window_bits;
    Ok(if settings.dedicated {
        // Takeover unless the client asks otherwise; `client_no_context_takeover` in an offer
        // is the client's promise (§7.1.1.2), which saves a decompressor: say it back.
        let bits = asked.map_or(settings.window_bits, |b| b.min(settings.window_bits));
        Agreed {
            server_no_context_takeover: offer.server_no_context_takeover,
            client_no_context_takeover: offer.client_no_context_takeover,
            server_window_bits: bits,
            announce_window: asked.is_some() || bits < MAX_WINDOW_BITS,
        }
    } else {
        // A server may prevent the client's takeover whether or not it was offered
        // (§7.1.1.2), and may always drop its own (§7.1.1.1).
        Agreed {
            server_no_context_takeover: true,
            client_no_context_takeover: true,
            server_window_bits: asked.unwrap_or(MAX_WINDOW_BITS),
            announce_window: asked.is_some(),
        }
    })
}

/// The parameters after the extension's name: `token [= token | quoted-string]` each.
fn parse_offer<'a>(params: impl Iterator<Item = &'a str>) -> Result<Offer, Decline> {
    let mut offer = Offer::default();
    let mut seen = [false; 4];
    for param in params {
        let (name, value) = match param.split_once('=') {
            Some((n, v)) => (n.trim(), Some(unquote(v.trim()).ok_or(Decline::Malformed)?)),
            None => (param.trim(), None),
        };
        if !is_token(name) {
            return Err(Decline::Malformed);
        }
        let p = Param::parse(name).ok_or_else(|| Decline::UnknownParameter(name.to_string()))?;
        if std::mem::replace(&mut seen[p as usize], true) {
            return Err(Decline::Repeated(p));
        }
        match (p, value) {
            (Param::ServerNoContextTakeover, None) => offer.server_no_context_takeover = true,
            (Param::ClientNoContextTakeover, None) => offer.client_no_context_takeover = true,
            (Param::ServerMaxWindowBits, Some(v)) => {
                offer.server_max_window_bits = Some(window_bits(&v).ok_or(Decline::BadValue(p))?);
            }
            (Param::ClientMaxWindowBits, None) => offer.client_max_window_bits = Some(None),
            (Param::ClientMaxWindowBits, Some(v)) => {
                let bits = window_bits(&v).ok_or(Decline::BadValue(p))?;
                offer.client_max_window_bits = Some(Some(bits));
            }
            _ => return Err(Decline::BadValue(p)),
        }
    }
    Ok(offer)
}

/// A window size: a decimal integer from 8 to 15 without leading zeros (§7.1.2.1, §7.1.2.2).
fn window_bits(v: &str) -> Option<u8> {
    match v.as_bytes() {
        [d @ b'8'..=b'9'] => Some(d - b'0'),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// A parameter's value: a token as it is, or a quoted-string without its quotes and escapes.
fn unquote(v: &str) -> Option<String> {
    let Some(inner) = v.strip_prefix('"') else {
        return is_token(v).then(|| v.to_string());
    };
    let inner = inner.strip_suffix('"')?;
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next()?),
            '"' => return None,
            c => out.push(c),
        }
    }
    Some(out)
}

/// Splits `s` at each `sep` that is not inside a quoted-string. A list's empty elements
/// (`a,,b`) are skipped, as RFC 9110 §5.6.1 asks of recipients.
fn split_outside_quotes(s: &str, sep: char) -> impl Iterator<Item = &str> {
    let mut rest = Some(s);
    std::iter::from_fn(move || {
        loop {
            let s = rest?;
            let (mut quoted, mut escaped) = (false, false);
            let end = s.char_indices().find_map(|(i, c)| {
                match c {
                    _ if escaped => escaped = false,
                    '\\' if quoted => escaped = true,
                    '"' => quoted = !quoted,
                    c if c == sep && !quoted => return Some(i),
                    _ => {}
                }
                None
            });
            let piece = match end {
                Some(i) => {
                    rest = Some(&s[i + sep.len_utf8()..]);
                    &s[..i]
                }
                None => {
                    rest = None;
                    s
                }
            };
            // A parameter list keeps its empty pieces (`permessage-deflate;;x` is malformed);
            // an extension list drops them.
            if sep == ';' || !piece.trim().is_empty() {
                return Some(piece);
            }
        }
    })
}

/// The worker's compression state, shared by its connections: the compressors and the
/// decompressor that keep nothing between messages, each made on first use, and the output
/// buffer every compression writes into.
pub(crate) struct Codec {
    settings: Settings,
    /// For clients that reset their window per message: reset before each message.
    inflater: Option<Box<Decompress>>,
    /// For sends without context takeover, one per window size (index `bits - 9`).
    compressors: [Option<Box<Compress>>; 7],
    scratch: Vec<u8>,
    /// Messages compressed, by this codec and its connections' own compressors.
    compressed: u64,
}

/// The worker's [`Codec`], as its connections and its context hold it.
pub(crate) type SharedCodec = Rc<RefCell<Codec>>;

impl Codec {
    pub(crate) fn new(settings: Settings) -> SharedCodec {
        Rc::new(RefCell::new(Codec {
            settings,
            inflater: None,
            compressors: Default::default(),
            scratch: Vec::new(),
            compressed: 0,
        }))
    }

    /// Messages compressed so far.
    #[cfg(test)]
    pub(crate) fn compressed(&self) -> u64 {
        self.compressed
    }

    /// Compresses `payload` as a message of its own (no window before it, none kept after)
    /// and hands `push` the result. False, having called nothing, if the compressor failed.
    pub(crate) fn compress_alone(
        &mut self,
        bits: u8,
        payload: &[u8],
        push: impl FnOnce(&[u8]),
    ) -> bool {
        let level = flate2::Compression::new(self.settings.level);
        self.compressed += 1;
        let Codec {
            compressors,
            scratch,
            ..
        } = self;
        let slot = usize::from(bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS) - MIN_WINDOW_BITS);
        let c = compressors[slot]
            .get_or_insert_with(|| Box::new(Compress::new_with_window_bits(level, false, bits)));
        c.reset();
        let done = deflate(c, payload, scratch);
        if done {
            push(scratch);
        }
        trim(scratch);
        done
    }
}

/// One connection's side of permessage-deflate: what it agreed, and the compressor and
/// decompressor that context takeover needs, made on first use.
pub(crate) struct Stream {
    agreed: Agreed,
    codec: SharedCodec,
    min_size: usize,
    compressor: Option<Box<Compress>>,
    inflater: Option<Box<Decompress>>,
    /// With the client's context takeover, the last 32 KiB it sent (decompressed), which its
    /// later messages may refer to: the decompressor holds them too, but cannot give them
    /// up, and a connection handed to another worker needs them there.
    window: Option<Box<Window>>,
}

/// The last [`WINDOW`] bytes of a decompressed stream.
#[derive(Default)]
struct Window(std::collections::VecDeque<u8>);

/// The largest LZ77 window in bytes: what a client's compressor may refer back into.
const WINDOW: usize = 1 << MAX_WINDOW_BITS;

impl Window {
    fn push(&mut self, bytes: &[u8]) {
        let tail = &bytes[bytes.len().saturating_sub(WINDOW)..];
        let over = (self.0.len() + tail.len()).saturating_sub(WINDOW);
        self.0.drain(..over);
        self.0.extend(tail);
    }

    fn clear(&mut self) {
        self.0.clear();
    }

    fn contents(&self) -> bytes::Bytes {
        let (a, b) = self.0.as_slices();
        [a, b].concat().into()
    }
}

/// How a message goes out on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// Uncompressed: no extension, or a message under `compression_min_size`.
    Plain,
    /// Compressed on its own with the worker's compressor for this window size: the same
    /// bytes serve every connection of the same route.
    Alone(u8),
    /// Compressed with the connection's own compressor (context takeover).
    Own,
}

impl Stream {
    pub(crate) fn new(agreed: Agreed, codec: &SharedCodec) -> Stream {
        Stream {
            agreed,
            min_size: codec.borrow().settings.min_size,
            codec: Rc::clone(codec),
            compressor: None,
            inflater: None,
            window: None,
        }
    }

    pub(crate) fn agreed(&self) -> &Agreed {
        &self.agreed
    }

    /// How a message of `len` bytes goes out.
    pub(crate) fn route(&self, len: usize) -> Route {
        if len < self.min_size {
            Route::Plain
        } else if self.agreed.server_no_context_takeover {
            Route::Alone(self.agreed.server_window_bits)
        } else {
            Route::Own
        }
    }

    /// Compresses a message for this connection and hands `push` the compressed payload
    /// (to send with RSV1). False, having called nothing, if the message goes uncompressed:
    /// it is under `compression_min_size` (or the compressor failed, which it does not).
    ///
    /// A message that does not shrink (already compressed data) is sent compressed all the
    /// same: with context takeover it must be (the client's window has to see it), and
    /// every message at or over the minimum size carrying RSV1 is what clients expect.
    pub(crate) fn compress(&mut self, payload: &[u8], push: impl FnOnce(&[u8])) -> bool {
        match self.route(payload.len()) {
            Route::Plain => false,
            Route::Alone(bits) => self.codec.borrow_mut().compress_alone(bits, payload, push),
            Route::Own => {
                let level = flate2::Compression::new(self.codec.borrow().settings.level);
                let bits = self.agreed.server_window_bits;
                let c = self.compressor.get_or_insert_with(|| {
                    Box::new(Compress::new_with_window_bits(level, false, bits))
                });
                let codec = &mut *self.codec.borrow_mut();
                codec.compressed += 1;
                let scratch = &mut codec.scratch;
                let done = deflate(c, payload, scratch);
                if done {
                    push(scratch);
                } else {
                    // A failed compressor is replaced: a fresh one refers to nothing the
                    // client has not seen, so the stream stays valid, and this message
                    // goes plain.
                    self.compressor = None;
                }
                trim(scratch);
                done
            }
        }
    }

    /// Decompresses one message (its frames' payloads joined), at most `limit` bytes of it.
    pub(crate) fn decompress(
        &mut self,
        compressed: &[u8],
        limit: usize,
    ) -> Result<Vec<u8>, ProtocolError> {
        let mut out = Vec::new();
        if self.agreed.client_no_context_takeover {
            let mut codec = self.codec.borrow_mut();
            let d = codec
                .inflater
                .get_or_insert_with(|| Box::new(Decompress::new(false)));
            d.reset(false);
            inflate(d, compressed, limit, &mut out)?;
        } else {
            let d = self
                .inflater
                .get_or_insert_with(|| Box::new(Decompress::new(false)));
            let ended = inflate(d, compressed, limit, &mut out)?;
            let window = self.window.get_or_insert_with(Box::default);
            if ended {
                window.clear();
            } else {
                window.push(&out);
            }
        }
        Ok(out)
    }

    /// What another worker needs to go on decompressing this client's messages: the window
    /// its next messages may refer back into, when it has one (see [`Stream::adopt`]).
    pub(crate) fn window(&self) -> Option<bytes::Bytes> {
        self.window.as_ref().map(|w| w.contents())
    }

    /// A connection's deflate state in a new worker: what it agreed, and the window the
    /// client's compressor may still refer to (`window`, from [`Stream::window`]), which
    /// primes a new decompressor as a preset dictionary. Our side starts a new compressor:
    /// the client's decompressor keeps its window, and new output simply does not refer back
    /// into it. `None` if the window is not one zlib takes.
    pub(crate) fn adopt(
        agreed: Agreed,
        codec: &SharedCodec,
        window: Option<&[u8]>,
    ) -> Option<Stream> {
        let mut stream = Stream::new(agreed, codec);
        if let Some(window) = window.filter(|_| !agreed.client_no_context_takeover) {
            let mut d = Decompress::new(false);
            if !window.is_empty() {
                d.set_dictionary(window).ok()?;
            }
            stream.inflater = Some(Box::new(d));
            let mut kept = Box::<Window>::default();
            kept.push(window);
            stream.window = Some(kept);
        }
        Some(stream)
    }
}

/// Compresses `input` into `out` (cleared first) with a sync flush, and strips the flush's
/// `00 00 ff ff` (§7.2.1). False if the compressor failed.
fn deflate(c: &mut Compress, input: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    // Deflate's worst case is a few bytes per 16 KiB stored block, plus the flush.
    out.reserve(input.len() + input.len() / 1024 + 64);
    let start = c.total_in();
    loop {
        let done = (c.total_in() - start) as usize;
        if c.compress_vec(&input[done..], out, FlushCompress::Sync)
            .is_err()
        {
            return false;
        }
        // Room left after all the input went in: the flush is complete.
        if (c.total_in() - start) as usize == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    // A complete sync flush always ends so.
    let Some(body) = out.strip_suffix(&TAIL) else {
        return false;
    };
    let n = body.len();
    out.truncate(n);
    true
}

/// Frees the scratch buffer after a large message.
fn trim(scratch: &mut Vec<u8>) {
    if scratch.capacity() > SCRATCH_KEEP {
        *scratch = Vec::new();
    }
}

/// Decompresses one message's `compressed` bytes, then the stripped tail, into `out`, which
/// never grows past `limit` + 1 bytes: a message over `limit` fails as soon as its output
/// proves it. A stream ended with a final block (BFINAL) resets `d` for the next message.
fn inflate(
    d: &mut Decompress,
    compressed: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<bool, ProtocolError> {
    let ended = inflate_part(d, compressed, limit, out)? || inflate_part(d, &TAIL, limit, out)?;
    if ended {
        d.reset(false);
    }
    Ok(ended)
}

/// Feeds `input` to `d`; true if the deflate stream ended (a final block).
fn inflate_part(
    d: &mut Decompress,
    mut input: &[u8],
    limit: usize,
    out: &mut Vec<u8>,
) -> Result<bool, ProtocolError> {
    let too_big = ProtocolError::MessageTooBig { limit };
    loop {
        if out.len() == out.capacity() {
            if out.len() > limit {
                return Err(too_big);
            }
            let room = if out.capacity() == 0 {
                INFLATE_FIRST.max(input.len().saturating_mul(4))
            } else {
                out.len()
            };
            out.reserve_exact(room.min(limit + 1 - out.len()));
        }
        let (in_before, out_before) = (d.total_in(), d.total_out());
        let status = d
            .decompress_vec(input, out, FlushDecompress::Sync)
            .map_err(|_| ProtocolError::BadCompressedData)?;
        let used = (d.total_in() - in_before) as usize;
        let made = d.total_out() - out_before;
        input = &input[used..];
        if out.len() > limit {
            return Err(too_big);
        }
        if status == Status::StreamEnd {
            return Ok(true);
        }
        let room_left = out.len() < out.capacity();
        // With room left, zlib stops only when it needs more input.
        if input.is_empty() && room_left {
            return Ok(false);
        }
        if used == 0 && made == 0 && room_left {
            return Err(ProtocolError::BadCompressedData);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::Compression as Level;

    const SHARED: Settings = Settings {
        dedicated: false,
        window_bits: 15,
        min_size: 16,
        level: 1,
    };
    const DEDICATED: Settings = Settings {
        dedicated: true,
        window_bits: 12,
        ..SHARED
    };

    /// The answer to one header value, or why it was declined.
    fn answer(header: &str, settings: &Settings) -> Result<String, Vec<Decline>> {
        choose(&[header.to_string()], settings).map(|a| a.response())
    }

    #[test]
    fn shared_mode_always_drops_context_takeover_both_ways() {
        for offer in [
            "permessage-deflate",
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_no_context_takeover; client_max_window_bits",
            "permessage-deflate; server_no_context_takeover",
            "Permessage-Deflate; client_max_window_bits=10",
            "permessage-deflate; client_max_window_bits=\"15\"",
            "permessage-deflate; server_max_window_bits=15",
        ] {
            let want = if offer.contains("server_max_window_bits") {
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=15"
            } else {
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
            };
            assert_eq!(answer(offer, &SHARED).as_deref(), Ok(want), "{offer}");
        }
        // A smaller server window is honoured (the worker keeps a compressor for it).
        let agreed = choose(
            &["permessage-deflate; server_max_window_bits=10".into()],
            &SHARED,
        )
        .unwrap();
        assert_eq!(agreed.server_window_bits, 10);
        assert!(agreed.response().ends_with("; server_max_window_bits=10"));
    }

    #[test]
    fn dedicated_mode_keeps_takeover_unless_asked_and_names_its_window() {
        let cases = [
            // Takeover both ways; the window (12 < 15) is named so the client can size its own.
            (
                "permessage-deflate",
                "permessage-deflate; server_max_window_bits=12",
            ),
            (
                "permessage-deflate; client_max_window_bits",
                "permessage-deflate; server_max_window_bits=12",
            ),
            // The client's promise not to keep its window is said back: the worker's
            // decompressor serves it.
            (
                "permessage-deflate; client_no_context_takeover",
                "permessage-deflate; client_no_context_takeover; server_max_window_bits=12",
            ),
            (
                "permessage-deflate; server_no_context_takeover",
                "permessage-deflate; server_no_context_takeover; server_max_window_bits=12",
            ),
            // Asked for less than configured: the client's; for more: the group's.
            (
                "permessage-deflate; server_max_window_bits=9",
                "permessage-deflate; server_max_window_bits=9",
            ),
            (
                "permessage-deflate; server_max_window_bits=15",
                "permessage-deflate; server_max_window_bits=12",
            ),
        ];
        for (offer, want) in cases {
            assert_eq!(answer(offer, &DEDICATED).as_deref(), Ok(want), "{offer}");
        }
        let full = Settings {
            window_bits: 15,
            ..DEDICATED
        };
        assert_eq!(
            answer("permessage-deflate", &full).as_deref(),
            Ok("permessage-deflate"),
            "the default window goes unsaid"
        );
    }

    #[test]
    fn offers_that_cannot_be_honoured_are_declined_and_the_next_is_taken() {
        use Decline::*;
        use Param::*;
        let cases = [
            (
                "permessage-deflate; server_max_window_bits=8",
                WindowTooSmall,
            ),
            (
                "permessage-deflate; x_unknown",
                UnknownParameter("x_unknown".into()),
            ),
            (
                "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
                Repeated(ClientMaxWindowBits),
            ),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                Repeated(ServerNoContextTakeover),
            ),
            (
                "permessage-deflate; server_max_window_bits",
                BadValue(ServerMaxWindowBits),
            ),
            (
                "permessage-deflate; server_max_window_bits=7",
                BadValue(ServerMaxWindowBits),
            ),
            (
                "permessage-deflate; server_max_window_bits=16",
                BadValue(ServerMaxWindowBits),
            ),
            (
                "permessage-deflate; server_max_window_bits=09",
                BadValue(ServerMaxWindowBits),
            ),
            (
                "permessage-deflate; client_max_window_bits=x",
                BadValue(ClientMaxWindowBits),
            ),
            ("permessage-deflate; client_max_window_bits=1 0", Malformed),
            (
                "permessage-deflate; client_no_context_takeover=1",
                BadValue(ClientNoContextTakeover),
            ),
            (
                "permessage-deflate; server_no_context_takeover=\"\"",
                BadValue(ServerNoContextTakeover),
            ),
            ("permessage-deflate; ;", Malformed),
            ("permessage-deflate; a b", Malformed),
            ("permessage-deflate; client_max_window_bits=\"10", Malformed),
        ];
        for (offer, why) in cases {
            for settings in [SHARED, DEDICATED] {
                assert_eq!(answer(offer, &settings), Err(vec![why.clone()]), "{offer}");
                // A later offer, in the same header or the next, is taken instead.
                let fallback = format!("{offer}, permessage-deflate; client_max_window_bits");
                let headers = [fallback, "permessage-deflate".to_string()];
                assert!(choose(&headers, &settings).is_ok(), "{offer}, then another");
                let headers = [offer.to_string(), "permessage-deflate".to_string()];
                assert!(
                    choose(&headers, &settings).is_ok(),
                    "{offer}; another header"
                );
            }
        }
    }

    #[test]
    fn other_extensions_and_empty_elements_are_passed_over() {
        for header in [
            "x-webkit-deflate-frame, permessage-deflate",
            ",, permessage-deflate ,",
            "foo; bar=\"a, b; c\", permessage-deflate; client_max_window_bits",
        ] {
            assert!(answer(header, &SHARED).is_ok(), "{header}");
        }
        assert_eq!(answer("x-webkit-deflate-frame", &SHARED), Err(vec![]));
        assert_eq!(choose(&[], &SHARED), Err(vec![]));
    }

    /// A client's compressor: raw deflate, sync flush, tail stripped.
    struct Client {
        c: Compress,
        d: Decompress,
    }

    impl Client {
        fn new() -> Client {
            Client {
                c: Compress::new(Level::default(), false),
                d: Decompress::new(false),
            }
        }

        fn compress(&mut self, data: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            assert!(deflate(&mut self.c, data, &mut out));
            out
        }

        /// Decompresses what the server sent (a stripped message).
        fn decompress(&mut self, body: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            inflate(&mut self.d, body, usize::MAX - 1, &mut out).unwrap();
            out
        }
    }

    fn text(n: usize, seed: usize) -> Vec<u8> {
        let words = ["alpha ", "beta ", "gamma ", "delta ", "{\"user\":42} "];
        (0..n)
            .map(|i| words[(i / 7 + seed) % words.len()].as_bytes()[i % 5])
            .collect()
    }

    /// Bytes deflate cannot shrink (xorshift).
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn stream(settings: Settings, offer: &str) -> Stream {
        let codec = Codec::new(settings);
        negotiate(&codec, &[offer.to_string()]).unwrap()
    }

    /// Everything the server compresses, the client decompresses to the message sent, and
    /// the other way round; with takeover, across messages.
    #[test]
    fn messages_round_trip_in_both_modes() {
        for (settings, offer) in [
            (SHARED, "permessage-deflate"),
            (DEDICATED, "permessage-deflate"),
            (DEDICATED, "permessage-deflate; client_no_context_takeover"),
            (DEDICATED, "permessage-deflate; server_no_context_takeover"),
            (DEDICATED, "permessage-deflate; server_max_window_bits=9"),
        ] {
            let mut server = stream(settings, offer);
            let agreed = *server.agreed();
            let mut client = Client::new();
            for (i, len) in [100, 5000, 64, 70_000, 300].into_iter().enumerate() {
                let msg = text(len, i);
                let mut sent = None;
                assert!(server.compress(&msg, |b| sent = Some(b.to_vec())));
                let sent = sent.unwrap();
                assert!(sent.len() < msg.len(), "{offer}: {len} shrinks");
                if agreed.server_no_context_takeover {
                    client.d.reset(false);
                }
                assert_eq!(client.decompress(&sent), msg, "{offer}: message {i}");

                if agreed.client_no_context_takeover {
                    client.c.reset();
                }
                let up = client.compress(&msg);
                assert_eq!(
                    server.decompress(&up, 1 << 20).unwrap(),
                    msg,
                    "{offer}: up {i}"
                );
            }
            // Kept state: only what takeover needs.
            assert_eq!(
                server.compressor.is_some(),
                !agreed.server_no_context_takeover,
                "{offer}"
            );
            assert_eq!(
                server.inflater.is_some(),
                !agreed.client_no_context_takeover,
                "{offer}"
            );
        }
    }

    /// A stream taken up by another worker from what it agreed and its window goes on with
    /// the same client: the client's compressor still refers back into the old window, and
    /// what the new server side compresses, the client's decompressor still reads.
    #[test]
    fn a_stream_goes_on_in_another_worker_from_its_window() {
        for offer in [
            "permessage-deflate",
            "permessage-deflate; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover",
        ] {
            let mut old = stream(DEDICATED, offer);
            let agreed = *old.agreed();
            let mut client = Client::new();
            // Over 32 KiB in all, so the window has slid.
            for i in 0..12 {
                let msg = text(5000, i);
                if agreed.client_no_context_takeover {
                    client.c.reset();
                }
                let up = client.compress(&msg);
                assert_eq!(old.decompress(&up, 1 << 20).unwrap(), msg);
                let mut sent = None;
                assert!(old.compress(&msg, |b| sent = Some(b.to_vec())));
                if agreed.server_no_context_takeover {
                    client.d.reset(false);
                }
                assert_eq!(client.decompress(&sent.unwrap()), msg);
            }
            let window = old.window();
            assert_eq!(
                window.is_some(),
                !agreed.client_no_context_takeover,
                "{offer}"
            );
            assert!(window.as_ref().is_none_or(|w| w.len() == WINDOW));
            let codec = Codec::new(DEDICATED);
            let mut new = Stream::adopt(agreed, &codec, window.as_deref()).unwrap();
            for i in 10..14 {
                // Repeats of earlier messages: mostly references into the window.
                let msg = text(5000, i);
                if agreed.client_no_context_takeover {
                    client.c.reset();
                }
                let up = client.compress(&msg);
                assert_eq!(
                    new.decompress(&up, 1 << 20).unwrap(),
                    msg,
                    "{offer}: up {i}"
                );
                let mut sent = None;
                assert!(new.compress(&msg, |b| sent = Some(b.to_vec())));
                if agreed.server_no_context_takeover {
                    client.d.reset(false);
                }
                assert_eq!(client.decompress(&sent.unwrap()), msg, "{offer}: down {i}");
            }
        }
    }

    #[test]
    fn short_messages_go_plain_and_the_rest_compressed_even_if_it_grows() {
        for settings in [SHARED, DEDICATED] {
            let mut server = stream(settings, "permessage-deflate");
            assert_eq!(server.route(15), Route::Plain);
            assert!(!server.compress(&[b'a'; 15], |_| panic!("under min_size")));
            let noise = noise(4000);
            let mut sent = Vec::new();
            assert!(server.compress(&noise, |b| sent = b.to_vec()));
            assert!(sent.len() > noise.len(), "stored blocks: a few bytes more");
            assert_eq!(Client::new().decompress(&sent), noise);
        }
    }

    #[test]
    fn an_empty_message_and_a_final_block_decompress() {
        let mut server = stream(DEDICATED, "permessage-deflate");
        // RFC 7692 §7.2.3.6: an empty message compresses to a single 0x00.
        assert_eq!(server.decompress(&[0x00], 100).unwrap(), b"");
        // A message ended with a final block (BFINAL): the next starts a new stream.
        for _ in 0..2 {
            let mut c = Compress::new(Level::default(), false);
            let mut body = Vec::with_capacity(100);
            c.compress_vec(b"Hello", &mut body, FlushCompress::Finish)
                .unwrap();
            assert_eq!(server.decompress(&body, 100).unwrap(), b"Hello");
        }
    }

    #[test]
    fn a_bad_stream_is_bad_compressed_data() {
        for settings in [SHARED, DEDICATED] {
            let mut server = stream(settings, "permessage-deflate");
            // BTYPE 11 is reserved.
            let got = server.decompress(&[0xff, 0xff, 0xff], 1000);
            assert_eq!(got, Err(ProtocolError::BadCompressedData));
            assert_eq!(ProtocolError::BadCompressedData.close_code(), 1007);
        }
        // The worker's decompressor is reset for the next message, whoever sent it.
        let codec = Codec::new(SHARED);
        let mut a = negotiate(&codec, &["permessage-deflate".into()]).unwrap();
        let mut b = negotiate(&codec, &["permessage-deflate".into()]).unwrap();
        assert!(a.decompress(&[0xff, 0xff], 1000).is_err());
        let up = Client::new().compress(b"fine");
        assert_eq!(b.decompress(&up, 1000).unwrap(), b"fine");
    }

    /// A decompression bomb stops at the limit: its output never holds more than the limit
    /// and a byte, however far the input would inflate.
    #[test]
    fn a_bomb_stops_at_the_limit() {
        let bomb = Client::new().compress(&vec![0u8; 8 << 20]);
        assert!(
            bomb.len() < 10 << 10,
            "8 MiB of zeros in {} bytes",
            bomb.len()
        );
        for limit in [0, 1000, 64 << 10, 1 << 20] {
            let mut d = Decompress::new(false);
            let mut out = Vec::new();
            let got = inflate(&mut d, &bomb, limit, &mut out);
            assert_eq!(got, Err(ProtocolError::MessageTooBig { limit }));
            assert!(
                out.capacity() <= limit + 1,
                "{} > {limit} + 1",
                out.capacity()
            );
            assert_eq!(out.len(), limit + 1, "it stops at the first byte over");
        }
        // Exactly at the limit is allowed.
        let msg = vec![7u8; 100_000];
        let body = Client::new().compress(&msg);
        let mut out = Vec::new();
        inflate(&mut Decompress::new(false), &body, msg.len(), &mut out).unwrap();
        assert_eq!(out, msg);
    }
}
