//! The client connections of one process: connect → handshake → open, on one mio loop.
//!
//! What keeps the client cheaper than the server it measures:
//! - connections start in waves of at most [`WAVE`] unfinished handshakes, so the server's
//!   accept queue is not overrun and the run measures messages, not SYN retries;
//! - every read lands in one scratch buffer shared by all connections; only a frame cut by
//!   the end of a read is carried in the connection's own buffer (whose capacity is kept);
//! - everything a readiness event makes a connection send (replies, pongs) is appended to one
//!   buffer and written with one syscall after all its input is handled (the batching docs/architecture.md describes);
//! - source addresses are spread over 127.0.0.1–250 when the server is on loopback, so one
//!   source address does not run out of ephemeral ports (a restarted slot moves on to the
//!   next address, so `connect` cycles spread too).
//!
//! Over TLS (`--tls`), each connection has a rustls `ClientConnection`: what is read is
//! decrypted into a second shared buffer and handled from there, and what is sent goes
//! through it (see [`super::tls`]). With `--deflate`, a connection whose handshake agreed on
//! permessage-deflate gets compressed frames to send (made once, see [`super::payload`]) and
//! has what the server compressed inflated into a third shared buffer before a workload sees
//! it (see [`super::deflate`]). The plain path is the one above, untouched by either.
//!
//! A connection can also be closed politely and started again (`wsd bench connect`): the
//! client sends Close 1000, skips what comes back (the server's Close) and waits for EOF.
//! Waiting for the EOF lets the server close the TCP connection first, as RFC 6455 §7.1.1
//! asks, so the TIME_WAIT state lands on the server's side; and a server that never closes
//! after the close handshake shows up as a timeout error instead of being hidden by a
//! client-side reset (no SO_LINGER 0 here for that reason).
//!
//! What the frames mean is the [`Driver`]'s business; this file only moves bytes.

use super::Clock;
use super::deflate::{self, Agreed, InflateError, Inflater};
use super::payload::{self, Messages};
use super::report::{ErrorKind, Errors, Link};
use super::wire::{self, BadReply, Frame};
use crate::proto::frame::{CLOSE, CONTINUATION, PING, PONG};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::ClientConnection;
use socket2::{Domain, Socket, Type};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Handshakes in flight at once, at most.
pub const WAVE: usize = 500;

/// A connection that has not finished its handshake after this long is counted as failed.
pub const HANDSHAKE_TIMEOUT_NS: u64 = 10_000_000_000;

const SCRATCH: usize = 256 << 10;

/// Where a workload puts what a connection sends: frames of its [`Messages`], framed as the
/// connection's handshake agreed (compressed or not).
pub struct Out<'a> {
    buf: &'a mut Vec<u8>,
    /// The window to compress within, when the connection compresses what it sends.
    bits: Option<u8>,
    link: &'a mut Link,
}

impl Out<'_> {
    /// Appends message `i` of `messages`.
    pub fn put(&mut self, messages: &Messages, i: usize) {
        let (frame, wire) = messages.frame(i, self.bits);
        self.buf.extend_from_slice(frame);
        self.link.sent(messages.payload(i).len(), wire);
    }

    /// Appends a text message made on the spot (compressed now, if need be).
    pub fn put_text(&mut self, payload: &[u8]) {
        let wire = payload::put_text(self.buf, payload, self.bits);
        self.link.sent(payload.len(), wire);
    }
}

