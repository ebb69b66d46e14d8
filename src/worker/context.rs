//! [`Context`]: what a hook holds while it runs — the worker's connections and timers.
//!
//! Hooks never own a connection; they name it by [`ConnId`] and the context looks it up. Sends
//! are queued in the connection's write buffer and flushed once per event-loop turn, so a hook
//! that answers many messages costs one write syscall, not one per message. Connections that end
//! during a hook are only marked; the loop removes them and calls `on_close` after the hook, so
//! hooks never re-enter each other.

use super::conn::{Agreed, Conn, Extra};
use super::errors::SendError;
use super::timers::{TimerId, Timers};
use super::topics::Topics;
use crate::bus::Bus;
use crate::config::SendBufferPolicy;
use crate::control::Counters;
use crate::proto::deflate::{self, Codec, Route, SharedCodec};
use crate::proto::{Session, close, frame};
use crate::{ConnId, Message};
use bytes::Bytes;
use slab::Slab;
use std::net::SocketAddr;
use std::time::Duration;

/// Queued bytes past which a send writes to the socket at once instead of at the end of turn.
const WRITE_EARLY: usize = 64 << 10;

/// The send-queue mark where `on_buffer_full` fires and the worker stops reading the client
/// until the queue drains: half of `max_send_buffer`, so an app that pauses there loses nothing.
pub(crate) fn high_water(max_send_buffer: usize) -> usize {
    max_send_buffer / 2
}

/// A connection's send queue crossed a mark; the loop tells the app after the current hook.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BufferNotice {
    Full(ConnId),
}

/// The worker as hooks see it. Passed as `&mut Context` to every hook and timer.
pub struct Context {
    pub(crate) worker_id: usize,
    pub(crate) worker_name: String,
    pub(crate) conns: Slab<Conn>,
    pub(crate) timers: Timers,
    pub(crate) counters: Counters,
    /// Connections with output waiting for the end-of-turn flush.
    pub(crate) dirty: Vec<usize>,
    /// Connections that ended and await removal (slab index, id).
    pub(crate) gone: Vec<(usize, ConnId)>,
    /// Where connections handed over by another worker are kept, when not at the index
    /// their id names ([`Context::index_of`]).
    moved: std::collections::HashMap<ConnId, usize>,
    /// `on_buffer_full` calls owed to the app.
    pub(crate) notices: Vec<BufferNotice>,
    pub(crate) max_send_buffer: usize,
    pub(crate) send_buffer_policy: SendBufferPolicy,
    /// This worker's side of the group's bus.
    pub(crate) bus: Bus,
    pub(crate) topics: Topics,
    /// Which user each connection is bound to: a user is the set of its connections, the same
    /// table as a topic's subscribers.
    pub(crate) users: Topics,
    /// Which topics keep presence, and whether joins and leaves are announced.
    pub(crate) presence: super::presence::PresencePolicy,
    /// Questions for other workers or Redis that this turn's hooks asked (`ask_presence`,
    /// `user_connections`, `is_online`), started after the hooks.
    pub(crate) asks: Vec<super::gather::Pending>,
    /// The handler's timers that came due (`app = "exec"`), by its names for them.
    pub(crate) handler_timers: Vec<String>,
    /// The group's `subprotocols`, which connections name by place ([`Agreed`]).
    pub(crate) subprotocols: Vec<String>,
    /// The connection `on_close` is being told about: gone from `conns`, what it carried kept
    /// until the hook has returned.
    pub(crate) leaving: Option<Leaving>,
    // permessage-deflate
    /// The worker's compression state, if the group has compression on.
    pub(crate) deflate: Option<SharedCodec>,
}

/// What a connection that is gone carried, while `on_close` runs.
pub(crate) struct Leaving {
    pub id: ConnId,
    pub agreed: Agreed,
    pub extra: Option<Box<Extra>>,
}

impl Context {
    pub(crate) fn new(
        worker_id: usize,
        settings: &crate::config::GroupConfig,
        bus: Bus,
    ) -> Context {
        Context {
            worker_id,
            worker_name: settings.name().to_string(),
            conns: Slab::new(),
            timers: Timers::default(),
            counters: Counters::default(),
            dirty: Vec::new(),
            gone: Vec::new(),
            moved: std::collections::HashMap::new(),
            notices: Vec::new(),
            max_send_buffer: settings.max_send_buffer,
            send_buffer_policy: settings.send_buffer_policy,
            bus,
            topics: Topics::default(),
            users: Topics::default(),
            presence: super::presence::PresencePolicy {
                topics: settings.presence.clone(),
                events: settings.presence_events,
            },
            asks: Vec::new(),
            handler_timers: Vec::new(),
            subprotocols: settings.subprotocols.clone(),
            leaving: None,
            // permessage-deflate
            deflate: deflate::Settings::of(settings).map(Codec::new),
        }
    }

