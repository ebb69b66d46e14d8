//! Rolling reload: `wsd reload`, SIGUSR1, SIGHUP.
//!
//! Two phases. [`prepare`] reads nothing but the new group definitions and does everything
//! that can fail — binding the sockets of new groups and new slots — before anything running
//! is touched, so a reload that cannot happen leaves every worker as it was. [`apply`] then
//! rewires the groups and returns the [`Reload`] to carry out, one slot at a time: start the
//! slot's new worker on the slot's socket (which the master has held all along, so no client
//! is refused), wait until it is ready, then retire the old worker (Close 1001 to its
//! clients, spread over `close_spread`, SIGKILL at `reload_timeout`). Slots and groups that
//! are gone are retired last.

use super::listeners;
use super::supervisor::{Exit, Group, Slot, Supervisor};
use crate::bus::mesh::Mesh;
use crate::worker::Worker;
use mio::Registry;
use std::collections::VecDeque;
use std::net::TcpListener;
use std::time::{Duration, Instant};

/// What becomes of one group of the new configuration.
///
/// Every group whose workers are replaced gets a new bus mesh: the new workers talk among
/// themselves from the start, and no bus end is ever read by an old and a new worker at once.
pub enum Change {
    /// A running group kept as it is: a group defined in code (its workers are replaced, on
    /// `mesh`, unless it is not reloadable) or a `reloadable = false` one (`mesh` none).
    Keep { old: usize, mesh: Option<Mesh> },
    /// Same name and address: new settings, maybe a new count (`more` sockets for new slots).
    Update {
        old: usize,
        def: Worker,
        more: Vec<TcpListener>,
        mesh: Mesh,
    },
    /// A new group, or one whose address changed.
    Fresh(Group),
}

/// A reload that can go ahead.
pub struct Prepared {
    changes: Vec<Change>,
    /// One line per group for the operator.
    pub summary: Vec<String>,
}

/// Checks the new file groups against the running ones and binds every new socket.
/// Groups defined in code are carried over. Nothing running is touched.
pub fn prepare(sup: &Supervisor, file_groups: Vec<Worker>) -> Result<Prepared, String> {
    let mut changes = Vec::new();
    let mut summary = Vec::new();
    let wire = |slots: usize| Mesh::new(slots).map_err(|e| format!("cannot wire the bus: {e}"));
    for (old, g) in sup.groups.iter().enumerate().filter(|(_, g)| !g.from_file) {
        let replace = g.def.reloadable;
        let mesh = if replace {
            Some(wire(g.slots.len())?)
        } else {
            None
        };
        changes.push(Change::Keep { old, mesh });
        summary.push(kept(g, replace));
    }
    for def in file_groups {
        let name = def.name().to_string();
        let old = sup.group_index(&name).filter(|&i| sup.groups[i].from_file);
        let change = match old.map(|i| (i, &sup.groups[i])) {
            Some((old, g)) if !g.def.reloadable => {
                let mut line = kept(g, false);
                if g.def.config() != def.config() {
                    line += "; its new settings apply at the next restart";
                }
                summary.push(line);
                Change::Keep { old, mesh: None }
            }
            Some((old, g)) if g.def.listen == def.listen => {
                let (have, want) = (g.slots.len(), def.count);
                let addr = g.listeners[0].local_addr().map_err(|e| e.to_string())?;
                let more = listeners::bind_more(addr, want.saturating_sub(have), def.backlog)
                    .map_err(|e| format!("group {name:?}: {e}"))?;
                summary.push(if have == want {
                    format!("{name}: {want} worker(s) replaced")
                } else {
                    format!("{name}: {have} -> {want} worker(s)")
                });
                let mesh = wire(want)?;
                Change::Update {
                    old,
                    def,
                    more,
                    mesh,
                }
            }
            other => {
                let listeners = listeners::bind_slots(def.listen.addr, def.count, def.backlog)
                    .map_err(|e| format!("group {name:?}: {e}"))?;
                summary.push(match other {
                    Some(_) => format!("{name}: moved to {} ({} worker(s))", def.listen, def.count),
                    None => format!("{name}: added ({} worker(s))", def.count),
                });
                Change::Fresh(
                    Group::new(def, listeners, true)
                        .map_err(|e| format!("cannot wire the bus: {e}"))?,
                )
            }
        };
        changes.push(change);
    }
    let used = |i: usize| {
        changes.iter().any(|c| match c {
            Change::Keep { old, .. } | Change::Update { old, .. } => *old == i,
            Change::Fresh(_) => false,
        })
    };
    for (i, g) in sup.groups.iter().enumerate() {
        if !used(i) {
            summary.push(format!("{}: removed", g.name()));
        }
    }
    Ok(Prepared { changes, summary })
}

