//! The old master's side of `wsd upgrade`: check the new binary, start it with what it
//! inherits, pass the handoff lines it sends on to the old workers, and leave once it is ready
//! and every old worker has gone; or serve on if it exits first.

use super::{Checking, ENV, GroupFds, Inheritance, LINK, LinkMsg, Successor};
use crate::control::Reply;
use crate::handoff::line::read_available;
use crate::master::UpgradeError;
use crate::master::event_loop::Master;
use crate::master::supervisor::Handing;
use crate::sys;
use mio::net::UnixStream;
use mio::{Interest, Registry};
use nix::unistd::Pid;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Instant;

impl Master {
    /// `wsd upgrade` (`waiter`: the control client to answer) or SIGUSR2: runs the new
    /// binary's `check` on this master's configuration; when it passes (`check_done`), the
    /// binary starts as the next master. `Err` says why nothing happened.
    pub(in crate::master) fn begin_upgrade(
        &mut self,
        waiter: Option<usize>,
        binary: Option<PathBuf>,
    ) -> Result<(), UpgradeError> {
        if self.stopping.is_some() {
            return Err(UpgradeError::Stopping);
        }
        let busy = self.checking.is_some() || self.successor.is_some();
        if self.reload.is_some() || busy || self.predecessor.is_some() {
            return Err(UpgradeError::Busy);
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
            .map_err(|source| UpgradeError::Run {
                binary: binary.clone(),
                source,
            })?;
        self.checking = Some(Checking {
            child,
            binary,
            waiters: waiter.into_iter().collect(),
        });
        Ok(())
    }

    /// The new binary's `check` has exited with `status`: on success it starts as the next
    /// master; otherwise `wsd upgrade` hears what it said.
    pub(in crate::master) fn check_done(
        &mut self,
        status: nix::sys::wait::WaitStatus,
        registry: &Registry,
    ) {
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
                Err(UpgradeError::Check {
                    binary: c.binary.clone(),
                    how: crate::master::supervisor::describe(status),
                    said: said.trim().to_string(),
                })
            }
        };
        match result {
            Ok(mut s) => {
                s.waiters = c.waiters;
                self.successor = Some(s);
            }
            Err(why) => {
                log::error!("upgrade refused: {why}");
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
    ) -> Result<Successor, UpgradeError> {
        let (mine, theirs) = std::os::unix::net::UnixStream::pair().map_err(UpgradeError::Link)?;
        let inheritance = Inheritance {
            old_pid: std::process::id() as i32,
            protocol: crate::handoff::line::PROTOCOL,
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
        let pid = (self.launch(binary, &inheritance)).map_err(|source| UpgradeError::Run {
            binary: binary.to_path_buf(),
            source,
        })?;
        drop(theirs);
        mine.set_nonblocking(true).map_err(UpgradeError::Link)?;
        let mut link = UnixStream::from_std(mine);
        (registry.register(&mut link, LINK, Interest::READABLE)).map_err(UpgradeError::Link)?;
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
    pub(in crate::master) fn successor_says(&mut self, registry: &Registry) {
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        let read = read_available(s.link.as_raw_fd(), &mut s.input, &mut s.fds);
        // A link that fails is as good as closed: the new master's exit decides the rest.
        let closed = read.unwrap_or(true);
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
                LinkMsg::Handoff {
                    group,
                    slot,
                    to,
                    protocol,
                } if protocol == crate::handoff::line::PROTOCOL => {
                    self.pass_handoff(&group, slot, to, fd)
                }
                LinkMsg::Handoff { protocol, .. } => log::warn!(
                    "the new master's workers speak handoff protocol {protocol}, this build's \
                     {}: its clients are closed with 1001 instead",
                    crate::handoff::line::PROTOCOL
                ),
                LinkMsg::Ready => self.successor_ready(),
                LinkMsg::Commit => log::warn!("the new master sent a commit; only this one does"),
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
        // The slot's worker; or the one already handing over, whose taker died (the new
        // master started another on the slot): it took back what was not acknowledged.
        let handing = (self.sup.procs.iter()).find(|(_, p)| {
            p.group == group && p.slot == slot && matches!(p.handing, Some(Handing::Away))
        });
        let old = (self.sup.groups[g].slots.get(slot).and_then(|s| s.proc))
            .or_else(|| handing.map(|(key, _)| key));
        let Some(old) = old else {
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
        let now = Instant::now();
        for key in leftovers {
            self.sup.retire(key, times.spread, now + times.timeout);
        }
        // The workers that handed their connections over waited for this with their lines
        // kept: their deadlines run from now.
        for (_, p) in self.sup.procs.iter_mut() {
            if let Some(Handing::Away) = p.handing {
                p.retiring = Some(now + times.drain + times.timeout);
            }
        }
        for g in &mut self.sup.groups {
            for s in &mut g.slots {
                s.respawn_at = None;
            }
        }
        // The new workers keep their handoff lines until now, to hand everything back if
        // their master died first; from here on, the old workers exit.
        let Some(s) = self.successor.as_mut() else {
            return;
        };
        if let Err(e) = (&s.link).write_all(&crate::control::line(&LinkMsg::Commit)) {
            log::warn!("cannot tell the new master the upgrade is done: {e}");
        }
    }

    /// The old master is done once the new one is ready and every old worker has exited.
    pub(in crate::master) fn upgrade_done(&self) -> bool {
        self.successor
            .as_ref()
            .is_some_and(|s| s.ready && self.sup.procs.is_empty())
    }

    /// Hands the server to the new master: systemd's main pid, the answer to `wsd upgrade`.
    pub(in crate::master) fn hand_over_to_successor(&mut self, registry: &Registry) {
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
    pub(in crate::master) fn successor_exited(&mut self, how: &str, registry: &Registry) {
        let Some(mut s) = self.successor.take() else {
            return;
        };
        let _ = registry.deregister(&mut s.link);
        let why = UpgradeError::SuccessorExited {
            pid: s.pid.as_raw(),
            how: how.to_string(),
            this: std::process::id(),
        };
        log::error!("upgrade failed: {why}");
        let times = self.handover_times();
        let mut restart = Vec::new();
        // Their deadlines waited for the upgrade to be done: they run from now.
        let deadline = Instant::now() + times.drain + times.timeout;
        for (_, p) in self.sup.procs.iter_mut() {
            if let Some(Handing::Away) = p.handing {
                p.retiring = Some(deadline);
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
            let reply = Reply::error(format!("upgrade failed: {why}"));
            self.clients.reply(key, &reply, registry);
        }
    }
}