    /// This worker's slot in its group: 0..count (Workerman's `$worker->id`).
    pub fn worker_id(&self) -> usize {
        self.worker_id
    }

    /// The group's name.
    pub fn worker_name(&self) -> &str {
        &self.worker_name
    }

    /// Queues `msg` for `conn`. It is written at the end of this event-loop turn.
    ///
    /// Fails if the connection is gone or closing, or if the message does not fit in its
    /// `max_send_buffer` (then `send_buffer_policy` applies: the message is dropped, or the
    /// connection is closed with 1008).
    pub fn send(&mut self, conn: ConnId, msg: impl Into<Message>) -> Result<(), SendError> {
        let (opcode, payload) = msg.into().into_parts();
        // Admitted at its plain size: it is compressed (if at all) once it is sure to be sent.
        let (wire, len) = (frame::frame_len(payload.len()), payload.len());
        self.enqueue(conn, wire, len, |q| q.push_message(opcode, payload))
    }

    /// Sends `msg` to every open connection of **this worker** (Workerman's loop over
    /// `$worker->connections`); returns how many got it queued. See [`Context::broadcast`]
    /// for every worker.
    pub fn broadcast_local(&mut self, msg: impl Into<Message>) -> usize {
        let ids = self.connections();
        self.send_many(ids, msg.into())
    }

    /// Sends one message to many connections. Each encoding of the frame is made once, when
    /// a recipient first needs it, and shared by every queue that takes it: plain, and (with
    /// permessage-deflate) compressed without context takeover, once per server window in use
    /// (the group's one unless a client asked for less). Only connections with context
    /// takeover (`compression = "dedicated"`) get a compression of their own each.
    pub(crate) fn send_many(&mut self, ids: Vec<ConnId>, msg: Message) -> usize {
        let (opcode, payload) = msg.into_parts();
        let len = payload.len();
        let mut plain: Option<Bytes> = None;
        let mut alone: Vec<(u8, Bytes)> = Vec::new();
        let mut sent = 0;
        for id in ids {
            let route = match (&self.deflate, self.conn(id)) {
                (Some(_), Some(c)) => c.session.route(len),
                _ => Route::Plain,
            };
            if let Route::Alone(bits) = route
                && !alone.iter().any(|(b, _)| *b == bits)
            {
                let e = self
                    .encode_alone(opcode, bits, &payload)
                    .unwrap_or_else(|| {
                        (plain.get_or_insert_with(|| frame::encode(opcode, &payload))).clone()
                    });
                alone.push((bits, e));
            }
            let encoded = match route {
                Route::Own => {
                    let own = payload.clone();
                    let wire = frame::frame_len(len);
                    sent += self
                        .enqueue(id, wire, len, |q| q.push_message(opcode, own))
                        .is_ok() as usize;
                    continue;
                }
                Route::Plain => &*plain.get_or_insert_with(|| frame::encode(opcode, &payload)),
                Route::Alone(bits) => match alone.iter().find(|(b, _)| *b == bits) {
                    Some((_, e)) => e,
                    None => unreachable!("encoded just above"),
                },
            };
            sent += self
                .enqueue(id, encoded.len(), len, |q| q.push_encoded(encoded))
                .is_ok() as usize;
        }
        sent
    }

    /// A whole compressed frame of `payload`, compressed on its own with the worker's
    /// compressor for `bits`; `None` if the compressor failed.
    fn encode_alone(&self, opcode: u8, bits: u8, payload: &[u8]) -> Option<Bytes> {
        let mut frame = None;
        let codec = self.deflate.as_ref()?;
        codec.borrow_mut().compress_alone(bits, payload, |body| {
            let mut out = Vec::with_capacity(frame::frame_len(body.len()));
            frame::put_header(&mut out, opcode | frame::RSV1, body.len());
            out.extend_from_slice(body);
            frame = Some(Bytes::from(out));
        });
        frame
    }

