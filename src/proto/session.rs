//! One connection's protocol state, without its socket: the upgrade, then frames, then the
//! closing handshake.
//!
//! The owner (the worker) reads bytes from wherever it likes, passes them to
//! [`Session::read_buffer`], acts on the [`Step`]s that come out (a request to admit, messages
//! for the app, the end), and writes the queued output ([`Session::write_to`]) to the socket.
//! Replies the protocol itself owes the client — Pong for Ping, the echo of a Close, our close
//! code when the client breaks the rules — are queued here, so the owner cannot get them
//! wrong.

use super::decoder::{Decoder, DecoderState, Event, Input, Lent, Limits};
use super::deflate::{Route, Stream};
use super::error::ProtocolError;
use super::frame::{self, CLOSE, PONG, RSV1};
use super::handshake::{self, Answer, FileRequest, Parsed, Reject, Request};
use super::send_queue::SendQueue;
use crate::Message;
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// Where a connection is in its life. Each state says what may still be read and sent.
enum Phase {
    /// Request bytes so far.
    Handshake(Vec<u8>),
    /// A valid request is with the owner; bytes that followed it wait here.
    Deciding(Vec<u8>),
    Open,
    /// We sent Close and wait for the client's; data that still arrives is dropped.
    CloseSent,
    /// The client sent Close. Ours (its echo) goes out when the owner reaches the `Closed`
    /// step; until then, replies to the messages before it may still be sent.
    CloseReceived,
    /// Both sides sent Close: the connection ends once the output is written.
    Closed,
    /// The client broke the protocol. Nothing more is read; replies to the messages before
    /// the break may still be sent, and our close code goes out when the owner reaches the
    /// `Failed` step (none if we had sent Close already: `close_sent`).
    Broken {
        close_sent: bool,
    },
    /// Failed for good (a protocol error answered, a hook's panic, a socket error): nothing
    /// more is read or sent. Once the output is written, our side is shut down.
    Failed,
    /// Never upgraded: the upgrade was refused, or the request was a plain HTTP one. The HTTP
    /// answer is (or is about to be) queued, nothing more is read, and the connection ends
    /// once the answer is written.
    Refused,
}

/// The stage of a connection as operators see it (`wsd connections`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Handshake,
    Open,
    /// Either side sent Close, the connection failed, or its upgrade was refused.
    Closing,
}

/// What the owner must act on, in order.
#[derive(Debug)]
pub(crate) enum Step {
    /// A valid upgrade request: answer with [`Session::accept`] or [`Session::reject`].
    /// (Boxed, as is `Fetch`: a step is moved twice per message, so it is kept small.)
    Request(Box<handshake::Request>),
    Message(Message),
    /// The client sent Close (code and reason, if any). Reply with [`Session::answer`].
    Closed(Option<(u16, String)>),
    /// The client broke the protocol. Send our close code with [`Session::answer`].
    Failed(ProtocolError),
    /// The request was not an acceptable upgrade; the HTTP error is queued.
    Rejected(Reject),
    /// A plain `GET`/`HEAD`, not an upgrade. Nothing more is read; answer with
    /// [`Session::respond`] (a file) or [`Session::reject`] (`FileRequest::refusal`).
    Fetch(Box<FileRequest>),
}

/// An open connection's protocol state as it travels to another worker (`handoff`).
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct SessionState {
    pub decoder: DecoderState,
    /// The permessage-deflate the upgrade agreed to, if any.
    pub deflate: Option<super::deflate::Agreed>,
    /// With the client's context takeover, the window its messages may refer to.
    pub window: Option<bytes::Bytes>,
    /// Bytes for the client not yet written: whole frames, and maybe the rest of one.
    pub queued: bytes::Bytes,
}

pub(crate) struct Session {
    phase: Phase,
    decoder: Decoder,
    /// permessage-deflate, if the upgrade agreed to it (boxed: most connections have none).
    deflate: Option<Box<Stream>>,
    max_header_bytes: usize,
    /// Bytes for the client, in order.
    out: SendQueue,
}

