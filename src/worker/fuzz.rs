//! The fuzz target's harness: a real worker loop, fed one client's bytes over a real loopback
//! connection, so the fuzzer drives the code that serves clients (accept, the handshake and
//! its admission checks, frame decoding, hook dispatch, closing, reaping), not a copy of it.
//!
//! One loop per thread serves every input, as one worker serves every client. Each input is a
//! client: it connects, sends its bytes in uneven pieces derived from the input (so split
//! headers, split UTF-8 and split requests are all explored), with the loop taking each piece
//! before the next is sent; it reads whatever the server answers, then resets the connection.
//! After each piece the connections' protocol state must stay within its bounds; after the
//! reset the loop must have let go of the connection and everything it held.

use super::event_loop::Loop;
use super::{Context, Worker};
use crate::bus::Bus;
use crate::bus::wire::Origin;
use crate::config::Compression;
use crate::{ConnId, Message};
use mio::Events;
use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// Limits small enough that inputs of a few KiB reach them.
const MAX_FRAME: usize = 1 << 16;
const MAX_MESSAGE: usize = 1 << 18;
const MAX_HEADER: usize = 4096;
/// Turns the loop may take to settle after a piece before the harness calls it stuck.
const SETTLE_TURNS: usize = 10_000;
/// How long the worker may take to see a client's reset. On loopback it is normally there at
/// once, but the kernel may finish delivering it a moment later on a busy machine.
const RESET_DEADLINE: Duration = Duration::from_secs(2);

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// Runs one client byte stream through a worker. Panics only on a broken invariant.
pub fn feed(data: &[u8]) {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        h.get_or_insert_with(Harness::new).feed(data);
    });
}

struct Harness {
    worker: Loop,
    events: Events,
    addr: SocketAddr,
    /// The master's end of the worker's channel: kept open, or the worker would stop.
    _master: UnixStream,
}

impl Harness {
    fn new() -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        let addr = listener.local_addr().expect("its address");
        let (master, channel) = UnixStream::pair().expect("a socket pair");
        let mut w = Worker::new(&format!("websocket://{addr}"));
        w.max_frame_size = MAX_FRAME;
        w.max_message_size = MAX_MESSAGE;
        w.max_header_bytes = MAX_HEADER;
        w.allowed_origins = vec!["https://ok.example".into(), "https://*.ok.example".into()];
        w.trusted_proxies = vec!["127.0.0.0/8".parse().expect("a CIDR")];
        // Dedicated mode reaches every deflate path: context takeover with the connection's
        // own compressor and decompressor, and the worker's for clients that offer no takeover.
        w.compression = Compression::Dedicated;
        w.compression_min_size = 16;
        w.on_message(echo);
        let bus = Bus::new(Origin { host: 0, slot: 0 }, Vec::new());
        let worker = Loop::new(w, 0, listener, channel, bus).expect("a worker loop");
        Harness {
            worker,
            events: Events::with_capacity(64),
            addr,
            _master: master,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let mut client = connect(self.addr);
        self.settle();
        let mut rest = data;
        let mut turn = 0usize;
        'pieces: while !rest.is_empty() {
            // Every fourth piece is large: several frames, or a payload large enough to be
            // lent from the worker's read buffer rather than copied.
            let n = if turn % 4 == 3 {
                4096
            } else {
                1 + (rest[0] as usize * 31 + turn) % 257
            };
            let (piece, tail) = rest.split_at(n.min(rest.len()));
            rest = tail;
            turn += 1;
            let mut piece = piece;
            // The server may stop reading a client that does not read (back-pressure), so
            // the client reads between writes, as a real one would.
            while !piece.is_empty() {
                match client.write(piece) {
                    Ok(n) => piece = &piece[n..],
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    // The server closed or reset the connection: the rest is not wanted.
                    Err(_) => break 'pieces,
                }
                self.settle();
                drain(&mut client);
            }
            self.check_bounds(data.len());
        }
        drain(&mut client);
        drop(client); // A reset (SO_LINGER 0): the server sees the client go.
        self.settle();
        let deadline = Instant::now() + RESET_DEADLINE;
        while !self.worker.ctx.conns.is_empty() && Instant::now() < deadline {
            // Waits in poll for the reset's event, then does what it brings.
            let wait = Some(Duration::from_millis(10));
            if let Some(code) = self.worker.turn(&mut self.events, wait) {
                panic!("the worker loop ended ({code}) while a client left");
            }
            self.settle();
        }
        let ctx = &self.worker.ctx;
        assert!(
            ctx.conns.is_empty(),
            "a gone client's connection is released"
        );
        assert_eq!(ctx.connection_count(), 0, "the open count is back to zero");
    }

    /// Turns the loop until it has taken everything the client sent and done all the work
    /// that followed.
    fn settle(&mut self) {
        for _ in 0..SETTLE_TURNS {
            let pending = self.worker.has_pending_work();
            let timeout = Some(Duration::ZERO);
            if let Some(code) = self.worker.turn(&mut self.events, timeout) {
                panic!("the worker loop ended ({code}) while serving a client");
            }
            if !pending && self.events.is_empty() && !self.worker.has_pending_work() {
                return;
            }
        }
        panic!("the worker loop did not settle in {SETTLE_TURNS} turns");
    }

    /// The protocol state a connection holds stays bounded by the limits, whatever it sent.
    fn check_bounds(&self, input: usize) {
        for (_, conn) in self.worker.ctx.conns.iter() {
            let held = conn.session.footprint();
            assert!(
                held <= input + MAX_MESSAGE + MAX_FRAME + MAX_HEADER,
                "bounded memory: {held} bytes held for {input} bytes of input"
            );
        }
    }
}

/// The app under the fuzzer: echo every message, and close with 4000 when asked to.
fn echo(ctx: &mut Context, conn: ConnId, msg: Message) {
    if msg.as_text() == Some("close") {
        ctx.close_with(conn, 4000, "asked to");
    } else {
        let _ = ctx.send(conn, msg);
    }
}

/// A client socket that resets its connection when dropped, so that no input leaves a
/// TIME_WAIT behind (thousands of inputs a second would use up the ephemeral ports).
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the worker");
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
    stream.set_nonblocking(true).expect("non-blocking");
    stream
}

/// Reads and drops what the server sent.
fn drain(client: &mut TcpStream) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = client.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::frame::client_frame;

    /// The harness serves through the worker's own path: the counters it keeps for `status`
    /// see the client, its message, the echo and the close.
    #[test]
    fn an_input_is_served_by_the_worker_loop() {
        let mut wire = b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\n\
            Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
            Sec-WebSocket-Version: 13\r\n\r\n"
            .to_vec();
        wire.extend(client_frame(0x81, b"hello", [1, 2, 3, 4]));
        wire.extend(client_frame(0x81, b"close", [5, 6, 7, 8]));
        let counters = || {
            HARNESS.with(|h| {
                let h = h.borrow();
                let c = h.as_ref().map(|h| h.worker.ctx.counters.clone());
                c.unwrap_or_default()
            })
        };
        feed(b"");
        let before = counters();
        feed(&wire);
        let after = counters();
        assert_eq!(after.accepted - before.accepted, 1);
        assert_eq!(
            after.total_request - before.total_request,
            2,
            "both messages"
        );
        assert_eq!(after.messages_out - before.messages_out, 1, "hello echoed");
    }
}