    /// Bytes queued for `conn` and not yet taken by its socket.
    pub fn buffered_amount(&self, conn: ConnId) -> Option<usize> {
        self.conn(conn).map(|c| c.session.queued())
    }

    /// Ids of this worker's open connections (Workerman's `$worker->connections`).
    pub fn connections(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.session.can_send())
            .map(|(_, c)| c.id)
            .collect()
    }

    /// Number of open connections of this worker.
    pub fn connection_count(&self) -> usize {
        self.counters.connections as usize
    }

    /// Closes `conn` with 1000 (normal closure).
    pub fn close(&mut self, conn: ConnId) {
        self.close_with(conn, close::NORMAL, "");
    }

    /// Closes `conn` with the given close code and reason. `on_close` follows once it is gone.
    ///
    /// `code` must be one a peer may send (1000–1003, 1007–1014, 3000–4999; see
    /// [`crate::close`]). Any other is logged and sent as 1011, since the app erred.
    pub fn close_with(&mut self, conn: ConnId, code: u16, reason: &str) {
        let code = if close::allowed(code) {
            code
        } else {
            log::warn!("close code {code} may not be sent; closing connection {conn} with 1011");
            close::INTERNAL_ERROR
        };
        let Some(c) = self.conn_mut(conn) else { return };
        if c.session.close_sent() {
            return;
        }
        let closed = c.session.close(code, reason);
        let Some(idx) = self.index_of(conn) else {
            return;
        };
        if closed {
            self.mark_dirty(idx)
        } else {
            self.mark_gone(idx)
        }
    }

    /// The client's address.
    pub fn remote_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conn(conn).map(|c| c.remote)
    }

    /// The path (and query) the client asked for in its upgrade request.
    pub fn path(&self, conn: ConnId) -> Option<&str> {
        self.conn(conn).map(|c| c.path())
    }

    /// The subprotocol agreed with `conn` at its upgrade (`Sec-WebSocket-Protocol`), if any:
    /// wsd's choice from the group's `subprotocols`, or the one `on_upgrade` picked. Still
    /// known in `on_close`.
    pub fn protocol(&self, conn: ConnId) -> Option<&str> {
        let (agreed, extra) = self.carried(conn)?;
        agreed.name(&self.subprotocols, extra)
    }

    /// The state of `conn` if it holds a `T`: the one [`Decision::with_state`] or
    /// [`Context::set_state`] gave it. `None` if the connection is gone, has no state, or
    /// holds another type. Still there in `on_close`; dropped after it.
    ///
    /// [`Decision::with_state`]: crate::Decision::with_state
    pub fn state<T: 'static>(&self, conn: ConnId) -> Option<&T> {
        let (_, extra) = self.carried(conn)?;
        extra?.state.as_ref()?.downcast_ref()
    }

    /// The state of `conn`, to change in place, if it holds a `T`.
    pub fn state_mut<T: 'static>(&mut self, conn: ConnId) -> Option<&mut T> {
        self.extra_slot(conn)?
            .as_mut()?
            .state
            .as_mut()?
            .downcast_mut()
    }

    /// Gives `conn` its state, replacing (and dropping) any it had, of whatever type. False,
    /// and `value` dropped, if there is no such connection. The state is dropped after the
    /// connection's `on_close`.
    pub fn set_state<T: 'static>(&mut self, conn: ConnId, value: T) -> bool {
        let Some(slot) = self.extra_slot(conn) else {
            return false;
        };
        slot.get_or_insert_with(Box::default).state = Some(Box::new(value));
        true
    }

    /// What `id` carries: from the connection, or from the one `on_close` is being told about.
    pub(crate) fn carried(&self, id: ConnId) -> Option<(Agreed, Option<&Extra>)> {
        match (self.conn(id), &self.leaving) {
            (Some(c), _) => Some((c.agreed, c.extra.as_deref())),
            (None, Some(l)) if l.id == id => Some((l.agreed, l.extra.as_deref())),
            _ => None,
        }
    }

    fn extra_slot(&mut self, id: ConnId) -> Option<&mut Option<Box<Extra>>> {
        if self.conn(id).is_some() {
            return self.conn_mut(id).map(|c| &mut c.extra);
        }
        self.leaving
            .as_mut()
            .filter(|l| l.id == id)
            .map(|l| &mut l.extra)
    }

    /// Calls `f` every `every`, first after one interval (Workerman's `Timer::add`).
    pub fn add_timer(&mut self, every: Duration, f: impl FnMut(&mut Context) + 'static) -> TimerId {
        self.timers.add(every, Some(every), Box::new(f))
    }

    /// Calls `f` once after `after` (Workerman's `Timer::add(..., false)`).
    pub fn add_timer_once(
        &mut self,
        after: Duration,
        f: impl FnMut(&mut Context) + 'static,
    ) -> TimerId {
        self.timers.add(after, None, Box::new(f))
    }

    /// Cancels a timer (Workerman's `Timer::del`). False if it had already gone.
    pub fn del_timer(&mut self, id: TimerId) -> bool {
        self.timers.del(id)
    }

    /// Number of live timers.
    pub fn timer_count(&self) -> usize {
        self.timers.len()
    }

    /// `id` names an open connection of this worker (upgraded, not closing).
    pub(crate) fn is_open(&self, id: ConnId) -> bool {
        self.conn(id).is_some_and(|c| c.session.can_send())
    }

    /// Where connection `id` is kept, if it is still this worker's: at the index its id
    /// names, or, for one another worker handed over, wherever it was put here.
    pub(crate) fn index_of(&self, id: ConnId) -> Option<usize> {
        let idx = id.idx as usize;
        if self.conns.get(idx).is_some_and(|c| c.id == id) {
            return Some(idx);
        }
        if self.moved.is_empty() {
            return None;
        }
        self.moved.get(&id).copied()
    }

    /// Connection `id`, if it is still this worker's.
    pub(crate) fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.index_of(id).and_then(|idx| self.conns.get(idx))
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        let idx = self.index_of(id)?;
        self.conns.get_mut(idx)
    }

    /// The id for a connection accepted now, with `serial`: it names the index it will get.
    pub(crate) fn next_id(&self, serial: u64) -> ConnId {
        ConnId {
            serial,
            idx: self.conns.vacant_key() as u32,
        }
    }

    /// Keeps `conn` (accepted, with an id from [`Context::next_id`], or handed over with the
    /// id it had) in the slab; returns its index.
    pub(crate) fn insert_conn(&mut self, conn: Conn) -> usize {
        let idx = self.conns.vacant_key();
        if conn.id.idx as usize != idx {
            self.moved.insert(conn.id, idx);
        }
        self.conns.insert(conn)
    }

    /// Lets go of the room the connections took, once none is left (all handed over).
    pub(crate) fn shrink(&mut self) {
        if self.conns.is_empty() {
            self.conns = Slab::new();
        }
        self.moved.shrink_to_fit();
        self.dirty.shrink_to_fit();
        self.gone.shrink_to_fit();
    }

    /// Takes connection `idx` out of the slab.
    pub(crate) fn remove_conn(&mut self, idx: usize) -> Conn {
        let conn = self.conns.remove(idx);
        if !self.moved.is_empty() {
            self.moved.remove(&conn.id);
        }
        conn
    }

    /// Admits `wire` bytes into `id`'s queue (or applies the send-buffer policy) and counts.
    fn enqueue(
        &mut self,
        id: ConnId,
        wire: usize,
        payload: usize,
        push: impl FnOnce(&mut Session),
    ) -> Result<(), SendError> {
        let (limit, policy) = (self.max_send_buffer, self.send_buffer_policy);
        let idx = self.index_of(id).ok_or(SendError::NoConnection)?;
        let c = &mut self.conns[idx];
        if !c.session.is_open() {
            return Err(SendError::NoConnection);
        }
        if c.session.close_sent() {
            self.counters.send_fail += 1;
            return Err(SendError::Closing);
        }
        let queued = c.session.queued();
        if queued > 0 && queued + wire > limit {
            let newly_full = !std::mem::replace(&mut c.buffer_full, true);
            self.counters.send_fail += 1;
            if newly_full {
                self.counters.buffer_full += 1;
                self.notices.push(BufferNotice::Full(id));
            }
            if policy == SendBufferPolicy::Close {
                self.close_with(id, close::POLICY_VIOLATION, "send buffer full");
            }
            return Err(SendError::BufferFull);
        }
        push(&mut c.session);
        c.traffic.messages_out += 1;
        c.traffic.bytes_out += payload as u64;
        c.write_early(WRITE_EARLY);
        let newly_full = !c.buffer_full && c.session.queued() >= high_water(limit);
        if newly_full {
            c.buffer_full = true;
            self.counters.buffer_full += 1;
            self.notices.push(BufferNotice::Full(id));
        }
        self.counters.messages_out += 1;
        self.counters.bytes_out += payload as u64;
        self.mark_dirty(idx);
        Ok(())
    }

    pub(crate) fn mark_dirty(&mut self, idx: usize) {
        if let Some(c) = self.conns.get_mut(idx)
            && !c.dirty
        {
            c.dirty = true;
            self.dirty.push(idx);
        }
    }

    pub(crate) fn mark_gone(&mut self, idx: usize) {
        if let Some(c) = self.conns.get(idx) {
            self.gone.push((idx, c.id));
        }
    }

    // permessage-deflate
    /// Agrees on permessage-deflate for connection `idx`, which is upgrading, from its
    /// request's `offers`, if the group has compression on: its session uses it from now on,
    /// and the result is the `Sec-WebSocket-Extensions` answer. Declined offers are logged.
    pub(crate) fn agree_deflate(&mut self, idx: usize, offers: &[String]) -> Option<String> {
        let codec = self.deflate.as_ref()?;
        let conn = self.conns.get_mut(idx)?;
        match deflate::negotiate(codec, offers) {
            Ok(stream) => {
                let answer = stream.agreed().response();
                conn.session.use_deflate(stream);
                Some(answer)
            }
            Err(declined) => {
                if !declined.is_empty() {
                    let why: Vec<String> = declined.iter().map(|d| d.to_string()).collect();
                    log::debug!(
                        "connection from {}: permessage-deflate declined: {}",
                        conn.remote,
                        why.join("; ")
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::wire::Origin;
    use crate::config::{Compression, GroupConfig, Listen};
    use crate::proto::frame::RSV1;
    use crate::proto::{Limits, Step};
    use std::collections::VecDeque;
    use std::net::TcpListener;

    /// A worker's context with compression in `mode`, and an open connection for each offer
    /// (`None`: the client offered nothing), over real loopback sockets.
    fn context_with(mode: Compression, offers: &[Option<&str>]) -> (Context, Vec<ConnId>) {
        let mut group = GroupConfig::new(Listen::parse("127.0.0.1:0").unwrap());
        group.compression = mode;
        let mut ctx = Context::new(0, &group, Bus::new(Origin { host: 0, slot: 0 }, Vec::new()));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut ids = Vec::new();
        for (serial, offer) in offers.iter().enumerate() {
            let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, peer) = listener.accept().unwrap();
            let limits = Limits {
                max_frame: 1 << 20,
                max_message: 1 << 20,
            };
            let socket = mio::net::TcpStream::from_std(server);
            let id = ctx.next_id(serial as u64 + 1);
            let mut conn = Conn::new(
                id,
                socket,
                peer,
                None,
                #[cfg(feature = "tls")]
                None,
                limits,
                8192,
            );
            let ext = offer.map_or(String::new(), |o| {
                format!("Sec-WebSocket-Extensions: {o}\r\n")
            });
            let request = format!(
                "GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
            );
            let mut steps = VecDeque::new();
            let mut buf = bytes::BytesMut::from(request.as_bytes());
            conn.session.read_buffer(&mut buf, false, &mut steps);
            let Some(Step::Request(req)) = steps.pop_front() else {
                panic!("no request")
            };
            let idx = ctx.insert_conn(conn);
            let answer = crate::proto::handshake::Answer {
                extensions: ctx.agree_deflate(idx, &req.extensions),
                ..Default::default()
            };
            let conn = &mut ctx.conns[idx];
            conn.session.accept(&req, &answer, &mut steps);
            let mut response = Vec::new();
            assert!(conn.session.write_to(&mut response).unwrap());
            let response = String::from_utf8(response).unwrap();
            let agreed = offer.is_some_and(|o| o.starts_with("permessage-deflate"))
                && mode != Compression::Off;
            assert_eq!(
                response.contains("Sec-WebSocket-Extensions: permessage-deflate"),
                agreed,
                "{response}"
            );
            // `wsd connections` shows what was agreed.
            let shown = conn
                .info(
                    id,
                    crate::worker::moment::Reading::of(std::time::Instant::now()),
                    &[],
                )
                .extensions;
            assert_eq!(shown, answer.extensions.clone().unwrap_or_default());
            ids.push(id);
        }
        (ctx, ids)
    }

    /// The first byte and payload of the one frame queued for `id`.
    fn queued_frame(ctx: &mut Context, id: ConnId) -> (u8, Vec<u8>) {
        let mut out = Vec::new();
        let conn = ctx.conn_mut(id).unwrap();
        assert!(conn.session.write_to(&mut out).unwrap());
        let (head, len) = match out[1] {
            126 => (4, u16::from_be_bytes([out[2], out[3]]) as usize),
            127 => (
                10,
                u64::from_be_bytes(out[2..10].try_into().unwrap()) as usize,
            ),
            n => (2, n as usize),
        };
        assert_eq!(out.len(), head + len, "one frame");
        (out[0], out[head..].to_vec())
    }

    fn inflate(body: &[u8]) -> Vec<u8> {
        let mut input = body.to_vec();
        input.extend_from_slice(&[0, 0, 0xff, 0xff]);
        let mut out = Vec::with_capacity(1 << 20);
        flate2::Decompress::new(false)
            .decompress_vec(&input, &mut out, flate2::FlushDecompress::Sync)
            .unwrap();
        out
    }

    fn compressions(ctx: &Context) -> u64 {
        ctx.deflate.as_ref().unwrap().borrow().compressed()
    }

    /// Shared mode: a broadcast is compressed once for every client that agreed to
    /// permessage-deflate (whatever it offered) and encoded plain once for the rest.
    #[test]
    fn a_shared_broadcast_is_compressed_once_for_all() {
        let offers = [
            Some("permessage-deflate"),
            None,
            Some("permessage-deflate; client_max_window_bits"),
            Some("permessage-deflate; client_no_context_takeover; server_no_context_takeover"),
            Some("x-unknown"),
        ];
        let (mut ctx, ids) = context_with(Compression::Shared, &offers);
        let text = "the same news for everyone ".repeat(100);
        assert_eq!(ctx.send_many(ids.clone(), Message::from(text.as_str())), 5);
        assert_eq!(compressions(&ctx), 1, "one compression for three clients");
        let frames: Vec<_> = ids.iter().map(|&id| queued_frame(&mut ctx, id)).collect();
        for (i, (first, body)) in frames.iter().enumerate() {
            if offers[i].is_some_and(|o| o.starts_with("permessage")) {
                assert_eq!(*first, 0x80 | RSV1 | frame::TEXT, "client {i}: compressed");
                assert_eq!(body, &frames[0].1, "client {i}: the same bytes");
                assert_eq!(inflate(body), text.as_bytes());
            } else {
                assert_eq!(*first, 0x81, "client {i}: plain");
                assert_eq!(body, text.as_bytes());
            }
        }
        // Under compression_min_size nothing is compressed.
        assert_eq!(ctx.send_many(ids.clone(), Message::from("short")), 5);
        assert_eq!(compressions(&ctx), 1);
    }

    /// Dedicated mode: every context-takeover client's window differs, so each gets its own
    /// compression; a client that asked for no server takeover shares the worker's.
    #[test]
    fn a_dedicated_broadcast_is_compressed_per_takeover_connection() {
        let offers = [
            Some("permessage-deflate"),
            Some("permessage-deflate; client_max_window_bits"),
            Some("permessage-deflate; server_no_context_takeover"),
            Some("permessage-deflate; server_no_context_takeover; client_max_window_bits"),
            None,
        ];
        let (mut ctx, ids) = context_with(Compression::Dedicated, &offers);
        let text = "the same news for everyone ".repeat(100);
        assert_eq!(ctx.send_many(ids.clone(), Message::from(text.as_str())), 5);
        assert_eq!(
            compressions(&ctx),
            3,
            "two takeover clients, one shared encoding"
        );
        for (i, &id) in ids.iter().enumerate() {
            let (first, body) = queued_frame(&mut ctx, id);
            let compressed = first & RSV1 != 0;
            assert_eq!(compressed, offers[i].is_some(), "client {i}");
            if compressed {
                assert_eq!(inflate(&body), text.as_bytes(), "client {i}");
            }
        }
        // ctx.send compresses for its one connection.
        ctx.send(ids[0], text.as_str()).unwrap();
        assert_eq!(compressions(&ctx), 4);
    }
}