impl Session {
    pub(crate) fn new(limits: Limits, max_header_bytes: usize) -> Session {
        Session {
            phase: Phase::Handshake(Vec::new()),
            decoder: Decoder::new(limits),
            deflate: None,
            max_header_bytes,
            out: SendQueue::default(),
        }
    }

    /// The upgrade is done (the connection may be closing).
    pub(crate) fn is_open(&self) -> bool {
        !matches!(
            self.phase,
            Phase::Handshake(_) | Phase::Deciding(_) | Phase::Refused
        )
    }

    /// Data messages may still be sent.
    pub(crate) fn can_send(&self) -> bool {
        matches!(
            self.phase,
            Phase::Open | Phase::CloseReceived | Phase::Broken { close_sent: false }
        )
    }

    /// We have sent Close (or an HTTP answer), or failed: nothing more goes out but what is
    /// queued.
    pub(crate) fn close_sent(&self) -> bool {
        matches!(
            self.phase,
            Phase::CloseSent
                | Phase::Closed
                | Phase::Broken { close_sent: true }
                | Phase::Failed
                | Phase::Refused
        )
    }

    /// Nothing more is read from the client: it sent Close, broke the protocol, or failed.
    fn input_done(&self) -> bool {
        matches!(
            self.phase,
            Phase::CloseReceived
                | Phase::Closed
                | Phase::Broken { .. }
                | Phase::Failed
                | Phase::Refused
        )
    }

    /// Nothing more will be queued: both Closes are done, or the connection failed or was
    /// refused. (A TLS connection says close_notify once its output is written.)
    #[cfg(feature = "tls")]
    pub(crate) fn is_ending(&self) -> bool {
        matches!(self.phase, Phase::Closed | Phase::Failed | Phase::Refused)
    }

    /// The connection failed or was refused: once its output is written, our side is shut
    /// down and its input is discarded until the client goes.
    pub(crate) fn is_failed(&self) -> bool {
        matches!(self.phase, Phase::Failed | Phase::Refused)
    }

    /// Both sides have closed and everything is written: the socket can go.
    pub(crate) fn finished(&self) -> bool {
        matches!(self.phase, Phase::Closed) && self.out.is_empty()
    }

    /// The owner should flush: output is queued, or the connection is ending (a flush is what
    /// finds that it has ended).
    pub(crate) fn wants_flush(&self) -> bool {
        !self.out.is_empty() || self.input_done()
    }

    pub(crate) fn stage(&self) -> Stage {
        match self.phase {
            Phase::Handshake(_) | Phase::Deciding(_) => Stage::Handshake,
            Phase::Open => Stage::Open,
            _ => Stage::Closing,
        }
    }

    /// Bytes queued for the client and not yet written.
    pub(crate) fn queued(&self) -> usize {
        self.out.len()
    }

    /// Queues a data message: compressed if permessage-deflate was agreed and the message is
    /// at least `compression_min_size`, plain otherwise. The owner checks
    /// [`Session::can_send`] first.
    pub(crate) fn push_message(&mut self, opcode: u8, payload: bytes::Bytes) {
        let Session { deflate, out, .. } = self;
        let compressed = deflate
            .as_mut()
            .is_some_and(|d| d.compress(&payload, |body| out.push_frame_copy(opcode | RSV1, body)));
        if !compressed {
            out.push_frame(opcode, payload);
        }
    }

    /// How a message of `len` bytes goes out on this connection.
    pub(crate) fn route(&self, len: usize) -> Route {
        self.deflate.as_ref().map_or(Route::Plain, |d| d.route(len))
    }

    /// The permessage-deflate state, if the upgrade agreed to it.
    pub(crate) fn deflate(&self) -> Option<&Stream> {
        self.deflate.as_deref()
    }

    /// Uses permessage-deflate from now on: the upgrade's answer agreed to it. Called before
    /// [`Session::accept`], which may already read compressed frames.
    pub(crate) fn use_deflate(&mut self, stream: Stream) {
        self.deflate = Some(Box::new(stream));
    }

