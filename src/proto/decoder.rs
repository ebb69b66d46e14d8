//! Incremental decoder of client frames: bytes in, whole messages and control frames out.
//!
//! It keeps no read buffer of its own. The worker reads into one buffer shared by every
//! connection and feeds what arrived; the decoder copies payload bytes straight into the
//! message being assembled (unmasking in place) and stashes at most a partial 14-byte header.
//! An idle connection therefore holds no buffer at all, whatever its history.
//!
//! Limits are checked on the header, before any payload is stored, and text is validated as
//! it arrives, so a bad message fails at the first byte that proves it bad.
//!
//! With permessage-deflate negotiated, a message whose first frame has RSV1 set is
//! compressed: its frames' payloads are joined, then decompressed (by the connection's
//! [`Stream`]) when the last one arrives, the output bounded by `max_message_size`, and text
//! is validated after decompression.

use super::close;
use super::deflate::Stream;
use super::error::ProtocolError;
use super::frame::{self, BINARY, CLOSE, CONTINUATION, MAX_CONTROL_PAYLOAD, PING, PONG, TEXT};
use crate::{Message, Utf8Bytes};
use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// The largest client frame header: 2 bytes, a 64-bit length and the mask.
const MAX_HEADER: usize = 14;
/// Payload capacity reserved up front; beyond it a message grows as its bytes arrive, so a
/// header that merely claims a big frame costs nothing.
const RESERVE_MAX: usize = 64 << 10;

/// Sizes the decoder enforces (from the group's config).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_frame: usize,
    pub max_message: usize,
}

/// What a client sent, one complete unit at a time.
#[derive(Debug, PartialEq)]
pub(crate) enum Event {
    Message(Message),
    Ping(Bytes),
    Pong(Bytes),
    /// A Close frame: its code and reason, if it had any.
    Close(Option<(u16, String)>),
}

/// Payloads at least this long are lent from a [`Lent`] input rather than copied: below it,
/// a copy is cheap and small allocations are fast, and a small message should not hold a
/// whole read buffer.
pub(crate) const LEND_MIN: usize = 1024;

/// Bytes for the decoder. Whatever it does not keep is consumed and may be overwritten.
pub(crate) trait Input {
    /// A payload taken from the input, to unmask in place and hand over as `Bytes`.
    type Payload: AsMut<[u8]> + Into<Bytes>;
    /// The bytes not yet consumed.
    fn bytes(&self) -> &[u8];
    fn advance(&mut self, n: usize);
    /// Takes the next `len` bytes (at most `bytes().len()`) as a payload of its own.
    fn take(&mut self, len: usize) -> Self::Payload;
}

/// A borrowed slice: payloads are copied out.
impl Input for &[u8] {
    type Payload = Vec<u8>;

    fn bytes(&self) -> &[u8] {
        self
    }

    fn advance(&mut self, n: usize) {
        *self = &self[n..];
    }

    fn take(&mut self, len: usize) -> Vec<u8> {
        let payload = self[..len].to_vec();
        *self = &self[len..];
        payload
    }
}

/// A read buffer whose bytes may be lent: a payload of [`LEND_MIN`] or more is split off it,
/// so the message is a view into the buffer, with no copy and no allocation. The buffer's
/// owner must bound how much memory such views can keep alive (`worker::read_buffers`).
pub(crate) struct Lent<'a>(pub &'a mut BytesMut);

impl Input for Lent<'_> {
    type Payload = BytesMut;

    fn bytes(&self) -> &[u8] {
        self.0
    }

    fn advance(&mut self, n: usize) {
        bytes::Buf::advance(self.0, n);
    }

    fn take(&mut self, len: usize) -> BytesMut {
        if len >= LEND_MIN {
            self.0.split_to(len)
        } else {
            let payload = BytesMut::from(&self.0[..len]);
            self.advance(len);
            payload
        }
    }
}

struct Header {
    fin: bool,
    /// RSV1: the message is compressed (permessage-deflate, on a data message's first frame).
    compressed: bool,
    opcode: u8,
    len: u64,
    mask: [u8; 4],
}

/// The frame whose payload is arriving.
struct InFrame {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    left: u64,
    /// Payload bytes already taken (the mask offset).
    done: usize,
}

/// A data message being assembled across frames.
struct Partial {
    text: bool,
    /// `data` is compressed: decompressed and validated when the message is whole.
    compressed: bool,
    data: Vec<u8>,
    /// Bytes of `data` known to be whole UTF-8 characters.
    checked: usize,
}

