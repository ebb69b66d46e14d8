//! The pid file, held under an exclusive `flock` for the master's whole life.
//!
//! The lock, not the file's existence or the pid in it, says whether a master runs: a pid file
//! left behind by a `kill -9` is simply locked again by the next `wsd start`, and one that names
//! some unrelated live process (the pid was reused) is just as stale.
//!
//! **Atomic write.** The pid goes into a temporary file next to the pid file, which is then
//! renamed over it, so a reader sees either the old content or `PID\n`, never an empty or
//! half-written file. But a `flock` belongs to an inode, not to a path, and after the rename
//! the path names the new inode. So the master locks the temporary file before the rename and
//! keeps *every* inode the path has named while it ran locked (the one it opened at start and
//! the one it renamed into place): a second `wsd start` that opened the path before the rename
//! holds the old inode and finds it locked; one that opens it after holds the new inode and
//! finds that locked too.
//!
//! **Lock, then check the path.** A start that opened the path just before the running master
//! unlinked it at exit (or renamed a new inode over it) could lock an inode no longer reachable
//! by the path and believe itself alone. So [`PidFile::lock`] checks, after locking, that the
//! path still names the inode it locked, and starts over if not.
//!
//! **Probing.** The CLI never takes the lock to find out whether a master runs (see [`probe`]);
//! it looks the inode up in the kernel's lock table instead.

use crate::sys;
use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// How often [`PidFile::lock`] starts over when the path keeps naming another inode.
const LOCK_ATTEMPTS: usize = 10;

