//! `[server]`: the master's files, how it stops and reloads, whom the workers run as, and
//! the cluster bus.

use super::ServerProblem;
use super::values::{IntOrStr, seconds};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Deserializer, de};
use std::path::PathBuf;
use std::time::Duration;

/// `[server]`: where the master keeps its files, how it stops, and whom the workers run as.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Pid file, locked by the running master. Relative paths are relative to the config file.
    pub pid_file: PathBuf,
    /// Unix socket the CLI talks to. Relative to the config file.
    pub control_socket: PathBuf,
    /// Where `start -d` sends output. Relative to the config file.
    pub log_file: PathBuf,
    /// How long a stop waits for workers before the master SIGKILLs them.
    #[serde(deserialize_with = "seconds")]
    pub stop_timeout: Duration,
    /// A stopping worker sends Close 1001 to its clients over this window rather than all at
    /// once, so they do not all reconnect in the same instant. Shorter than `stop_timeout`.
    #[serde(deserialize_with = "seconds")]
    pub close_spread: Duration,
    /// How long a reload waits for a new worker to become ready, and for a replaced one to
    /// finish its clients before it is SIGKILLed.
    #[serde(deserialize_with = "seconds")]
    pub reload_timeout: Duration,
    /// In a reload, a replaced worker hands its open connections to the new one, except its
    /// `wss://` clients (a TLS session does not travel): it serves those on for up to this
    /// long, then closes them with 1012 (Service Restart) so they reconnect to the new one.
    /// The reload waits for them, as for any replaced worker, `reload_timeout` past it at most.
    #[serde(deserialize_with = "seconds")]
    pub drain_timeout: Duration,
    /// Log filter in `RUST_LOG` syntax (`info`, `wsd=debug`); `RUST_LOG` overrides it.
    pub log_level: String,
    /// User the workers switch to when the master runs as root: a name (`"nobody"`) or a uid.
    /// The master keeps root and binds every listener before forking, so ports below 1024
    /// work. Unset: workers run as the master's user. When the master is not root, it is
    /// ignored with a warning at start. An unknown user is a config error.
    pub user: Option<SystemUser>,
    /// Group the workers switch to (a name or a gid). Default: the user's primary group. Set
    /// without `user`, the workers keep the master's uid and only change group.
    pub group: Option<SystemGroup>,
    /// `redis://HOST:PORT/DB`: join the groups of every wsd server using this Redis into one
    /// bus (broadcasts, topics and `send_to` reach clients on any of them). Unset: the bus
    /// spans this server's workers only.
    pub bus: Option<RedisUrl>,
}

/// A Redis address for the cluster bus, checked when the file is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisUrl(pub String);

impl<'de> Deserialize<'de> for RedisUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if !s.starts_with("redis://") {
            return Err(de::Error::custom(format!(
                "bus must be a redis://HOST:PORT/DB address, got {s:?}"
            )));
        }
        #[cfg(feature = "cluster")]
        redis::IntoConnectionInfo::into_connection_info(s.as_str())
            .map_err(|e| de::Error::custom(format!("bad bus address {s:?}: {e}")))?;
        #[cfg(not(feature = "cluster"))]
        return Err(de::Error::custom(
            "this wsd was built without the cluster feature: it has no Redis bus",
        ));
        #[cfg(feature = "cluster")]
        Ok(RedisUrl(s))
    }
}

impl RedisUrl {
    /// The address for logs and `status`: a password in it is shown as `***`.
    pub fn redacted(&self) -> String {
        let s = &self.0;
        let rest = &s["redis://".len().min(s.len())..];
        match rest.rsplit_once('@') {
            Some((user_pass, host)) => {
                let user = user_pass.split_once(':').map_or("", |(u, _)| u);
                format!("redis://{user}:***@{host}")
            }
            None => s.clone(),
        }
    }
}

impl ServerConfig {
    pub(super) fn check(&self) -> Result<(), ServerProblem> {
        let spread = self.close_spread;
        for (limit, value) in [
            ("stop_timeout", self.stop_timeout),
            ("reload_timeout", self.reload_timeout),
        ] {
            if spread >= value {
                return Err(ServerProblem::SpreadTooLong {
                    spread,
                    limit,
                    value,
                });
            }
        }
        Ok(())
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            pid_file: PathBuf::from("wsd.pid"),
            control_socket: PathBuf::from("wsd.sock"),
            log_file: PathBuf::from("wsd.log"),
            stop_timeout: Duration::from_secs(10),
            close_spread: Duration::from_secs(1),
            reload_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            log_level: "info".into(),
            user: None,
            group: None,
            bus: None,
        }
    }
}

/// A user from the passwd database, looked up by name or uid when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemUser {
    /// The user's name.
    pub name: String,
    /// The user's id.
    pub uid: Uid,
    /// The primary group, used when `[server] group` is unset.
    pub gid: Gid,
}

/// A group from the group database, looked up by name or gid when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemGroup {
    /// The group's name.
    pub name: String,
    /// The group's id.
    pub gid: Gid,
}

impl<'de> Deserialize<'de> for SystemUser {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let lookup = |id: NameOrId| match id {
            NameOrId::Id(uid) => nix::unistd::User::from_uid(Uid::from_raw(uid))
                .map_err(|e| format!("cannot look up user {uid}: {e}"))?
                .ok_or_else(|| format!("unknown user {uid}")),
            NameOrId::Name(name) => nix::unistd::User::from_name(&name)
                .map_err(|e| format!("cannot look up user {name:?}: {e}"))?
                .ok_or_else(|| format!("unknown user {name:?}")),
        };
        let u = lookup(NameOrId::deserialize(d)?).map_err(de::Error::custom)?;
        Ok(SystemUser {
            name: u.name,
            uid: u.uid,
            gid: u.gid,
        })
    }
}

impl<'de> Deserialize<'de> for SystemGroup {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let lookup = |id: NameOrId| match id {
            NameOrId::Id(gid) => nix::unistd::Group::from_gid(Gid::from_raw(gid))
                .map_err(|e| format!("cannot look up group {gid}: {e}"))?
                .ok_or_else(|| format!("unknown group {gid}")),
            NameOrId::Name(name) => nix::unistd::Group::from_name(&name)
                .map_err(|e| format!("cannot look up group {name:?}: {e}"))?
                .ok_or_else(|| format!("unknown group {name:?}")),
        };
        let g = lookup(NameOrId::deserialize(d)?).map_err(de::Error::custom)?;
        Ok(SystemGroup {
            name: g.name,
            gid: g.gid,
        })
    }
}

/// A user or group as written: a name, or an id (`65534` or `"65534"`).
enum NameOrId {
    Name(String),
    Id(u32),
}

impl<'de> Deserialize<'de> for NameOrId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrStr::deserialize(d)? {
            IntOrStr::Int(n) => u32::try_from(n)
                .map(NameOrId::Id)
                .map_err(|_| de::Error::custom(format!("id out of range: {n}"))),
            IntOrStr::Float(f) => Err(de::Error::custom(format!("not a name or an id: {f}"))),
            IntOrStr::Str(s) => Ok(s.parse().map_or(NameOrId::Name(s), NameOrId::Id)),
        }
    }
}
