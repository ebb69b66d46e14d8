//! `app = "webhook"`: each event is POSTed to a backend URL as the JSON an exec handler would
//! read (`exec::protocol`), and the answer's body may carry commands in the same form.
//!
//! The loop never waits on HTTP. Requests go to `webhook_connections` helper threads, each with
//! its own keep-alive connection (ureq's pool) and a bounded queue; a connection's events
//! always go to the same thread, so they reach the backend in order. Answers come back through
//! a shared list, and a byte on a socket pair wakes the loop. What is in flight is bounded by
//! `handler_queue` bytes: past it the worker stops reading its clients, as with a slow exec
//! handler.
//!
//! Retries: a request that fails before any answer came (connection refused, or reset on a
//! reused keep-alive connection) is tried once more on a fresh connection; a timeout or an
//! error status is not retried, since the backend may have acted on it. A `connect` that gets
//! no answer in `webhook_timeout` is refused with 503.

use super::decisions::Decided;
use super::event_loop::Loop;
use crate::ConnId;
use crate::config::GroupConfig;
use crate::exec::protocol::{self, Command};
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The loop's end of the wake-up pair.
pub(super) const WEBHOOK_WAKE: mio::Token = mio::Token(8);
/// Requests one thread's queue holds; past it a request fails at once.
const LANE_DEPTH: usize = 1024;
/// The most of an answer's body that is read.
const MAX_ANSWER: u64 = 4 << 20;

/// Which event a request carries, and so which URL it goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Connect,
    Message,
    Close,
}

struct Job {
    kind: Kind,
    conn: ConnId,
    url: Arc<str>,
    body: Vec<u8>,
}

/// An answer from the backend, or why there is none.
pub(super) struct Done {
    pub kind: Kind,
    pub conn: ConnId,
    pub size: usize,
    pub outcome: Result<(u16, Vec<u8>), String>,
}

struct Shared {
    done: Mutex<VecDeque<Done>>,
    wake: UnixStream,
}

/// The worker's side of the webhook.
pub(super) struct Webhook {
    urls: [Arc<str>; 3],
    lanes: Vec<SyncSender<Job>>,
    shared: Arc<Shared>,
    wake: mio::net::UnixStream,
    in_flight: usize,
    /// Requests in flight, by connection: one that a reload hands over waits until they are
    /// answered, so that its events reach the backend in order and the answers' commands
    /// find it here.
    pending: std::collections::HashMap<ConnId, u32>,
    limit: usize,
    held: Vec<usize>,
    /// When a failure was last logged and why, and those not logged since.
    warned: Option<(Instant, String)>,
    quiet: u64,
}

