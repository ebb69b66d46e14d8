//! The messages of the control path, all JSON lines:
//!
//! * CLI → master over the control socket: a [`Request`]; the master answers one [`Reply`].
//! * worker → master over the worker's channel: [`FromWorker`] (ready, counters each second).
//! * master → worker over the same channel: [`ToWorker`] (stop, list connections, reopen logs;
//!   the new log file's descriptor rides along with `reopen_logs` as `SCM_RIGHTS`).
//!
//! JSON lines keep the protocol debuggable with `socat` and make `status --json` free: it is
//! the master's [`Status`] printed as is.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read};

/// What the CLI asks the master.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Stop every worker; the reply comes when the master is about to exit.
    Stop {
        mode: StopMode,
    },
    /// Re-read the config and replace the workers slot by slot; the reply comes when done.
    Reload,
    /// Reopen the log file (after logrotate moved it).
    ReopenLogs,
    /// Every live connection of every worker.
    Connections,
    /// Start `binary` (or the running one's path again) as the next master, which takes over
    /// the listeners and the connections (`master::upgrade`); the reply comes when the old
    /// master is about to exit, or with why the new one did not take over.
    Upgrade {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        binary: Option<std::path::PathBuf>,
    },
}

/// How a worker stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMode {
    /// `stop -g`: stop accepting, wait for clients to leave, with no time limit.
    Drain,
    /// `stop`, SIGTERM, reload: Close 1001 to every client, spread over `close_spread`, then
    /// exit; the master SIGKILLs what is left at `stop_timeout`.
    Close,
    /// `stop --fast`, SIGINT, SIGQUIT: Close 1001 written once, no waiting for the answers.
    Fast,
}

/// The master's answer to a [`Request`].
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What a reload did, for the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Connections>,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: None,
            status: None,
            message: None,
            connections: None,
        }
    }
    pub fn error(e: impl Into<String>) -> Reply {
        Reply {
            ok: false,
            error: Some(e.into()),
            ..Reply::ok()
        }
    }
}

/// Worker → master.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// `on_worker_start` has returned and the worker is accepting.
    Ready,
    Report(Box<Counters>),
    /// A part of the answer to [`ToWorker::ListConnections`]; `last` ends it.
    Connections {
        query: u64,
        conns: Vec<ConnInfo>,
        last: bool,
    },
    /// This worker has taken every connection a handoff gave it (the giver's last record came,
    /// or its line ended): the next slot's handoff may begin.
    Taken,
    /// This worker holds its group messages from now on ([`ToWorker::Hold`]).
    Holding,
}

/// Master → worker.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ToWorker {
    Stop {
        mode: StopMode,
        /// The window over which Close 1001 goes out (`StopMode::Close`).
        spread_ms: u64,
    },
    /// Answer with [`FromWorker::Connections`] for this query.
    ListConnections { query: u64 },
    /// Point stdout and stderr at the descriptor sent with this line.
    ReopenLogs,
    /// Serve new connections with this certificate chain and key (PEM), renewed by a reload.
    Certificate { chain: String, key: Secret },
    /// The descriptor sent with this line is a bridge to this worker of another group
    /// (`bus::bridges`).
    Bridge(crate::bus::bridges::Peer),
    /// Stop as `Stop { mode: Close }` does, but first hand every open connection that can go
    /// to the worker `to`, over the handoff line sent with this line (`handoff`). `wss://`
    /// clients are served on for `drain_ms`, then closed with 1012.
    ///
    /// `returnable` (`wsd upgrade`): once all is taken, keep the line for the connections to
    /// come back, until the taker closes it.
    HandOff {
        spread_ms: u64,
        drain_ms: u64,
        to: crate::bus::bridges::Peer,
        #[serde(default)]
        returnable: bool,
    },
    /// Take the connections the worker `from` hands over the line sent with this line. `None`:
    /// no handoff will come (the worker this one replaces is gone), so this worker reads the
    /// bus ends it inherited from now on.
    ///
    /// `returnable` (`wsd upgrade`): keep the line until [`ToWorker::Commit`], and do not die
    /// with the master meanwhile: if it dies, hand every connection back over the line, in
    /// `protocol`, the handoff protocol `from` speaks.
    Adopt {
        from: Option<crate::bus::bridges::Peer>,
        #[serde(default)]
        returnable: bool,
        #[serde(default = "this_protocol")]
        protocol: u16,
    },
    /// The upgrade is done: close the lines kept for a hand-back, and die with the master
    /// again.
    Commit,
    /// Hold every group message (broadcast, publish, a user's) until [`ToWorker::Resume`],
    /// and say so with [`FromWorker::Holding`]: a reload that lowers `count` moves a retiring
    /// worker's clients to another slot while no message is on its way to either.
    Hold,
    /// End the hold; send to the slots below `view` from now on.
    Resume { view: usize },
    /// Send to the slots below `view` from now on: a reload raising `count` starts workers
    /// in new slots.
    View { view: usize },
}

