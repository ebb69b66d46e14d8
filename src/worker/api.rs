//! The backend API's connections in the worker's loop (see `crate::api`).
//!
//! A request is read (`api::http`), understood (`api::call`) and carried out here over the
//! bus, as hooks' calls are: this worker's clients at once, the other workers of the host
//! over the mesh, other hosts through Redis. A request for another group is relayed to one of
//! that group's workers (`relay.rs`). What the answer needs from the host's other
//! workers (how many they reached, who is there, their counters) is asked of them
//! (`asking.rs`), or of Redis for the whole cluster, and gathered (`gather.rs`).
//!
//! Nothing a client does here can hold the worker: every request is bounded in size and in
//! time (`request_timeout`, from its first byte), and an idle keep-alive connection is closed
//! after the same time.

use super::asking::Question;
use super::event_loop::Loop;
use super::gather::{Compose, Outcome, ReplyTo};
use crate::api::call::{self, ApiError, Call, Target};
use crate::api::http::{self, Method, Response};
use crate::bus::GlobalId;
use crate::config::ApiConfig;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use serde_json::{Value, json};
use slab::Slab;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Instant;

/// The API's listening socket.
pub(super) const API_LISTENER: Token = Token(4);
/// Tokens of API connections: `API_BASE + index`, between WebSocket connections and the bus.
pub(super) const API_BASE: usize = 1 << 39;
/// Bytes read from an API connection per call.
const READ_CHUNK: usize = 16 << 10;

/// What the master hands a worker of the API's group: its slot's socket, the settings, and
/// the names of the other groups, which its requests may name.
pub(crate) struct ApiSocket {
    pub listener: std::net::TcpListener,
    pub config: ApiConfig,
    pub others: Vec<String>,
}

/// Requests one connection may have in flight (pipelined) before it is read no further.
const MAX_PIPELINE: usize = 64;

/// Where an API connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading requests (or idle between two).
    Reading,
    /// Its last answer is queued; closed once written.
    Closing,
}

/// One request's answer, in the connection's order.
enum Answer {
    /// Being gathered from other workers or Redis.
    Due,
    /// Encoded; `last` closes the connection after it.
    Ready { bytes: Vec<u8>, last: bool },
}

struct ApiConn {
    serial: u32,
    stream: TcpStream,
    reader: http::Reader,
    /// Answer bytes the socket has not taken yet.
    out: Vec<u8>,
    phase: Phase,
    /// Answers not yet written, in request order (HTTP/1.1 pipelining): an answer that is
    /// ready waits for those before it. `first` is the sequence number of the front one.
    answers: VecDeque<Answer>,
    first: u64,
    /// The current request (or idle wait) must be done by then.
    deadline: Instant,
}

/// The worker's API: its listener and connections.
pub(super) struct Api {
    listener: Option<TcpListener>,
    config: ApiConfig,
    /// The group whose workers serve the API, this worker's, which a request naming none is
    /// for.
    served: String,
    /// The other groups, reached over bridges.
    others: Vec<String>,
    conns: Slab<ApiConn>,
    /// Connections whose answer went out after a wait, to read on (pipelined requests) later
    /// in the turn, not from inside the call that answered: that call may itself come from
    /// reading the connection.
    resume: Vec<usize>,
    next_serial: u32,
    /// At `max_connections`: accepting waits until one closes.
    full: bool,
}

impl Api {
    pub(super) fn new(socket: ApiSocket, served: &str, registry: &Registry) -> io::Result<Api> {
        socket.listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(socket.listener);
        registry.register(&mut listener, API_LISTENER, Interest::READABLE)?;
        Ok(Api {
            listener: Some(listener),
            config: socket.config,
            served: served.to_string(),
            others: socket.others,
            conns: Slab::new(),
            resume: Vec::new(),
            next_serial: 0,
            full: false,
        })
    }

    /// Stops accepting for good (the worker is stopping); open connections finish their
    /// current request and are closed.
    pub(super) fn close_listener(&mut self, registry: &Registry) {
        if let Some(mut l) = self.listener.take() {
            let _ = registry.deregister(&mut l);
        }
    }
}

