//! The `workers.toml` schema: a `[server]` table and one `[[worker]]` table per group.
//!
//! Every key has a default, unknown keys are errors, and every error names the file, the
//! line and the reason (`workers.toml:7:9: count must be between 1 and 1024`). Values that
//! need checking (listen addresses, sizes, durations, counts) are parsed by their own
//! `Deserialize` impls, so the TOML parser attaches the line of the offending value for us.

use ipnet::IpNet;
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Deserializer, de};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A config file that could not be used, with the place and the reason.
#[derive(Debug)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place in the file.
    pub position: Option<(usize, usize)>,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The whole configuration: server-wide settings and the worker groups it defines.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, if any (a library program may run with no file).
    pub file: Option<PathBuf>,
    pub server: ServerConfig,
    pub groups: Vec<GroupConfig>,
}

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
        redis::IntoConnectionInfo::into_connection_info(s.as_str())
            .map_err(|e| de::Error::custom(format!("bad bus address {s:?}: {e}")))?;
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
    fn check(&self) -> Result<(), String> {
        let spread = self.close_spread;
        for (name, limit) in [
            ("stop_timeout", self.stop_timeout),
            ("reload_timeout", self.reload_timeout),
        ] {
            if spread >= limit {
                return Err(format!(
                    "close_spread ({spread:?}) must be shorter than {name} ({limit:?})"
                ));
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
            log_level: "info".into(),
            user: None,
            group: None,
            bus: None,
        }
    }
}

/// `[[worker]]`: one group of identical worker processes behind one listen address, and the
/// knobs of their event loops. A library program builds the same struct with
/// [`GroupConfig::new`]; every key but `listen` has a safe default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Shown in the banner, `status` and logs. Empty means the app's name.
    #[serde(default)]
    pub name: String,
    /// `websocket://HOST:PORT` (or `ws://`, or bare `HOST:PORT`). Port 0 picks a free port.
    pub listen: Listen,
    /// Worker processes in this group (1..=1024).
    #[serde(default = "d::count", deserialize_with = "count")]
    pub count: usize,
    /// Which built-in (or library-registered) app runs in these workers.
    #[serde(default = "d::app")]
    pub app: String,
    /// `listen(2)` backlog of each slot's socket.
    #[serde(default = "d::backlog")]
    pub backlog: u32,
    /// Open connections per worker; at the cap the worker stops accepting until one leaves.
    #[serde(default = "d::max_connections")]
    pub max_connections: usize,
    /// Largest message (all fragments together) a client may send; larger closes with 1009.
    #[serde(default = "d::max_message_size", deserialize_with = "bytes")]
    pub max_message_size: usize,
    /// Largest single frame payload a client may send; larger closes with 1009.
    #[serde(default = "d::max_frame_size", deserialize_with = "bytes")]
    pub max_frame_size: usize,
    /// Bytes queued for one slow reader. A send that would go past it is refused
    /// (`send_buffer_policy`); `on_buffer_full` fires at half of it, `on_buffer_drain` when
    /// the queue empties. One message larger than the limit is taken only when nothing is queued.
    #[serde(default = "d::max_send_buffer", deserialize_with = "bytes")]
    pub max_send_buffer: usize,
    /// What a refused send does: `"drop"` the message (counted as send_fail) or `"close"` the
    /// connection with 1008.
    #[serde(default)]
    pub send_buffer_policy: SendBufferPolicy,
    /// The worker's read buffer, shared by all of its connections (a connection holds no
    /// buffer of its own while idle). Larger means fewer read calls for big messages.
    #[serde(default = "d::read_buffer_size", deserialize_with = "bytes")]
    pub read_buffer_size: usize,
    /// Largest upgrade request (request line and headers); larger gets 431.
    #[serde(default = "d::max_header_bytes", deserialize_with = "bytes")]
    pub max_header_bytes: usize,
    /// A connection that has not completed the upgrade in this time is dropped.
    #[serde(default = "d::handshake_timeout", deserialize_with = "seconds")]
    pub handshake_timeout: Duration,
    /// A client silent for this long is sent a Ping. 0 turns pings off.
    #[serde(default = "d::ping_interval", deserialize_with = "seconds")]
    pub ping_interval: Duration,
    /// A client silent for this long (no frame, no Pong) is closed with 1001. 0 turns it off.
    #[serde(default = "d::idle_timeout", deserialize_with = "seconds")]
    pub idle_timeout: Duration,
    /// Browser origins allowed to connect (`https://app.example.com`, `https://*.example.com`);
    /// others get 403. Empty allows any. Requests without `Origin` (not browsers) are allowed.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Connections one client address may hold in one worker (0 = no limit). Over it, a
    /// direct client is dropped at accept and a proxied one gets 429.
    #[serde(default = "d::max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Proxies (CIDRs or addresses) whose `X-Forwarded-For` / `X-Real-IP` name the client.
    /// From anyone else those headers are ignored.
    #[serde(default, deserialize_with = "networks")]
    pub trusted_proxies: Vec<IpNet>,
    /// After the server sends Close, how long it waits for the client's Close before dropping.
    #[serde(default = "d::close_timeout", deserialize_with = "seconds")]
    pub close_timeout: Duration,
    /// `false` keeps this group's workers through `wsd reload` (Workerman's `reloadable`):
    /// for workers holding state that a restart would lose. `restart` still replaces them.
    #[serde(default = "d::reloadable")]
    pub reloadable: bool,
    /// A folder whose files answer plain (non-upgrade) `GET` requests on this group's address,
    /// `index.html` for `/`. Relative to the config file. Unset: such requests get 426.
    #[serde(default)]
    pub static_dir: Option<PathBuf>,
}