impl ToWorker {
    /// A descriptor rides along with this line.
    pub fn carries_fd(&self) -> bool {
        matches!(
            self,
            ToWorker::ReopenLogs
                | ToWorker::Bridge(_)
                | ToWorker::HandOff { .. }
                | ToWorker::Adopt { from: Some(_), .. }
        )
    }
}

fn this_protocol() -> u16 {
    crate::handoff::line::PROTOCOL
}

/// Text that must not be shown: its `Debug` is `"<secret>"`, so no log line can carry it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// One live connection, as `wsd connections` shows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnInfo {
    /// Filled in by the master.
    #[serde(default)]
    pub pid: i32,
    #[serde(default)]
    pub worker: String,
    /// The number hooks see in `ConnId`'s display.
    pub id: String,
    /// Its id on the bus ([`crate::GlobalId`]): what the API, `send_to` and handlers name
    /// it by.
    #[serde(default)]
    pub conn: String,
    pub remote: String,
    pub path: String,
    pub age_secs: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    /// Bytes queued for the client and not yet taken by its socket.
    pub send_queue: u64,
    /// `handshake`, `open` or `closing`.
    pub state: ConnStage,
    /// The subprotocol agreed at the upgrade, if any.
    #[serde(default)]
    pub protocol: Option<String>,
    /// The `Sec-WebSocket-Extensions` the upgrade agreed to (empty: none).
    #[serde(default)]
    pub extensions: String,
}

/// The answer to [`Request::Connections`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    pub conns: Vec<ConnInfo>,
    /// Workers that did not answer in time (busy in a hook); their connections are missing.
    #[serde(default)]
    pub missing: Vec<i32>,
}

/// A connection's stage, as `wsd connections` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnStage {
    /// The upgrade has not completed.
    #[default]
    Handshake,
    /// Upgraded, and neither side has sent Close.
    Open,
    /// Either side sent Close, the connection failed, or its upgrade was refused.
    Closing,
}

impl fmt::Display for ConnStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnStage::Handshake => "handshake",
            ConnStage::Open => "open",
            ConnStage::Closing => "closing",
        })
    }
}

/// A worker's side of the cluster bus, as it reports it (`bus_state` in `status --json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BusState {
    /// No report from the worker yet.
    #[default]
    #[serde(rename = "")]
    Unknown,
    /// The server has no cluster bus: the bus spans this host's workers.
    #[serde(rename = "local")]
    Local,
    /// Redis not reached yet since the worker started.
    #[serde(rename = "redis connecting")]
    Connecting,
    #[serde(rename = "redis up")]
    Up,
    #[serde(rename = "redis down")]
    Down,
}

/// The cluster bus over all workers, as `status` sums it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    /// Every worker reaches Redis.
    Up,
    /// At least one worker reports Redis down.
    Down,
    /// None is down, but not every worker has reached Redis yet.
    Connecting,
}

impl fmt::Display for ClusterState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterState::Up => "up",
            ClusterState::Down => "down",
            ClusterState::Connecting => "connecting",
        })
    }
}

/// What a worker is doing, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerState {
    /// Forked, no report yet.
    Starting,
    /// Its last report is fresh.
    Idle,
    /// It has not reported for a while (stuck in a hook).
    Busy,
    /// Being replaced (reload) or removed.
    Stopping,
    /// The slot waits for its worker to be respawned.
    Restarting,
}

impl fmt::Display for WorkerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WorkerState::Starting => "starting",
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Stopping => "stopping",
            WorkerState::Restarting => "restarting",
        })
    }
}

