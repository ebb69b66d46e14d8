//! One client connection as the worker holds it: the socket, the protocol [`Session`], and
//! the bookkeeping the loop needs (deadlines, addresses, flags).
//!
//! The protocol itself lives in `proto::Session`; this file only moves bytes between it and
//! the socket. A connection that failed (or was refused) is ended politely: its close frame or
//! HTTP error is flushed, our side is shut down (FIN), and input is discarded until the client
//! goes, so the answer is not lost to a TCP reset.

use super::admission::IpSlot;
use crate::ConnId;
use crate::control::{ConnInfo, ConnStage};
use crate::proto::{Limits, Session, Stage};
use mio::net::TcpStream;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Instant;

pub(crate) struct Conn {
    pub serial: u32,
    pub socket: TcpStream,
    pub session: Session,
    /// The client's address as hooks see it: the peer, or the address a trusted proxy
    /// forwarded (with port 0, as the proxy does not tell it).
    pub remote: SocketAddr,
    /// Request path and query of the upgrade (`/` until it completes).
    pub path: String,
    /// Accepted at.
    pub since: Instant,
    /// Last time the client sent anything.
    pub last_input: Instant,
    /// Last keepalive Ping we sent.
    pub pinged_at: Option<Instant>,
    /// First seen closing (Close or HTTP error sent) by the sweep; dropped `close_timeout`
    /// after it.
    pub closing_since: Option<Instant>,
    /// Listed in the context's dirty list this turn (has output to flush; see `flush_dirty`).
    pub dirty: bool,
    /// Waiting in the loop's flush backlog (listed once however often it is sent to).
    pub backlogged: bool,
    /// Our side is shut down (failed connection, output all written).
    pub write_shut: bool,
    /// `on_buffer_full` fired and `on_buffer_drain` has not yet.
    pub buffer_full: bool,
    /// The client half-closed (or the socket failed): read until the end even after a short
    /// read, as no further readiness event will come.
    pub input_ended: bool,
    /// Not read while its send queue is over the high-water mark: a client that does not
    /// read gets no more replies (or Pongs) made for it until it does.
    pub reads_paused: bool,
    /// Its place in `max_connections_per_ip`, given back when the connection is dropped.
    ip_slot: Option<IpSlot>,
    /// What it carried, for `wsd connections`.
    pub traffic: Traffic,
}

/// Messages and their payload bytes one connection carried, counted where the worker counts
/// its totals (so the rows of `wsd connections` add up to `status`).
#[derive(Default)]
pub(crate) struct Traffic {
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
}

/// What became of a flush.
pub(crate) enum Flushed {
    /// Everything is written.
    All,
    /// The socket is full; wait for it to become writable.
    Partly,
    /// The connection is over: both closes done (or a failed connection's answer is out).
    Done,
    /// Writing failed (the client reset the connection, say).
    Failed(io::Error),
}

impl Conn {
    pub(crate) fn new(
        serial: u32,
        socket: TcpStream,
        peer: SocketAddr,
        ip_slot: Option<IpSlot>,
        limits: Limits,
        max_header_bytes: usize,
    ) -> Conn {
        let now = Instant::now();
        Conn {
            serial,
            socket,
            session: Session::new(limits, max_header_bytes),
            remote: peer,
            path: String::from("/"),
            since: now,
            last_input: now,
            pinged_at: None,
            closing_since: None,
            dirty: false,
            backlogged: false,
            write_shut: false,
            buffer_full: false,
            input_ended: false,
            reads_paused: false,
            ip_slot,
            traffic: Traffic::default(),
        }
    }

    /// It counts against `max_connections_per_ip` already.
    pub(crate) fn ip_counted(&self) -> bool {
        self.ip_slot.is_some()
    }

    /// Counts it against `max_connections_per_ip` (a client behind a trusted proxy, once its
    /// forwarded address is known).
    pub(crate) fn count_ip(&mut self, slot: Option<IpSlot>) {
        if slot.is_some() {
            self.ip_slot = slot;
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        self.session.is_open()
    }

    /// `handshake` until the upgrade, `open`, then `closing` from the moment either side sent
    /// Close (or the connection failed, or its upgrade was refused).
    pub(crate) fn state(&self) -> ConnStage {
        match self.session.stage() {
            Stage::Handshake => ConnStage::Handshake,
            Stage::Open => ConnStage::Open,
            Stage::Closing => ConnStage::Closing,
        }
    }

    /// This connection as a row of `wsd connections`; the master fills in `pid` and `worker`.
    pub(crate) fn info(&self, id: ConnId, now: Instant) -> ConnInfo {
        ConnInfo {
            id: id.to_string(),
            remote: self.remote.to_string(),
            path: self.path.clone(),
            age_secs: now.duration_since(self.since).as_millis() as f64 / 1000.0,
            bytes_in: self.traffic.bytes_in,
            bytes_out: self.traffic.bytes_out,
            messages_in: self.traffic.messages_in,
            messages_out: self.traffic.messages_out,
            send_queue: self.session.queued() as u64,
            state: self.state(),
            extensions: (self.session.deflate())
                .map(|d| d.agreed().response())
                .unwrap_or_default(),
            ..ConnInfo::default()
        }
    }

    /// Writes queued output; half-closes a failed connection once its answer is out.
    pub(crate) fn flush(&mut self) -> Flushed {
        match self.session.write_to(&mut self.socket) {
            Ok(false) => Flushed::Partly,
            Err(e) => Flushed::Failed(e),
            Ok(true) if self.session.finished() => Flushed::Done,
            Ok(true) => {
                if self.session.is_failed() && !self.write_shut {
                    self.write_shut = true;
                    if self.socket.shutdown(Shutdown::Write).is_err() {
                        return Flushed::Done;
                    }
                }
                Flushed::All
            }
        }
    }

    /// Writes now if a lot is queued, so a hook sending much to a fast reader is not held to
    /// `max_send_buffer` by the end-of-turn flush. Errors surface at that flush.
    pub(crate) fn write_early(&mut self, threshold: usize) {
        if self.session.queued() >= threshold {
            let _ = self.session.write_to(&mut self.socket);
        }
    }

    /// Reads into the free room of `buf`: `Ok(0)` means the client has gone.
    pub(crate) fn read(&mut self, buf: &mut bytes::BytesMut) -> io::Result<usize> {
        loop {
            match crate::sys::recv_into(self.socket.as_raw_fd(), buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => return other,
            }
        }
    }
}
