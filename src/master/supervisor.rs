//! Worker processes and the slots they fill.
//!
//! A group has `count` slots, each with its own listening socket held by the master. A slot is
//! served by one worker process at a time — except during a reload, when its new worker starts
//! on the same socket before the old one lets go. So processes live in their own table
//! (`procs`, keyed by the token of their channel), and a slot only names the one that is its
//! current worker. Crash handling is per slot: exponential backoff, and a count of deaths
//! before ready that lets the master give up on a group that cannot start.

use super::bus_watch::BusChange;
use super::listeners;
use crate::backoff::Backoff;
use crate::bus::Bus;
use crate::bus::bridges::Peer;
#[cfg(feature = "cluster")]
use crate::bus::cluster::ClusterSettings;
use crate::bus::mesh::Mesh;
use crate::bus::wire::Origin;
use crate::control::{
    self, BusState, Counters, FromWorker, LineReader, ToWorker, WorkerState, WorkerStatus,
};
use crate::sys::{self, Fork};
use crate::worker::Worker;
use crate::{control::ConnInfo, logging};
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use slab::Slab;
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

/// Channel tokens start here; below are the master's own sources.
pub const CHANNEL_BASE: usize = 1 << 20;

/// One group of identical workers behind one listen address.
pub struct Group {
    pub def: Worker,
    /// Actual listen address (port 0 resolved).
    pub listen: String,
    pub listeners: Vec<TcpListener>,
    pub slots: Vec<Slot>,
    /// How its workers have ended, for `status`.
    pub exits: BTreeMap<String, u64>,
    /// Defined in `workers.toml` (a reload re-reads it), not in the program's code.
    pub from_file: bool,
    /// The group's bus wiring, one end per pair of slots (`bus::mesh`): at least one per
    /// slot, more after a reload lowered `count`.
    pub mesh: Mesh,
    /// The slots its workers send to: `count`, or, while a reload changes it, the larger
    /// count (workers it starts get this).
    pub view: usize,
}

pub struct Slot {
    /// The process serving this slot: a key of [`Supervisor::procs`].
    pub proc: Option<usize>,
    pub respawn_at: Option<Instant>,
    backoff: Backoff,
    /// Consecutive deaths before `Ready`.
    pub boot_failures: u32,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            proc: None,
            respawn_at: None,
            backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
            boot_failures: 0,
        }
    }
}

/// A live worker process.
pub struct Proc {
    pub pid: Pid,
    pub group: String,
    pub slot: usize,
    channel: UnixStream,
    channel_in: LineReader,
    pub started_at: Instant,
    /// This process has sent `Ready`.
    pub ready: bool,
    report: Option<(Instant, Counters)>,
    /// The report before: when, and its message and API request counts.
    prev_report: Option<(Instant, u64, u64)>,
    /// Told to stop while the master carries on (replaced by a reload, or its slot removed);
    /// SIGKILLed if still alive at this instant.
    pub retiring: Option<Instant>,
    /// A retiring worker's handoff (`handoff`): to whom it hands its connections.
    pub handing: Option<Handing>,
    /// This worker has taken everything the last handoff to it gave (`FromWorker::Taken`).
    pub taken: bool,
    /// This worker holds its group messages (`FromWorker::Holding`).
    pub holding: bool,
}

/// Whom a retiring worker hands its connections to.
#[derive(Debug, Clone)]
pub enum Handing {
    /// This worker, over the line the master made between them.
    To(ProcRef, Handover),
    /// A worker of the next master (`wsd upgrade`), over a line that master made.
    Away,
    /// That one died before taking everything: the retiring worker took the rest back and
    /// serves them until the next worker of its successor's slot is ready.
    Awaiting {
        group: String,
        slot: usize,
        times: Handover,
    },
}

/// How a worker ended, as [`Supervisor::reaped`] found it.
pub struct Exit {
    /// Its key in [`Supervisor::procs`] (now free).
    pub proc: usize,
    pub group: String,
    pub slot: usize,
    pub pid: Pid,
    /// "exited with status 3", "killed by SIGKILL".
    pub how: String,
    /// It was its slot's current worker (not one being retired).
    pub current: bool,
}

