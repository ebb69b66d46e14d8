//! The physical ceiling of scripts/bench-peers.sh: what one core does when a WebSocket server
//! does nothing but move bytes. One thread, one epoll (edge-triggered), accept4, one read per
//! readiness event (a short read means the socket is empty, as in wsd's worker), every frame of
//! that read unmasked straight into one output buffer, one write per event.
//!
//! The upgrade is answered with a fixed 101 whose only variable part is Sec-WebSocket-Accept,
//! computed properly (SHA-1 + base64, below): `wsd bench` checks it, and a real client would
//! too. Nothing else of the request is looked at. Frames are parsed minimally: text, binary
//! and continuation frames come back with the same header, a Ping as a Pong, a Close is echoed
//! and the socket closed (the server closes first, as RFC 6455 asks). No UTF-8 check, no size
//! limit, no timeouts: not a server anyone should run, only a measure of the floor.
//!
//! Usage: raw-epoll PORT   (listens on 127.0.0.1:PORT)

use std::io::Error;

const SCRATCH: usize = 64 << 10;

#[derive(Default)]
struct Conn {
    open: bool,
    upgraded: bool,
    /// Close answered (or the request refused): the socket closes once `out` is written.
    closing: bool,
    /// Bytes of an unfinished upgrade request or frame, carried to the next read.
    carry: Vec<u8>,
    /// What the socket has not taken yet (empty and unallocated nearly always: replies are
    /// built in one buffer shared by all connections, and only a remainder is kept here).
    out: Vec<u8>,
}

fn check(r: i32, what: &str) -> i32 {
    if r < 0 {
        eprintln!("raw-epoll: {what}: {}", Error::last_os_error());
        std::process::exit(1);
    }
    r
}

fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            eprintln!("usage: raw-epoll PORT");
            std::process::exit(2)
        });
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let lfd = check(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0) },
        "socket",
    );
    let one: libc::c_int = 1;
    let optlen = size_of::<libc::c_int>() as libc::socklen_t;
    unsafe {
        libc::setsockopt(
            lfd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&raw const one).cast(),
            optlen,
        )
    };
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_port = port.to_be();
    addr.sin_addr.s_addr = u32::from_be_bytes([127, 0, 0, 1]).to_be();
    let alen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    check(
        unsafe { libc::bind(lfd, (&raw const addr).cast(), alen) },
        "bind",
    );
    check(unsafe { libc::listen(lfd, 4096) }, "listen");
    let ep = check(unsafe { libc::epoll_create1(0) }, "epoll_create1");
    let add = |fd: i32, flags: u32| {
        let mut ev = libc::epoll_event {
            events: flags,
            u64: fd as u64,
        };
        check(
            unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
            "epoll_ctl",
        );
    };
    add(lfd, libc::EPOLLIN as u32);
    let mut conns: Vec<Conn> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut scratch = vec![0u8; SCRATCH];
    let mut out: Vec<u8> = Vec::with_capacity(SCRATCH);
    println!("raw-epoll listening on 127.0.0.1:{port}");
    loop {
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, -1) };
        if n < 0 {
            continue; // EINTR
        }
        for ev in &events[..n as usize] {
            let fd = ev.u64 as i32;
            if fd == lfd {
                loop {
                    let c = unsafe {
                        libc::accept4(
                            lfd,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                            libc::SOCK_NONBLOCK,
                        )
                    };
                    if c < 0 {
                        break; // EAGAIN (or EMFILE: the backlog waits for the next event)
                    }
                    unsafe {
                        libc::setsockopt(
                            c,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&raw const one).cast(),
                            optlen,
                        )
                    };
                    if conns.len() <= c as usize {
                        conns.resize_with(c as usize + 1, Conn::default);
                    }
                    conns[c as usize] = Conn {
                        open: true,
                        ..Conn::default()
                    };
                    add(c, (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLET) as u32);
                }
                continue;
            }
            let conn = &mut conns[fd as usize];
            if !conn.open {
                continue;
            }
            let mut dead = ev.events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            // A read that fills the scratch buffer may have left more behind; a short one
            // emptied the socket, and edge-triggered epoll reports whatever arrives later.
            while !dead && !conn.closing && ev.events & libc::EPOLLIN as u32 != 0 {
                let r = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), SCRATCH) };
                if r <= 0 {
                    dead = r == 0 || Error::last_os_error().raw_os_error() != Some(libc::EAGAIN);
                    break;
                }
                let got = &scratch[..r as usize];
                let go_on = if conn.carry.is_empty() {
                    handle(conn, got, &mut out)
                } else {
                    let mut buf = std::mem::take(&mut conn.carry);
                    buf.extend_from_slice(got);
                    handle(conn, &buf, &mut out)
                };
                conn.closing = !go_on;
                if (r as usize) < SCRATCH {
                    break;
                }
            }
            // One write for everything this event produced (after what the socket did not take
            // before, if anything); what it does not take now waits in the connection's own
            // buffer for EPOLLOUT.
            if !conn.out.is_empty() {
                conn.out.extend_from_slice(&out);
                out.clear();
                let pending = std::mem::take(&mut conn.out);
                dead = dead || write_all(fd, &pending, &mut conn.out);
            } else if !out.is_empty() {
                dead = dead || write_all(fd, &out, &mut conn.out);
                out.clear();
            }
            if dead || conn.closing && conn.out.is_empty() {
                *conn = Conn::default();
                unsafe { libc::close(fd) };
            }
        }
    }
}

/// Writes `data`; what the socket does not take goes to `rest`. True if the socket failed.
fn write_all(fd: i32, mut data: &[u8], rest: &mut Vec<u8>) -> bool {
    while !data.is_empty() {
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

/// Handles the bytes `buf` (carry + this read), putting replies in `out`; returns false when
/// the connection should end.
fn handle(conn: &mut Conn, mut buf: &[u8], out: &mut Vec<u8>) -> bool {
    if !conn.upgraded {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            conn.carry.extend_from_slice(buf);
            return buf.len() < 16 << 10;
        };
        let Some(key) = header(&buf[..end], b"sec-websocket-key") else {
            return false;
        };
        out.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ");
        out.extend_from_slice(&accept(key));
        out.extend_from_slice(b"\r\n\r\n");
        conn.upgraded = true;
        conn.carry = Vec::new(); // no buffer kept by an idle connection
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
    conn.carry.extend_from_slice(buf);
    true
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
