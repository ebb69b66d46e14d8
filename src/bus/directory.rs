//! Presence and users across hosts, kept in Redis: who is subscribed to a topic, and where a
//! user's connections are, for the whole cluster.
//!
//! Each worker writes only its own records, in a hash per (topic or user, worker), and marks
//! itself in an index whose scores are expiry times:
//!
//! ```text
//! wsd:{group}:p:{topic}:{host:016x}:{slot}   HASH  conn id -> {"user":..,"info":..}   (TTL)
//! wsd:{group}:pi:{topic}                     ZSET  "{host:016x}:{slot}" scored by expiry (ms)
//! wsd:{group}:u:{user}:{host:016x}:{slot}    HASH  conn id -> {}                      (TTL)
//! wsd:{group}:ui:{user}                      ZSET  the same, for users
//! ```
//!
//! A worker refreshes the expiry of what it holds every [`REFRESH`]; a worker (or host) that
//! dies stops refreshing, and its records drop out of every answer within [`TTL`]. After an
//! outage (Redis restarted, records lost) the worker writes them all again. Reads take the
//! live workers from the index, then their hashes, in two round trips.
//!
//! The records are written by the cluster bus's publisher thread, in its pipelines; the loop
//! only queues them, so it never waits on Redis.

#[cfg(feature = "cluster")]
use super::wire::Origin;
#[cfg(feature = "cluster")]
use redis::{Connection, Pipeline, RedisResult};
use std::time::Duration;
#[cfg(feature = "cluster")]
use std::time::{SystemTime, UNIX_EPOCH};

/// How long a worker's records outlive its last refresh: the most a dead host stays present.
#[cfg(feature = "cluster")]
pub const TTL: Duration = Duration::from_secs(15);
/// How often a worker refreshes its records.
pub const REFRESH: Duration = Duration::from_secs(5);

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A topic's subscribers.
    Topic,
    /// A user's connections.
    User,
}

impl Kind {
    #[cfg(feature = "cluster")]
    fn tag(self) -> &'static str {
        match self {
            Kind::Topic => "p",
            Kind::User => "u",
        }
    }
}

/// A change to a worker's records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A connection joined `name`: `value` is what presence shows of it.
    Put {
        kind: Kind,
        name: String,
        conn: String,
        value: String,
    },
    /// A connection left `name`.
    Delete {
        kind: Kind,
        name: String,
        conn: String,
    },
    /// The worker still holds `name`: push its expiry on.
    Refresh { kind: Kind, name: String },
    /// Everything the worker holds of `name`, written afresh (after an outage).
    Replace {
        kind: Kind,
        name: String,
        entries: Vec<(String, String)>,
    },
}

#[cfg(feature = "cluster")]
fn worker_key(group: &str, kind: Kind, name: &str, me: Origin) -> String {
    format!(
        "wsd:{group}:{}:{name}:{:016x}:{}",
        kind.tag(),
        me.host,
        me.slot
    )
}

#[cfg(feature = "cluster")]
fn index_key(group: &str, kind: Kind, name: &str) -> String {
    format!("wsd:{group}:{}i:{name}", kind.tag())
}

#[cfg(feature = "cluster")]
fn member(me: Origin) -> String {
    format!("{:016x}:{}", me.host, me.slot)
}

#[cfg(feature = "cluster")]
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(feature = "cluster")]
/// Adds the commands of `rec`, written by worker `me`, to `pipe`.
pub fn write(pipe: &mut Pipeline, group: &str, me: Origin, rec: &Record) {
    let ttl = TTL.as_millis() as u64;
    let (kind, name) = match rec {
        Record::Put { kind, name, .. }
        | Record::Delete { kind, name, .. }
        | Record::Refresh { kind, name }
        | Record::Replace { kind, name, .. } => (*kind, name.as_str()),
    };
    let key = worker_key(group, kind, name, me);
    let index = index_key(group, kind, name);
    let mark = |pipe: &mut Pipeline| {
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl).ignore();
        pipe.cmd("ZADD")
            .arg(&index)
            .arg(now_ms() + ttl)
            .arg(member(me))
            .ignore();
        // Workers that stopped refreshing leave the index as they are found there.
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&index)
            .arg("-inf")
            .arg(now_ms())
            .ignore();
        pipe.cmd("PEXPIRE").arg(&index).arg(ttl).ignore();
    };
    match rec {
        Record::Put { conn, value, .. } => {
            pipe.cmd("HSET").arg(&key).arg(conn).arg(value).ignore();
            mark(pipe);
        }
        Record::Delete { conn, .. } => {
            pipe.cmd("HDEL").arg(&key).arg(conn).ignore();
        }
        Record::Refresh { .. } => mark(pipe),
        Record::Replace { entries, .. } => {
            pipe.cmd("DEL").arg(&key).ignore();
            if !entries.is_empty() {
                let mut hset = redis::cmd("HSET");
                hset.arg(&key);
                for (conn, value) in entries {
                    hset.arg(conn).arg(value);
                }
                pipe.add_command(hset).ignore();
                mark(pipe);
            }
        }
    }
}

#[cfg(feature = "cluster")]
/// Every live worker's entries for `name`, cluster-wide: `(conn id, value)`.
pub fn read(
    con: &mut Connection,
    group: &str,
    kind: Kind,
    name: &str,
) -> RedisResult<Vec<(String, String)>> {
    let members: Vec<String> = redis::cmd("ZRANGEBYSCORE")
        .arg(index_key(group, kind, name))
        .arg(now_ms())
        .arg("+inf")
        .query(con)?;
    if members.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for m in &members {
        pipe.cmd("HGETALL")
            .arg(format!("wsd:{group}:{}:{name}:{m}", kind.tag()));
    }
    let hashes: Vec<Vec<(String, String)>> = pipe.query(con)?;
    Ok(hashes.into_iter().flatten().collect())
}

#[cfg(all(test, feature = "cluster"))]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_group_the_kind_and_the_worker() {
        let me = Origin { host: 255, slot: 3 };
        assert_eq!(
            worker_key("rt", Kind::Topic, "room/1", me),
            "wsd:rt:p:room/1:00000000000000ff:3"
        );
        assert_eq!(index_key("rt", Kind::User, "ada"), "wsd:rt:ui:ada");
        assert_eq!(member(me), "00000000000000ff:3");
    }
}