/// Connection rows a worker sent for a `connections` query.
pub struct ConnRows {
    pub query: u64,
    pub conns: Vec<ConnInfo>,
    pub last: bool,
}

pub fn channel_token(key: usize) -> Token {
    Token(CHANNEL_BASE + key)
}

pub fn token_proc(token: Token) -> Option<usize> {
    token.0.checked_sub(CHANNEL_BASE)
}

impl Group {
    pub fn new(def: Worker, listeners: Vec<TcpListener>, from_file: bool) -> io::Result<Group> {
        let mesh = Mesh::new(listeners.len())?;
        Ok(Group::with_mesh(def, listeners, from_file, mesh))
    }

    /// A group on a mesh made already (one a replaced master held: `wsd upgrade`).
    pub fn with_mesh(
        def: Worker,
        listeners: Vec<TcpListener>,
        from_file: bool,
        mesh: Mesh,
    ) -> Group {
        let listen = listeners
            .first()
            .and_then(|l| l.local_addr().ok())
            .map(|a| format!("{}{a}", def.scheme()))
            .unwrap_or_else(|| format!("{}{}", def.scheme(), def.listen.addr));
        let slots = (0..listeners.len()).map(|_| Slot::default()).collect();
        Group {
            view: listeners.len(),
            mesh,
            def,
            listen,
            listeners,
            slots,
            exits: BTreeMap::new(),
            from_file,
        }
    }

    pub fn name(&self) -> &str {
        self.def.name()
    }

    /// Schedules the respawn of `slot` after its backoff; returns the delay.
    pub fn schedule_respawn(&mut self, slot: usize) -> Duration {
        let s = &mut self.slots[slot];
        let delay = s.backoff.next_delay();
        s.respawn_at = Some(Instant::now() + delay);
        delay
    }

    /// True when every slot has died at boot [`BOOT_FAILURES`] times in a row.
    pub fn crash_looping(&self) -> bool {
        self.slots.iter().all(|s| s.boot_failures >= BOOT_FAILURES)
    }

    /// This slot's accept queue (waiting, limit), read from the master's copy of its socket.
    fn accept_queue(&self, slot: usize) -> (u32, u32) {
        self.listeners
            .get(slot)
            .map_or((0, 0), listeners::accept_queue)
    }
}

/// Every group, and every worker process alive.
#[derive(Default)]
pub struct Supervisor {
    pub groups: Vec<Group>,
    pub procs: Slab<Proc>,
    /// Whom workers become after fork (`[server] user`/`group`).
    pub creds: Option<super::privileges::Credentials>,
    /// This server's name on a cluster bus, random per master start.
    pub host_id: u64,
    /// `[server] bus`: the Redis of the cluster bus, handed to every worker.
    pub bus_url: Option<crate::config::RedisUrl>,
    /// The cluster bus's state as the workers report it.
    pub bus_watch: super::bus_watch::BusWatch,
    /// `[api]`: the backend API's sockets, handed to the workers of the group it serves.
    pub api: Option<super::api::ApiSlots>,
    /// Workers that became ready, for the master to act on (`take_newly_ready`).
    pub newly_ready: Vec<usize>,
    /// After `wsd upgrade`, the slots whose old worker (the previous master's) still reads the
    /// bus ends and has not been given a handoff line yet: their workers start on inherited
    /// ends.
    pub upgrade_pending: std::collections::BTreeSet<(String, usize)>,
    /// After `wsd upgrade` to another `count`: the groups run the old count until the old
    /// master has gone, then a reload changes it.
    pub recount_after_upgrade: bool,
}

/// A worker process named across turns: its key in [`Supervisor::procs`] and its pid, since a
/// key is reused once its process is reaped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcRef {
    pub key: usize,
    pub pid: Pid,
}

/// Whether a new worker's bus ends are its own, or still read by the worker it replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusEnds {
    Own,
    Inherited,
}

/// The times a handover runs on: Close 1001 spread over `spread` for clients that cannot go,
/// `drain` for `wss://` ones, and `timeout` (past the drain) before SIGKILL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handover {
    pub spread: Duration,
    pub drain: Duration,
    pub timeout: Duration,
}

