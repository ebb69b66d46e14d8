//! `wsd upgrade`: a new binary takes over from the running one, and no connection is dropped.
//!
//! nginx's binary upgrade, with the connections moved too. The running (old) master checks the
//! new binary (`check` on the same file), then starts it as its child with everything a master
//! holds left open across the `exec` and named in [`ENV`]: the pid file's locked descriptors,
//! the control socket, the listeners of every slot, the API's and the metrics' sockets, and the
//! bus ends of every group. A socket pair, the *link*, joins the two masters.
//!
//! The new master starts its workers on those sockets (a group whose count did not change on
//! the same bus ends, [`crate::master::supervisor::BusEnds::Inherited`]), and as each becomes
//! ready it makes a handoff line: one end to its worker, the other over the link to the old
//! master, which gives it to the old worker of that slot ([`LinkMsg::Handoff`]). The old
//! workers hand their connections over exactly as in a reload. Once every new worker is ready
//! ([`LinkMsg::Ready`]), the old master retires the workers nobody replaces, waits until all of
//! its workers have exited, tells systemd the new main pid, answers `wsd upgrade`, and exits
//! leaving the pid file and the control socket to the new master, which starts answering on
//! the socket when the link closes.
//!
//! If the new master exits before that, the old one keeps serving: its workers that had begun
//! handing over take back what was not acknowledged, and hand it to workers the old master
//! starts again on their slots (as after a taker's death in a reload). `wsd upgrade` exits 1
//! with the reason.

use super::event_loop::Master;
use super::supervisor::Handing;
use crate::control::{Reply, ToWorker};
use crate::sys;
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The environment variable that names the descriptors a new master inherits.
pub(super) const ENV: &str = "WSD_UPGRADE";
/// The link to the other master, in either master's poll.
pub(super) const LINK: Token = Token(3);

/// What the old master leaves open for the new one, by descriptor number.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Inheritance {
    pub old_pid: i32,
    /// The server's name on a cluster bus, kept so global connection ids stay valid.
    pub host_id: u64,
    pub pid_file: Vec<RawFd>,
    pub control: RawFd,
    pub metrics: Option<RawFd>,
    pub api: Vec<RawFd>,
    pub groups: Vec<GroupFds>,
    pub link: RawFd,
}

/// One group's sockets.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct GroupFds {
    pub name: String,
    /// Its `listen` as configured, to match the new configuration's.
    pub listen: String,
    pub listeners: Vec<RawFd>,
    /// `mesh[i][j]`: slot `i`'s end to slot `j`.
    pub mesh: Vec<Vec<Option<RawFd>>>,
}

impl Inheritance {
    /// Every descriptor it names.
    fn fds(&self) -> Vec<RawFd> {
        let mut all = vec![self.control, self.link];
        all.extend(&self.pid_file);
        all.extend(self.metrics);
        all.extend(&self.api);
        for g in &self.groups {
            all.extend(&g.listeners);
            all.extend(g.mesh.iter().flatten().flatten());
        }
        all
    }

    /// In the new master: what the old one left, if this start is an upgrade.
    pub(super) fn from_env() -> Option<Result<Inheritance, String>> {
        let text = std::env::var(ENV).ok()?;
        // Workers forked from here, and a later upgrade's master, must not take it for theirs.
        sys::forget_upgrade_env(ENV);
        Some(serde_json::from_str(&text).map_err(|e| format!("bad {ENV}: {e}")))
    }
}

/// Messages between the two masters, one JSON line each way on the link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "link", rename_all = "snake_case")]
pub(super) enum LinkMsg {
    /// New → old: the new worker `to` of `group`'s `slot` is ready; the descriptor sent with
    /// this line is a handoff line's end for that slot's old worker.
    Handoff { group: String, slot: usize, to: i32 },
    /// New → old: every new worker is ready.
    Ready,
}

/// The old master's side, first: the new binary's `check`, running.
pub(super) struct Checking {
    child: std::process::Child,
    binary: PathBuf,
    /// Control clients waiting for the outcome.
    waiters: Vec<usize>,
}