/// The defaults, one function per key (serde wants functions).
mod d {
    use std::time::Duration;
    pub fn count() -> usize {
        4
    }
    pub fn app() -> String {
        "echo".into()
    }
    pub fn backlog() -> u32 {
        1024
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn max_message_size() -> usize {
        1 << 20
    }
    pub fn max_frame_size() -> usize {
        1 << 20
    }
    pub fn max_send_buffer() -> usize {
        1 << 20
    }
    pub fn read_buffer_size() -> usize {
        64 << 10
    }
    pub fn max_header_bytes() -> usize {
        8 << 10
    }
    pub fn max_connections_per_ip() -> usize {
        1024
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn ping_interval() -> Duration {
        Duration::from_secs(30)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(75)
    }
    pub fn reloadable() -> bool {
        true
    }
    pub fn close_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

impl GroupConfig {
    /// A group on `listen` with every other key at its default.
    pub fn new(listen: Listen) -> GroupConfig {
        GroupConfig {
            name: String::new(),
            listen,
            count: d::count(),
            app: d::app(),
            backlog: d::backlog(),
            max_connections: d::max_connections(),
            max_message_size: d::max_message_size(),
            max_frame_size: d::max_frame_size(),
            max_send_buffer: d::max_send_buffer(),
            send_buffer_policy: SendBufferPolicy::default(),
            read_buffer_size: d::read_buffer_size(),
            max_header_bytes: d::max_header_bytes(),
            handshake_timeout: d::handshake_timeout(),
            ping_interval: d::ping_interval(),
            idle_timeout: d::idle_timeout(),
            allowed_origins: Vec::new(),
            max_connections_per_ip: d::max_connections_per_ip(),
            trusted_proxies: Vec::new(),
            close_timeout: d::close_timeout(),
            reloadable: d::reloadable(),
            static_dir: None,
        }
    }

    /// The name shown to operators: `name`, or the app's name when unset.
    pub fn name(&self) -> &str {
        if self.name.is_empty() {
            &self.app
        } else {
            &self.name
        }
    }

    /// Cross-key checks that a single value's parser cannot make.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=1024).contains(&self.count) {
            return Err(format!(
                "count must be between 1 and 1024, got {}",
                self.count
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.read_buffer_size < 256 {
            return Err("read_buffer_size must be at least 256 bytes".into());
        }
        if self.max_header_bytes < 256 {
            return Err("max_header_bytes must be at least 256 bytes".into());
        }
        // Reads pause at half of it: below this a queued handshake answer would hold them.
        if self.max_send_buffer < 256 {
            return Err("max_send_buffer must be at least 256 bytes".into());
        }
        if self.handshake_timeout.is_zero() {
            return Err("handshake_timeout must be longer than 0".into());
        }
        if self.max_frame_size == 0 {
            // 0 means "off" for some keys; here it would refuse every non-empty message.
            return Err("max_frame_size must be at least 1 byte (there is no \"no limit\")".into());
        }
        if self.max_frame_size > self.max_message_size {
            return Err("max_frame_size must not be larger than max_message_size".into());
        }
        let (ping, idle) = (self.ping_interval, self.idle_timeout);
        if !ping.is_zero() && !idle.is_zero() && idle <= ping {
            return Err(format!(
                "idle_timeout ({idle:?}) must be longer than ping_interval ({ping:?}), \
                 or the Pong cannot arrive in time"
            ));
        }
        Ok(())
    }
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=1024).contains(&n) {
        return Err(de::Error::custom(format!(
            "count must be between 1 and 1024, got {n}"
        )));
    }
    Ok(n as usize)
}

/// What happens to a send that does not fit in a connection's `max_send_buffer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendBufferPolicy {
    /// The message is dropped and counted as a send failure; the connection stays.
    #[default]
    Drop,
    /// The connection is closed with 1008 (policy violation).
    Close,
}

/// `"10.0.0.0/8"` or a plain address (`"127.0.0.1"`, a /32 or /128).
fn networks<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| {
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| de::Error::custom(format!("not a CIDR or IP address: {s:?}")))
        })
        .collect()
}

fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    Bytes::deserialize(d).map(|b| b.0)
}

fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Seconds::deserialize(d).map(|s| s.0)
}

/// A byte size: an integer, or a string such as `"64KiB"`, `"16MiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub usize);

impl Bytes {
    pub fn parse(s: &str) -> Result<Bytes, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: usize = num
            .parse()
            .map_err(|_| format!("bad size {s:?}: expected e.g. 65536, \"64KiB\", \"16MiB\""))?;
        let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "bad size unit {other:?} in {s:?}: use B, KiB, MiB or GiB"
                ));
            }
        };
        num.checked_mul(mult)
            .map(Bytes)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrStr::deserialize(d)? {
            IntOrStr::Int(n) if n >= 0 => Ok(Bytes(n as usize)),
            IntOrStr::Int(n) => Err(de::Error::custom(format!(
                "size must not be negative, got {n}"
            ))),
            IntOrStr::Float(f) => Err(de::Error::custom(format!(
                "size must be a whole number of bytes, got {f}"
            ))),
            IntOrStr::Str(s) => Bytes::parse(&s).map_err(de::Error::custom),
        }
    }
}

/// A duration: a number of seconds (`10`, `0.5`) or a string such as `"500ms"`, `"10s"`, `"2m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl Seconds {
    pub fn parse(s: &str) -> Result<Seconds, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num.parse().map_err(|_| {
            format!("bad duration {s:?}: expected e.g. 10, \"500ms\", \"10s\", \"2m\"")
        })?;
        let secs = match unit.trim() {
            "ms" => num / 1000.0,
            "" | "s" => num,
            "m" | "min" => num * 60.0,
            "h" => num * 3600.0,
            other => {
                return Err(format!(
                    "bad duration unit {other:?} in {s:?}: use ms, s, m or h"
                ));
            }
        };
        Self::from_secs(secs)
    }

    fn from_secs(secs: f64) -> Result<Seconds, String> {
        if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
            return Err(format!("duration {secs}s is out of range"));
        }
        Ok(Seconds(Duration::from_secs_f64(secs)))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrStr::deserialize(d)? {
            IntOrStr::Int(n) => Seconds::from_secs(n as f64),
            IntOrStr::Float(f) => Seconds::from_secs(f),
            IntOrStr::Str(s) => Seconds::parse(&s),
        }
        .map_err(de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrStr {
    Int(i64),
    Float(f64),
    Str(String),
}

/// A user from the passwd database, looked up by name or uid when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemUser {
    pub name: String,
    pub uid: Uid,
    /// The primary group, used when `[server] group` is unset.
    pub gid: Gid,
}

