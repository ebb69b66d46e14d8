//! The values `workers.toml` writes in its own notation: sizes (`"64KiB"`), durations
//! (`"500ms"`) and listen addresses (`websocket://HOST:PORT`). Each parses by its own
//! `Deserialize` impl, so the TOML parser attaches the offending value's line to its reason.

use super::ValueError;
use serde::{Deserialize, Deserializer, de};
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

pub(super) fn bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    Bytes::deserialize(d).map(|b| b.0)
}

pub(super) fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    Seconds::deserialize(d).map(|s| s.0)
}

/// A byte size: an integer, or a string such as `"64KiB"`, `"16MiB"`, `"1GB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub usize);

impl Bytes {
    /// Parses `"65536"`, `"64KiB"`, `"16 MiB"`, `"1GB"` (units are powers of 1024).
    pub fn parse(s: &str) -> Result<Bytes, ValueError> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: usize = num.parse().map_err(|_| ValueError::Size(s.to_string()))?;
        let mult: usize = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" | "kib" => 1 << 10,
            "m" | "mb" | "mib" => 1 << 20,
            "g" | "gb" | "gib" => 1 << 30,
            other => {
                return Err(ValueError::SizeUnit {
                    unit: other.to_string(),
                    input: s.to_string(),
                });
            }
        };
        num.checked_mul(mult)
            .map(Bytes)
            .ok_or_else(|| ValueError::SizeOverflow(s.to_string()))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrStr::deserialize(d)? {
            IntOrStr::Int(n) if n >= 0 => Ok(Bytes(n as usize)),
            IntOrStr::Int(n) => Err(ValueError::NegativeSize(n)),
            IntOrStr::Float(f) => Err(ValueError::FractionalSize(f)),
            IntOrStr::Str(s) => Bytes::parse(&s),
        }
        .map_err(de::Error::custom)
    }
}

/// A duration: a number of seconds (`10`, `0.5`) or a string such as `"500ms"`, `"10s"`, `"2m"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seconds(pub Duration);

impl Seconds {
    /// Parses `"10"`, `"0.5"`, `"500ms"`, `"10s"`, `"2m"`, `"1h"`.
    pub fn parse(s: &str) -> Result<Seconds, ValueError> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| ValueError::Duration(s.to_string()))?;
        let secs = match unit.trim() {
            "ms" => num / 1000.0,
            "" | "s" => num,
            "m" | "min" => num * 60.0,
            "h" => num * 3600.0,
            other => {
                return Err(ValueError::DurationUnit {
                    unit: other.to_string(),
                    input: s.to_string(),
                });
            }
        };
        Self::from_secs(secs)
    }

    fn from_secs(secs: f64) -> Result<Seconds, ValueError> {
        if !secs.is_finite() || !(0.0..=86_400.0 * 365.0).contains(&secs) {
            return Err(ValueError::DurationRange(secs));
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

/// A number or a string, for values that may be written either way.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum IntOrStr {
    Int(i64),
    Float(f64),
    Str(String),
}

/// A listen address as written (`websocket://0.0.0.0:2346`) and as resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// The address the group's listeners bind.
    pub addr: SocketAddr,
}

impl Listen {
    /// Parses `websocket://HOST:PORT`, `ws://HOST:PORT` or `HOST:PORT`, resolving the host.
    pub fn parse(s: &str) -> Result<Listen, ValueError> {
        let rest = ["websocket://", "ws://"]
            .iter()
            .find_map(|scheme| s.strip_prefix(scheme))
            .unwrap_or(s);
        if rest.contains("://") {
            return Err(ValueError::Scheme(s.to_string()));
        }
        let rest = rest.trim_end_matches('/');
        let addr = rest
            .to_socket_addrs()
            .map_err(|source| ValueError::Listen {
                input: s.to_string(),
                source,
            })?
            .next()
            .ok_or_else(|| ValueError::NoAddress(s.to_string()))?;
        Ok(Listen { addr })
    }

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