impl Supervisor {
    /// One API socket per slot of the group the API serves, after a reload changed its count.
    pub fn fit_api(&mut self) {
        let Some(api) = self.api.as_mut() else { return };
        let count = self
            .groups
            .iter()
            .find(|g| g.name() == api.group)
            .map_or(0, |g| g.slots.len());
        if let Err(e) = api.fit(count) {
            log::error!("[api]: {e}; the new slots serve no API");
        }
    }

    pub fn group_index(&self, name: &str) -> Option<usize> {
        self.groups.iter().position(|g| g.name() == name)
    }

    /// The process under `key` now, to be named later with [`Supervisor::live`].
    pub fn proc_ref(&self, key: usize) -> Option<ProcRef> {
        self.procs.get(key).map(|p| ProcRef { key, pid: p.pid })
    }

    /// `r`'s key if that very process is still alive (not reaped, its key not reused).
    pub fn live(&self, r: ProcRef) -> Option<usize> {
        self.procs
            .get(r.key)
            .filter(|p| p.pid == r.pid)
            .map(|_| r.key)
    }

    /// Forks a worker for slot `slot` of group `g` and makes it the slot's current worker
    /// (whatever process the slot had is left running: the caller decides its fate).
    /// In the child this never returns.
    pub fn spawn(&mut self, g: usize, slot: usize, registry: &Registry) -> io::Result<usize> {
        // A retiring worker still holding connections for this slot reads the bus ends until
        // it has handed them to the worker started here.
        let name = self.groups[g].name();
        let upgrading = self.upgrade_pending.contains(&(name.to_string(), slot));
        let ends = match self.awaiting(name, slot) {
            Some(_) => BusEnds::Inherited,
            None if upgrading => BusEnds::Inherited,
            None => BusEnds::Own,
        };
        self.spawn_on(g, slot, registry, ends)
    }

    /// The retiring worker that waits for the next worker of `group`'s slot `slot`.
    fn awaiting(&self, group: &str, slot: usize) -> Option<usize> {
        self.procs.iter().find_map(|(key, p)| match &p.handing {
            Some(Handing::Awaiting {
                group: g, slot: s, ..
            }) if g == group && *s == slot => Some(key),
            _ => None,
        })
    }

    /// Worker `new` has become ready: a retiring worker waiting for its slot's next worker
    /// hands it the connections it took back.
    fn hand_to_awaiting(&mut self, new: usize) {
        let Some(p) = self.procs.get(new) else {
            return;
        };
        let Some(old) = self.awaiting(&p.group.clone(), p.slot) else {
            return;
        };
        let Some(Handing::Awaiting { times, .. }) = self.procs[old].handing.clone() else {
            return;
        };
        self.hand_over(old, new, times, Instant::now());
    }

    /// Worker `dead` (key and pid) has exited: a retiring worker that was handing it its
    /// connections now waits for the slot's next worker. Its name, if there was one.
    pub fn handoff_target_died(
        &mut self,
        dead: ProcRef,
        group: &str,
        slot: usize,
    ) -> Option<String> {
        for (_, p) in self.procs.iter_mut() {
            if let Some(Handing::To(to, times)) = &p.handing
                && *to == dead
            {
                let times = *times;
                let who = format!("{}#{} (pid {})", p.group, p.slot, p.pid);
                p.handing = Some(Handing::Awaiting {
                    group: group.to_string(),
                    slot,
                    times,
                });
                return Some(who);
            }
        }
        None
    }