fn kept(g: &Group, replace: bool) -> String {
    if replace {
        format!("{}: {} worker(s) replaced", g.name(), g.slots.len())
    } else {
        format!("{}: kept (reloadable = false)", g.name())
    }
}

enum Step {
    /// Start the slot's new worker; once it is ready, retire the one it replaces (if any).
    Replace { group: String, slot: usize },
    /// Retire a worker whose slot or group is gone.
    Retire { proc: usize },
}

/// The new worker a slot is waiting for.
struct Waiting {
    group: String,
    slot: usize,
    new: usize,
    old: Option<usize>,
    deadline: Instant,
}

/// A reload under way.
pub struct Reload {
    steps: VecDeque<Step>,
    waiting: Option<Waiting>,
    /// Control clients waiting for the outcome.
    pub waiters: Vec<usize>,
    pub summary: Vec<String>,
    pub failure: Option<String>,
    pub started: Instant,
}

/// Rewires the groups as prepared and returns the steps that replace the workers.
pub fn apply(sup: &mut Supervisor, prepared: Prepared) -> Reload {
    let mut old: Vec<Option<Group>> = std::mem::take(&mut sup.groups)
        .into_iter()
        .map(Some)
        .collect();
    let mut replace = Vec::new();
    let mut retire = Vec::new();
    for change in prepared.changes {
        let group = match change {
            Change::Keep { old: i, mesh } => {
                let mut g = old[i].take().expect("each old group is used once");
                if let Some(mesh) = mesh {
                    g.mesh = mesh;
                    replace.extend((0..g.slots.len()).map(|s| (g.name().to_string(), s)));
                }
                g
            }
            Change::Update {
                old: i,
                def,
                more,
                mesh,
            } => {
                let mut g = old[i].take().expect("each old group is used once");
                if def.backlog != g.def.backlog {
                    for l in &g.listeners {
                        if let Err(e) = listeners::set_backlog(l, def.backlog) {
                            log::warn!("cannot change the backlog of {}: {e}", g.listen);
                        }
                    }
                }
                let want = def.count;
                g.mesh = mesh;
                g.def = def;
                g.listeners.extend(more);
                g.slots.resize_with(want.max(g.slots.len()), Slot::default);
                retire.extend(g.slots.drain(want..).filter_map(|s| s.proc));
                g.listeners.truncate(want);
                replace.extend((0..want).map(|s| (g.name().to_string(), s)));
                g
            }
            Change::Fresh(g) => {
                replace.extend((0..g.slots.len()).map(|s| (g.name().to_string(), s)));
                g
            }
        };
        sup.groups.push(group);
    }
    for g in old.into_iter().flatten() {
        retire.extend(g.slots.iter().filter_map(|s| s.proc));
    }
    let steps = replace
        .into_iter()
        .map(|(group, slot)| Step::Replace { group, slot })
        .chain(retire.into_iter().map(|proc| Step::Retire { proc }))
        .collect();
    Reload {
        steps,
        waiting: None,
        waiters: Vec::new(),
        summary: prepared.summary,
        failure: None,
        started: Instant::now(),
    }
}

