//! Who may connect, and when: the slot's listener and whether it is being drained, the count
//! per client address for `max_connections_per_ip` (taken at accept or, behind a trusted
//! proxy, once the forwarded client address is known at the upgrade), and `allowed_origins`.
//!
//! The accept and the upgrade in `event_loop.rs` ask the [`Acceptor`] and act on its answer:
//! the data path stays a straight line there, and the policy and its bookkeeping live here.
//! A connection's place in its address's count is an [`IpSlot`], given back when the
//! connection is dropped, however it ends.

use crate::config::GroupConfig;
use crate::proto::handshake::{self, Reject, Request};
use mio::net::{TcpListener, TcpStream};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// How long accepting pauses when the process is out of descriptors.
const RETRY_AFTER: Duration = Duration::from_millis(100);

/// Whether the listener is being drained, and if not, what resumes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Drained until it would block: its next readiness event brings more clients.
    Waiting,
    /// A batch was used up with clients still queued. The listener is edge-triggered, so no
    /// event will come for them: the loop comes back next turn.
    More,
    /// At `max_connections`: accepting resumes when a connection leaves.
    Full,
    /// Out of descriptors: the queued clients wait, and accepting is tried again then.
    RetryAt(Instant),
}

/// What one accept gave.
pub(super) enum Accepted {
    /// A client, with its serial and its place in `max_connections_per_ip` (when counted).
    Client {
        stream: TcpStream,
        peer: SocketAddr,
        serial: u64,
        ip_slot: Option<IpSlot>,
    },
    /// A client was dropped (over its address's limit) or gave up: accept the next.
    Dropped,
    /// Nothing more to accept now: the queue is empty, accepting is paused, or the worker
    /// is stopping.
    Stop,
}

/// The slot's listener and the policy of who gets in.
pub(super) struct Acceptor {
    /// Gone once the worker stops accepting.
    listener: Option<TcpListener>,
    state: State,
    per_ip: PerIp,
    serials: crate::conn_id::Serials,
}

impl Acceptor {
    pub(super) fn new(listener: TcpListener) -> Acceptor {
        Acceptor {
            listener: Some(listener),
            state: State::Waiting,
            per_ip: PerIp::default(),
            serials: crate::conn_id::Serials::new(),
        }
    }

    /// Stops accepting for good: our copy of the listener goes (the master keeps its own).
    pub(super) fn close(&mut self) -> Option<TcpListener> {
        self.listener.take()
    }

    /// Takes the next client from the listen queue, given the worker's `open` connections.
    pub(super) fn next(&mut self, settings: &GroupConfig, open: usize) -> Accepted {
        if open >= settings.max_connections {
            self.state = State::Full;
            return Accepted::Stop;
        }
        let Some(listener) = &self.listener else {
            return Accepted::Stop;
        };
        match listener.accept() {
            Ok((stream, peer)) => {
                let Some(ip_slot) = self.admit_peer(settings, peer) else {
                    log::debug!("{peer}: over max_connections_per_ip; dropped");
                    return Accepted::Dropped;
                };
                Accepted::Client {
                    stream,
                    peer,
                    serial: self.serials.next(),
                    ip_slot,
                }
            }
            Err(e) => self.accept_error(e),
        }
    }

    /// A batch was used up: come back for the rest next turn.
    pub(super) fn batch_used(&mut self) {
        self.state = State::More;
    }

    /// Whether the last turn left clients queued; asking clears it, so the turn's own events
    /// may set it again.
    pub(super) fn take_more(&mut self) -> bool {
        let more = self.state == State::More;
        if more {
            self.state = State::Waiting;
        }
        more
    }

    /// Clients are known to be waiting in the queue: the loop must not sleep.
    pub(super) fn has_more(&self) -> bool {
        self.state == State::More
    }

    /// At `max_connections`: a connection that leaves makes room.
    pub(super) fn is_full(&self) -> bool {
        self.state == State::Full
    }

    /// When accepting is to be retried after running out of descriptors.
    pub(super) fn retry_at(&self) -> Option<Instant> {
        match self.state {
            State::RetryAt(at) => Some(at),
            _ => None,
        }
    }