/// What a workload does with open connections.
pub trait Driver {
    /// Connection `id` finished its handshake, `handshake_ns` after its connect began;
    /// anything put in `out` is sent.
    fn opened(&mut self, id: usize, handshake_ns: u64, out: &mut Out<'_>, now: u64);
    /// A data frame (text, binary or continuation) arrived on `id`, its payload inflated if
    /// it was compressed; anything put in `out` is sent. An `Err` is a protocol error:
    /// counted, and the connection is dropped.
    fn data(
        &mut self,
        id: usize,
        frame: Frame<'_>,
        out: &mut Out<'_>,
        now: u64,
    ) -> Result<(), BadReply>;
    /// Connection `id`, closed with [`Pool::close`], finished its close handshake and may be
    /// started again with [`Pool::restart`].
    fn closed(&mut self, _id: usize, _now: u64) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    NotStarted,
    Connecting,
    Handshaking,
    Open,
    /// Close sent; waiting for the server's Close and EOF.
    Closing,
    /// Closed cleanly; may be restarted.
    Closed,
    Dead,
}

struct Conn {
    sock: Option<TcpStream>,
    phase: Phase,
    /// When the connect began (ns; also through the handshake), or the Close was sent: for
    /// the timeouts and the handshake's duration.
    since: u64,
    /// Received bytes not yet consumed: an upgrade answer, or a frame cut by a read's end.
    carry: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    /// `--tls`: the connection's TLS state (`out` is plaintext then, written through it).
    tls: Option<Box<ClientConnection>>,
    /// The handshake agreed on permessage-deflate.
    deflate: Option<Box<Deflating>>,
}

/// A connection's permessage-deflate state.
struct Deflating {
    agreed: Agreed,
    /// Inflates the server's messages: kept across them, unless the server compresses each
    /// on its own (then it goes back to the pool's spares at each message's end).
    inflater: Option<Inflater>,
    /// In the middle of a compressed message (its first frame had RSV1).
    in_message: bool,
}

/// What the receiving side of every connection shares.
#[derive(Default)]
struct Shared {
    /// Where a compressed frame is inflated to.
    inflated: Vec<u8>,
    /// Recent whole messages compressed without context, as they came and inflated.
    memo: Memo,
    /// Inflaters not held by any connection.
    spare: Vec<Inflater>,
    link: Link,
}

/// The connections of one process and their event loop.
pub struct Pool {
    poll: Poll,
    events: Events,
    addr: SocketAddr,
    request: Vec<u8>,
    spread_sources: bool,
    conns: Vec<Conn>,
    next: usize,
    /// Closed connections waiting to be started again (before any new one).
    again: VecDeque<usize>,
    /// Connections started so far, for spreading source addresses (from the global index of
    /// `conns[0]`, so that shards spread over different addresses).
    connects: usize,
    in_flight: usize,
    open: usize,
    closing: usize,
    failed: usize,
    pub errors: Errors,
    scratch: Vec<u8>,
    clock: Clock,
    /// `--tls`: what every connection's TLS shares, and where plaintext is decrypted to.
    tls: Option<super::tls::Client>,
    plaintext: Vec<u8>,
    /// `--deflate`: permessage-deflate is offered.
    offer_deflate: bool,
    shared: Shared,
}

/// The token of a source the caller registers itself (the coordinator's pipe).
pub const EXTRA: Token = Token(usize::MAX - 1);

/// The token of the caller's timer (its readiness only ends the wait; nothing is read).
pub const TIMER: Token = Token(usize::MAX - 2);

impl Conn {
    fn new() -> Conn {
        Conn {
            sock: None,
            phase: Phase::NotStarted,
            since: 0,
            carry: Vec::new(),
            out: Vec::new(),
            written: 0,
            tls: None,
            deflate: None,
        }
    }
}

impl Pool {
    pub fn new(
        target: &super::Target,
        first: usize,
        count: usize,
        clock: Clock,
    ) -> io::Result<Pool> {
        let conns = (0..count).map(|_| Conn::new()).collect();
        Ok(Pool {
            poll: Poll::new()?,
            events: Events::with_capacity(1024),
            addr: target.addr,
            request: wire::upgrade_request(
                &target.host,
                target.addr.port(),
                &target.path,
                target.deflate,
            ),
            spread_sources: matches!(target.addr.ip(), IpAddr::V4(ip) if ip.is_loopback()),
            conns,
            next: 0,
            again: VecDeque::new(),
            connects: first,
            in_flight: 0,
            open: 0,
            closing: 0,
            failed: 0,
            errors: Errors::default(),
            scratch: vec![0; SCRATCH],
            clock,
            tls: target.tls.clone(),
            plaintext: if target.tls.is_some() {
                vec![0; SCRATCH]
            } else {
                Vec::new()
            },
            offer_deflate: target.deflate,
            shared: Shared::default(),
        })
    }