/// Failures are logged at most this often (each is counted in the metrics).
const WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Webhook {
    /// Starts the helper threads (in the worker, never in the master) and registers the
    /// wake-up socket.
    pub(super) fn start(settings: &GroupConfig, registry: &mio::Registry) -> io::Result<Webhook> {
        let (theirs, mine) = UnixStream::pair()?;
        theirs.set_nonblocking(true)?;
        mine.set_nonblocking(true)?;
        let mut wake = mio::net::UnixStream::from_std(mine);
        registry.register(&mut wake, WEBHOOK_WAKE, mio::Interest::READABLE)?;
        let shared = Arc::new(Shared {
            done: Mutex::new(VecDeque::new()),
            wake: theirs,
        });
        let agent = ureq::AgentBuilder::new()
            .timeout(settings.webhook_timeout)
            .max_idle_connections_per_host(settings.webhook_connections)
            .user_agent(&format!("wsd/{}", crate::VERSION))
            .build();
        let mut lanes = Vec::new();
        for n in 0..settings.webhook_connections {
            let (tx, rx) = sync_channel(LANE_DEPTH);
            let (agent, shared) = (agent.clone(), shared.clone());
            std::thread::Builder::new()
                .name(format!("webhook-{n}"))
                .spawn(move || lane(rx, agent, shared))?;
            lanes.push(tx);
        }
        let urls = settings.webhook_urls().map(Arc::from);
        Ok(Webhook {
            urls,
            lanes,
            shared,
            wake,
            in_flight: 0,
            pending: std::collections::HashMap::new(),
            limit: settings.handler_queue,
            held: Vec::new(),
            warned: None,
            quiet: 0,
        })
    }

    /// POSTs `body` for `conn`; false if its thread's queue is full.
    pub(super) fn post(&mut self, kind: Kind, conn: ConnId, body: Vec<u8>) -> bool {
        let url = self.urls[kind as usize].clone();
        let lane = &self.lanes[conn.idx as usize % self.lanes.len()];
        let size = body.len();
        match lane.try_send(Job {
            kind,
            conn,
            url,
            body,
        }) {
            Ok(()) => {
                self.in_flight += size;
                *self.pending.entry(conn).or_default() += 1;
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        }
    }

    /// The answers that came, the wake-up bytes drained.
    pub(super) fn answers(&mut self) -> Vec<Done> {
        let mut buf = [0u8; 256];
        while matches!(self.wake.read(&mut buf), Ok(n) if n > 0) {}
        let done: Vec<Done> = self
            .shared
            .done
            .lock()
            .map(|mut d| d.drain(..).collect())
            .unwrap_or_default();
        for d in &done {
            self.in_flight = self.in_flight.saturating_sub(d.size);
            if let Some(n) = self.pending.get_mut(&d.conn) {
                *n -= 1;
                if *n == 0 {
                    self.pending.remove(&d.conn);
                }
            }
        }
        done
    }

    /// Whether requests for `conn` are still in flight.
    pub(super) fn busy(&self, conn: ConnId) -> bool {
        self.pending.contains_key(&conn)
    }

    /// Too much is in flight: the clients are not read.
    pub(super) fn congested(&self) -> bool {
        self.in_flight >= self.limit
    }

    /// Whether to log a failure: one with a new cause at once, the same cause once per
    /// [`WARN_EVERY`] with the count of those in between.
    fn should_warn(&mut self, why: &str) -> Option<u64> {
        let now = Instant::now();
        let same =
            |(at, last): &(Instant, String)| last == why && now.duration_since(*at) < WARN_EVERY;
        if self.warned.as_ref().is_some_and(same) {
            self.quiet += 1;
            return None;
        }
        self.warned = Some((now, why.to_string()));
        Some(std::mem::take(&mut self.quiet))
    }

    pub(super) fn hold(&mut self, idx: usize) {
        if !self.held.contains(&idx) {
            self.held.push(idx);
        }
    }

    /// The clients to read again, once half of the limit has drained.
    pub(super) fn release(&mut self) -> Vec<usize> {
        if self.in_flight > self.limit / 2 {
            return Vec::new();
        }
        std::mem::take(&mut self.held)
    }
}

/// One helper thread: its requests, in order, until the worker drops its queue.
fn lane(jobs: Receiver<Job>, agent: ureq::Agent, shared: Arc<Shared>) {
    while let Ok(job) = jobs.recv() {
        let outcome = post(&agent, &job.url, &job.body).or_else(|e| match e {
            Failure::BeforeAnswer(_) => post(&agent, &job.url, &job.body),
            other => Err(other),
        });
        let done = Done {
            kind: job.kind,
            conn: job.conn,
            size: job.body.len(),
            outcome: outcome.map_err(|e| e.to_string()),
        };
        if let Ok(mut d) = shared.done.lock() {
            d.push_back(done);
        }
        // A full socket already has a wake-up waiting.
        let _ = (&shared.wake).write(&[1]);
    }
}

/// Why a POST has no answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Nothing came back: refused, reset, unreachable. Safe to try again.
    #[error("{0}")]
    BeforeAnswer(String),
    /// Timed out or broke mid-answer: the backend may have acted on it.
    #[error("{0}")]
    Other(String),
}

fn post(agent: &ureq::Agent, url: &str, body: &[u8]) -> Result<(u16, Vec<u8>), Failure> {
    let sent = agent
        .post(url)
        .set("Content-Type", "application/json")
        .send_bytes(body);
    let response = match sent {
        Ok(r) | Err(ureq::Error::Status(_, r)) => r,
        Err(ureq::Error::Transport(t)) => {
            let text = t.to_string();
            return Err(match t.kind() {
                ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns => {
                    Failure::BeforeAnswer(text)
                }
                ureq::ErrorKind::Io if !text.contains("timed out") => Failure::BeforeAnswer(text),
                _ => Failure::Other(text),
            });
        }
    };
    let status = response.status();
    let mut out = Vec::new();
    response
        .into_reader()
        .take(MAX_ANSWER)
        .read_to_end(&mut out)
        .map_err(|e| Failure::Other(format!("reading the answer: {e}")))?;
    Ok((status, out))
}

