//! `[[worker]]`: one group of identical worker processes behind one listen address, the
//! limits of their event loops, and every key's default.

use super::GroupProblem;
use super::values::{Listen, bytes, seconds};
use crate::proto::handshake::is_token;
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, de};
use std::path::PathBuf;
use std::time::Duration;

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
    // TLS
    /// PEM certificate chain (the server's certificate first): with `tls_key`, the group
    /// serves `wss://` (and its static files over https). Relative to the config file.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert` (PKCS#8, PKCS#1 or SEC1; ECDSA, Ed25519 or RSA).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The certificate and key, read and checked: filled when the config is read (and, for a
    /// group defined in code, when the master starts).
    #[cfg(feature = "tls")]
    #[serde(skip)]
    pub tls: Option<crate::tls::Identity>,
    // subprotocols
    /// Subprotocols this group speaks, most preferred first. Of those a client offers
    /// (`Sec-WebSocket-Protocol`), the first in this list is chosen and answered. Empty: none
    /// is answered (an `on_upgrade` hook may still pick one the client offered).
    #[serde(default)]
    pub subprotocols: Vec<String>,
    /// Refuse with 400 an upgrade that offers none of `subprotocols` (which must then be set).
    #[serde(default)]
    pub require_subprotocol: bool,
    // permessage-deflate
    /// permessage-deflate (RFC 7692): `"off"`, `"shared"` (one compressor per worker, reset
    /// for each message) or `"dedicated"` (a compressor per connection that keeps its window
    /// between messages). Off by default: compression costs CPU on every message, and in
    /// dedicated mode memory on every connection.
    #[serde(default)]
    pub compression: Compression,
    /// Dedicated mode's LZ77 window, as a power of two (9..=15): the server's compressor
    /// keeps the last 2^bits bytes it sent. Smaller saves memory per connection and costs
    /// ratio on repetitive traffic. Shared mode always uses 15 (its compressor is the
    /// worker's, not the connection's), unless a client asks for less.
    #[serde(
        default = "d::compression_window_bits",
        deserialize_with = "window_bits"
    )]
    pub compression_window_bits: u8,
    /// Messages shorter than this are sent uncompressed (RSV1 clear): on a few bytes, deflate
    /// saves nothing and costs a compressor call.
    #[serde(default = "d::compression_min_size", deserialize_with = "bytes")]
    pub compression_min_size: usize,
    /// zlib's compression level, 1 (fastest) to 9 (smallest).
    #[serde(default = "d::compression_level", deserialize_with = "level")]
    pub compression_level: u32,
    // signed tokens
    /// `"none"`, or `"jwt"`: an upgrade needs a valid signed token (401 otherwise), and the
    /// connection is bound to its user, its allowed topics, and its expiry.
    #[serde(default)]
    pub auth: Auth,
    /// The HS256 secret tokens are signed with (at least 32 bytes).
    #[serde(default)]
    pub jwt_hs256_secret: Option<super::Secret>,
    /// A PEM public key (RSA or EC) whose private half signs the tokens: RS256 or ES256.
    /// Relative to the config file.
    #[serde(default)]
    pub jwt_public_key: Option<PathBuf>,
    /// A cookie that may carry the token, besides `?token=` and `Authorization: Bearer`.
    #[serde(default)]
    pub token_cookie: Option<String>,
    /// The key, read and checked: filled when the config is read (and, for a group defined
    /// in code, when it starts).
    #[cfg(feature = "jwt")]
    #[serde(skip)]
    pub jwt: Option<crate::auth::Verifier>,
    // presence
    /// Which topics keep presence (who is subscribed, shown by the API and to subscribers
    /// that ask): `false`, `true` (every topic), or a pattern or list of patterns
    /// (`"room/*"`). With `[server] bus` it is kept in Redis for the whole cluster.
    #[serde(default, deserialize_with = "presence")]
    pub presence: Presence,
    /// Subscribers of a presence topic get `{"event": "join"|"leave", ...}` messages when a
    /// client subscribes or leaves.
    #[serde(default)]
    pub presence_events: bool,
    // handlers (`app = "exec"`, see `handler.rs`)
    /// The handler's argv (no shell): each worker runs one, for all its connections.
    #[serde(default)]
    pub command: Vec<String>,
    /// The handler's working directory, relative to the config file. Unset: the config
    /// file's directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Environment variables added to the handler's (wsd's own are kept).
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// The handler decides each upgrade: it answers `connect` with `accept` or `reject`, and
    /// the 101 waits for it (at most `connect_timeout`).
    #[serde(default)]
    pub authorize: bool,
    /// How long an upgrade waits for the handler's decision; then it is refused with 503.
    #[serde(default = "d::connect_timeout", deserialize_with = "seconds")]
    pub connect_timeout: Duration,
    /// Event bytes that may wait for a slow handler; past it the worker stops reading its
    /// clients until the handler catches up.
    #[serde(default = "d::handler_queue", deserialize_with = "bytes")]
    pub handler_queue: usize,
    // webhooks (`app = "webhook"`)
    /// Where events are POSTed: `http://host:port/path`.
    #[serde(default)]
    pub url: Option<String>,
    /// Where `connect` events go instead of `url`.
    #[serde(default)]
    pub connect_url: Option<String>,
    /// Where `message` events go instead of `url`.
    #[serde(default)]
    pub message_url: Option<String>,
    /// Where `close` events go instead of `url`.
    #[serde(default)]
    pub close_url: Option<String>,
    /// How long one POST may take, connecting included.
    #[serde(default = "d::webhook_timeout", deserialize_with = "seconds")]
    pub webhook_timeout: Duration,
    /// Keep-alive connections (and requests in flight) to the backend per worker.
    #[serde(default = "d::webhook_connections")]
    pub webhook_connections: usize,
}