    /// What the connections agreed on and moved (TLS, permessage-deflate).
    pub fn link(&self) -> &Link {
        &self.shared.link
    }

    pub fn registry(&self) -> &mio::Registry {
        self.poll.registry()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn open(&self) -> usize {
        self.open
    }

    /// Connections that failed (to connect, to upgrade, or later).
    pub fn failed(&self) -> usize {
        self.failed
    }

    /// Every connection has been tried and none is still connecting or handshaking.
    pub fn settled(&self) -> bool {
        self.next == self.conns.len() && self.again.is_empty() && self.in_flight == 0
    }

    /// Adds `n` connections, started by the next [`Pool::start_wave`]; returns the first id.
    pub fn grow(&mut self, n: usize) -> usize {
        let first = self.conns.len();
        self.conns.extend((0..n).map(|_| Conn::new()));
        first
    }

    pub fn is_open(&self, id: usize) -> bool {
        self.conns[id].phase == Phase::Open
    }

    /// Starts connections until [`WAVE`] handshakes are in flight: restarted ones first.
    pub fn start_wave(&mut self, now: u64) {
        while self.in_flight < WAVE {
            let id = if let Some(id) = self.again.pop_front() {
                id
            } else if self.next < self.conns.len() {
                self.next += 1;
                self.next - 1
            } else {
                return;
            };
            match self.connect(id) {
                Ok((sock, tls)) => {
                    let c = &mut self.conns[id];
                    c.sock = Some(sock);
                    c.tls = tls;
                    c.phase = Phase::Connecting;
                    c.since = now;
                    self.in_flight += 1;
                }
                Err(e) => {
                    self.conns[id].phase = Phase::Dead;
                    self.failed += 1;
                    self.errors.add(ErrorKind::Connect, e);
                }
            }
        }
    }

    fn connect(&mut self, id: usize) -> io::Result<(TcpStream, Option<Box<ClientConnection>>)> {
        let tls = match &self.tls {
            Some(client) => Some(Box::new(client.connect().map_err(io::Error::other)?)),
            None => None,
        };
        let sock = Socket::new(Domain::for_address(self.addr), Type::STREAM, None)?;
        sock.set_nonblocking(true)?;
        sock.set_tcp_nodelay(true)?;
        let nth = self.connects;
        self.connects += 1;
        if self.spread_sources {
            let last = 1 + (nth % 250) as u8;
            let src = SocketAddr::from((Ipv4Addr::new(127, 0, 0, last), 0));
            sock.bind(&src.into())?;
        }
        match sock.connect(&self.addr.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        let mut stream = TcpStream::from_std(sock.into());
        self.poll.registry().register(
            &mut stream,
            Token(id),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        Ok((stream, tls))
    }

    /// Fails connections whose handshake (or close handshake) has taken longer than
    /// [`HANDSHAKE_TIMEOUT_NS`].
    pub fn sweep(&mut self, now: u64) {
        for id in 0..self.conns.len() {
            let c = &self.conns[id];
            let (kind, why) = match c.phase {
                Phase::Connecting => (ErrorKind::Connect, "timed out"),
                Phase::Handshaking => (ErrorKind::Handshake, "timed out"),
                Phase::Closing => (ErrorKind::Closed, "no Close and EOF after our Close"),
                _ => continue,
            };
            if now.saturating_sub(c.since) > HANDSHAKE_TIMEOUT_NS {
                self.fail(id, kind, why);
            }
        }
    }

    /// Starts the close handshake of open connection `id`: Close 1000, then wait for the
    /// server's Close and EOF ([`Driver::closed`] is told).
    pub fn close(&mut self, id: usize, now: u64) {
        let c = &mut self.conns[id];
        if c.phase != Phase::Open {
            return;
        }
        c.phase = Phase::Closing;
        c.since = now;
        c.out.extend_from_slice(&wire::CLOSE_FRAME);
        self.open -= 1;
        self.closing += 1;
        self.flush(id);
    }

    /// Queues closed connection `id` to be connected again by the next [`Pool::start_wave`].
    pub fn restart(&mut self, id: usize) {
        if self.conns[id].phase == Phase::Closed {
            self.conns[id].phase = Phase::NotStarted;
            self.again.push_back(id);
        }
    }

    /// The close handshake of `id` is over (EOF after our Close): the socket goes, its
    /// buffers stay for the next connection in this slot.
    fn closed(&mut self, id: usize, driver: &mut impl Driver) {
        let c = &mut self.conns[id];
        c.phase = Phase::Closed;
        c.sock = None;
        c.carry.clear();
        c.out.clear();
        c.written = 0;
        c.tls = None;
        c.deflate = None;
        self.closing -= 1;
        driver.closed(id, self.clock.now());
    }

    /// Waits up to `timeout` for readiness and handles it. True if [`EXTRA`] was ready.
    pub fn turn(&mut self, driver: &mut impl Driver, timeout: Duration) -> io::Result<bool> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(false),
            Err(e) => return Err(e),
        }
        let mut extra = false;
        // Taken out for the loop, so handling an event may borrow the pool; put back after.
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for ev in events.iter() {
            if ev.token() == EXTRA {
                extra = true;
                continue;
            }
            let readable = ev.is_readable() || ev.is_read_closed();
            let writable = ev.is_writable() || ev.is_error();
            let eof = ev.is_read_closed();
            self.on_event(ev.token().0, readable, writable, eof, driver);
        }
        self.events = events;
        Ok(extra)
    }

    fn on_event(
        &mut self,
        id: usize,
        readable: bool,
        writable: bool,
        eof: bool,
        driver: &mut impl Driver,
    ) {
        if id >= self.conns.len() {
            return;
        }
        if self.conns[id].phase == Phase::Connecting && (writable || readable) {
            self.finish_connect(id);
        }
        let live = |p| matches!(p, Phase::Handshaking | Phase::Open | Phase::Closing);
        if readable && live(self.conns[id].phase) {
            self.read(id, eof, driver);
        }
        if live(self.conns[id].phase) {
            self.flush(id);
        }
    }

    fn finish_connect(&mut self, id: usize) {
        let c = &mut self.conns[id];
        let sock = c.sock.as_ref().expect("a connecting socket");
        match sock.take_error() {
            Ok(Some(e)) | Err(e) => return self.fail(id, ErrorKind::Connect, e),
            Ok(None) => {}
        }
        match sock.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => return self.fail(id, ErrorKind::Connect, e),
        }
        c.phase = Phase::Handshaking;
        c.out.extend_from_slice(&self.request);
    }

