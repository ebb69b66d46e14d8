//! The CLI's connections to the master's control socket: one request, one reply each.
//!
//! Replies can be large (`wsd connections` on a busy server is megabytes), so they are written
//! as the socket takes them, never with the master loop waiting on a slow reader.
//!
//! The master's file descriptors are also what it forks and respawns workers with, so clients
//! cannot pile up: one that sends no request, or takes none of its reply, for
//! [`CLIENT_TIMEOUT`] is dropped, and beyond [`MAX_CLIENTS`] the longest-idle one that has not
//! asked anything makes room for a newcomer, so `wsd status` still gets through.
//!
//! Only root and the master's own user may command it. The socket file is owner-only, and
//! each connection's peer is checked again by its credentials (`SO_PEERCRED`), so a socket
//! made reachable by a too-open directory or a `chmod` still obeys no one else: such a peer's
//! request is answered with a refusal and nothing else.

use crate::control::{self, LineReader, Reply, Request};
use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::unistd::Uid;
use slab::Slab;
use std::io::{self, Write};
use std::time::{Duration, Instant};

/// Client tokens start here (below the workers' channel tokens).
pub const CLIENT_BASE: usize = 16;

/// How long a client may go without sending its request, or without taking any of its reply.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Clients connected at once. The CLI holds one per command.
pub const MAX_CLIENTS: usize = 64;

struct Client {
    stream: UnixStream,
    input: LineReader,
    output: Vec<u8>,
    written: usize,
    /// Asked and not yet answered.
    asked: bool,
    /// When the client is dropped if it has not made progress (none while the master works
    /// on its request).
    deadline: Option<Instant>,
    peer: Peer,
}

/// Whether a client may command the master, by its credentials.
#[derive(Clone, Copy)]
enum Peer {
    /// Root, or the master's own user.
    Trusted,
    /// Anyone else: its request is answered with a refusal.
    Refused { uid: u32 },
}

pub struct Clients {
    listener: UnixListener,
    slab: Slab<Client>,
    /// The master's effective uid: its peers with the same uid, and root, may command it.
    own_uid: Uid,
}

pub fn token_client(token: Token) -> Option<usize> {
    token.0.checked_sub(CLIENT_BASE)
}

impl Clients {
    pub fn new(listener: std::os::unix::net::UnixListener) -> Clients {
        let _ = listener.set_nonblocking(true);
        Clients {
            listener: UnixListener::from_std(listener),
            slab: Slab::new(),
            own_uid: nix::unistd::geteuid(),
        }
    }

    pub fn listener(&mut self) -> &mut UnixListener {
        &mut self.listener
    }

