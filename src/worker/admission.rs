//! Who may connect, and when: the listener's pause when descriptors run out,
//! `max_connections_per_ip` (counted at accept or, behind a trusted proxy, once the forwarded
//! client address is known at the upgrade), and `allowed_origins`.
//!
//! The accept and the upgrade in `event_loop.rs` ask here and act on the answer: the data
//! path stays a straight line there, and the policy and its bookkeeping live here.

use super::event_loop::Loop;
use crate::proto::handshake::{self, Reject, Request};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

impl Loop {
    /// What an `accept` that gave no client means for draining the listener: `Break` to stop
    /// until it is readable again (or, out of descriptors, until the retry), `Continue` to
    /// try again at once.
    pub(super) fn accept_error(&mut self, e: io::Error) -> ControlFlow<()> {
        match e {
            e if e.kind() == io::ErrorKind::WouldBlock => {
                self.accept_paused = false;
                ControlFlow::Break(())
            }
            e if matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            ) =>
            {
                // Out of descriptors: the pending client stays queued; retry shortly
                // instead of spinning on a listener that stays readable.
                // Logged once per episode, not on every retry.
                if !self.accept_paused {
                    log::warn!("accept: {e}; pausing accepts, retrying every 100 ms");
                }
                self.accept_paused = true;
                self.accept_retry_at = Some(Instant::now() + Duration::from_millis(100));
                ControlFlow::Break(())
            }
            e if matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
            ) =>
            {
                ControlFlow::Continue(())
            }
            e => {
                log::warn!("accept: {e}");
                ControlFlow::Break(())
            }
        }
    }

    /// Counts a new peer against `max_connections_per_ip`. `Ok(Some(ip))`: counted;
    /// `Ok(None)`: not counted (no limit, or a trusted proxy whose clients are counted once
    /// their forwarded address is known); `Err`: over the limit.
    pub(super) fn admit_peer(&mut self, peer: SocketAddr) -> Result<Option<IpAddr>, ()> {
        let ip = peer.ip();
        if self
            .settings
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&ip))
        {
            return Ok(None);
        }
        self.admit_ip(ip)
    }

    fn admit_ip(&mut self, ip: IpAddr) -> Result<Option<IpAddr>, ()> {
        let limit = self.settings.max_connections_per_ip;
        if limit == 0 {
            return Ok(None);
        }
        let n = self.per_ip.entry(ip).or_insert(0);
        if *n >= limit {
            return Err(());
        }
        *n += 1;
        Ok(Some(ip))
    }

    /// What stands between a valid upgrade request and its `101`: an origin not allowed, or
    /// (behind a trusted proxy, where the client is counted only now that its forwarded
    /// address `ip` is known) one connection too many from that address. `None`: go ahead.
    pub(super) fn refuse_upgrade(
        &mut self,
        idx: usize,
        peer: IpAddr,
        ip: IpAddr,
        request: &Request,
    ) -> Option<Reject> {
        if !handshake::origin_allowed(request.origin.as_deref(), &self.settings.allowed_origins) {
            return Some(Reject {
                status: 403,
                why: "origin not allowed",
            });
        }
        if self.ctx.conns[idx].counted_ip.is_none() && ip != peer {
            // Through a trusted proxy: count the forwarded client now.
            match self.admit_ip(ip) {
                Ok(counted) => self.ctx.conns[idx].counted_ip = counted,
                Err(()) => {
                    return Some(Reject {
                        status: 429,
                        why: "too many connections from this address",
                    });
                }
            }
        }
        None
    }
}

/// Gives back a connection's place in `max_connections_per_ip`.
pub(super) fn release_ip(per_ip: &mut HashMap<IpAddr, usize>, ip: Option<IpAddr>) {
    if let Some(ip) = ip
        && let Some(n) = per_ip.get_mut(&ip)
    {
        *n -= 1;
        if *n == 0 {
            per_ip.remove(&ip);
        }
    }
}