    /// Reads until the socket is drained, handing whole frames to `driver`.
    ///
    /// A read that does not fill the buffer has drained the socket, and with edge-triggered
    /// readiness new data (or EOF) brings a new event; so there is no second read just to
    /// hear `WouldBlock`, which halves the syscalls of a subscriber that gets one message at
    /// a time. The exception is an event that already says the peer has closed (`eof`):
    /// no later event will, so reading goes on until the EOF itself.
    fn read(&mut self, id: usize, eof: bool, driver: &mut impl Driver) {
        loop {
            let c = &mut self.conns[id];
            let sock = c.sock.as_mut().expect("a live socket");
            let kind = if c.phase == Phase::Handshaking {
                ErrorKind::Handshake
            } else {
                ErrorKind::Closed
            };
            let n = match sock.read(&mut self.scratch) {
                Ok(0) if c.phase == Phase::Closing => return self.closed(id, driver),
                Ok(0) => return self.fail(id, kind, "the server closed the connection"),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.fail(id, kind, e),
            };
            let scratch = std::mem::take(&mut self.scratch);
            let handled = if c.tls.is_some() {
                self.decrypt(id, &scratch[..n], driver)
            } else {
                self.consume(id, &scratch[..n], driver)
            };
            self.scratch = scratch;
            if let Err((kind, why)) = handled {
                return self.fail(id, kind, why);
            }
            if n < self.scratch.len() && !eof {
                return;
            }
        }
    }