pub(crate) struct Decoder {
    limits: Limits,
    head: [u8; MAX_HEADER],
    head_len: u8,
    frame: Option<InFrame>,
    /// Boxed: most messages are read whole from one read (`whole_message`), and an idle
    /// connection should not carry room for one in its decoder.
    message: Option<Box<Partial>>,
    control: Vec<u8>,
    /// A Close arrived: nothing after it is read.
    closed: bool,
}

impl Decoder {
    pub(crate) fn new(limits: Limits) -> Decoder {
        Decoder {
            limits,
            head: [0; MAX_HEADER],
            head_len: 0,
            frame: None,
            message: None,
            control: Vec::new(),
            closed: false,
        }
    }

    /// A Close has been read.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed
    }

    /// Bytes held for an unfinished message or frame (0 when idle).
    pub(crate) fn buffered(&self) -> usize {
        self.message.as_ref().map_or(0, |m| m.data.capacity()) + self.control.capacity()
    }

    /// Decodes `input` on a connection without extensions (see [`Decoder::feed_with`]).
    #[cfg(test)]
    pub(crate) fn feed(
        &mut self,
        input: impl Input,
        sink: &mut impl FnMut(Event),
    ) -> Result<(), ProtocolError> {
        self.feed_with(input, None, sink)
    }

    /// Decodes `input`, handing each complete event to `sink`; `deflate` is the connection's
    /// permessage-deflate state, if it negotiated it (RSV1 is a protocol error otherwise). On
    /// error the events before it stand and the stream is dead: call no more. Bytes it leaves
    /// (after a Close, or an error) are the caller's to drop.
    pub(crate) fn feed_with(
        &mut self,
        mut input: impl Input,
        mut deflate: Option<&mut Stream>,
        sink: &mut impl FnMut(Event),
    ) -> Result<(), ProtocolError> {
        while !input.bytes().is_empty() && !self.closed {
            if self.frame.is_none()
                && self.head_len == 0
                && self.message.is_none()
                && self.whole_message(&mut input, deflate.as_deref_mut(), sink)?
            {
                continue;
            }
            let Some(f) = &mut self.frame else {
                let used = self.read_header(input.bytes(), deflate.is_some())?;
                input.advance(used);
                if self.frame.as_ref().is_some_and(|f| f.left == 0) {
                    self.finish_frame(deflate.as_deref_mut(), sink)?;
                }
                continue;
            };
            let n = usize::try_from(f.left)
                .unwrap_or(usize::MAX)
                .min(input.bytes().len());
            self.take_payload(&input.bytes()[..n])?;
            input.advance(n);
            if self.frame.as_ref().is_some_and(|f| f.left == 0) {
                self.finish_frame(deflate.as_deref_mut(), sink)?;
            }
        }
        Ok(())
    }

    /// The common case in one step: `input` starts with a whole unfragmented data frame.
    /// Returns whether it did (consuming the frame), or `false` (nothing consumed) for the
    /// general path. Same checks and events as the general path, without its per-frame state
    /// or an incremental UTF-8 check: the text is all here, so one check finds what the
    /// incremental one would.
    fn whole_message(
        &mut self,
        input: &mut impl Input,
        deflate: Option<&mut Stream>,
        sink: &mut impl FnMut(Event),
    ) -> Result<bool, ProtocolError> {
        let bytes = input.bytes();
        let Some((h, used)) = parse_header(bytes, deflate.is_some())? else {
            return Ok(false);
        };
        let whole = h.len <= (bytes.len() - used) as u64;
        if !(whole && h.fin && matches!(h.opcode, TEXT | BINARY)) {
            return Ok(false);
        }
        at_most(h.len, self.limits.max_frame, FRAME)?;
        at_most(h.len, self.limits.max_message, MESSAGE)?;
        input.advance(used);
        let mut payload = input.take(h.len as usize);
        frame::unmask(payload.as_mut(), h.mask, 0);
        let data: Bytes = if h.compressed {
            decompress(deflate, payload.as_mut(), self.limits.max_message)?.into()
        } else {
            payload.into()
        };
        sink(Event::Message(if h.opcode == TEXT {
            Message::Text(Utf8Bytes::validate(data).ok_or(ProtocolError::InvalidUtf8)?)
        } else {
            Message::Binary(data)
        }));
        Ok(true)
    }

    /// Consumes header bytes, returning how many; sets `self.frame` once a whole header has
    /// arrived.
    /// `rsv1`: permessage-deflate was negotiated.
    fn read_header(&mut self, input: &[u8], rsv1: bool) -> Result<usize, ProtocolError> {
        let stashed = self.head_len as usize;
        if stashed == 0 {
            if let Some((h, used)) = parse_header(input, rsv1)? {
                self.start_frame(h)?;
                return Ok(used);
            }
            // parse_header wants more than `input` holds, and never more than MAX_HEADER.
            self.head[..input.len()].copy_from_slice(input);
            self.head_len = input.len() as u8;
            return Ok(input.len());
        }
        let take = (MAX_HEADER - stashed).min(input.len());
        self.head[stashed..stashed + take].copy_from_slice(&input[..take]);
        match parse_header(&self.head[..stashed + take], rsv1)? {
            Some((h, used)) => {
                self.head_len = 0;
                self.start_frame(h)?;
                Ok(used - stashed)
            }
            None => {
                self.head_len = (stashed + take) as u8;
                Ok(take)
            }
        }
    }

    fn start_frame(&mut self, h: Header) -> Result<(), ProtocolError> {
        match (h.opcode, &self.message) {
            (CONTINUATION, None) => {
                return Err(ProtocolError::UnexpectedContinuation);
            }
            (TEXT | BINARY, Some(_)) => {
                return Err(ProtocolError::UnfinishedMessage);
            }
            _ => {}
        }
        at_most(h.len, self.limits.max_frame, FRAME)?;
        let len = h.len as usize;
        let reserve = len.min(RESERVE_MAX);
        match h.opcode {
            TEXT | BINARY => {
                self.message = Some(Box::new(Partial {
                    text: h.opcode == TEXT,
                    compressed: h.compressed,
                    data: Vec::with_capacity(reserve),
                    checked: 0,
                }));
            }
            CONTINUATION => {}
            _ => self.control.reserve_exact(reserve),
        }
        if let Some(m) = &mut self.message
            && h.opcode < CLOSE
        {
            at_most(
                (m.data.len() + len) as u64,
                self.limits.max_message,
                MESSAGE,
            )?;
            m.data.reserve(reserve);
        }
        self.frame = Some(InFrame {
            opcode: h.opcode,
            fin: h.fin,
            mask: h.mask,
            left: h.len,
            done: 0,
        });
        Ok(())
    }

    fn take_payload(&mut self, chunk: &[u8]) -> Result<(), ProtocolError> {
        let f = self.frame.as_mut().expect("a frame is open");
        let dest = match (&mut self.message, f.opcode < CLOSE) {
            (Some(m), true) => &mut m.data,
            _ => &mut self.control,
        };
        let start = dest.len();
        dest.extend_from_slice(chunk);
        frame::unmask(&mut dest[start..], f.mask, f.done);
        f.done += chunk.len();
        f.left -= chunk.len() as u64;
        if f.opcode < CLOSE
            && let Some(m) = &mut self.message
            && m.text
            && !m.compressed
        {
            check_utf8(m)?;
        }
        Ok(())
    }

    fn finish_frame(
        &mut self,
        deflate: Option<&mut Stream>,
        sink: &mut impl FnMut(Event),
    ) -> Result<(), ProtocolError> {
        let f = self.frame.take().expect("a frame is open");
        match f.opcode {
            CLOSE => {
                self.closed = true;
                sink(Event::Close(parse_close(&std::mem::take(
                    &mut self.control,
                ))?));
            }
            PING => sink(Event::Ping(std::mem::take(&mut self.control).into())),
            PONG => sink(Event::Pong(std::mem::take(&mut self.control).into())),
            _ if f.fin => {
                let mut m = self.message.take().expect("a message is open");
                if m.compressed {
                    // Validated whole, below.
                    m.data = decompress(deflate, &m.data, self.limits.max_message)?;
                    m.checked = m.data.len();
                }
                let data = Bytes::from(m.data);
                sink(Event::Message(if m.text {
                    if m.checked != data.len() {
                        return Err(ProtocolError::InvalidUtf8); // ends inside a character
                    }
                    Message::Text(Utf8Bytes::validate(data).ok_or(ProtocolError::InvalidUtf8)?)
                } else {
                    Message::Binary(data)
                }));
            }
            _ => {}
        }
        Ok(())
    }
}

