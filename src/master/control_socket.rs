//! The control socket's file: created owner-only, and removed at exit only while its path
//! still names this master's socket.

use crate::sys;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// The socket file this master created, remembered by device and inode.
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

/// Binds the control socket at `path`, mode 0600 from the moment it exists.
///
/// The caller holds the pid file's lock and has checked that no master answers on `path`, so a
/// file found there is stale and is replaced.
pub fn create(path: &Path) -> io::Result<(UnixListener, SocketFile)> {
    let _ = std::fs::remove_file(path);
    let listener = sys::bind_owner_only(path)?;
    let file = SocketFile {
        path: path.to_path_buf(),
        id: identity(path),
    };
    Ok((listener, file))
}

/// The socket file a replaced master created (`wsd upgrade`), now this master's.
pub fn inherited(path: &Path) -> SocketFile {
    SocketFile {
        path: path.to_path_buf(),
        id: identity(path),
    }
}

fn identity(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl SocketFile {
    /// Removes the file if the path still names this master's socket: another master may have
    /// taken the path over meanwhile (its own start replaces what it finds there).
    pub fn remove_if_ours(&self) {
        if self.id.is_some() && identity(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