/// A group from the group database, looked up by name or gid when the config is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemGroup {
    pub name: String,
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

/// A listen address as written (`websocket://0.0.0.0:2346`) and as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub addr: SocketAddr,
}

impl Listen {
    pub fn parse(s: &str) -> Result<Listen, String> {
        let rest = ["websocket://", "ws://"]
            .iter()
            .find_map(|scheme| s.strip_prefix(scheme))
            .unwrap_or(s);
        if rest.contains("://") {
            return Err(format!(
                "unsupported scheme in {s:?}: use websocket://HOST:PORT"
            ));
        }
        let rest = rest.trim_end_matches('/');
        let addr = rest
            .to_socket_addrs()
            .map_err(|e| format!("bad listen address {s:?}: {e} (expected websocket://HOST:PORT)"))?
            .next()
            .ok_or_else(|| format!("listen address {s:?} resolves to nothing"))?;
        Ok(Listen { addr })
    }
}

impl Listen {
    /// Both would take the same connections: one port, one family (IPv6 listeners are
    /// v6-only), and one address or a wildcard. SO_REUSEPORT would let the master bind both.
    pub fn overlaps(&self, other: &Listen) -> bool {
        let (a, b) = (self.addr, other.addr);
        a.port() != 0
            && a.port() == b.port()
            && a.is_ipv4() == b.is_ipv4()
            && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
    }
}

/// What `start`, `check` and `reload` all ask of the groups they would run, code's and the
/// file's together (the file's own were checked against each other with their lines): that
/// there is one, and that no two take the same connections.
pub fn check_runnable(groups: &[(&str, &Listen)]) -> Result<(), String> {
    if groups.is_empty() {
        return Err("no [[worker]] group: nothing would run".into());
    }
    first_overlap(groups).map_or(Ok(()), Err)
}

