//! The master loop: one thread, one `mio::Poll` over the signalfd, the control socket and
//! every worker's channel. No threads ever (workers are forked from here), no blocking waits.

use super::daemon::Announce;
use super::supervisor::{self, Group};
use crate::config::ServerConfig;
use crate::control::{self, GroupStatus, LineReader, MasterStatus, Reply, Request, Status};
use crate::sys;
use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{Signal, kill};
use nix::sys::signalfd::SignalFd;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use slab::Slab;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
const CLIENT_BASE: usize = 16;

struct Client {
    stream: UnixStream,
    input: LineReader,
}

struct Stopping {
    graceful: bool,
    /// When the master SIGKILLs what is left (none for `stop -g`).
    kill_at: Option<Instant>,
    /// CLI clients waiting for the stop to finish.
    waiters: Vec<Client>,
}

pub struct Master {
    server: ServerConfig,
    config_label: String,
    groups: Vec<Group>,
    control: UnixListener,
    clients: Slab<Client>,
    announce: Announce,
    daemon: bool,
    started: SystemTime,
    started_at: Instant,
    stopping: Option<Stopping>,
    exit_code: i32,
}

impl Master {
    pub fn new(
        server: ServerConfig,
        config_label: String,
        groups: Vec<Group>,
        control: std::os::unix::net::UnixListener,
        announce: Announce,
    ) -> Master {
        let _ = control.set_nonblocking(true);
        let daemon = matches!(announce, Announce::Pipe(_));
        Master {
            server,
            config_label,
            groups,
            control: UnixListener::from_std(control),
            clients: Slab::new(),
            announce,
            daemon,
            started: SystemTime::now(),
            started_at: Instant::now(),
            stopping: None,
            exit_code: 0,
        }
    }
}

/// Runs the master to the end. Returns the exit code and the CLI clients waiting for the stop
/// to finish: the caller answers them once the pid file and socket are gone, so a `restart`
/// that starts right after cannot find the old master's lock still held.
pub fn run(mut m: Master) -> (i32, Vec<UnixStream>) {
    crate::logging::set_role("master");
    let code = match m.serve() {
        Ok(()) => m.exit_code,
        Err(e) => {
            log::error!("master failed: {e}");
            m.announce.failed(&format!("master failed: {e}"));
            for pid in m
                .groups
                .iter()
                .flat_map(|g| g.live_pids())
                .collect::<Vec<_>>()
            {
                let _ = kill(pid, Signal::SIGKILL);
            }
            1
        }
    };
    let waiters = m
        .stopping
        .take()
        .map(|s| s.waiters.into_iter().map(|c| c.stream).collect())
        .unwrap_or_default();
    (code, waiters)
}

impl Master {
    fn serve(&mut self) -> io::Result<()> {
        let signals = sys::signal_fd()?;
        let mut poll = Poll::new()?;
        poll.registry().register(
            &mut SourceFd(&signals.as_raw_fd()),
            SIGNALS,
            Interest::READABLE,
        )?;
        poll.registry()
            .register(&mut self.control, CONTROL, Interest::READABLE)?;
        for g in 0..self.groups.len() {
            for slot in 0..self.groups[g].slots.len() {
                self.groups[g].spawn(g, slot, poll.registry())?;
            }
        }
        log::info!(
            "master pid {} started {} worker(s)",
            std::process::id(),
            self.groups.iter().map(|g| g.slots.len()).sum::<usize>()
        );
        let mut events = Events::with_capacity(256);
        loop {
            if self.stopping.is_some() && self.groups.iter().all(|g| g.live_pids().next().is_none())
            {
                self.finish();
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
                    SIGNALS => self.read_signals(&signals, &poll),
                    CONTROL => self.accept_clients(&poll),
                    t if t.0 >= supervisor::CHANNEL_BASE => {
                        if let Some((g, slot)) = supervisor::token_slot(t)
                            && g < self.groups.len()
                            && slot < self.groups[g].slots.len()
                        {
                            // EOF just means the worker is exiting; SIGCHLD does the rest.
                            let _ = self.groups[g].read_channel(slot);
                        }
                    }
                    Token(t) => self.serve_client(t - CLIENT_BASE),
                }
            }
            self.check_ready();
            self.run_deadlines(&poll)?;
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let respawns = self
            .groups
            .iter()
            .flat_map(|g| g.slots.iter().filter_map(|s| s.respawn_at));
        let kill_at = self.stopping.as_ref().and_then(|s| s.kill_at);
        respawns.chain(kill_at).min()
    }