/// Which topics keep presence.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Presence {
    /// None.
    #[default]
    Off,
    /// Every topic.
    All,
    /// Topics that are one of these, or start with one ending in `*`.
    Topics(Vec<String>),
}

impl Presence {
    /// Whether `topic` keeps presence.
    pub fn covers(&self, topic: &str) -> bool {
        match self {
            Presence::Off => false,
            Presence::All => true,
            Presence::Topics(ps) => ps.iter().any(|p| topic_matches(p, topic)),
        }
    }
}

/// Whether `topic` is `pattern`, or starts with it when it ends in `*` (`room/*`): the topic
/// patterns of `presence` and of a token's `topics` claim.
pub(crate) fn topic_matches(pattern: &str, topic: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => pattern == topic,
    }
}

fn presence<'de, D: Deserializer<'de>>(d: D) -> Result<Presence, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Flag(bool),
        One(String),
        Many(Vec<String>),
    }
    Ok(match Written::deserialize(d)? {
        Written::Flag(false) => Presence::Off,
        Written::Flag(true) => Presence::All,
        Written::One(p) => Presence::Topics(vec![p]),
        Written::Many(ps) => Presence::Topics(ps),
    })
}

/// Whether a group's clients must present a signed token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Auth {
    /// Anyone may connect (the app's `on_upgrade` may still decide).
    #[default]
    None,
    /// A JWT signed with the group's key.
    Jwt,
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
    // permessage-deflate
    pub fn compression_window_bits() -> u8 {
        15
    }
    pub fn compression_min_size() -> usize {
        64
    }
    pub fn compression_level() -> u32 {
        1
    }
    // handlers
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn handler_queue() -> usize {
        1 << 20
    }
    pub fn webhook_timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub fn webhook_connections() -> usize {
        4
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
            tls_cert: None,
            tls_key: None,
            #[cfg(feature = "tls")]
            tls: None,
            // subprotocols
            subprotocols: Vec::new(),
            require_subprotocol: false,
            // permessage-deflate
            compression: Compression::default(),
            compression_window_bits: d::compression_window_bits(),
            compression_min_size: d::compression_min_size(),
            compression_level: d::compression_level(),
            auth: Auth::None,
            jwt_hs256_secret: None,
            jwt_public_key: None,
            token_cookie: None,
            #[cfg(feature = "jwt")]
            jwt: None,
            presence: Presence::Off,
            presence_events: false,
            command: Vec::new(),
            cwd: None,
            env: Default::default(),
            authorize: false,
            connect_timeout: d::connect_timeout(),
            handler_queue: d::handler_queue(),
            url: None,
            connect_url: None,
            message_url: None,
            close_url: None,
            webhook_timeout: d::webhook_timeout(),
            webhook_connections: d::webhook_connections(),
        }
    }

    /// Reads and checks the token key this group names, if it uses tokens.
    #[cfg(feature = "jwt")]
    pub fn load_jwt(&mut self) -> Result<(), crate::auth::KeyError> {
        use crate::auth::Verifier;
        self.jwt = match (self.auth, &self.jwt_hs256_secret, &self.jwt_public_key) {
            (Auth::Jwt, Some(secret), None) => Some(Verifier::hs256(secret.expose())?),
            (Auth::Jwt, None, Some(path)) => Some(Verifier::load_public_key(path)?),
            _ => None,
        };
        Ok(())
    }

    /// Reads and checks the certificate and key this group names, if it names any.
    #[cfg(feature = "tls")]
    pub fn load_tls(&mut self) -> Result<(), crate::tls::TlsError> {
        self.tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(crate::tls::Identity::load(cert, key)?),
            _ => None,
        };
        Ok(())
    }

    /// The scheme clients use: `wss://` for a group with a certificate, `websocket://`
    /// otherwise (shown in the banner and `status`).
    pub fn scheme(&self) -> &'static str {
        if self.tls_cert.is_some() {
            "wss://"
        } else {
            "websocket://"
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
    pub fn check(&self) -> Result<(), GroupProblem> {
        if !(1..=1024).contains(&self.count) {
            return Err(GroupProblem::Count(self.count as i64));
        }
        if self.max_connections == 0 {
            return Err(GroupProblem::NoConnections);
        }
        for (key, value) in [
            ("read_buffer_size", self.read_buffer_size),
            ("max_header_bytes", self.max_header_bytes),
            // Reads pause at half of it: below this a queued handshake answer would hold them.
            ("max_send_buffer", self.max_send_buffer),
        ] {
            if value < 256 {
                return Err(GroupProblem::TooSmall { key, min: 256 });
            }
        }
        if self.handshake_timeout.is_zero() {
            return Err(GroupProblem::NoHandshakeTime);
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(GroupProblem::TlsHalf);
        }
        #[cfg(not(feature = "tls"))]
        if self.tls_cert.is_some() {
            return Err(GroupProblem::NoTls);
        }
        if self.max_frame_size == 0 {
            // 0 means "off" for some keys; here it would refuse every non-empty message.
            return Err(GroupProblem::NoFrameSize);
        }
        if self.max_frame_size > self.max_message_size {
            return Err(GroupProblem::FrameOverMessage);
        }
        let (ping, idle) = (self.ping_interval, self.idle_timeout);
        if !ping.is_zero() && !idle.is_zero() && idle <= ping {
            return Err(GroupProblem::IdleBeforePing { idle, ping });
        }
        // subprotocols
        if let Some(bad) = self.subprotocols.iter().find(|p| !is_token(p)) {
            return Err(GroupProblem::BadSubprotocol(bad.clone()));
        }
        if self.require_subprotocol && self.subprotocols.is_empty() {
            return Err(GroupProblem::RequireWithoutSubprotocols);
        }
        // permessage-deflate: a file's values failed in their parsers already; these are for
        // groups built in code.
        if !WINDOW_BITS.contains(&self.compression_window_bits) {
            return Err(GroupProblem::WindowBits(
                self.compression_window_bits.into(),
            ));
        }
        if !LEVELS.contains(&self.compression_level) {
            return Err(GroupProblem::CompressionLevel(
                self.compression_level.into(),
            ));
        }
        // signed tokens
        let keys = [
            self.jwt_hs256_secret.is_some(),
            self.jwt_public_key.is_some(),
        ];
        match self.auth {
            Auth::Jwt if keys == [true, false] || keys == [false, true] => {}
            Auth::Jwt => return Err(GroupProblem::JwtKey),
            Auth::None if keys.contains(&true) || self.token_cookie.is_some() => {
                return Err(GroupProblem::JwtWithoutAuth);
            }
            Auth::None => {}
        }
        #[cfg(not(feature = "jwt"))]
        if self.auth == Auth::Jwt {
            return Err(GroupProblem::NoJwt);
        }
        if self.presence_events && self.presence == Presence::Off {
            return Err(GroupProblem::EventsWithoutPresence);
        }
        Ok(())
    }
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    let n = i64::deserialize(d)?;
    if !(1..=1024).contains(&n) {
        return Err(de::Error::custom(GroupProblem::Count(n)));
    }
    Ok(n as usize)
}

