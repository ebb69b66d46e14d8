//! [`Context`]: what a hook holds while it runs — the worker's connections and timers.
//!
//! Hooks never own a connection; they name it by [`ConnId`] and the context looks it up. Sends
//! are queued in the connection's write buffer and flushed once per event-loop turn, so a hook
//! that answers many messages costs one write syscall, not one per message. Connections that end
//! during a hook are only marked; the loop removes them and calls `on_close` after the hook, so
//! hooks never re-enter each other.

use super::conn::{Conn, Phase};
use super::message::{ConnId, Message, SendError};
use super::timers::{TimerId, Timers};
use crate::control::Counters;
use slab::Slab;
use std::net::SocketAddr;
use std::time::Duration;
use tungstenite::protocol::frame::coding::CloseCode;

/// The worker as hooks see it. Passed as `&mut Context` to every hook and timer.
pub struct Context {
    pub(crate) worker_id: usize,
    pub(crate) worker_name: String,
    pub(crate) conns: Slab<Conn>,
    pub(crate) timers: Timers,
    pub(crate) counters: Counters,
    /// Connections with output waiting for the end-of-turn flush.
    pub(crate) dirty: Vec<usize>,
    /// Connections that ended and await removal (slab index, serial).
    pub(crate) gone: Vec<(usize, u32)>,
}

impl Context {
    pub(crate) fn new(worker_id: usize, worker_name: String) -> Context {
        Context {
            worker_id,
            worker_name,
            conns: Slab::new(),
            timers: Timers::default(),
            counters: Counters::default(),
            dirty: Vec::new(),
            gone: Vec::new(),
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
    pub fn send(&mut self, conn: ConnId, msg: impl Into<Message>) -> Result<(), SendError> {
        self.write(conn, msg.into().into_frame())
    }

    /// Sends `msg` to every open connection of this worker; returns how many got it queued.
    pub fn broadcast(&mut self, msg: impl Into<Message>) -> usize {
        let frame = msg.into().into_frame();
        let ids = self.connections();
        ids.into_iter()
            .filter(|&id| self.write(id, frame.clone()).is_ok())
            .count()
    }

    /// Ids of this worker's open connections (Workerman's `$worker->connections`).
    pub fn connections(&self) -> Vec<ConnId> {
        self.conns
            .iter()
            .filter(|(_, c)| c.is_open() && c.closing_since.is_none())
            .map(|(idx, c)| ConnId {
                serial: c.serial,
                idx: idx as u32,
            })
            .collect()
    }

    /// Number of open connections of this worker.
    pub fn connection_count(&self) -> usize {
        self.counters.connections as usize
    }

    /// Closes `conn` with 1000 (normal closure).
    pub fn close(&mut self, conn: ConnId) {
        self.close_with(conn, 1000, "");
    }

    /// Closes `conn` with the given close code and reason. `on_close` follows once it is gone.
    pub fn close_with(&mut self, conn: ConnId, code: u16, reason: &str) {
        let Some(c) = self.conn_mut(conn) else { return };
        if c.closing_since.is_some() {
            return;
        }
        let ok = c.start_close(CloseCode::from(code), reason);
        if ok {
            self.mark_dirty(conn.idx as usize)
        } else {
            self.mark_gone(conn.idx as usize)
        }
    }

    /// The client's address.
    pub fn remote_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        self.conn(conn).map(|c| c.remote)
    }

    /// The path (and query) the client asked for in its upgrade request.
    pub fn path(&self, conn: ConnId) -> Option<&str> {
        self.conn(conn).map(|c| c.path.as_str())
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

    fn conn(&self, id: ConnId) -> Option<&Conn> {
        self.conns
            .get(id.idx as usize)
            .filter(|c| c.serial == id.serial)
    }

    fn conn_mut(&mut self, id: ConnId) -> Option<&mut Conn> {
        self.conns
            .get_mut(id.idx as usize)
            .filter(|c| c.serial == id.serial)
    }

    fn write(&mut self, id: ConnId, frame: tungstenite::Message) -> Result<(), SendError> {
        let len = frame.len() as u64;
        let result = match self.conn_mut(id) {
            None => Err(SendError::NoConnection),
            Some(c) if c.closing_since.is_some() => Err(SendError::Closing),
            Some(c) => match &mut c.phase {
                Phase::Handshaking(_) => Err(SendError::NoConnection),
                Phase::Open(ws) => match ws.write(frame) {
                    Ok(()) => Ok(()),
                    // The frame is buffered; the socket is merely full for now.
                    Err(tungstenite::Error::Io(e))
                        if e.kind() == std::io::ErrorKind::WouldBlock =>
                    {
                        Ok(())
                    }
                    Err(tungstenite::Error::WriteBufferFull(_)) => Err(SendError::BufferFull),
                    Err(_) => {
                        self.mark_gone(id.idx as usize);
                        Err(SendError::Closing)
                    }
                },
            },
        };
        match result {
            Ok(()) => {
                self.counters.messages_out += 1;
                self.counters.bytes_out += len;
                self.mark_dirty(id.idx as usize);
            }
            Err(SendError::NoConnection) => {}
            Err(_) => self.counters.send_fail += 1,
        }
        result
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
            self.gone.push((idx, c.serial));
        }
    }
}