/// The first group (by name) whose listen address overlaps an earlier one's, as an error.
fn first_overlap<'a>(groups: &[(&'a str, &'a Listen)]) -> Option<String> {
    groups.iter().enumerate().find_map(|(i, (name, listen))| {
        let (them, _) = groups[..i].iter().find(|(_, l)| l.overlaps(listen))?;
        Some(format!(
            "group {name:?}: listen {listen} is already used by group {them:?}"
        ))
    })
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "websocket://{}", self.addr)
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Listen::parse(&String::deserialize(d)?).map_err(de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchema {
    server: Option<toml::Spanned<ServerConfig>>,
    #[serde(default, rename = "worker")]
    workers: Vec<toml::Spanned<GroupConfig>>,
}

impl Config {
    /// Defaults, for a library program started without a config file.
    pub fn empty() -> Config {
        Config {
            file: None,
            server: ServerConfig::default(),
            groups: Vec::new(),
        }
    }

    /// Reads and validates `path`. `apps` are the app names this program knows.
    pub fn load(path: &Path, apps: &[&str]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            position: None,
            reason: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text, apps)
    }

    pub fn parse(path: &Path, text: &str, apps: &[&str]) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, reason: String| ConfigError {
            file: path.to_path_buf(),
            position: span.map(|s| line_col(text, s.start)),
            reason,
        };
        let schema: FileSchema =
            toml::from_str(text).map_err(|e| at(e.span(), e.message().trim().to_string()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (mut server, server_span) = match schema.server {
            Some(s) => (s.get_ref().clone(), Some(s.span())),
            None => (ServerConfig::default(), None),
        };
        server.check().map_err(|r| at(server_span, r))?;
        for p in [
            &mut server.pid_file,
            &mut server.control_socket,
            &mut server.log_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let mut groups: Vec<GroupConfig> = Vec::new();
        for spanned in schema.workers {
            let span = spanned.span();
            let mut g = spanned.into_inner();
            if !apps.contains(&g.app.as_str()) {
                return Err(at(
                    Some(span),
                    format!(
                        "unknown app {:?}: known apps are {}",
                        g.app,
                        apps.join(", ")
                    ),
                ));
            }
            g.check().map_err(|r| at(Some(span.clone()), r))?;
            if let Some(dir) = &mut g.static_dir {
                if dir.is_relative() {
                    *dir = base.join(&*dir);
                }
                if !dir.is_dir() {
                    return Err(at(
                        Some(span),
                        format!("static_dir {} is not a directory", dir.display()),
                    ));
                }
            }
            if g.name.is_empty() {
                g.name = g.app.clone();
            }
            let name = g.name.clone();
            if let Some(other) = groups.iter().find(|o| o.listen.overlaps(&g.listen)) {
                return Err(at(
                    Some(span),
                    format!(
                        "listen {} is already used by group {:?} ({})",
                        g.listen,
                        other.name(),
                        other.listen
                    ),
                ));
            }
            if groups.iter().any(|o| o.name() == name) {
                return Err(at(
                    Some(span),
                    format!("group name {name:?} is used twice; set a distinct name"),
                ));
            }
            groups.push(g);
        }
        Ok(Config {
            file: Some(path.to_path_buf()),
            server,
            groups,
        })
    }

    /// Only the paths needed to reach a running master; tolerant of a config that no longer
    /// validates, so `wsd stop` works even after someone broke the file.
    pub fn locate(path: &Path) -> ServerConfig {
        let mut server = ServerConfig::default();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let table: Option<toml::Table> = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.parse().ok());
        let section = table
            .as_ref()
            .and_then(|t| t.get("server"))
            .and_then(|s| s.as_table());
        let get = |key: &str| {
            section
                .and_then(|s| s.get(key))
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
        };
        if let Some(p) = get("pid_file") {
            server.pid_file = p;
        }
        if let Some(p) = get("control_socket") {
            server.control_socket = p;
        }
        for p in [
            &mut server.pid_file,
            &mut server.control_socket,
            &mut server.log_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        server
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;

    const APPS: &[&str] = &["echo", "hello", "clock"];

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/wsd/workers.toml"), text, APPS)
    }

    #[test]
    fn seed_config_parses_with_defaults() {
        let c =
            parse("[[worker]]\nlisten = \"websocket://0.0.0.0:2346\"\napp = \"hello\"\n").unwrap();
        assert_eq!(c.groups.len(), 1);
        let g = &c.groups[0];
        assert_eq!(g.count, 4);
        assert_eq!(g.name(), "hello");
        assert_eq!(g.listen.addr, "0.0.0.0:2346".parse().unwrap());
        assert_eq!(c.server.pid_file, PathBuf::from("/etc/wsd/wsd.pid"));
        assert_eq!(g.read_buffer_size, 64 << 10);
        assert_eq!(g.send_buffer_policy, SendBufferPolicy::Drop);
        assert!(g.trusted_proxies.is_empty() && g.allowed_origins.is_empty());
    }

    #[test]
    fn limits_parse_and_cross_check() {
        let c = parse(
            "[[worker]]\nlisten = \"127.0.0.1:1\"\nsend_buffer_policy = \"close\"\n\
             trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\nallowed_origins = [\"https://a.com\"]\n\
             ping_interval = 0\nidle_timeout = \"2s\"\n",
        )
        .unwrap();
        let g = &c.groups[0];
        assert_eq!(g.send_buffer_policy, SendBufferPolicy::Close);
        assert_eq!(g.trusted_proxies.len(), 2);
        assert!(g.ping_interval.is_zero());
        let e = parse("[[worker]]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0/8\"]\n")
            .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        assert!(e.reason.contains("not a CIDR"), "{e}");
        let e =
            parse("[[worker]]\nlisten = \"127.0.0.1:1\"\nping_interval = 30\nidle_timeout = 10\n")
                .unwrap_err();
        assert!(e.reason.contains("idle_timeout"), "{e}");
        let e = parse("[[worker]]\nlisten = \"127.0.0.1:1\"\nsend_buffer_policy = \"block\"\n")
            .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        for (line, why) in [
            (
                "max_send_buffer = 1",
                "max_send_buffer must be at least 256 bytes",
            ),
            (
                "handshake_timeout = 0",
                "handshake_timeout must be longer than 0",
            ),
            (
                "max_frame_size = 0",
                "max_frame_size must be at least 1 byte",
            ),
            (
                "max_message_size = 0",
                "max_frame_size must not be larger than max_message_size",
            ),
        ] {
            let e = parse(&format!("[[worker]]\nlisten = \"127.0.0.1:1\"\n{line}\n")).unwrap_err();
            assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
            assert!(e.reason.contains(why), "{e}");
        }
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let e = parse(
            "[server]\nstop_timeout = 3\n\n[[worker]]\nlisten = \"ws://127.0.0.1:1\"\ncount = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(6), "{e}");
        assert!(e.to_string().starts_with("/etc/wsd/workers.toml:6:"), "{e}");
        assert!(e.reason.contains("count must be between 1 and 1024"), "{e}");

        let e =
            parse("[[worker]]\nlisten = \"ws://127.0.0.1:1\"\nmax_conections = 5\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        assert!(e.reason.contains("max_conections"), "{e}");

        let e = parse("[[worker]]\nlisten = \"ws://127.0.0.1:1\"\napp = \"nope\"\n").unwrap_err();
        assert!(e.reason.contains("unknown app \"nope\""), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(Bytes::parse("64KiB").unwrap(), Bytes(65536));
        assert_eq!(Bytes::parse("16 MiB").unwrap(), Bytes(16 << 20));
        assert!(Bytes::parse("12 parsecs").is_err());
        assert_eq!(
            Seconds::parse("500ms").unwrap(),
            Seconds(Duration::from_millis(500))
        );
        assert_eq!(
            Seconds::parse("2m").unwrap(),
            Seconds(Duration::from_secs(120))
        );
        let c = parse("[[worker]]\nlisten = \"127.0.0.1:0\"\nmax_message_size = \"16MiB\"\nhandshake_timeout = 2.5\n").unwrap();
        assert_eq!(c.groups[0].max_message_size, 16 << 20);
        assert_eq!(c.groups[0].handshake_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn server_timeouts_cross_check() {
        let c = parse("[server]\nclose_spread = \"2s\"\nreload_timeout = 60\n").unwrap();
        assert_eq!(c.server.close_spread, Duration::from_secs(2));
        assert_eq!(c.server.reload_timeout, Duration::from_secs(60));
        let e = parse("# top\n[server]\nstop_timeout = 1\n").unwrap_err();
        assert!(e.reason.contains("close_spread"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    }

    #[test]
    fn user_and_group_are_resolved_when_read() {
        // root (uid and gid 0) exists on every system this runs on.
        let c = parse("[server]\nuser = \"root\"\ngroup = 0\n").unwrap();
        let user = c.server.user.unwrap();
        assert_eq!((user.uid.as_raw(), user.gid.as_raw()), (0, 0));
        assert_eq!(c.server.group.unwrap().name, "root");
        let c = parse("[server]\nuser = \"0\"\n").unwrap();
        assert_eq!(c.server.user.unwrap().name, "root");
        assert!(
            c.server.group.is_none(),
            "the primary group is applied at start"
        );
        let e = parse("[server]\nstop_timeout = 1\nuser = \"no-such-user-xyz\"\n").unwrap_err();
        assert_eq!(e.position, Some((3, 8)), "{e}");
        assert_eq!(e.reason, "unknown user \"no-such-user-xyz\"");
        let e = parse("[server]\ngroup = \"no-such-group-xyz\"\n").unwrap_err();
        assert_eq!(e.position, Some((2, 9)), "{e}");
        assert_eq!(e.reason, "unknown group \"no-such-group-xyz\"");
    }

    #[test]
    fn bus_address_and_static_dir_are_checked() {
        let c = parse("[server]\nbus = \"redis://127.0.0.1:6379/2\"\n").unwrap();
        assert_eq!(c.server.bus.unwrap().0, "redis://127.0.0.1:6379/2");
        let e = parse("[server]\nbus = \"http://x\"\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(e.reason.contains("redis://"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("workers.toml");
        let text = "[[worker]]\nlisten = \"127.0.0.1:0\"\nstatic_dir = \"public\"\n";
        let e = Config::parse(&file, text, APPS).unwrap_err();
        assert!(e.reason.contains("is not a directory"), "{e}");
        std::fs::create_dir(dir.path().join("public")).unwrap();
        let c = Config::parse(&file, text, APPS).unwrap();
        assert_eq!(c.groups[0].static_dir, Some(dir.path().join("public")));
    }

    #[test]
    fn duplicate_listen_is_rejected() {
        let e = parse("[[worker]]\nlisten = \"127.0.0.1:9\"\n[[worker]]\nname = \"b\"\nlisten = \"ws://127.0.0.1:9\"\n").unwrap_err();
        assert!(e.reason.contains("already used"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        // A wildcard and a specific address on one port overlap; other families do not.
        let two = |a: &str, b: &str| {
            parse(&format!(
                "[[worker]]\nlisten = \"{a}\"\n[[worker]]\nname = \"b\"\nlisten = \"{b}\"\n"
            ))
        };
        let e = two("0.0.0.0:9", "127.0.0.1:9").unwrap_err();
        assert!(
            e.reason
                .contains("already used by group \"echo\" (websocket://0.0.0.0:9)"),
            "{e}"
        );
        assert!(two("[::1]:9", "[::]:9").is_err());
        assert!(two("0.0.0.0:9", "[::]:9").is_ok());
        assert!(two("127.0.0.1:9", "127.0.0.2:9").is_ok());
        assert!(two("127.0.0.1:0", "0.0.0.0:0").is_ok());
    }

    #[test]
    fn code_and_file_groups_are_checked_together() {
        let l = |s: &str| Listen::parse(s).unwrap();
        let (a, b, c) = (l("0.0.0.0:9"), l("127.0.0.1:8"), l("127.0.0.1:9"));
        assert_eq!(check_runnable(&[("a", &a), ("b", &b)]), Ok(()));
        assert_eq!(
            check_runnable(&[]),
            Err("no [[worker]] group: nothing would run".into())
        );
        assert_eq!(
            first_overlap(&[("a", &a), ("b", &b), ("c", &c)]).as_deref(),
            Some("group \"c\": listen websocket://127.0.0.1:9 is already used by group \"a\"")
        );
    }

    #[test]
    fn bus_passwords_stay_out_of_logs() {
        let url = |s: &str| RedisUrl(s.to_string()).redacted();
        assert_eq!(url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(url("redis://:s3cret@h:1/2"), "redis://:***@h:1/2");
        assert_eq!(url("redis://me:s3cret@h:1/2"), "redis://me:***@h:1/2");
    }
}