impl Reload {
    /// Carries the reload forward as far as it can go now.
    pub fn advance(
        &mut self,
        sup: &mut Supervisor,
        registry: &Registry,
        spread: Duration,
        timeout: Duration,
    ) {
        let now = Instant::now();
        loop {
            if let Some(w) = &self.waiting {
                let Some(p) = sup.procs.get(w.new) else {
                    return; // Reaped: `worker_exited` has dealt with it.
                };
                if p.ready {
                    if let Some(old) = w.old {
                        sup.retire(old, spread, now + timeout);
                    }
                    self.waiting = None;
                } else if now >= w.deadline {
                    let why = format!(
                        "the new worker {}#{} (pid {}) was not ready within reload_timeout",
                        w.group, w.slot, p.pid
                    );
                    super::event_loop::sigkill(p.pid);
                    self.abandon(sup, why);
                } else {
                    return;
                }
            }
            match self.steps.pop_front() {
                None => return,
                Some(Step::Retire { proc }) => sup.retire(proc, spread, now + timeout),
                Some(Step::Replace { group, slot }) => {
                    let Some(g) = sup.group_index(&group) else {
                        continue;
                    };
                    let old = sup.groups[g].slots[slot].proc;
                    match sup.spawn(g, slot, registry) {
                        Ok(new) => {
                            self.waiting = Some(Waiting {
                                group,
                                slot,
                                new,
                                old,
                                deadline: now + timeout,
                            })
                        }
                        Err(e) => {
                            sup.groups[g].slots[slot].proc = old;
                            self.fail(sup, format!("cannot fork a worker for {group}#{slot}: {e}"));
                        }
                    }
                }
            }
        }
    }

    /// A worker exited; true if it was the new worker this reload was waiting for (the reload
    /// has then failed and the slot keeps its old worker).
    pub fn worker_exited(&mut self, sup: &mut Supervisor, exit: &Exit) -> bool {
        let Some(w) = &self.waiting else {
            return false;
        };
        if exit.proc != w.new {
            return false;
        }
        let why = format!(
            "the new worker {}#{} (pid {}) {} before it was ready",
            exit.group, exit.slot, exit.pid, exit.how
        );
        self.abandon(sup, why);
        true
    }

    /// Gives the waiting slot back to its old worker and fails the reload.
    fn abandon(&mut self, sup: &mut Supervisor, why: String) {
        if let Some(w) = self.waiting.take()
            && let Some(g) = sup.group_index(&w.group)
        {
            let slot = &mut sup.groups[g].slots[w.slot];
            if slot.proc == Some(w.new) || slot.proc.is_none() {
                slot.proc = w.old.filter(|k| sup.procs.contains(*k));
            }
            if let Some(p) = sup.procs.get_mut(w.new) {
                p.retiring = Some(Instant::now());
            }
        }
        self.fail(sup, why);
    }

    /// Stops replacing workers (slots not reached keep theirs; new slots not reached start
    /// later through the usual respawn); retirements still happen.
    fn fail(&mut self, sup: &mut Supervisor, why: String) {
        log::error!("reload failed: {why}");
        self.failure.get_or_insert(why);
        self.steps.retain(|s| matches!(s, Step::Retire { .. }));
        for g in &mut sup.groups {
            for slot in 0..g.slots.len() {
                if g.slots[slot].proc.is_none() && g.slots[slot].respawn_at.is_none() {
                    g.schedule_respawn(slot);
                }
            }
        }
    }

    /// Every step is done and every replaced worker has exited.
    pub fn is_done(&self, sup: &Supervisor) -> bool {
        self.steps.is_empty()
            && self.waiting.is_none()
            && sup.procs.iter().all(|(_, p)| p.retiring.is_none())
    }

    /// When the reload needs the loop to wake up.
    pub fn deadline(&self) -> Option<Instant> {
        self.waiting.as_ref().map(|w| w.deadline)
    }
}
