//! `[server] user` / `group`: workers give up root right after fork.
//!
//! The master keeps root for what needs it — every slot's listener, ports below 1024 included,
//! is bound before the first fork — and for nothing else: each worker switches user before it
//! runs application code or reads a client's bytes. A worker that cannot finish the switch
//! exits; a worker running as root by accident is worse than no worker (and when every slot
//! fails at boot, the supervisor's crash-loop rule stops the master with the reason logged).
//!
//! The order matters: supplementary groups and the gid while we may still change them, the uid
//! last; then proof that the drop holds (`setuid(0)` fails, every real/effective/saved id is
//! the target's); then `PR_SET_NO_NEW_PRIVS`, so no setuid binary can hand root back. The
//! kernel clears `PR_SET_PDEATHSIG` when credentials change, so the caller ties the worker to
//! its master only after this.

use crate::config::ServerConfig;
use nix::errno::Errno;
use nix::unistd::{self, Gid, Uid};
use std::ffi::CString;
use std::fmt;

/// Whom the workers become, from `[server] user` and `group`.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// `user nobody` or `group nogroup`, for messages.
    target: String,
    /// The user's name (for `initgroups`) and uid. None: `group` alone, the uid stays.
    user: Option<(CString, Uid)>,
    gid: Gid,
}

impl Credentials {
    /// None when neither key is set. `group` defaults to the user's primary group.
    pub fn from_config(server: &ServerConfig) -> Option<Credentials> {
        let (target, gid) = match (&server.user, &server.group) {
            (Some(user), group) => (
                format!("user {}", user.name),
                group.as_ref().map_or(user.gid, |g| g.gid),
            ),
            (None, Some(group)) => (format!("group {}", group.name), group.gid),
            (None, None) => return None,
        };
        let user = server.user.as_ref().map(|u| {
            let name = CString::new(u.name.as_str()).expect("passwd names are C strings");
            (name, u.uid)
        });
        Some(Credentials { target, user, gid })
    }
}

/// Reads `[server] user`/`group` for the master at start. When the master is not root they
/// cannot apply: it says so once, here, and the workers keep its (non-root) uid.
pub fn for_workers(server: &ServerConfig) -> Option<Credentials> {
    let creds = Credentials::from_config(server)?;
    let euid = unistd::geteuid();
    if !euid.is_root() {
        let keys = if server.user.is_some() {
            "user"
        } else {
            "group"
        };
        log::warn!("running as uid {euid}, not root: [server] {keys} ignored");
    }
    Some(creds)
}

/// Why a worker could not become its configured user. Fatal for that worker.
#[derive(Debug)]
pub enum PrivilegeError {
    /// A call of the switch failed.
    Call {
        target: String,
        call: &'static str,
        errno: Errno,
    },
    /// `setuid(0)` worked after the switch: something (kept capabilities, securebits) would
    /// let this process become root again.
    RootRegained { target: String },
    /// The ids read back are not the target's.
    WrongIds { target: String, found: String },
}

impl fmt::Display for PrivilegeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PrivilegeError::Call {
                target,
                call,
                errno,
            } => write!(f, "cannot drop privileges to {target}: {call}: {errno}"),
            PrivilegeError::RootRegained { target } => write!(
                f,
                "cannot drop privileges to {target}: setuid(0) still succeeds afterwards"
            ),
            PrivilegeError::WrongIds { target, found } => write!(
                f,
                "cannot drop privileges to {target}: after the switch the ids are {found}"
            ),
        }
    }
}

impl std::error::Error for PrivilegeError {}

/// In a freshly forked worker: becomes `creds` for good. Not root: nothing to drop (the master
/// warned at start), so nothing happens.
pub fn drop_privileges(creds: &Credentials) -> Result<(), PrivilegeError> {
    let euid = unistd::geteuid();
    if !euid.is_root() {
        return Ok(());
    }
    let failed = |call, errno| PrivilegeError::Call {
        target: creds.target.clone(),
        call,
        errno,
    };
    match &creds.user {
        Some((name, _)) => {
            unistd::initgroups(name, creds.gid).map_err(|e| failed("initgroups", e))?
        }
        None => unistd::setgroups(&[creds.gid]).map_err(|e| failed("setgroups", e))?,
    }
    unistd::setgid(creds.gid).map_err(|e| failed("setgid", e))?;
    let uid = match &creds.user {
        Some((_, uid)) => {
            unistd::setuid(*uid).map_err(|e| failed("setuid", e))?;
            *uid
        }
        None => euid,
    };

    // `user = "root"` asks for uid 0, so only a non-root target must be unable to return.
    if !uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::RootRegained {
            target: creds.target.clone(),
        });
    }
    let u = unistd::getresuid().map_err(|e| failed("getresuid", e))?;
    let g = unistd::getresgid().map_err(|e| failed("getresgid", e))?;
    if [u.real, u.effective, u.saved] != [uid; 3]
        || [g.real, g.effective, g.saved] != [creds.gid; 3]
    {
        return Err(PrivilegeError::WrongIds {
            target: creds.target.clone(),
            found: format!(
                "uid {}/{}/{}, gid {}/{}/{} (real/effective/saved)",
                u.real, u.effective, u.saved, g.real, g.effective, g.saved
            ),
        });
    }
    nix::sys::prctl::set_no_new_privs().map_err(|e| failed("prctl(PR_SET_NO_NEW_PRIVS)", e))
}
