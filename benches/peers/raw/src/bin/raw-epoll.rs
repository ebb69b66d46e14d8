//! The physical ceiling of scripts/bench-peers.sh: what one core does when a WebSocket server
//! does nothing but move bytes. One thread, one epoll (edge-triggered), accept4, one read per
//! readiness event (a short read means the socket is empty, as in wsd's worker), every frame of
//! that read unmasked straight into one output buffer shared by the turn, and one write per
//! connection once every event of the turn is read. Writing each reply right after its read
//! instead needs ~7 % more CPU per 32-byte echo here (pinned, 3 rounds: 3.62-3.97 against
//! 3.35-3.69 µs), so that would be a ceiling wsd's worker (which flushes once a turn) beats.
//! The WebSocket side is `raw_echo::Wire`, shared with `raw-uring`.
//!
//! Usage: raw-epoll PORT   (listens on 127.0.0.1:PORT)

use raw_echo::{Wire, check, listen, port_arg, set_int};
use std::io::Error;

const SCRATCH: usize = 64 << 10;

#[derive(Default)]
struct Conn {
    open: bool,
    /// Close answered (or the request refused): the socket closes once `out` is written.
    closing: bool,
    wire: Wire,
    /// What the socket has not taken yet (empty and unallocated nearly always: replies are
    /// built in one buffer shared by all connections, and only a remainder is kept here).
    out: Vec<u8>,
    /// The socket failed or hung up this turn: closed once the turn's replies are handled.
    dead: bool,
}

fn main() {
    let port = port_arg("raw-epoll");
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let lfd = listen(port, libc::SOCK_NONBLOCK);
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
    // Every reply of a turn, one after another; `replies` says whose each range is.
    let mut out: Vec<u8> = Vec::with_capacity(SCRATCH);
    let mut replies: Vec<(i32, std::ops::Range<usize>)> = Vec::with_capacity(1024);
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
                    set_int(c, libc::IPPROTO_TCP, libc::TCP_NODELAY);
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
            conn.dead = ev.events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            let start = out.len();
            // A read that fills the scratch buffer may have left more behind; a short one
            // emptied the socket, and edge-triggered epoll reports whatever arrives later.
            while !conn.dead && !conn.closing && ev.events & libc::EPOLLIN as u32 != 0 {
                let r = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), SCRATCH) };
                if r <= 0 {
                    conn.dead =
                        r == 0 || Error::last_os_error().raw_os_error() != Some(libc::EAGAIN);
                    break;
                }
                conn.closing = !conn.wire.read(&scratch[..r as usize], &mut out);
                if (r as usize) < SCRATCH {
                    break;
                }
            }
            replies.push((fd, start..out.len()));
        }
        // The turn's replies, one write per connection (after what the socket did not take
        // before, if anything); what it does not take now waits in the connection's own
        // buffer for EPOLLOUT.
        for (fd, reply) in replies.drain(..) {
            let conn = &mut conns[fd as usize];
            let reply = &out[reply];
            let mut dead = conn.dead;
            if !conn.out.is_empty() {
                conn.out.extend_from_slice(reply);
                let pending = std::mem::take(&mut conn.out);
                dead = dead || write_all(fd, &pending, &mut conn.out);
            } else if !reply.is_empty() {
                dead = dead || write_all(fd, reply, &mut conn.out);
            }
            if dead || conn.closing && conn.out.is_empty() {
                *conn = Conn::default();
                unsafe { libc::close(fd) };
            }
        }
        out.clear();
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
