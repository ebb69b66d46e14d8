//! Worker slots: forking a worker onto its slot's listener, reaping it, and respawning it with
//! per-slot exponential backoff. Also the master's view of each worker for `status`.

use crate::control::{Counters, LineReader, ToWorker, WorkerStatus};
use crate::sys::{self, Fork};
use crate::worker::Worker;
use crate::{control, logging};
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use std::collections::BTreeMap;
use std::io::{self, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// First respawn delay; doubles per quick death up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that lived this long resets its slot's backoff.
const HEALTHY_UPTIME: Duration = Duration::from_secs(60);
/// A report older than this marks the worker `busy` (stuck in a hook).
const STALE_REPORT: Duration = Duration::from_secs(3);
/// Every slot of a group dying this many times before becoming ready stops the master.
pub const BOOT_FAILURES: u32 = 5;

pub const CHANNEL_BASE: usize = 1 << 20;

pub struct Group {
    pub def: Worker,
    /// Actual listen address (port 0 resolved).
    pub listen: String,
    pub listeners: Vec<TcpListener>,
    pub slots: Vec<Slot>,
    pub exits: BTreeMap<String, u64>,
    /// Whom this group's workers become after fork (`[server] user`/`group`).
    pub creds: Option<super::privileges::Credentials>,
}

#[derive(Default)]
pub struct Slot {
    pub pid: Option<Pid>,
    pub channel: Option<UnixStream>,
    pub channel_in: LineReader,
    pub started_at: Option<Instant>,
    /// This process has sent `Ready`.
    pub ready: bool,
    pub report: Option<(Instant, Counters)>,
    prev_report: Option<(Instant, u64)>,
    pub respawn_at: Option<Instant>,
    backoff: Duration,
    /// Consecutive deaths before `Ready`.
    pub boot_failures: u32,
}

pub fn channel_token(group: usize, slot: usize) -> Token {
    Token(CHANNEL_BASE + (group << 12) + slot)
}

pub fn token_slot(token: Token) -> Option<(usize, usize)> {
    let t = token.0.checked_sub(CHANNEL_BASE)?;
    Some((t >> 12, t & 0xfff))
}

impl Group {
    pub fn new(def: Worker, listeners: Vec<TcpListener>) -> Group {
        let listen = listeners
            .first()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("websocket://{a}"))
            .unwrap_or_else(|| def.listen.to_string());
        let slots = (0..listeners.len()).map(|_| Slot::default()).collect();
        Group {
            def,
            listen,
            listeners,
            slots,
            exits: BTreeMap::new(),
            creds: None,
        }
    }

    pub fn name(&self) -> &str {
        self.def.name()
    }

    /// Forks the worker for `slot`. In the child this never returns.
    pub fn spawn(&mut self, g: usize, slot: usize, registry: &Registry) -> io::Result<Pid> {
        let (master_end, worker_end) = std::os::unix::net::UnixStream::pair()?;
        let master_pid = nix::unistd::getpid();
        let _ = io::stdout().flush();
        match sys::fork()? {
            Fork::Child => {
                let listener = self.listeners.swap_remove(slot);
                sys::close_fds_except(&[listener.as_raw_fd(), worker_end.as_raw_fd()]);
                sys::forget_notify_socket();
                logging::set_role(&format!("{}#{slot}", self.name()));
                // Before die_with_parent: changing credentials clears PR_SET_PDEATHSIG.
                if let Some(creds) = &self.creds
                    && let Err(e) = super::privileges::drop_privileges(creds)
                {
                    log::error!("{e}");
                    std::process::exit(2);
                }
                if let Err(e) = sys::die_with_parent(master_pid) {
                    log::error!("cannot tie worker to master: {e}");
                    std::process::exit(2);
                }
                let placeholder = Worker::from_config(self.def.config().clone());
                let def = std::mem::replace(&mut self.def, placeholder);
                let code = crate::worker::run(def, slot, listener, worker_end);
                std::process::exit(code);
            }
            Fork::Parent(pid) => {
                drop(worker_end);
                master_end.set_nonblocking(true)?;
                let mut channel = UnixStream::from_std(master_end);
                registry.register(&mut channel, channel_token(g, slot), Interest::READABLE)?;
                let s = &mut self.slots[slot];
                *s = Slot {
                    backoff: s.backoff,
                    boot_failures: s.boot_failures,
                    ..Slot::default()
                };
                s.pid = Some(pid);
                s.channel = Some(channel);
                s.started_at = Some(Instant::now());
                log::info!("worker {}#{slot} started, pid {pid}", self.name());
                Ok(pid)
            }
        }
    }

    /// Records a worker's exit; returns how it ended ("killed by SIGKILL").
    pub fn reaped(&mut self, slot: usize, status: WaitStatus, registry: &Registry) -> String {
        let how = describe(status);
        let name = self.name().to_string();
        let s = &mut self.slots[slot];
        let pid = s.pid.take().map_or(0, |p| p.as_raw());
        if let Some(mut ch) = s.channel.take() {
            let _ = registry.deregister(&mut ch);
        }
        let lived = s.started_at.map_or(Duration::ZERO, |t| t.elapsed());
        if s.ready {
            s.boot_failures = 0;
        } else {
            s.boot_failures += 1;
        }
        s.ready = false;
        s.report = None;
        if lived >= HEALTHY_UPTIME {
            s.backoff = Duration::ZERO;
        }
        *self.exits.entry(how.clone()).or_default() += 1;
        log::warn!("worker {name}#{slot} pid {pid} {how}");
        how
    }

    /// Schedules the respawn of `slot` after its backoff.
    pub fn schedule_respawn(&mut self, slot: usize) -> Instant {
        let s = &mut self.slots[slot];
        s.backoff = if s.backoff.is_zero() {
            MIN_BACKOFF
        } else {
            (s.backoff * 2).min(MAX_BACKOFF)
        };
        let at = Instant::now() + s.backoff;
        s.respawn_at = Some(at);
        at
    }

    /// True when every slot has died at boot [`BOOT_FAILURES`] times in a row.
    pub fn crash_looping(&self) -> bool {
        self.slots.iter().all(|s| s.boot_failures >= BOOT_FAILURES)
    }

    /// Reads a worker's lines (ready, reports). False if its channel closed.
    pub fn read_channel(&mut self, slot: usize) -> bool {
        let s = &mut self.slots[slot];
        let Some(ch) = s.channel.as_mut() else {
            return true;
        };
        let (lines, closed) = s.channel_in.read_from(ch);
        for line in lines {
            match serde_json::from_str::<control::FromWorker>(&line) {
                Ok(control::FromWorker::Ready) => s.ready = true,
                Ok(control::FromWorker::Report(c)) => {
                    let now = Instant::now();
                    if let Some((at, prev)) = &s.report {
                        s.prev_report = Some((*at, prev.total_request));
                    }
                    s.report = Some((now, c));
                }
                Err(e) => log::warn!("bad line from worker {}#{slot}: {e}", self.def.name()),
            }
        }
        !closed
    }

    /// Tells a worker to stop; falls back to SIGTERM if its channel is unusable.
    pub fn tell_stop(&mut self, slot: usize, graceful: bool) {
        let s = &mut self.slots[slot];
        let Some(pid) = s.pid else { return };
        let line = control::line(&ToWorker::Stop { graceful });
        let sent = s
            .channel
            .as_mut()
            .is_some_and(|ch| ch.write(&line).is_ok_and(|n| n == line.len()));
        if !sent {
            let _ = kill(pid, Signal::SIGTERM);
        }
    }

    pub fn live_pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.slots.iter().filter_map(|s| s.pid)
    }

    pub fn worker_status(&self, slot: usize, now: Instant) -> WorkerStatus {
        let s = &self.slots[slot];
        let status = match (s.pid, &s.report) {
            (None, _) => "restarting",
            (Some(_), None) => "starting",
            (Some(_), Some((at, _))) if now.duration_since(*at) > STALE_REPORT => "busy",
            _ => "idle",
        };
        let qps = match (&s.report, s.prev_report) {
            (Some((at, c)), Some((pat, prev))) if *at > pat => {
                c.total_request.saturating_sub(prev) as f64 / at.duration_since(pat).as_secs_f64()
            }
            _ => 0.0,
        };
        WorkerStatus {
            pid: s.pid.map_or(0, |p| p.as_raw()),
            name: self.name().to_string(),
            slot,
            listen: self.listen.clone(),
            status: status.into(),
            uptime_secs: s.started_at.map_or(0, |t| t.elapsed().as_secs()),
            qps: (qps * 10.0).round() / 10.0,
            counters: s
                .report
                .as_ref()
                .map(|(_, c)| c.clone())
                .unwrap_or_default(),
        }
    }
}

/// "exited with status 3", "killed by SIGKILL".
pub fn describe(status: WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, core) => {
            format!(
                "killed by {}{}",
                sys::signal_name(sig as i32),
                if core { " (core dumped)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}