    /// What an `accept` that gave no client means for draining the listener.
    fn accept_error(&mut self, e: io::Error) -> Accepted {
        if e.kind() == io::ErrorKind::WouldBlock {
            self.state = State::Waiting;
            return Accepted::Stop;
        }
        if matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        ) {
            // The pending client stays queued; retry shortly instead of spinning on a
            // listener that stays readable. Logged once per episode, not on every retry.
            if !matches!(self.state, State::RetryAt(_) | State::Full) {
                log::warn!("accept: {e}; pausing accepts, retrying every 100 ms");
            }
            self.state = State::RetryAt(Instant::now() + RETRY_AFTER);
            return Accepted::Stop;
        }
        if matches!(
            e.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
        ) {
            return Accepted::Dropped;
        }
        log::warn!("accept: {e}");
        Accepted::Stop
    }

    /// A place in `max_connections_per_ip` for a connection handed over by another worker
    /// (it keeps its id): it is counted, but never refused (it was admitted already).
    pub(super) fn adopt(&mut self, settings: &GroupConfig, remote: IpAddr) -> Option<IpSlot> {
        let limit = match settings.max_connections_per_ip {
            0 => 0,
            _ => usize::MAX,
        };
        self.per_ip.admit(remote, limit).flatten()
    }

    /// Counts a new peer against `max_connections_per_ip`. `Some(Some(slot))`: counted;
    /// `Some(None)`: not counted (no limit, or a trusted proxy whose clients are counted
    /// once their forwarded address is known); `None`: over the limit.
    fn admit_peer(&self, settings: &GroupConfig, peer: SocketAddr) -> Option<Option<IpSlot>> {
        let ip = peer.ip();
        if settings.trusted_proxies.iter().any(|n| n.contains(&ip)) {
            return Some(None);
        }
        self.per_ip.admit(ip, settings.max_connections_per_ip)
    }

    /// What stands between a valid upgrade request and its `101`: an origin not allowed, or
    /// (behind a trusted proxy, where the client is counted only now that its forwarded
    /// address `ip` is known) one connection too many from that address. `Ok` carries the
    /// forwarded client's place in the count, if it was counted now.
    pub(super) fn refuse_upgrade(
        &self,
        settings: &GroupConfig,
        counted: bool,
        peer: IpAddr,
        ip: IpAddr,
        request: &Request,
    ) -> Result<Option<IpSlot>, Reject> {
        if !handshake::origin_allowed(request.origin.as_deref(), &settings.allowed_origins) {
            return Err(Reject::fixed(403, "origin not allowed"));
        }
        if counted || ip == peer {
            return Ok(None);
        }
        // Through a trusted proxy: count the forwarded client now.
        self.per_ip
            .admit(ip, settings.max_connections_per_ip)
            .ok_or(Reject::fixed(429, "too many connections from this address"))
    }
}

/// Connections per client address, shared with the [`IpSlot`]s that give them back.
#[derive(Default, Clone)]
struct PerIp(Rc<RefCell<HashMap<IpAddr, usize>>>);

impl PerIp {
    /// Takes a place for `ip`: `Some(None)` when there is no limit (nothing is counted),
    /// `None` when `ip` already holds `limit` connections.
    fn admit(&self, ip: IpAddr, limit: usize) -> Option<Option<IpSlot>> {
        if limit == 0 {
            return Some(None);
        }
        let mut counts = self.0.borrow_mut();
        let n = counts.entry(ip).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(Some(IpSlot {
            counts: self.clone(),
            ip,
        }))
    }
}

/// A connection's place in `max_connections_per_ip`, given back when it is dropped.
pub(crate) struct IpSlot {
    counts: PerIp,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.borrow_mut();
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_place_per_address_is_given_back_on_drop() {
        let per_ip = PerIp::default();
        let ip = IpAddr::from([10, 0, 0, 1]);
        let a = per_ip.admit(ip, 2).unwrap();
        let b = per_ip.admit(ip, 2).unwrap();
        assert!(per_ip.admit(ip, 2).is_none(), "a third is over the limit");
        assert!(per_ip.admit(IpAddr::from([10, 0, 0, 2]), 2).is_some());
        drop(a);
        let c = per_ip.admit(ip, 2).unwrap();
        drop((b, c));
        assert!(per_ip.0.borrow().is_empty(), "nothing left counted");
        assert!(
            matches!(per_ip.admit(ip, 0), Some(None)),
            "no limit, no count"
        );
    }
}
