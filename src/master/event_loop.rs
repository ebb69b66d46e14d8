//! The master loop: one thread, one `mio::Poll` over the signalfd, the control socket and
//! every worker's channel. No threads ever (workers are forked from here), no blocking waits.
//!
//! Signals: SIGTERM stops gracefully, SIGINT/SIGQUIT stop fast, SIGUSR1/SIGHUP reload,
//! SIGUSR2 upgrades to the binary the master was started from (as nginx does), SIGCHLD
//! reaps. The CLI asks the same things over the control
//! socket (`requests.rs` answers) and gets an answer. This file drives what takes time: the
//! workers' lives, a stop, a reload.

use super::ReloadError;
use super::clients::{self, Clients};
use super::daemon::Announce;
use super::metrics_server::{self, Ask};
use super::reload::{self, Reload};
use super::supervisor::{self, Handover, Supervisor};
use super::{Source, notify};
use crate::config::ServerConfig;
use crate::control::{Reply, StopMode};
use crate::sys;
use mio::net::UnixStream;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

const SIGNALS: Token = Token(0);
pub(super) const CONTROL: Token = Token(1);

pub(super) struct Stopping {
    mode: StopMode,
    /// When the master SIGKILLs what is left (none for `stop -g`).
    kill_at: Option<Instant>,
    /// CLI clients waiting for the stop to finish.
    pub(super) waiters: Vec<UnixStream>,
}

pub struct Master {
    pub(super) server: ServerConfig,
    pub(super) source: Source,
    pub(super) config_label: String,
    pub(super) sup: Supervisor,
    pub(super) clients: Clients,
    pub(super) announce: Announce,
    pub(super) daemon: bool,
    pub(super) started: SystemTime,
    pub(super) started_at: Instant,
    pub(super) stopping: Option<Stopping>,
    pub(super) reload: Option<Reload>,
    pub(super) queries: Vec<super::requests::Query>,
    pub(super) next_query: u64,
    pub(super) exit_code: i32,
    /// `[metrics]`: the Prometheus and health listener, if configured.
    pub(super) metrics: Option<super::metrics_server::MetricsServer>,
    /// The binary this master runs, for `wsd upgrade` without `--binary`.
    pub(super) exe: std::path::PathBuf,
    /// The pid file's locked descriptors, for the master an upgrade starts.
    pub(super) pid_file_fds: Vec<std::os::fd::RawFd>,
    /// `wsd upgrade` under way: the next master.
    pub(super) successor: Option<super::upgrade::Successor>,
    /// `wsd upgrade` under way: the new binary's `check`, before it starts.
    pub(super) checking: Option<super::upgrade::Checking>,
    /// Started by `wsd upgrade`: the master this one replaces, until it has gone.
    pub(super) predecessor: Option<super::upgrade::Predecessor>,
    /// The next master is in charge: exit leaving the pid file and the control socket to it.
    pub(super) handed_over: bool,
}

impl Master {
    pub fn new(
        server: ServerConfig,
        source: Source,
        sup: Supervisor,
        control: std::os::unix::net::UnixListener,
        announce: Announce,
        metrics: Option<super::metrics_server::MetricsServer>,
    ) -> Master {
        let daemon = matches!(announce, Announce::Pipe(_));
        let config_label = source
            .file
            .as_ref()
            .map_or("(none)".to_string(), |p| p.display().to_string());
        Master {
            server,
            source,
            config_label,
            sup,
            clients: Clients::new(control),
            announce,
            daemon,
            started: SystemTime::now(),
            started_at: Instant::now(),
            stopping: None,
            reload: None,
            queries: Vec::new(),
            next_query: 0,
            exit_code: 0,
            metrics,
            exe: std::env::current_exe().unwrap_or_default(),
            pid_file_fds: Vec::new(),
            successor: None,
            checking: None,
            predecessor: None,
            handed_over: false,
        }
    }
}

/// Runs the master to the end. Returns the exit code and the CLI clients waiting for the stop
/// to finish: the caller answers them once the pid file and socket are gone, so a `restart`
/// that starts right after cannot find the old master's lock still held.
pub fn run(mut m: Master) -> (i32, Vec<UnixStream>, bool) {
    crate::logging::set_role("master");
    let code = match m.serve() {
        Ok(()) => m.exit_code,
        Err(e) => {
            log::error!("master failed: {e}");
            m.announce.failed(&format!("master failed: {e}"));
            for pid in m.sup.live_pids().collect::<Vec<_>>() {
                sigkill(pid);
            }
            1
        }
    };
    let waiters = m.stopping.take().map(|s| s.waiters).unwrap_or_default();
    (code, waiters, m.handed_over)
}

