//! What the raw ceilings of scripts/bench-peers.sh share: the WebSocket bytes. `raw-epoll` and
//! `raw-uring` differ only in how they move bytes between sockets and these functions, and
//! `raw-tls` is `raw-epoll` with rustls in between (the epoll and write helpers are theirs).
//!
//! The upgrade is answered with a fixed 101 whose only variable part is Sec-WebSocket-Accept,
//! computed properly (SHA-1 + base64, below): `wsd bench` checks it, and a real client would
//! too. Nothing else of the request is looked at. Frames are parsed minimally: text, binary
//! and continuation frames come back with the same header, a Ping as a Pong, a Close is echoed
//! and the socket closed (the server closes first, as RFC 6455 asks). No UTF-8 check, no size
//! limit, no timeouts: not a server anyone should run, only a measure of the floor.

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::io::Error;
use std::sync::Arc;

/// One connection's protocol state.
#[derive(Default)]
pub struct Wire {
    upgraded: bool,
    /// Bytes of an unfinished upgrade request or frame, carried to the next read.
    carry: Vec<u8>,
}

impl Wire {
    /// Handles one read's bytes (after what an earlier read left unfinished), putting replies
    /// in `out`; returns false when the connection should end once `out` is written.
    pub fn read(&mut self, got: &[u8], out: &mut Vec<u8>) -> bool {
        if self.carry.is_empty() {
            self.handle(got, out)
        } else {
            let mut buf = std::mem::take(&mut self.carry);
            buf.extend_from_slice(got);
            self.handle(&buf, out)
        }
    }

    fn handle(&mut self, mut buf: &[u8], out: &mut Vec<u8>) -> bool {
        if !self.upgraded {
            let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                self.carry.extend_from_slice(buf);
                return buf.len() < 16 << 10;
            };
            let Some(key) = header(&buf[..end], b"sec-websocket-key") else {
                return false;
            };
            out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
            out.extend_from_slice(&accept(key));
            out.extend_from_slice(b"\r\n\r\n");
            self.upgraded = true;
            self.carry = Vec::new(); // no buffer kept by an idle connection
            buf = &buf[end + 4..];
        }
        while buf.len() >= 2 {
            let (b0, b1) = (buf[0], buf[1]);
            let (len, mut head) = match b1 & 0x7f {
                126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                127 if buf.len() >= 10 => (
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => break,
                n => (n as usize, 2),
            };
            if b1 & 0x80 == 0 {
                return false; // a client frame must be masked
            }
            head += 4;
            if buf.len() < head + len {
                break;
            }
            let mask = [buf[head - 4], buf[head - 3], buf[head - 2], buf[head - 1]];
            let opcode = b0 & 0x0f;
            out.push(if opcode == 0x9 { b0 & 0xf0 | 0xA } else { b0 }); // Ping → Pong
            out.push(b1 & 0x7f); // server frames are not masked
            out.extend_from_slice(&buf[2..head - 4]);
            let start = out.len();
            out.extend_from_slice(&buf[head..head + len]);
            unmask(&mut out[start..], mask);
            buf = &buf[head + len..];
            if opcode == 0x8 {
                return false; // Close echoed; the socket closes once it is written
            }
        }
        self.carry.extend_from_slice(buf);
        true
    }
}

/// An epoll instance.
pub struct Epoll(i32);

impl Epoll {
    pub fn new() -> Epoll {
        Epoll(check(unsafe { libc::epoll_create1(0) }, "epoll_create1"))
    }

    /// Watches `fd` for `flags`, with `fd` as the event's data.
    pub fn add(&self, fd: i32, flags: u32) {
        let mut ev = libc::epoll_event {
            events: flags,
            u64: fd as u64,
        };
        // SAFETY: `ev` outlives the call.
        check(
            unsafe { libc::epoll_ctl(self.0, libc::EPOLL_CTL_ADD, fd, &mut ev) },
            "epoll_ctl",
        );
    }

