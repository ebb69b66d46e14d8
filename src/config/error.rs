//! Why a config cannot be used: [`ConfigError`] says where (file, line, column), and
//! [`ConfigProblem`] says what, one variant per kind of mistake. `wsd check`, `start` and
//! `reload` print them as `FILE:LINE:COL: reason`.

use super::Listen;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A config file that could not be used, with the place and the reason.
#[derive(Debug)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line and column, when the error has a place in the file.
    pub position: Option<(usize, usize)>,
    /// What is wrong (boxed: errors travel by value up the call stack, and this keeps the
    /// `Result`s small).
    pub reason: Box<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some((line, col)) => write!(f, "{}:{line}:{col}: {}", self.file.display(), self.reason),
            None => write!(f, "{}: {}", self.file.display(), self.reason),
        }
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.reason)
    }
}

/// What is wrong with a config.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigProblem {
    /// The file cannot be read.
    #[error("cannot read: {0}")]
    Read(#[source] io::Error),
    /// Not TOML, an unknown key, or a value of the wrong type or out of range: the TOML
    /// parser's message, which carries the value's own reason.
    #[error("{0}")]
    Syntax(String),
    /// `[server]` keys that contradict each other.
    #[error(transparent)]
    Server(#[from] ServerProblem),
    /// `[[worker]]` keys that contradict each other.
    #[error(transparent)]
    Group(#[from] GroupProblem),
    /// `[api]` values that cannot be served.
    #[error(transparent)]
    Api(#[from] super::ApiProblem),
    /// `app` names no app this program knows.
    #[error("unknown app {app:?}: known apps are {}", known.join(", "))]
    UnknownApp {
        /// The name given.
        app: String,
        /// The apps this program knows.
        known: Vec<String>,
    },
    /// The token key cannot check tokens.
    #[cfg(feature = "jwt")]
    #[error(transparent)]
    Jwt(#[from] crate::auth::KeyError),
    /// The certificate or key cannot be served.
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// `static_dir` is not a directory.
    #[error("static_dir {} is not a directory", .0.display())]
    NoStaticDir(PathBuf),
    /// Two groups of the file would take the same connections.
    #[error("listen {listen} is already used by group {group:?} ({its_listen})")]
    ListenTaken {
        /// This group's address.
        listen: Listen,
        /// The earlier group that has it.
        group: String,
        /// That group's address.
        its_listen: Listen,
    },
    /// Two groups share a name.
    #[error("group name {0:?} is used twice; set a distinct name")]
    DuplicateName(String),
    /// No group would run.
    #[error("no [[worker]] group: nothing would run")]
    NoGroups,
    /// A group, from the file or defined in code, overlaps an earlier one.
    #[error("group {group:?}: listen {listen} is already used by group {other:?}")]
    Overlap {
        /// The later group.
        group: String,
        /// Its address.
        listen: Listen,
        /// The earlier group it overlaps.
        other: String,
    },
}

/// `[server]` keys that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServerProblem {
    /// `close_spread` must leave time for the closing handshakes.
    #[error("close_spread ({spread:?}) must be shorter than {limit} ({value:?})")]
    SpreadTooLong {
        /// `close_spread`.
        spread: Duration,
        /// The key it must be shorter than.
        limit: &'static str,
        /// That key's value.
        value: Duration,
    },
}

/// `[[worker]]` values out of range, or keys that contradict each other.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GroupProblem {
    /// `count` is 0 or over 1024.
    #[error("count must be between 1 and 1024, got {0}")]
    Count(i64),
    /// `max_connections` is 0.
    #[error("max_connections must be at least 1")]
    NoConnections,
    /// A buffer key below its floor.
    #[error("{key} must be at least {min} bytes")]
    TooSmall {
        /// The key.
        key: &'static str,
        /// Its smallest allowed value.
        min: usize,
    },
    /// `handshake_timeout` is 0.
    #[error("handshake_timeout must be longer than 0")]
    NoHandshakeTime,
    /// `max_frame_size` is 0, which would refuse every non-empty message.
    #[error("max_frame_size must be at least 1 byte (there is no \"no limit\")")]
    NoFrameSize,
    /// A frame could be larger than a whole message.
    #[error("max_frame_size must not be larger than max_message_size")]
    FrameOverMessage,
    /// Only one of `tls_cert` and `tls_key` is set.
    #[error("tls_cert and tls_key go together: set both, or neither")]
    TlsHalf,
    /// A certificate is set in a build without TLS.
    #[error("this wsd was built without the tls feature: it cannot serve wss://")]
    NoTls,
    /// The Pong to a keepalive Ping could not arrive before the idle timeout.
    #[error(
        "idle_timeout ({idle:?}) must be longer than ping_interval ({ping:?}), \
         or the Pong cannot arrive in time"
    )]
    IdleBeforePing {
        /// `idle_timeout`.
        idle: Duration,
        /// `ping_interval`.
        ping: Duration,
    },
    /// A `subprotocols` entry that is not a token (RFC 6455 §4.1): empty, or with spaces,
    /// commas, quotes or other separators.
    #[error(
        "subprotocol {0:?} is not a token: use letters, digits and !#$%&'*+-.^_`|~ (no spaces or commas)"
    )]
    BadSubprotocol(String),
    /// `require_subprotocol = true` with no `subprotocols` to require.
    #[error("require_subprotocol = true needs a subprotocols list to choose from")]
    RequireWithoutSubprotocols,
    /// `compression_window_bits` outside 9..=15.
    #[error("compression_window_bits must be between 9 and 15, got {0}")]
    WindowBits(i64),
    /// `compression_level` outside 1..=9.
    #[error("compression_level must be between 1 (fastest) and 9 (smallest), got {0}")]
    CompressionLevel(i64),
    /// `auth = "jwt"` without exactly one key.
    #[error("auth = \"jwt\" needs one of jwt_hs256_secret and jwt_public_key (not both)")]
    JwtKey,
    /// A token key or cookie without `auth = "jwt"`.
    #[error("jwt_hs256_secret, jwt_public_key and token_cookie need auth = \"jwt\"")]
    JwtWithoutAuth,
    /// `presence_events` without `presence`.
    #[error("presence_events = true needs presence (true, or topic patterns)")]
    EventsWithoutPresence,
    /// `auth = "jwt"` in a build without it.
    #[error("this wsd was built without the jwt feature: it cannot check tokens")]
    NoJwt,
    /// `app = "exec"` without `command`.
    #[error("app = \"exec\" needs command = [\"program\", \"arg\", ...]")]
    NoCommand,
    /// Handler keys on a group that runs no handler.
    #[error("{0} is for app = \"exec\"")]
    HandlerKeyWithoutExec(&'static str),
    /// The handler's program cannot be run.
    #[error("command {program:?}: {why}")]
    NotExecutable {
        /// The program as written.
        program: String,
        /// Why.
        why: &'static str,
    },
    /// `handler_queue` too small to hold one message's event.
    #[error("handler_queue must be at least max_message_size ({0} bytes)")]
    HandlerQueueSmall(usize),
    /// `connect_timeout` is 0.
    #[error("connect_timeout must be longer than 0")]
    NoConnectTime,
    /// `app = "webhook"` without a URL for every event.
    #[error(
        "app = \"webhook\" needs url = \"http://...\" (or connect_url, message_url and close_url)"
    )]
    NoUrl,
    /// A webhook URL that is not `http://host[:port][/path]`.
    #[error("{key} {url:?} is not an http:// URL with a host")]
    BadUrl {
        /// The key.
        key: &'static str,
        /// The value.
        url: String,
    },
    /// Webhook keys on a group that posts no events.
    #[error("{0} is for app = \"webhook\"")]
    WebhookKeyWithoutWebhook(&'static str),
    /// `webhook_connections` outside 1..=64, or `webhook_timeout` 0.
    #[error("webhook_connections must be 1 to 64, and webhook_timeout longer than 0")]
    WebhookLimits,
}

