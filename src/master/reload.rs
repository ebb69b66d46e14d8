//! Rolling reload: `wsd reload`, SIGUSR1, SIGHUP.
//!
//! Two phases. [`prepare`] reads nothing but the new group definitions and does everything
//! that can fail (binding the sockets of new groups and new slots, growing a bus mesh) before
//! anything running is touched, so a reload that cannot happen leaves every worker as it was.
//! [`apply`] then rewires the groups and returns the [`Reload`] to carry out, one slot at a
//! time: start the slot's new worker on the slot's socket (which the master has held all
//! along, so no client is refused), wait until it is ready, then have the old worker hand its
//! connections over (`handoff`), or, for an app that cannot, retire it (Close 1001 to its
//! clients, spread over `close_spread`, SIGKILL at `reload_timeout`).
//!
//! A group's old and new workers share its bus mesh: each new worker takes over its slot's
//! ends, so the group is never split over two buses that do not hear each other. A higher
//! `count` grows the mesh, and the running workers send to the new slots from the start. A
//! lower one leaves the last slots' workers to move their clients to the others once every
//! slot below is replaced ([`Step::Merge`]), with the group's messages held meanwhile. If a new
//! worker fails to come up, the reload stops there: slots not reached keep their old workers,
//! on the same mesh, and the reload reports the failure. Groups that are gone are retired
//! last.

use super::listeners;
use super::supervisor::{BusEnds, Exit, Group, Handover, ProcRef, Slot, Supervisor};
use super::{GroupsError, ReloadError};
use crate::bus::mesh::Mesh;
use crate::worker::Worker;
use mio::Registry;
use std::collections::VecDeque;
use std::net::TcpListener;
use std::time::Instant;

/// What becomes of one group of the new configuration.
///
/// A group whose workers are replaced keeps its bus mesh ([`Wiring`]); a new group, or one
/// moved to another address, gets a mesh of its own.
pub enum Change {
    /// A running group kept as it is: a group defined in code (its workers are replaced, on
    /// `mesh`, unless it is not reloadable), a `reloadable = false` one, or a `wss://` group
    /// whose settings did not change (`mesh` none: its workers and their clients stay). `tls`:
    /// a renewed certificate, handed to the workers that stay and used by any that start.
    Keep {
        old: usize,
        bus: Wiring,
        tls: Option<Renewed>,
    },
    /// Same name and address: new settings, maybe a new count (`more` sockets for new slots).
    /// `kept`: the running workers stay ([`Scope::Count`]); only new slots start.
    Update {
        old: usize,
        def: Worker,
        more: Vec<TcpListener>,
        bus: Wiring,
        kept: bool,
    },
    /// A new group, or one whose address changed.
    Fresh(Group),
}

/// How a group's workers are on its bus after a reload.
pub enum Wiring {
    /// Its workers stay.
    Stays,
    /// Its workers are replaced on the running mesh: each new worker takes over its slot's
    /// ends once the old worker has handed its connections over, so no bus message is read by
    /// both or by neither, and the group is never split in two. A lower `count` leaves the
    /// mesh's last slots unused once their workers' clients have moved ([`Step::Merge`]).
    Inherited,
    /// As `Inherited`, on the running mesh grown for a `count` higher than it wires.
    Grown(Mesh),
}

/// Which workers a reload replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Every worker of a reloadable group: the settings, or the code the app runs (an exec
    /// handler's script, say), may be new.
    All,
    /// Only what a new `count` needs: the running workers run this configuration on this
    /// build already (the reload that follows `wsd upgrade` to another count). A group whose
    /// other settings differ is replaced all the same, and so is one whose bus mesh must grow
    /// (running workers have no ends to the new slots: [`Wiring::Grown`]).
    Count,
}

/// A reload that can go ahead.
pub struct Prepared {
    changes: Vec<Change>,
    /// One line per group for the operator.
    pub summary: Vec<String>,
}

