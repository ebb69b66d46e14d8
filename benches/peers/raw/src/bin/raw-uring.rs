//! raw-epoll's byte echo on io_uring instead of epoll: does putting every socket operation of
//! a turn into one io_uring_enter lift the floor that raw-epoll measures? On this machine a
//! system call costs ~0.12 µs and raw-epoll makes two per message, so this is the ceiling's
//! ceiling: if it is not much faster, no server's event loop can be either.
//!
//! One thread, one ring (SINGLE_ISSUER + DEFER_TASKRUN: the kernel's completion work runs when
//! this thread enters the ring, not in interrupts), a multishot accept, a multishot recv per
//! connection into buffers provided from one pool (an idle connection holds none), one send in
//! flight per connection, and one io_uring_enter per turn, which submits what the last turn
//! queued and waits for a completion. The WebSocket side is `raw_echo::Wire`, as in raw-epoll.
//!
//! Usage: raw-uring PORT   (listens on 127.0.0.1:PORT)

use io_uring::{IoUring, cqueue, opcode, squeue, types};
use raw_echo::{Wire, listen, port_arg, set_int};

/// The provided-buffer pool: 1,024 buffers of 16 KiB (16 MiB of address space, touched only
/// as buffers are used).
const BUF_SIZE: usize = 16 << 10;
const BUFS: u16 = 1024;
const GROUP: u16 = 0;

const ACCEPT: u64 = 1;
const RECV: u64 = 2;
const SEND: u64 = 3;
const PROVIDE: u64 = 4;

#[derive(Default)]
struct Conn {
    /// Which connection on this descriptor number (0: none): completions of an earlier one
    /// carry another and are dropped.
    generation: u32,
    wire: Wire,
    /// Close answered (or the request refused): the socket closes once everything is sent.
    closing: bool,
    /// The client went away or the socket failed.
    dead: bool,
    /// Replies not yet handed to the kernel.
    out: Vec<u8>,
    /// The bytes of the send in flight (it must not move or change until it completes).
    sending: Vec<u8>,
    sent: usize,
    in_flight: bool,
}

struct Server {
    ring: IoUring,
    pool: Vec<u8>,
    conns: Vec<Conn>,
    generations: u32,
    listener: i32,
}

fn user_data(generation: u32, fd: i32, op: u64) -> u64 {
    (generation as u64) << 32 | (fd as u64) << 8 | op
}