    /// Watches a client's socket, edge-triggered, for input and room to write.
    pub fn add_client(&self, fd: i32) {
        self.add(fd, (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32);
    }

    /// Waits for events (no timeout); gives those of `events` it filled (none on EINTR).
    pub fn wait<'a>(&self, events: &'a mut [libc::epoll_event]) -> &'a [libc::epoll_event] {
        // SAFETY: the kernel writes at most `events.len()` entries.
        let n = unsafe { libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, -1) };
        &events[..n.max(0) as usize]
    }
}

impl Default for Epoll {
    fn default() -> Epoll {
        Epoll::new()
    }
}

/// What the end-of-turn writes of `raw-epoll` and `raw-tls` look at in a connection.
#[derive(Default)]
pub struct Outbox {
    /// What the socket has not taken yet (empty and unallocated nearly always: replies are
    /// built in one buffer shared by all connections, and only a remainder is kept here).
    pub out: Vec<u8>,
    /// The socket failed or hung up this turn: closed once the turn's replies are handled.
    pub dead: bool,
    /// Close answered (or the request refused): the socket closes once `out` is written.
    pub closing: bool,
}

/// The turn's replies, one write per connection (after what the socket did not take before,
/// if anything); what it does not take now waits in the connection's `Outbox` for EPOLLOUT.
/// `replies` says which range of `out` is whose; a connection that is done is closed and
/// reset.
pub fn write_replies<C: Default>(
    conns: &mut [C],
    replies: &mut Vec<(i32, std::ops::Range<usize>)>,
    out: &[u8],
    outbox: impl Fn(&mut C) -> &mut Outbox,
) {
    for (fd, reply) in replies.drain(..) {
        let conn = &mut conns[fd as usize];
        let o = outbox(conn);
        let reply = &out[reply];
        let mut dead = o.dead;
        if !o.out.is_empty() {
            o.out.extend_from_slice(reply);
            let pending = std::mem::take(&mut o.out);
            dead = dead || write_all(fd, &pending, &mut o.out);
        } else if !reply.is_empty() {
            dead = dead || write_all(fd, reply, &mut o.out);
        }
        if dead || o.closing && o.out.is_empty() {
            *conn = C::default();
            // SAFETY: the connection's descriptor, closed once, as its state is reset.
            unsafe { libc::close(fd) };
        }
    }
}

/// The start of a server: SIGPIPE ignored, a non-blocking listener on 127.0.0.1:`port`, and
/// an epoll watching it (the listener's descriptor is its events' data).
pub fn serve(port: u16) -> (i32, Epoll) {
    // SAFETY: ignoring a signal; a write to a closed socket then fails with EPIPE instead.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let lfd = listen(port, libc::SOCK_NONBLOCK);
    let ep = Epoll::new();
    ep.add(lfd, libc::EPOLLIN as u32);
    (lfd, ep)
}

/// Connection `fd`'s place in `conns` (indexed by descriptor), made if need be.
pub fn slot<C: Default>(conns: &mut Vec<C>, fd: i32) -> &mut C {
    if conns.len() <= fd as usize {
        conns.resize_with(fd as usize + 1, C::default);
    }
    &mut conns[fd as usize]
}

/// One client from the listener's queue (non-blocking, TCP_NODELAY), or `None` when it is
/// empty (or out of descriptors: the backlog waits for the next event).
pub fn accept_client(lfd: i32) -> Option<i32> {
    // SAFETY: no address is asked for.
    let c = unsafe {
        libc::accept4(
            lfd,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK,
        )
    };
    if c < 0 {
        return None;
    }
    set_int(c, libc::IPPROTO_TCP, libc::TCP_NODELAY);
    Some(c)
}

/// Writes `data`; what the socket does not take goes to `rest`. True if the socket failed.
pub fn write_all(fd: i32, mut data: &[u8], rest: &mut Vec<u8>) -> bool {
    while !data.is_empty() {
        // SAFETY: `data` is valid for its length.
        let w = unsafe { libc::write(fd, data.as_ptr().cast(), data.len()) };
        if w < 0 {
            if Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                return true;
            }
            rest.extend_from_slice(data);
            break;
        }
        data = &data[w as usize..];
    }
    false
}

