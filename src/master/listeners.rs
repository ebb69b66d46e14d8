//! One listening socket per worker slot, bound by the master with SO_REUSEPORT.
//!
//! The master keeps every slot's socket open for its whole life, so a slot's accept queue
//! survives its worker's death and respawn: clients that arrive meanwhile wait in the queue
//! instead of being refused. The kernel spreads new connections over the slots.

use socket2::{Domain, Protocol, Socket, Type};
use std::io;
use std::net::{SocketAddr, TcpListener};

/// A listening socket that could not be bound, and why.
#[derive(Debug)]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The system's reason.
    pub error: io::Error,
}

impl std::error::Error for BindError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.error.kind() {
            io::ErrorKind::AddrInUse => write!(
                f,
                "cannot listen on {}: address already in use by another program",
                self.addr
            ),
            io::ErrorKind::PermissionDenied => write!(
                f,
                "cannot listen on {}: permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE)",
                self.addr
            ),
            _ => write!(f, "cannot listen on {}: {}", self.addr, self.error),
        }
    }
}

/// Binds `count` sockets to `addr`. Port 0 takes a free port for the first and reuses it.
pub fn bind_slots(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> Result<Vec<TcpListener>, BindError> {
    let mut addr = addr;
    let err = |addr, error| BindError { addr, error };
    if addr.port() != 0 {
        // SO_REUSEPORT would let us join a socket another program of ours bound with it; a
        // plain bind first makes "the port is taken" an error instead of a silent share.
        probe(addr).map_err(|e| err(addr, e))?;
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let l = bind_one(addr, backlog).map_err(|e| err(addr, e))?;
        if addr.port() == 0 {
            addr = l.local_addr().map_err(|e| err(addr, e))?;
        }
        out.push(l);
    }
    Ok(out)
}

/// Binds `count` more sockets to a port this master already listens on (a reload that raises
/// `count`): no probe, the port is ours.
pub fn bind_more(
    addr: SocketAddr,
    count: usize,
    backlog: u32,
) -> Result<Vec<TcpListener>, BindError> {
    (0..count)
        .map(|_| bind_one(addr, backlog).map_err(|error| BindError { addr, error }))
        .collect()
}

/// Applies a new backlog to a listening socket (Linux takes a second `listen`).
pub fn set_backlog(listener: &TcpListener, backlog: u32) -> io::Result<()> {
    socket2::SockRef::from(listener).listen(clamp(backlog))
}

/// Connections waiting in a listening socket's accept queue, and the queue's limit.
pub fn accept_queue(listener: &TcpListener) -> (u32, u32) {
    crate::sys::listen_queue(listener).unwrap_or((0, 0))
}

fn clamp(backlog: u32) -> i32 {
    backlog.min(i32::MAX as u32) as i32
}

fn socket_for(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    Ok(s)
}

fn probe(addr: SocketAddr) -> io::Result<()> {
    socket_for(addr)?.bind(&addr.into())
}

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<TcpListener> {
    let s = socket_for(addr)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(clamp(backlog))?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_share_one_port_and_a_taken_port_is_an_error() {
        let slots = bind_slots("127.0.0.1:0".parse().unwrap(), 3, 16).unwrap();
        let port = slots[0].local_addr().unwrap().port();
        assert!(slots.iter().all(|l| l.local_addr().unwrap().port() == port));

        let other = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = other.local_addr().unwrap();
        let e = bind_slots(taken, 2, 16).unwrap_err();
        assert!(e.to_string().contains("already in use"), "{e}");

        let more = bind_more(slots[0].local_addr().unwrap(), 2, 8).unwrap();
        assert_eq!(more[1].local_addr().unwrap().port(), port);
        assert_eq!(accept_queue(&more[0]), (0, 8));
        set_backlog(&more[0], 32).unwrap();
        let _waiting = std::net::TcpStream::connect(more[0].local_addr().unwrap());
        let (queued, limit) = accept_queue(&more[0]);
        assert_eq!(limit, 32);
        assert!(queued <= 1);
    }
}
