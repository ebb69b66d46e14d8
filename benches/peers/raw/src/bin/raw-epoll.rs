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

use raw_echo::{Outbox, Wire, accept_client, port_arg, serve, slot, write_replies};
use std::io::Error;

const SCRATCH: usize = 64 << 10;

#[derive(Default)]
struct Conn {
    open: bool,
    wire: Wire,
    io: Outbox,
}

fn main() {
    let port = port_arg("raw-epoll");
    let (lfd, ep) = serve(port);
    let mut conns: Vec<Conn> = Vec::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let mut scratch = vec![0u8; SCRATCH];
    // Every reply of a turn, one after another; `replies` says whose each range is.
    let mut out: Vec<u8> = Vec::with_capacity(SCRATCH);
    let mut replies: Vec<(i32, std::ops::Range<usize>)> = Vec::with_capacity(1024);
    println!("raw-epoll listening on 127.0.0.1:{port}");
    loop {
        for ev in ep.wait(&mut events) {
            let fd = ev.u64 as i32;
            if fd == lfd {
                while let Some(c) = accept_client(lfd) {
                    slot(&mut conns, c).open = true;
                    ep.add_client(c);
                }
                continue;
            }
            let conn = &mut conns[fd as usize];
            if !conn.open {
                continue;
            }
            let io = &mut conn.io;
            io.dead = ev.events & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0;
            let start = out.len();
            // A read that fills the scratch buffer may have left more behind; a short one
            // emptied the socket, and edge-triggered epoll reports whatever arrives later.
            while !io.dead && !io.closing && ev.events & libc::EPOLLIN as u32 != 0 {
                let r = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), SCRATCH) };
                if r <= 0 {
                    io.dead = r == 0 || Error::last_os_error().raw_os_error() != Some(libc::EAGAIN);
                    break;
                }
                io.closing = !conn.wire.read(&scratch[..r as usize], &mut out);
                if (r as usize) < SCRATCH {
                    break;
                }
            }
            replies.push((fd, start..out.len()));
        }
        write_replies(&mut conns, &mut replies, &out, |c| &mut c.io);
        out.clear();
    }
}