/// A value that does not parse: a size, a duration or a listen address, in `workers.toml` or
/// given in code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValueError {
    /// Not a number with an optional unit.
    #[error("bad size {0:?}: expected e.g. 65536, \"64KiB\", \"16MiB\"")]
    Size(String),
    /// An unknown size unit.
    #[error("bad size unit {unit:?} in {input:?}: use B, KiB, MiB or GiB")]
    SizeUnit {
        /// The unit.
        unit: String,
        /// The whole value.
        input: String,
    },
    /// More bytes than a `usize` holds.
    #[error("size {0:?} is too large")]
    SizeOverflow(String),
    /// A negative size.
    #[error("size must not be negative, got {0}")]
    NegativeSize(i64),
    /// A fractional size.
    #[error("size must be a whole number of bytes, got {0}")]
    FractionalSize(f64),
    /// Not a number with an optional unit.
    #[error("bad duration {0:?}: expected e.g. 10, \"500ms\", \"10s\", \"2m\"")]
    Duration(String),
    /// An unknown duration unit.
    #[error("bad duration unit {unit:?} in {input:?}: use ms, s, m or h")]
    DurationUnit {
        /// The unit.
        unit: String,
        /// The whole value.
        input: String,
    },
    /// Negative, not finite, or over a year.
    #[error("duration {0}s is out of range")]
    DurationRange(f64),
    /// A listen address with a scheme other than `websocket://` or `ws://`.
    #[error("unsupported scheme in {0:?}: use websocket://HOST:PORT")]
    Scheme(String),
    /// A listen address that does not resolve.
    #[error("bad listen address {input:?}: {source} (expected websocket://HOST:PORT)")]
    Listen {
        /// The address as written.
        input: String,
        /// Why it does not resolve.
        source: io::Error,
    },
    /// A listen address that resolves to no address at all.
    #[error("listen address {0:?} resolves to nothing")]
    NoAddress(String),
}
