//! The pid file, held under an exclusive `flock` for the master's whole life.
//!
//! The lock, not the file's existence, says whether a master runs: a pid file left behind by a
//! `kill -9` is simply locked again by the next `wsd start`.

use crate::sys;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

pub struct PidFile {
    path: PathBuf,
    file: File,
}

#[derive(Debug)]
pub enum LockError {
    /// Another master holds the lock; its pid if the file says it.
    AlreadyRunning(Option<i32>),
    Io(PathBuf, io::Error),
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::AlreadyRunning(Some(pid)) => write!(f, "already running (pid {pid})"),
            LockError::AlreadyRunning(None) => write!(f, "already running"),
            LockError::Io(p, e) if e.kind() == io::ErrorKind::PermissionDenied => {
                write!(f, "permission denied on {}", p.display())
            }
            LockError::Io(p, e) => write!(f, "cannot use pid file {}: {e}", p.display()),
        }
    }
}

impl PidFile {
    /// Opens and locks `path`, refusing if another master holds it.
    pub fn lock(path: &Path) -> Result<PidFile, LockError> {
        let io_err = |e| LockError::Io(path.to_path_buf(), e);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io_err)?;
        if !sys::try_lock_exclusive(&file).map_err(io_err)? {
            return Err(LockError::AlreadyRunning(read_pid(&mut file)));
        }
        Ok(PidFile {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Records `pid` (the master's, after any daemonizing).
    pub fn write_pid(&mut self, pid: u32) -> io::Result<()> {
        self.file.set_len(0)?;
        self.file.rewind()?;
        writeln!(self.file, "{pid}")?;
        self.file.sync_data()
    }

    /// Removes the file; the lock goes with the descriptor when `self` drops.
    pub fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// The pid recorded in `path`, if that process is alive (used by the CLI for messages).
///
/// Never takes the lock: a probe that locked, even briefly, could make a master that is
/// starting at the same moment fail with "already running".
pub fn running_pid(path: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
        .ok()
        .map(|_| pid)
}
