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
//! with the reason. What the new workers had taken comes back too: until the old master
//! commits ([`LinkMsg::Commit`], once every new worker is ready), each keeps its handoff line
//! and does not die with its master; if the master dies, it hands every connection back over
//! that line to the old worker, which serves them as it serves those it took back.

mod new;
mod old;

pub(super) use new::Inherited;

use super::InheritanceError;
use super::event_loop::Master;
use crate::sys;
use mio::net::UnixStream;
use mio::{Interest, Registry, Token};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::Instant;

/// The environment variable that names the descriptors a new master inherits.
pub(super) const ENV: &str = "WSD_UPGRADE";
/// The link to the other master, in either master's poll.
pub(super) const LINK: Token = Token(3);

/// What the old master leaves open for the new one, by descriptor number.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Inheritance {
    pub old_pid: i32,
    /// The handoff protocol the old master's workers speak (`handoff::line::PROTOCOL`; none
    /// from a build before it was named).
    #[serde(default)]
    pub protocol: u16,
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
    pub(in crate::master) fn from_env() -> Option<Result<Inheritance, InheritanceError>> {
        let text = std::env::var(ENV).ok()?;
        // Workers forked from here, and a later upgrade's master, must not take it for theirs.
        sys::forget_upgrade_env(ENV);
        Some(serde_json::from_str(&text).map_err(|source| InheritanceError { var: ENV, source }))
    }
}

/// Messages between the two masters, one JSON line each way on the link.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "link", rename_all = "snake_case")]
pub(super) enum LinkMsg {
    /// New → old: the new worker `to` of `group`'s `slot` is ready; the descriptor sent with
    /// this line is a handoff line's end for that slot's old worker.
    Handoff {
        group: String,
        slot: usize,
        to: i32,
        /// The handoff protocol the new worker speaks (none from a build before it was named).
        #[serde(default)]
        protocol: u16,
    },
    /// New → old: every new worker is ready.
    Ready,
    /// Old → new: the old master is leaving (every new worker is ready): the new workers
    /// close the lines they kept to hand connections back, and the old workers exit.
    Commit,
}

/// The old master's side, first: the new binary's `check`, running.
pub(super) struct Checking {
    child: std::process::Child,
    binary: PathBuf,
    /// Control clients waiting for the outcome.
    waiters: Vec<usize>,
}

impl Checking {
    pub(in crate::master) fn pid(&self) -> Pid {
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

impl Successor {
    /// It said every new worker is ready: the upgrade is done.
    pub(super) fn ready(&self) -> bool {
        self.ready
    }
}

/// The new master's side: the master it replaces, until that one exits.
pub(super) struct Predecessor {
    pub pid: i32,
    /// The handoff protocol its workers speak: the one named in each handoff offered to it
    /// (an older one this build takes from, or this build's).
    protocol: u16,
    link: UnixStream,
    ready_sent: bool,
    /// Ready workers whose slots wait for their turn to be handed over.
    ready: VecDeque<usize>,
    /// The worker taking its slot's connections now.
    current: Option<usize>,
    /// What came on the link and is not a whole line yet.
    input: Vec<u8>,
    /// The old master has committed ([`LinkMsg::Commit`]): handoffs from now on keep no line.
    committed: bool,
}

impl Predecessor {
    /// Watches the link: it ends when the old master exits.
    pub(in crate::master) fn register(&mut self, registry: &Registry) -> io::Result<()> {
        registry.register(&mut self.link, LINK, Interest::READABLE)
    }

    pub(in crate::master) fn new(
        pid: i32,
        protocol: u16,
        link: OwnedFd,
    ) -> io::Result<Predecessor> {
        let link = std::os::unix::net::UnixStream::from(link);
        link.set_nonblocking(true)?;
        Ok(Predecessor {
            pid,
            protocol,
            link: UnixStream::from_std(link),
            ready_sent: false,
            ready: VecDeque::new(),
            current: None,
            input: Vec::new(),
            committed: false,
        })
    }
}

impl Master {
    /// The times a handover runs on, from `[server]`.
    pub(in crate::master) fn handover_times(&self) -> crate::master::supervisor::Handover {
        crate::master::supervisor::Handover {
            spread: self.server.close_spread,
            drain: self.server.drain_timeout,
            timeout: self.server.reload_timeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a build from before the handoff protocol was named sends says no protocol: the
    /// two masters then hand nothing over, instead of misreading each other's lines.
    #[test]
    fn an_older_build_speaks_no_named_protocol() {
        let older = r#"{"old_pid":7,"host_id":9,"pid_file":[3],"control":4,"metrics":null,
            "api":[],"groups":[],"link":5}"#;
        let i: Inheritance = serde_json::from_str(older).unwrap();
        assert_eq!(i.protocol, 0);
        let older = r#"{"link":"handoff","group":"g","slot":1,"to":42}"#;
        let LinkMsg::Handoff { protocol, .. } = serde_json::from_str(older).unwrap() else {
            panic!("a handoff line");
        };
        assert_eq!(protocol, 0);
        assert!(!crate::handoff::line::takes_from(0));
    }

    /// A build takes connections from the builds two protocols behind (their givers name no
    /// crossing, or none on a hand-back), and offers the old master its own protocol, the only
    /// one an older build accepts.
    #[test]
    fn this_build_takes_from_the_builds_before() {
        assert!(crate::handoff::line::takes_from(3));
        assert!(crate::handoff::line::takes_from(4));
        assert!(crate::handoff::line::takes_from(
            crate::handoff::line::PROTOCOL
        ));
        assert!(!crate::handoff::line::takes_from(2));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let pre = Predecessor::new(7, 3, a.into()).unwrap();
        assert_eq!(pre.protocol, 3);
    }
}