    /// Hands `ciphertext` to connection `id`'s TLS and what it decrypts to [`Pool::consume`].
    /// A close_notify from the server changes nothing: its EOF is what ends the connection.
    fn decrypt(
        &mut self,
        id: usize,
        mut ciphertext: &[u8],
        driver: &mut impl Driver,
    ) -> Result<(), (ErrorKind, String)> {
        let mut plaintext = std::mem::take(&mut self.plaintext);
        let result = loop {
            let c = &mut self.conns[id];
            let kind = if c.phase == Phase::Handshaking {
                ErrorKind::Handshake
            } else {
                ErrorKind::Protocol
            };
            let tls = c.tls.as_mut().expect("a TLS connection");
            if ciphertext.is_empty() {
                break Ok(());
            }
            match tls.read_tls(&mut ciphertext) {
                Ok(0) => break Ok(()), // after close_notify: nothing more is taken
                Ok(_) => {}
                Err(e) => break Err((kind, format!("TLS: {e}"))),
            }
            if let Err(e) = tls.process_new_packets() {
                // The alert rustls queued goes out with the flush that follows.
                break Err((kind, format!("TLS: {e}")));
            }
            let got = loop {
                let tls = self.conns[id].tls.as_mut().expect("a TLS connection");
                match tls.reader().read(&mut plaintext) {
                    Ok(0) => break Ok(()),
                    Ok(m) => {
                        if let Err(e) = self.consume(id, &plaintext[..m], driver) {
                            break Err(e);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) => break Err((ErrorKind::Protocol, format!("TLS: {e}"))),
                }
            };
            if got.is_err() {
                break got;
            }
        };
        self.plaintext = plaintext;
        result
    }

    /// Handles `fresh` bytes of connection `id`: the upgrade answer, then frames.
    fn consume(
        &mut self,
        id: usize,
        fresh: &[u8],
        driver: &mut impl Driver,
    ) -> Result<(), (ErrorKind, String)> {
        let now = self.clock.now();
        let c = &mut self.conns[id];
        let shared = &mut self.shared;
        if c.phase == Phase::Handshaking {
            c.carry.extend_from_slice(fresh);
            let handshake = |e: String| (ErrorKind::Handshake, e);
            let Some(up) = wire::upgraded(&c.carry).map_err(|e| handshake(e.to_string()))? else {
                return Ok(());
            };
            let answer = up.extensions.map(|r| &c.carry[r]);
            let agreed =
                deflate::agree(answer, self.offer_deflate).map_err(|e| handshake(e.to_string()))?;
            shared
                .link
                .opened(c.tls.as_deref(), answer, agreed.is_some());
            c.deflate = agreed.map(|agreed| {
                Box::new(Deflating {
                    agreed,
                    inflater: None,
                    in_message: false,
                })
            });
            c.carry.drain(..up.end);
            c.phase = Phase::Open;
            self.in_flight -= 1;
            self.open += 1;
            driver.opened(
                id,
                now.saturating_sub(c.since),
                &mut c.out(&mut shared.link),
                now,
            );
            if c.carry.is_empty() {
                return Ok(());
            }
            let carry = std::mem::take(&mut c.carry);
            let used = scan(&carry, id, c, shared, driver, now, false);
            c.carry = carry;
            c.carry.drain(..used?);
            return Ok(());
        }
        let closing = c.phase == Phase::Closing;
        if c.carry.is_empty() {
            let used = scan(fresh, id, c, shared, driver, now, closing)?;
            c.carry.extend_from_slice(&fresh[used..]);
        } else {
            let mut carry = std::mem::take(&mut c.carry);
            carry.extend_from_slice(fresh);
            let used = scan(&carry, id, c, shared, driver, now, closing);
            c.carry = carry;
            c.carry.drain(..used?);
        }
        Ok(())
    }

    /// Appends to connection `id`'s send buffer with `fill` and writes it out.
    pub fn send(&mut self, id: usize, fill: impl FnOnce(&mut Out<'_>)) {
        let c = &mut self.conns[id];
        if c.phase != Phase::Open {
            return;
        }
        fill(&mut c.out(&mut self.shared.link));
        self.flush(id);
    }

    /// Writes what connection `id` has to send until done or the socket would block.
    fn flush(&mut self, id: usize) {
        let c = &mut self.conns[id];
        let Some(sock) = c.sock.as_mut() else { return };
        let kind = if c.phase == Phase::Handshaking {
            ErrorKind::Handshake
        } else {
            ErrorKind::Closed
        };
        if let Some(tls) = c.tls.as_mut() {
            // No buffer limit (see `tls::Client::connect`): rustls takes all of it.
            if !c.out.is_empty() {
                if let Err(e) = tls.writer().write_all(&c.out) {
                    return self.fail(id, kind, e);
                }
                c.out.clear();
            }
            while tls.wants_write() {
                match tls.write_tls(sock) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return self.fail(id, kind, e),
                }
            }
            return;
        }
        while c.written < c.out.len() {
            match sock.write(&c.out[c.written..]) {
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.fail(id, kind, e),
            }
        }
        c.out.clear();
        c.written = 0;
    }

    fn fail(&mut self, id: usize, kind: ErrorKind, why: impl std::fmt::Display) {
        let c = &mut self.conns[id];
        match c.phase {
            Phase::Connecting | Phase::Handshaking => self.in_flight -= 1,
            Phase::Open => self.open -= 1,
            Phase::Closing => self.closing -= 1,
            Phase::NotStarted | Phase::Closed | Phase::Dead => return,
        }
        c.phase = Phase::Dead;
        c.sock = None;
        c.carry = Vec::new();
        c.out = Vec::new();
        c.tls = None;
        c.deflate = None;
        self.failed += 1;
        self.errors.add(kind, why);
    }
}

impl Conn {
    /// Where a workload puts what this connection sends.
    fn out<'a>(&'a mut self, link: &'a mut Link) -> Out<'a> {
        Out {
            buf: &mut self.out,
            bits: self.deflate.as_ref().and_then(|d| d.agreed.send_bits()),
            link,
        }
    }
}

/// Hands every whole frame at the start of `buf` to `driver` (inflated, if compressed),
/// answering pings; returns the bytes consumed. A Close from the server, or a frame no server
/// may send, is an error, except that a `closing` connection (we sent Close) expects the
/// Close and skips the rest.
fn scan(
    buf: &[u8],
    id: usize,
    conn: &mut Conn,
    shared: &mut Shared,
    driver: &mut impl Driver,
    now: u64,
    closing: bool,
) -> Result<usize, (ErrorKind, String)> {
    let protocol = |why: String| (ErrorKind::Protocol, why);
    let mut used = 0;
    loop {
        let (frame, n) = match wire::next_frame(&buf[used..]) {
            Ok(Some(f)) => f,
            Ok(None) => return Ok(used),
            Err(e) => return Err(protocol(e.to_string())),
        };
        used += n;
        if closing {
            continue;
        }
        match frame.opcode {
            PING => wire::put_frame(&mut conn.out, PONG, frame.payload),
            PONG => {}
            CLOSE => {
                let code = frame
                    .payload
                    .get(..2)
                    .map_or(1005, |c| u16::from_be_bytes([c[0], c[1]]));
                return Err((ErrorKind::Closed, format!("the server sent Close {code}")));
            }
            _ => {
                let Shared {
                    inflated,
                    memo,
                    spare,
                    link,
                } = &mut *shared;
                let wire_len = frame.payload.len();
                let frame = match conn.deflate.as_deref_mut() {
                    Some(d) if frame.compressed || d.in_message => {
                        inflate(frame, d, inflated, memo, spare)
                            .map_err(|e| protocol(e.to_string()))?
                    }
                    _ if frame.compressed => {
                        return Err(protocol("RSV1 set without permessage-deflate".into()));
                    }
                    _ => frame,
                };
                link.received(wire_len, frame.payload.len());
                driver
                    .data(id, frame, &mut conn.out(link), now)
                    .map_err(|why| protocol(why.to_string()))?;
            }
        }
    }
}

/// The last [`Memo::ENTRIES`] whole messages that the server compressed without context, as
/// they came and as they inflated.
///
/// Such a message inflates the same wherever it arrives: a broadcast that a shared compressor
/// packed once reaches every subscriber of this client as the same bytes, and is inflated
/// once. That keeps the client cheaper than the server it measures, as compressing what it
/// sends once does. Subscribers are read one after another, each with a backlog of recent
/// messages that grows with the load, so the memo holds thousands, found by a hash of their
/// length and their first and last bytes, and then compared whole.
#[derive(Default)]
struct Memo {
    /// Packed and inflated bytes, oldest first once full (`next` is the oldest).
    entries: Vec<(Vec<u8>, Vec<u8>)>,
    next: usize,
    index: HashMap<u64, usize>,
}

impl Memo {
    const ENTRIES: usize = 4096;
    /// How much of a message's start, and of its end, goes into its hash.
    const KEY_BYTES: usize = 64;