    /// Queues bytes that are whole frames already (a broadcast's shared encoding).
    pub(crate) fn push_encoded(&mut self, bytes: &bytes::Bytes) {
        self.out.push_encoded(bytes);
    }

    /// Writes what is queued; true once everything is written.
    pub(crate) fn write_to(&mut self, out: &mut impl std::io::Write) -> std::io::Result<bool> {
        self.out.write_to(out)
    }

    /// Frees the send queue's memory if it is empty (the idle sweep).
    pub(crate) fn release_if_empty(&mut self) {
        self.out.release_if_empty();
    }

    /// Takes what another worker needs to go on with this connection, and leaves it with
    /// nothing to send: the decoder's state, the agreed permessage-deflate and the bytes not
    /// yet written. Only an open connection can go (not one in its upgrade or closing, which
    /// end where they are). `None` leaves the session as it was.
    pub(crate) fn hand_off(&mut self) -> Option<SessionState> {
        if !self.can_hand_off() {
            return None;
        }
        let decoder = self.decoder.hand_off()?;
        Some(SessionState {
            decoder,
            deflate: self.deflate.as_ref().map(|d| *d.agreed()),
            window: self.deflate.as_ref().and_then(|d| d.window()),
            queued: self.out.take_all().into(),
        })
    }

    /// Whether [`Session::hand_off`] would take this connection.
    pub(crate) fn can_hand_off(&self) -> bool {
        matches!(self.phase, Phase::Open) && !self.decoder.is_closed()
    }

    /// An open connection that goes on from `state` (taken by [`Session::hand_off`] in another
    /// worker), with this worker's limits and `deflate` (made from `state.deflate`); `None`
    /// if the state is not one a session could have been in.
    pub(crate) fn adopt(
        limits: Limits,
        max_header_bytes: usize,
        state: SessionState,
        deflate: Option<Stream>,
    ) -> Option<Session> {
        let mut out = SendQueue::default();
        if !state.queued.is_empty() {
            out.push_encoded(&state.queued);
        }
        Some(Session {
            phase: Phase::Open,
            decoder: Decoder::adopt(limits, state.decoder)?,
            deflate: deflate.map(Box::new),
            max_header_bytes,
            out,
        })
    }

    /// Memory this connection holds for protocol state beyond its fixed size.
    pub(crate) fn footprint(&self) -> usize {
        let pending = match &self.phase {
            Phase::Handshake(b) | Phase::Deciding(b) => b.capacity(),
            _ => 0,
        };
        pending + self.decoder.buffered() + self.out.footprint()
    }

    /// Takes the bytes in `buf`, a read buffer, and leaves it empty. With `lend`, large
    /// payloads become views into it (see [`Lent`]); otherwise they are copied.
    pub(crate) fn read_buffer(
        &mut self,
        buf: &mut BytesMut,
        lend: bool,
        steps: &mut VecDeque<Step>,
    ) {
        if lend {
            self.take(Lent(buf), steps);
        } else {
            self.take(&buf[..], steps);
        }
        buf.clear();
    }

    /// Takes bytes from the client: decrypted TLS records, or (in tests) bytes as they come.
    #[cfg(any(test, feature = "tls"))]
    pub(crate) fn read(&mut self, input: &[u8], steps: &mut VecDeque<Step>) {
        self.take(input, steps);
    }