    fn run_deadlines(&mut self, poll: &Poll) -> io::Result<()> {
        let now = Instant::now();
        if let Some(st) = &mut self.stopping {
            if st.kill_at.is_some_and(|t| now >= t) {
                st.kill_at = None;
                for g in &self.groups {
                    for pid in g.live_pids() {
                        log::warn!(
                            "worker {} pid {pid} still running after stop_timeout; killing it",
                            g.name()
                        );
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                }
            }
            return Ok(());
        }
        for g in 0..self.groups.len() {
            for slot in 0..self.groups[g].slots.len() {
                let s = &mut self.groups[g].slots[slot];
                if s.respawn_at.is_some_and(|t| now >= t) {
                    s.respawn_at = None;
                    if let Err(e) = self.groups[g].spawn(g, slot, poll.registry()) {
                        log::error!("cannot fork worker {}#{slot}: {e}", self.groups[g].name());
                        self.groups[g].schedule_respawn(slot);
                    }
                }
            }
        }
        Ok(())
    }

    /// Announces the start once every worker has said it is ready.
    fn check_ready(&mut self) {
        if matches!(self.announce, Announce::Done) || self.stopping.is_some() {
            return;
        }
        if self.groups.iter().all(|g| g.slots.iter().all(|s| s.ready)) {
            log::info!("all workers ready");
            super::notify::ready(&self.serving_line());
            let banner = super::banner(&self.groups, self.daemon);
            self.announce.ready(&banner);
        }
    }

    /// "serving: echo ×4 on 127.0.0.1:2346, …" for systemd's status line.
    fn serving_line(&self) -> String {
        let groups: Vec<String> = self
            .groups
            .iter()
            .map(|g| format!("{} x{} on {}", g.name(), g.slots.len(), g.listen))
            .collect();
        format!("serving: {}", groups.join(", "))
    }

    fn read_signals(&mut self, signals: &SignalFd, poll: &Poll) {
        while let Ok(Some(info)) = signals.read_signal() {
            match Signal::try_from(info.ssi_signo as i32) {
                Ok(Signal::SIGCHLD) => self.reap(poll),
                Ok(Signal::SIGTERM) => self.begin_stop(false, "SIGTERM"),
                Ok(sig @ (Signal::SIGINT | Signal::SIGQUIT)) => {
                    self.begin_stop(false, sig.as_str())
                }
                Ok(sig) => log::info!("ignoring {sig} (not supported yet)"),
                Err(_) => {}
            }
        }
    }

    fn reap(&mut self, poll: &Poll) {
        loop {
            let status = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let Some(pid) = status.pid() else { continue };
            let Some((g, slot)) = self.find(pid) else {
                continue;
            };
            let how = self.groups[g].reaped(slot, status, poll.registry());
            if self.stopping.is_some() {
                continue;
            }
            let name = self.groups[g].name().to_string();
            super::notify::status(&format!("worker {name}#{slot} {how}; respawning"));
            if self.groups[g].crash_looping() {
                let reason = format!(
                    "every worker of group {:?} failed at start {} times in a row; giving up",
                    self.groups[g].name(),
                    supervisor::BOOT_FAILURES
                );
                log::error!("{reason}");
                self.announce.failed(&reason);
                self.exit_code = 1;
                self.begin_stop(false, "crash loop");
                continue;
            }
            self.groups[g].schedule_respawn(slot);
        }
    }

    fn find(&self, pid: nix::unistd::Pid) -> Option<(usize, usize)> {
        self.groups.iter().enumerate().find_map(|(g, grp)| {
            grp.slots
                .iter()
                .position(|s| s.pid == Some(pid))
                .map(|slot| (g, slot))
        })
    }

    fn begin_stop(&mut self, graceful: bool, why: &str) {
        if let Some(st) = &mut self.stopping {
            if st.graceful && !graceful {
                // A plain stop after `stop -g`: escalate to closing clients.
                st.graceful = false;
                st.kill_at = Some(Instant::now() + self.server.stop_timeout);
                for g in &mut self.groups {
                    for slot in 0..g.slots.len() {
                        g.tell_stop(slot, false);
                    }
                }
            }
            return;
        }
        log::info!(
            "stopping ({why}{})",
            if graceful {
                ", waiting for clients to leave"
            } else {
                ""
            }
        );
        super::notify::stopping(&format!("stopping ({why})"));
        let kill_at = (!graceful).then(|| Instant::now() + self.server.stop_timeout);
        self.stopping = Some(Stopping {
            graceful,
            kill_at,
            waiters: Vec::new(),
        });
        for g in &mut self.groups {
            for slot in 0..g.slots.len() {
                g.slots[slot].respawn_at = None;
                g.tell_stop(slot, graceful);
            }
        }
    }

    fn finish(&mut self) {
        log::info!("all workers stopped; master exits");
        self.announce
            .failed("stopped before every worker was ready");
    }

    // ---- control socket -----------------------------------------------------------------

    fn accept_clients(&mut self, poll: &Poll) {
        loop {
            match self.control.accept() {
                Ok((mut stream, _)) => {
                    let entry = self.clients.vacant_entry();
                    let token = Token(CLIENT_BASE + entry.key());
                    if poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert(Client {
                            stream,
                            input: LineReader::default(),
                        });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket accept: {e}");
                    return;
                }
            }
        }
    }

    fn serve_client(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let (lines, closed) = client.input.read_from(&mut client.stream);
        let Some(line) = lines.into_iter().next() else {
            if closed {
                self.clients.remove(key);
            }
            return;
        };
        let mut client = self.clients.remove(key);
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Status) => {
                let reply = Reply {
                    status: Some(self.status()),
                    ..Reply::ok()
                };
                send_reply(&mut client.stream, &reply);
            }
            Ok(Request::Stop { mode }) => {
                self.begin_stop(mode == control::StopMode::Drain, "wsd stop");
                if let Some(st) = &mut self.stopping {
                    st.waiters.push(client);
                }
            }
            Ok(other) => send_reply(
                &mut client.stream,
                &Reply::error(format!("not supported yet: {other:?}")),
            ),
            Err(e) => send_reply(
                &mut client.stream,
                &Reply::error(format!("bad request: {e}")),
            ),
        }
    }

    fn status(&self) -> Status {
        let now = Instant::now();
        let started_at = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        Status {
            master: MasterStatus {
                pid: std::process::id() as i32,
                version: crate::VERSION.into(),
                config: self.config_label.clone(),
                started_at,
                uptime_secs: self.started_at.elapsed().as_secs(),
                load_average: sys::load_average(),
                memory: sys::rss_bytes(),
            },
            groups: self
                .groups
                .iter()
                .map(|g| GroupStatus {
                    name: g.name().into(),
                    listen: g.listen.clone(),
                    count: g.slots.len(),
                    exits: g.exits.clone(),
                })
                .collect(),
            workers: self
                .groups
                .iter()
                .flat_map(|g| (0..g.slots.len()).map(move |s| g.worker_status(s, now)))
                .collect(),
        }
    }
}

/// Writes one reply line. The CLI reads promptly; a client that does not gets at most a second.
pub(super) fn send_reply(stream: &mut UnixStream, reply: &Reply) {
    let bytes = control::line(reply);
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut written = 0;
    while written < bytes.len() && Instant::now() < deadline {
        match stream.write(&bytes[written..]) {
            Ok(n) => written += n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                std::thread::sleep(Duration::from_millis(1))
            }
            Err(_) => return,
        }
    }
}
