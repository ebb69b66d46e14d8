//! `[api]`: the backend HTTP API. A backend (PHP, Python, Node, Go) publishes to topics, sends
//! to users and connections, disconnects them, and asks who is there, over plain HTTP with a
//! bearer key. The API is served by the workers of one group, one SO_REUSEPORT socket per
//! worker slot like the WebSocket listeners, so its load spreads over the cores and never
//! passes through the master. Off unless the table is there.

use super::values::{Listen, bytes, seconds};
use serde::{Deserialize, Deserializer, de};
use std::fmt;
use std::time::Duration;

/// The shortest API key accepted: a key is a password, and a short one can be guessed.
pub const MIN_KEY_LEN: usize = 16;

/// `[api]`: where the backend API listens, the keys it accepts, and its limits.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// `http://HOST:PORT` or `HOST:PORT`. Port 0 picks a free port (shown by the banner and
    /// `status`).
    #[serde(deserialize_with = "http_listen")]
    pub listen: Listen,
    /// Accepted keys, sent as `Authorization: Bearer <key>`. Several, so that a key can be
    /// rotated: add the new one, move the backends, remove the old one, each by `reload`.
    pub keys: Vec<Secret>,
    /// The group whose workers serve the API, and that a request naming no group is for
    /// (other groups are reached through them). May be left out when there is one group.
    #[serde(default)]
    pub group: Option<String>,
    /// The largest request body; larger gets 413 before it is read.
    #[serde(default = "d::max_body", deserialize_with = "bytes")]
    pub max_body: usize,
    /// A request (head and body) must arrive within this time from its first byte, and a
    /// keep-alive connection may sit idle this long; otherwise it is closed (slowloris).
    #[serde(default = "d::request_timeout", deserialize_with = "seconds")]
    pub request_timeout: Duration,
    /// API connections one worker holds at once; more wait in the accept queue.
    #[serde(default = "d::max_connections")]
    pub max_connections: usize,
}

mod d {
    use std::time::Duration;
    pub fn max_body() -> usize {
        1 << 20
    }
    pub fn request_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_connections() -> usize {
        1024
    }
}

/// A key or a secret (`[api] keys`, `jwt_hs256_secret`). It never appears in logs, `status`
/// or errors: its `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// A secret given in code.
    pub fn new(key: impl Into<String>) -> Secret {
        Secret(key.into())
    }

    /// The secret's bytes, for the code that needs them (a token verifier).
    pub fn expose(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// Whether `presented` is this key. Every byte is compared whatever the first difference,
    /// so the time taken does not tell an attacker how much of a guess was right.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let key = self.0.as_bytes();
        let differ = key
            .iter()
            .zip(presented)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        differ == 0 && key.len() == presented.len()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// `[api]` values that cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApiProblem {
    /// No key: an API without one would let anyone publish.
    #[error("[api] needs at least one key in keys = [...]")]
    NoKeys,
    /// A key shorter than `MIN_KEY_LEN` (which one is said by position, not by value).
    #[error("[api] keys[{0}] is shorter than {MIN_KEY_LEN} characters: use a long random key")]
    ShortKey(usize),
    /// `max_connections` is 0.
    #[error("[api] max_connections must be at least 1")]
    NoConnections,
    /// `request_timeout` is 0.
    #[error("[api] request_timeout must be longer than 0")]
    NoRequestTime,
    /// `group` names no group.
    #[error("[api] group {group:?} is not a group here: the groups are {}", known.join(", "))]
    UnknownGroup {
        /// The name given.
        group: String,
        /// The groups there are.
        known: Vec<String>,
    },
    /// Several groups and no `group`.
    #[error("[api] must name the group it serves (group = \"...\"): there are {}", .0.join(", "))]
    WhichGroup(Vec<String>),
    /// The API would listen where a group does.
    #[error("[api] listen {listen} is already used by group {group:?}")]
    ListenTaken {
        /// The API's address.
        listen: String,
        /// The group listening there.
        group: String,
    },
}

impl ApiConfig {
    /// An API on `listen` accepting `keys`, every other key at its default.
    pub fn new(listen: Listen, keys: Vec<Secret>) -> ApiConfig {
        ApiConfig {
            listen,
            keys,
            group: None,
            max_body: d::max_body(),
            request_timeout: d::request_timeout(),
            max_connections: d::max_connections(),
        }
    }