    /// Takes bytes from the client: a slice, or a read buffer that frames' large payloads
    /// may be lent from ([`Lent`]).
    fn take(&mut self, input: impl Input, steps: &mut VecDeque<Step>) {
        if self.input_done() {
            return;
        }
        match &mut self.phase {
            Phase::Handshake(buf) => {
                let input = input.bytes();
                // Parsed in place when the whole request came in one read (the usual case);
                // only a request split across reads is copied.
                let stashed = !buf.is_empty();
                if stashed {
                    buf.extend_from_slice(input);
                }
                let whole: &[u8] = if stashed { buf } else { input };
                match handshake::parse(whole, self.max_header_bytes) {
                    Parsed::Partial if stashed => {}
                    Parsed::Partial => buf.extend_from_slice(input),
                    Parsed::Upgrade(request, used) => {
                        let rest = whole[used..].to_vec();
                        self.phase = Phase::Deciding(rest);
                        steps.push_back(Step::Request(Box::new(request)));
                    }
                    Parsed::Fetch(request) => {
                        self.phase = Phase::Refused;
                        steps.push_back(Step::Fetch(Box::new(request)));
                    }
                    Parsed::Reject(r) => {
                        self.reject(&r);
                        steps.push_back(Step::Rejected(r));
                    }
                }
            }
            Phase::Deciding(rest) => rest.extend_from_slice(input.bytes()),
            Phase::Open | Phase::CloseSent => self.read_frames(input, steps),
            _ => {}
        }
    }

    /// Upgrades: queues the `101` (with what `answer` agreed) and reads any frames that came
    /// with the request.
    pub(crate) fn accept(
        &mut self,
        request: &Request,
        answer: &Answer,
        steps: &mut VecDeque<Step>,
    ) {
        if !matches!(self.phase, Phase::Deciding(_)) {
            return;
        }
        let Phase::Deciding(rest) = std::mem::replace(&mut self.phase, Phase::Open) else {
            unreachable!("checked just above");
        };
        self.out.push_encoded(&handshake::accept(request, answer));
        if !rest.is_empty() {
            self.read_frames(&rest[..], steps);
        }
    }

    /// Refuses the upgrade with an HTTP error; the connection ends once it is written.
    pub(crate) fn reject(&mut self, reject: &Reject) {
        self.respond(&reject.response());
    }

    /// Answers with a whole HTTP response (a file, say); the connection ends once it is
    /// written. A large body is queued by reference, not copied.
    pub(crate) fn respond(&mut self, response: &bytes::Bytes) {
        self.phase = Phase::Refused;
        self.out.push_encoded(response);
    }

    /// Queues the protocol's answer to a `Closed` or `Failed` step. The owner calls it when it
    /// reaches that step, after the messages before it, so replies to those messages (an echo
    /// of the message just before a bad frame, say) go out ahead of the close.
    pub(crate) fn answer(&mut self, step: &Step) {
        match step {
            // Echo the client's code (RFC 6455 §5.5.1); no code gets none back.
            Step::Closed(frame) => {
                if matches!(self.phase, Phase::CloseReceived) {
                    let code = frame.as_ref().map(|(code, _)| *code);
                    let payload = code.map_or(Vec::new(), |c| frame::close_payload(c, ""));
                    self.out.push_encoded(&frame::encode(CLOSE, &payload));
                    self.phase = Phase::Closed;
                }
            }
            Step::Failed(e) => self.fail(e.close_code(), &e.to_string()),
            _ => {}
        }
    }

    /// Starts the closing handshake (or finishes it, if the client's Close came first).
    /// False if there is nothing to close politely (still handshaking, refused or failed) or
    /// Close was already sent.
    pub(crate) fn close(&mut self, code: u16, reason: &str) -> bool {
        let next = match self.phase {
            Phase::Open => Phase::CloseSent,
            Phase::CloseReceived => Phase::Closed,
            Phase::Broken { close_sent: false } => Phase::Broken { close_sent: true },
            _ => return false,
        };
        let payload = frame::close_payload(code, reason);
        self.out.push_encoded(&frame::encode(CLOSE, &payload));
        self.phase = next;
        true
    }

    /// Closes with `code` (if Close was not sent yet) and stops reading the client for good.
    pub(crate) fn fail(&mut self, code: u16, reason: &str) {
        self.close(code, reason);
        self.end();
    }

    /// The socket failed: nothing more is read or sent. True if the connection could still
    /// send, so the app has not heard of its end yet.
    pub(crate) fn abort(&mut self) -> bool {
        let live = self.can_send();
        self.end();
        live
    }

