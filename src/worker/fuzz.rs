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
//!
//! [`feed_tls`] does the same over TLS: the client completes a real handshake with the
//! worker, then sends the input as the plaintext of its records, so the worker's record layer
//! meets every way a stream can be cut into records and reads.

use super::event_loop::Loop;
use super::{Context, Decision, UpgradeRequest, Worker};
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
    #[cfg(feature = "tls")]
    static TLS_HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

/// Runs one client byte stream through a worker. Panics only on a broken invariant.
pub fn feed(data: &[u8]) {
    HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        h.get_or_insert_with(|| Harness::new(None)).feed(data);
    });
}

/// As [`feed`], over TLS, with a certificate for `localhost` the caller made (`chain` and
/// `key`, PEM; the first call's pair serves the thread's harness from then on).
#[cfg(feature = "tls")]
pub fn feed_tls(chain: &str, key: &str, data: &[u8]) {
    TLS_HARNESS.with(|h| {
        let mut h = h.borrow_mut();
        let id = || crate::tls::Identity::from_pem(chain, key).expect("a usable certificate");
        h.get_or_insert_with(|| Harness::new(Some(id()))).feed(data);
    });
}

#[cfg(feature = "tls")]
type Identity = crate::tls::Identity;
#[cfg(not(feature = "tls"))]
type Identity = std::convert::Infallible;

struct Harness {
    worker: Loop,
    events: Events,
    addr: SocketAddr,
    /// How the client speaks TLS, for a harness that serves it.
    #[cfg(feature = "tls")]
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The master's end of the worker's channel: kept open, or the worker would stop.
    _master: UnixStream,
}

impl Harness {
    fn new(identity: Option<Identity>) -> Harness {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback listener");
        let addr = listener.local_addr().expect("its address");
        let (master, channel) = UnixStream::pair().expect("a socket pair");
        let mut w = Worker::new(&format!("websocket://{addr}"));
        w.max_frame_size = MAX_FRAME;
        w.max_message_size = MAX_MESSAGE;
        w.max_header_bytes = MAX_HEADER;
        w.allowed_origins = vec!["https://ok.example".into(), "https://*.ok.example".into()];
        w.trusted_proxies = vec!["127.0.0.0/8".parse().expect("a CIDR")];
        w.subprotocols = vec!["superchat".into(), "chat".into()];
        w.on_upgrade(decide);
        // Dedicated mode reaches every deflate path: context takeover with the connection's
        // own compressor and decompressor, and the worker's for clients that offer no takeover.
        w.compression = Compression::Dedicated;
        w.compression_min_size = 16;
        w.on_message(echo);
        #[cfg(feature = "tls")]
        let tls = identity.map(|id| {
            let client = client_config(&id);
            w.tls_cert = Some("(fuzz)".into());
            w.tls_key = Some("(fuzz)".into());
            w.tls = Some(id);
            client
        });
        #[cfg(not(feature = "tls"))]
        if let Some(never) = identity {
            match never {}
        }
        let bus = Bus::new(Origin { host: 0, slot: 0 }, Vec::new());
        let worker =
            Loop::new(w, 0, listener, channel, bus, None, Vec::new()).expect("a worker loop");
        Harness {
            worker,
            events: Events::with_capacity(64),
            addr,
            #[cfg(feature = "tls")]
            tls,
            _master: master,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        let mut client = Client::Plain(connect(self.addr));
        self.settle();
        #[cfg(feature = "tls")]
        if let Some(config) = &self.tls {
            let Client::Plain(socket) = client else {
                unreachable!("made plain just above")
            };
            let name = "localhost".try_into().expect("a server name");
            let conn = rustls::ClientConnection::new(config.clone(), name).expect("a client");
            client = Client::Tls(Box::new(conn), socket);
            for _ in 0..SETTLE_TURNS {
                let Client::Tls(conn, _) = &client else {
                    unreachable!()
                };
                if !conn.is_handshaking() {
                    break;
                }
                client.pump();
                self.settle();
            }
        }
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
                client.pump();
            }
            self.check_bounds(data.len());
        }
        client.pump();
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
            let held = conn.footprint();
            assert!(
                held <= input + MAX_MESSAGE + MAX_FRAME + MAX_HEADER,
                "bounded memory: {held} bytes held for {input} bytes of input"
            );
        }
    }
}

/// The app under the fuzzer: echo every message, close with 4000 when asked to, and tell the
/// subprotocol and state on `whoami`.
fn echo(ctx: &mut Context, conn: ConnId, msg: Message) {
    match msg.as_text() {
        Some("close") => ctx.close_with(conn, 4000, "asked to"),
        Some("whoami") => {
            let seen = ctx.state::<usize>(conn).copied();
            let text = format!("{:?} {seen:?}", ctx.protocol(conn));
            let _ = ctx.send(conn, text);
        }
        _ => {
            let _ = ctx.send(conn, msg);
        }
    }
}

/// The app's `on_upgrade`, reading every part of the request as an app would: refuses a path
/// containing `refuse` (401, with a header); otherwise accepts with the query's `protocol` as
/// its choice (checked against the offer) and `cookie` as a `Set-Cookie` (a client-chosen
/// value, checked before it is sent), and keeps how much it read as the connection's state.
fn decide(_ctx: &mut Context, req: &UpgradeRequest<'_>) -> Decision {
    if req.path().contains("refuse") {
        return Decision::reject(401, "refused").with_header("WWW-Authenticate", "Bearer");
    }
    let query: usize = req.query_pairs().map(|(n, v)| n.len() + v.len()).sum();
    let cookies: usize = req.cookies().map(|(n, v)| n.len() + v.len()).sum();
    let rest = req.headers().count() + req.protocols().len() + req.extensions().len();
    let mut decision = Decision::accept().with_state(query + cookies + rest);
    if let Some(p) = req.query("protocol") {
        decision = decision.with_protocol(p);
    }
    if let Some(c) = req.query("cookie") {
        decision = decision.with_header("Set-Cookie", c);
    }
    decision
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

/// The harness's client: a plain socket, or TLS over one.
enum Client {
    Plain(TcpStream),
    #[cfg(feature = "tls")]
    Tls(Box<rustls::ClientConnection>, TcpStream),
}

impl Client {
    /// Sends bytes: on TLS, as the plaintext of records, sealed and sent at once.
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Client::Plain(socket) => socket.write(bytes),
            #[cfg(feature = "tls")]
            Client::Tls(conn, socket) => {
                let n = conn.writer().write(bytes)?;
                while conn.wants_write() {
                    match conn.write_tls(socket) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        other => {
                            other?;
                        }
                    }
                }
                Ok(n)
            }
        }
    }

    /// Sends what TLS owes and reads (and drops) what the server sent.
    fn pump(&mut self) {
        match self {
            Client::Plain(socket) => drain(socket),
            #[cfg(feature = "tls")]
            Client::Tls(conn, socket) => {
                while conn.wants_write() && conn.write_tls(socket).is_ok_and(|n| n > 0) {}
                while conn.read_tls(socket).is_ok_and(|n| n > 0) {
                    if conn.process_new_packets().is_err() {
                        return;
                    }
                    drain(&mut conn.reader());
                }
            }
        }
    }
}

/// A client configuration that trusts the harness's own certificate.
#[cfg(feature = "tls")]
fn client_config(id: &crate::tls::Identity) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(id.pem().0.as_bytes()).flatten() {
        let _ = roots.add(cert);
    }
    #[allow(deprecated)]
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    std::sync::Arc::new(config)
}

/// Reads and drops what the server sent.
fn drain(client: &mut impl Read) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = client.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
}