/// What a worker counts, pushed to the master about once a second.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub connections: u64,
    /// Messages received from clients (Workerman's `total_request`).
    pub total_request: u64,
    pub messages_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Sends that could not be queued (peer gone or its send buffer full).
    pub send_fail: u64,
    pub timers: u64,
    pub accepted: u64,
    /// Bytes queued for slow clients, over all connections.
    #[serde(default)]
    pub send_queue: u64,
    /// Bus messages sent to and received from the group's other workers, and those a full
    /// or gone peer could not take.
    #[serde(default)]
    pub bus_sent: u64,
    #[serde(default)]
    pub bus_received: u64,
    #[serde(default)]
    pub bus_dropped: u64,
    /// Webhook requests that got no 2xx (or no answer).
    #[serde(default)]
    pub webhook_failures: u64,
    /// `local` (no cluster bus), or the worker's link to Redis: `redis connecting`,
    /// `redis up`, `redis down`.
    #[serde(default)]
    pub bus_state: BusState,
    /// Resident memory of the worker process in bytes.
    pub memory: u64,
    /// Backend API requests answered (`[api]`), by this worker.
    #[serde(default)]
    pub api_requests: u64,
    /// The same by endpoint and status: `"publish 200"`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub api: BTreeMap<String, u64>,
    /// WebSocket upgrades accepted (the `101`s).
    #[serde(default)]
    pub upgraded: u64,
    /// Upgrades refused, by the HTTP status they got (`"401"`: a string, as the reports'
    /// JSON keys must be).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rejected: BTreeMap<String, u64>,
    /// Times a send queue reached half of `max_send_buffer` (`on_buffer_full`).
    #[serde(default)]
    pub buffer_full: u64,
    /// From accept to the `101` or the refusal.
    #[serde(default)]
    pub handshake_seconds: crate::metrics::Histogram,
    /// Time in the app's connection hooks.
    #[serde(default)]
    pub hook_seconds: crate::metrics::Histogram,
    /// Topics with subscribers on this worker.
    #[serde(default)]
    pub topics: u64,
    /// Of those, the ones whose Redis channel the worker listens to (with `[server] bus`):
    /// equal to `topics` once routing has caught up.
    #[serde(default)]
    pub routed_topics: u64,
}

/// The master's view of everything, as `status --json` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub master: MasterStatus,
    pub groups: Vec<GroupStatus>,
    pub workers: Vec<WorkerStatus>,
    /// The cluster bus, when the server has one (`[server] bus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<BusStatus>,
    /// The backend API, when the server has one (`[api]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiStatus>,
    /// Where the master serves `/metrics` and `/health` (`[metrics]`): `http://HOST:PORT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<String>,
}

/// The backend API as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiStatus {
    /// `http://HOST:PORT`.
    pub listen: String,
    /// The group whose workers serve it.
    pub group: String,
    /// Requests answered by the running workers.
    pub requests: u64,
    /// Requests per second over the workers' last reports.
    pub rate: f64,
}

/// The cluster bus as the workers last reported it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BusStatus {
    /// The Redis address, without a password.
    pub url: String,
    /// `up` (every worker reaches Redis), `down` (at least one does not), or `connecting`.
    pub state: ClusterState,
    pub workers_up: usize,
    pub workers: usize,
    /// The workers (`group#slot`) that report Redis down.
    #[serde(default)]
    pub down_on: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterStatus {
    pub pid: i32,
    pub version: String,
    /// The binary the master runs (what `wsd upgrade` starts again by default).
    #[serde(default)]
    pub binary: String,
    pub config: String,
    /// Unix seconds.
    pub started_at: i64,
    pub uptime_secs: u64,
    pub load_average: [f64; 3],
    pub memory: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    pub name: String,
    pub listen: String,
    pub count: usize,
    /// How workers of this group have exited, e.g. `{"killed by SIGKILL": 1}`.
    pub exits: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerStatus {
    pub pid: i32,
    pub name: String,
    pub slot: usize,
    pub listen: String,
    /// `idle` when its last report is fresh, `busy` when it has not reported for a while
    /// (stuck in a hook), `starting` before its first report, `stopping` when it is being
    /// replaced (reload) or removed, `restarting` for a slot waiting for its worker.
    pub status: WorkerState,
    pub uptime_secs: u64,
    pub qps: f64,
    /// Backend API requests per second (`[api]`).
    #[serde(default)]
    pub api_rate: f64,
    /// Connections waiting in this slot's listen queue, and the queue's limit (backlog).
    #[serde(default)]
    pub accept_queue: u32,
    #[serde(default)]
    pub backlog: u32,
    #[serde(flatten)]
    pub counters: Counters,
}

/// Accumulates bytes from a non-blocking stream and hands out complete lines.
#[derive(Default)]
pub struct LineReader {
    buf: Vec<u8>,
}

/// A line longer than this is a broken peer, not a message.
const MAX_LINE: usize = 1 << 20;

impl LineReader {
    /// Reads until the stream would block. Returns the complete lines and whether the peer
    /// has closed its end (EOF) or misbehaved.
    pub fn read_from(&mut self, stream: &mut impl Read) -> (Vec<String>, bool) {
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            match stream.read(&mut chunk) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut lines = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            lines.push(String::from_utf8_lossy(&line[..nl]).into_owned());
        }
        if self.buf.len() > MAX_LINE {
            closed = true;
        }
        (lines, closed)
    }
}

/// Encodes a message as one JSON line.
pub fn line<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec(msg).expect("control messages always serialize");
    out.push(b'\n');
    out
}