pub struct PidFile {
    path: PathBuf,
    /// Every inode `path` has named since we locked it, each open and locked: the one opened
    /// at start, then the one [`PidFile::write_pid`] renamed into place.
    held: Vec<File>,
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
        for _ in 0..LOCK_ATTEMPTS {
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
            let locked = file.metadata().map_err(io_err)?;
            match std::fs::metadata(path) {
                Ok(now) if same_inode(&locked, &now) => {
                    return Ok(PidFile {
                        path: path.to_path_buf(),
                        held: vec![file],
                    });
                }
                // Unlinked or replaced after we opened it: whoever did that held the lock
                // then, so the inode we got is not the one that counts. Try the path again.
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(e)),
            }
        }
        Err(io_err(io::Error::other(
            "the pid file keeps being replaced while we lock it",
        )))
    }

    /// The pid file of the master this one replaces (`wsd upgrade`): the same open, locked
    /// files, so the lock never lapses between the two.
    pub fn inherited(path: &Path, held: Vec<File>) -> PidFile {
        PidFile {
            path: path.to_path_buf(),
            held,
        }
    }

    /// The locked files, for the master that replaces this one.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.held.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Records `pid` (the master's, after any daemonizing): writes `PID\n` to a locked
    /// temporary file next to the pid file and renames it over the pid file.
    pub fn write_pid(&mut self, pid: u32) -> io::Result<()> {
        let tmp = self.temp_path();
        let result = self.replace_with(&tmp, pid);
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn replace_with(&mut self, tmp: &Path, pid: u32) -> io::Result<()> {
        // Only the lock holder ever writes this name, so what is there is a leftover of a
        // master that died mid-write: truncate it.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(tmp)?;
        if !sys::try_lock_exclusive(&file)? {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by another process", tmp.display()),
            ));
        }
        writeln!(file, "{pid}")?;
        file.sync_data()?;
        std::fs::rename(tmp, &self.path)?;
        self.held.push(file);
        Ok(())
    }

    /// `.wsd.pid.tmp` beside `wsd.pid`: same directory, so the rename stays on one filesystem.
    fn temp_path(&self) -> PathBuf {
        let name = self.path.file_name().unwrap_or_default().to_string_lossy();
        self.path.with_file_name(format!(".{name}.tmp"))
    }

    /// Removes the file if it is still ours; the locks go with the descriptors when `self`
    /// drops.
    pub fn remove(self) {
        let ours = std::fs::metadata(&self.path).is_ok_and(|now| {
            self.held
                .iter()
                .any(|f| f.metadata().is_ok_and(|m| same_inode(&m, &now)))
        });
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn same_inode(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev() && a.ino() == b.ino()
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut s = String::new();
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// What a pid file says about its master, as far as can be told without locking it.
#[cfg(feature = "cli")]
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// No pid file.
    Absent,
    /// Nobody holds the lock: no master runs, whatever process the recorded pid (if the file
    /// holds one) may name today.
    Stale(Option<i32>),
    /// A master holds the lock. Its pid when the file records the process that took the lock
    /// on this inode; `None` while a starting master has not written its pid yet.
    Running(Option<i32>),
}

/// Looks at the pid file at `path` (used by the CLI for messages).
///
/// Never takes the lock: a probe that locked, even briefly, could make a master that is
/// starting at the same moment fail with "already running". Instead the file's inode is looked
/// up in the kernel's table of held locks (`/proc/locks`).
#[cfg(feature = "cli")]
pub fn probe(path: &Path) -> io::Result<Probe> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Probe::Absent),
        Err(e) => return Err(e),
    };
    // Metadata and content from the same descriptor: the same inode even if a rename lands
    // in between.
    let meta = file.metadata()?;
    let pid = read_pid(&mut file);
    Ok(match sys::flock_holder(&meta)? {
        None => Probe::Stale(pid),
        // The kernel names the process that took the lock; a pid that differs is not the
        // master's (the master has not replaced an older file's content yet).
        Some(holder) => Probe::Running(pid.filter(|&p| p == holder)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wsd.pid");
        (dir, path)
    }

    fn already_running(r: Result<PidFile, LockError>) -> Option<i32> {
        match r {
            Err(LockError::AlreadyRunning(pid)) => pid,
            Err(e) => panic!("expected AlreadyRunning, got {e}"),
            Ok(_) => panic!("a second lock succeeded while the first is held"),
        }
    }

    #[test]
    fn a_second_lock_fails_before_and_after_the_pid_is_written() {
        let (_dir, path) = temp();
        let mut first = PidFile::lock(&path).unwrap();
        assert_eq!(already_running(PidFile::lock(&path)), None);

        // Opened before the rename: this descriptor names the original inode.
        let before_rename = OpenOptions::new().write(true).open(&path).unwrap();
        first.write_pid(4242).unwrap();
        assert!(!sys::try_lock_exclusive(&before_rename).unwrap());
        // Opened after the rename: the new inode.
        assert_eq!(already_running(PidFile::lock(&path)), Some(4242));

        first.remove();
        assert!(!path.exists());
        let again = PidFile::lock(&path).expect("free once the first is gone");
        drop(again);
    }

    #[test]
    fn the_file_holds_the_pid_and_a_newline_and_no_temp_file_is_left() {
        let (dir, path) = temp();
        std::fs::write(&path, "99999999\nold junk\n").unwrap();
        let mut pf = PidFile::lock(&path).unwrap();
        pf.write_pid(1234).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "1234\n");
        pf.write_pid(5678).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "5678\n");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["wsd.pid"]);
    }

    #[test]
    fn remove_leaves_a_file_that_is_not_ours() {
        let (_dir, path) = temp();
        let pf = PidFile::lock(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, "77\n").unwrap();
        pf.remove();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "77\n");
    }

    #[test]
    #[cfg(feature = "cli")]
    fn probe_tells_stale_from_locked() {
        let (_dir, path) = temp();
        assert_eq!(probe(&path).unwrap(), Probe::Absent);

        // Our own pid, alive, but nobody holds the lock: stale.
        let me = std::process::id() as i32;
        std::fs::write(&path, format!("{me}\n")).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Stale(Some(me)));

        // Locked, with an old pid still in it: running, pid not yet known.
        let mut pf = PidFile::lock(&path).unwrap();
        std::fs::write(&path, "1\n").unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Running(None));

        // Written by the lock holder (this process): running with that pid.
        pf.write_pid(me as u32).unwrap();
        assert_eq!(probe(&path).unwrap(), Probe::Running(Some(me)));

        drop(pf);
        assert_eq!(probe(&path).unwrap(), Probe::Stale(Some(me)));
    }
}