/// Checks the new file groups against the running ones and binds every new socket.
/// Groups defined in code are carried over. Nothing running is touched.
pub fn prepare(
    sup: &Supervisor,
    file_groups: Vec<Worker>,
    api: Option<&crate::config::ApiConfig>,
    scope: Scope,
) -> Result<Prepared, ReloadError> {
    let code = sup.groups.iter().filter(|g| !g.from_file);
    let listens: Vec<_> = code
        .map(|g| (g.name(), &g.def.listen))
        .chain(file_groups.iter().map(|d| (d.name(), &d.listen)))
        .collect();
    let api_group = crate::config::check_runnable(&listens, api).map_err(GroupsError::Invalid)?;
    match &sup.api {
        Some(running) => running.reloadable(api, api_group.as_deref())?,
        None if api.is_some() => {
            return Err(ReloadError::TableNeedsRestart {
                table: "api",
                what: "table",
                old: "absent".into(),
                new: "present".into(),
            });
        }
        None => {}
    }
    let mut changes = Vec::new();
    let mut summary = Vec::new();
    for (old, g) in sup.groups.iter().enumerate().filter(|(_, g)| !g.from_file) {
        let replace = g.def.reloadable && scope == Scope::All;
        let bus = if replace {
            Wiring::Inherited
        } else {
            Wiring::Stays
        };
        let tls = reread_tls(g)?;
        let line = match scope {
            Scope::Count => format!("{}: kept (running this build)", g.name()),
            Scope::All => kept(g, replace),
        };
        summary.push(line + &renewed_note(&tls));
        changes.push(Change::Keep { old, bus, tls });
    }
    for def in file_groups {
        let name = def.name().to_string();
        let old = sup.group_index(&name).filter(|&i| sup.groups[i].from_file);
        let change = match old.map(|i| (i, &sup.groups[i])) {
            Some((old, g)) if !g.def.reloadable => {
                let tls = renewed(g, &def);
                let mut line = kept(g, false) + &renewed_note(&tls);
                if !same_settings(g, &def) {
                    line += "; its new settings apply at the next restart";
                }
                summary.push(line);
                Change::Keep {
                    old,
                    bus: Wiring::Stays,
                    tls,
                }
            }
            // A certificate renewal must not cost a wss:// group its clients.
            Some((old, g)) if g.def.scheme() == "wss://" && same_settings(g, &def) => {
                let tls = renewed(g, &def);
                summary.push(format!("{name}: kept (settings unchanged)") + &renewed_note(&tls));
                Change::Keep {
                    old,
                    bus: Wiring::Stays,
                    tls,
                }
            }
            Some((old, g)) if g.def.listen == def.listen => {
                let (have, want) = (g.slots.len(), def.count);
                let bind = |source| GroupsError::Bind {
                    group: name.clone(),
                    source,
                };
                let addr = g.listeners[0].local_addr().map_err(|error| {
                    bind(listeners::BindError {
                        addr: def.listen.addr,
                        error,
                    })
                })?;
                let more = listeners::bind_more(addr, want.saturating_sub(have), def.backlog)
                    .map_err(bind)?;
                let grown = want > g.mesh.slots();
                let kept = scope == Scope::Count && !grown && same_but_count(g, &def);
                summary.push(match (have == want, kept) {
                    (true, false) => format!("{name}: {want} worker(s) replaced"),
                    (true, true) => format!("{name}: kept (running this build)"),
                    (false, false) => format!("{name}: {have} -> {want} worker(s)"),
                    (false, true) => {
                        format!("{name}: {have} -> {want} worker(s), running ones kept")
                    }
                });
                let bus = match grown {
                    false => Wiring::Inherited,
                    true => Wiring::Grown(g.mesh.grown(want).map_err(GroupsError::Bus)?),
                };
                Change::Update {
                    old,
                    def,
                    more,
                    bus,
                    kept,
                }
            }
            other => {
                let listeners = listeners::bind_slots(def.listen.addr, def.count, def.backlog)
                    .map_err(|source| GroupsError::Bind {
                        group: name.clone(),
                        source,
                    })?;
                summary.push(match other {
                    Some(_) => format!("{name}: moved to {} ({} worker(s))", def.listen, def.count),
                    None => format!("{name}: added ({} worker(s))", def.count),
                });
                Change::Fresh(Group::new(def, listeners, true).map_err(GroupsError::Bus)?)
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

/// A group's new certificate, for the workers that keep serving.
#[cfg(feature = "tls")]
pub type Renewed = crate::tls::Identity;
/// Without TLS there is never a certificate to renew.
#[cfg(not(feature = "tls"))]
pub type Renewed = std::convert::Infallible;

/// The running group's settings and `def`'s are the same, certificates aside.
fn same_settings(g: &Group, def: &Worker) -> bool {
    #[cfg(feature = "tls")]
    {
        let mut new = def.config().clone();
        new.tls = g.def.tls.clone();
        new == *g.def.config()
    }
    #[cfg(not(feature = "tls"))]
    {
        def.config() == g.def.config()
    }
}

/// The running group's settings and `def`'s are the same, `count` aside (certificates
/// included).
fn same_but_count(g: &Group, def: &Worker) -> bool {
    let mut new = def.config().clone();
    new.count = g.def.config().count;
    new == *g.def.config()
}

/// `def`'s certificate, if it is not the one the running group serves.
fn renewed(g: &Group, def: &Worker) -> Option<Renewed> {
    #[cfg(feature = "tls")]
    if def.tls != g.def.tls {
        return def.tls.clone();
    }
    let _ = (g, def);
    None
}

/// A group defined in code reads its certificate files again.
fn reread_tls(g: &Group) -> Result<Option<Renewed>, ReloadError> {
    #[cfg(feature = "tls")]
    if g.def.tls.is_some() {
        let mut def = g.def.config().clone();
        def.load_tls().map_err(|source| ReloadError::Tls {
            group: g.name().to_string(),
            source,
        })?;
        if def.tls != g.def.tls {
            return Ok(def.tls);
        }
    }
    let _ = g;
    Ok(None)
}

/// "; certificate renewed (serial …)" for the operator, or nothing.
fn renewed_note(tls: &Option<Renewed>) -> String {
    #[cfg(feature = "tls")]
    if let Some(id) = tls {
        return format!("; certificate renewed (serial {})", id.serial());
    }
    let _ = tls;
    String::new()
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
    Replace {
        group: String,
        slot: usize,
        ends: BusEnds,
    },
    /// Retire a worker whose slot or group is gone, or an old worker that must not stay on
    /// its group's old bus mesh.
    /// `hand_to`: the group whose new workers take its connections (`handoff`), if one does.
    Retire {
        proc: ProcRef,
        hand_to: Option<String>,
    },
    /// Move the clients of a worker whose slot a lower `count` removed to the new worker of
    /// another slot, exactly once: every worker of the group holds its group messages, the
    /// two read what waits on their bus ends, the clients and the retiring worker's held
    /// messages cross, and the hold ends with the group sending to its new count of slots.
    Merge { proc: ProcRef, group: String },
}

/// A [`Step::Merge`] under way.
struct Merging {
    group: String,
    old: ProcRef,
    /// Waiting for every worker to hold (until this instant); then handing over.
    holding_until: Option<Instant>,
}

/// The new worker a slot is waiting for.
struct Waiting {
    group: String,
    slot: usize,
    new: ProcRef,
    old: Option<ProcRef>,
    ends: BusEnds,
    deadline: Instant,
}

/// A reload under way.
pub struct Reload {
    steps: VecDeque<Step>,
    waiting: Option<Waiting>,
    /// Groups whose new workers inherit their slot's bus ends ([`Wiring::Inherited`]): old
    /// and new workers share one mesh, so a failed reload may stop halfway and keep them
    /// both.
    inherited: Vec<String>,
    /// The new worker taking a slot's connections, until it has taken them or this instant.
    handing: Option<(ProcRef, Instant)>,
    merging: Option<Merging>,
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
    let mut merge = Vec::new();
    let mut views = Vec::new();
    let mut inherited = Vec::new();
    for change in prepared.changes {
        let group = match change {
            Change::Keep { old: i, bus, tls } => {
                let mut g = old[i].take().expect("each old group is used once");
                if let Some(tls) = tls {
                    renew(sup, &mut g, tls);
                }
                if let Wiring::Inherited = bus {
                    inherited.push(g.name().to_string());
                    let slots = 0..g.slots.len();
                    replace.extend(slots.map(|s| (g.name().to_string(), s, BusEnds::Inherited)));
                }
                g
            }
            Change::Update {
                old: i,
                def,
                more,
                bus,
                kept,
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
                if let Wiring::Grown(mesh) = bus {
                    g.mesh = mesh;
                }
                inherited.push(g.name().to_string());
                let ends = BusEnds::Inherited;
                if want > g.slots.len() {
                    // The running workers send to the new slots from now on (what waits for
                    // a new slot's worker before it starts is for clients it does not have).
                    views.push((g.name().to_string(), want));
                }
                g.def = def;
                g.listeners.extend(more);
                g.slots.resize_with(want.max(g.slots.len()), Slot::default);
                let name = g.name().to_string();
                let surplus = g.slots.drain(want..).filter_map(|s| s.proc);
                let surplus = surplus.filter_map(|k| sup.proc_ref(k));
                merge.extend(surplus.map(|proc| (proc, name.clone())));
                g.listeners.truncate(want);
                let running = |s: &usize| kept && g.slots[*s].proc.is_some();
                let slots = (0..want).filter(|s| !running(s));
                replace.extend(slots.map(|s| (g.name().to_string(), s, ends)));
                g
            }
            Change::Fresh(g) => {
                let slots = 0..g.slots.len();
                replace.extend(slots.map(|s| (g.name().to_string(), s, BusEnds::Own)));
                g
            }
        };
        sup.groups.push(group);
    }
    for g in old.into_iter().flatten() {
        let procs = g.slots.iter().filter_map(|s| s.proc);
        retire.extend(
            procs
                .filter_map(|k| sup.proc_ref(k))
                .map(|proc| (proc, None)),
        );
    }
    for (group, view) in views {
        sup.set_view(&group, view);
    }
    let steps = replace
        .into_iter()
        .map(|(group, slot, ends)| Step::Replace { group, slot, ends })
        .chain((merge.into_iter()).map(|(proc, group)| Step::Merge { proc, group }))
        .chain((retire.into_iter()).map(|(proc, hand_to)| Step::Retire { proc, hand_to }))
        .collect();
    Reload {
        steps,
        waiting: None,
        merging: None,
        inherited,
        handing: None,
        waiters: Vec::new(),
        summary: prepared.summary,
        failure: None,
        started: Instant::now(),
    }
}

/// Hands a renewed certificate to the group's running workers (new connections get it; open
/// ones keep theirs) and to the workers it starts from now on.
#[cfg(feature = "tls")]
fn renew(sup: &mut Supervisor, g: &mut Group, tls: Renewed) {
    let (chain, key) = tls.pem();
    let msg = crate::control::ToWorker::Certificate {
        chain: chain.to_string(),
        key: crate::control::Secret(key.to_string()),
    };
    for k in g.slots.iter().filter_map(|s| s.proc) {
        if !sup.tell(k, &msg) {
            log::warn!(
                "{}: cannot hand the renewed certificate to a worker",
                g.name()
            );
        }
    }
    g.def.tls = Some(tls);
}

#[cfg(not(feature = "tls"))]
fn renew(_: &mut Supervisor, _: &mut Group, tls: Renewed) {
    match tls {}
}

impl Reload {
    /// Carries the reload forward as far as it can go now.
    pub fn advance(&mut self, sup: &mut Supervisor, registry: &Registry, times: Handover) {
        let timeout = times.timeout;
        let now = Instant::now();
        loop {
            if let Some(w) = &self.waiting {
                let Some(new) = sup.live(w.new) else {
                    return; // Reaped: `worker_exited` has dealt with it.
                };
                let p = &sup.procs[new];
                if p.ready {
                    let w = self.waiting.take().expect("checked above");
                    match w.old.and_then(|r| sup.live(r)) {
                        Some(old) => self.hand_over(sup, old, new, times, now),
                        // Its predecessor is gone: the bus ends it waits for are free.
                        None if w.ends == BusEnds::Inherited => sup.release(new),
                        None => {}
                    }
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
            if let Some((taker, deadline)) = self.handing {
                // One slot hands over at a time: a handoff is CPU-bound, and one given both
                // cores pauses its clients for a fraction of the time of eight at once.
                let taken = sup.live(taker).is_none_or(|k| sup.procs[k].taken);
                if !taken && now < deadline {
                    return;
                }
                self.handing = None;
            }
            if let Some(m) = &self.merging {
                match m.holding_until {
                    Some(until) if !sup.group_holds(&m.group) && now < until => return,
                    Some(_) => {
                        let m = self.merging.as_mut().expect("checked above");
                        m.holding_until = None;
                        let (group, old) = (m.group.clone(), m.old);
                        if !sup.group_holds(&group) {
                            log::warn!("{group}: not every worker held its messages in time");
                        }
                        let taker = sup.live(old).and_then(|k| {
                            let slot = sup.procs[k].slot;
                            sup.successor(&group, slot).map(|new| (k, new))
                        });
                        match taker {
                            Some((old, new)) => self.hand_over(sup, old, new, times, now),
                            None => {
                                if let Some(k) = sup.live(old) {
                                    sup.retire(k, times.spread, now + times.timeout);
                                }
                            }
                        }
                        continue;
                    }
                    None => {
                        let m = self.merging.take().expect("checked above");
                        self.merged(sup, m);
                        continue;
                    }
                }
            }
            match self.steps.pop_front() {
                None => return,
                Some(Step::Retire { proc, hand_to }) => {
                    let Some(key) = sup.live(proc) else {
                        continue;
                    };
                    match hand_to.and_then(|g| sup.successor(&g, sup.procs[key].slot)) {
                        Some(new) => self.hand_over(sup, key, new, times, now),
                        None => sup.retire(key, times.spread, now + times.timeout),
                    }
                }
                Some(Step::Merge { proc, group }) => {
                    if sup.live(proc).is_none() {
                        continue;
                    }
                    sup.hold_group(&group);
                    self.merging = Some(Merging {
                        group,
                        old: proc,
                        holding_until: Some(now + timeout),
                    });
                }
                Some(Step::Replace { group, slot, ends }) => {
                    let Some(g) = sup.group_index(&group) else {
                        continue;
                    };
                    let old = sup.groups[g].slots[slot].proc;
                    let old = old.and_then(|k| sup.proc_ref(k));
                    // A slot with no worker (restarting) has nobody to inherit from.
                    let ends = if old.is_some() { ends } else { BusEnds::Own };
                    match sup.spawn_on(g, slot, registry, ends) {
                        Ok(new) => {
                            self.waiting = Some(Waiting {
                                group,
                                slot,
                                new: sup.proc_ref(new).expect("just spawned"),
                                old,
                                ends,
                                deadline: now + timeout,
                            })
                        }
                        Err(e) => {
                            self.give_up(sup, &group, slot, old);
                            self.fail(sup, format!("cannot fork a worker for {group}#{slot}: {e}"));
                        }
                    }
                }
            }
        }
    }

    /// A merge's handoff is over: the group's hold ends. Its workers send to the new count of
    /// slots once no worker past it is left to merge; until then (or while the retiring worker
    /// still holds clients the taker did not take), to as many as before.
    fn merged(&mut self, sup: &mut Supervisor, m: Merging) {
        let Some(g) = sup.group_index(&m.group) else {
            return;
        };
        let more = (self.steps.iter())
            .any(|s| matches!(s, Step::Merge { group, .. } if *group == m.group));
        let kept = sup.live(m.old).is_some_and(|k| {
            matches!(
                sup.procs[k].handing,
                Some(super::supervisor::Handing::Awaiting { .. })
            )
        });
        let view = match more || kept {
            true => sup.groups[g].view,
            false => sup.groups[g].def.count,
        };
        sup.resume_group(&m.group, view);
    }

    /// Has worker `old` hand its connections to `new`, and waits for `new` to have taken them
    /// before the next step.
    fn hand_over(
        &mut self,
        sup: &mut Supervisor,
        old: usize,
        new: usize,
        times: Handover,
        now: Instant,
    ) {
        if sup.hand_over(old, new, times, now)
            && let Some(taker) = sup.proc_ref(new)
        {
            self.handing = Some((taker, now + times.timeout));
        }
    }

    /// A worker exited; true if it was the new worker this reload was waiting for (the reload
    /// has then failed).
    pub fn worker_exited(&mut self, sup: &mut Supervisor, exit: &Exit) -> bool {
        let Some(w) = &self.waiting else {
            return false;
        };
        if exit.proc != w.new.key || exit.pid != w.new.pid {
            return false;
        }
        let why = format!(
            "the new worker {}#{} (pid {}) {} before it was ready",
            exit.group, exit.slot, exit.pid, exit.how
        );
        self.abandon(sup, why);
        true
    }

    /// The waiting slot's new worker will not be: stop it, settle the slot, fail the reload.
    fn abandon(&mut self, sup: &mut Supervisor, why: String) {
        if let Some(w) = self.waiting.take() {
            let new = sup.live(w.new);
            if let Some(key) = new {
                sup.procs[key].retiring = Some(Instant::now());
            }
            if let Some(g) = sup.group_index(&w.group) {
                let current = sup.groups[g].slots[w.slot].proc;
                if current.is_none() || current == new {
                    self.give_up(sup, &w.group, w.slot, w.old);
                }
            }
        }
        self.fail(sup, why);
    }

    /// A slot's new worker did not come up. A group whose workers share their mesh keeps the
    /// slot's old worker. A group on a new mesh must not keep a worker on the old one: that
    /// one is retired and the slot restarts like a crashed worker's.
    fn give_up(&mut self, sup: &mut Supervisor, group: &str, slot: usize, old: Option<ProcRef>) {
        let Some(g) = sup.group_index(group) else {
            return;
        };
        let old = old.filter(|&r| sup.live(r).is_some());
        let keep = self.inherited.iter().any(|name| name == group);
        sup.groups[g].slots[slot].proc = old.filter(|_| keep).map(|r| r.key);
        if let Some(proc) = old.filter(|_| !keep) {
            let hand_to = Some(group.to_string());
            self.steps.push_front(Step::Retire { proc, hand_to });
        }
    }

    /// Stops replacing the workers of groups that share their mesh (their old workers go on
    /// serving beside any new ones). Groups on a new mesh are replaced to the end; new slots
    /// not reached start later through the usual respawn; retirements still happen.
    fn fail(&mut self, sup: &mut Supervisor, why: String) {
        log::error!("reload failed: {why}");
        self.failure.get_or_insert(why);
        let shared = |group: &str| self.inherited.iter().any(|name| name == group);
        let steps = std::mem::take(&mut self.steps);
        self.steps = (steps.into_iter())
            .filter(|s| match s {
                Step::Retire { .. } | Step::Merge { .. } => true,
                Step::Replace { group, .. } => !shared(group),
            })
            .collect();
        let pending = |group: &str, slot: usize| {
            self.steps.iter().any(
                |s| matches!(s, Step::Replace { group: g, slot: n, .. } if g == group && *n == slot),
            )
        };
        for g in &mut sup.groups {
            for slot in 0..g.slots.len() {
                let s = &g.slots[slot];
                if s.proc.is_none() && s.respawn_at.is_none() && !pending(g.name(), slot) {
                    g.schedule_respawn(slot);
                }
            }
        }
    }

    /// Something went wrong that does not change the steps (a handoff's taker died): the
    /// reload goes on, and reports it.
    pub fn note_failure(&mut self, why: String) {
        self.failure.get_or_insert(why);
    }

    /// Every step is done and every replaced worker has exited.
    pub fn is_done(&self, sup: &Supervisor) -> bool {
        self.steps.is_empty()
            && self.waiting.is_none()
            && self.merging.is_none()
            && sup.procs.iter().all(|(_, p)| p.retiring.is_none())
    }

    /// When the reload needs the loop to wake up.
    pub fn deadline(&self) -> Option<Instant> {
        let handing = self.handing.map(|(_, at)| at);
        let holding = self.merging.as_ref().and_then(|m| m.holding_until);
        self.waiting
            .as_ref()
            .map(|w| w.deadline)
            .into_iter()
            .chain(handing)
            .chain(holding)
            .min()
    }
}