    /// Failed if it had been upgraded, refused otherwise.
    fn end(&mut self) {
        self.phase = if self.is_open() {
            Phase::Failed
        } else {
            Phase::Refused
        };
    }

    /// Queues a Ping (keepalive).
    pub(crate) fn ping(&mut self) {
        if self.can_send() {
            self.out.push_encoded(&frame::encode(frame::PING, b""));
        }
    }

    fn read_frames(&mut self, input: impl Input, steps: &mut VecDeque<Step>) {
        let Session {
            phase,
            decoder,
            deflate,
            out,
            ..
        } = self;
        let result = decoder.feed_with(input, deflate.as_deref_mut(), &mut |event| match event {
            Event::Message(m) if matches!(phase, Phase::Open) => steps.push_back(Step::Message(m)),
            Event::Message(_) | Event::Pong(_) => {}
            Event::Ping(payload) if matches!(phase, Phase::Open) => out.push_frame(PONG, payload),
            Event::Ping(_) => {}
            Event::Close(frame) => {
                *phase = match phase {
                    Phase::CloseSent => Phase::Closed,
                    _ => Phase::CloseReceived,
                };
                steps.push_back(Step::Closed(frame));
            }
        });
        if let Err(e) = result {
            self.phase = Phase::Broken {
                close_sent: self.close_sent(),
            };
            steps.push_back(Step::Failed(e));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    const REQUEST: &[u8] = b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn masked(b0: u8, payload: &[u8]) -> Vec<u8> {
        frame::client_frame(b0, payload, [0x37, 0xfa, 0x21, 0x3d])
    }

    fn session() -> Session {
        Session::new(
            Limits {
                max_frame: 1000,
                max_message: 1000,
            },
            4096,
        )
    }

    fn drain(s: &mut Session) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(s.out.write_to(&mut out).unwrap());
        out
    }

    #[test]
    fn upgrade_then_frames_in_the_same_read() {
        let mut s = session();
        let mut steps = VecDeque::new();
        let mut wire = REQUEST.to_vec();
        wire.extend(masked(0x81, b"hi"));
        wire.extend(masked(0x89, b"p"));
        // Arrives split inside the request line, then all at once.
        s.read(&wire[..10], &mut steps);
        assert!(steps.is_empty());
        s.read(&wire[10..], &mut steps);
        let Some(Step::Request(req)) = steps.pop_front() else {
            panic!("no request")
        };
        assert_eq!(req.path, "/x");
        s.accept(&req, &Answer::default(), &mut steps);
        assert!(matches!(steps.pop_front(), Some(Step::Message(m)) if m.as_text() == Some("hi")));
        let out = drain(&mut s);
        assert!(out.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(out.ends_with(&[0x8A, 0x01, b'p']), "pong echoes the ping");
    }

    fn open_session(steps: &mut VecDeque<Step>) -> Session {
        let mut s = session();
        s.read(REQUEST, steps);
        let Some(Step::Request(req)) = steps.pop_front() else {
            panic!("no request")
        };
        s.accept(&req, &Answer::default(), steps);
        drain(&mut s);
        s
    }

    #[test]
    fn close_is_echoed_and_protocol_errors_fail_with_their_code() {
        let mut steps = VecDeque::new();
        let mut s = open_session(&mut steps);
        s.read(&masked(0x88, &[0x0f, 0xa0]), &mut steps); // 4000
        let step = steps.pop_front().unwrap();
        assert!(matches!(step, Step::Closed(Some((4000, _)))));
        s.answer(&step);
        assert_eq!(drain(&mut s), vec![0x88, 0x02, 0x0f, 0xa0]);
        assert!(s.finished());

        // A good message, then a bad frame, in one read: the app's reply to the message goes
        // out before the close code.
        let mut s = open_session(&mut steps);
        s.read(
            &[masked(0x81, b"ok"), masked(0x83, b"")].concat(),
            &mut steps,
        );
        assert!(matches!(steps.pop_front(), Some(Step::Message(_))));
        s.out.push_frame(frame::TEXT, Bytes::from_static(b"ok"));
        let step = steps.pop_front().unwrap();
        assert!(matches!(step, Step::Failed(_)));
        s.answer(&step);
        let out = drain(&mut s);
        assert_eq!(&out[..4], &[0x81, 0x02, b'o', b'k']);
        assert_eq!(&out[4..8], &[0x88, out[5], 0x03, 0xea], "then 1002");
        assert!(s.is_failed());
        s.read(&masked(0x81, b"ignored"), &mut steps);
        assert!(steps.is_empty());
    }

    /// With permessage-deflate agreed at the upgrade, frames that came with the request are
    /// decompressed, and messages go out compressed (RSV1) from the first one.
    #[test]
    fn deflate_agreed_at_the_upgrade_applies_to_both_directions() {
        use crate::proto::deflate::{Codec, Settings, negotiate};
        let codec = Codec::new(Settings {
            dedicated: true,
            window_bits: 15,
            min_size: 16,
            level: 1,
        });
        let text = "compress me, ".repeat(50);
        let mut c = flate2::Compress::new(flate2::Compression::default(), false);
        let mut body = Vec::with_capacity(1000);
        c.compress_vec(text.as_bytes(), &mut body, flate2::FlushCompress::Sync)
            .unwrap();
        body.truncate(body.len() - 4);
        let request = std::str::from_utf8(REQUEST).unwrap().replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        );
        let mut wire = request.into_bytes();
        wire.extend(masked(0xC1, &body));

        let mut s = session();
        let mut steps = VecDeque::new();
        s.read(&wire, &mut steps);
        let Some(Step::Request(req)) = steps.pop_front() else {
            panic!("no request")
        };
        let stream = negotiate(&codec, &req.extensions).unwrap();
        let answer = Answer {
            extensions: Some(stream.agreed().response()),
            ..Answer::default()
        };
        s.use_deflate(stream);
        s.accept(&req, &answer, &mut steps);
        assert!(matches!(steps.pop_front(), Some(Step::Message(m)) if m.as_text() == Some(&text)));
        let out = drain(&mut s);
        let head = std::str::from_utf8(&out).unwrap();
        assert!(head.contains("\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"));

        s.push_message(frame::TEXT, Bytes::from(text.clone()));
        s.push_message(frame::TEXT, Bytes::from_static(b"short"));
        let out = drain(&mut s);
        assert_eq!(out[0], 0xC1, "compressed: FIN, RSV1, text");
        let len = out[1] as usize;
        assert!(len < 126 && len < text.len());
        let mut d = flate2::Decompress::new(false);
        let mut plain = Vec::with_capacity(text.len() + 10);
        let mut input = out[2..2 + len].to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        d.decompress_vec(&input, &mut plain, flate2::FlushDecompress::Sync)
            .unwrap();
        assert_eq!(plain, text.as_bytes());
        assert_eq!(
            &out[2 + len..],
            &[0x81, 5, b's', b'h', b'o', b'r', b't'],
            "under min_size: plain"
        );
    }

    #[test]
    fn a_refused_request_gets_its_status_and_nothing_else() {
        let mut s = session();
        let mut steps = VecDeque::new();
        s.read(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", &mut steps);
        let Some(Step::Fetch(req)) = steps.pop_front() else {
            panic!("a plain GET is a file request")
        };
        assert!(
            s.is_failed() && s.close_sent(),
            "nothing more is read or sent"
        );
        s.read(b"GET /more HTTP/1.1\r\n\r\n", &mut steps);
        assert!(steps.is_empty());
        s.reject(&req.refusal());
        assert!(drain(&mut s).starts_with(b"HTTP/1.1 426 "));
        assert!(!s.close(1000, ""));
        s.out.push_frame(frame::TEXT, Bytes::from_static(b"x"));
        assert!(s.is_failed() && !s.can_send());
    }
}
