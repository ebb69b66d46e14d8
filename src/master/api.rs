//! The backend API's listening sockets: one per worker slot of the group it serves, bound by
//! the master with SO_REUSEPORT exactly as the WebSocket listeners are (`listeners.rs`), so a
//! slot's API accept queue survives its worker's respawn and a reload hands it to the new
//! worker.

use super::error::ReloadError;
use super::listeners::{self, BindError};
use crate::config::ApiConfig;
use std::net::{SocketAddr, TcpListener};

/// The backlog of each API socket: backends keep their connections alive, so few arrive at once.
const BACKLOG: u32 = 1024;

/// `[api]` as the master runs it.
pub struct ApiSlots {
    /// The settings new workers get (a reload may change keys and limits).
    pub config: ApiConfig,
    /// The group whose workers serve it.
    pub group: String,
    /// The address bound (port 0 resolved).
    pub addr: SocketAddr,
    listeners: Vec<TcpListener>,
}

impl ApiSlots {
    /// Binds one socket per slot of the served group, which has `count` slots.
    pub fn bind(config: ApiConfig, group: String, count: usize) -> Result<ApiSlots, BindError> {
        let listeners = listeners::bind_slots(config.listen.addr, count, BACKLOG)?;
        ApiSlots::serve_on(config, group, listeners)
    }

    /// Serves on sockets bound already: by [`ApiSlots::bind`], or by the master this one
    /// replaces (`wsd upgrade`).
    pub fn serve_on(
        config: ApiConfig,
        group: String,
        listeners: Vec<TcpListener>,
    ) -> Result<ApiSlots, BindError> {
        let addr = (listeners.first())
            .map(TcpListener::local_addr)
            .unwrap_or_else(|| Err(std::io::Error::other("no API socket was inherited")))
            .map_err(|error| BindError {
                addr: config.listen.addr,
                error,
            })?;
        Ok(ApiSlots {
            config,
            group,
            addr,
            listeners,
        })
    }

    /// The sockets, for the master that replaces this one.
    pub fn fds(&self) -> Vec<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.listeners.iter().map(|l| l.as_raw_fd()).collect()
    }

    /// `http://HOST:PORT`, for the banner, logs and `status`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// In the forked worker: its slot's socket (the master's table is the child's copy).
    pub fn take(&mut self, slot: usize) -> Option<TcpListener> {
        (slot < self.listeners.len()).then(|| self.listeners.swap_remove(slot))
    }

    /// One socket per slot again after a reload changed the group's `count`: new ones for new
    /// slots, and a removed slot's socket closed (a socket no worker accepts on would hold
    /// the requests the kernel gives it).
    pub fn fit(&mut self, count: usize) -> Result<(), BindError> {
        let have = self.listeners.len();
        if count > have {
            self.listeners
                .extend(listeners::bind_more(self.addr, count - have, BACKLOG)?);
        }
        self.listeners.truncate(count);
        Ok(())
    }

    /// Whether `new` (from the re-read file, serving `group`) can replace the running API at a
    /// reload: only its keys and limits may change; its address and group need a restart.
    pub fn reloadable(
        &self,
        new: Option<&ApiConfig>,
        group: Option<&str>,
    ) -> Result<(), ReloadError> {
        let restart = |what, old: String, new: String| ReloadError::TableNeedsRestart {
            table: "api",
            what,
            old,
            new,
        };
        let Some(new) = new else {
            return Err(restart("table", "present".into(), "removed".into()));
        };
        if new.listen != self.config.listen {
            return Err(restart(
                "listen",
                self.config.listen.addr.to_string(),
                new.listen.addr.to_string(),
            ));
        }
        match group {
            Some(g) if g == self.group => Ok(()),
            other => Err(restart(
                "group",
                self.group.clone(),
                other.unwrap_or("none").to_string(),
            )),
        }
    }
}
