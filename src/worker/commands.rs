//! What the worker does with the master's commands (stop, list the connections, reopen the
//! log), and the counters it reports back every tick and on its way out.
//!
//! `channel.rs` carries the lines and descriptors; this file gives them their meaning.

use super::event_loop::Loop;
use super::moment::Reading;
use crate::control::{FromWorker, StopMode, ToWorker};
use crate::sys;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

impl Loop {
    /// The channel became writable (lines waiting go out) or readable (commands came in, or
    /// the master has gone: then the worker stops, closing its clients at once).
    pub(super) fn channel_ready(&mut self, readable: bool, writable: bool) {
        if writable {
            self.channel.flush();
        }
        if readable && !self.read_channel() && !self.hand_back() {
            log::warn!("master channel closed; stopping");
            self.stop(StopMode::Close, Duration::ZERO);
        }
    }

    /// Reads commands from the master. False when the master has gone.
    fn read_channel(&mut self) -> bool {
        let (commands, open) = self.channel.read();
        for (command, fd) in commands {
            match command {
                ToWorker::Stop { mode, spread_ms } => {
                    self.stop(mode, Duration::from_millis(spread_ms))
                }
                ToWorker::ListConnections { query } => self.list_connections(query),
                ToWorker::ReopenLogs => reopen_logs(fd),
                ToWorker::Certificate { chain, key } => self.renew_certificate(&chain, &key.0),
                ToWorker::Bridge(peer) => self.add_bridge(peer, fd),
                ToWorker::HandOff {
                    spread_ms,
                    drain_ms,
                    to,
                    returnable,
                } => {
                    let spread = Duration::from_millis(spread_ms);
                    let drain = Duration::from_millis(drain_ms);
                    self.hand_off_and_stop(to, fd, returnable, (spread, drain))
                }
                ToWorker::Adopt {
                    from,
                    returnable,
                    protocol,
                } => self.adopt_from(from, fd, returnable, protocol),
                ToWorker::Commit => self.commit_upgrade(),
                ToWorker::Hold => {
                    self.ctx.bus.hold_all();
                    self.channel.answer(&crate::control::FromWorker::Holding);
                }
                ToWorker::Resume { view } => self.ctx.resume_group(view),
                ToWorker::View { view } => self.ctx.bus.set_view(view),
            }
        }
        open
    }

    /// A bridge to a worker of another group, just forked (`bus::bridges`).
    fn add_bridge(&mut self, peer: crate::bus::bridges::Peer, fd: Option<OwnedFd>) {
        let Some(end) = fd else {
            log::warn!("the master sent a bridge without its descriptor");
            return;
        };
        if let Err(e) = self.bridges.add(peer, end, self.poll.registry()) {
            log::warn!("cannot take a bridge: {e}");
        }
    }

    /// Every connection in the slab, handshaking and closing ones included.
    fn list_connections(&mut self, query: u64) {
        let now = Reading::of(Instant::now());
        let origin = self.ctx.bus.origin;
        let rows = self.ctx.conns.iter().map(|(_, c)| {
            let mut row = c.info(c.id, now, &self.ctx.subprotocols);
            let (host, slot) = (origin.host, origin.slot);
            row.conn = crate::GlobalId {
                host,
                slot,
                conn: c.id,
            }
            .to_string();
            row
        });
        self.channel.answer_connections(query, rows);
    }

    /// Sends the master the worker's counters: at start, every tick, and on the way out.
    pub(super) fn report(&mut self) {
        self.refresh_counters();
        self.channel
            .report(&FromWorker::Report(Box::new(self.ctx.counters.clone())));
    }

    /// Brings the counters that are read rather than counted up to date.
    pub(super) fn refresh_counters(&mut self) {
        self.ctx.counters.timers = self.ctx.timers.len() as u64;
        self.ctx.counters.memory = sys::rss_bytes();
        self.ctx.counters.send_queue = self
            .ctx
            .conns
            .iter()
            .map(|(_, c)| c.session.queued() as u64)
            .sum();
        let bus = self.ctx.bus.totals();
        self.ctx.counters.bus_sent = bus.sent;
        self.ctx.counters.bus_received = bus.received;
        self.ctx.counters.bus_dropped = bus.dropped;
        self.ctx.counters.bus_state = self.ctx.bus.state();
        self.ctx.counters.topics = self.ctx.topics.len() as u64;
        self.ctx.counters.routed_topics = self.ctx.bus.routed_topics() as u64;
    }
}

impl Loop {
    /// Serves new connections with a renewed certificate; open ones keep theirs.
    #[cfg(feature = "tls")]
    fn renew_certificate(&mut self, chain: &str, key: &str) {
        match crate::tls::Identity::from_pem(chain, key) {
            Ok(id) => {
                log::info!("certificate renewed (serial {})", id.serial());
                self.settings.tls = Some(id);
            }
            Err(e) => log::error!("renewed certificate not usable, keeping the old one: {e}"),
        }
    }

    #[cfg(not(feature = "tls"))]
    fn renew_certificate(&mut self, _: &str, _: &str) {
        log::error!("a certificate came, but this build has no TLS");
    }
}

/// Points stdout and stderr (where the log goes) at the log file the master reopened; the
/// worker may no longer have the right to open it itself. Our copy of the descriptor is
/// closed once duplicated.
fn reopen_logs(fd: Option<OwnedFd>) {
    let Some(fd) = fd else {
        log::warn!("reopen_logs came without a descriptor; logging on to the old file");
        return;
    };
    match sys::redirect_output(fd.as_raw_fd()) {
        Ok(()) => log::info!("reopened log file"),
        Err(e) => log::warn!("cannot reopen log file: {e}"),
    }
}