/// A decoder's state between two reads, for carrying a connection to another worker
/// (`handoff`): the bytes of a header that has not all arrived, the frame whose payload is
/// arriving, the data message assembled so far and a control frame's payload. Whatever it
/// holds, the new decoder goes on exactly where this one stopped.
#[derive(Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct DecoderState {
    head: Vec<u8>,
    frame: Option<FrameState>,
    message: Option<MessageState>,
    control: Vec<u8>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct FrameState {
    opcode: u8,
    fin: bool,
    mask: [u8; 4],
    left: u64,
    done: usize,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct MessageState {
    text: bool,
    compressed: bool,
    data: Bytes,
    checked: usize,
}

impl Decoder {
    /// Its state, taken out (it is left as new). `None` once a Close has been read: such a
    /// connection is closing and stays where it is.
    pub(crate) fn hand_off(&mut self) -> Option<DecoderState> {
        if self.closed {
            return None;
        }
        let frame = self.frame.take().map(|f| FrameState {
            opcode: f.opcode,
            fin: f.fin,
            mask: f.mask,
            left: f.left,
            done: f.done,
        });
        let message = self.message.take().map(|m| MessageState {
            text: m.text,
            compressed: m.compressed,
            data: Bytes::from(m.data),
            checked: m.checked,
        });
        let head = self.head[..self.head_len as usize].to_vec();
        self.head_len = 0;
        Some(DecoderState {
            head,
            frame,
            message,
            control: std::mem::take(&mut self.control),
        })
    }

    /// A decoder that goes on from `state` (taken from another worker's decoder), under this
    /// worker's `limits`. `None` for a state that no decoder could have been in.
    pub(crate) fn adopt(limits: Limits, state: DecoderState) -> Option<Decoder> {
        let DecoderState {
            head,
            frame,
            message,
            control,
        } = state;
        let mut d = Decoder::new(limits);
        if head.len() >= MAX_HEADER
            || (frame.is_some() && !head.is_empty())
            || control.len() > MAX_CONTROL_PAYLOAD
        {
            return None;
        }
        d.head[..head.len()].copy_from_slice(&head);
        d.head_len = head.len() as u8;
        d.frame = frame.map(|f| InFrame {
            opcode: f.opcode,
            fin: f.fin,
            mask: f.mask,
            left: f.left,
            done: f.done,
        });
        d.message = message.map(|m| {
            Box::new(Partial {
                text: m.text,
                compressed: m.compressed,
                checked: m.checked.min(m.data.len()),
                data: Vec::from(m.data),
            })
        });
        d.control = control;
        Some(d)
    }
}

/// A compressed message's payload, decompressed by the connection's deflate state (which
/// exists: RSV1 without it failed on the header).
fn decompress(
    deflate: Option<&mut Stream>,
    compressed: &[u8],
    limit: usize,
) -> Result<Vec<u8>, ProtocolError> {
    deflate
        .ok_or(ProtocolError::ReservedBits)?
        .decompress(compressed, limit)
}

/// Parses a client frame header from the front of `buf`: `None` if more bytes are needed.
/// Rules that the first two bytes already break fail at once. `rsv1`: permessage-deflate was
/// negotiated, so RSV1 marks a compressed message.
fn parse_header(buf: &[u8], rsv1: bool) -> Result<Option<(Header, usize)>, ProtocolError> {
    let [b0, b1, ..] = *buf else { return Ok(None) };
    let compressed = b0 & frame::RSV1 != 0;
    if b0 & 0x30 != 0 || (compressed && !rsv1) {
        return Err(ProtocolError::ReservedBits);
    }
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
    if !matches!(opcode, CONTINUATION | TEXT | BINARY | CLOSE | PING | PONG) {
        return Err(ProtocolError::ReservedOpcode(opcode));
    }
    if compressed && !matches!(opcode, TEXT | BINARY) {
        return Err(ProtocolError::MisplacedCompressionBit);
    }
    if b1 & 0x80 == 0 {
        return Err(ProtocolError::UnmaskedFrame);
    }
    let len7 = b1 & 0x7F;
    if opcode >= CLOSE {
        if !fin {
            return Err(ProtocolError::FragmentedControl);
        }
        if len7 as usize > MAX_CONTROL_PAYLOAD {
            return Err(ProtocolError::ControlTooLong);
        }
    }
    let ext = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let total = 2 + ext + 4;
    if buf.len() < total {
        return Ok(None);
    }
    let len = match ext {
        0 => u64::from(len7),
        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
        _ => u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes")),
    };
    if len >> 63 != 0 {
        return Err(ProtocolError::LengthOverflow);
    }
    let mask = buf[2 + ext..total].try_into().expect("4 bytes");
    Ok(Some((
        Header {
            fin,
            compressed,
            opcode,
            len,
            mask,
        },
        total,
    )))
}

/// What is over its limit: a frame or a message.
type TooBig = fn(usize) -> ProtocolError;
const FRAME: TooBig = |limit| ProtocolError::FrameTooBig { limit };
const MESSAGE: TooBig = |limit| ProtocolError::MessageTooBig { limit };

/// `too_big` if `len` bytes would pass `limit`.
fn at_most(len: u64, limit: usize, too_big: TooBig) -> Result<(), ProtocolError> {
    if len > limit as u64 {
        return Err(too_big(limit));
    }
    Ok(())
}

/// Checks the text that arrived since the last check; an incomplete character at the end
/// waits for its next bytes.
fn check_utf8(m: &mut Partial) -> Result<(), ProtocolError> {
    match simdutf8::compat::from_utf8(&m.data[m.checked..]) {
        Ok(_) => m.checked = m.data.len(),
        Err(e) if e.error_len().is_some() => return Err(ProtocolError::InvalidUtf8),
        Err(e) => m.checked += e.valid_up_to(),
    }
    Ok(())
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, String)>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::CloseTooShort),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !close::allowed(code) {
                return Err(ProtocolError::InvalidCloseCode(code));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| ProtocolError::InvalidUtf8)?;
            Ok(Some((code, reason.to_string())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    fn client_frame(b0: u8, payload: &[u8]) -> Vec<u8> {
        frame::client_frame(b0, payload, MASK)
    }

    fn decoder() -> Decoder {
        Decoder::new(Limits {
            max_frame: 1 << 20,
            max_message: 1 << 20,
        })
    }

    /// Feeds `bytes` in pieces of `step` and collects events.
    fn run(bytes: &[u8], step: usize) -> (Vec<Event>, Result<(), ProtocolError>) {
        let mut d = decoder();
        let mut events = Vec::new();
        for chunk in bytes.chunks(step) {
            if let Err(e) = d.feed(chunk, &mut |e| events.push(e)) {
                return (events, Err(e));
            }
        }
        (events, Ok(()))
    }

    #[test]
    fn whole_and_split_frames_decode_the_same() {
        let mut wire = client_frame(0x81, b"hello");
        wire.extend(client_frame(0x82, &[7u8; 300]));
        wire.extend(client_frame(0x89, b"p"));
        wire.extend(client_frame(0x02, b"ab"));
        wire.extend(client_frame(0x80, b"cd"));
        wire.extend(client_frame(0x88, &[0x03, 0xe8, b'o', b'k']));
        let want = vec![
            Event::Message(Message::from("hello")),
            Event::Message(Message::from(vec![7u8; 300])),
            Event::Ping(Bytes::from_static(b"p")),
            Event::Message(Message::from(b"abcd".to_vec())),
            Event::Close(Some((1000, "ok".into()))),
        ];
        for step in [1, 2, 3, 7, 64, wire.len()] {
            let (events, result) = run(&wire, step);
            assert_eq!(result, Ok(()), "step {step}");
            assert_eq!(events, want, "step {step}");
        }
    }

    #[test]
    fn a_decoder_handed_off_at_any_byte_goes_on_where_it_stopped() {
        let mut wire = client_frame(0x01, "héllo ".as_bytes());
        wire.extend(client_frame(0x89, b"ping"));
        wire.extend(client_frame(0x80, "wörld".as_bytes()));
        wire.extend(client_frame(0x82, &[9u8; 200]));
        wire.extend(client_frame(0x88, &[0x03, 0xe8]));
        let (want, _) = run(&wire, wire.len());
        assert_eq!(want.len(), 4);
        for cut in 0..wire.len() {
            let mut events = Vec::new();
            let mut d = decoder();
            d.feed(&wire[..cut], &mut |e| events.push(e)).unwrap();
            let state = d.hand_off().expect("no Close read yet");
            // The state crosses as bytes, as it does between workers.
            let bytes = postcard::to_stdvec(&state).unwrap();
            let state: DecoderState = postcard::from_bytes(&bytes).unwrap();
            let mut d = Decoder::adopt(d.limits, state).expect("a real decoder's state");
            d.feed(&wire[cut..], &mut |e| events.push(e)).unwrap();
            assert_eq!(events, want, "handed off after {cut} bytes");
        }
        let mut closed = decoder();
        closed.feed(&wire[..], &mut |_| {}).unwrap();
        assert!(closed.hand_off().is_none(), "a closing connection stays");
        let impossible = DecoderState {
            head: vec![0; MAX_HEADER],
            ..DecoderState::default()
        };
        assert!(Decoder::adopt(decoder().limits, impossible).is_none());
    }

    #[test]
    fn a_lent_buffer_decodes_as_a_slice_does_and_lends_only_large_whole_payloads() {
        let big: Vec<u8> = (0..5000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut wire = client_frame(0x81, &big);
        wire.extend(client_frame(0x81, b"small"));
        wire.extend(client_frame(0x82, &big[..LEND_MIN]));
        wire.extend(client_frame(0x02, &big[..2000])); // fragmented: assembled, so copied
        wire.extend(client_frame(0x80, b"!"));
        wire.extend(client_frame(0x81, &[0xff; 2000])); // not UTF-8
        for step in [1, 7, 1000, 4096, wire.len()] {
            let (want, want_result) = run(&wire, step);
            let mut d = decoder();
            let (mut events, mut result) = (Vec::new(), Ok(()));
            let mut lent = Vec::new();
            for piece in wire.chunks(step) {
                let mut buf = BytesMut::from(piece);
                let range = buf.as_ptr_range();
                result = d.feed(Lent(&mut buf), &mut |e| {
                    if let Event::Message(m) = &e {
                        lent.push(range.contains(&m.as_bytes().as_ptr()));
                    }
                    events.push(e);
                });
                if result.is_err() {
                    break;
                }
            }
            assert_eq!((&events, &result), (&want, &want_result), "step {step}");
            assert_eq!(result, Err(ProtocolError::InvalidUtf8));
            // Lent: the 5000 and 1024-byte payloads when their frame came in one piece; never
            // the small or the fragmented message.
            let one_piece = |start: usize, len: usize| start / step == (start + len - 1) / step;
            let third = 5008 + 11;
            let want_lent = [one_piece(0, 5008), false, one_piece(third, 1032), false];
            assert_eq!(lent, want_lent, "step {step}");
        }
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<(Vec<u8>, ProtocolError)> = vec![
            (client_frame(0xC1, b"x"), ProtocolError::ReservedBits),
            (client_frame(0x83, b""), ProtocolError::ReservedOpcode(3)),
            (vec![0x81, 0x01, b'x'], ProtocolError::UnmaskedFrame),
            (client_frame(0x09, b""), ProtocolError::FragmentedControl),
            (client_frame(0x89, &[0; 126]), ProtocolError::ControlTooLong),
            (
                client_frame(0x80, b"x"),
                ProtocolError::UnexpectedContinuation,
            ),
            (
                [client_frame(0x01, b"a"), client_frame(0x81, b"b")].concat(),
                ProtocolError::UnfinishedMessage,
            ),
            (client_frame(0x88, &[3]), ProtocolError::CloseTooShort),
            (
                client_frame(0x88, &[0x03, 0xed]),
                ProtocolError::InvalidCloseCode(1005),
            ),
            (
                client_frame(0x88, &[0x03, 0xe8, 0xff]),
                ProtocolError::InvalidUtf8,
            ),
            (client_frame(0x81, b"ok\xff"), ProtocolError::InvalidUtf8),
        ];
        for (wire, want) in cases {
            assert_eq!(run(&wire, wire.len()).1, Err(want), "{want:?}");
            assert_eq!(run(&wire, 1).1, Err(want), "{want:?} bytewise");
        }
    }

    #[test]
    fn invalid_utf8_fails_at_the_first_bad_byte() {
        // Valid start, then a byte that can never appear in UTF-8, then more.
        let mut payload = "héllo".as_bytes().to_vec();
        payload.push(0xff);
        payload.extend_from_slice(&[b'z'; 1000]);
        let wire = client_frame(0x81, &payload);
        let mut d = decoder();
        let mut events = Vec::new();
        let bad_at = 2 + 2 + 4 + 6; // header (126-form) + mask + valid text
        assert_eq!(d.feed(&wire[..bad_at], &mut |e| events.push(e)), Ok(()));
        assert_eq!(
            d.feed(&wire[bad_at..bad_at + 1], &mut |e| events.push(e)),
            Err(ProtocolError::InvalidUtf8)
        );
        // A character split across fragments is fine.
        let euro = "€".as_bytes();
        let wire = [
            client_frame(0x01, &euro[..1]),
            client_frame(0x80, &euro[1..]),
        ]
        .concat();
        assert_eq!(run(&wire, 1).0, vec![Event::Message(Message::from("€"))]);
        // ...but not one cut off by the end of the message.
        assert_eq!(
            run(&client_frame(0x81, &euro[..2]), 99).1,
            Err(ProtocolError::InvalidUtf8)
        );
    }

    #[test]
    fn limits_are_checked_on_the_header() {
        let mut d = Decoder::new(Limits {
            max_frame: 100,
            max_message: 150,
        });
        let mut events = Vec::new();
        let whole = client_frame(0x82, &[0; 101]);
        let too_big = Err(ProtocolError::FrameTooBig { limit: 100 });
        assert_eq!(d.feed(&whole[..8], &mut |e| events.push(e)), too_big);
        let mut d = Decoder::new(Limits {
            max_frame: 100,
            max_message: 150,
        });
        assert_eq!(
            d.feed(&whole[..], &mut |e| events.push(e)),
            too_big,
            "whole"
        );
        let mut d = Decoder::new(Limits {
            max_frame: 100,
            max_message: 150,
        });
        let wire = [client_frame(0x02, &[0; 100]), client_frame(0x80, &[0; 51])].concat();
        assert_eq!(
            d.feed(&wire[..], &mut |e| events.push(e)),
            Err(ProtocolError::MessageTooBig { limit: 150 })
        );
    }

    #[test]
    fn idle_decoder_holds_nothing() {
        let mut d = decoder();
        let mut events = Vec::new();
        d.feed(&client_frame(0x82, &[1; 5000])[..], &mut |e| events.push(e))
            .unwrap();
        d.feed(&client_frame(0x89, b"ping")[..], &mut |e| events.push(e))
            .unwrap();
        assert_eq!(d.buffered(), 0);
        assert_eq!(events.len(), 2);
    }

    /// A connection's deflate state in `mode`, as the upgrade would agree it for `offer`.
    fn deflate_stream(dedicated: bool, offer: &str) -> Stream {
        let settings = crate::proto::deflate::Settings {
            dedicated,
            window_bits: 15,
            min_size: 16,
            level: 1,
        };
        let codec = crate::proto::deflate::Codec::new(settings);
        crate::proto::deflate::negotiate(&codec, &[offer.to_string()]).unwrap()
    }

    /// `data` compressed as a client does: raw deflate, sync flush, `00 00 ff ff` stripped.
    fn compressed(c: &mut flate2::Compress, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(data.len() + 64);
        c.compress_vec(data, &mut out, flate2::FlushCompress::Sync)
            .unwrap();
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }

    /// Feeds `wire` in pieces of `step` through a decoder with `limits` and `deflate`.
    fn run_deflate(
        wire: &[u8],
        step: usize,
        limits: Limits,
        deflate: &mut Stream,
    ) -> (Vec<Event>, Result<(), ProtocolError>, usize) {
        let mut d = Decoder::new(limits);
        let mut events = Vec::new();
        let mut most = 0;
        for chunk in wire.chunks(step) {
            let result = d.feed_with(chunk, Some(&mut *deflate), &mut |e| events.push(e));
            most = most.max(d.buffered());
            if result.is_err() {
                return (events, result, most);
            }
        }
        (events, Ok(()), most)
    }

    const WIDE: Limits = Limits {
        max_frame: 1 << 20,
        max_message: 1 << 20,
    };

    #[test]
    fn compressed_messages_whole_split_and_fragmented() {
        let text = "héllo wörld, ".repeat(200);
        for (dedicated, offer) in [
            (false, "permessage-deflate"),
            (true, "permessage-deflate"),
            (true, "permessage-deflate; client_no_context_takeover"),
        ] {
            let takeover = dedicated && !offer.contains("client_no");
            let mut c = flate2::Compress::new(flate2::Compression::default(), false);
            let mut wire = Vec::new();
            for i in 0..3 {
                if !takeover {
                    c.reset();
                }
                let body = compressed(&mut c, text.as_bytes());
                if i == 1 {
                    // Fragmented: RSV1 on the first frame only; a Ping in between.
                    let (a, b) = body.split_at(body.len() / 2);
                    wire.extend(client_frame(0x41, a));
                    wire.extend(client_frame(0x89, b"p"));
                    wire.extend(client_frame(0x80, b));
                } else {
                    wire.extend(client_frame(0xC1, &body));
                }
                // A plain message between compressed ones is fine too.
                wire.extend(client_frame(0x82, b"plain"));
            }
            for step in [1, 7, 100, wire.len()] {
                let mut stream = deflate_stream(dedicated, offer);
                let (events, result, _) = run_deflate(&wire, step, WIDE, &mut stream);
                assert_eq!(result, Ok(()), "{offer}, step {step}");
                let texts = events
                    .iter()
                    .filter(|e| matches!(e, Event::Message(m) if m.as_text() == Some(&text)))
                    .count();
                assert_eq!(texts, 3, "{offer}, step {step}: {}", events.len());
                assert_eq!(events.len(), 7, "3 texts, 3 plain, 1 ping");
            }
        }
    }

    #[test]
    fn rsv1_is_allowed_only_on_a_negotiated_data_message_first_frame() {
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let body = compressed(&mut c, b"hello hello hello");
        // Not negotiated: RSV1 is a reserved bit (1002), as any other.
        assert_eq!(
            run(&client_frame(0xC1, &body), 99).1,
            Err(ProtocolError::ReservedBits)
        );
        let cases = [
            (
                [client_frame(0x41, &body), client_frame(0xC0, b"")].concat(),
                ProtocolError::MisplacedCompressionBit,
            ),
            (
                client_frame(0xC9, b"p"),
                ProtocolError::MisplacedCompressionBit,
            ),
            (
                client_frame(0xC8, b""),
                ProtocolError::MisplacedCompressionBit,
            ),
            (client_frame(0xE1, &body), ProtocolError::ReservedBits),
            (client_frame(0x91, &body), ProtocolError::ReservedBits),
            // Compressed, but not deflate.
            (
                client_frame(0xC2, &[0xff, 0xff, 0xff]),
                ProtocolError::BadCompressedData,
            ),
        ];
        for (wire, want) in cases {
            for step in [1, wire.len()] {
                let mut stream = deflate_stream(true, "permessage-deflate");
                let (_, result, _) = run_deflate(&wire, step, WIDE, &mut stream);
                assert_eq!(result, Err(want), "{want:?}, step {step}");
                assert_eq!(
                    want.close_code(),
                    if want == ProtocolError::BadCompressedData {
                        1007
                    } else {
                        1002
                    }
                );
            }
        }
        // Text is validated after decompression.
        let bad = compressed(
            &mut flate2::Compress::new(flate2::Compression::default(), false),
            b"ok \xff",
        );
        let mut stream = deflate_stream(false, "permessage-deflate");
        let wire = client_frame(0xC1, &bad);
        assert_eq!(
            run_deflate(&wire, wire.len(), WIDE, &mut stream).1,
            Err(ProtocolError::InvalidUtf8)
        );
    }

    /// A kilobyte that inflates to megabytes closes with 1009, and the decoder never holds
    /// more than the limit for it (the decompressed output is bounded in `deflate::inflate`).
    #[test]
    fn a_compressed_bomb_is_too_big_before_it_is_inflated() {
        let mut c = flate2::Compress::new(flate2::Compression::best(), false);
        let body = compressed(&mut c, &vec![0u8; 1 << 20]);
        assert!(body.len() <= 1100, "a 1 KiB frame: {}", body.len());
        let limits = Limits {
            max_frame: 64 << 10,
            max_message: 64 << 10,
        };
        let too_big = ProtocolError::MessageTooBig { limit: 64 << 10 };
        assert_eq!(too_big.close_code(), 1009);
        let fragmented = [
            client_frame(0x42, &body[..500]),
            client_frame(0x80, &body[500..]),
        ]
        .concat();
        for wire in [client_frame(0xC2, &body), fragmented] {
            for step in [1, 333, wire.len()] {
                for dedicated in [false, true] {
                    let mut stream = deflate_stream(dedicated, "permessage-deflate");
                    let (events, result, most) = run_deflate(&wire, step, limits, &mut stream);
                    assert_eq!(result, Err(too_big), "step {step}");
                    assert!(events.is_empty());
                    assert!(most <= limits.max_message, "held {most}");
                }
            }
        }
    }

    #[test]
    fn nothing_is_read_after_close() {
        let wire = [
            client_frame(0x88, b""),
            client_frame(0x81, b"late"),
            vec![0xff; 4],
        ]
        .concat();
        assert_eq!(run(&wire, wire.len()), (vec![Event::Close(None)], Ok(())));
    }
}
