//! One client connection as the worker holds it: the socket, the protocol [`Session`], and
//! the bookkeeping the loop needs (deadlines, addresses, flags).
//!
//! The protocol itself lives in `proto::Session`; this file only moves bytes between it and
//! the socket. A connection that failed (or was refused) is ended politely: its close frame or
//! HTTP error is flushed, our side is shut down (FIN), and input is discarded until the client
//! goes, so the answer is not lost to a TCP reset.
//!
//! A `wss://` connection's bytes pass through its TLS record layer (`tls.rs`) on the way in
//! and out; a plain one's go straight between the socket and the session.

use super::admission::IpSlot;
use super::moment::{Moment, Reading};
#[cfg(feature = "tls")]
use super::tls::{TlsConn, TlsFailure};
use crate::ConnId;
use crate::control::{ConnInfo, ConnStage};
use crate::handoff::Handed;
use crate::proto::session::SessionState;
use crate::proto::{Limits, Session, Stage};
use mio::net::TcpStream;
use std::any::Any;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

pub(crate) struct Conn {
    /// Its id for good, also in the workers it is handed to.
    pub id: ConnId,
    pub socket: TcpStream,
    pub session: Session,
    /// The client's address as hooks see it: the peer, or the address a trusted proxy
    /// forwarded (with port 0, as the proxy does not tell it).
    pub remote: SocketAddr,
    /// Request path and query of the upgrade; `None` is `/` (also until the upgrade
    /// completes), which most clients ask for and which then costs no allocation.
    path: Option<Box<str>>,
    /// Accepted at.
    pub since: Moment,
    /// Last time the client sent anything.
    pub last_input: Moment,
    /// Last keepalive Ping we sent.
    pub pinged_at: Option<Moment>,
    /// First seen closing (Close or HTTP error sent) by the sweep; dropped `close_timeout`
    /// after it.
    pub closing_since: Option<Moment>,
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
    /// The TLS record layer of a `wss://` connection.
    #[cfg(feature = "tls")]
    tls: Option<Box<TlsConn>>,
    /// What it carried, for `wsd connections`.
    pub traffic: Traffic,
    /// The subprotocol agreed at the upgrade.
    pub agreed: Agreed,
    /// What the app attached to it, and an agreed subprotocol outside the group's list; a
    /// connection with neither holds no allocation, only this pointer.
    pub extra: Option<Box<Extra>>,
}

/// The subprotocol agreed at the upgrade, in two bytes (which fit in the padding of
/// [`Conn`]): the usual case is one of the group's `subprotocols`, named by its place in that
/// list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Agreed(u16);

impl Agreed {
    /// No subprotocol.
    pub(crate) const NONE: Agreed = Agreed(u16::MAX);
    /// One outside the group's list (an `on_upgrade` hook picked it): its name is in
    /// [`Extra::protocol`].
    pub(crate) const OTHER: Agreed = Agreed(u16::MAX - 1);

    /// `subprotocols[i]`, if `i` fits.
    pub(crate) fn listed(i: usize) -> Option<Agreed> {
        u16::try_from(i)
            .ok()
            .filter(|&i| i < Agreed::OTHER.0)
            .map(Agreed)
    }

    /// Its name, given the group's list and the connection's [`Extra`].
    pub(crate) fn name<'a>(
        self,
        listed: &'a [String],
        extra: Option<&'a Extra>,
    ) -> Option<&'a str> {
        match self {
            Agreed::NONE => None,
            Agreed::OTHER => extra?.protocol.as_deref(),
            Agreed(i) => listed.get(usize::from(i)).map(String::as_str),
        }
    }
}

