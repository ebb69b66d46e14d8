//! The CLI's side of the control socket: one request, one JSON-line reply, and a typed reason
//! when there is none ([`ControlError`]). Whether a master is running at all is a variant, not
//! a wording: `restart` starts anew on [`ControlError::NotRunning`] and fails on the rest.

use crate::config::ServerConfig;
use crate::control::{self, Reply, Request};
use crate::master::pidfile;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

/// Why a request got no useful answer from the master.
#[derive(Debug, thiserror::Error)]
pub(super) enum ControlError {
    /// No master runs for this pid file (there is none, or it names a dead process).
    #[error("not running ({})", match .stale_pid {
        Some(pid) => format!(
            "stale pid file {} names pid {pid}, which is not a running wsd master",
            .pid_file.display()
        ),
        None => format!("no master for {}", .pid_file.display()),
    })]
    NotRunning {
        pid_file: PathBuf,
        /// The pid a stale pid file names.
        stale_pid: Option<i32>,
    },
    /// A master holds the pid file, but its control socket does not answer.
    #[error("{} holds {} but its control socket {} does not answer", match .pid {
        Some(pid) => format!("master pid {pid}"),
        None => "a master".to_string(),
    }, .pid_file.display(), .socket.display())]
    Silent {
        pid: Option<i32>,
        pid_file: PathBuf,
        socket: PathBuf,
    },
    /// This user may not open the control socket.
    #[error("permission denied on {}", .0.display())]
    PermissionDenied(PathBuf),
    #[error("cannot reach the master at {}: {source}", socket.display())]
    Unreachable { socket: PathBuf, source: io::Error },
    #[error("cannot talk to the master: {0}")]
    Write(#[source] io::Error),
    #[error("the master closed the connection without answering")]
    NoAnswer,
    #[error("the master did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("cannot read the master's answer: {0}")]
    Read(#[source] io::Error),
    #[error("bad answer from the master: {0}")]
    BadAnswer(#[source] serde_json::Error),
    /// The master answered with a refusal (a reload with a bad config, a peer it does not
    /// serve, ...): its reason, as it wrote it.
    #[error("{0}")]
    Refused(String),
}

/// Sends one request to the master and waits for its reply (`timeout` None: no limit).
pub(super) fn request(
    server: &ServerConfig,
    req: &Request,
    timeout: Option<Duration>,
) -> Result<Reply, ControlError> {
    let sock = &server.control_socket;
    let mut stream = UnixStream::connect(sock).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => not_running(server),
        io::ErrorKind::PermissionDenied => ControlError::PermissionDenied(sock.clone()),
        _ => ControlError::Unreachable {
            socket: sock.clone(),
            source: e,
        },
    })?;
    stream.set_read_timeout(timeout).ok();
    // A master that exits (another stop got there first, or it was killed) closes or resets
    // the connections still waiting for it: for a stop, that is the answer.
    let stopping = matches!(req, Request::Stop { .. });
    let went_away = |e: &io::Error| {
        stopping
            && matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
    };
    match stream.write_all(&control::line(req)) {
        Err(e) if went_away(&e) => return Ok(Reply::ok()),
        Err(e) => return Err(ControlError::Write(e)),
        Ok(()) => {}
    }
    let mut line = String::new();
    match BufReader::new(&stream).read_line(&mut line) {
        Ok(0) if stopping => return Ok(Reply::ok()),
        Err(e) if went_away(&e) => return Ok(Reply::ok()),
        Ok(0) => return Err(ControlError::NoAnswer),
        Ok(_) => {}
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            return Err(ControlError::Timeout(timeout.unwrap_or_default()));
        }
        Err(e) => return Err(ControlError::Read(e)),
    }
    let reply: Reply = serde_json::from_str(&line).map_err(ControlError::BadAnswer)?;
    if !reply.ok {
        return Err(ControlError::Refused(
            reply.error.unwrap_or_else(|| "the master refused".into()),
        ));
    }
    Ok(reply)
}

/// Why nothing answers on the control socket, from the pid file.
fn not_running(server: &ServerConfig) -> ControlError {
    let pid_file = server.pid_file.clone();
    let silent = |pid| ControlError::Silent {
        pid,
        pid_file: server.pid_file.clone(),
        socket: server.control_socket.clone(),
    };
    match pidfile::probe(&server.pid_file) {
        Ok(pidfile::Probe::Running(pid)) => silent(pid),
        Ok(pidfile::Probe::Stale(Some(pid))) => ControlError::NotRunning {
            pid_file,
            stale_pid: Some(pid),
        },
        _ => ControlError::NotRunning {
            pid_file,
            stale_pid: None,
        },
    }
}