    /// [`Supervisor::spawn`], saying whether the slot's worker being replaced still reads the
    /// bus ends the new one gets (a reload that keeps the group's mesh): then the new worker
    /// leaves them unread until the old one has handed its connections over.
    pub fn spawn_on(
        &mut self,
        g: usize,
        slot: usize,
        registry: &Registry,
        ends: BusEnds,
    ) -> io::Result<usize> {
        if slot >= self.groups[g].listeners.len() {
            // A stop has closed the group's sockets: nothing to serve on.
            return Err(io::Error::other("the group's listening sockets are closed"));
        }
        let (master_end, worker_end) = std::os::unix::net::UnixStream::pair()?;
        let partners = self.bridge_partners(g);
        let mut pairs = Vec::with_capacity(partners.len());
        for _ in &partners {
            pairs.push(crate::bus::mesh::pair()?);
        }
        let names: Vec<String> = self.groups.iter().map(|g| g.name().to_string()).collect();
        let master_pid = nix::unistd::getpid();
        let _ = io::stdout().flush();
        let group = &mut self.groups[g];
        match sys::fork()? {
            Fork::Child => {
                let listener = group.listeners.swap_remove(slot);
                let mut keep = vec![listener.as_raw_fd(), worker_end.as_raw_fd()];
                keep.extend(group.mesh.fds_of(slot));
                // Its ends of the bridges; the partners' ends are theirs alone.
                let bridges: Vec<_> = (partners.into_iter().zip(pairs))
                    .map(|((_, peer), (mine, _theirs))| (peer, mine))
                    .collect();
                keep.extend(bridges.iter().map(|(_, end)| end.as_raw_fd()));
                let api = self.api.as_mut().filter(|a| a.group == group.name());
                let api = api.and_then(|a| {
                    let listener = a.take(slot)?;
                    keep.push(listener.as_raw_fd());
                    Some(crate::worker::ApiSocket {
                        listener,
                        config: a.config.clone(),
                        others: names.into_iter().filter(|g| *g != a.group).collect(),
                    })
                });
                sys::close_fds_except(&keep);
                let origin = Origin {
                    host: self.host_id,
                    slot: slot as u16,
                };
                let bus = Bus::new(origin, group.mesh.take_ends(slot)).with_view(group.view);
                let bus = match ends {
                    BusEnds::Own => bus,
                    BusEnds::Inherited => bus.inherited(),
                };
                // Its helper threads start in the worker's loop, never here in the master.
                #[cfg(feature = "cluster")]
                let bus = bus.with_cluster(self.bus_url.clone().map(|url| ClusterSettings {
                    url,
                    group: group.name().to_string(),
                }));
                sys::forget_notify_socket();
                logging::set_role(&format!("{}#{slot}", group.name()));
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
                let placeholder = Worker::from_config(group.def.config().clone());
                let def = std::mem::replace(&mut group.def, placeholder);
                let code = crate::worker::run(def, slot, listener, worker_end, bus, api, bridges);
                std::process::exit(code);
            }
            Fork::Parent(pid) => {
                drop(worker_end);
                master_end.set_nonblocking(true)?;
                let mut channel = UnixStream::from_std(master_end);
                let entry = self.procs.vacant_entry();
                let key = entry.key();
                registry.register(&mut channel, channel_token(key), Interest::READABLE)?;
                entry.insert(Proc {
                    pid,
                    group: group.name().to_string(),
                    slot,
                    channel,
                    channel_in: LineReader::default(),
                    started_at: Instant::now(),
                    ready: false,
                    report: None,
                    prev_report: None,
                    retiring: None,
                    handing: None,
                    taken: false,
                    holding: false,
                });
                let s = &mut group.slots[slot];
                s.proc = Some(key);
                s.respawn_at = None;
                log::info!("worker {}#{slot} started, pid {pid}", group.name());
                let me = Peer {
                    group: group.name().to_string(),
                    slot,
                    pid: pid.as_raw(),
                };
                for ((partner, _), (_mine, theirs)) in partners.into_iter().zip(pairs) {
                    let msg = ToWorker::Bridge(me.clone());
                    if !self.tell_with_fd(partner, &msg, theirs.as_raw_fd()) {
                        log::warn!("could not hand a bridge to {}", self.describe_proc(partner));
                    }
                }
                Ok(key)
            }
        }
    }