    fn key(packed: &[u8]) -> u64 {
        let ends = Self::KEY_BYTES.min(packed.len());
        let mut h = std::hash::DefaultHasher::new();
        packed.len().hash(&mut h);
        packed[..ends].hash(&mut h);
        packed[packed.len() - ends..].hash(&mut h);
        h.finish()
    }

    fn find(&self, packed: &[u8]) -> Option<&[u8]> {
        let (p, plain) = &self.entries[*self.index.get(&Self::key(packed))?];
        (p.as_slice() == packed).then_some(plain.as_slice())
    }

    fn keep(&mut self, packed: &[u8], plain: &[u8]) {
        let slot = if self.entries.len() < Self::ENTRIES {
            self.entries.push(Default::default());
            self.entries.len() - 1
        } else {
            let slot = self.next;
            self.next = (slot + 1) % Self::ENTRIES;
            let old = Self::key(&self.entries[slot].0);
            if self.index.get(&old) == Some(&slot) {
                self.index.remove(&old);
            }
            slot
        };
        let (p, q) = &mut self.entries[slot];
        p.clear();
        p.extend_from_slice(packed);
        q.clear();
        q.extend_from_slice(plain);
        self.index.insert(Self::key(packed), slot);
    }
}

/// One frame of a compressed message, inflated into `inflated` (or found in `memo`).
fn inflate<'a>(
    frame: Frame<'_>,
    d: &mut Deflating,
    inflated: &'a mut Vec<u8>,
    memo: &mut Memo,
    spare: &mut Vec<Inflater>,
) -> Result<Frame<'a>, InflateError> {
    if frame.compressed && (frame.opcode == CONTINUATION || d.in_message) {
        return Err(InflateError::Misplaced);
    }
    let alone = frame.fin && !d.in_message && d.agreed.server_no_context_takeover;
    inflated.clear();
    if let Some(plain) = alone.then(|| memo.find(frame.payload)).flatten() {
        inflated.extend_from_slice(plain);
    } else {
        d.in_message = true;
        let inflater = d
            .inflater
            .get_or_insert_with(|| spare.pop().unwrap_or_default());
        inflater.inflate(frame.payload, frame.fin, inflated, wire::MAX_FRAME as usize)?;
        if frame.fin {
            d.in_message = false;
            if d.agreed.server_no_context_takeover
                && let Some(mut done) = d.inflater.take()
            {
                done.reset();
                spare.push(done);
            }
        }
        if alone {
            memo.keep(frame.payload, inflated);
        }
    }
    Ok(Frame {
        fin: frame.fin,
        opcode: frame.opcode,
        compressed: false,
        payload: inflated,
    })
}

#[cfg(test)]
mod tests {
    use super::Memo;

    #[test]
    fn the_memo_finds_recent_messages_and_forgets_the_oldest() {
        let mut memo = Memo::default();
        let packed = |i: usize| format!("{i:>70}").into_bytes();
        for i in 0..Memo::ENTRIES + 10 {
            memo.keep(&packed(i), format!("plain {i}").as_bytes());
        }
        for i in 0..10 {
            assert_eq!(memo.find(&packed(i)), None, "{i} was evicted");
        }
        for i in [10, 500, Memo::ENTRIES + 9] {
            assert_eq!(memo.find(&packed(i)), Some(format!("plain {i}").as_bytes()));
        }
        // Same length, start and end, another middle: found by hash, refused when compared.
        let long = |mid: u8| [vec![b'a'; 64], vec![mid; 8], vec![b'z'; 64]].concat();
        memo.keep(&long(b'1'), b"one");
        assert_eq!(memo.find(&long(b'1')), Some(&b"one"[..]));
        assert_eq!(memo.find(&long(b'2')), None);
    }
}