/// wsd's TLS server configuration (src/tls.rs: rustls on ring, TLS 1.3 and 1.2, ALPN
/// http/1.1, rustls's defaults otherwise) for the PEM certificate chain and key in these files;
/// exits with the reason if they cannot be used. `raw-tls` and the tokio-tungstenite peer
/// serve with it.
pub fn server_config(cert: &str, key: &str) -> Arc<ServerConfig> {
    let die = |what: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("{what}: {e}");
        std::process::exit(1)
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| die(cert, &e));
    let key = PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| die(key, &e));
    #[allow(deprecated)] // ring, as wsd's: no post-quantum key exchange
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap_or_else(|e| die("protocol versions", &e))
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap_or_else(|e| die("certificate and key", &e));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// Exits with what failed if `r` is negative.
pub fn check(r: i32, what: &str) -> i32 {
    if r < 0 {
        eprintln!("{what}: {}", Error::last_os_error());
        std::process::exit(1);
    }
    r
}

/// The port from the command line, or exit with the usage line.
pub fn port_arg(name: &str) -> u16 {
    std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: {name} PORT");
            std::process::exit(2)
        })
}

/// A listening socket on 127.0.0.1:`port` (`flags` go to socket(2), e.g. SOCK_NONBLOCK).
pub fn listen(port: u16, flags: i32) -> i32 {
    // SAFETY: plain socket calls on a descriptor this function owns, with sizes from the types.
    unsafe {
        let fd = check(
            libc::socket(libc::AF_INET, libc::SOCK_STREAM | flags, 0),
            "socket",
        );
        set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_port = port.to_be();
        addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
        let alen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        check(libc::bind(fd, (&raw const addr).cast(), alen), "bind");
        check(libc::listen(fd, 4096), "listen");
        fd
    }
}

/// Sets an int socket option to 1 (TCP_NODELAY on accepted sockets, SO_REUSEADDR).
pub fn set_int(fd: i32, level: i32, opt: i32) {
    let one: libc::c_int = 1;
    let len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `one` outlives the call and `len` is its size.
    unsafe { libc::setsockopt(fd, level, opt, (&raw const one).cast(), len) };
}

/// XORs the mask in, eight bytes at a time (a byte loop is a tenth of the speed at 4 KiB).
fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    let m = u32::from_ne_bytes(mask) as u64;
    let m = m | m << 32;
    let mut words = payload.chunks_exact_mut(8);
    for w in &mut words {
        let v = u64::from_ne_bytes((&*w).try_into().unwrap()) ^ m;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The value of header `name` (lowercase) in an HTTP head.
fn header<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let colon = line.iter().position(|&b| b == b':')?;
        line[..colon]
            .eq_ignore_ascii_case(name)
            .then(|| line[colon + 1..].trim_ascii())
    })
}

/// Sec-WebSocket-Accept: base64(SHA-1(key + the RFC 6455 GUID)).
fn accept(key: &[u8]) -> Vec<u8> {
    let mut msg = key.to_vec();
    msg.extend_from_slice(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
    let digest = sha1(&msg);
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(28);
    for chunk in digest.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                B64[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            });
        }
    }
    out
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&((data.len() as u64) * 8).to_be_bytes());
    for block in msg.chunks(64) {
        let mut w = [0u32; 80];
        for i in 0..80 {
            w[i] = if i < 16 {
                u32::from_be_bytes(block[4 * i..4 * i + 4].try_into().unwrap())
            } else {
                (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1)
            };
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..20 => (b & c | !b & d, 0x5A827999),
                20..40 => (b ^ c ^ d, 0x6ED9EBA1),
                40..60 => (b & c | b & d | c & d, 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (x, y) in h.iter_mut().zip([a, b, c, d, e]) {
            *x = x.wrapping_add(y);
        }
    }
    let mut out = [0u8; 20];
    for (i, x) in h.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&x.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn unmasking_by_words_is_unmasking_by_bytes() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in [0, 3, 8, 13, 4096] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let mut fast = data.clone();
            super::unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i & 3])
                .collect();
            assert_eq!(fast, slow, "len {len}");
        }
    }

    #[test]
    fn the_rfc_example_key_gets_its_accept_value() {
        assert_eq!(
            super::accept(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }
}