/// What a connection carries only when it has it.
#[derive(Default)]
pub(crate) struct Extra {
    /// The subprotocol, when it is not one of the group's (`Agreed::OTHER`).
    pub protocol: Option<Box<str>>,
    /// The app's typed state (`Context::state`), dropped after `on_close`.
    pub state: Option<Box<dyn Any>>,
    /// What the connection's signed token allows (`auth = "jwt"`).
    pub grant: Option<super::tokens::Grant>,
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

/// What a read from the client gave.
pub(crate) enum Received {
    /// Bytes came, and went to the session. `short`: the read did not fill the buffer, so
    /// the socket's queue is empty. `last`: nothing more will come (TLS close_notify): once
    /// the session's steps are done, the connection goes.
    Data { short: bool, last: bool },
    /// Nothing to read now.
    Nothing,
    /// The client has gone (end of stream, or TLS close_notify).
    Gone,
    /// Reading failed, or the client's TLS is broken.
    Failed(io::Error),
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
        id: ConnId,
        socket: TcpStream,
        peer: SocketAddr,
        ip_slot: Option<IpSlot>,
        #[cfg(feature = "tls")] tls: Option<Box<TlsConn>>,
        limits: Limits,
        max_header_bytes: usize,
    ) -> Conn {
        let session = Session::new(limits, max_header_bytes);
        Conn::with_session(
            id,
            socket,
            peer,
            ip_slot,
            #[cfg(feature = "tls")]
            tls,
            session,
        )
    }

    /// A connection with `session`, accepted now.
    fn with_session(
        id: ConnId,
        socket: TcpStream,
        peer: SocketAddr,
        ip_slot: Option<IpSlot>,
        #[cfg(feature = "tls")] tls: Option<Box<TlsConn>>,
        session: Session,
    ) -> Conn {
        let now = Moment::at(Instant::now());
        Conn {
            id,
            socket,
            session,
            remote: peer,
            path: None,
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
            #[cfg(feature = "tls")]
            tls,
            traffic: Traffic::default(),
            agreed: Agreed::NONE,
            extra: None,
        }
    }

    /// The connection as it travels to another worker, with its socket; `session` is what
    /// [`Session::hand_off`] took of it. The app's state (`extra.state`) stays here: the app
    /// gave its own account of it in `app`.
    pub(crate) fn into_handed(
        self,
        session: SessionState,
        listed: &[String],
        reach: (String, Option<String>, Vec<String>),
        app: Option<Vec<u8>>,
    ) -> (Handed, TcpStream) {
        let (from, user, topics) = reach;
        let age = self.since.elapsed(Reading::of(Instant::now()));
        let protocol = (self.agreed)
            .name(listed, self.extra.as_deref())
            .map(str::to_string);
        let t = &self.traffic;
        let handed = Handed {
            id: self.id,
            from,
            remote: self.remote,
            path: self.path().to_string(),
            age_ms: age.as_millis() as u64,
            traffic: [t.bytes_in, t.bytes_out, t.messages_in, t.messages_out],
            protocol,
            session,
            user,
            topics,
            grant: self.extra.and_then(|e| e.grant),
            app: app.map(Into::into),
        };
        (handed, self.socket)
    }

    /// A connection another worker handed over, open from the start: `handed` less its
    /// session, which is `session` now.
    pub(crate) fn adopted(
        id: ConnId,
        socket: TcpStream,
        ip_slot: Option<IpSlot>,
        session: Session,
        handed: &mut Handed,
        listed: &[String],
    ) -> Conn {
        let now = Instant::now();
        let since = now
            .checked_sub(Duration::from_millis(handed.age_ms))
            .unwrap_or(now);
        let [bytes_in, bytes_out, messages_in, messages_out] = handed.traffic;
        let protocol = handed.protocol.take();
        let agreed = match &protocol {
            None => Agreed::NONE,
            Some(name) => (listed.iter().position(|p| p == name))
                .and_then(Agreed::listed)
                .unwrap_or(Agreed::OTHER),
        };
        let extra = Extra {
            protocol: protocol.filter(|_| agreed == Agreed::OTHER).map(Into::into),
            state: None,
            grant: handed.grant.take(),
        };
        let has_extra = extra.protocol.is_some() || extra.grant.is_some();
        let mut conn = Conn::with_session(
            id,
            socket,
            handed.remote,
            ip_slot,
            #[cfg(feature = "tls")]
            None,
            session,
        );
        conn.since = Moment::at(since);
        conn.traffic = Traffic {
            bytes_in,
            bytes_out,
            messages_in,
            messages_out,
        };
        let path = std::mem::take(&mut handed.path);
        conn.opened(path, agreed, has_extra.then(|| Box::new(extra)));
        conn
    }

