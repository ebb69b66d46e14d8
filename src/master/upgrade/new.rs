//! The new master's side of `wsd upgrade`: take what the old master left open, hand each
//! ready worker's slot a line to the old worker, one slot at a time, and take over the control
//! socket once the old master has gone.

use super::{GroupFds, Inheritance, LinkMsg};
use crate::control::ToWorker;
use crate::handoff::line::read_available;
use crate::master::event_loop::Master;
use crate::sys;
use crate::worker::Worker;
use mio::{Interest, Registry};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// One group's sockets from the master an upgrade replaces: as named, its listeners, its bus
/// mesh's ends.
type InheritedGroup = (
    GroupFds,
    Vec<std::net::TcpListener>,
    Vec<Vec<Option<std::os::fd::OwnedFd>>>,
);

/// What a master started by `wsd upgrade` inherited, taken out as it is used; what is left
/// when the start is done (a group the new configuration has no more) is closed.
pub(in crate::master) struct Inherited {
    pub old_pid: i32,
    pub protocol: u16,
    pub host_id: u64,
    pub pid_file: Vec<std::fs::File>,
    pub control: Option<OwnedFd>,
    pub metrics: Option<OwnedFd>,
    pub api: Vec<std::net::TcpListener>,
    groups: Vec<InheritedGroup>,
    pub link: Option<OwnedFd>,
}

impl Inherited {
    /// Owns every descriptor `i` names; one that is not open is left out (and logged).
    pub fn take(i: Inheritance) -> Inherited {
        let own = |fd: RawFd| match sys::inherited_fd(fd) {
            Ok(fd) => Some(fd),
            Err(e) => {
                log::warn!("{e}");
                None
            }
        };
        let groups = (i.groups.into_iter())
            .map(|mut g| {
                let listeners = (std::mem::take(&mut g.listeners).into_iter())
                    .filter_map(own)
                    .map(std::net::TcpListener::from)
                    .collect();
                let mesh = (std::mem::take(&mut g.mesh).into_iter())
                    .map(|row| row.into_iter().map(|fd| fd.and_then(own)).collect())
                    .collect();
                (g, listeners, mesh)
            })
            .collect();
        Inherited {
            old_pid: i.old_pid,
            protocol: i.protocol,
            host_id: i.host_id,
            pid_file: i
                .pid_file
                .into_iter()
                .filter_map(own)
                .map(std::fs::File::from)
                .collect(),
            control: own(i.control),
            metrics: i.metrics.and_then(own),
            api: i
                .api
                .into_iter()
                .filter_map(own)
                .map(std::net::TcpListener::from)
                .collect(),
            groups,
            link: own(i.link),
        }
    }

    /// The old master's sockets for `def`, if it ran a group of that name on the same
    /// `listen`: one per slot of the old count, and its bus mesh (which wires at least as
    /// many). The group starts with the old count, so that each old worker hands its clients
    /// to the new worker of its own slot; a reload then brings it to `def.count`.
    pub fn group(
        &mut self,
        def: &Worker,
    ) -> Option<(Vec<std::net::TcpListener>, crate::bus::mesh::Mesh)> {
        let at = self
            .groups
            .iter()
            .position(|(g, _, _)| g.name == def.name() && g.listen == def.listen.to_string())?;
        let (_, listeners, mesh) = self.groups.swap_remove(at);
        let mesh = crate::bus::mesh::Mesh::from_ends(mesh);
        (!listeners.is_empty() && mesh.slots() >= listeners.len()).then_some((listeners, mesh))
    }
}

impl Master {
    /// Makes a handoff line for each newly ready worker whose slot's old worker waits to hand
    /// over, and tells the old master once every worker is ready.
    pub(in crate::master) fn hand_from_predecessor(&mut self) {
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
        if pre.current.take().is_some() || pre.ready.is_empty() {
            self.start_next_pending();
        }
        let Some(pre) = self.predecessor.as_mut() else {
            return;
        };
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
                let adopt = ToWorker::Adopt {
                    from: Some(from),
                    returnable: !pre.committed,
                    protocol: pre.protocol,
                };
                if !self.sup.tell_with_fd(key, &adopt, take.as_raw_fd()) {
                    return Err(io::Error::other("its channel did not take the line"));
                }
                let protocol = pre.protocol;
                let msg = LinkMsg::Handoff {
                    group,
                    slot,
                    to,
                    protocol,
                };
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
        // Once the last slot's clients are taken too: the old workers exit at the commit that
        // follows, and not on the cores a handoff is using.
        let taking = (pre.current).is_some_and(|k| self.sup.procs.get(k).is_some_and(|p| !p.taken));
        if all_ready && self.sup.upgrade_pending.is_empty() && !taking && !pre.ready_sent {
            pre.ready_sent = true;
            let line = crate::control::line(&LinkMsg::Ready);
            if let Err(e) = (&pre.link).write_all(&line) {
                log::warn!("cannot tell the old master we are ready: {e}");
            }
        }
    }

