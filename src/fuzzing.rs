//! The entry point of the fuzz target (`fuzz/`) and of the corpus replay test: wsd's
//! server-side read path driven from bytes, with no sockets.
//!
//! `feed` plays one connection: the input is everything the client sends (an upgrade request,
//! then frames), delivered in uneven pieces derived from the input itself so split headers,
//! split UTF-8 and split requests are all explored; every fourth piece is a 4 KiB read buffer
//! that large payloads are lent from. The steps the protocol yields are dispatched as the
//! worker does — admit or refuse the request, hand messages to an echo app, honour closes —
//! and the output is written through a socket that takes a few bytes at a time. Along the way
//! it checks the invariants the worker relies on.

use crate::proto::handshake::{self, Reject};
use crate::proto::{Limits, Session, Step};
use std::collections::VecDeque;
use std::io::{self, Write};

/// Runs one client byte stream through the protocol. Panics only on a broken invariant.
pub fn feed(data: &[u8]) {
    let limits = Limits {
        max_frame: 1 << 16,
        max_message: 1 << 18,
    };
    let mut session = Session::new(limits, 4096);
    let mut steps = VecDeque::new();
    let mut socket = Trickle::default();
    let mut rest = data;
    let mut turn = 0usize;
    while !rest.is_empty() {
        // Every fourth piece is large and comes as the worker's read buffer does, whose large
        // payloads are lent to messages rather than copied.
        let lend = turn % 4 == 3;
        let n = if lend {
            4096
        } else {
            1 + (rest[0] as usize * 31 + turn) % 257
        };
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        turn += 1;
        let was_failed = session.is_failed();
        if lend {
            let mut buf = bytes::BytesMut::from(chunk);
            session.read_buffer(&mut buf, true, &mut steps);
            assert!(buf.is_empty(), "the read buffer is left empty");
        } else {
            session.read(chunk, &mut steps);
        }
        if was_failed {
            assert!(steps.is_empty(), "a failed connection yields nothing more");
        }
        while let Some(step) = steps.pop_front() {
            match step {
                Step::Request(req) => {
                    // The worker's admission checks: origin, then the forwarded address.
                    let allowed = [
                        "https://ok.example".to_string(),
                        "https://*.ok.example".to_string(),
                    ];
                    let trusted = ["127.0.0.0/8".parse().expect("a CIDR")];
                    let peer = std::net::IpAddr::from([127, 0, 0, 1]);
                    let client = handshake::client_ip(peer, &req, &trusted);
                    if req.forwarded_for.is_none() && req.real_ip.is_none() {
                        assert_eq!(client, peer, "no header, no other address");
                    }
                    let origin_ok = handshake::origin_allowed(req.origin.as_deref(), &allowed);
                    if !origin_ok || req.path.contains("refuse") {
                        session.reject(Reject {
                            status: 403,
                            why: "refused",
                        });
                    } else {
                        assert!(handshake::accept(&req).starts_with(b"HTTP/1.1 101 "));
                        session.accept(&req, &mut steps);
                    }
                }
                Step::Message(msg) => {
                    assert!(session.is_open());
                    if msg.as_text() == Some("close") {
                        session.close(4000, "asked to");
                    } else if session.can_send() {
                        let (opcode, payload) = msg.into_parts();
                        session.push_frame(opcode, payload);
                    }
                }
                Step::Closed(_) | Step::Failed(_) => {
                    session.answer(&step);
                    assert!(session.close_sent() || !session.is_open());
                }
                Step::Rejected(_) => assert!(session.is_failed() && session.close_sent()),
                // As a worker without static_dir: the request's old refusal.
                Step::Fetch(req) => {
                    assert!(session.is_failed() && session.close_sent());
                    session.reject(req.refusal());
                }
            }
        }
        // Write what is queued through a socket that takes little at a time.
        socket.room = 1 + turn % 97;
        let before = session.queued();
        match session.write_to(&mut socket) {
            Ok(_) => assert!(session.queued() <= before),
            Err(e) => panic!("in-memory socket failed: {e}"),
        }
        if session.wants_flush() && session.queued() == 0 && session.is_open() {
            assert!(session.close_sent(), "every ending is answered");
        }
    }
    assert!(
        session.footprint() <= data.len() + (1 << 18) + 64 * 1024,
        "bounded memory"
    );
}

/// A socket that takes up to `room` bytes per write and then reports it is full.
#[derive(Default)]
struct Trickle {
    room: usize,
    taken: usize,
}

impl Write for Trickle {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.taken >= self.room {
            self.taken = 0;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.room - self.taken);
        self.taken += n;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