    /// The current workers a new worker of group `g` is bridged to (`bus::bridges`): with an
    /// `[api]`, a worker of its group gets one to every other group's, and any other worker
    /// one to each of its group's. Their keys, and who each is.
    fn bridge_partners(&self, g: usize) -> Vec<(usize, Peer)> {
        let Some(api) = &self.api else {
            return Vec::new();
        };
        let serves = self.groups[g].name() == api.group;
        let current = |key: usize, p: &Proc| {
            let group = self.group_index(&p.group).map(|i| &self.groups[i]);
            let slot = group.and_then(|g| g.slots.get(p.slot));
            slot.is_some_and(|s| s.proc == Some(key)) && p.retiring.is_none()
        };
        (self.procs.iter())
            .filter(|&(key, p)| (p.group == api.group) != serves && current(key, p))
            .map(|(key, p)| {
                let peer = Peer {
                    group: p.group.clone(),
                    slot: p.slot,
                    pid: p.pid.as_raw(),
                };
                (key, peer)
            })
            .collect()
    }

    fn describe_proc(&self, key: usize) -> String {
        self.procs.get(key).map_or_else(
            || "a gone worker".into(),
            |p| format!("worker {}#{} pid {}", p.group, p.slot, p.pid),
        )
    }

    /// Forgets a worker that has exited and records how. `None` if `pid` is not a worker.
    /// `stopping`: the master asked every worker to exit, so an exit is news, not a warning.
    pub fn reaped(
        &mut self,
        status: WaitStatus,
        stopping: bool,
        registry: &Registry,
    ) -> Option<Exit> {
        let pid = status.pid()?;
        let key = self.procs.iter().find(|(_, p)| p.pid == pid)?.0;
        let mut p = self.procs.remove(key);
        let _ = registry.deregister(&mut p.channel);
        let how = describe(status);
        let g = self.group_index(&p.group);
        let slot = g.and_then(|g| self.groups[g].slots.get_mut(p.slot));
        let current = slot.as_ref().is_some_and(|s| s.proc == Some(key));
        if let Some(s) = slot.filter(|_| current) {
            s.proc = None;
            s.boot_failures = if p.ready { 0 } else { s.boot_failures + 1 };
            if p.started_at.elapsed() >= HEALTHY_UPTIME {
                s.backoff.reset();
            }
        }
        if let Some(g) = g {
            *self.groups[g].exits.entry(how.clone()).or_default() += 1;
        }
        let label = format!("worker {}#{} pid {pid} {how}", p.group, p.slot);
        match (current, stopping) {
            (true, false) => log::warn!("{label}"),
            (true, true) => log::info!("{label}"),
            (false, _) => log::info!("{label} (retired)"),
        }
        Some(Exit {
            proc: key,
            group: p.group,
            slot: p.slot,
            pid,
            how,
            current,
        })
    }

    /// Reads a worker's lines: readiness and reports are recorded here, connection rows are
    /// handed back. EOF just means the worker is exiting; SIGCHLD does the rest.
    pub fn read_channel(&mut self, key: usize) -> Vec<ConnRows> {
        let Some(p) = self.procs.get_mut(key) else {
            return Vec::new();
        };
        let (lines, _closed) = p.channel_in.read_from(&mut p.channel);
        let mut rows = Vec::new();
        let mut reported = false;
        let mut became_ready = false;
        for line in lines {
            match serde_json::from_str::<FromWorker>(&line) {
                Ok(FromWorker::Ready) => {
                    p.ready = true;
                    became_ready = true;
                    self.newly_ready.push(key);
                }
                Ok(FromWorker::Report(c)) => {
                    if let Some((at, prev)) = &p.report {
                        p.prev_report = Some((*at, prev.total_request, prev.api_requests));
                    }
                    p.report = Some((Instant::now(), *c));
                    reported = true;
                }
                Ok(FromWorker::Taken) => p.taken = true,
                Ok(FromWorker::Holding) => p.holding = true,
                Ok(FromWorker::Connections { query, conns, last }) => {
                    rows.push(ConnRows { query, conns, last })
                }
                Err(e) => log::warn!("bad line from worker {}#{}: {e}", p.group, p.slot),
            }
        }
        if reported && self.bus_url.is_some() {
            self.watch_bus(key);
        }
        if became_ready {
            self.hand_to_awaiting(key);
        }
        rows
    }