impl Loop {
    pub(super) fn api_accept(&mut self) {
        let Some(api) = self.api.as_mut() else { return };
        loop {
            if api.conns.len() >= api.config.max_connections {
                api.full = true;
                return;
            }
            let Some(listener) = &api.listener else {
                return;
            };
            let (mut stream, _) = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("api: accept failed: {e}");
                    return;
                }
            };
            let _ = stream.set_nodelay(true);
            let entry = api.conns.vacant_entry();
            let token = Token(API_BASE + entry.key());
            let interest = Interest::READABLE | Interest::WRITABLE;
            if let Err(e) = self.poll.registry().register(&mut stream, token, interest) {
                log::warn!("api: cannot register a connection: {e}");
                continue;
            }
            api.next_serial = api.next_serial.wrapping_add(1);
            entry.insert(ApiConn {
                serial: api.next_serial,
                stream,
                reader: http::Reader::new(api.config.max_body),
                out: Vec::new(),
                phase: Phase::Reading,
                answers: VecDeque::new(),
                first: 0,
                deadline: Instant::now() + api.config.request_timeout,
            });
        }
    }

    /// An API connection is readable or writable.
    pub(super) fn api_ready(&mut self, idx: usize) {
        if !self.api_write(idx) {
            return;
        }
        self.api_read(idx);
    }

    /// Writes what waits for `idx`; false if the connection is gone (or must not be read).
    fn api_write(&mut self, idx: usize) -> bool {
        let Some(api) = self.api.as_mut() else {
            return false;
        };
        let Some(c) = api.conns.get_mut(idx) else {
            return false;
        };
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => return self.api_close(idx),
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.api_close(idx),
            }
        }
        c.out = Vec::new();
        match c.phase {
            Phase::Closing => self.api_close(idx),
            Phase::Reading => true,
        }
    }

    /// Reads and serves requests on `idx` until it would block, or has [`MAX_PIPELINE`]
    /// requests in flight.
    fn api_read(&mut self, idx: usize) {
        let mut buf = [0u8; READ_CHUNK];
        loop {
            let Some(api) = self.api.as_mut() else { return };
            let Some(c) = api.conns.get_mut(idx) else {
                return;
            };
            if c.phase != Phase::Reading || c.answers.len() >= MAX_PIPELINE {
                return;
            }
            // A request already buffered (pipelined) is served before reading more.
            match c.reader.next() {
                Ok(Some(req)) => {
                    self.api_serve(idx, req);
                    continue;
                }
                Ok(None) => {}
                Err(e) => {
                    let r = Response::json(e.status(), &json!({ "error": e.to_string() }));
                    self.api_reply_now(idx, "other", &r, false, false);
                    return;
                }
            }
            let want = c.reader.room().min(READ_CHUNK);
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    self.api_close(idx);
                    return;
                }
                Ok(n) => c.reader.feed(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.api_close(idx);
                    return;
                }
            }
        }
    }

    /// Carries out one request and answers it, now or once the other workers have.
    fn api_serve(&mut self, idx: usize, req: http::Request) {
        let api = self.api.as_ref().expect("serving the API");
        let (keep_alive, head_only) = (req.keep_alive, req.method == Method::Head);
        let endpoint = call::endpoint_name(&req.path);
        let addressed = match call::understand(&req, &api.config.keys) {
            Ok(a) => a,
            Err(e) => {
                if matches!(e, ApiError::Unauthorized) {
                    let path = crate::escaped(req.path.as_bytes());
                    log::debug!("api: {path}: wrong or missing key");
                }
                return self.api_reply_now(idx, endpoint, &e.response(), keep_alive, head_only);
            }
        };
        let everywhere = addressed.group.is_none() && addressed.call == Call::Health;
        let foreign = addressed.group.filter(|g| *g != api.served);
        let reply_to = |l: &mut Loop| {
            let (serial, seq) = l.api_due(idx);
            ReplyTo::Api {
                conn: (idx, serial),
                seq,
                endpoint,
                keep_alive,
                head_only,
            }
        };
        if let Some(group) = foreign {
            if let Err(e) = self.api_known(group.clone()) {
                return self.api_reply_now(idx, endpoint, &e.response(), keep_alive, head_only);
            }
            let to = reply_to(self);
            return self.relay(&group, super::relay::Relayed::of(&req), to);
        }
        if everywhere {
            let others = self
                .api
                .as_ref()
                .map(|a| a.others.clone())
                .unwrap_or_default();
            let to = reply_to(self);
            return self.health_everywhere(&others, to);
        }
        let sends = addressed.call.sends();
        match self.api_carry_out(addressed.call) {
            Outcome::Now(r) if !sends => {
                self.api_reply_now(idx, endpoint, &r, keep_alive, head_only)
            }
            outcome => {
                let to = reply_to(self);
                self.ask_for(outcome, to, sends);
            }
        }
    }

    /// `Ok` if `group` is one of the server's groups: named at the worker's start, or reached
    /// by a bridge since (a reload added it).
    fn api_known(&self, group: String) -> Result<(), ApiError> {
        let api = self.api.as_ref().expect("serving the API");
        if api.others.contains(&group) || self.bridges.reaches(&group) {
            return Ok(());
        }
        let mut known = vec![api.served.clone()];
        known.extend(api.others.iter().cloned());
        known.extend(self.bridges.groups().into_iter().map(String::from));
        known.sort_unstable();
        known.dedup();
        Err(ApiError::UnknownGroup {
            given: group,
            known,
        })
    }

    /// A place in `idx`'s answers for the request just read: its serial and the sequence
    /// number of the answer.
    fn api_due(&mut self, idx: usize) -> (u32, u64) {
        let c = &mut self.api.as_mut().expect("serving the API").conns[idx];
        c.answers.push_back(Answer::Due);
        (c.serial, c.first + c.answers.len() as u64 - 1)
    }

    /// Answers the request just read on `idx` at once (after those before it).
    fn api_reply_now(
        &mut self,
        idx: usize,
        endpoint: &str,
        r: &Response,
        keep_alive: bool,
        head_only: bool,
    ) {
        let (_, seq) = self.api_due(idx);
        self.api_respond(idx, seq, endpoint, r, keep_alive, head_only);
    }

    /// Does what `call` asks of this worker and the bus: for this worker's own API, or for
    /// another group's, relayed.
    pub(super) fn api_carry_out(&mut self, call: Call) -> Outcome {
        let host = self.ctx.bus.origin.host;
        let ask = |question, compose| Outcome::Ask {
            question,
            slot: None,
            compose,
        };
        match call {
            Call::Publish(items) => {
                let mut local = 0;
                let mut topics = Vec::with_capacity(items.len());
                for (topic, msg) in items {
                    local += self.ctx.publish(&topic, msg);
                    topics.push(topic);
                }
                ask(
                    Question::Subscribers(topics),
                    Compose::Count("delivered", local),
                )
            }
            Call::Broadcast(msg) => {
                let local = self.ctx.broadcast(msg);
                ask(Question::Connections, Compose::Count("delivered", local))
            }
            Call::Send(Target::User(uid), msg) => {
                let local = self.ctx.send_to_user(&uid, msg);
                ask(
                    Question::UserConnections(uid),
                    Compose::Count("delivered", local),
                )
            }
            Call::Send(Target::Conn(to), msg) => {
                let here = to.host == host && to.slot == self.ctx.bus.origin.slot;
                let sent = self.ctx.send_to(to, msg).is_ok();
                if here || to.host != host {
                    // Another host's connection: Redis carries it, and only that host knows.
                    let forwarded = to.host != host;
                    let delivered = usize::from(here && sent);
                    let body = json!({ "delivered": delivered, "forwarded": forwarded });
                    return Outcome::Now(Response::json(200, &body));
                }
                Outcome::Ask {
                    question: Question::IsOpen(to.conn()),
                    slot: Some(to.slot),
                    compose: Compose::Count("delivered", 0),
                }
            }
            Call::Disconnect {
                target,
                code,
                reason,
            } => self.api_disconnect(target, code, reason),
            Call::Presence(topic) => self.presence_outcome(topic),
            Call::User(user) => self.user_outcome(user),
            Call::Stats => {
                let local = self.answer(&Question::Stats);
                ask(Question::Stats, Compose::Stats(local))
            }
            Call::Health => {
                let serving = self.stopping.mode().is_none();
                ask(Question::Health, Compose::Health(serving))
            }
        }
    }

    /// Closes a connection or a user's connections: here at once, on the host's other
    /// workers by asking them, on other hosts through Redis (which answer nothing).
    fn api_disconnect(&mut self, target: Target, code: u16, reason: String) -> Outcome {
        let origin = self.ctx.bus.origin;
        let (conn, user, to) = match target {
            Target::User(uid) => (None, Some(uid), None),
            Target::Conn(id) => (Some(id.conn()), None, Some(id)),
        };
        let question = Question::Disconnect {
            conn,
            user,
            code,
            reason,
        };
        match to {
            Some(GlobalId { host, slot, .. }) if host != origin.host => {
                self.ctx.bus.send_to_host(host, slot, &question.ask(0));
                Outcome::Now(Response::json(
                    200,
                    &json!({ "disconnected": 0, "forwarded": true }),
                ))
            }
            Some(GlobalId { slot, .. }) if slot != origin.slot => Outcome::Ask {
                question,
                slot: Some(slot),
                compose: Compose::Count("disconnected", 0),
            },
            Some(_) => {
                let n = self.answer(&question).as_u64().unwrap_or(0);
                Outcome::Now(Response::json(200, &json!({ "disconnected": n })))
            }
            None => {
                self.ctx.bus.send_to_other_hosts(&question.ask(0));
                let n = self.answer(&question).as_u64().unwrap_or(0) as usize;
                Outcome::Ask {
                    question,
                    slot: None,
                    compose: Compose::Count("disconnected", n),
                }
            }
        }
    }

    /// A gathered answer for answer `seq` of API connection `conn`, if it is still there.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn api_gathered(
        &mut self,
        (idx, serial): (usize, u32),
        seq: u64,
        endpoint: &'static str,
        status: u16,
        body: &Value,
        keep_alive: bool,
        head_only: bool,
    ) {
        let Some(c) = self.api.as_mut().and_then(|a| a.conns.get_mut(idx)) else {
            return;
        };
        if c.serial != serial {
            return;
        }
        let r = Response::json(status, body);
        self.api_respond(idx, seq, endpoint, &r, keep_alive, head_only);
        if let Some(api) = self.api.as_mut() {
            api.resume.push(idx);
        }
    }

    /// Reads on the connections whose answers went out after a wait.
    pub(super) fn api_resume(&mut self) {
        let Some(api) = self.api.as_mut() else { return };
        for idx in std::mem::take(&mut api.resume) {
            self.api_read(idx);
        }
    }

    /// Connections wait to be read on this turn.
    pub(super) fn api_has_work(&self) -> bool {
        self.api.as_ref().is_some_and(|a| !a.resume.is_empty())
    }

    /// Makes `r` answer `seq` of `idx`, and writes what is ready in order; the connection
    /// closes after an answer that does not keep it alive.
    fn api_respond(
        &mut self,
        idx: usize,
        seq: u64,
        endpoint: &str,
        r: &Response,
        keep_alive: bool,
        head_only: bool,
    ) {
        let Some(api) = self.api.as_mut() else { return };
        let Some(c) = api.conns.get_mut(idx) else {
            return;
        };
        let Some(slot) = seq
            .checked_sub(c.first)
            .and_then(|i| c.answers.get_mut(i as usize))
        else {
            return; // The connection is closing: answers after its last are not sent.
        };
        let keep_alive = keep_alive && self.stopping.mode().is_none();
        log::debug!("api: {endpoint}: {}", r.status);
        let counters = &mut self.ctx.counters;
        counters.api_requests += 1;
        *counters
            .api
            .entry(format!("{endpoint} {}", r.status))
            .or_default() += 1;
        *slot = Answer::Ready {
            bytes: r.encode(keep_alive, head_only),
            last: !keep_alive,
        };
        while let Some(Answer::Ready { .. }) = c.answers.front() {
            let Some(Answer::Ready { bytes, last }) = c.answers.pop_front() else {
                unreachable!("matched above")
            };
            c.first += 1;
            c.out.extend_from_slice(&bytes);
            if last {
                c.phase = Phase::Closing;
                c.answers.clear();
                break;
            }
        }
        c.deadline = Instant::now() + api.config.request_timeout;
        self.api_write(idx);
    }

    /// Closes API connection `idx`; returns false (nothing more to do with it).
    fn api_close(&mut self, idx: usize) -> bool {
        let Some(api) = self.api.as_mut() else {
            return false;
        };
        if api.conns.contains(idx) {
            let mut c = api.conns.remove(idx);
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
        if std::mem::take(&mut api.full) {
            self.api_accept();
        }
        false
    }

    /// Once a second: requests past `request_timeout` get 408, and idle keep-alive
    /// connections past it are closed quietly.
    pub(super) fn api_sweep(&mut self, now: Instant) {
        let Some(api) = self.api.as_mut() else { return };
        let overdue: Vec<(usize, bool)> = api
            .conns
            .iter()
            .filter(|(_, c)| c.phase == Phase::Reading && c.answers.is_empty() && c.deadline <= now)
            .map(|(idx, c)| (idx, c.reader.is_idle()))
            .collect();
        for (idx, idle) in overdue {
            if idle {
                self.api_close(idx);
            } else {
                let e = json!({ "error": "request not complete within request_timeout" });
                self.api_reply_now(idx, "other", &Response::json(408, &e), false, false);
            }
        }
    }
}