    /// The values checked on their own.
    pub fn check(&self) -> Result<(), ApiProblem> {
        if self.keys.is_empty() {
            return Err(ApiProblem::NoKeys);
        }
        if let Some(i) = self.keys.iter().position(|k| k.0.len() < MIN_KEY_LEN) {
            return Err(ApiProblem::ShortKey(i));
        }
        if self.max_connections == 0 {
            return Err(ApiProblem::NoConnections);
        }
        if self.request_timeout.is_zero() {
            return Err(ApiProblem::NoRequestTime);
        }
        Ok(())
    }

    /// The group the API serves among `groups` (name and listen address, code's and the
    /// file's together), checked against their addresses.
    pub fn group_among(&self, groups: &[(&str, &Listen)]) -> Result<String, ApiProblem> {
        if let Some((name, _)) = groups.iter().find(|(_, l)| l.overlaps(&self.listen)) {
            return Err(ApiProblem::ListenTaken {
                listen: self.listen.addr.to_string(),
                group: name.to_string(),
            });
        }
        let known = || groups.iter().map(|(n, _)| n.to_string()).collect();
        match (&self.group, groups) {
            (Some(g), _) if groups.iter().any(|(n, _)| n == g) => Ok(g.clone()),
            (Some(g), _) => Err(ApiProblem::UnknownGroup {
                group: g.clone(),
                known: known(),
            }),
            (None, [(only, _)]) => Ok(only.to_string()),
            (None, _) => Err(ApiProblem::WhichGroup(known())),
        }
    }
}

/// `[metrics]`: where the master serves the Prometheus metrics of every group and worker
/// (`/metrics`) and whether every worker is ready (`/health`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// `http://HOST:PORT` or `HOST:PORT`; keep it on a private address. Port 0 picks a free
    /// port (shown by `status`).
    #[serde(deserialize_with = "http_listen")]
    pub listen: Listen,
}

/// `http://HOST:PORT` or `HOST:PORT`.
pub(super) fn http_listen<'de, D: Deserializer<'de>>(d: D) -> Result<Listen, D::Error> {
    let s = String::deserialize(d)?;
    let rest = s.strip_prefix("http://").unwrap_or(&s);
    if rest.contains("://") {
        return Err(de::Error::custom(format!(
            "unsupported scheme in {s:?}: use http://HOST:PORT"
        )));
    }
    Listen::parse(rest).map_err(de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(s: &str) -> Listen {
        Listen::parse(s).unwrap()
    }

    #[test]
    fn keys_match_exactly_and_stay_out_of_debug() {
        let k = Secret::new("0123456789abcdef");
        assert!(k.matches(b"0123456789abcdef"));
        assert!(!k.matches(b"0123456789abcde"));
        assert!(!k.matches(b"0123456789abcdefg"));
        assert!(!k.matches(b"0123456789abcdeF"));
        assert!(!k.matches(b""));
        assert_eq!(format!("{k:?}"), "Secret(***)");
    }

    #[test]
    fn the_group_is_the_only_one_or_named() {
        let mut api = ApiConfig::new(listen("127.0.0.1:9502"), vec![Secret::new("k".repeat(16))]);
        let (a, b) = (listen("0.0.0.0:1"), listen("0.0.0.0:2"));
        assert_eq!(api.group_among(&[("chat", &a)]), Ok("chat".into()));
        assert_eq!(
            api.group_among(&[("chat", &a), ("feed", &b)]),
            Err(ApiProblem::WhichGroup(vec!["chat".into(), "feed".into()]))
        );
        api.group = Some("feed".into());
        assert_eq!(
            api.group_among(&[("chat", &a), ("feed", &b)]),
            Ok("feed".into())
        );
        assert!(matches!(
            api.group_among(&[("chat", &a)]),
            Err(ApiProblem::UnknownGroup { .. })
        ));
        let taken = listen("0.0.0.0:9502");
        assert!(matches!(
            api.group_among(&[("feed", &taken)]),
            Err(ApiProblem::ListenTaken { .. })
        ));
    }

    #[test]
    fn short_keys_and_zero_limits_are_refused() {
        let mut api = ApiConfig::new(listen("127.0.0.1:0"), vec![]);
        assert_eq!(api.check(), Err(ApiProblem::NoKeys));
        api.keys = vec![Secret::new("k".repeat(16)), Secret::new("short")];
        assert_eq!(api.check(), Err(ApiProblem::ShortKey(1)));
        api.keys.pop();
        assert_eq!(api.check(), Ok(()));
        api.max_connections = 0;
        assert_eq!(api.check(), Err(ApiProblem::NoConnections));
    }
}