impl Loop {
    /// Answers have come back from the backend.
    pub(super) fn webhook_ready(&mut self) {
        let Some(w) = self.webhook.as_mut() else {
            return;
        };
        for done in w.answers() {
            self.webhook_answered(done);
        }
        if let Some(w) = self.webhook.as_mut() {
            let released = w.release();
            self.again.extend(released);
        }
        // Connections a handoff parked until their requests were answered may go now.
        self.handoff_pump();
    }

    /// One answer. For a `connect`: a 2xx accepts (as its `accept` command says, if it has
    /// one), a 4xx or a `reject` command refuses with that status, and anything else (5xx, no
    /// answer) refuses with 503. Any other commands in the body are carried out after.
    fn webhook_answered(&mut self, done: Done) {
        let (kind, id) = (done.kind, done.conn);
        let me = self.named(id);
        match done.outcome {
            Ok((status, body)) if (200..300).contains(&status) => {
                let mut decided = None;
                let mut rest = Vec::new();
                for read in commands_in(&body) {
                    match read.command {
                        Ok(Command::Accept {
                            conn,
                            user,
                            subscribe,
                        }) if conn == me => decided = Some(Decided::Accept { user, subscribe }),
                        Ok(Command::Reject {
                            conn,
                            status,
                            reason,
                        }) if conn == me => decided = Some(Decided::Reject { status, reason }),
                        Ok(c) => rest.push(c),
                        Err(e) => {
                            log::warn!("webhook: a command in the {kind:?} answer skipped: {e}")
                        }
                    }
                }
                if kind == Kind::Connect {
                    let d = decided.unwrap_or(Decided::Accept {
                        user: None,
                        subscribe: Vec::new(),
                    });
                    let _ = self.handler_decided(id, d);
                }
                for c in rest {
                    if let Err(e) = self.handler_command(c) {
                        log::warn!("webhook: a command in the {kind:?} answer failed: {e}");
                    }
                }
            }
            Ok((status, body)) if kind == Kind::Connect && (400..500).contains(&status) => {
                let text = String::from_utf8_lossy(&body);
                let mut reason: String = text.trim().chars().take(120).collect();
                if reason.is_empty() {
                    reason = "refused by the backend".into();
                }
                let _ = self.handler_decided(id, Decided::Reject { status, reason });
            }
            outcome => {
                let why = match outcome {
                    Ok((status, _)) => format!("the backend answered {status}"),
                    Err(e) => e,
                };
                self.ctx.counters.webhook_failures += 1;
                let w = self.webhook.as_mut().expect("a webhook answered");
                if let Some(quiet) = w.should_warn(&why) {
                    let more = match quiet {
                        0 => String::new(),
                        n => format!(" ({n} more since the last report)"),
                    };
                    log::warn!("webhook {kind:?} event of {me} failed: {why}{more}");
                }
                if kind == Kind::Connect {
                    let reason = "the backend is unavailable".to_string();
                    let _ = self.handler_decided(
                        id,
                        Decided::Reject {
                            status: 503,
                            reason,
                        },
                    );
                }
            }
        }
    }
}

/// The commands in an answer's body: a JSON array of them, or one per line.
fn commands_in(body: &[u8]) -> Vec<protocol::Read> {
    let trimmed = body.trim_ascii();
    if trimmed.is_empty() {
        return Vec::new();
    }
    if trimmed.starts_with(b"[") {
        return match serde_json::from_slice::<Vec<serde_json::Value>>(trimmed) {
            Ok(items) => (items.iter())
                .map(|v| protocol::read_command(v.to_string().as_bytes()))
                .collect(),
            Err(e) => vec![protocol::Read {
                id: None,
                command: Err(e.into()),
            }],
        };
    }
    (trimmed.split(|&b| b == b'\n'))
        .filter(|l| !l.trim_ascii().is_empty())
        .map(protocol::read_command)
        .collect()
}