    /// A `wss://` connection: its TLS session does not travel.
    pub(crate) fn is_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.is_some() {
            return true;
        }
        false
    }

    /// Memory this connection holds beyond its fixed size: protocol state, TLS input and
    /// output waiting.
    pub(crate) fn footprint(&self) -> usize {
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            return self.session.footprint() + tls.footprint();
        }
        self.session.footprint()
    }

    /// Output waits, or the connection is ending (a flush is what finds that it has ended).
    pub(crate) fn wants_flush(&self) -> bool {
        #[cfg(feature = "tls")]
        if self.tls.as_ref().is_some_and(|t| t.has_output()) {
            return true;
        }
        self.session.wants_flush()
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

    /// Request path and query of the upgrade (`/` until it completes).
    pub(crate) fn path(&self) -> &str {
        self.path.as_deref().unwrap_or("/")
    }

    /// The upgrade completed: what it asked for and agreed on.
    pub(crate) fn opened(&mut self, path: String, agreed: Agreed, extra: Option<Box<Extra>>) {
        self.path = (path != "/").then(|| path.into_boxed_str());
        self.agreed = agreed;
        self.extra = extra;
    }

    /// This connection as a row of `wsd connections`, given the group's `subprotocols`; the
    /// master fills in `pid` and `worker`.
    pub(crate) fn info(&self, id: ConnId, now: Reading, listed: &[String]) -> ConnInfo {
        ConnInfo {
            id: id.to_string(),
            conn: String::new(),
            remote: self.remote.to_string(),
            path: self.path().to_owned(),
            age_secs: self.since.elapsed(now).as_millis() as f64 / 1000.0,
            bytes_in: self.traffic.bytes_in,
            bytes_out: self.traffic.bytes_out,
            messages_in: self.traffic.messages_in,
            messages_out: self.traffic.messages_out,
            send_queue: self.session.queued() as u64,
            state: self.state(),
            protocol: self
                .agreed
                .name(listed, self.extra.as_deref())
                .map(str::to_string),
            extensions: (self.session.deflate())
                .map(|d| d.agreed().response())
                .unwrap_or_default(),
            ..ConnInfo::default()
        }
    }

    /// Writes queued output; half-closes a failed connection once its answer is out.
    pub(crate) fn flush(&mut self) -> Flushed {
        match self.write_out() {
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
            let _ = self.write_out();
        }
    }

    /// Writes what the session has queued, sealed on a TLS connection. `Ok(true)`: all of it.
    pub(crate) fn write_out(&mut self) -> io::Result<bool> {
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            let ending = self.session.is_ending();
            return tls.write(&mut self.socket, &mut self.session, ending);
        }
        self.session.write_to(&mut self.socket)
    }

    /// Reads what the client sent into `buf` (empty, with room), hands it to the session
    /// (which leaves its steps in `steps`), and leaves `buf` empty. With `lend`, large
    /// payloads of a plain connection are views into `buf`.
    pub(crate) fn receive(
        &mut self,
        buf: &mut bytes::BytesMut,
        lend: bool,
        steps: &mut std::collections::VecDeque<crate::proto::Step>,
    ) -> Received {
        let room = buf.capacity();
        #[cfg(feature = "tls")]
        if let Some(tls) = &mut self.tls {
            let session = &mut self.session;
            let fd = self.socket.as_raw_fd();
            return match tls.read(fd, buf, |plain| session.read(plain, steps)) {
                Ok((0, _)) => Received::Gone,
                Ok((_, short)) => Received::Data {
                    short,
                    last: tls.peer_closed(),
                },
                Err(TlsFailure::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    Received::Nothing
                }
                Err(TlsFailure::Io(e)) => Received::Failed(e),
                Err(TlsFailure::Protocol {
                    plain_http: true, ..
                }) => {
                    // A client that forgot TLS gets a plain answer that says so.
                    self.tls = None;
                    self.session.reject(&crate::proto::handshake::Reject {
                        status: 400,
                        why: "this port speaks TLS: use https:// or wss://".into(),
                    });
                    Received::Data {
                        short: true,
                        last: false,
                    }
                }
                Err(TlsFailure::Protocol { error, .. }) => {
                    Received::Failed(io::Error::new(io::ErrorKind::InvalidData, error))
                }
            };
        }
        let read = loop {
            match crate::sys::recv_into(self.socket.as_raw_fd(), buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        };
        match read {
            Ok(0) => Received::Gone,
            Ok(n) => {
                // A failed connection's input is read only to be discarded.
                self.session.read_buffer(buf, lend, steps);
                Received::Data {
                    short: n < room,
                    last: false,
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Received::Nothing,
            Err(e) => Received::Failed(e),
        }
    }
}