    /// Logs a change of the cluster bus as a whole, seen in worker `key`'s new report.
    fn watch_bus(&mut self, key: usize) {
        let Some(p) = self.procs.get(key) else { return };
        fn state(p: &Proc) -> BusState {
            p.report
                .as_ref()
                .map_or(BusState::Unknown, |(_, c)| c.bus_state)
        }
        let reporter = format!("{}#{}", p.group, p.slot);
        let all = self
            .procs
            .iter()
            .filter(|(_, p)| p.retiring.is_none() && p.report.is_some())
            .map(|(_, p)| state(p));
        match self.bus_watch.observe(&reporter, state(p), all) {
            Some(change @ BusChange::Down(_)) => log::warn!("{change}"),
            Some(change @ BusChange::Back) => log::info!("{change}"),
            None => {}
        }
    }

    /// Sends a command to a worker. False if its channel cannot take it.
    pub fn tell(&mut self, key: usize, msg: &ToWorker) -> bool {
        let line = control::line(msg);
        self.procs
            .get_mut(key)
            .is_some_and(|p| p.channel.write(&line).is_ok_and(|n| n == line.len()))
    }

    /// Sends a command with a descriptor attached (`SCM_RIGHTS`).
    pub fn tell_with_fd(&mut self, key: usize, msg: &ToWorker, fd: i32) -> bool {
        let line = control::line(msg);
        self.procs.get(key).is_some_and(|p| {
            sys::send_with_fd(p.channel.as_raw_fd(), &line, fd).is_ok_and(|n| n == line.len())
        })
    }

    /// Tells a worker to stop; SIGTERM if its channel is unusable.
    pub fn stop(&mut self, key: usize, mode: control::StopMode, spread: Duration) {
        let msg = ToWorker::Stop {
            mode,
            spread_ms: spread.as_millis() as u64,
        };
        if !self.tell(key, &msg)
            && let Some(p) = self.procs.get(key)
        {
            let _ = nix::sys::signal::kill(p.pid, nix::sys::signal::Signal::SIGTERM);
        }
    }

    /// Stops a worker while the master carries on; it is SIGKILLed if alive at `deadline`.
    pub fn retire(&mut self, key: usize, spread: Duration, deadline: Instant) {
        if let Some(p) = self.procs.get_mut(key) {
            log::info!("retiring worker {}#{} pid {}", p.group, p.slot, p.pid);
            p.retiring = Some(deadline);
            self.stop(key, control::StopMode::Close, spread);
        }
    }

    /// Retires worker `old` as [`Supervisor::retire`] does, but has it hand its connections
    /// to worker `new` first (`handoff`): the master makes the line between them and sends
    /// each its end, keeping no copy, so the line closes when either exits. Without a line
    /// the old worker is retired plainly.
    pub fn hand_over(&mut self, old: usize, new: usize, times: Handover, now: Instant) -> bool {
        let Handover {
            spread,
            drain,
            timeout,
        } = times;
        let deadline = now + timeout;
        let peer = |p: &Proc| Peer {
            group: p.group.clone(),
            slot: p.slot,
            pid: p.pid.as_raw(),
        };
        let (Some(from), Some(to)) = (self.procs.get(old).map(peer), self.procs.get(new).map(peer))
        else {
            self.retire(old, spread, deadline);
            return false;
        };
        let (give, take) = match std::os::unix::net::UnixStream::pair() {
            Ok(pair) => pair,
            Err(e) => {
                log::warn!("cannot make a handoff line ({e}); closing the clients instead");
                self.release(new);
                self.retire(old, spread, deadline);
                return false;
            }
        };
        let adopt = ToWorker::Adopt {
            from: Some(from),
            returnable: false,
            protocol: crate::handoff::line::PROTOCOL,
        };
        if !self.tell_with_fd(new, &adopt, take.as_raw_fd()) {
            log::warn!("cannot hand a handoff line to {}", self.describe_proc(new));
            self.retire(old, spread, deadline);
            return false;
        }
        self.procs[new].taken = false;
        let handing = self.proc_ref(new).map(|r| Handing::To(r, times));
        let Some(p) = self.procs.get_mut(old) else {
            return true;
        };
        log::info!(
            "retiring worker {}#{} pid {}, handing its connections to pid {}",
            p.group,
            p.slot,
            p.pid,
            to.pid
        );
        // Its wss:// clients may be kept for the drain first.
        p.retiring.get_or_insert(deadline + drain);
        p.handing = handing;
        let msg = ToWorker::HandOff {
            spread_ms: spread.as_millis() as u64,
            drain_ms: drain.as_millis() as u64,
            to,
            returnable: false,
        };
        if !self.tell_with_fd(old, &msg, give.as_raw_fd()) {
            self.stop(old, control::StopMode::Close, spread);
        }
        true
    }