impl Checking {
    pub(super) fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }
}

/// The old master's side: the next master, started and not yet in charge.
pub(super) struct Successor {
    pub pid: Pid,
    link: UnixStream,
    input: Vec<u8>,
    fds: VecDeque<OwnedFd>,
    /// Control clients waiting for the outcome.
    waiters: Vec<usize>,
    /// It said every new worker is ready.
    ready: bool,
    started: Instant,
}

/// The new master's side: the master it replaces, until that one exits.
pub(super) struct Predecessor {
    pub pid: i32,
    link: UnixStream,
    ready_sent: bool,
    /// Ready workers whose slots wait for their turn to be handed over.
    ready: VecDeque<usize>,
    /// The worker taking its slot's connections now.
    current: Option<usize>,
}

impl Predecessor {
    /// Watches the link: it ends when the old master exits.
    pub(super) fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.link, LINK, Interest::READABLE)
    }

    pub(super) fn new(pid: i32, link: OwnedFd) -> io::Result<Predecessor> {
        let link = std::os::unix::net::UnixStream::from(link);
        link.set_nonblocking(true)?;
        Ok(Predecessor {
            pid,
            link: UnixStream::from_std(link),
            ready_sent: false,
            ready: VecDeque::new(),
            current: None,
        })
    }
}

impl Master {
    // ---- the old master ----------------------------------------------------------------