impl Master {
    fn serve(&mut self) -> io::Result<()> {
        let signals = sys::signal_fd()?;
        let mut poll = Poll::new()?;
        let registry = poll.registry().try_clone()?;
        registry.register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        match &mut self.predecessor {
            // The old master answers on the control socket until it has gone.
            Some(pre) => pre.register(&registry)?,
            None => registry.register(self.clients.listener(), CONTROL, Interest::READABLE)?,
        }
        if let Some(m) = &mut self.metrics {
            m.register(&registry)?;
        }
        // After `wsd upgrade`, the slots whose old workers hand their clients over start one
        // at a time, each once the one before has taken its clients (`hand_from_predecessor`):
        // the old workers keep both cores for their clients meanwhile.
        let mut deferring = false;
        for g in 0..self.sup.groups.len() {
            for slot in 0..self.sup.groups[g].slots.len() {
                let pending = (self.sup.upgrade_pending)
                    .contains(&(self.sup.groups[g].name().to_string(), slot));
                if pending && deferring {
                    continue;
                }
                deferring |= pending;
                self.sup.spawn(g, slot, &registry)?;
            }
        }
        log::info!(
            "master pid {} started {} worker(s)",
            std::process::id(),
            self.sup.procs.len()
        );
        let mut events = Events::with_capacity(256);
        loop {
            if self.upgrade_done() {
                self.hand_over_to_successor(&registry);
                return Ok(());
            }
            if self.stopping.is_some() && self.sup.procs.is_empty() {
                log::info!("all workers stopped; master exits");
                self.announce
                    .failed("stopped before every worker was ready");
                return Ok(());
            }
            let timeout = self
                .next_deadline()
                .map(|t| t.saturating_duration_since(Instant::now()));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.read_signals(&signals, &registry),
                    CONTROL => self.clients.accept(&registry),
                    super::upgrade::LINK if self.successor.is_some() => {
                        self.successor_says(&registry)
                    }
                    super::upgrade::LINK => self.predecessor_says(&registry)?,
                    metrics_server::LISTENER => {
                        if let Some(m) = &mut self.metrics {
                            m.accept(&registry);
                        }
                    }
                    t if (metrics_server::CONN_BASE..supervisor::CHANNEL_BASE).contains(&t.0) => {
                        self.scrape(t.0 - metrics_server::CONN_BASE, &registry);
                    }
                    t if t.0 >= supervisor::CHANNEL_BASE => {
                        if let Some(key) = supervisor::token_proc(t) {
                            for rows in self.sup.read_channel(key) {
                                self.add_rows(key, rows, &registry);
                            }
                        }
                    }
                    t => {
                        if let Some(key) = clients::token_client(t)
                            && let Some(req) = self.clients.ready(key, &registry)
                        {
                            self.request(key, req, &registry);
                        }
                    }
                }
            }
            self.hand_from_predecessor();
            self.check_ready();
            self.run_deadlines(&registry);
            self.advance_reload(&registry);
        }
    }

    /// When retiring worker `p` is killed if it is still running. One that has handed its
    /// connections to the next master's keeps its line for them to come back until the
    /// upgrade is done, however long the new master takes: its deadline runs from then.
    fn kill_at(&self, p: &supervisor::Proc) -> Option<Instant> {
        let upgrading = self.successor.as_ref().is_some_and(|s| !s.ready());
        let kept = upgrading && matches!(p.handing, Some(supervisor::Handing::Away));
        p.retiring.filter(|_| !kept)
    }

    fn next_deadline(&self) -> Option<Instant> {
        let respawns = self
            .sup
            .groups
            .iter()
            .flat_map(|g| g.slots.iter().filter_map(|s| s.respawn_at))
            .filter(|_| self.stopping.is_none());
        let retiring = (self.sup.procs.iter()).filter_map(|(_, p)| self.kill_at(p));
        let kill_at = self.stopping.as_ref().and_then(|s| s.kill_at);
        let reload = self.reload.as_ref().and_then(|r| r.deadline());
        let queries = self.queries.iter().map(|q| q.deadline);
        respawns
            .chain(retiring)
            .chain(kill_at)
            .chain(reload)
            .chain(queries)
            .chain(self.clients.next_deadline())
            .chain(self.metrics.as_ref().and_then(|m| m.next_deadline()))
            .min()
    }

    fn run_deadlines(&mut self, registry: &Registry) {
        let now = Instant::now();
        let due: Vec<usize> = (self.sup.procs.iter())
            .filter(|(_, p)| self.kill_at(p).is_some_and(|t| now >= t))
            .map(|(key, _)| key)
            .collect();
        for key in due {
            let p = &mut self.sup.procs[key];
            log::warn!(
                "worker {}#{} pid {} still running after its deadline; killing it",
                p.group,
                p.slot,
                p.pid
            );
            sigkill(p.pid);
            p.retiring = Some(now + Duration::from_secs(1));
        }
        self.clients.expire(now, registry);
        if let Some(m) = &mut self.metrics {
            m.expire(now, registry);
        }
        while let Some(i) = self.queries.iter().position(|q| now >= q.deadline) {
            let q = self.queries.swap_remove(i);
            self.answer_query(q, registry);
        }
        if let Some(st) = &mut self.stopping {
            if st.kill_at.is_some_and(|t| now >= t) {
                st.kill_at = None;
                for (_, p) in self.sup.procs.iter() {
                    log::warn!(
                        "worker {}#{} pid {} still running after stop_timeout; killing it",
                        p.group,
                        p.slot,
                        p.pid
                    );
                    sigkill(p.pid);
                }
            }
            return;
        }
        for g in 0..self.sup.groups.len() {
            for slot in 0..self.sup.groups[g].slots.len() {
                let s = &mut self.sup.groups[g].slots[slot];
                if s.respawn_at.is_some_and(|t| now >= t) {
                    s.respawn_at = None;
                    let name = self.sup.groups[g].name().to_string();
                    match self.sup.spawn(g, slot, registry) {
                        Ok(_) => {}
                        Err(e) => {
                            log::error!("cannot fork worker {name}#{slot}: {e}");
                            self.sup.groups[g].schedule_respawn(slot);
                        }
                    }
                }
            }
        }
    }

    /// Answers a scraper on metrics connection `key`, if its request is whole.
    fn scrape(&mut self, key: usize, registry: &Registry) {
        let Some(ask) = self.metrics.as_mut().and_then(|m| m.ready(key, registry)) else {
            return;
        };
        let (response, head_only) = match ask {
            Ask::Metrics { head_only } => {
                let body = crate::metrics::exposition(&self.status()).into_bytes();
                let r = crate::api::http::Response {
                    status: 200,
                    content_type: crate::metrics::CONTENT_TYPE,
                    body,
                    allow: None,
                };
                (r, head_only)
            }
            Ask::Health { head_only } => {
                let (ready, slots) = self.readiness();
                let body = serde_json::json!({
                    "status": if ready { "ok" } else { "unavailable" },
                    "ready_workers": slots.0,
                    "workers": slots.1,
                });
                let status = if ready { 200 } else { 503 };
                (crate::api::http::Response::json(status, &body), head_only)
            }
        };
        if let Some(m) = &mut self.metrics {
            m.answer(key, &response, head_only, registry);
        }
    }

    /// Whether the server serves fully: not stopping, and every slot's worker ready (a
    /// reload's replacement counts once it is); with (ready slots, slots).
    fn readiness(&self) -> (bool, (usize, usize)) {
        let procs = &self.sup.procs;
        let slots = self.sup.groups.iter().flat_map(|g| g.slots.iter());
        let (mut ready, mut all) = (0, 0);
        for s in slots {
            all += 1;
            if s.proc
                .is_some_and(|k| procs.get(k).is_some_and(|p| p.ready))
            {
                ready += 1;
            }
        }
        (self.stopping.is_none() && ready == all, (ready, all))
    }

    /// Announces the start once every slot's worker has said it is ready.
    fn check_ready(&mut self) {
        if matches!(self.announce, Announce::Done) || self.stopping.is_some() {
            return;
        }
        let procs = &self.sup.procs;
        let all_ready = self.sup.groups.iter().all(|g| {
            g.slots.iter().all(|s| {
                s.proc
                    .is_some_and(|k| procs.get(k).is_some_and(|p| p.ready))
            })
        });
        if all_ready {
            log::info!("all workers ready");
            notify::ready(&self.serving_line());
            let banner = super::banner(&self.sup.groups, self.sup.api.as_ref(), self.daemon);
            self.announce.ready(&banner);
        }
    }

    /// "serving: echo x4 on websocket://127.0.0.1:2346, …" for systemd's status line.
    pub(super) fn serving_line(&self) -> String {
        let groups: Vec<String> = self
            .sup
            .groups
            .iter()
            .map(|g| format!("{} x{} on {}", g.name(), g.slots.len(), g.listen))
            .collect();
        format!("serving: {}", groups.join(", "))
    }

    fn read_signals(&mut self, signals: &SignalFd, registry: &Registry) {
        while let Ok(Some(info)) = signals.read_signal() {
            let Ok(sig) = Signal::try_from(info.ssi_signo as i32) else {
                continue;
            };
            match sig {
                Signal::SIGCHLD => self.reap(registry),
                Signal::SIGTERM => self.begin_stop(StopMode::Close, "SIGTERM", registry),
                Signal::SIGINT | Signal::SIGQUIT => {
                    self.begin_stop(StopMode::Fast, sig.as_str(), registry)
                }
                Signal::SIGUSR1 | Signal::SIGHUP => {
                    if let Err(e) =
                        self.begin_reload(sig.as_str(), None, reload::Scope::All, registry)
                    {
                        log::error!("reload refused: {e}");
                    }
                }
                Signal::SIGUSR2 => {
                    log::info!("SIGUSR2: upgrading to {}", self.exe.display());
                    if let Err(e) = self.begin_upgrade(None, None) {
                        log::error!("upgrade refused: {e}");
                    }
                }
                _ => {}
            }
        }
    }

    fn reap(&mut self, registry: &Registry) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            if self.checking.as_ref().map(|c| c.pid()) == status.pid() {
                self.check_done(status, registry);
                continue;
            }
            if self.successor.as_ref().map(|s| s.pid) == status.pid() {
                self.successor_exited(&supervisor::describe(status), registry);
                continue;
            }
            let Some(exit) = self.sup.reaped(status, self.stopping.is_some(), registry) else {
                continue;
            };
            self.forget_in_queries(exit.proc, registry);
            let dead = supervisor::ProcRef {
                key: exit.proc,
                pid: exit.pid,
            };
            if let Some(giver) = self.sup.handoff_target_died(dead, &exit.group, exit.slot) {
                let why = format!(
                    "the new worker {}#{} (pid {}) {} while {giver} was handing it connections; \
                     {giver} serves those it had not taken until the slot's next worker",
                    exit.group, exit.slot, exit.pid, exit.how
                );
                log::error!("{why}");
                if let Some(r) = &mut self.reload {
                    r.note_failure(why);
                }
            }
            self.predecessor_taker_died(&exit);
            if let Some(r) = &mut self.reload
                && r.worker_exited(&mut self.sup, &exit)
            {
                continue;
            }
            if self.stopping.is_some() || !exit.current {
                continue;
            }
            let Some(g) = self.sup.group_index(&exit.group) else {
                continue;
            };
            let group = &mut self.sup.groups[g];
            if group.crash_looping() {
                let reason = format!(
                    "every worker of group {:?} failed at start {} times in a row; giving up",
                    exit.group,
                    supervisor::BOOT_FAILURES
                );
                log::error!("{reason}");
                self.announce.failed(&reason);
                self.exit_code = 1;
                self.begin_stop(StopMode::Close, "crash loop", registry);
                continue;
            }
            let delay = group.schedule_respawn(exit.slot);
            let line = format!(
                "worker {}#{} {}; respawning in {delay:?}",
                exit.group, exit.slot, exit.how
            );
            log::info!("{line}");
            notify::status(&line);
        }
    }

    pub(super) fn begin_stop(&mut self, mode: StopMode, why: &str, registry: &Registry) {
        let spread = self.server.close_spread;
        if let Some(st) = &mut self.stopping {
            if mode > st.mode {
                log::info!("stopping harder ({why}): {mode:?}");
                st.mode = mode;
                st.kill_at
                    .get_or_insert(Instant::now() + self.server.stop_timeout);
                let keys: Vec<usize> = self.sup.procs.iter().map(|(k, _)| k).collect();
                for key in keys {
                    self.sup.stop(key, mode, spread);
                }
            }
            return;
        }
        let how = match mode {
            StopMode::Drain => ", waiting for clients to leave",
            StopMode::Close => "",
            StopMode::Fast => ", fast",
        };
        log::info!("stopping ({why}{how})");
        notify::stopping(&format!("stopping ({why})"));
        if let Some(r) = self.reload.take() {
            for key in r.waiters {
                let reply = Reply::error("the reload was interrupted: the server is stopping");
                self.clients.reply(key, &reply, registry);
            }
        }
        let kill_at = (mode != StopMode::Drain).then(|| Instant::now() + self.server.stop_timeout);
        self.stopping = Some(Stopping {
            mode,
            kill_at,
            waiters: Vec::new(),
        });
        for g in &mut self.sup.groups {
            for s in &mut g.slots {
                s.respawn_at = None;
            }
            // No worker will accept again. Once the workers drop their copies too, the port
            // closes: a new client is refused at once (and a load balancer fails over)
            // instead of waiting in an accept queue until the master exits and resets it.
            g.listeners.clear();
        }
        let keys: Vec<usize> = self.sup.procs.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.sup.stop(key, mode, spread);
        }
    }

    // ---- reload -------------------------------------------------------------------------

    /// Re-reads the config and starts replacing workers (those of `scope`). `Err` (nothing
    /// touched) if the config is bad or a reload cannot happen now.
    pub(super) fn begin_reload(
        &mut self,
        why: &str,
        waiter: Option<usize>,
        scope: reload::Scope,
        registry: &Registry,
    ) -> Result<(), ReloadError> {
        if self.stopping.is_some() {
            return Err(ReloadError::Stopping);
        }
        if let Some(r) = &self.reload {
            return Err(ReloadError::InProgress(r.started.elapsed()));
        }
        let again = self.source.reread(&self.server)?;
        let (server, file_groups) = (again.server, again.groups);
        let api = if again.from_file {
            again.api
        } else {
            self.sup.api.as_ref().map(|a| a.config.clone())
        };
        let prepared = reload::prepare(&self.sup, file_groups, api.as_ref(), scope)?;
        log::info!("reloading ({why}): {}", prepared.summary.join("; "));
        notify::reloading();
        self.sup.creds = super::privileges::for_workers(&server);
        self.server = server;
        let mut r = reload::apply(&mut self.sup, prepared);
        if let (Some(slots), Some(config)) = (self.sup.api.as_mut(), api) {
            slots.config = config;
        }
        self.sup.fit_api();
        r.waiters.extend(waiter);
        self.reload = Some(r);
        self.advance_reload(registry);
        Ok(())
    }

    fn advance_reload(&mut self, registry: &Registry) {
        let Some(r) = &mut self.reload else { return };
        let times = Handover {
            spread: self.server.close_spread,
            drain: self.server.drain_timeout,
            timeout: self.server.reload_timeout,
        };
        r.advance(&mut self.sup, registry, times);
        if !r.is_done(&self.sup) {
            return;
        }
        let r = self.reload.take().expect("checked above");
        let took = r.started.elapsed().as_secs_f64();
        let summary = r.summary.join("; ");
        let reply = match &r.failure {
            None => {
                log::info!("reload done in {took:.1}s");
                Reply {
                    message: Some(format!("reloaded in {took:.1}s: {summary}")),
                    ..Reply::ok()
                }
            }
            Some(f) => Reply::error(format!("reload failed: {f} (planned: {summary})")),
        };
        notify::ready(&self.serving_line());
        for key in r.waiters {
            self.clients.reply(key, &reply, registry);
        }
    }
}

/// SIGKILLs a worker; a failure (EPERM: the master lacks CAP_KILL over a worker that switched
/// users) is logged, since the master would otherwise wait for it forever in silence.
pub(super) fn sigkill(pid: nix::unistd::Pid) {
    if let Err(e) = kill(pid, Signal::SIGKILL) {
        log::error!("cannot SIGKILL worker pid {pid}: {e}");
    }
}