    pub fn accept(&mut self, registry: &Registry) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let Some(peer) = self.check_peer(&stream) else {
                        continue;
                    };
                    if self.slab.len() >= MAX_CLIENTS && !self.evict_idle(registry) {
                        log::warn!("control socket: {MAX_CLIENTS} clients busy; one refused");
                        continue;
                    }
                    let entry = self.slab.vacant_entry();
                    let token = Token(CLIENT_BASE + entry.key());
                    if registry
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert(Client {
                            stream,
                            input: LineReader::default(),
                            output: Vec::new(),
                            written: 0,
                            asked: false,
                            deadline: Some(Instant::now() + CLIENT_TIMEOUT),
                            peer,
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    /// Who is at the other end of `stream`, or `None` (the connection is to be dropped) when
    /// the kernel cannot say. A refusal is logged here, with the peer's uid and pid.
    fn check_peer(&self, stream: &UnixStream) -> Option<Peer> {
        let cred = match getsockopt(stream, PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                log::warn!("control socket: cannot read a peer's credentials ({e}); dropped");
                return None;
            }
        };
        let uid = Uid::from_raw(cred.uid());
        if uid.is_root() || uid == self.own_uid {
            return Some(Peer::Trusted);
        }
        log::warn!(
            "control socket: refused uid {uid} (pid {}): only root and uid {} may command \
             this master",
            cred.pid(),
            self.own_uid
        );
        Some(Peer::Refused { uid: uid.as_raw() })
    }

    /// Handles readiness of client `key`: writes pending output, reads a request. Returns the
    /// request once it has arrived (a bad one is answered here).
    pub fn ready(&mut self, key: usize, registry: &Registry) -> Option<Request> {
        let client = self.slab.get_mut(key)?;
        if !client.output.is_empty() {
            self.write(key, registry);
            return None;
        }
        if client.asked {
            return None;
        }
        let (lines, closed) = client.input.read_from(&mut client.stream);
        let Some(line) = lines.into_iter().next() else {
            if closed {
                self.drop_client(key, registry);
            }
            return None;
        };
        client.asked = true;
        client.deadline = None;
        if let Peer::Refused { uid } = client.peer {
            let why = format!("permission denied: uid {uid} may not command this master");
            self.reply(key, &Reply::error(why), registry);
            return None;
        }
        match serde_json::from_str::<Request>(&line) {
            Ok(req) => Some(req),
            Err(e) => {
                self.reply(key, &Reply::error(format!("bad request: {e}")), registry);
                None
            }
        }
    }

    /// Sends `reply` to client `key` and closes it once written.
    pub fn reply(&mut self, key: usize, reply: &Reply, registry: &Registry) {
        if let Some(c) = self.slab.get_mut(key) {
            c.output = control::line(reply);
            c.written = 0;
            c.deadline = Some(Instant::now() + CLIENT_TIMEOUT);
            self.write(key, registry);
        }
    }

    fn write(&mut self, key: usize, registry: &Registry) {
        let Some(c) = self.slab.get_mut(key) else {
            return;
        };
        while c.written < c.output.len() {
            match c.stream.write(&c.output[c.written..]) {
                Ok(n) => {
                    c.written += n;
                    c.deadline = Some(Instant::now() + CLIENT_TIMEOUT);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let token = Token(CLIENT_BASE + key);
                    let _ = registry.reregister(&mut c.stream, token, Interest::WRITABLE);
                    return;
                }
                Err(_) => break,
            }
        }
        self.drop_client(key, registry);
    }

    /// When the next client times out, if any may.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.slab.iter().filter_map(|(_, c)| c.deadline).min()
    }

    /// Drops the clients whose deadline has passed.
    pub fn expire(&mut self, now: Instant, registry: &Registry) {
        let due: Vec<usize> = (self.slab.iter())
            .filter(|(_, c)| c.deadline.is_some_and(|t| now >= t))
            .map(|(key, _)| key)
            .collect();
        for key in due {
            log::debug!("control client {key} timed out");
            self.drop_client(key, registry);
        }
    }

    /// Drops the client that has waited longest without asking anything; false if every
    /// client has asked (the master owes each an answer).
    fn evict_idle(&mut self, registry: &Registry) -> bool {
        let idle = (self.slab.iter())
            .filter(|(_, c)| !c.asked)
            .min_by_key(|(_, c)| c.deadline)
            .map(|(key, _)| key);
        match idle {
            Some(key) => {
                self.drop_client(key, registry);
                true
            }
            None => false,
        }
    }

    fn drop_client(&mut self, key: usize, registry: &Registry) {
        if let Some(mut c) = self.slab.try_remove(key) {
            let _ = registry.deregister(&mut c.stream);
        }
    }

    /// Takes a client out of the loop, for an answer given after the loop ends (`stop`).
    pub fn detach(&mut self, key: usize, registry: &Registry) -> Option<UnixStream> {
        let mut c = self.slab.try_remove(key)?;
        let _ = registry.deregister(&mut c.stream);
        Some(c.stream)
    }
}

/// Writes one reply line to a detached client, giving it at most a second.
pub fn send_reply(stream: &mut UnixStream, reply: &Reply) {
    let bytes = control::line(reply);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut written = 0;
    while written < bytes.len() && Instant::now() < deadline {
        match stream.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => return,
        }
    }
}