    /// `wsd upgrade`: runs the new binary's `check` on this master's configuration; when it
    /// passes (`check_done`), the binary starts as the next master. `Err` says why nothing
    /// happened.
    pub(super) fn begin_upgrade(
        &mut self,
        key: usize,
        binary: Option<PathBuf>,
    ) -> Result<(), String> {
        if self.stopping.is_some() {
            return Err("the server is stopping".into());
        }
        let busy = self.checking.is_some() || self.successor.is_some();
        if self.reload.is_some() || busy || self.predecessor.is_some() {
            return Err("a reload or an upgrade is under way".into());
        }
        let binary = binary.unwrap_or_else(|| self.exe.clone());
        let mut cmd = std::process::Command::new(&binary);
        if let Some(file) = &self.source.file {
            cmd.arg("-c").arg(file);
        }
        use std::process::Stdio;
        let child = (cmd.arg("check").stdin(Stdio::null()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
        self.checking = Some(Checking {
            child,
            binary,
            waiters: vec![key],
        });
        Ok(())
    }

    /// The new binary's `check` has exited with `status`: on success it starts as the next
    /// master; otherwise `wsd upgrade` hears what it said.
    pub(super) fn check_done(&mut self, status: nix::sys::wait::WaitStatus, registry: &Registry) {
        let Some(mut c) = self.checking.take() else {
            return;
        };
        let passed = matches!(status, nix::sys::wait::WaitStatus::Exited(_, 0));
        let result = match passed {
            true => self.launch_successor(&c.binary, registry),
            false => {
                let mut said = String::new();
                for pipe in [
                    c.child
                        .stderr
                        .take()
                        .map(|p| Box::new(p) as Box<dyn io::Read>),
                    c.child
                        .stdout
                        .take()
                        .map(|p| Box::new(p) as Box<dyn io::Read>),
                ]
                .into_iter()
                .flatten()
                {
                    let mut text = String::new();
                    let _ = { pipe }.read_to_string(&mut text);
                    if said.trim().is_empty() {
                        said = text;
                    }
                }
                let how = super::supervisor::describe(status);
                Err(format!(
                    "{} check {how}: {}",
                    c.binary.display(),
                    said.trim()
                ))
            }
        };
        match result {
            Ok(mut s) => {
                s.waiters = c.waiters;
                self.successor = Some(s);
            }
            Err(why) => {
                let reply = Reply::error(format!("upgrade refused: {why}"));
                for key in c.waiters {
                    self.clients.reply(key, &reply, registry);
                }
            }
        }
    }

    /// Starts `binary` as the next master, with the link to it.
    fn launch_successor(
        &mut self,
        binary: &Path,
        registry: &Registry,
    ) -> Result<Successor, String> {
        let (mine, theirs) = std::os::unix::net::UnixStream::pair()
            .map_err(|e| format!("cannot make the link to the new master: {e}"))?;
        let inheritance = Inheritance {
            old_pid: std::process::id() as i32,
            host_id: self.sup.host_id,
            pid_file: self.pid_file_fds.clone(),
            control: self.clients.listener().as_raw_fd(),
            metrics: self.metrics.as_ref().map(|m| m.fd()),
            api: self.sup.api.as_ref().map(|a| a.fds()).unwrap_or_default(),
            groups: (self.sup.groups.iter())
                .map(|g| GroupFds {
                    name: g.name().to_string(),
                    listen: g.def.listen.to_string(),
                    listeners: g.listeners.iter().map(|l| l.as_raw_fd()).collect(),
                    mesh: g.mesh.all_fds(),
                })
                .collect(),
            link: theirs.as_raw_fd(),
        };
        let pid = self
            .launch(binary, &inheritance)
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        drop(theirs);
        mine.set_nonblocking(true)
            .map_err(|e| format!("link to the new master: {e}"))?;
        let mut link = UnixStream::from_std(mine);
        registry
            .register(&mut link, LINK, Interest::READABLE)
            .map_err(|e| format!("link to the new master: {e}"))?;
        log::info!("upgrading: started {} as pid {pid}", binary.display());
        crate::master::notify::status(&format!("upgrading to pid {pid}"));
        Ok(Successor {
            pid,
            link,
            input: Vec::new(),
            fds: VecDeque::new(),
            waiters: Vec::new(),
            ready: false,
            started: Instant::now(),
        })
    }

    /// Starts `binary start` with the inherited descriptors left open across the `exec`.
    fn launch(&self, binary: &Path, inheritance: &Inheritance) -> io::Result<Pid> {
        let fds = inheritance.fds();
        for &fd in &fds {
            sys::set_inheritable(fd, true)?;
        }
        let mut cmd = std::process::Command::new(binary);
        if let Some(file) = &self.source.file {
            cmd.arg("-c").arg(file);
        }
        let json = serde_json::to_string(inheritance).map_err(io::Error::other)?;
        let spawned = cmd.arg("start").env(ENV, json).spawn();
        // Our own copies stay ours alone: workers forked later close them anyway, but a
        // second upgrade must not leak this one's descriptors.
        for &fd in &fds {
            let _ = sys::set_inheritable(fd, false);
        }
        Ok(Pid::from_raw(spawned?.id() as i32))
    }

    /// The link from the next master is readable: handoffs to pass on, its readiness, or its
    /// end.
    pub(super) fn successor_says(&mut self, registry: &Registry) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        let mut chunk = [0u8; 4096];
        let mut closed = false;
        loop {
            let mut fds = Vec::new();
            match sys::recv_with_fds(s.link.as_raw_fd(), &mut chunk, &mut fds) {
                Ok(0) => {
                    closed = true;
                    break;
                }
                Ok(n) => {
                    s.input.extend_from_slice(&chunk[..n]);
                    s.fds.extend(fds);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        let mut messages = Vec::new();
        while let Some(nl) = s.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = s.input.drain(..=nl).collect();
            match serde_json::from_slice::<LinkMsg>(&line[..nl]) {
                Ok(msg) => {
                    let fd = matches!(msg, LinkMsg::Handoff { .. })
                        .then(|| s.fds.pop_front())
                        .flatten();
                    messages.push((msg, fd));
                }
                Err(e) => log::warn!("bad line from the new master: {e}"),
            }
        }
        for (msg, fd) in messages {
            match msg {
                LinkMsg::Handoff { group, slot, to } => self.pass_handoff(&group, slot, to, fd),
                LinkMsg::Ready => self.successor_ready(),
            }
        }
        if closed && let Some(s) = self.successor.as_mut() {
            let _ = registry.deregister(&mut s.link);
        }
    }

    /// Gives the old worker of `group`'s `slot` the line to the new worker `to`.
    fn pass_handoff(&mut self, group: &str, slot: usize, to: i32, line: Option<OwnedFd>) {
        let Some(line) = line else {
            log::warn!("a handoff from the new master came without its line");
            return;
        };
        let Some(g) = self.sup.group_index(group) else {
            return; // A group this master does not run: the new worker's line just ends.
        };
        let Some(old) = self.sup.groups[g].slots.get(slot).and_then(|s| s.proc) else {
            return;
        };
        let times = self.handover_times();
        self.sup
            .hand_over_remote(old, line, to, times, Instant::now());
    }

    /// Every new worker is ready: the old workers nobody replaces are retired.
    fn successor_ready(&mut self) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        s.ready = true;
        let took = s.started.elapsed().as_secs_f64();
        log::info!("the new master's workers are all ready ({took:.1}s)");
        let times = self.handover_times();
        let leftovers: Vec<usize> = (self.sup.procs.iter())
            .filter(|(_, p)| p.retiring.is_none())
            .map(|(key, _)| key)
            .collect();
        let deadline = Instant::now() + times.timeout;
        for key in leftovers {
            self.sup.retire(key, times.spread, deadline);
        }
        for g in &mut self.sup.groups {
            for s in &mut g.slots {
                s.respawn_at = None;
            }
        }
    }

    /// The old master is done once the new one is ready and every old worker has exited.
    pub(super) fn upgrade_done(&self) -> bool {
        self.successor
            .as_ref()
            .is_some_and(|s| s.ready && self.sup.procs.is_empty())
    }

    /// Hands the server to the new master: systemd's main pid, the answer to `wsd upgrade`.
    pub(super) fn hand_over_to_successor(&mut self, registry: &Registry) {
        let Some(s) = self.successor.take() else {
            return;
        };
        let took = s.started.elapsed().as_secs_f64();
        crate::master::notify::main_pid(s.pid.as_raw() as u32);
        log::info!("upgraded in {took:.1}s: master pid {} serves now", s.pid);
        let reply = Reply {
            message: Some(format!(
                "upgraded in {took:.1}s: master pid {} serves now",
                s.pid
            )),
            ..Reply::ok()
        };
        for key in s.waiters {
            self.clients.reply(key, &reply, registry);
        }
        self.handed_over = true;
    }

    /// The next master exited before it took over: this one keeps serving. Its workers that
    /// were handing their connections over took back what was not acknowledged; they hand it
    /// to workers started again on their slots.
    pub(super) fn successor_exited(&mut self, how: &str, registry: &Registry) {
        let Some(mut s) = self.successor.take() else {
            return;
        };
        let _ = registry.deregister(&mut s.link);
        let why = format!(
            "upgrade failed: the new master (pid {}) {how} before it took over; this one \
             (pid {}) serves on",
            s.pid,
            std::process::id()
        );
        log::error!("{why}");
        let times = self.handover_times();
        let mut restart = Vec::new();
        for (_, p) in self.sup.procs.iter_mut() {
            if let Some(Handing::Away) = p.handing {
                p.handing = Some(Handing::Awaiting {
                    group: p.group.clone(),
                    slot: p.slot,
                    times,
                });
                restart.push((p.group.clone(), p.slot));
            }
        }
        for (group, slot) in restart {
            if let Some(g) = self.sup.group_index(&group) {
                self.sup.groups[g].schedule_respawn(slot);
            }
        }
        // Workers retired because the new configuration had no place for them are gone or
        // going; their slots start again too.
        for g in &mut self.sup.groups {
            for slot in 0..g.slots.len() {
                if g.slots[slot].proc.is_none() && g.slots[slot].respawn_at.is_none() {
                    g.schedule_respawn(slot);
                }
            }
        }
        crate::master::notify::ready(&self.serving_line());
        for key in s.waiters {
            self.clients
                .reply(key, &Reply::error(why.clone()), registry);
        }
    }

    // ---- the new master ----------------------------------------------------------------

    /// Makes a handoff line for each newly ready worker whose slot's old worker waits to hand
    /// over, and tells the old master once every worker is ready.
    pub(super) fn hand_from_predecessor(&mut self) {
        let Some(pre) = self.predecessor.as_mut() else {
            return;
        };
        for key in self.sup.take_newly_ready() {
            pre.ready.push_back(key);
        }
        // One slot at a time, as in a reload: the next once this one's worker has taken all.
        if let Some(k) = pre.current
            && self.sup.procs.get(k).is_some_and(|p| !p.taken)
        {
            return;
        }
        pre.current = None;
        while let Some(key) = pre.ready.pop_front() {
            let Some(p) = self.sup.procs.get_mut(key) else {
                continue;
            };
            let slot = (p.group.clone(), p.slot);
            if !self.sup.upgrade_pending.remove(&slot) {
                continue;
            }
            p.taken = false;
            pre.current = Some(key);
            let (group, slot) = slot;
            let to = p.pid.as_raw();
            let from = crate::bus::bridges::Peer {
                group: group.clone(),
                slot,
                pid: pre.pid,
            };
            let sent = std::os::unix::net::UnixStream::pair().and_then(|(give, take)| {
                let adopt = ToWorker::Adopt { from: Some(from) };
                if !self.sup.tell_with_fd(key, &adopt, take.as_raw_fd()) {
                    return Err(io::Error::other("its channel did not take the line"));
                }
                let msg = LinkMsg::Handoff { group, slot, to };
                let line = crate::control::line(&msg);
                sys::send_with_fd(pre.link.as_raw_fd(), &line, give.as_raw_fd()).map(|_| ())
            });
            if let Err(e) = sent {
                log::warn!("cannot pass a handoff line to the old master: {e}");
                self.sup.release(key);
                pre.current = None;
                continue;
            }
            break;
        }
        let all_ready = (self.sup.groups.iter()).all(|g| {
            g.slots
                .iter()
                .all(|s| s.proc.is_some_and(|k| self.sup.procs[k].ready))
        });
        if all_ready && self.sup.upgrade_pending.is_empty() && !pre.ready_sent {
            pre.ready_sent = true;
            let line = crate::control::line(&LinkMsg::Ready);
            if let Err(e) = (&pre.link).write_all(&line) {
                log::warn!("cannot tell the old master we are ready: {e}");
            }
        }
    }

    /// The link to the old master ended: it has exited (or died). This master takes over
    /// the control socket.
    pub(super) fn predecessor_gone(&mut self, registry: &Registry) -> io::Result<()> {
        let Some(mut pre) = self.predecessor.take() else {
            return Ok(());
        };
        let mut buf = [0u8; 64];
        loop {
            match io::Read::read(&mut pre.link, &mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.predecessor = Some(pre);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = registry.deregister(&mut pre.link);
        registry.register(
            self.clients.listener(),
            super::event_loop::CONTROL,
            Interest::READABLE,
        )?;
        log::info!(
            "the old master (pid {}) has gone: this one is in charge",
            pre.pid
        );
        // Slots still waiting for an old worker that never came read their bus ends now.
        for slot in std::mem::take(&mut self.sup.upgrade_pending) {
            if let Some(g) = self.sup.group_index(&slot.0)
                && let Some(key) = self.sup.groups[g].slots.get(slot.1).and_then(|s| s.proc)
            {
                self.sup.release(key);
            }
        }
        crate::master::notify::ready(&self.serving_line());
        Ok(())
    }

    fn handover_times(&self) -> super::supervisor::Handover {
        super::supervisor::Handover {
            spread: self.server.close_spread,
            drain: self.server.drain_timeout,
            timeout: self.server.reload_timeout,
        }
    }
}