    /// Workers that became ready since the last call.
    pub fn take_newly_ready(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.newly_ready)
    }

    /// Retires worker `old`, handing its connections to the next master's worker `to` over
    /// `line` (`wsd upgrade`). Its slot has no worker of this master's any more.
    pub fn hand_over_remote(
        &mut self,
        old: usize,
        line: std::os::fd::OwnedFd,
        to: i32,
        times: Handover,
        now: Instant,
    ) {
        let Some(p) = self.procs.get_mut(old) else {
            return;
        };
        log::info!(
            "worker {}#{} pid {} hands its connections to the new master's pid {to}",
            p.group,
            p.slot,
            p.pid
        );
        p.retiring = Some(now + times.drain + times.timeout);
        p.handing = Some(Handing::Away);
        let to = Peer {
            group: p.group.clone(),
            slot: p.slot,
            pid: to,
        };
        if let Some(g) = self.group_index(&to.group)
            && let Some(s) = self.groups[g].slots.get_mut(to.slot)
            && s.proc == Some(old)
        {
            s.proc = None;
        }
        let msg = ToWorker::HandOff {
            spread_ms: times.spread.as_millis() as u64,
            drain_ms: times.drain.as_millis() as u64,
            to,
            returnable: true,
        };
        if !self.tell_with_fd(old, &msg, line.as_raw_fd()) {
            self.stop(old, control::StopMode::Close, times.spread);
        }
    }

    /// Tells a new worker that waits for a handoff that none will come: it reads its bus
    /// ends from now on (the worker it replaced is gone).
    pub fn release(&mut self, new: usize) {
        let adopt = ToWorker::Adopt {
            from: None,
            returnable: false,
            protocol: crate::handoff::line::PROTOCOL,
        };
        if !self.tell(new, &adopt) {
            log::warn!("cannot release the bus of {}", self.describe_proc(new));
        }
    }

    /// Tells every worker of `group` to hold its group messages (`ToWorker::Hold`); see
    /// [`Supervisor::group_holds`].
    pub fn hold_group(&mut self, group: &str) {
        self.tell_workers_of(group, &ToWorker::Hold);
    }

    /// Every worker of `group` has said it holds its group messages.
    pub fn group_holds(&self, group: &str) -> bool {
        (self.procs.iter()).all(|(_, p)| p.group != group || p.holding)
    }

    /// Ends `group`'s hold: its workers send to the slots below `view` from now on.
    pub fn resume_group(&mut self, group: &str, view: usize) {
        self.tell_group(group, &ToWorker::Resume { view }, view);
    }

    /// `group`'s workers, and those it starts, send to the slots below `view` from now on.
    pub fn set_view(&mut self, group: &str, view: usize) {
        self.tell_group(group, &ToWorker::View { view }, view);
    }

    fn tell_group(&mut self, group: &str, msg: &ToWorker, view: usize) {
        if let Some(g) = self.group_index(group) {
            self.groups[g].view = view;
        }
        self.tell_workers_of(group, msg);
    }

    /// Sends `msg` to every worker.
    pub fn tell_all(&mut self, msg: &ToWorker) {
        let keys: Vec<usize> = self.procs.iter().map(|(k, _)| k).collect();
        for k in keys {
            self.tell(k, msg);
        }
    }

    /// Sends `msg` to every worker of `group`, none of which holds for it until it says so.
    fn tell_workers_of(&mut self, group: &str, msg: &ToWorker) {
        let keys: Vec<usize> = (self.procs.iter())
            .filter(|(_, p)| p.group == group)
            .map(|(k, _)| k)
            .collect();
        for k in keys {
            self.procs[k].holding = false;
            self.tell(k, msg);
        }
    }

    /// The worker that takes over the connections of a retiring worker of `group`'s slot
    /// `slot`: the current worker of that slot, or of `slot % count` when the group shrank,
    /// if it is ready.
    pub fn successor(&self, group: &str, slot: usize) -> Option<usize> {
        let g = &self.groups[self.group_index(group)?];
        let key = g.slots.get(slot % g.slots.len().max(1))?.proc?;
        let p = self.procs.get(key)?;
        (p.ready && p.retiring.is_none()).then_some(key)
    }

    pub fn live_pids(&self) -> impl Iterator<Item = Pid> + '_ {
        self.procs.iter().map(|(_, p)| p.pid)
    }

    /// One row per worker process, plus one per slot that has none (restarting), in group
    /// and slot order; a slot's retiring process comes before its new one.
    pub fn worker_rows(&self) -> Vec<WorkerStatus> {
        let now = Instant::now();
        let order = |p: &Proc| (self.group_index(&p.group).unwrap_or(usize::MAX), p.slot);
        let mut procs: Vec<(usize, &Proc)> = self.procs.iter().collect();
        procs.sort_by_key(|(_, p)| (order(p), p.started_at));
        let mut rows: Vec<((usize, usize), WorkerStatus)> = procs
            .into_iter()
            .map(|(_, p)| (order(p), self.proc_status(p, now)))
            .collect();
        for (g, group) in self.groups.iter().enumerate() {
            for (slot, s) in group.slots.iter().enumerate() {
                if s.proc.is_none() {
                    rows.push(((g, slot), self.empty_slot_status(g, slot)));
                }
            }
        }
        rows.sort_by_key(|(order, _)| *order);
        rows.into_iter().map(|(_, w)| w).collect()
    }

    fn proc_status(&self, p: &Proc, now: Instant) -> WorkerStatus {
        let status = match &p.report {
            _ if p.retiring.is_some() => WorkerState::Stopping,
            None => WorkerState::Starting,
            Some((at, _)) if now.duration_since(*at) > STALE_REPORT => WorkerState::Busy,
            _ => WorkerState::Idle,
        };
        let (qps, api_rate) = match (&p.report, p.prev_report) {
            (Some((at, c)), Some((pat, prev, prev_api))) if *at > pat => {
                let secs = at.duration_since(pat).as_secs_f64();
                (
                    c.total_request.saturating_sub(prev) as f64 / secs,
                    c.api_requests.saturating_sub(prev_api) as f64 / secs,
                )
            }
            _ => (0.0, 0.0),
        };
        let group = self.group_index(&p.group).map(|g| &self.groups[g]);
        let (accept_queue, backlog) = group.map_or((0, 0), |g| g.accept_queue(p.slot));
        WorkerStatus {
            pid: p.pid.as_raw(),
            name: p.group.clone(),
            slot: p.slot,
            listen: group.map_or_else(String::new, |g| g.listen.clone()),
            status,
            uptime_secs: p.started_at.elapsed().as_secs(),
            qps: (qps * 10.0).round() / 10.0,
            api_rate: (api_rate * 10.0).round() / 10.0,
            accept_queue,
            backlog,
            counters: p
                .report
                .as_ref()
                .map(|(_, c)| c.clone())
                .unwrap_or_default(),
        }
    }

    fn empty_slot_status(&self, g: usize, slot: usize) -> WorkerStatus {
        let group = &self.groups[g];
        let (accept_queue, backlog) = group.accept_queue(slot);
        WorkerStatus {
            pid: 0,
            name: group.name().to_string(),
            slot,
            listen: group.listen.clone(),
            status: WorkerState::Restarting,
            uptime_secs: 0,
            qps: 0.0,
            api_rate: 0.0,
            accept_queue,
            backlog,
            counters: Counters::default(),
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
