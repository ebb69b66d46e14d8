//! Why the master could not start, reload or reopen its log: one enum per request, each
//! variant with its context. The CLI prints them as the one-line reason of `wsd: ...`.

use super::listeners::BindError;
use crate::config::{ConfigError, ConfigProblem};
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why the groups to run cannot be set up, at a start or a reload.
#[derive(Debug, thiserror::Error)]
pub enum GroupsError {
    /// No group, or two groups taking the same connections.
    #[error(transparent)]
    Invalid(ConfigProblem),
    /// A group's listeners could not be bound, or its address read.
    #[error("group {group:?}: {source}")]
    Bind {
        /// The group.
        group: String,
        /// Why.
        source: BindError,
    },
    /// The backend API's sockets could not be bound.
    #[error("[api]: {0}")]
    ApiBind(#[source] BindError),
    /// The socket pairs between a group's workers could not be made.
    #[error("cannot wire the bus: {0}")]
    Bus(#[source] io::Error),
}

/// Why `wsd start` could not bring a master up. Nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another master answers on the control socket (with another pid file, or one whose pid
    /// file was removed): taking the socket over would leave it unreachable.
    #[error(
        "a master is already running: it answers on control socket {} (its pid file is \
         another, or was removed)",
        .0.display()
    )]
    AlreadyAnswering(PathBuf),
    /// The groups cannot be set up.
    #[error(transparent)]
    Groups(#[from] GroupsError),
    /// The control socket could not be created.
    #[error("cannot create control socket {}: {source}", path.display())]
    ControlSocket {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The `[metrics]` listener could not be bound.
    #[error("[metrics]: {0}")]
    Metrics(#[source] BindError),
    /// `start -d` could not detach.
    #[error("cannot detach: {0}")]
    Detach(#[source] io::Error),
}

/// Why a reload changed nothing. The running workers and settings stay as they were.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The master is stopping.
    #[error("the server is stopping")]
    Stopping,
    /// Another reload has not finished.
    #[error("a reload is already under way (started {:.1}s ago)", .0.as_secs_f64())]
    InProgress(Duration),
    /// The config file does not validate.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A `[server]` key changed that only a restart can apply.
    #[error("[server] {key} changed from {old} to {new}: that needs `wsd restart`")]
    NeedsRestart {
        /// The key.
        key: &'static str,
        /// The running value, as shown to operators.
        old: String,
        /// The file's value.
        new: String,
    },
    /// An `[api]` or `[metrics]` key changed that only a restart can apply (or the table came
    /// or went).
    #[error("[{table}] {what} changed from {old} to {new}: that needs `wsd restart`")]
    TableNeedsRestart {
        /// The table.
        table: &'static str,
        /// What changed.
        what: &'static str,
        /// The running value.
        old: String,
        /// The file's value.
        new: String,
    },
    /// The new groups cannot be set up.
    #[error(transparent)]
    Groups(#[from] GroupsError),
    /// A group defined in code names a certificate or key that cannot be served.
    #[cfg(feature = "tls")]
    #[error("group {group:?}: {source}")]
    Tls {
        /// The group.
        group: String,
        /// Why.
        source: crate::tls::TlsError,
    },
}

/// Why `wsd reopen-logs` did nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReopenError {
    /// Only a daemon has a log file.
    #[error(
        "not started with -d: output goes to the terminal or journal, there is no log file \
         to reopen"
    )]
    NotDaemon,
    /// The log file cannot be opened.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// Its path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The master's output cannot be pointed at it.
    #[error("{0}")]
    Redirect(#[source] io::Error),
}

/// Why `wsd upgrade` (or SIGUSR2) did not hand the server to a new binary. The running master
/// serves on in every case.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// A stop has begun.
    #[error("the server is stopping")]
    Stopping,
    /// One reload or upgrade at a time.
    #[error("a reload or an upgrade is under way")]
    Busy,
    /// The binary could not be run (missing, not executable).
    #[error("cannot run {}: {source}", binary.display())]
    Run {
        /// The new binary.
        binary: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The binary's `check` of the configuration failed.
    #[error("{} check {how}: {said}", binary.display())]
    Check {
        /// The new binary.
        binary: PathBuf,
        /// How it exited ("exited with status 1").
        how: String,
        /// What it printed.
        said: String,
    },
    /// The link between the two masters could not be made.
    #[error("cannot link to the new master: {0}")]
    Link(#[source] io::Error),
    /// The new master exited before it took over.
    #[error(
        "the new master (pid {pid}) {how} before it took over; this one (pid {this}) serves on"
    )]
    SuccessorExited {
        /// The new master.
        pid: i32,
        /// How it exited.
        how: String,
        /// The master that keeps serving.
        this: u32,
    },
}

/// Why a master started by `wsd upgrade` could not read what the old one left it.
#[derive(Debug, thiserror::Error)]
#[error("bad {var}: {source}")]
pub struct InheritanceError {
    /// The environment variable.
    pub var: &'static str,
    /// Why.
    pub source: serde_json::Error,
}