    /// Starts the next slot that waits for its old worker's clients and has no worker yet, if
    /// no such slot's worker is starting or taking clients now.
    fn start_next_pending(&mut self) {
        let slots = (self.sup.upgrade_pending.iter()).filter_map(|(group, slot)| {
            let g = self.sup.group_index(group)?;
            Some((g, *slot, self.sup.groups[g].slots.get(*slot)?))
        });
        let slots: Vec<_> = slots.collect();
        if slots
            .iter()
            .any(|(_, _, s)| s.proc.is_some() || s.respawn_at.is_some())
        {
            return;
        }
        let next = slots.first().map(|&(g, slot, _)| (g, slot));
        if let Some((g, slot)) = next {
            self.sup.groups[g].slots[slot].respawn_at = Some(std::time::Instant::now());
        }
    }

    /// A worker exited. If it was taking its slot's connections from the old master's worker
    /// (which takes back what it had not acknowledged), the slot waits again: the worker
    /// started again on it gets a new handoff line once it is ready.
    pub(in crate::master) fn predecessor_taker_died(
        &mut self,
        exit: &crate::master::supervisor::Exit,
    ) {
        let Some(pre) = self.predecessor.as_mut() else {
            return;
        };
        if pre.current != Some(exit.proc) {
            return;
        }
        pre.current = None;
        log::warn!(
            "the new worker {}#{} (pid {}) {} while taking its slot's connections; the worker \
             started again on the slot takes them",
            exit.group,
            exit.slot,
            exit.pid,
            exit.how
        );
        (self.sup.upgrade_pending).insert((exit.group.clone(), exit.slot));
    }

    /// The link from the old master is readable: its commit, or its end (it has exited, or
    /// died): then this master takes over the control socket.
    pub(in crate::master) fn predecessor_says(&mut self, registry: &Registry) -> io::Result<()> {
        let Some(pre) = self.predecessor.as_mut() else {
            return Ok(());
        };
        let mut strays = std::collections::VecDeque::new();
        // A link that fails is as good as closed.
        let closed =
            read_available(pre.link.as_raw_fd(), &mut pre.input, &mut strays).unwrap_or(true);
        let mut commit = false;
        while let Some(nl) = pre.input.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pre.input.drain(..=nl).collect();
            match serde_json::from_slice::<LinkMsg>(&line[..nl]) {
                Ok(LinkMsg::Commit) => commit = true,
                Ok(other) => log::warn!("unexpected line from the old master: {other:?}"),
                Err(e) => log::warn!("bad line from the old master: {e}"),
            }
        }
        if commit && !std::mem::replace(&mut pre.committed, true) {
            log::info!("the old master is leaving: the upgrade is done");
            self.sup.tell_all(&ToWorker::Commit);
        }
        if closed {
            self.predecessor_gone(registry)?;
        }
        Ok(())
    }

    /// The old master has exited (or died): this master takes over the control socket.
    fn predecessor_gone(&mut self, registry: &Registry) -> io::Result<()> {
        let Some(mut pre) = self.predecessor.take() else {
            return Ok(());
        };
        let _ = registry.deregister(&mut pre.link);
        if !pre.committed {
            // It died before it committed: there is nobody left to hand anything back to.
            self.sup.tell_all(&ToWorker::Commit);
        }
        registry.register(
            self.clients.listener(),
            crate::master::event_loop::CONTROL,
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
        if std::mem::take(&mut self.sup.recount_after_upgrade) {
            // Every slot took its own clients; now the count changes as in any reload,
            // every message reaching every client once, and the workers running stay.
            let scope = crate::master::reload::Scope::Count;
            if let Err(e) = self.begin_reload("upgrade to another count", None, scope, registry) {
                log::error!("cannot change the count after the upgrade: {e}");
            }
        }
        Ok(())
    }
}