impl Server {
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every buffer an entry points at outlives the operation: the pool lives as
        // long as the server, and a send's bytes stay in `Conn::sending` until its completion.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            self.ring.submit().expect("io_uring_enter");
        }
    }

    fn provide(&mut self, bid: u16, count: u16) {
        let addr = self.pool[bid as usize * BUF_SIZE..].as_mut_ptr();
        let e = opcode::ProvideBuffers::new(addr, BUF_SIZE as i32, count, GROUP, bid)
            .build()
            .user_data(PROVIDE);
        self.push(e);
    }

    fn arm_recv(&mut self, fd: i32) {
        let g = self.conns[fd as usize].generation;
        self.push(
            opcode::RecvMulti::new(types::Fd(fd), GROUP)
                .build()
                .user_data(user_data(g, fd, RECV)),
        );
    }

    fn arm_accept(&mut self) {
        self.push(
            opcode::AcceptMulti::new(types::Fd(self.listener))
                .build()
                .user_data(ACCEPT),
        );
    }

    /// Puts in flight what of `Conn::sending` has not been sent yet.
    fn send_rest(&mut self, fd: i32) {
        let conn = &mut self.conns[fd as usize];
        conn.in_flight = true;
        let rest = &conn.sending[conn.sent..];
        let e = opcode::Send::new(types::Fd(fd), rest.as_ptr(), rest.len() as u32)
            .build()
            .user_data(user_data(conn.generation, fd, SEND));
        self.push(e);
    }

    /// Sends what is queued if nothing is in flight; closes the connection once it is done.
    fn settle(&mut self, fd: i32) {
        let conn = &mut self.conns[fd as usize];
        if !conn.in_flight && !conn.dead && !conn.out.is_empty() {
            std::mem::swap(&mut conn.sending, &mut conn.out);
            conn.sent = 0;
            self.send_rest(fd);
        } else if !conn.in_flight && (conn.dead || conn.closing && conn.out.is_empty()) {
            self.conns[fd as usize] = Conn::default();
            // SAFETY: `fd` is this connection's socket, closed once. The shutdown ends its
            // multishot recv (whose late completion carries a stale generation).
            unsafe {
                libc::shutdown(fd, libc::SHUT_RDWR);
                libc::close(fd);
            }
        }
    }

    fn completed(&mut self, ud: u64, res: i32, flags: u32) {
        let (op, fd, generation) = (ud & 0xff, (ud >> 8 & 0xff_ffff) as i32, (ud >> 32) as u32);
        let buffer = cqueue::buffer_select(flags);
        match op {
            PROVIDE => assert!(res >= 0, "provide buffers: {res}"),
            ACCEPT => {
                if !cqueue::more(flags) {
                    self.arm_accept();
                }
                if res < 0 {
                    return;
                }
                set_int(res, libc::IPPROTO_TCP, libc::TCP_NODELAY);
                if self.conns.len() <= res as usize {
                    self.conns.resize_with(res as usize + 1, Conn::default);
                }
                self.generations += 1;
                self.conns[res as usize] = Conn {
                    generation: self.generations,
                    ..Conn::default()
                };
                self.arm_recv(res);
            }
            _ if self
                .conns
                .get(fd as usize)
                .is_none_or(|c| c.generation != generation) =>
            {
                if let Some(bid) = buffer {
                    self.provide(bid, 1); // a closed connection's last bytes
                }
            }
            RECV => {
                if let Some(bid) = buffer {
                    let got = &self.pool[bid as usize * BUF_SIZE..][..res.max(0) as usize];
                    let conn = &mut self.conns[fd as usize];
                    if !conn.closing {
                        conn.closing = !conn.wire.read(got, &mut conn.out);
                    }
                    self.provide(bid, 1);
                }
                let conn = &mut self.conns[fd as usize];
                if res == 0 || res < 0 && res != -libc::ENOBUFS {
                    conn.dead = true;
                } else if !cqueue::more(flags) && !conn.closing {
                    self.arm_recv(fd); // ended (the pool ran dry, say): armed again
                }
                self.settle(fd);
            }
            SEND => {
                let conn = &mut self.conns[fd as usize];
                conn.in_flight = false;
                if res < 0 {
                    conn.dead = true;
                } else {
                    conn.sent += res as usize;
                    if conn.sent < conn.sending.len() {
                        self.send_rest(fd); // a partial send goes on from where it stopped
                        return;
                    }
                    conn.sending.clear();
                }
                self.settle(fd);
            }
            _ => unreachable!("unknown operation {op}"),
        }
    }
}

fn main() {
    let port = port_arg("raw-uring");
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(4096)
        .unwrap_or_else(|e| {
            eprintln!("raw-uring: io_uring_setup: {e}");
            std::process::exit(1)
        });
    let mut server = Server {
        ring,
        pool: vec![0; BUF_SIZE * BUFS as usize],
        conns: Vec::new(),
        generations: 0,
        listener: listen(port, 0),
    };
    server.provide(0, BUFS);
    server.arm_accept();
    let mut done: Vec<(u64, i32, u32)> = Vec::with_capacity(4096);
    println!("raw-uring listening on 127.0.0.1:{port}");
    loop {
        if let Err(e) = server.ring.submit_and_wait(1) {
            assert!(
                matches!(e.raw_os_error(), Some(libc::EINTR | libc::EBUSY)),
                "io_uring_enter: {e}"
            );
        }
        done.extend(
            server
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for (ud, res, flags) in done.drain(..) {
            server.completed(ud, res, flags);
        }
    }
}