/// Whether and how a group compresses messages (permessage-deflate, RFC 7692).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Not negotiated: clients that offer it get an answer without it.
    #[default]
    Off,
    /// No context takeover either way: one compressor and one decompressor per worker, reset
    /// for each message, so an idle connection holds no compression state, and a broadcast is
    /// compressed once for all its recipients.
    Shared,
    /// Context takeover: each connection gets its own compressor (and decompressor, unless
    /// the client promises to reset its own) on first use, which compresses repetitive
    /// traffic better at a fixed cost in memory per connection.
    Dedicated,
}

/// The LZ77 window sizes zlib can make for raw deflate (RFC 7692 also allows 8).
const WINDOW_BITS: std::ops::RangeInclusive<u8> = 9..=15;
/// zlib's compression levels, less 0 (no compression).
const LEVELS: std::ops::RangeInclusive<u32> = 1..=9;

fn window_bits<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let n = i64::deserialize(d)?;
    match u8::try_from(n) {
        Ok(bits) if WINDOW_BITS.contains(&bits) => Ok(bits),
        _ => Err(de::Error::custom(GroupProblem::WindowBits(n))),
    }
}

fn level<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let n = i64::deserialize(d)?;
    match u32::try_from(n) {
        Ok(level) if LEVELS.contains(&level) => Ok(level),
        _ => Err(de::Error::custom(GroupProblem::CompressionLevel(n))),
    }
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
